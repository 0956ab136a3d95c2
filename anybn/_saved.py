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
    r, d : array of shape (C,), or None
        Batch renormalization's correction (:func:`anybn.batch_renorm_train`):
        y = weight * (x-hat * r + d) + bias, with r and d constants in backward. None for
        plain batch normalization.
    groups : tuple of BatchNormSaved, or None
        Ghost batch normalization (``virtual_batch_size=``): each chunk's own saved state,
        in batch order. ``mean`` and ``var`` then hold the chunks' mean of means and mean
        of biased variances, and ``count`` the values per feature of one chunk, so that
        :func:`anybn.update_running_stats` averages the chunks' unbiased variances.
    act : anybn._kernels.Activation, or None
        A fused activation and/or residual (``activation=``, ``residual=``): its kind, the
        apply's coefficients and the residual, from which backward recomputes the
        pre-activation z and act'(z). None when the forward pass fused neither.
    comm : anybn.distributed.Communicator, or None
        Synchronized batch normalization (``comm=``): the communicator the forward pass
        merged its statistics over, and that backward all-reduces its sums over. Then
        ``mean``, ``var`` and ``count`` are those of the global batch (every rank's values),
        while ``x``, ``pivot`` and ``delta`` are this rank's (mean = pivot + delta).
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
    r: Array | None = None
    d: Array | None = None
    groups: tuple[BatchNormSaved, ...] | None = None
    comm: Any = None
    act: Any = None

    @property
    def plain(self) -> bool:
        """True for plain batch normalization: not renormalized, grouped or fused."""
        return self.r is None and self.groups is None and self.act is None

    def __getstate__(self) -> dict[str, Any]:  # slots dataclass: pickle by fields
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    def __setstate__(self, state: dict[str, Any]) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
