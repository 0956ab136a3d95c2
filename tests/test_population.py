"""PopulationStats: the paper's estimator and the exact pooled one, on every backend."""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest
from reference import make_data, reference_moments

import anybn


def _batches(sizes, c=3, axis=1, seed=0):
    out = []
    for i, n in enumerate(sizes):
        shape = (n, c, 4) if axis == 1 else (n, 4, c)
        out.append(make_data(shape, mean=2.0 + i, std=1.0 + 0.5 * i, seed=seed + i))
    return out


@pytest.mark.parametrize("axis", [1, -1])
def test_paper_estimator_with_equal_batches(backend, axis):
    batches = _batches([5, 5, 5, 5], axis=axis)
    stats = anybn.PopulationStats(3, axis=axis)
    for b in batches:
        stats.update(backend.asarray(b))
    mean, var = stats.result("paper")
    m = 5 * 4
    batch_means = np.stack([reference_moments(b, axis)[0] for b in batches])
    batch_vars = np.stack([reference_moments(b, axis)[1] for b in batches])
    # Algorithm 2: E[x] = E_B[mu_B], Var[x] = m/(m-1) E_B[sigma_B^2]
    np.testing.assert_allclose(backend.to_numpy(mean), batch_means.mean(0), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(var), m / (m - 1) * batch_vars.mean(0), rtol=1e-12)
    assert stats.num_batches == 4 and stats.count == 4 * m


def test_paper_estimator_weights_unequal_batches_by_degrees_of_freedom(backend):
    batches = _batches([2, 7, 3])
    stats = anybn.PopulationStats(3)
    for b in batches:
        stats.update(backend.asarray(b))
    mean, var = stats.result()
    counts = np.array([b.shape[0] * 4 for b in batches], dtype=float)
    means = np.stack([b.mean(axis=(0, 2)) for b in batches])
    variances = np.stack([b.var(axis=(0, 2)) for b in batches])
    np.testing.assert_allclose(backend.to_numpy(mean), (counts[:, None] * means).sum(0) / counts.sum(), rtol=1e-12)
    expected_var = (counts[:, None] * variances).sum(0) / (counts - 1).sum()
    np.testing.assert_allclose(backend.to_numpy(var), expected_var, rtol=1e-12)


def test_pooled_estimator_is_exact_and_order_free(backend):
    batches = _batches([3, 1, 6, 2])
    everything = np.concatenate(batches, axis=0)
    results = []
    for order in ([0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2]):
        stats = anybn.PopulationStats(3)
        for i in order:
            stats.update(backend.asarray(batches[i]))
        results.append([backend.to_numpy(a) for a in stats.result("pooled")])
    for mean, var in results:
        np.testing.assert_allclose(mean, everything.mean(axis=(0, 2)), rtol=1e-12)
        np.testing.assert_allclose(var, everything.var(axis=(0, 2), ddof=1), rtol=1e-12)


def test_pooled_keeps_precision_at_large_offsets():
    # float32 batches at mean 1e4: accumulation in float64 keeps the variance
    batches = [make_data((64, 2), mean=1e4, std=1.0, seed=s).astype(np.float32) for s in range(8)]
    stats = anybn.PopulationStats(2)
    for b in batches:
        stats.update(b)
    mean, var = stats.result("pooled")
    everything = np.concatenate(batches).astype(np.float64)
    assert mean.dtype == np.float32
    np.testing.assert_allclose(var, everything.var(axis=0, ddof=1), rtol=1e-5)
    np.testing.assert_allclose(mean, everything.mean(axis=0), rtol=1e-7)


def test_results_follow_the_batches(backend):
    stats = anybn.PopulationStats(3).update(backend.asarray(_batches([4])[0], "float32"))
    for a in stats.result():
        assert array_api_compat.array_namespace(a) is backend.xp
        assert a.dtype == backend.dtype("float32")
        assert a.shape == (3,)


def test_bad_input_is_rejected():
    stats = anybn.PopulationStats(3)
    with pytest.raises(ValueError, match="no batch has been added"):
        stats.result()
    with pytest.raises(ValueError, match=r"x has 4 features along axis 1 \(x.shape = \(2, 4\)\), expected num_features = 3"):
        stats.update(np.ones((2, 4)))
    with pytest.raises(TypeError, match="x must have a real floating dtype"):
        stats.update(np.ones((2, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="method must be 'paper' or 'pooled'"):
        stats.update(np.ones((2, 3))).result("median")
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        anybn.PopulationStats(0)
    single = anybn.PopulationStats(2).update(np.ones((1, 2)))
    with pytest.raises(ValueError, match="'paper' needs a batch with more than 1 value per feature"):
        single.result("paper")
    with pytest.raises(ValueError, match="'pooled' needs more than 1 value per feature"):
        single.result("pooled")
    assert single.update(np.zeros((1, 2))).result("pooled")[1][0] == pytest.approx(0.5)


def test_batches_from_two_libraries_are_rejected():
    torch = pytest.importorskip("torch")
    stats = anybn.PopulationStats(3).update(np.ones((2, 3)))
    with pytest.raises(TypeError, match="expected the library and device of the first batch"):
        stats.update(torch.ones(2, 3))
