"""What a new user hit: pickling, JAX closures under jit, torch autograd, edge values, messages.

References: float64 NumPy (tests/reference.py) and PyTorch autograd, never anybn itself.
"""

from __future__ import annotations

import copy
import pickle

import numpy as np
import pytest

import anybn
from reference import make_data, reference_backward, reference_batch_norm, reference_moments


# -- pickling -----------------------------------------------------------------------------


def _picklable(backend) -> bool:
    try:
        pickle.dumps(backend.asarray(np.ones(2)))
        return True
    except Exception:
        return False


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_layer_survives_pickle_and_deepcopy_with_its_state(backend, how):
    if not _picklable(backend):
        pytest.skip(f"{backend.name} arrays do not pickle")
    layer = anybn.BatchNorm(3, xp=backend.module, device=backend.device, dtype=backend.dtype("float64"))
    x64 = make_data((6, 3), mean=2.0, std=3.0, seed=0)
    layer(backend.asarray(x64))
    clone = pickle.loads(pickle.dumps(layer)) if how == "pickle" else copy.deepcopy(layer)
    assert clone.num_batches_tracked == 1 and clone is not layer
    for key, value in layer.state_dict().items():
        np.testing.assert_array_equal(backend.to_numpy(clone.state_dict()[key]), backend.to_numpy(value))
    # the clone keeps working in the same library and on the same device
    y = clone.eval()(backend.asarray(x64))
    assert type(y) is type(backend.asarray(x64))
    expected = reference_batch_norm(x64, 1, mean=backend.to_numpy(layer.running_mean),
                                    var=backend.to_numpy(layer.running_var))
    np.testing.assert_allclose(backend.to_numpy(y), expected, rtol=1e-12, atol=1e-12)


def test_population_stats_survive_pickle(backend):
    if not _picklable(backend):
        pytest.skip(f"{backend.name} arrays do not pickle")
    stats = anybn.PopulationStats(3)
    a, b = make_data((5, 3), seed=1), make_data((7, 3), mean=1.0, seed=2)
    stats.update(backend.asarray(a))
    clone = pickle.loads(pickle.dumps(stats))
    clone.update(backend.asarray(b))
    mean, var = clone.result("pooled")
    both = np.concatenate([a, b])
    np.testing.assert_allclose(backend.to_numpy(mean), both.mean(0), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(var), both.var(0, ddof=1), rtol=1e-12)


# -- JAX: arrays captured by a jitted function ----------------------------------------------


def test_jax_jit_with_captured_parameters_statistics_and_layer():
    jax = pytest.importorskip("jax")
    jax.config.update("jax_enable_x64", True)
    import jax.numpy as jnp

    x64 = make_data((8, 3), mean=1.0, std=2.0, seed=3)
    w64, m64, v64 = make_data((3,), mean=1.0, seed=4), make_data((3,), seed=5), 1.0 + make_data((3,), seed=6) ** 2
    x, w, m, v = (jnp.asarray(a) for a in (x64, w64, m64, v64))
    y = jax.jit(lambda a: anybn.batch_norm_train(a, w)[0])(x)
    np.testing.assert_allclose(np.asarray(y), reference_batch_norm(x64, 1, w64), rtol=1e-12, atol=1e-12)
    y = jax.jit(lambda a: anybn.batch_norm_eval(a, m, v, w))(x)
    np.testing.assert_allclose(np.asarray(y), reference_batch_norm(x64, 1, w64, mean=m64, var=v64), rtol=1e-12,
                               atol=1e-12)
    layer = anybn.BatchNorm(3, xp=jnp, dtype="float64").eval()
    y = jax.jit(lambda a: layer(a))(x)
    np.testing.assert_allclose(np.asarray(y), reference_batch_norm(x64, 1, mean=np.zeros(3), var=np.ones(3)),
                               rtol=1e-12, atol=1e-12)


# -- torch autograd -----------------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", [((6, 3), 1), ((2, 3, 4, 5), 1), ((2, 4, 5, 3), -1)])
def test_torch_autograd_through_anybn_equals_the_analytic_backward(shape, axis):
    torch = pytest.importorskip("torch")
    c = shape[axis]
    x64, g64 = make_data(shape, mean=2.0, std=3.0, seed=7), make_data(shape, seed=8)
    w64 = make_data((c,), mean=1.0, std=0.2, seed=9)
    x = torch.tensor(x64, requires_grad=True)
    w = torch.tensor(w64, requires_grad=True)
    b = torch.zeros(c, dtype=torch.float64, requires_grad=True)
    y, saved = anybn.batch_norm_train(x, w, b, axis=axis)
    (y * torch.tensor(g64)).sum().backward()
    dx, dw, db = anybn.batch_norm_backward(torch.tensor(g64), saved)
    ref_dx, ref_dw, ref_db = reference_backward(x64, g64, axis, w64)
    m = x64.size // c
    for got, analytic, ref, n in ((x.grad, dx, ref_dx, 1), (w.grad, dw, ref_dw, m), (b.grad, db, ref_db, m)):
        np.testing.assert_allclose(got.numpy(), ref, rtol=1e-10, atol=1e-12 * n)
        np.testing.assert_allclose(analytic.detach().numpy(), ref, rtol=1e-10, atol=1e-12 * n)
    # fixed statistics: the statistics are constants, only x, w, b get gradients
    x.grad = None
    y = anybn.batch_norm_eval(x, torch.zeros(c, dtype=torch.float64), torch.ones(c, dtype=torch.float64), w,
                              axis=axis)
    (y * torch.tensor(g64)).sum().backward()
    np.testing.assert_allclose(x.grad.numpy(), g64 * np.reshape(w64, [-1 if i == axis % len(shape) else 1
                                                                      for i in range(len(shape))]) / np.sqrt(1 + 1e-5),
                               rtol=1e-12)


# -- edge values --------------------------------------------------------------------------


def test_eps_must_be_finite():
    with pytest.raises(ValueError, match="batch_norm_train: eps must be finite, got inf"):
        anybn.batch_norm_train(np.ones((4, 3)), eps=float("inf"))
    with pytest.raises(ValueError, match="BatchNorm: eps must be finite, got inf"):
        anybn.BatchNorm(3, eps=float("inf"))


def test_numpy_scalars_are_accepted_like_python_ones():
    layer = anybn.BatchNorm(np.int64(3), axis=np.int32(-1), eps=np.float32(1e-3), momentum=np.float32(0.5))
    assert (layer.num_features, layer.axis) == (3, -1) and isinstance(layer.num_features, int)
    x64 = make_data((5, 3), seed=10)
    y, _ = anybn.batch_norm_train(x64, axis=np.int64(1), eps=np.float32(1e-3))
    np.testing.assert_allclose(y, reference_batch_norm(x64, 1, eps=float(np.float32(1e-3))), rtol=1e-12)
    assert anybn.PopulationStats(np.int64(3), axis=np.int64(1)).num_features == 3
    with pytest.raises(TypeError, match="num_features must be a positive int, got bool"):
        anybn.BatchNorm(True)


@pytest.mark.parametrize("rows", [64, 4096])  # one compiled call; the staged passes on threads
@pytest.mark.parametrize("path", ["fast", "generic"])
def test_float32_near_its_largest_values(monkeypatch, path, rows):
    """|x| ~ 3e38: deviations ~1e35 square past float32's max. The statistics must not
    overflow (the variance itself is beyond float32: saved.var is inf), y is exact to a
    few float32 roundings, and so is dx (of order 1 / std ~ 1e-35, still a normal float32)."""
    if path == "generic":
        monkeypatch.setenv("ANYBN_FAST_PATHS", "0")
    x = np.full((rows, 64), 3e38, np.float32)
    x[::2] *= np.float32(0.999)
    x[1::4] *= np.float32(0.9995)
    y, saved = anybn.batch_norm_train(x)
    x64 = x.astype(np.float64)
    expected = reference_batch_norm(x64, 1)
    assert np.all(np.isfinite(y))
    eps32 = np.finfo(np.float32).eps
    np.testing.assert_allclose(y, expected, atol=8 * eps32 * np.abs(expected).max())
    dy = np.random.default_rng(0).standard_normal(x.shape).astype(np.float32)
    dx = anybn.batch_norm_backward(dy, saved)[0]
    ref_dx = reference_backward(x64, dy.astype(np.float64), 1)[0]
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx, ref_dx, atol=64 * eps32 * np.abs(ref_dx).max())


def test_messages_for_wrong_kinds_of_arguments():
    with pytest.raises(TypeError, match="batch_norm_train: x must be an array of an array-API library, got None"):
        anybn.batch_norm_train(None)
    with pytest.raises(TypeError, match="load_state_dict: state must be a mapping of names to arrays.*got list"):
        anybn.BatchNorm(3).load_state_dict([1, 2])
    with pytest.raises(TypeError, match="estimate_population: batches must be an iterable of arrays"):
        anybn.BatchNorm(3).estimate_population(None)
    with pytest.raises(TypeError, match="PopulationStats.update: x must be an array of an array-API library, got None"):
        anybn.PopulationStats(3).update(None)


def test_population_stats_name_both_libraries_when_they_are_mixed():
    torch = pytest.importorskip("torch")
    stats = anybn.PopulationStats(3).update(np.ones((4, 3), np.float32))
    with pytest.raises(TypeError, match=r"x is a torch array .*expected the library and device of the first batch \(numpy"):
        stats.update(torch.ones(4, 3))


# -- sizes and accumulation that earlier tests let through ----------------------------------


@pytest.mark.parametrize("shape, axis", [((10001, 3), 1), ((3, 2, 10001), 1), ((7, 1500, 2), -1)])
def test_float64_with_more_than_8192_values_per_feature(backend, shape, axis):
    """Two-level sums beyond 8192 terms: every row counts (an off-by-one that dropped a row
    gave a 3.8e-4 variance error at (10001, 3)). float64 sums of 1e4 terms: ~1e-12 relative."""
    x64 = make_data(shape, mean=3.0, std=2.0, seed=11)
    y, saved = anybn.batch_norm_train(backend.asarray(x64), axis=axis)
    mean, var = reference_moments(x64, axis)
    np.testing.assert_allclose(backend.to_numpy(saved.var), var, rtol=1e-11)
    np.testing.assert_allclose(backend.to_numpy(saved.mean), mean, rtol=1e-11)
    np.testing.assert_allclose(backend.to_numpy(y), reference_batch_norm(x64, axis), rtol=1e-10, atol=1e-10)


def test_population_stats_accumulate_in_float64_over_many_float32_batches():
    """2,000 float32 batches at mean 1e4: each batch's mean is the float32 pivot plus a
    float32 delta of a few std (error <= 2**-24 * 4 std ~ 2.4e-7), merged exactly in float64,
    so the population mean is within ~2.4e-7 of the float64 mean of the same float32 values.
    Accumulating in float32 instead rounds the running mean to ulp(1e4) = 9.8e-4 per merge."""
    rng = np.random.default_rng(12)
    stats = anybn.PopulationStats(2)
    batches = [(1e4 + rng.standard_normal((16, 2))).astype(np.float32) for _ in range(2000)]
    for x in batches:
        stats.update(x)
    everything = np.concatenate(batches).astype(np.float64)
    mean, var = stats.result("pooled")
    assert mean.dtype == np.float32  # results come back in the batches' dtype
    # the result is rounded to float32 at the end: ulp(1e4) / 2 = 4.9e-4 more on the mean
    tol_mean = 2.4e-7 + np.spacing(np.float32(1e4)) / 2
    assert np.max(np.abs(mean - everything.mean(0))) <= tol_mean
    np.testing.assert_allclose(var, everything.var(0, ddof=1), rtol=1e-5)
