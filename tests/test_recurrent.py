"""RecurrentBatchNorm on every backend: a BN per time step, from tests/reference.py.

Tolerances as in test_functional: 1e-12 forward, 1e-10 backward (float64); 2e-5 in float32.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import make_data, reference_backward, reference_batch_norm

import anybn

RTOL = {"float64": (1e-12, 1e-10), "float32": (2e-5, 2e-5)}


def assert_close(got, expected, rtol):
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * max(1.0, np.abs(expected).max()))


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_per_step_statistics_and_gradients(backend, dtype):
    c, steps, momentum = 4, 3, 0.25
    layer = anybn.RecurrentBatchNorm(c, steps, momentum=momentum, xp=backend.module, device=backend.device,
                                     dtype=dtype)
    w0 = np.full(c, 0.1)
    np.testing.assert_array_equal(backend.to_numpy(layer.weight), w0.astype(dtype))
    assert tuple(layer.running_mean.shape) == (steps, c)
    rm, rv = np.zeros((steps, c)), np.ones((steps, c))
    xs = [(make_data((10, c), mean=t, std=1.0 + t, seed=t)).astype(dtype).astype(np.float64) for t in range(5)]
    dys = [make_data((10, c), seed=10 + t).astype(dtype).astype(np.float64) for t in range(5)]
    rtol_y, rtol_dx = RTOL[dtype]
    for t, x in enumerate(xs):  # steps 3 and 4 share the last row
        y = layer(backend.asarray(x, dtype), step=t)
        assert_close(backend.to_numpy(y), reference_batch_norm(x, 1, w0, np.zeros(c)), rtol_y)
        row = min(t, steps - 1)
        rm[row] = (1 - momentum) * rm[row] + momentum * x.mean(0)
        rv[row] = (1 - momentum) * rv[row] + momentum * x.var(0, ddof=1)
        assert_close(backend.to_numpy(layer.running_mean), rm, rtol_y)
        assert_close(backend.to_numpy(layer.running_var), rv, rtol_y)
    # backpropagation through time: steps in reverse, parameter gradients summed
    gw, gb = np.zeros(c), np.zeros(c)
    for t in reversed(range(5)):
        dx = layer.backward(backend.asarray(dys[t], dtype), step=t)
        rdx, rdw, rdb = reference_backward(xs[t], dys[t], 1, w0)
        assert_close(backend.to_numpy(dx), rdx, rtol_dx)
        gw, gb = gw + rdw, gb + rdb
    assert_close(backend.to_numpy(layer.grad_weight), gw, rtol_dx)
    assert_close(backend.to_numpy(layer.grad_bias), gb, rtol_dx)
    # eval: the step's row, the last row beyond max_steps
    layer.eval()
    x = xs[0]
    for t in (0, 1, 2, 7):
        row = min(t, steps - 1)
        y = layer(backend.asarray(x, dtype), step=t)
        assert_close(backend.to_numpy(y), reference_batch_norm(x, 1, w0, np.zeros(c), mean=rm[row], var=rv[row]),
                     rtol_y)


def test_backward_matches_finite_differences(backend):
    layer = anybn.RecurrentBatchNorm(3, 2, xp=backend.module, device=backend.device, dtype="float64")
    x, dy = make_data((6, 3), seed=1), make_data((6, 3), seed=2)

    def loss(x0):
        return float(np.sum(backend.to_numpy(layer(backend.asarray(x0), step=1)) * dy))

    layer(backend.asarray(x), step=1)
    dx = backend.to_numpy(layer.backward(backend.asarray(dy), step=1))
    h = 1e-6
    for flat in (0, 5, 11, 17):
        idx = np.unravel_index(flat, x.shape)
        xp_, xm = x.copy(), x.copy()
        xp_[idx] += h
        xm[idx] -= h
        fd = (loss(xp_) - loss(xm)) / (2 * h)
        assert abs(fd - dx[idx]) <= 1e-6 * max(1.0, abs(fd))


def test_state_dict_round_trip_and_zero_grad():
    layer = anybn.RecurrentBatchNorm(3, 4)
    layer(make_data((5, 3), seed=3).astype(np.float32), step=2)
    state = layer.state_dict()
    assert state["running_mean"].shape == (4, 3)
    other = anybn.RecurrentBatchNorm(3, 4)
    other.load_state_dict(state)
    np.testing.assert_array_equal(other.running_var, layer.running_var)
    layer.backward(np.ones((5, 3), np.float32))
    assert layer.grad_bias is not None
    layer.zero_grad()
    assert layer.grad_bias is None and layer.grad_weight is None
    with pytest.raises(ValueError, match=r"running_mean has shape \(3,\), expected \(4, 3\)"):
        other.load_state_dict({**state, "running_mean": np.zeros(3)})


def test_errors():
    layer = anybn.RecurrentBatchNorm(3, 4)
    x = np.ones((5, 3), np.float32)
    with pytest.raises(ValueError, match="step must be an int >= 0, got -1"):
        layer(x, step=-1)
    with pytest.raises(TypeError, match="step must be an int >= 0, got float"):
        layer(x, step=1.5)
    with pytest.raises(ValueError, match="max_steps must be a positive int, got 0"):
        anybn.RecurrentBatchNorm(3, 0)
    with pytest.raises(ValueError, match="no forward pass at step 2"):
        layer.backward(x, step=2)
    with pytest.raises(ValueError, match="momentum must be a float"):
        anybn.RecurrentBatchNorm(3, 2, momentum=None)
    with pytest.raises(TypeError, match="not kept per step"):
        layer.estimate_population([x])


def test_docs_lstm_example_runs():
    import re
    from pathlib import Path

    page = (Path(__file__).parent.parent / "docs" / "recurrent.md").read_text(encoding="utf-8")
    example = re.findall(r"```python\n(.*?)```", page, re.S)[-1]
    scope: dict = {}
    exec(compile(example, "docs/recurrent.md", "exec"), scope)
    assert scope["h"].shape == (32, 16)
    assert scope["cell"].bn_x.running_mean.shape == (10, 64)
