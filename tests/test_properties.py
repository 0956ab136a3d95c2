"""Properties of the algorithm, checked by Hypothesis on NumPy float64.

Every tolerance below is a rounding-error bound, derived in the comment next to it from
u = 2**-53 (float64's unit roundoff), the number m of values per feature and the
conditioning of the data, plus the exact effect of ``eps`` where the property only holds
for eps = 0. None is tuned to the measured error.
"""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from reference import bcast, features_last, reference_moments

import anybn

U = np.finfo(np.float64).eps / 2  # unit roundoff of float64
EPS_CHOICES = [1e-12, 1e-5, 1e-2]
FAST = settings(max_examples=200, deadline=None)
SLOW = settings(max_examples=60, deadline=None)  # finite differences: 2 forward passes per value


# -- strategies ---------------------------------------------------------------------------


@st.composite
def layouts(draw):
    """(shape, axis): rank 2-4, N >= 2 (so every feature has m >= 2 values), small sides."""
    ndim = draw(st.integers(2, 4))
    shape = (draw(st.integers(2, 5)),) + tuple(draw(st.integers(1, 4)) for _ in range(ndim - 1))
    return shape, draw(st.sampled_from([1, -1]))


def grid_arrays(shape, bound=32, denominator=8):
    """float64 arrays of multiples of 1/denominator in [-bound, bound].

    On this grid x +- 2**-k is exact for the steps used below, so a finite-difference
    step is exactly the one we divide by; and a non-constant feature has a variance of at
    least (1/denominator)**2 / m**2, bounded away from 0.
    """
    n = bound * denominator
    return hnp.arrays(np.int64, shape, elements=st.integers(-n, n)).map(lambda a: a / denominator)


def moderate_arrays(shape, bound=100.0):
    """float64 arrays with |values| <= bound, each 0 or of magnitude >= 2**-500.

    The rounding bounds below are relative (u * |value|), which holds for normal numbers
    only: squares and products of the values kept here stay far above float64's
    subnormal range (2**-1022).
    """
    elements = st.floats(-bound, bound, allow_nan=False, allow_subnormal=False)
    elements = elements.map(lambda v: 0.0 if abs(v) < 2.0**-500 else v)
    return hnp.arrays(np.float64, shape, elements=elements)


# -- per-feature helpers ------------------------------------------------------------------




def _non_constant(x, axis):
    return bool(np.all(np.ptp(features_last(x, axis), axis=0) > 0))


def _forward_error_bound(x, axis, eps):
    """Per-feature bound on |y - y_exact| of batch_norm_train in float64 (weight 1, bias 0).

    The mean is a sum of m values: error <= m*u*max|x| (the recursive-summation bound
    gamma_m; pairwise/BLAS sums do better). Through the centering it reaches y multiplied
    by invstd, i.e. m*u*kappa with kappa = max|x| / sqrt(var + eps), the condition number
    of centering. The variance is a sum of m squares (relative error <= m*u), which moves
    invstd and so y by <= m*u*|y|, |y| <= sqrt(m). The final scale and shift add a few u.
    A factor 4 covers the two passes and the last operations.
    """
    xc = features_last(x, axis)
    m = xc.shape[0]
    _, var = reference_moments(x, axis)
    kappa = np.abs(xc).max(axis=0) / np.sqrt(var + eps)
    return 4 * m * U * (1 + kappa + np.sqrt(m))


# -- training forward ---------------------------------------------------------------------


@FAST
@given(data=st.data())
def test_train_is_invariant_to_per_feature_shift_and_positive_scale(data):
    shape, axis = data.draw(layouts())
    c = shape[axis]
    x = data.draw(moderate_arrays(shape))
    _, var = reference_moments(x, axis)
    # variance bounded away from 0 relative to the values: kappa <= 1e3 keeps the
    # comparison about the algorithm, not about inputs that are constant to 13 digits
    assume(np.all(np.sqrt(var) >= 1e-3 * np.maximum(1.0, np.abs(features_last(x, axis)).max(0))))
    a = data.draw(hnp.arrays(np.float64, c, elements=st.floats(1e-2, 1e2)))
    shift = data.draw(hnp.arrays(np.float64, c, elements=st.floats(-1e3, 1e3)))
    eps = data.draw(st.sampled_from(EPS_CHOICES))

    x2 = x * bcast(a, x.ndim, axis) + bcast(shift, x.ndim, axis)
    y1, _ = anybn.batch_norm_train(x, axis=axis, eps=eps)
    y2, _ = anybn.batch_norm_train(x2, axis=axis, eps=eps)

    # With eps = 0 the map is exactly invariant. With eps, y = xhat0 * sigma/sqrt(sigma^2 + eps)
    # and y2 = xhat0 * sigma/sqrt(sigma^2 + eps/a^2): y2 = y * ratio, computed here exactly.
    ratio = np.sqrt(var + eps) / np.sqrt(var + eps / a**2)
    expected = y1 * bcast(ratio, x.ndim, axis)
    # Rounding: y1 and y2 each carry their forward error bound (y2's includes the rounding
    # of a*x + c, two operations of <= u*|x2| each, well inside m*u*kappa(x2)), and the
    # product with ratio adds 2*u*|y|.
    bound = _forward_error_bound(x, axis, eps) + _forward_error_bound(x2, axis, eps)
    err = np.abs(y2 - expected) - 2 * U * np.abs(expected)
    assert np.all(features_last(err, axis) <= bound), (np.abs(y2 - expected).max(), bound)


@FAST
@given(data=st.data())
def test_train_output_has_zero_mean_and_shrunk_unit_variance(data):
    shape, axis = data.draw(layouts())
    x = data.draw(moderate_arrays(shape))
    _, var = reference_moments(x, axis)
    assume(np.all(np.sqrt(var) >= 1e-3 * np.maximum(1.0, np.abs(features_last(x, axis)).max(0))))
    eps = data.draw(st.sampled_from(EPS_CHOICES))

    y, _ = anybn.batch_norm_train(x, axis=axis, eps=eps)
    yc = features_last(y, axis)
    m = yc.shape[0]
    e = _forward_error_bound(x, axis, eps)  # per-value error of y
    ymax = np.abs(yc).max(axis=0)
    # mean of y: the exact mean is 0; per-value errors <= e average to <= e, and numpy's
    # own sum of m values adds <= m*u*max|y|
    assert np.all(np.abs(yc.mean(axis=0)) <= e + m * U * ymax)
    # biased variance of y: the exact value is var / (var + eps). Errors e per value move
    # it by <= 2*sqrt(var_y)*e + e^2 <= 2e + e^2 (var_y <= 1); numpy's two-pass variance and
    # the reference ratio (var with relative error <= m*u) add <= 4*m*u*max(1, max|y|^2)
    target = var / (var + eps)
    bound = 2 * e + e**2 + 4 * m * U * np.maximum(1.0, ymax**2)
    assert np.all(np.abs(yc.var(axis=0) - target) <= bound)


# -- backward against central finite differences -----------------------------------------


def _loss(y, g):
    return float(np.sum(y * g))


def _third_derivative(x, g, w, axis, eps):
    """d^3 L / dx_i^3 at x for L = sum(g * y), y the training-mode batch norm, in float64.

    With d = x - mean, v = mean(d^2), s = sqrt(v + eps), xhat = d / s and t = x_i:
    dd_j/dt = delta_ij - 1/m, dv/dt = 2 d_i / m, d^2v/dt^2 = q = 2 (1 - 1/m) / m and
    d^3v/dt^3 = 0. Differentiating y_j = d_j * (v + eps)^(-1/2) three times gives
    L''' = s^-3 [S1 (-15 xhat_i^3 / m^3 + 4.5 q xhat_i / m) + 3 S2_i (3 xhat_i^2 / m^2 - q / 2)]
    with S1 = sum_j gw_j xhat_j (per feature) and S2_i = gw_i - mean(gw).
    """
    m = x.size // x.shape[axis]
    mean, var = reference_moments(x, axis)
    s = bcast(np.sqrt(var + eps), x.ndim, axis)
    xhat = (x - bcast(mean, x.ndim, axis)) / s
    gw = g * bcast(w, x.ndim, axis)
    reduce = tuple(i for i in range(x.ndim) if i != axis % x.ndim)
    s1 = np.sum(gw * xhat, axis=reduce, keepdims=True)
    s2 = gw - np.mean(gw, axis=reduce, keepdims=True)
    q = 2 * (1 - 1 / m) / m
    cubic = s1 * (-15 * xhat**3 / m**3 + 4.5 * q * xhat / m)
    return (cubic + 3 * s2 * (3 * xhat**2 / m**2 - q / 2)) / s**3


def _loss_rounding(x, g, w, b, axis, eps):
    """Bound on |L_computed - L| for L = sum(g * (w * y + b)) at weights within H of w.

    Each y carries the forward bound e, scaled by |w|, and the affine map rounds twice on
    the scale |w * y| + |b|; the final sum of n products adds <= n*u*sum|g|*(|w * y| + |b|).
    |y| <= sqrt(m - 1) for the biased variance.
    """
    e = bcast(_forward_error_bound(x, axis, eps), x.ndim, axis)
    wb = bcast(np.abs(w) + H, x.ndim, axis)
    bb = bcast(np.abs(b) + H, x.ndim, axis)
    out_scale = wb * np.sqrt(x.size // x.shape[axis]) + bb
    return float(np.sum(np.abs(g) * (wb * e + (2 + x.size) * U * out_scale)))


@st.composite
def backward_problems(draw):
    shape, axis = draw(layouts())
    x = draw(grid_arrays(shape))
    assume(_non_constant(x, axis))
    c = shape[axis]
    g = draw(grid_arrays(shape, bound=1))
    w = draw(grid_arrays((c,), bound=2))
    b = draw(grid_arrays((c,), bound=2))
    eps = draw(st.sampled_from([1e-5, 1e-3]))
    return x, g, w, b, axis, eps


H = 2.0**-20  # finite-difference step: exact on the 1/8 grid of the data and parameters


@SLOW
@given(problem=backward_problems())
def test_train_backward_matches_central_finite_differences(problem):
    x, g, w, b, axis, eps = problem

    def loss(x_, w_, b_):
        y, _ = anybn.batch_norm_train(x_, w_, b_, axis=axis, eps=eps)
        return _loss(y, g)

    _, saved = anybn.batch_norm_train(x, w, b, axis=axis, eps=eps)
    dx, dw, db = anybn.batch_norm_backward(g, saved)

    # Rounding part of a central difference: two losses, each off by <= r, divided by 2h.
    r = _loss_rounding(x, g, w, b, axis, eps)
    # The analytic gradients are sums of m terms: dbias = sum(g) is off by <= m*u*sum|g|;
    # dweight = sum(g * xhat) by <= sum|g| * (e + m*u*|xhat|) with e the forward bound on
    # xhat; dx combines g, mean(g) and xhat * mean(g * xhat), each term <= |w| * invstd
    # * max|g| * (1 + sqrt(m))^2, with the relative error of xhat, <= e.
    m = x.size // x.shape[axis]
    _, var = reference_moments(x, axis)
    e = _forward_error_bound(x, axis, eps)
    gc = np.abs(features_last(g, axis))
    err_db = m * U * gc.sum(0)
    err_dw = gc.sum(0) * (e + m * U * np.sqrt(m))
    err_dx = 4 * e * np.abs(w) / np.sqrt(var + eps) * gc.max(0) * (1 + np.sqrt(m)) ** 2

    # dx: the truncation error of a central difference is h^2/12 * (L'''(xi+) + L'''(xi-))
    # for some xi+- in [x, x +- h]. h = 2**-20 is below 1e-3 * s for every s here (s >=
    # 1/(8 sqrt(m)) on the grid), so L''' is nearly constant over the step: twice the largest
    # of |L'''| at x - h, x and x + h bounds it.
    fd, trunc = np.empty_like(x), np.empty_like(x)
    l3 = np.abs(_third_derivative(x, g, w, axis, eps))
    for i in np.ndindex(x.shape):
        xp_, xm_ = x.copy(), x.copy()
        xp_[i] += H
        xm_[i] -= H
        fd[i] = (loss(xp_, w, b) - loss(xm_, w, b)) / (2 * H)
        l3_ends = [abs(_third_derivative(x_, g, w, axis, eps)[i]) for x_ in (xp_, xm_)]
        trunc[i] = 2 * H**2 / 6 * max(l3[i], *l3_ends)
    tol = trunc + r / H + bcast(err_dx, x.ndim, axis)
    assert np.all(np.abs(dx - fd) <= tol), np.abs(dx - fd).max()

    # dweight, dbias: L is linear in them, so the central difference has no truncation error
    for k in range(w.size):
        e = np.zeros_like(w)
        e[k] = H
        fd_w = (loss(x, w + e, b) - loss(x, w - e, b)) / (2 * H)
        fd_b = (loss(x, w, b + e) - loss(x, w, b - e)) / (2 * H)
        assert abs(dw[k] - fd_w) <= r / H + err_dw[k], (k, dw[k], fd_w)
        assert abs(db[k] - fd_b) <= r / H + err_db[k], (k, db[k], fd_b)


@st.composite
def eval_problems(draw):
    x, g, w, b, axis, eps = draw(backward_problems())
    c = x.shape[axis]
    running_mean = draw(grid_arrays((c,), bound=8))
    running_var = draw(grid_arrays((c,), bound=4).map(lambda v: np.abs(v) + 0.125))
    return x, g, w, b, running_mean, running_var, axis, eps


@SLOW
@given(problem=eval_problems())
def test_eval_backward_matches_central_finite_differences(problem):
    x, g, w, b, running_mean, running_var, axis, eps = problem
    c = x.shape[axis]
    layer = anybn.BatchNorm(c, axis=axis, eps=eps, xp=np, dtype="float64")
    state = {"weight": w, "bias": b, "running_mean": running_mean, "running_var": running_var}
    layer.load_state_dict({**state, "num_batches_tracked": 1})
    layer.eval()

    def loss(x_):
        return _loss(layer(x_), g)

    layer(x)
    dx = layer.backward(g)
    dw, db = layer.grad_weight, layer.grad_bias

    # In eval mode y = (x - mean) * w / sqrt(var + eps) + b is affine in x, in w and in b:
    # central differences have no truncation error, only rounding. Each y is computed with
    # a few operations on values <= xhat_max * (|w| + h) + |b| + h =: ymax, xhat_max =
    # (|x| + |mean|) * invstd (the folded form x * scale + shift rounds on that scale; the
    # weights are perturbed by h), so each loss is off by <= 8*u*sum|g|*ymax + n*u*sum|g|*ymax
    # (the final sum of n products), and a central difference by that over h.
    invstd = 1 / np.sqrt(running_var + eps)
    xhat_max = (np.abs(features_last(x, axis)).max(0) + np.abs(running_mean)) * invstd
    ymax = xhat_max * (np.abs(w) + H) + np.abs(b) + H
    n = x.size
    r = (8 + n) * U * np.sum(np.abs(g) * bcast(ymax, x.ndim, axis))
    # dweight = sum(g * xhat) and dbias = sum(g) are themselves sums of m terms
    gsum = np.abs(features_last(g, axis)).sum(0)
    err_grad = {"weight": 2 * x.size * U * gsum * (1 + xhat_max), "bias": x.size * U * gsum}
    fd = np.empty_like(x)
    for i in np.ndindex(x.shape):
        xp_, xm_ = x.copy(), x.copy()
        xp_[i] += H
        xm_[i] -= H
        fd[i] = (loss(xp_) - loss(xm_)) / (2 * H)
    assert np.all(np.abs(dx - fd) <= r / H), np.abs(dx - fd).max()
    # the analytic dx = dy * w * invstd: two roundings
    np.testing.assert_allclose(dx, g * bcast(w * invstd, x.ndim, axis), rtol=4 * U, atol=0)

    # dweight, dbias through the layer's parameters
    for k in range(c):
        for name in ("weight", "bias"):
            base = getattr(layer, name)
            e = np.zeros(c)
            e[k] = H
            setattr(layer, name, base + e)
            lp = loss(x)
            setattr(layer, name, base - e)
            lm = loss(x)
            setattr(layer, name, base)
            got, fd_k = (dw if name == "weight" else db)[k], (lp - lm) / (2 * H)
            assert abs(got - fd_k) <= r / H + err_grad[name][k], (name, k, got, fd_k)


# -- population statistics ----------------------------------------------------------------


@st.composite
def batch_splits(draw, equal=False):
    """(batches, axis): one data set split along N into k >= 2 batches."""
    axis = draw(st.sampled_from([1, -1]))
    c = draw(st.integers(1, 3))
    spatial = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    if equal:
        k = draw(st.integers(2, 5))
        n_b = draw(st.integers(1 if spatial and np.prod(spatial) > 1 else 2, 4))
        sizes = [n_b] * k
    else:
        sizes = draw(st.lists(st.integers(1, 6), min_size=2, max_size=6))
    shape = (sum(sizes), c, *spatial) if axis == 1 else (sum(sizes), *spatial, c)
    offset = draw(st.sampled_from([0.0, 1e3]))  # the merges must not cancel a common offset
    x = draw(moderate_arrays(shape)) + offset
    cuts = np.cumsum(sizes)[:-1]
    return np.split(x, cuts, axis=0), axis


def _population_bound(x, axis, k):
    """Bounds on the errors of the pooled mean and unbiased variance, in float64.

    Each batch's mean is a sum of its values (<= m_i*u*max|x|) and k - 1 Chan merges add
    a few u*max|x| each: mean error <= 4*(n + k)*u*max|x|. M2 is a sum of n squared
    deviations whose centers are off by that much: relative input errors of u*|x| move it
    by <= 2*|x - mean|*u*|x| per value, so var error <= 8*(n + k)*u*max|x|*spread
    * n / (n - 1) (the last factor from dividing by n - 1 instead of n). spread bounds the
    deviations from any computed mean, exact or not: max|x - mean| + n*u*max|x|. (With it,
    the bound also covers the reference's own rounding, e.g. np.var of a constant feature
    is (n*u*|x|)^2 rather than 0.)
    """
    xc = features_last(x, axis)
    n = xc.shape[0]
    xmax = np.abs(xc).max(0)
    spread = np.abs(xc - xc.mean(0)).max(0) + n * U * xmax
    return 4 * (n + k) * U * xmax, 8 * (n + k) * U * xmax * spread * n / (n - 1)


def _within_bound(tol_var, x, axis, counts):
    """The pooled bound carried over to sum(m_i * var_i) / sum(m_i - 1).

    Each batch's deviations are from its own mean, within 2 * the overall spread of the
    values, so the sum of the m_i * var_i is off by at most twice the bound on M2; it is
    then divided by sum(m_i - 1) = n - k instead of n - 1.
    """
    n = x.size // x.shape[axis]
    return 2 * tol_var * (n - 1) / np.sum(counts - 1)


def _result(batches, axis, method):
    stats = anybn.PopulationStats(batches[0].shape[axis], axis=axis)
    for b in batches:
        stats.update(b)
    return stats.result(method)


@FAST
@given(split=batch_splits(), order=st.randoms(use_true_random=False))
def test_pooled_equals_the_statistics_of_the_concatenation_in_any_order(split, order):
    batches, axis = split
    x = np.concatenate(batches, axis=0)
    assume(x.size // x.shape[axis] >= 2)
    xc = features_last(x, axis)
    tol_mean, tol_var = _population_bound(x, axis, len(batches))

    mean, var = _result(batches, axis, "pooled")
    assert np.all(np.abs(mean - np.mean(xc, axis=0)) <= tol_mean)
    assert np.all(np.abs(var - np.var(xc, axis=0, ddof=1)) <= tol_var)

    shuffled = list(batches)
    order.shuffle(shuffled)
    mean2, var2 = _result(shuffled, axis, "pooled")
    assert np.all(np.abs(mean2 - mean) <= 2 * tol_mean)
    assert np.all(np.abs(var2 - var) <= 2 * tol_var)


@FAST
@given(split=batch_splits())
def test_paper_equals_pooled_within_batch_variance(split):
    batches, axis = split
    counts = np.array([b.size // b.shape[axis] for b in batches], dtype=np.float64)
    assume(np.sum(counts - 1) >= 1)
    means = np.array([features_last(b, axis).mean(axis=0) for b in batches])
    variances = np.array([features_last(b, axis).var(axis=0) for b in batches])  # biased
    x = np.concatenate(batches, axis=0)
    tol_mean, tol_var = _population_bound(x, axis, len(batches))

    mean, var = _result(batches, axis, "paper")
    expected_mean = counts @ means / counts.sum()
    expected_var = counts @ variances / np.sum(counts - 1)
    assert np.all(np.abs(mean - expected_mean) <= tol_mean)
    assert np.all(np.abs(var - expected_var) <= _within_bound(tol_var, x, axis, counts))


@FAST
@given(split=batch_splits(equal=True))
def test_paper_with_equal_batches_is_m_over_m_minus_1_times_mean_batch_variance(split):
    batches, axis = split
    m = batches[0].size // batches[0].shape[axis]
    assume(m >= 2)
    variances = [features_last(b, axis).var(axis=0) for b in batches]
    means = [features_last(b, axis).mean(axis=0) for b in batches]
    x = np.concatenate(batches, axis=0)
    tol_mean, tol_var = _population_bound(x, axis, len(batches))
    counts = np.full(len(batches), float(m))

    mean, var = _result(batches, axis, "paper")
    assert np.all(np.abs(mean - np.mean(means, axis=0)) <= tol_mean)
    expected_var = m / (m - 1) * np.mean(variances, axis=0)
    assert np.all(np.abs(var - expected_var) <= _within_bound(tol_var, x, axis, counts))
