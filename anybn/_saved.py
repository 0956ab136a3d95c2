"""What a forward pass keeps for its backward: :class:`BatchNormSaved`.

It lives below both the functional core and the fast paths, which build it and read it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ._layout import Layout
from ._namespace import Array

__all__ = ["BatchNormSaved"]


@dataclass(eq=False, slots=True)
class BatchNormSaved:
    """What :func:`anybn.batch_norm_backward` needs from a forward pass.

    Attributes
    ----------
    x : array
        The forward input itself (a reference, not a copy); x-hat is recomputed from it.
    mean, invstd : array, shape (C,)
        Per-feature mean and 1 / sqrt(var + eps), in the compute dtype (float32 for
        float16/bfloat16 inputs, else the dtype of ``x``). cuDNN saves the same pair.
    var : array, shape (C,)
        The biased variance behind ``invstd``.
    weight : array of shape (C,) or None
        The scale (gamma) used, or None.
    has_bias : bool
        Whether a shift (beta) was used, so that backward returns ``dbias``.
    axis : int
        Feature axis, normalized to ``0 <= axis < x.ndim``.
    eps : float
        The epsilon of the forward pass.
    count : int
        Values per feature in ``x`` (m in the paper).
    batch_stats : bool
        True when mean and var came from ``x`` itself (training); False when they were fixed
        (inference, frozen statistics), so they carry no gradient.
    pivot, delta : array of shape (C,), or None
        The mean split in two: ``pivot``, the value ``x`` was centered on, and the small
        ``delta = mean - pivot`` kept unrounded. Backward centers on them rather than on the
        rounded ``mean``: at mean/std = 1e4 in float32 the rounding alone would shift
        x-hat by up to 1e-3. None for fixed statistics, which ``mean`` holds exactly.
    layout : Layout
        The validated fold of ``x`` (shape, axis, outer, C, inner): backward reuses it.
    """

    x: Array
    mean: Array
    invstd: Array
    var: Array
    weight: Array | None
    has_bias: bool
    axis: int
    eps: float
    count: int
    batch_stats: bool = True
    pivot: Array | None = None
    delta: Array | None = None
    layout: Layout | None = None

    def __getstate__(self) -> dict[str, Any]:  # slots dataclass: pickle by fields
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
