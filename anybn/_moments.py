"""Per-feature reductions of the generic path, and mergeable moments.

The reductions stage of every step on the generic array-API path lives here: the shifted
sums of the training forward (:func:`shifted_sums`) and the two sums of the backward
(:func:`grad_sums`). Their outputs are O(C). :class:`BatchMoments` and :func:`merge_moments`
are the mergeable form (count, mean, M2) that population statistics and synchronized
batch normalization combine.

Every reduction runs on the folded view ``(outer, C, inner)`` (or ``(outer, C)`` when
``inner == 1``) as matrix-vector products with a ones vector: on NumPy, CuPy and PyTorch
these go to BLAS, which is multi-threaded and allocates no temporaries.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

import array_api_compat

from ._layout import Layout, fold
from ._namespace import Array, Namespace, accumulation_dtype

__all__ = ["BatchMoments", "FeatureReducer", "Sums", "grad_sums", "merge_moments", "shifted_sums"]

# Sums of more terms than this go in two levels (blocks of ~sqrt(n) terms, then the block
# sums): a one-level float32 BLAS sum of 10**6 rows at mean 1e4 was 2e-4 off, two levels 1e-7.
_ONE_LEVEL_MAX = 8192
# The pivot is the mean of the first 1/64 of the outer slices: close enough to the batch mean
# that var = E[d^2] - E[d]^2 loses nothing, at 1/64 of a pass.
_PIVOT_FRACTION = 64


def _blas_quiet(xp: Namespace) -> contextlib.AbstractContextManager[Any]:
    """On NumPy, the invalid-operation flag ignored around the BLAS products of the sums.

    OpenBLAS kernels can raise FE_INVALID on finite inputs (numpy/numpy#24067,
    OpenMathLib/OpenBLAS#1924; seen here once in a float32 (12, 5) @ (5,) product), which
    NumPy reports as "invalid value encountered in matmul". NaN and inf in x still reach
    the sums and the outputs; only the warning goes.
    """
    if array_api_compat.is_numpy_namespace(xp):
        import numpy

        return numpy.errstate(invalid="ignore")
    return contextlib.nullcontext()


def _blocking(n: int) -> tuple[int, int, int]:
    """(block size, number of blocks, terms they cover) for a two-level sum of n terms."""
    size = math.isqrt(n)
    blocks = n // size
    return size, blocks, size * blocks


class FeatureReducer:
    """Per-feature sums and dot products over the folded view of one layout."""

    __slots__ = ("_xp", "_layout", "_ones_outer", "_ones_inner")

    @property
    def xp(self) -> Namespace:
        return self._xp

    @property
    def layout(self) -> Layout:
        return self._layout

    def __init__(self, xp: Namespace, layout: Layout, dtype, device) -> None:
        self._xp = xp
        self._layout = layout
        self._ones_outer = xp.ones(layout.outer, dtype=dtype, device=device)
        # unused (None) when inner == 1
        self._ones_inner: Array = (
            xp.ones(layout.inner, dtype=dtype, device=device) if layout.inner > 1 else None
        )

    def _sum_rows(self, v: Array) -> Array:
        """Sum an (n, C) array over its n <= outer rows, shape (C,)."""
        n = v.shape[0]
        ones = self._ones_outer if n == self._layout.outer else self._ones_outer[:n]
        if n <= _ONE_LEVEL_MAX:
            return ones @ v
        xp = self._xp
        size, blocks, head = _blocking(n)
        # (size,) @ (blocks, size, C): one stacked product gives the (blocks, C) partial sums
        partial = self._ones_outer[:size] @ xp.reshape(v[:head, ...], (blocks, size, v.shape[1]))
        total = self._ones_outer[:blocks] @ partial
        if head < n:
            total = total + self._ones_outer[: n - head] @ v[head:, ...]
        return total

    def _rows_of(self, v: Array) -> Array:
        """An (n, C, inner) array as (n * C, inner) rows."""
        return self._xp.reshape(v, (v.shape[0] * self._layout.features, self._layout.inner))

    def _sum_inner(self, v: Array) -> Array:
        """Sum an (n, C, inner) array over ``inner``, shape (n, C)."""
        xp, lo, ones = self._xp, self._layout, self._ones_inner
        n, rows = v.shape[0], self._rows_of(v)
        if lo.inner <= _ONE_LEVEL_MAX:
            return xp.reshape(rows @ ones, (n, lo.features))
        size, blocks, head = _blocking(lo.inner)
        partial = xp.reshape(rows[:, :head], (rows.shape[0], blocks, size)) @ ones[:size]
        total = partial @ ones[:blocks]
        if head < lo.inner:
            total = total + rows[:, head:] @ ones[: lo.inner - head]
        return xp.reshape(total, (n, lo.features))

    def _dot_inner(self, a: Array, b: Array) -> Array:
        """Sum of ``a * b`` over ``inner`` for (n, C, inner) arrays, shape (n, C)."""
        xp, lo = self._xp, self._layout
        if lo.inner <= _ONE_LEVEL_MAX:
            return xp.vecdot(a, b, axis=-1)
        n, a_rows, b_rows = a.shape[0], self._rows_of(a), self._rows_of(b)
        size, blocks, head = _blocking(lo.inner)
        shape = (a_rows.shape[0], blocks, size)
        partial = xp.vecdot(xp.reshape(a_rows[:, :head], shape), xp.reshape(b_rows[:, :head], shape), axis=-1)
        total = partial @ self._ones_inner[:blocks]
        if head < lo.inner:
            total = total + xp.vecdot(a_rows[:, head:], b_rows[:, head:], axis=-1)
        return xp.reshape(total, (n, lo.features))

    def sum(self, v: Array) -> Array:
        """Per-feature sum of a folded array, shape (C,)."""
        with _blas_quiet(self._xp):
            if self._layout.inner == 1:
                return self._sum_rows(v)
            return self._sum_rows(self._sum_inner(v))

    def dot(self, a: Array, b: Array) -> Array:
        """Per-feature sum of ``a * b`` for two folded arrays, shape (C,)."""
        if self._layout.inner == 1:
            # vecdot along axis 0 is strided and slow; one product temporary is cheaper
            return self.sum(a * b)  # the product outside the guard: inf * 0 there still warns
        with _blas_quiet(self._xp):
            return self._sum_rows(self._dot_inner(a, b))

    def pivot(self, xf: Array) -> Array:
        """Per-feature mean of the first 1/64 of the outer slices, shape (C,)."""
        lo = self._layout
        k = -(-lo.outer // _PIVOT_FRACTION)
        if k == 1 and lo.inner == 1:
            return xf[0, ...]
        # scaled before summing: a sum of values near the dtype's max would overflow
        head = xf[:k, ...] * (1.0 / (k * lo.inner))
        with _blas_quiet(self._xp):
            if lo.inner > 1:
                head = self._sum_inner(head)
            return self._sum_rows(head)


class Sums(NamedTuple):
    """Output of the training forward's reductions: per-feature shifted sums.

    ``s1 = sum(x - pivot)`` and ``s2 = sum((x - pivot)**2)`` over the ``count`` values of
    each feature, in the dtype the reductions accumulated in (the compute dtype on the
    generic path, float64 on the fast paths); ``pivot`` is the value each feature was
    shifted by, near its mean, so that the sums add small numbers.
    """

    # ``count`` shadows tuple.count: the name the formulas use
    count: int  # type: ignore[assignment]
    pivot: Array  # (C,)
    s1: Array  # (C,)
    s2: Array  # (C,)
    scratch: Any = None  # the folded x - pivot, owned: the same path's apply may finish y in it


# Deviations past 2**63 square past float32's max (3.4e38): where the pivot is that far out,
# the deviations may be too, and float32 sums would overflow to inf.
_HUGE = 2.0**62


def _wider_for_huge_values(xp: Namespace, pivot: Array, dtype: Any, device: Any, lazy: bool) -> Any:
    """float64 (where the backend has it) when float32 values sit near float32's limits."""
    if lazy or xp.finfo(dtype).bits > 32:
        return None
    acc = accumulation_dtype(xp, device, dtype)
    if acc == dtype or not bool(xp.max(xp.abs(pivot)) > _HUGE):
        return None
    return acc


def shifted_sums(xp: Namespace, x: Array, layout: Layout, dtype: Any, device: Any, lazy: bool = True) -> Sums:
    """Per-feature sums of x shifted by a pivot near the mean (generic path).

    The pivot is the mean of the leading 1/64 of the outer slices, so ``x - pivot`` is exact
    where x is near its mean and var = E[d^2] - E[d]^2 suffers no cancellation (E[d] is small
    against the standard deviation): in float32 at mean/std = 1e4 the variance keeps ~1e-6
    relative, where E[x^2] - E[x]^2 is off by orders of magnitude. One pass writes the
    centered buffer, two BLAS products read it: x itself is read once. The buffer comes back
    as ``scratch`` for the apply to finish y in.

    float32 values beyond 2**62 (whose deviations could square past float32's max) are
    summed in float64 where the backend has it; ``lazy`` inputs cannot be inspected and keep
    ``dtype``.
    """
    reducer = FeatureReducer(xp, layout, dtype, device)
    xf = fold(xp, x, layout, dtype)
    pivot = reducer.pivot(xf)
    wider = _wider_for_huge_values(xp, pivot, dtype, device, lazy)
    if wider is not None:
        return shifted_sums(xp, x, layout, wider, device)
    centered = xf - layout.broadcastable(xp, pivot)
    s1 = reducer.sum(centered)
    s2 = reducer.dot(centered, centered)
    return Sums(layout.per_feature, pivot, s1, s2, centered)


class GradSums(NamedTuple):
    """Output of the backward's reductions: ``sum(dy)`` and ``sum(dy * (x - pivot))``."""

    sum_dy: Array  # (C,)
    sum_dy_d: Array | None  # (C,), None where not asked for
    scratch: Any = None  # the folded x - pivot, owned, when it was computed


def grad_sums(
    xp: Namespace, x: Array, dy: Array, layout: Layout, pivot: Array | None, dtype: Any, device: Any
) -> GradSums:
    """The backward's per-feature sums (generic path); ``pivot=None`` skips the second."""
    reducer = FeatureReducer(xp, layout, dtype, device)
    dyf = fold(xp, dy, layout, dtype)
    sum_dy = reducer.sum(dyf)
    if pivot is None:
        return GradSums(sum_dy, None)
    centered = fold(xp, x, layout, dtype) - layout.broadcastable(xp, pivot)
    return GradSums(sum_dy, reducer.dot(dyf, centered), centered)


@dataclass(frozen=True)
class BatchMoments:
    """Mergeable per-feature moments: a count, a mean and a sum of squared deviations."""

    count: int
    mean: Array
    m2: Array


def merge_moments(a: BatchMoments, b: BatchMoments) -> BatchMoments:
    """Chan, Golub and LeVeque's pairwise update: exact whatever the order and sizes."""
    count = a.count + b.count
    delta = b.mean - a.mean
    mean = a.mean + delta * (b.count / count)
    m2 = a.m2 + b.m2 + delta * delta * (a.count * b.count / count)
    return BatchMoments(count, mean, m2)
