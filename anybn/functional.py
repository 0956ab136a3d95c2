"""Batch normalization, written once against the Python array API standard.

Every step reads as the algorithm's three stages: **reductions** (the only code that reads
x, or dy, for statistics; O(C) results), **coefficients** (O(C) array-API code in
``anybn._steps``, the same for every path) and **apply** (one elementwise pass). The
reductions and the apply come from :class:`anybn._kernels.Kernels`: a fast path's compiled
kernels where one serves the arrays (``anybn._fast``), else the generic array-API ones.

The functions return arrays of the input's namespace and device, never write to their
inputs, and do no in-place writes on arrays that are not their own (JAX, Dask, torch
tensors that autograd records).
"""

from __future__ import annotations

from typing import Any

from . import _fast
from ._checks import check_eps, check_feature_vector, check_floating, check_real
from ._layout import Layout, layout_of
from ._namespace import Array, Namespace, compute_dtype, namespace_of
from ._saved import BatchNormSaved
from ._steps import (
    backward_coefficients,
    fixed_coefficients,
    is_lazy,
    stats_from_sums,
    train_coefficients,
)

__all__ = [
    "BatchNormSaved",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_fixed",
    "batch_norm_train",
    "update_running_stats",
]


def _validated(
    fn: str,
    x: Array,
    axis: Any,
    eps: Any,
    required: tuple[str, ...] = (),
    **vectors: Array | None,
) -> tuple[Namespace, Layout, float]:
    """Namespace, layout and eps of a forward step, every argument checked."""
    if x is None:
        raise TypeError(f"{fn}: x must be an array of an array-API library, got None")
    for name in required:  # before the namespace check, which would skip a None
        if vectors[name] is None:
            raise TypeError(f"{fn}: {name} is required: expected an array of shape (C,), got None")
    xp = namespace_of(fn, x=x, **vectors)
    layout = layout_of(fn, xp, x, axis)
    for name, v in vectors.items():
        check_feature_vector(fn, name, xp, v, layout.features, axis=layout.axis, shape=layout.shape,
                             dtype=x.dtype, required=name in required)
    return xp, layout, check_eps(fn, eps)


def batch_norm_train(
    x: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> tuple[Array, BatchNormSaved]:
    """Normalize ``x`` with its own per-feature batch statistics (training mode).

    y = (x - mean) / sqrt(var + eps) * weight + bias, with the batch mean and the biased
    batch variance of every feature, taken over all axes but ``axis``.

    Parameters
    ----------
    x : array, shape ``(N, C, *spatial)`` for ``axis=1``, or ``(N, *spatial, C)`` for ``axis=-1``
        Any array-API array of a real floating dtype, with at least two values per feature.
    weight, bias : array of shape (C,), optional
        Scale (gamma) and shift (beta), in the namespace and on the device of ``x``.
    axis : int, default 1
        The feature axis. 1 is PyTorch's NC... layout, -1 is channels-last.
    eps : float, default 1e-5
        Added to the variance; must be finite and > 0.

    Returns
    -------
    y : array, same shape, dtype, namespace and device as ``x``.
    saved : BatchNormSaved
        Input to :func:`batch_norm_backward`: a reference to ``x``, the batch mean, the
        biased variance and ``invstd`` of shape (C,), in float32 for float16/bfloat16 ``x``.

    Notes
    -----
    Statistics are sums of values shifted by a pivot near the mean, so a float32 input with
    mean/std = 1e4 normalizes to within 1e-4 of a float64 computation. On the generic path
    the pivot is the mean of the leading 1/64 of the batch and the sums run in the compute
    dtype (float32 for float16/bfloat16), in two levels beyond 8192 terms; x is read once
    (its leading 1/64 once more) and y is finished in the buffer of x - pivot. The fused CPU
    path for C-contiguous float32 and float64 NumPy arrays (``anybn[fast]``; off with
    ``ANYBN_FAST_PATHS=0``) takes float64 sums of x shifted by one sample per feature in one
    pass over x, and writes y in a second.
    """
    fn = "batch_norm_train"
    xp, layout, eps = _validated(fn, x, axis, eps, weight=weight, bias=bias)
    if layout.per_feature < 2:
        raise ValueError(
            f"{fn}: expected more than 1 value per feature when training, got x.shape = "
            f"{layout.shape} ({layout.per_feature} value(s) per feature along axis {layout.axis})"
        )
    kernels = _fast.kernels_for("train", xp, x)
    whole = getattr(kernels, "train_whole", None)  # small inputs: one compiled call, proven equal
    if whole is not None and (done := whole(xp, x, layout, weight, bias, eps)) is not None:
        return done
    # reductions
    sums = kernels.moments(xp, x, layout)
    # coefficients
    stats = stats_from_sums(xp, sums)
    coef = train_coefficients(xp, stats, weight, bias, eps)
    # apply
    y = kernels.apply(xp, x, layout, coef.pivot, coef.scale, coef.shift, scratch=sums.scratch)

    cdt = compute_dtype(xp, x.dtype)
    saved = BatchNormSaved(
        x=x,
        mean=_as(xp, stats.pivot + stats.delta, cdt),
        invstd=_as(xp, coef.invstd, cdt),
        var=_as(xp, stats.var, cdt),
        weight=weight,
        has_bias=bias is not None,
        axis=layout.axis,
        eps=eps,
        count=layout.per_feature,
        pivot=_as(xp, stats.pivot, cdt),
        delta=_as(xp, stats.delta, cdt),
        layout=layout,
    )
    return y, saved


def batch_norm_fixed(
    x: Array,
    mean: Array,
    var: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> tuple[Array, BatchNormSaved]:
    """Normalize ``x`` with given statistics that backward treats as constants.

    y = (x - mean) / sqrt(var + eps) * weight + bias. The building block of inference and
    of frozen batch normalization: :func:`batch_norm_backward` on the returned ``saved``
    gives dx = dy * weight / sqrt(var + eps), and dweight, dbias as in training.

    Parameters
    ----------
    x : array, shape ``(N, C, *spatial)`` for ``axis=1``, or ``(N, *spatial, C)`` for ``axis=-1``
        Any array-API array of a real floating dtype.
    mean, var : array, shape (C,)
        Per-feature statistics (running or population estimates), required, in the
        namespace and on the device of ``x``.
    weight, bias : array of shape (C,), optional
        Scale (gamma) and shift (beta).
    axis : int, default 1
        The feature axis.
    eps : float, default 1e-5
        Added to ``var``; must be finite and > 0.

    Returns
    -------
    y : array, same shape, dtype, namespace and device as ``x``.
    saved : BatchNormSaved
        With ``batch_stats=False``; ``mean``, ``var`` and ``invstd`` in the compute dtype.
    """
    y, saved = _fixed("batch_norm_fixed", x, mean, var, weight, bias, axis=axis, eps=eps)
    assert saved is not None
    return y, saved


def _fixed(
    fn: str, x: Array, mean: Array, var: Array, weight: Array | None, bias: Array | None, *, axis: Any,
    eps: Any, keep: bool = True,
) -> tuple[Array, BatchNormSaved | None]:
    """:func:`batch_norm_fixed` under the name ``fn``; ``keep=False`` skips ``saved`` (inference)."""
    xp, layout, eps = _validated(fn, x, axis, eps, ("mean", "var"), mean=mean, var=var, weight=weight,
                                 bias=bias)
    kernels = _fast.kernels_for("eval", xp, x)
    whole = getattr(kernels, "eval_whole", None)  # small inputs: one compiled call, proven equal
    y = None if whole is None else whole(xp, x, layout, mean, var, weight, bias, eps)
    if y is not None and not keep:
        return y, None
    # no reductions: the statistics are given
    coef = fixed_coefficients(xp, mean, var, weight, bias, eps, kernels.coefficient_dtype(xp, x),
                              centering_is_free=kernels.centering_is_free, lazy=is_lazy(x))
    if y is None:
        y = kernels.apply(xp, x, layout, coef.pivot, coef.scale, coef.shift)

    cdt = compute_dtype(xp, x.dtype)
    saved = BatchNormSaved(
        x=x,
        mean=_as(xp, mean, cdt),
        invstd=_as(xp, coef.invstd, cdt),
        var=_as(xp, var, cdt),
        weight=weight,
        has_bias=bias is not None,
        axis=layout.axis,
        eps=eps,
        count=layout.per_feature,
        batch_stats=False,
        layout=layout,
    )
    return y, saved


def batch_norm_eval(
    x: Array,
    mean: Array,
    var: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
) -> Array:
    """Normalize ``x`` with fixed per-feature statistics (inference mode).

    y = (x - mean) / sqrt(var + eps) * weight + bias. The same as :func:`batch_norm_fixed`
    without what backward needs.

    Parameters
    ----------
    x : array, shape ``(N, C, *spatial)`` for ``axis=1``, or ``(N, *spatial, C)`` for ``axis=-1``
        Any array-API array of a real floating dtype.
    mean, var : array, shape (C,)
        Per-feature statistics (running or population estimates), required, in the
        namespace and on the device of ``x``.
    weight, bias : array of shape (C,), optional
        Scale (gamma) and shift (beta).
    axis : int, default 1
        The feature axis.
    eps : float, default 1e-5
        Added to ``var``; must be finite and > 0.

    Returns
    -------
    y : array, same shape, dtype, namespace and device as ``x``.
    """
    y, _ = _fixed("batch_norm_eval", x, mean, var, weight, bias, axis=axis, eps=eps, keep=False)
    return y


def batch_norm_backward(
    dy: Array, saved: BatchNormSaved
) -> tuple[Array, Array | None, Array | None]:
    """Gradients of batch normalization, from the output gradient and the saved forward state.

    With x-hat = (x - mean) * invstd recomputed from ``saved.x`` and m values per feature:

    - training (batch statistics):
      dx = weight * invstd * (dy - mean(dy) - x-hat * mean(dy * x-hat));
    - fixed statistics (inference, frozen): dx = weight * invstd * dy;

    dweight = sum(dy * x-hat) and dbias = sum(dy), summed over all axes but the feature axis.

    Parameters
    ----------
    dy : array, same shape as ``saved.x``
        Gradient of the loss with respect to ``y``, in the namespace and on the device of x.
    saved : BatchNormSaved
        As returned by :func:`batch_norm_train` or :func:`batch_norm_fixed` (or kept by the
        layer in either mode).

    Returns
    -------
    dx : array, same shape, dtype, namespace and device as ``saved.x``.
    dweight, dbias : array of shape (C,) or None
        None where the forward pass had no weight or no bias. In the compute dtype
        (float32 for float16/bfloat16 inputs).
    """
    fn = "batch_norm_backward"
    if not isinstance(saved, BatchNormSaved):
        raise TypeError(
            f"{fn}: saved must be the BatchNormSaved returned by batch_norm_train, "
            f"got {type(saved).__name__}"
        )
    if dy is None:
        raise TypeError(f"{fn}: dy must be an array of the shape of the forward input, got None")
    x = saved.x
    xp = namespace_of(fn, dy=dy, x=x)
    check_floating(fn, "dy", xp, dy)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(
            f"{fn}: dy has shape {tuple(dy.shape)}, expected {tuple(x.shape)} = the shape of "
            f"the forward input"
        )
    layout = saved.layout if saved.layout is not None else layout_of(fn, xp, x, saved.axis)
    kernels = _fast.kernels_for("backward", xp, x, dy)
    whole = getattr(kernels, "backward_whole", None)  # small inputs: one compiled call, proven equal
    if whole is not None and (done := whole(xp, dy, saved, layout)) is not None:
        return done
    dtype = kernels.coefficient_dtype(xp, x)
    pivot = saved.mean if saved.pivot is None else saved.pivot
    # reductions: sum(dy) where dbias or the batch statistics need it, sum(dy * (x - pivot))
    # where dweight or the batch statistics do
    need_dot = saved.batch_stats or saved.weight is not None
    sums = None
    if need_dot or saved.has_bias:
        sums = kernels.grad_sums(xp, x, dy, layout, pivot if need_dot else None)
    # coefficients
    coef = backward_coefficients(xp, saved, sums, dtype)
    # apply
    dx = kernels.grad_apply(xp, x, dy, layout, pivot, coef.a, coef.b, coef.k,
                            scratch=None if sums is None else sums.scratch)
    return dx, coef.dweight, coef.dbias


def update_running_stats(
    running_mean: Array,
    running_var: Array,
    saved: BatchNormSaved,
    *,
    momentum: float | None = 0.1,
    num_batches_tracked: int = 1,
) -> tuple[Array, Array]:
    """PyTorch's running-statistics update after a training forward pass.

    running = (1 - factor) * running + factor * batch, with the batch mean and the
    *unbiased* batch variance (m / (m - 1) times the biased one), factor = ``momentum``, or
    1 / ``num_batches_tracked`` when ``momentum`` is None (the cumulative average).

    Parameters
    ----------
    running_mean, running_var : array, shape (C,)
        The current running statistics, of a real floating dtype, in the namespace of
        ``saved.x``. They are not modified.
    saved : BatchNormSaved
        From :func:`batch_norm_train` (batch statistics).
    momentum : float in [0, 1] or None, default 0.1
        Weight of the new batch.
    num_batches_tracked : int, default 1
        Batches tracked *including* this one (PyTorch increments its counter first); used
        only when ``momentum`` is None.

    Returns
    -------
    mean, var : array, shape (C,)
        New arrays, in the dtype of ``running_mean`` and ``running_var``.
    """
    fn = "update_running_stats"
    from ._checks import check_momentum

    if not isinstance(saved, BatchNormSaved) or not saved.batch_stats:
        raise TypeError(
            f"{fn}: saved must be the BatchNormSaved of a training forward pass (batch_norm_train), "
            f"got {type(saved).__name__}" + ("" if not isinstance(saved, BatchNormSaved) else " of fixed statistics")
        )
    momentum = check_momentum(fn, momentum)
    xp = namespace_of(fn, running_mean=running_mean, running_var=running_var, mean=saved.mean)
    c = saved.mean.shape[0]
    for name, v in (("running_mean", running_mean), ("running_var", running_var)):
        check_feature_vector(fn, name, xp, v, c, axis=saved.axis, shape=tuple(saved.x.shape), required=True)
    if momentum is None:
        n = check_real(fn, "num_batches_tracked", num_batches_tracked, "an int >= 1")
        if n != int(n) or n < 1:
            raise ValueError(f"{fn}: num_batches_tracked must be an int >= 1, got {num_batches_tracked!r}")
        factor = 1.0 / n
    else:
        factor = momentum
    m = saved.count
    mean = _as(xp, saved.mean, running_mean.dtype)
    unbiased_var = _as(xp, saved.var * (m / (m - 1)), running_var.dtype)
    # new arrays, not in-place updates: a state_dict handed out earlier stays as it was
    return (
        (1.0 - factor) * running_mean + factor * mean,
        (1.0 - factor) * running_var + factor * unbiased_var,
    )


def _as(xp: Namespace, a: Array, dtype: Any) -> Array:
    return a if a.dtype == dtype else xp.astype(a, dtype)
