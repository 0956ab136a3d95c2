"""Ghost (virtual-batch) BN on every backend: plain BN of each chunk, from tests/reference.py.

Tolerances as in test_functional (each chunk is plain BN): 1e-12 forward and 1e-10
backward in float64; 2e-5 in float32 (sums over <= 180 values per chunk).
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import make_data, reference_backward, reference_batch_norm

import anybn

LAYOUTS = [((16, 5), 1, 4), ((8, 3, 5, 6), 1, 2), ((6, 5, 6, 3), -1, 3), ((12, 4, 3), 1, 12)]
RTOL = {"float64": (1e-12, 1e-10), "float32": (2e-5, 2e-5)}


def assert_close(got, expected, rtol):
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * max(1.0, np.abs(expected).max()))


def _per_chunk(fn, x, v, *args):
    return [fn(x[i : i + v], *args) for i in range(0, x.shape[0], v)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("shape, axis, v", LAYOUTS)
def test_equals_batch_norm_per_chunk(backend, shape, axis, v, dtype):
    c = shape[axis]
    x = make_data(shape, mean=2.0, std=3.0, seed=0).astype(dtype).astype(np.float64)
    # chunks with different statistics: the grouping matters
    x = x + np.arange(shape[0]).reshape((-1,) + (1,) * (len(shape) - 1))
    dy = make_data(shape, seed=1).astype(dtype).astype(np.float64)
    w, b = np.linspace(0.5, 1.5, c), np.linspace(-1.0, 1.0, c)
    a = lambda t: backend.asarray(t, dtype)  # noqa: E731
    y, saved = anybn.batch_norm_train(a(x), a(w), a(b), axis=axis, virtual_batch_size=v)
    dx, dw, db = anybn.batch_norm_backward(a(dy), saved)
    ry = np.concatenate(_per_chunk(reference_batch_norm, x, v, axis, w, b))
    parts = [reference_backward(x[i : i + v], dy[i : i + v], axis, w) for i in range(0, shape[0], v)]
    rtol_y, rtol_dx = RTOL[dtype]
    assert_close(backend.to_numpy(y), ry, rtol_y)
    assert_close(backend.to_numpy(dx), np.concatenate([p[0] for p in parts]), rtol_dx)
    assert_close(backend.to_numpy(dw), sum(p[1] for p in parts), rtol_dx)
    assert_close(backend.to_numpy(db), sum(p[2] for p in parts), rtol_dx)
    if v == shape[0]:
        assert saved.groups is None  # one chunk: plain batch normalization
    else:
        assert len(saved.groups) == shape[0] // v


def test_backward_matches_finite_differences(backend):
    x, dy = make_data((8, 3, 2), seed=2), make_data((8, 3, 2), seed=3)
    w = np.array([0.5, 1.0, 2.0])

    def loss(x0):
        y, _ = anybn.batch_norm_train(backend.asarray(x0), backend.asarray(w), None, virtual_batch_size=2)
        return float(np.sum(backend.to_numpy(y) * dy))

    _, saved = anybn.batch_norm_train(backend.asarray(x), backend.asarray(w), None, virtual_batch_size=2)
    dx = backend.to_numpy(anybn.batch_norm_backward(backend.asarray(dy), saved)[0])
    h = 1e-6
    for flat in (0, 9, 23, 40):
        idx = np.unravel_index(flat, x.shape)
        xp_, xm = x.copy(), x.copy()
        xp_[idx] += h
        xm[idx] -= h
        fd = (loss(xp_) - loss(xm)) / (2 * h)
        assert abs(fd - dx[idx]) <= 1e-6 * max(1.0, abs(fd))


def test_layer_running_stats_from_chunks_and_eval(backend):
    x = make_data((12, 3, 4), mean=1.0, std=2.0, seed=4)
    x = x + np.arange(12).reshape(12, 1, 1)
    layer = anybn.BatchNorm(3, momentum=0.5, virtual_batch_size=4, xp=backend.module, device=backend.device,
                            dtype="float64")
    y = layer(backend.asarray(x))
    assert_close(backend.to_numpy(y), np.concatenate(_per_chunk(reference_batch_norm, x, 4, 1)), 1e-12)
    chunks = [x[i : i + 4] for i in (0, 4, 8)]
    mean = np.mean([c.mean(axis=(0, 2)) for c in chunks], axis=0)
    var = np.mean([c.transpose(1, 0, 2).reshape(3, -1).var(axis=1, ddof=1) for c in chunks], axis=0)
    assert_close(backend.to_numpy(layer.running_mean), 0.5 * mean, 1e-12)
    assert_close(backend.to_numpy(layer.running_var), 0.5 + 0.5 * var, 1e-12)
    assert layer.num_batches_tracked == 1
    layer.backward(backend.asarray(np.ones_like(x)))
    # eval: the running statistics, any batch size
    layer.eval()
    y = layer(backend.asarray(x[:5]))
    expected = reference_batch_norm(x[:5], 1, mean=0.5 * mean, var=0.5 + 0.5 * var)
    assert_close(backend.to_numpy(y), expected, 1e-12)


def test_population_collects_each_chunk():
    x = make_data((8, 3), seed=5)
    layer = anybn.BatchNorm(3, virtual_batch_size=4, dtype="float64")
    layer.population = anybn.PopulationStats(3)
    layer(x)
    assert layer.population.num_batches == 2


@pytest.mark.parametrize("v, match", [
    (3, r"virtual_batch_size=3 must be a positive divisor of the batch size x.shape\[0\] = 8"),
    (0, "virtual_batch_size=0 must be a positive divisor"),
    (1, "more than 1 value per feature in each virtual batch"),
])
def test_bad_virtual_batch_size(v, match):
    with pytest.raises(ValueError, match=match):
        anybn.batch_norm_train(np.ones((8, 3)), virtual_batch_size=v)


def test_bad_arguments():
    with pytest.raises(ValueError, match="axis=0"):
        anybn.batch_norm_train(np.ones((8, 3)), axis=0, virtual_batch_size=4)
    with pytest.raises(TypeError, match="virtual_batch_size must be a positive int or None, got float"):
        anybn.batch_norm_train(np.ones((8, 3)), virtual_batch_size=4.0)
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        anybn.BatchNorm(3, virtual_batch_size=0)
    layer = anybn.BatchNorm(3, virtual_batch_size=3)
    with pytest.raises(ValueError, match="positive divisor"):
        layer(np.ones((8, 3), dtype=np.float32))
    assert layer.num_batches_tracked == 0


def test_whole_batch_is_plain_batch_norm():
    x = make_data((64, 8, 32, 32), seed=6).astype(np.float32)
    y, _ = anybn.batch_norm_train(x, virtual_batch_size=64)
    y0, _ = anybn.batch_norm_train(x)
    np.testing.assert_array_equal(y, y0)


@pytest.mark.parametrize("shape, axis", [((8, 3, 6, 5), 1), ((8, 6, 5, 3), -1)])
def test_float32_far_from_zero(backend, shape, axis):
    """mean/std = 1e4 in float32: each chunk within 1e-4 of float64, as plain BN promises."""
    x = (1e4 + make_data(shape, seed=7)).astype(np.float32)
    x64 = x.astype(np.float64)
    y, saved = anybn.batch_norm_train(backend.asarray(x), axis=axis, virtual_batch_size=2)
    expected = np.concatenate(_per_chunk(reference_batch_norm, x64, 2, axis))
    np.testing.assert_allclose(backend.to_numpy(y), expected, atol=1e-4)
    dy = make_data(shape, seed=8).astype(np.float32)
    dx, _, _ = anybn.batch_norm_backward(backend.asarray(dy), saved)
    rdx = np.concatenate([reference_backward(x64[i : i + 2], dy[i : i + 2].astype(np.float64), axis)[0]
                          for i in range(0, shape[0], 2)])
    np.testing.assert_allclose(backend.to_numpy(dx), rdx, atol=1e-4 * np.abs(rdx).max())
