"""How an input folds into ``(outer, C, inner)``, validated once per call.

Every step works on the folded view: ``outer`` is the product of the dims before the
feature axis and ``inner`` that of the dims after it, so ``reshape(x, (outer, C, inner))``
is free for a contiguous ``x``. Channels-last and (N, C) inputs (``inner == 1``) fold to
``(outer, C)``: features contiguous, no size-1 axis for backends to trip on.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any, NamedTuple

from ._checks import check_axis, check_floating
from ._namespace import NDARRAY, Array, Namespace

__all__ = ["Layout", "fold", "layout_of", "plain_numpy_layout", "plain_vectors", "unfold"]


class Layout(NamedTuple):
    """The validated shape of x and its fold around the feature axis."""

    shape: tuple[int, ...]
    axis: int  # normalized, 0 <= axis < ndim
    outer: int
    features: int
    inner: int

    @property
    def per_feature(self) -> int:
        """Number of values per feature (m in the paper)."""
        return self.outer * self.inner

    @property
    def folded_shape(self) -> tuple[int, ...]:
        """``(outer, C)`` when ``inner == 1``, else ``(outer, C, inner)``."""
        if self.inner == 1:
            return (self.outer, self.features)
        return (self.outer, self.features, self.inner)

    def broadcastable(self, xp: Namespace, v: Array) -> Array:
        """A (C,) vector shaped to broadcast against the folded array."""
        # (C,) already broadcasts against (outer, C): skip the reshape call (~1 us on NumPy)
        return v if self.inner == 1 else xp.reshape(v, (self.features, 1))


def layout_of(fn: str, xp: Namespace, x: Array, axis: Any) -> Layout:
    """Validate ``x`` (real floating, at least 2-D, known shape) and ``axis``; fold them."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise TypeError(f"{fn}: x must be an array, got {type(x).__name__}")
    check_floating(fn, "x", xp, x)
    shape = tuple(x.shape)
    if None in shape:
        raise ValueError(f"{fn}: x must have a known shape, got x.shape = {shape}")
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"{fn}: x must have at least 2 dimensions (N, C, ...), got x.shape = {shape}"
        )
    axis = check_axis(fn, axis)
    if not -ndim <= axis < ndim:
        raise ValueError(
            f"{fn}: axis={axis} is out of range for x with {ndim} dimensions "
            f"(expected {-ndim} <= axis < {ndim}, x.shape = {shape})"
        )
    axis %= ndim
    return Layout(
        shape=shape,
        axis=axis,
        outer=math.prod(shape[:axis]),
        features=shape[axis],
        inner=math.prod(shape[axis + 1 :]),
    )


def plain_numpy_layout(
    x: Any, axis: Any, vectors: dict[str, Any], required: tuple[str, ...] = ()
) -> Layout | None:
    """The layout of the common NumPy call in few steps, or None for the full checks.

    Accepted: ``x`` an exact ``numpy.ndarray`` of a floating dtype with 2+ dimensions, a
    Python ``int`` axis in range, and every vector an exact ndarray of shape (C,) and x's
    dtype, or None where not ``required``. Anything else (other dtypes, integer types, a
    missing vector, errors of any kind) returns None, and ``layout_of`` with the vector
    checks decides and words the error: this accepts a subset of what they accept, and
    returns what ``layout_of`` would (``tests/test_validation.py`` checks both).

    Why: a call comes right after the previous call's passes have swept megabytes through
    the CPU's caches, and there each line of Python run is a cache miss; the full checks
    (``namespace_of``, ``layout_of``, one ``check_feature_vector`` per vector) took 35-50 us
    of a 16 MiB inference in that state, ~5 us warm.
    """
    if type(x) is not NDARRAY or type(axis) is not int:
        return None
    shape = x.shape
    ndim = len(shape)
    dtype = x.dtype
    if ndim < 2 or dtype.kind != "f" or not -ndim <= axis < ndim:
        return None
    axis %= ndim
    features = shape[axis]
    for name in required:
        if vectors[name] is None:
            return None
    if not plain_vectors(vectors.values(), 0, features, dtype):
        return None
    return Layout(shape, axis, math.prod(shape[:axis]), features, math.prod(shape[axis + 1:]))


def plain_vectors(vectors: Iterable[Any], required: int, features: int, dtype: Any) -> bool:
    """Whether each vector is an exact ``numpy.ndarray`` of shape (features,) and ``dtype``,
    the first ``required`` of them present and the rest so or None: the short checks' rule
    for vectors (``plain_numpy_layout``, and the CPU path's express route)."""
    want = (features,)
    for i, v in enumerate(vectors):
        if v is None and i >= required:
            continue
        if type(v) is not NDARRAY or v.shape != want or (v.dtype is not dtype and v.dtype != dtype):
            return False
    return True


def fold(xp: Namespace, a: Array, layout: Layout, dtype: Any = None) -> Array:
    """``a`` (of ``layout.shape``) as its folded view, cast to ``dtype`` when given."""
    if dtype is not None and a.dtype != dtype:
        a = xp.astype(a, dtype)
    if len(layout.shape) == 2 and layout.inner == 1:
        return a  # (N, C) is its own folded view
    return xp.reshape(a, layout.folded_shape)


def unfold(xp: Namespace, buf: Array, layout: Layout, dtype: Any = None) -> Array:
    """A folded array back in ``layout.shape``, cast to ``dtype`` when given."""
    y = buf if len(layout.shape) == 2 and layout.inner == 1 else xp.reshape(buf, layout.shape)
    return y if dtype is None or y.dtype == dtype else xp.astype(y, dtype)
