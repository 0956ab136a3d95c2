"""Numerics on every backend: float32 at mean/std = 1e4, float16/bfloat16, constant features.

References are float64 NumPy computed on exactly the values the backend received (the
float32 or float16 input, cast up), so every difference is the algorithm's own error.
Tolerances are derived from the unit roundoff u of the dtypes involved (u32 = 2**-24,
u16 = 2**-11, ubf16 = 2**-8), the number m of values per feature and the data; each
derivation sits next to its tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
from reference import (
    bcast,
    features_last,
    make_data,
    reference_backward,
    reference_batch_norm,
    reference_moments,
)

import anybn

U32 = 2.0**-24
UNIT_ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": U32}

LAYOUTS = [((64, 8), 1), ((4, 8, 6, 6), 1), ((4, 6, 6, 8), -1)]
OFFSETS = [(1e4, 1.0), (1e5, 10.0)]  # (mean, std): mean/std = 1e4 either way




def _count(shape, axis):
    return int(np.prod(shape)) // shape[axis]


def _float32_input(backend, shape, mean, std, seed):
    """The same float32 values as a backend array and as float64 NumPy."""
    x32 = make_data(shape, mean=mean, std=std, seed=seed).astype(np.float32)
    return backend.asarray(x32, "float32"), x32.astype(np.float64)


def _params32(backend, c, seed):
    rng = np.random.default_rng(seed)
    w = (1.0 + 0.5 * rng.standard_normal(c)).astype(np.float32)
    b = rng.standard_normal(c).astype(np.float32)
    as_backend = (backend.asarray(w, "float32"), backend.asarray(b, "float32"))
    return *as_backend, w.astype(np.float64), b.astype(np.float64)


def _assert_within(got, expected, tol, what):
    err = np.abs(np.asarray(got, dtype=np.float64) - expected)
    assert not np.any(np.isnan(got)), f"{what}: NaN"
    worst = np.max(err / tol)
    assert np.all(err <= tol), f"{what}: max error {err.max():.3e}, worst err/tol {worst:.3f}"


# -- float32 at mean/std = 1e4 ------------------------------------------------------------


@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("mean, std", OFFSETS)
def test_train_at_large_offset_matches_float64(backend, shape, axis, mean, std):
    x, x64 = _float32_input(backend, shape, mean, std, seed=1)
    y, saved = anybn.batch_norm_train(x, axis=axis)
    # the documented promise (batch_norm_train's Notes): within 1e-4 of float64. A float32
    # mean is only good to half an ulp of 1e4, 2**-11 = 4.9e-4 std, so this holds only
    # because the forward pass keeps pivot and delta apart.
    _assert_within(backend.to_numpy(y), reference_batch_norm(x64, axis), 1e-4, "y")
    ref_mean, ref_var = reference_moments(x64, axis)
    # saved.mean: rounding pivot + delta to float32 costs half an ulp, one ulp covers the
    # small error of delta too
    ulp_mean = np.spacing(np.float32(ref_mean))
    _assert_within(backend.to_numpy(saved.mean), ref_mean, ulp_mean, "mean")
    # the sum of m squares of (x - pivot) has relative error <= m*u32 (the worst-case
    # recursive-summation bound), below 1e-5 for every m here (<= 144: 8.6e-6)
    assert _count(shape, axis) * U32 < 1e-5
    _assert_within(backend.to_numpy(saved.var), ref_var, 1e-5 * ref_var, "var")


@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("mean, std", OFFSETS)
@pytest.mark.parametrize("momentum", [1.0, 0.1])
def test_running_statistics_at_large_offset(backend, shape, axis, mean, std, momentum):
    x, x64 = _float32_input(backend, shape, mean, std, seed=2)
    c = shape[axis]
    layer = anybn.BatchNorm(
        c, axis=axis, momentum=momentum, xp=backend.module, device=backend.device
    )
    layer(x)
    m = _count(shape, axis)
    ref_mean, ref_var = reference_moments(x64, axis)
    # PyTorch's update from the initial (0, 1), in float64
    expected_var = (1 - momentum) * 1.0 + momentum * ref_var * m / (m - 1)
    expected_mean = momentum * ref_mean
    # var: <= m*u32 < 1e-5 relative from the sum of squares (see above), plus a handful of
    # u32 from the m/(m-1) factor and the momentum update
    running_var = backend.to_numpy(layer.running_var)
    _assert_within(running_var, expected_var, 1e-5 * expected_var, "running_var")
    # mean: one ulp from saved.mean (see above) and about four roundings in the update
    tol_mean = 6 * U32 * np.abs(expected_mean) + momentum * np.spacing(np.float32(ref_mean))
    _assert_within(backend.to_numpy(layer.running_mean), expected_mean, tol_mean, "running_mean")


def _backward_reference_and_tolerance(x64, g64, w64, axis, eps):
    """float64 (dx, dweight, dbias) and the tolerances the float32 algorithm meets.

    Backward recomputes x-hat = ((x - pivot) - delta) * invstd from the forward pass's split
    mean (saved.pivot, saved.delta), not from the rounded saved.mean, which would shift
    x-hat by up to ulp32(|mean|) * invstd = 1.2e-3 at mean/std = 1e4. What is left is the
    error of delta itself: the float32 sum of m centered values (<= m*u32 * |x - pivot|,
    about m*u32*std) plus delta's own rounding, with |delta| = |mean - pivot| <= m*u32*|mean|
    for the float32 pivot. So every x-hat of a feature is shifted by the same
    delta_f <= 2*m*u32 + u32 * m*u32 * |mean| * invstd. With k = w * invstd and
    x-hat' = x-hat + delta_f:

    - dweight = sum(g * x-hat') is off by delta_f * |sum(g)|;
    - dx = k * (g - mean(g) - x-hat' * mean(g * x-hat')) is off by
      |k| * delta_f * (|mean(g x-hat)| + |x-hat| |mean(g)| + delta_f |mean(g)|).

    On top, reductions of m terms in float32 (relative <= m*u32 each) and the few
    element-wise operations: R = 4*m*u32 of the magnitudes involved.
    """
    m = _count(x64.shape, axis)
    mean, var = reference_moments(x64, axis)
    invstd = 1.0 / np.sqrt(var + eps)
    delta = 2 * m * U32 + U32 * m * U32 * np.abs(mean) * invstd
    xhat = features_last(x64 - bcast(mean, x64.ndim, axis), axis) * invstd
    g = features_last(g64, axis)
    mg, mgx = g.mean(0), (g * xhat).mean(0)
    k = np.abs(w64 * invstd)
    r = 4 * m * U32
    tol_dx = k * (delta * (np.abs(mgx) + np.abs(xhat) * np.abs(mg) + delta * np.abs(mg))
                  + r * (np.abs(g) + np.abs(mg) + np.abs(xhat) * np.abs(mgx)))
    tol_dw = delta * np.abs(g.sum(0)) + r * np.abs(g * xhat).sum(0)
    tol_db = r * np.abs(g).sum(0)
    dx, dw, db = reference_backward(x64, g64, axis, w64, eps)
    return (dx, dw, db), (tol_dx, tol_dw, tol_db)


@pytest.mark.parametrize("shape, axis", LAYOUTS)
@pytest.mark.parametrize("mean, std", OFFSETS)
def test_backward_at_large_offset_matches_float64(backend, shape, axis, mean, std):
    x, x64 = _float32_input(backend, shape, mean, std, seed=3)
    g32 = make_data(shape, seed=4).astype(np.float32)
    w, b, w64, _ = _params32(backend, shape[axis], seed=5)
    _, saved = anybn.batch_norm_train(x, w, b, axis=axis)
    dx, dw, db = anybn.batch_norm_backward(backend.asarray(g32, "float32"), saved)

    (rdx, rdw, rdb), (tol_dx, tol_dw, tol_db) = _backward_reference_and_tolerance(
        x64, g32.astype(np.float64), w64, axis, 1e-5
    )
    dx_f, rdx_f = features_last(backend.to_numpy(dx), axis), features_last(rdx, axis)
    _assert_within(dx_f, rdx_f, tol_dx, "dx")
    _assert_within(backend.to_numpy(dw), rdw, tol_dw, "dweight")
    _assert_within(backend.to_numpy(db), rdb, tol_db, "dbias")


@pytest.mark.parametrize("shape, axis", LAYOUTS)
# mean/std = 50 <= 64 takes the folded path x * scale + shift on eager backends
@pytest.mark.parametrize(
    "mean, std, fold", [(1e4, 1.0, False), (1e5, 10.0, False), (50.0, 1.0, True)]
)
def test_eval_with_large_offset_statistics_matches_float64(backend, shape, axis, mean, std, fold):
    x, x64 = _float32_input(backend, shape, mean, std, seed=6)
    c = shape[axis]
    w, b, w64, b64 = _params32(backend, c, seed=7)
    ref_mean, ref_var = reference_moments(x64, axis)
    # running statistics a little off the batch's own, as after training
    stat_mean = (ref_mean + 0.25 * std).astype(np.float32)
    stat_var = (1.5 * ref_var).astype(np.float32)
    mean_b, var_b = backend.asarray(stat_mean, "float32"), backend.asarray(stat_var, "float32")
    y = anybn.batch_norm_eval(x, mean_b, var_b, w, b, axis=axis)
    mean64, var64 = stat_mean.astype(np.float64), stat_var.astype(np.float64)
    expected = reference_batch_norm(x64, axis, w64, b64, mean=mean64, var=var64)
    if fold:
        # mean/std <= 64: y = x * scale + shift rounds on the scale of |x| * scale and
        # |mean| * scale (<= 64 + a few), three roundings in all, plus the output
        scale = bcast(np.abs(w64) / np.sqrt(var64 + 1e-5), x64.ndim, axis)
        magnitude = (np.abs(x64) + bcast(np.abs(mean64), x64.ndim, axis)) * scale
        tol = 4 * U32 * (magnitude + np.abs(expected))
    else:
        # mean/std = 1e4: x - mean is exact (Sterbenz: within a factor 2 of each other);
        # scale = w / sqrt(var + eps) takes four roundings, the product and + bias two more
        tol = 8 * U32 * (np.abs(expected) + bcast(np.abs(b64), x64.ndim, axis))
    _assert_within(backend.to_numpy(y), expected, tol, "eval y")


@pytest.mark.parametrize("shape, axis", [((1_000_003, 3), 1), ((8, 181, 181, 4), -1), ((3, 2, 350_000), 1)])
def test_many_values_per_feature_at_large_offset(backend, shape, axis):
    """10**5 - 10**6 values per feature at mean/std = 1e4: a one-level float32 sum of the
    rows puts the pivot several standard deviations off (2.8e-3 error in y, seen before the
    two-level sums); the goal (1e-4 in y, 1e-5 relative in var) must hold at this size too."""
    x, x64 = _float32_input(backend, shape, 1e4, 1.0, seed=21)
    y, saved = anybn.batch_norm_train(x, axis=axis)
    mean, var = reference_moments(x64, axis)
    np.testing.assert_allclose(backend.to_numpy(saved.var), var, rtol=1e-5)
    err = np.abs(backend.to_numpy(y) - reference_batch_norm(x64, axis)).max()
    assert err <= 1e-4, err


@pytest.mark.parametrize("mean, std", OFFSETS)
def test_naive_variance_fails_at_large_offset_where_anybn_does_not(backend, mean, std):
    """E[x^2] - E[x]^2 in float32 is useless at mean/std = 1e4: the hazard is real.

    Both terms are float32 numbers in the same binade [2**26, 2**27) for mean 1e4 (ulp 8),
    or [2**33, 2**34) for mean 1e5 (ulp 1024), so their difference is a multiple of that
    ulp: it cannot come within 10% of a variance of 1 (or 100).
    """
    x, x64 = _float32_input(backend, (64, 8), mean, std, seed=8)
    xp = backend.xp
    naive = xp.mean(x * x, axis=0) - xp.mean(x, axis=0) ** 2
    _, ref_var = reference_moments(x64, 1)
    naive_err = np.abs(backend.to_numpy(naive) - ref_var) / ref_var
    assert np.all(naive_err > 0.1), naive_err

    _, saved = anybn.batch_norm_train(x, axis=1)
    assert np.all(np.abs(backend.to_numpy(saved.var) - ref_var) <= 1e-5 * ref_var)


# -- float16 and bfloat16 -----------------------------------------------------------------


def _half_dtype(backend, name):
    if name == "float16" and not backend.float16:
        pytest.skip(f"{backend.name} has no float16")
    if name == "bfloat16" and backend.bfloat16 is None:
        pytest.skip(f"{backend.name} has no bfloat16")
    return backend.dtype("float16") if name == "float16" else backend.bfloat16


@pytest.mark.parametrize("dtype_name", ["float16", "bfloat16"])
@pytest.mark.parametrize("shape, axis", [((16, 5), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1)])
def test_half_precision_computes_in_float32_and_returns_the_input_dtype(
    backend, dtype_name, shape, axis
):
    dtype = _half_dtype(backend, dtype_name)
    c = shape[axis]
    x = backend.asarray(make_data(shape, mean=2.0, std=3.0, seed=9), dtype)
    dy = backend.asarray(make_data(shape, seed=10), dtype)
    w, b, w64, b64 = _params32(backend, c, seed=11)
    y, saved = anybn.batch_norm_train(x, w, b, axis=axis)
    dx, dw, db = anybn.batch_norm_backward(dy, saved)

    assert y.dtype == dtype and dx.dtype == dtype
    float32_results = {
        "mean": saved.mean, "invstd": saved.invstd, "var": saved.var, "dweight": dw, "dbias": db
    }
    for name, a in float32_results.items():
        assert a.dtype == backend.dtype("float32"), (name, a.dtype)

    # references on exactly the rounded values the backend holds
    x64, g64 = backend.to_numpy(x), backend.to_numpy(dy)
    m = _count(shape, axis)
    u = UNIT_ROUNDOFF[dtype_name]
    ref_mean, ref_var = reference_moments(x64, axis)
    xhat = features_last(x64 - bcast(ref_mean, x64.ndim, axis), axis) / np.sqrt(ref_var + 1e-5)
    g = features_last(g64, axis)
    # float32 compute error: reductions of m terms, <= m*u32 relative each, on the scale
    # of the values (R = 4*m*u32: mean, variance, then the normalization)
    r = 4 * m * U32
    kappa = np.abs(features_last(x64, axis)).max(0) * np.sqrt(1 / (ref_var + 1e-5))

    # y and dx are computed in float32, then rounded once to the input dtype: error
    # <= u * |value| (round to nearest) + the float32 error
    ry = features_last(reference_batch_norm(x64, axis, w64, b64), axis)
    tol_y = u * np.abs(ry) + r * (np.abs(w64) * (1 + kappa + np.abs(xhat)) + np.abs(b64))
    _assert_within(features_last(backend.to_numpy(y), axis), ry, tol_y, f"{dtype_name} y")

    rdx, rdw, rdb = reference_backward(x64, g64, axis, w64)
    rdx = features_last(rdx, axis)
    k = np.abs(w64) / np.sqrt(ref_var + 1e-5)
    mg, mgx = np.abs(g.mean(0)), np.abs((g * xhat).mean(0))
    tol_dx = u * np.abs(rdx) + r * k * (np.abs(g) + mg + np.abs(xhat) * mgx) * (1 + kappa)
    _assert_within(features_last(backend.to_numpy(dx), axis), rdx, tol_dx, f"{dtype_name} dx")

    # inference with float32 statistics: the same single rounding of a float32 result
    ye = anybn.batch_norm_eval(x, saved.mean, saved.var, w, b, axis=axis)
    assert ye.dtype == dtype
    _assert_within(features_last(backend.to_numpy(ye), axis), ry, tol_y, f"{dtype_name} eval y")

    # float32 results: only the float32 error
    xmax, gsum = np.abs(features_last(x64, axis)).max(0), np.abs(g).sum(0)
    _assert_within(backend.to_numpy(saved.mean), ref_mean, r * xmax, "mean")
    _assert_within(backend.to_numpy(saved.var), ref_var, r * ref_var * (1 + kappa), "var")
    tol_dw = r * (1 + kappa) * np.abs(g * xhat).sum(0) + r * gsum
    _assert_within(backend.to_numpy(dw), rdw, tol_dw, "dweight")
    _assert_within(backend.to_numpy(db), rdb, r * gsum, "dbias")


# -- constant features --------------------------------------------------------------------

# 0, a value float32 cannot hold exactly, and a large integer: the sums of m copies round
# differently in each case
CONSTANTS = [0.0, 0.1, -1e4]


@pytest.mark.parametrize("dtype_name", ["float32", "float16"])
@pytest.mark.parametrize("shape, axis", [((8, 4, 3), 1), ((5, 3, 7, 4), -1)])
def test_constant_features_give_zero_variance_and_the_bias(backend, dtype_name, shape, axis):
    if dtype_name == "float16":
        _half_dtype(backend, dtype_name)
    np_dtype = np.dtype(dtype_name)
    c = shape[axis]
    assert c == len(CONSTANTS) + 1
    m = _count(shape, axis)
    cols = np.column_stack([np.full(m, v) for v in CONSTANTS] + [make_data(m, mean=1.0, seed=12)])
    x_last = cols.reshape(*[s for i, s in enumerate(shape) if i != axis % len(shape)], c)
    x64 = np.moveaxis(x_last, -1, axis).astype(np_dtype).astype(np.float64)
    x = backend.asarray(x64, dtype_name)
    g64 = make_data(shape, seed=13).astype(np_dtype).astype(np.float64)
    w, b, w64, b64 = _params32(backend, c, seed=14)
    eps = 1e-5

    y, saved = anybn.batch_norm_train(x, w, b, axis=axis, eps=eps)
    dx, dw, db = anybn.batch_norm_backward(backend.asarray(g64, dtype_name), saved)
    layer = anybn.BatchNorm(c, axis=axis, eps=eps, xp=backend.module, device=backend.device)
    layer(x)

    const = slice(0, len(CONSTANTS))
    values = np.asarray(CONSTANTS, dtype=np_dtype).astype(np.float64)
    arrays = {"y": y, "mean": saved.mean, "var": saved.var, "invstd": saved.invstd, "dx": dx,
              "dweight": dw, "dbias": db, "running_mean": layer.running_mean,
              "running_var": layer.running_var}
    results = {name: backend.to_numpy(a) for name, a in arrays.items()}
    for name, a in results.items():
        assert np.all(np.isfinite(a)), name

    # The pivot (sum / m) is within m*u32*|c| of c, so x - pivot = d is exact (Sterbenz) and
    # the same for all m values; delta = sum(d) / m is d up to m*u32*|d|. Hence
    # |x - pivot - delta| <= (m*u32)^2 |c| and saved.mean = fl(pivot + delta) = c exactly;
    # var = E[d^2] - delta^2 is a difference of two values d^2 * (1 + O(m*u32)): at most
    # 4*m*u32 * d^2 (it is 0 on NumPy, 1e-22 for 0.1 on JAX, whose sums differ)
    d = m * U32 * np.abs(values)
    resid = m * U32 * d
    assert np.all(results["var"][const] >= 0)
    assert np.all(results["var"][const] <= 4 * m * U32 * d**2), results["var"][const]
    np.testing.assert_array_equal(results["mean"][const], values)
    np.testing.assert_allclose(results["invstd"][const], 1 / np.sqrt(eps), rtol=4 * U32)
    # y = w * invstd * residual + bias, rounded once to the input dtype
    u_out = UNIT_ROUNDOFF[dtype_name]
    y_const = features_last(results["y"], axis)[:, const]
    tol_y = np.abs(w64[const]) / np.sqrt(eps) * 2 * resid + u_out * np.abs(b64[const])
    assert np.all(np.abs(y_const - b64[const]) <= tol_y), np.abs(y_const - b64[const]).max(0)
    # running var: (1 - 0.1) * 1 + 0.1 * 0, a few roundings
    np.testing.assert_allclose(results["running_var"][const], 0.9, rtol=4 * U32)

    # backward: x-hat = 0 on constant features, so dx = k * (g - mean(g)) and dweight = 0
    rdx, rdw, rdb = reference_backward(x64, g64, axis, w64, eps)
    g = features_last(g64, axis)[:, const]
    k = np.abs(w64[const]) / np.sqrt(eps)
    r = 4 * m * U32
    rdx_const = features_last(rdx, axis)[:, const]
    tol_dx = u_out * np.abs(rdx_const) + r * k * (np.abs(g) + np.abs(g.mean(0)))
    _assert_within(features_last(results["dx"], axis)[:, const], rdx_const, tol_dx, "dx")
    # dweight = invstd * (sum(g * d) - delta * sum(g)) with d = x - pivot the same for all m
    # values and delta = d up to m*u32*|d|: the two terms cancel to within
    # invstd * 2*m*u32 * |d| * sum|g| (exactly 0 where the pivot is exact, as on NumPy)
    tol_dw = k / np.abs(w64[const]) * 2 * m * U32 * d * np.abs(g).sum(0)
    assert np.all(np.abs(results["dweight"][const]) <= tol_dw), results["dweight"][const]
    _assert_within(results["dbias"], rdb, r * np.abs(features_last(g64, axis)).sum(0), "dbias")


def test_eval_with_zero_variance_statistics_gives_the_bias(backend):
    x = backend.asarray(np.full((6, 3), 2.5), "float32")
    mean = backend.asarray(np.full(3, 2.5), "float32")
    var = backend.asarray(np.zeros(3), "float32")
    w, b, _, b64 = _params32(backend, 3, seed=15)
    y = backend.to_numpy(anybn.batch_norm_eval(x, mean, var, w, b))
    # |mean| * invstd = 2.5 / sqrt(1e-5) = 790 > 64 sends every backend down the centered
    # path: x - mean = 0 exactly, so y = 0 * scale + bias = bias exactly
    assert np.all(np.isfinite(y))
    np.testing.assert_array_equal(y, np.broadcast_to(b64, (6, 3)))
