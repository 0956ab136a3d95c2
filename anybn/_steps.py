"""The coefficients stage: O(C) array-API code, written once for every path.

Between the reductions and the apply of each step (see ``anybn._kernels``):

- :func:`stats_from_sums`: shifted sums -> per-feature (count, pivot, delta, var);
- :func:`train_coefficients`: batch statistics -> the apply's scale and shift, and invstd;
- :func:`fixed_coefficients`: given statistics (inference, frozen BN) -> the same;
- :func:`backward_coefficients`: the backward's two sums -> dx's per-feature factors and
  the parameter gradients.

All of them run in the dtype the reductions accumulated in (the compute dtype on the
generic path, float64 on the fast paths). Nothing here reads an array the size of x.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import array_api_compat

from ._moments import GradSums, Sums
from ._namespace import Array, Namespace
from ._saved import BatchNormSaved

__all__ = [
    "Applied",
    "BackwardCoefficients",
    "Stats",
    "backward_coefficients",
    "fixed_coefficients",
    "stats_from_sums",
    "train_coefficients",
]

# Inference with a pivot that costs a pass (the generic path) folds everything into
# y = x * scale + shift. Its rounding error is about ulp(|mean| * scale): harmless while the
# mean is within this many standard deviations of zero; beyond it, y = (x - mean) * scale +
# bias keeps full precision for one more pass.
_FOLD_MAX_OFFSET = 64.0


class Stats(NamedTuple):
    """Per-feature batch statistics: mean = pivot + delta, biased variance ``var``."""

    # ``count`` shadows tuple.count: the name the formulas use
    count: int  # type: ignore[assignment]
    pivot: Array  # (C,) the value the reductions centered x on
    delta: Array  # (C,) mean - pivot, small, kept unrounded
    var: Array  # (C,) biased variance


class Applied(NamedTuple):
    """The apply's coefficients, y = (x - pivot) * scale + shift, and invstd."""

    pivot: Array | None  # None: no centering (folded into shift)
    scale: Array
    shift: Array | None  # None: no shift
    invstd: Array


class BackwardCoefficients(NamedTuple):
    """dx = k * (dy + a * (x - pivot) + b); a = b = None for fixed statistics."""

    a: Array | None
    b: Array | None
    k: Array
    dweight: Array | None
    dbias: Array | None


def _as(xp: Namespace, a: Array | None, dtype: Any) -> Array | None:
    if a is None or a.dtype == dtype:
        return a
    return xp.astype(a, dtype)


def stats_from_sums(xp: Namespace, sums: Sums) -> Stats:
    """Mean (as pivot + delta) and biased variance from shifted sums.

    var = E[d^2] - E[d]^2 with d = x - pivot: no cancellation, since the pivot is near the
    mean and E[d] is small against the standard deviation.
    """
    n = sums.count
    delta = sums.s1 / n
    var = sums.s2 / n - delta * delta
    # rounding can leave -tiny when every value of a feature is equal; NaN stays NaN
    var = xp.maximum(var, 0.0)
    return Stats(n, sums.pivot, delta, var)


def train_coefficients(
    xp: Namespace, stats: Stats, weight: Array | None, bias: Array | None, eps: float
) -> Applied:
    """Normalization with batch statistics, centered on the reductions' pivot.

    y = (x - pivot - delta) * invstd * weight + bias = (x - pivot) * scale + shift.
    """
    dtype = stats.var.dtype
    invstd = 1.0 / xp.sqrt(stats.var + eps)
    w = _as(xp, weight, dtype)
    scale = invstd if w is None else w * invstd
    shift = -stats.delta * scale
    if bias is not None:
        shift = shift + _as(xp, bias, dtype)
    return Applied(stats.pivot, scale, shift, invstd)


def fixed_coefficients(
    xp: Namespace,
    mean: Array,
    var: Array,
    weight: Array | None,
    bias: Array | None,
    eps: float,
    dtype: Any,
    *,
    centering_is_free: bool,
    lazy: bool,
) -> Applied:
    """Normalization with given statistics, in ``dtype``.

    Centered on ``mean`` where that is free (fused kernels) or needed for precision; folded
    into y = x * scale + (bias - mean * scale) where the mean is within 64 standard
    deviations of zero, on paths where centering costs a pass. Lazy inputs (Dask, JAX)
    cannot be inspected without computing: they take the centered form.
    """
    mean, var = _as(xp, mean, dtype), _as(xp, var, dtype)
    invstd = 1.0 / xp.sqrt(var + eps)
    w, b = _as(xp, weight, dtype), _as(xp, bias, dtype)
    scale = invstd if w is None else w * invstd
    if not centering_is_free and not lazy and bool(xp.max(xp.abs(mean) * invstd) <= _FOLD_MAX_OFFSET):
        shift = -mean * scale if b is None else b - mean * scale
        return Applied(None, scale, shift, invstd)
    return Applied(mean, scale, b, invstd)


def backward_coefficients(
    xp: Namespace, saved: BatchNormSaved, sums: GradSums | None, dtype: Any
) -> BackwardCoefficients:
    """dx's per-feature factors and the parameter gradients, from the backward's sums.

    With x-hat = (x - pivot - delta) * invstd and m values per feature:

    - batch statistics: dx = k * (dy - mean(dy) - x-hat * mean(dy * x-hat)), k = weight * invstd,
      written as k * (dy + a * (x - pivot) + b);
    - fixed statistics: dx = k * dy;

    dweight = sum(dy * x-hat) = (sum(dy * (x - pivot)) - delta * sum(dy)) * invstd, and
    dbias = sum(dy). Renormalized (``saved.r`` set): k = weight * invstd * r and
    dweight = sum(dy * (x-hat * r + d)). ``sums`` may be None when nothing needs them (fixed statistics, no
    weight and no bias).
    """
    invstd = _as(xp, saved.invstd, dtype)
    w = _as(xp, saved.weight, dtype)
    k = invstd if w is None else w * invstd
    r = _as(xp, saved.r, dtype)
    if r is not None:
        # renormalization, y = weight * (x-hat * r + d) + bias with r, d constants: the
        # gradient reaching x-hat is scaled by r, the rest is plain batch normalization's
        k = k * r
    delta = _as(xp, saved.delta, dtype)
    sum_dy = sum_dy_xhat = None
    if sums is not None:
        sum_dy = sums.sum_dy
        if sums.sum_dy_d is not None:
            sum_dy_d = sums.sum_dy_d if delta is None else sums.sum_dy_d - delta * sum_dy
            sum_dy_xhat = sum_dy_d * invstd
    a = b = None
    if saved.batch_stats:
        assert sum_dy is not None and sum_dy_xhat is not None and invstd is not None
        m = saved.count
        a = -invstd * sum_dy_xhat / m
        b = -sum_dy / m
        if delta is not None:
            b = b - a * delta
    out_dtype = saved.invstd.dtype
    if r is not None and w is not None:
        assert sum_dy is not None and sum_dy_xhat is not None
        # dweight = sum(dy * (x-hat * r + d))
        sum_dy_xhat = sum_dy_xhat * r + sum_dy * _as(xp, saved.d, dtype)
    dweight = _as(xp, sum_dy_xhat, out_dtype) if w is not None else None
    dbias = _as(xp, sum_dy, out_dtype) if saved.has_bias else None
    return BackwardCoefficients(a, b, k, dweight, dbias)


def is_lazy(x: Array) -> bool:
    """Whether x is a lazy array (Dask, traced JAX): nothing may be computed from it early."""
    return bool(array_api_compat.is_lazy_array(x))
