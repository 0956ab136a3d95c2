"""Batch renormalization on every backend: against PyTorch autograd with r and d detached.

Tolerances: float64 results of a few O(C) reductions over <= 720 values agree with the
float64 reference to ~1e-14 relative; 1e-10 leaves room for the conditioning of x-hat. In
float32 the sums are float32 (generic) or float64 (fast path) over <= 720 values with
|x - mean| / std <= 5: ~1e-6 relative at most, so 2e-5; a planted error of 1e-4 fails both
(test_planted_error_fails).
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import make_data, reference_batch_norm

import anybn

torch = pytest.importorskip("torch")

LAYOUTS = [((16, 5), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)]
RTOL = {"float64": 1e-10, "float32": 2e-5}


def close(got, expected, rtol) -> bool:
    expected = np.asarray(expected, dtype=np.float64)
    return bool(np.allclose(got, expected, rtol=rtol, atol=rtol * max(1.0, np.abs(expected).max())))


def assert_close(got, expected, rtol):
    assert close(got, expected, rtol), f"max abs error {np.abs(np.asarray(got) - expected).max():.3g}"


def _case(shape, axis, seed=0, clip_all=False):
    """x, dy, weight, bias, running_mean, running_var (float64 NumPy)."""
    c = shape[axis]
    x = make_data(shape, mean=1.5, std=2.0, seed=seed)
    dy = make_data(shape, mean=0.2, std=1.0, seed=seed + 1)
    w, b = np.linspace(0.5, 1.5, c), np.linspace(-1.0, 1.0, c)
    if clip_all:  # sigma_B / sigma > rmax and |d| > dmax everywhere: r, d do not move with x
        rm, rv = np.full(c, -5.0), np.full(c, 0.05)
    else:  # some features clipped, some not
        rm = np.linspace(-1.0, 4.0, c)
        rv = np.linspace(0.3, 30.0, c)
    return x, dy, w, b, rm, rv


def torch_renorm(x, dy, w, b, rm, rv, rmax, dmax, axis, eps=1e-5):
    """y, dx, dw, db by PyTorch autograd of the paper's formulas, r and d detached (float64)."""
    xt = torch.tensor(x, requires_grad=True)
    wt, bt = torch.tensor(w, requires_grad=True), torch.tensor(b, requires_grad=True)
    dims = [i for i in range(x.ndim) if i != axis % x.ndim]
    shape = [1] * x.ndim
    shape[axis % x.ndim] = -1
    mean = xt.mean(dim=dims, keepdim=True)
    var = ((xt - mean) ** 2).mean(dim=dims, keepdim=True)
    sigma_b = torch.sqrt(var + eps)
    sigma = torch.sqrt(torch.tensor(rv).reshape(shape) + eps)
    r = torch.clamp(sigma_b / sigma, 1 / rmax, rmax).detach()
    d = torch.clamp((mean - torch.tensor(rm).reshape(shape)) / sigma, -dmax, dmax).detach()
    y = wt.reshape(shape) * ((xt - mean) / sigma_b * r + d) + bt.reshape(shape)
    y.backward(torch.tensor(dy))
    return y.detach().numpy(), xt.grad.numpy(), wt.grad.numpy(), bt.grad.numpy()


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_matches_torch_autograd(backend, shape, axis, dtype):
    x, dy, w, b, rm, rv = _case(shape, axis)
    x = x.astype(dtype).astype(np.float64)  # the reference sees the values the backend sees
    ry, rdx, rdw, rdb = torch_renorm(x, dy, w, b, rm, rv, 2.0, 0.5, axis)
    a = lambda v: backend.asarray(v, dtype)  # noqa: E731
    y, saved = anybn.batch_renorm_train(a(x), a(w), a(b), a(rm), a(rv), rmax=2.0, dmax=0.5, axis=axis)
    dx, dw, db = anybn.batch_norm_backward(a(dy), saved)
    rtol = RTOL[dtype]
    assert_close(backend.to_numpy(y), ry, rtol)
    assert_close(backend.to_numpy(dx), rdx, rtol)
    assert_close(backend.to_numpy(dw), rdw, rtol)
    assert_close(backend.to_numpy(db), rdb, rtol)
    r = backend.to_numpy(saved.r)
    assert r.min() >= 0.5 - 1e-12 and r.max() <= 2.0 + 1e-12 and np.ptp(r) > 0
    assert np.abs(backend.to_numpy(saved.d)).max() <= 0.5 + 1e-12


def test_without_affine(backend):
    x, dy, w, b, rm, rv = _case((16, 5), 1)
    ry, rdx, _, _ = torch_renorm(x, dy, np.ones(5), np.zeros(5), rm, rv, 2.0, 0.5, 1)
    a = backend.asarray
    y, saved = anybn.batch_renorm_train(a(x), None, None, a(rm), a(rv), rmax=2.0, dmax=0.5)
    dx, dw, db = anybn.batch_norm_backward(a(dy), saved)
    assert_close(backend.to_numpy(y), ry, 1e-10)
    assert_close(backend.to_numpy(dx), rdx, 1e-10)
    assert dw is None and db is None


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_backward_matches_finite_differences(backend, shape, axis):
    # every feature clipped: r and d are locally constant, so the true derivative of the
    # forward is the analytic backward's
    x, dy, w, b, rm, rv = _case(shape, axis, seed=3, clip_all=True)
    a = backend.asarray

    def loss(x0):
        y, _ = anybn.batch_renorm_train(a(x0), a(w), a(b), a(rm), a(rv), rmax=2.0, dmax=0.5, axis=axis)
        return float(np.sum(backend.to_numpy(y) * dy))

    _, saved = anybn.batch_renorm_train(a(x), a(w), a(b), a(rm), a(rv), rmax=2.0, dmax=0.5, axis=axis)
    dx = backend.to_numpy(anybn.batch_norm_backward(a(dy), saved)[0])
    rng = np.random.default_rng(0)
    h = 1e-6
    for flat in rng.choice(x.size, size=6, replace=False):
        idx = np.unravel_index(flat, x.shape)
        xp_, xm = x.copy(), x.copy()
        xp_[idx] += h
        xm[idx] -= h
        fd = (loss(xp_) - loss(xm)) / (2 * h)
        assert abs(fd - dx[idx]) <= 1e-6 * max(1.0, abs(fd)), (idx, fd, dx[idx])


@pytest.mark.parametrize("shape, axis", [((16, 5), 1), ((64, 8, 32, 32), 1), ((64, 16, 16, 8), -1)])
def test_rmax_1_dmax_0_is_batch_norm_exactly(numpy_path, shape, axis):
    # small shapes take the fast path's whole-step kernels, large ones the stages
    x = make_data(shape, mean=3.0, std=2.0, seed=5).astype(np.float32)
    c = shape[axis]
    w, b = np.linspace(0.5, 1.5, c, dtype=np.float32), np.linspace(-1, 1, c, dtype=np.float32)
    rm, rv = np.full(c, 7.0, dtype=np.float32), np.full(c, 0.1, dtype=np.float32)
    y, saved = anybn.batch_renorm_train(x, w, b, rm, rv, rmax=1.0, dmax=0.0, axis=axis)
    y0, saved0 = anybn.batch_norm_train(x, w, b, axis=axis)
    dy = make_data(shape, seed=6).astype(np.float32)
    dx, dw, db = anybn.batch_norm_backward(dy, saved)
    dx0, dw0, db0 = anybn.batch_norm_backward(dy, saved0)
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(dx, dx0)
    np.testing.assert_array_equal(dw, dw0)
    np.testing.assert_array_equal(db, db0)
    np.testing.assert_array_equal(saved.mean, saved0.mean)


def test_rmax_1_dmax_0_stages_equal_batch_norm_stages(monkeypatch):
    """Through the renorm stages (rmax=1 exactly, dmax a denormal above 0): the same bits."""
    monkeypatch.setenv("ANYBN_FAST_PATHS", "0")
    x, dy, w, b, rm, rv = _case((64, 8, 5), 1, seed=11)
    y, saved = anybn.batch_renorm_train(x, w, b, rm, rv, rmax=1.0, dmax=5e-324)
    y0, saved0 = anybn.batch_norm_train(x, w, b)
    assert saved.r is not None
    np.testing.assert_array_equal(y, y0)
    np.testing.assert_array_equal(anybn.batch_norm_backward(dy, saved)[0], anybn.batch_norm_backward(dy, saved0)[0])


def test_planted_error_fails():
    x, dy, w, b, rm, rv = _case((16, 5), 1)
    ry, rdx, _, _ = torch_renorm(x, dy, w, b, rm, rv, 2.0, 0.5, 1)
    for dtype, rtol in RTOL.items():
        for ref in (ry, rdx):
            planted = ref.copy()
            planted.flat[7] += 1e-4 * max(1.0, np.abs(ref).max())
            assert not close(planted, ref, rtol), dtype


def test_layer_trains_and_updates_running_stats(backend):
    x, _, _, _, _, _ = _case((16, 5), 1)
    layer = anybn.BatchRenorm(5, rmax=1.5, dmax=0.2, momentum=0.25, xp=backend.module, device=backend.device,
                              dtype="float64")
    rm, rv = np.zeros(5), np.ones(5)
    for step in range(3):
        xs = x + step
        ry, *_ = torch_renorm(xs, np.ones_like(xs), np.ones(5), np.zeros(5), rm, rv, 1.5, 0.2, 1)
        y = layer(backend.asarray(xs))
        assert_close(backend.to_numpy(y), ry, 1e-10)
        mean, var = xs.mean(0), xs.var(0, ddof=1)
        rm, rv = 0.75 * rm + 0.25 * mean, 0.75 * rv + 0.25 * var
        assert_close(backend.to_numpy(layer.running_mean), rm, 1e-12)
        assert_close(backend.to_numpy(layer.running_var), rv, 1e-12)
    layer.backward(backend.asarray(np.ones_like(x)))
    assert layer.grad_weight is not None
    layer.eval()
    y = layer(backend.asarray(x))
    assert_close(backend.to_numpy(y), reference_batch_norm(x, 1, mean=rm, var=rv), 1e-10)
    assert layer.num_batches_tracked == 3


def test_layer_schedule_and_state_dict():
    layer = anybn.BatchRenorm(3)
    assert (layer.rmax, layer.dmax) == (3.0, 5.0)
    layer.rmax, layer.dmax = anybn.renorm_limits(0)
    assert (layer.rmax, layer.dmax) == (1.0, 0.0)
    assert set(layer.state_dict()) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked"}
    assert layer.momentum == 0.01


def test_renorm_limits_schedule():
    assert anybn.renorm_limits(0) == (1.0, 0.0)
    assert anybn.renorm_limits(5000) == (1.0, 0.0)
    rmax, dmax = anybn.renorm_limits(15000)
    assert rmax == pytest.approx(1 + 2 * 10000 / 35000) and dmax == pytest.approx(5 * 10000 / 20000)
    assert anybn.renorm_limits(25000)[1] == 5.0
    assert anybn.renorm_limits(10**6) == (3.0, 5.0)
    assert anybn.renorm_limits(50, warmup=0, rmax_step=100, dmax_step=100, rmax=2.0, dmax=1.0) == (1.5, 0.5)


@pytest.mark.parametrize("kwargs, match", [
    ({"rmax": 0.5, "dmax": 1.0}, "rmax must be >= 1"),
    ({"rmax": 2.0, "dmax": -0.1}, "dmax must be >= 0"),
    ({"rmax": float("nan"), "dmax": 1.0}, "rmax must be >= 1"),
])
def test_bad_limits(kwargs, match):
    x, _, w, b, rm, rv = _case((16, 5), 1)
    with pytest.raises(ValueError, match=match):
        anybn.batch_renorm_train(x, w, b, rm, rv, **kwargs)
    with pytest.raises(ValueError, match=match):
        anybn.BatchRenorm(5, **kwargs)
    with pytest.raises(ValueError, match=match):
        anybn.renorm_limits(10, **kwargs)


def test_bad_arguments():
    x, _, w, b, rm, rv = _case((16, 5), 1)
    with pytest.raises(TypeError, match="running_var is required"):
        anybn.batch_renorm_train(x, w, b, rm, None, rmax=2.0, dmax=1.0)
    with pytest.raises(ValueError, match=r"running_mean has shape \(4,\), expected \(5,\)"):
        anybn.batch_renorm_train(x, w, b, rm[:4], rv, rmax=2.0, dmax=1.0)
    with pytest.raises(ValueError, match="step must be >= 0"):
        anybn.renorm_limits(-1)
    layer = anybn.BatchRenorm(5)
    with pytest.raises(ValueError, match="rmax must be >= 1"):
        layer.rmax = 0.9
    with pytest.raises(ValueError, match="momentum must be a float"):
        anybn.BatchRenorm(5, momentum=None)


def test_inputs_not_modified():
    x, _, w, b, rm, rv = _case((16, 5), 1)
    copies = [a.copy() for a in (x, w, b, rm, rv)]
    anybn.batch_renorm_train(x, w, b, rm, rv, rmax=2.0, dmax=1.0)
    for a, c in zip((x, w, b, rm, rv), copies):
        np.testing.assert_array_equal(a, c)
