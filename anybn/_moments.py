"""Per-feature statistics: sums as vector products, shifted moments, and mergeable moments.

Every reduction runs on the folded view ``(outer, C, inner)`` (or ``(outer, C)`` when
``inner == 1``) as matrix-vector products with a ones vector: on NumPy, CuPy and PyTorch
these go to BLAS, which is multi-threaded and allocates no temporaries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

from ._namespace import Array, Layout, Namespace

__all__ = ["BatchMoments", "FeatureReducer", "merge_moments", "shifted_moments"]


class FeatureReducer:
    """Per-feature sums and dot products over the folded view of one layout."""

    __slots__ = ("_xp", "_layout", "_ones_outer", "_ones_inner")

    def __init__(self, xp: Namespace, layout: Layout, dtype, device) -> None:
        self._xp = xp
        self._layout = layout
        self._ones_outer = xp.ones(layout.outer, dtype=dtype, device=device)
        self._ones_inner = (
            xp.ones(layout.inner, dtype=dtype, device=device) if layout.inner > 1 else None
        )

    def _rows(self, per_row: Array) -> Array:
        """Sum an (outer * C,) vector of row results over ``outer``."""
        xp, lo = self._xp, self._layout
        return self._ones_outer @ xp.reshape(per_row, (lo.outer, lo.features))

    def sum(self, v: Array) -> Array:
        """Per-feature sum of a folded array, shape (C,)."""
        xp, lo = self._xp, self._layout
        if lo.inner == 1:
            return self._ones_outer @ v
        return self._rows(xp.reshape(v, (lo.outer * lo.features, lo.inner)) @ self._ones_inner)

    def dot(self, a: Array, b: Array) -> Array:
        """Per-feature sum of ``a * b`` for two folded arrays, shape (C,)."""
        xp, lo = self._xp, self._layout
        if lo.inner == 1:
            # vecdot along axis 0 is strided and slow; one product temporary is cheaper
            return self._ones_outer @ (a * b)
        return self._rows(xp.vecdot(a, b, axis=-1))


class ShiftedMoments(NamedTuple):
    centered: Array  # x - pivot, a fresh folded buffer the caller may overwrite
    pivot: Array  # (C,) a first estimate of the mean
    delta: Array  # (C,) mean - pivot, small
    var: Array  # (C,) biased variance


def shifted_moments(xp: Namespace, xf: Array, reducer: FeatureReducer, layout: Layout) -> ShiftedMoments:
    """Per-feature mean and biased variance by the corrected two-pass algorithm.

    The first pass gives a rough mean (the pivot). Values are then taken relative to it, so
    the second pass sums small numbers: ``x - pivot`` is exact where x is near its mean, and
    var = E[d^2] - E[d]^2 suffers no cancellation because E[d] is tiny. In float32 at
    mean/std = 1e4 this keeps the variance to ~1e-6 relative, where E[x^2] - E[x]^2 fails.
    """
    count = layout.per_feature
    pivot = reducer.sum(xf) / count
    centered = xf - xp.reshape(pivot, layout.feature_shape)
    delta = reducer.sum(centered) / count
    var = reducer.dot(centered, centered) / count - delta * delta
    # rounding can leave -tiny when every value of a feature is equal
    var = xp.maximum(var, 0.0)
    return ShiftedMoments(centered, pivot, delta, var)


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
