"""Frozen batch normalization (BatchNorm.freeze) on every backend, against PyTorch autograd.

The reference is ``torch.nn.functional.batch_norm`` with ``training=False`` (fixed
statistics) under autograd, in float64. Tolerances as in test_renorm: 1e-10 in float64,
2e-5 in float32 (one O(C) reduction per parameter gradient over <= 720 values).
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import make_data

import anybn

torch = pytest.importorskip("torch")

RTOL = {"float64": 1e-10, "float32": 2e-5}


def assert_close(got, expected, rtol):
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * max(1.0, np.abs(expected).max()))


def torch_fixed(x, dy, mean, var, w, b, axis, eps=1e-5):
    """y, dx, dw, db of normalization with constant statistics, by autograd (float64)."""
    xt = torch.tensor(np.moveaxis(x, axis, 1).copy(), requires_grad=True)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    y = torch.nn.functional.batch_norm(xt, torch.tensor(mean), torch.tensor(var), wt, bt, training=False, eps=eps)
    y.backward(torch.tensor(np.moveaxis(dy, axis, 1).copy()))
    back = lambda t: np.moveaxis(t.detach().numpy(), 1, axis)  # noqa: E731
    return back(y), back(xt.grad), wt.grad.numpy(), bt.grad.numpy()


def _trained(backend, c, dtype, axis=1):
    layer = anybn.BatchNorm(c, axis=axis, xp=backend.module, device=backend.device, dtype=dtype)
    for seed in range(2):
        layer(backend.asarray(make_data((8, c, 3) if axis == 1 else (8, 3, c), mean=2.0, std=3.0, seed=seed), dtype))
    layer.weight = backend.asarray(np.linspace(0.5, 1.5, c), dtype)
    layer.bias = backend.asarray(np.linspace(-1.0, 1.0, c), dtype)
    return layer


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape, axis", [((16, 5), 1), ((4, 5, 6, 3), 1), ((4, 6, 3, 5), -1)])
def test_frozen_train_mode_matches_fixed_statistics(backend, shape, axis, dtype):
    c = shape[axis]
    layer = _trained(backend, c, dtype, axis).freeze().train()
    assert layer.frozen and layer.training
    state = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
    x = make_data(shape, mean=1.0, std=2.0, seed=7).astype(dtype).astype(np.float64)
    dy = make_data(shape, seed=8).astype(dtype).astype(np.float64)
    ry, rdx, rdw, rdb = torch_fixed(x, dy, state["running_mean"], state["running_var"], state["weight"],
                                    state["bias"], axis)
    y = layer(backend.asarray(x, dtype))
    dx = layer.backward(backend.asarray(dy, dtype))
    rtol = RTOL[dtype]
    assert_close(backend.to_numpy(y), ry, rtol)
    assert_close(backend.to_numpy(dx), rdx, rtol)
    assert_close(backend.to_numpy(layer.grad_weight), rdw, rtol)
    assert_close(backend.to_numpy(layer.grad_bias), rdb, rtol)
    # never updated, the state dict unchanged
    after = {k: backend.to_numpy(v) for k, v in layer.state_dict().items()}
    assert set(after) == set(state)
    for k in state:
        np.testing.assert_array_equal(after[k], state[k])


def test_backward_matches_finite_differences(backend):
    layer = _trained(backend, 4, "float64").freeze()
    x = make_data((6, 4, 3), seed=9)
    dy = make_data((6, 4, 3), seed=10)

    def loss(x0):
        return float(np.sum(backend.to_numpy(layer(backend.asarray(x0))) * dy))

    layer(backend.asarray(x))
    dx = backend.to_numpy(layer.backward(backend.asarray(dy)))
    h = 1e-6
    for flat in (0, 17, 40, 71):
        idx = np.unravel_index(flat, x.shape)
        xp_, xm = x.copy(), x.copy()
        xp_[idx] += h
        xm[idx] -= h
        fd = (loss(xp_) - loss(xm)) / (2 * h)
        assert abs(fd - dx[idx]) <= 1e-7 * max(1.0, abs(fd))


def test_train_and_eval_do_not_unfreeze():
    layer = anybn.BatchNorm(3).freeze()
    assert layer.train().frozen and layer.eval().frozen and layer.train(True).frozen
    x = make_data((8, 3), mean=5.0, seed=1).astype(np.float32)
    layer(x)
    assert layer.num_batches_tracked == 0
    np.testing.assert_array_equal(layer.running_mean, np.zeros(3, np.float32))
    layer.unfreeze()
    assert not layer.frozen
    layer(x)
    assert layer.num_batches_tracked == 1
    assert np.abs(layer.running_mean).max() > 0.1


def test_frozen_is_not_torch_eval_trick():
    """The PyTorch pitfall (pytorch#86590): model.train() re-enables batch statistics; here not."""
    layer = anybn.BatchNorm(3).freeze()
    layer.train()
    x = make_data((8, 3), mean=5.0, std=2.0, seed=2).astype(np.float32)
    y = layer(x)
    np.testing.assert_allclose(y, x / np.sqrt(1 + 1e-5), rtol=1e-6)  # running stats 0, 1


def test_freeze_needs_running_stats():
    with pytest.raises(ValueError, match="track_running_stats=False"):
        anybn.BatchNorm(3, track_running_stats=False).freeze()


def test_frozen_renorm_and_repr():
    layer = anybn.BatchRenorm(3).freeze()
    x = make_data((8, 3), mean=5.0, seed=3).astype(np.float32)
    layer(x)
    assert layer.num_batches_tracked == 0
    assert "frozen" in repr(anybn.BatchNorm(3).freeze())
