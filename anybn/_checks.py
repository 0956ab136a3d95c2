"""Argument checks shared by every entry point: one wording for every error.

Each check names the function and the argument, what it got and what it expected, and
runs before any work is done and before any state changes. Integers are accepted by
``operator.index`` (``int``, ``numpy.int64``, ...), real numbers by ``float``-conversion of
real scalar types (``float``, ``numpy.float32``, ...), never ``bool``.
"""

from __future__ import annotations

import math
import numbers
import operator
from typing import Any

from ._namespace import Array, Namespace

__all__ = [
    "check_axis",
    "check_eps",
    "check_feature_vector",
    "check_floating",
    "check_momentum",
    "check_num_features",
    "check_real",
]


def check_floating(fn: str, name: str, xp: Namespace, a: Array) -> None:
    """``a`` must have a real floating dtype."""
    # NumPy-style dtypes (NumPy, CuPy, Dask) answer in ~0.1 us; isdtype takes ~2 us
    if getattr(a.dtype, "kind", None) == "f":
        return
    if not xp.isdtype(a.dtype, "real floating"):
        raise TypeError(f"{fn}: {name} must have a real floating dtype, got {a.dtype}")


def _integer(fn: str, name: str, value: Any, expected: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{fn}: {name} must be {expected}, got bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{fn}: {name} must be {expected}, got {type(value).__name__}") from None


def check_axis(fn: str, axis: Any) -> int:
    """``axis`` as a Python int (any ``operator.index`` integer); range is checked with x."""
    return _integer(fn, "axis", axis, "an int")


def check_num_features(fn: str, num_features: Any) -> int:
    """``num_features`` as a positive Python int."""
    value = _integer(fn, "num_features", num_features, "a positive int")
    if value < 1:
        raise ValueError(f"{fn}: num_features must be a positive int, got {value}")
    return value


def check_real(fn: str, name: str, value: Any, expected: str = "a float") -> float:
    """A real scalar (int, float, numpy.float32, ...; not bool) as a Python float."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{fn}: {name} must be {expected}, got {type(value).__name__}")
    return float(value)


def check_eps(fn: str, eps: Any) -> float:
    """``eps`` as a finite float > 0."""
    value = eps if type(eps) is float else check_real(fn, "eps", eps)
    if not value > 0:  # also rejects nan
        raise ValueError(f"{fn}: eps must be > 0, got {value}")
    if not math.isfinite(value):  # inf would normalize everything to 0
        raise ValueError(f"{fn}: eps must be finite, got {value}")
    return value


def check_momentum(fn: str, momentum: Any) -> float | None:
    """``momentum`` in [0, 1], or None (the cumulative average)."""
    if momentum is None:
        return None
    value = check_real(fn, "momentum", momentum, "a float in [0, 1] or None")
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{fn}: momentum must be in [0, 1] or None, got {value}")
    return value


def check_feature_vector(
    fn: str,
    name: str,
    xp: Namespace,
    a: Array | None,
    features: int,
    *,
    axis: int,
    shape: tuple[int, ...],
    dtype: Any = None,
    required: bool = False,
) -> None:
    """``a`` must be a real floating array of shape (C,); None only when not ``required``.

    ``axis`` and ``shape`` are x's, for the message. ``dtype`` is x's dtype, already
    checked: a vector of the same dtype skips the dtype check.
    """
    if a is None:
        if required:
            raise TypeError(
                f"{fn}: {name} is required: expected an array of shape ({features},), got None"
            )
        return
    try:
        a_shape, a_dtype = a.shape, a.dtype
    except AttributeError:
        raise TypeError(
            f"{fn}: {name} must be an array of shape ({features},), got {type(a).__name__}"
        ) from None
    if a_dtype != dtype:
        check_floating(fn, name, xp, a)
    if tuple(a_shape) != (features,):
        raise ValueError(
            f"{fn}: {name} has shape {tuple(a_shape)}, expected ({features},) = the size "
            f"of x along axis {axis} (x.shape = {shape})"
        )
