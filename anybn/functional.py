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

import math
from typing import Any

from . import _fast
from ._checks import check_eps, check_feature_vector, check_floating, check_real
from ._kernels import ACTIVATIONS, GENERIC, Activation, Kernels
from ._layout import Layout, layout_of, plain_numpy_layout
from ._moments import GradSums, Sums
from ._namespace import NDARRAY, Array, Namespace, compute_dtype, device_of, namespace_of, numpy_namespace
from ._saved import BatchNormSaved
from ._steps import (
    Applied,
    Stats,
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
    if type(eps) is float and 0.0 < eps < math.inf:  # plain NumPy arrays: the short checks
        layout = plain_numpy_layout(x, axis, vectors, required)
        if layout is not None:
            return numpy_namespace(), layout, eps
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
    virtual_batch_size: int | None = None,
    comm: Any = None,
    activation: str | None = None,
    residual: Array | None = None,
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
    virtual_batch_size : int, optional
        Ghost batch normalization (Hoffer et al. 2017): consecutive chunks of this many
        samples along axis 0 are normalized with their own statistics, so y equals batch
        normalization applied to each chunk separately. It must divide ``x.shape[0]``, and
        the feature axis must not be axis 0. None (the default): the whole batch.
    comm : anybn.distributed.Communicator, optional
        Synchronized batch normalization: ``x`` is this rank's slice of a global batch
        (any size, even empty), and y is normalized with the statistics of the global batch
        (every rank's values), merged exactly (Chan's formula, in float64 where the backend
        has it). Two collectives: a small header, then the (C,)-sized moments. An input
        error on any rank raises on every rank, naming the rank. Backward all-reduces
        through ``saved.comm``. None (the default): the statistics of ``x`` alone.
    activation : {None, "relu", "sigmoid"}, default None
        Fused activation: y = act(BN(x) [+ residual]) comes out of the same pass, and
        backward applies act' on the fly (neither BN(x) nor a mask is stored). The ReLU is
        PyTorch's: 0 where the pre-activation is <= 0 (-inf too), NaN stays NaN, and its
        gradient is 0 there even for a NaN incoming gradient.
    residual : array, same shape as ``x``, optional
        Added after the normalization, before the activation: ResNet's BN-add-ReLU. Then
        :func:`batch_norm_backward` returns a fourth value, the residual's gradient.

    Returns
    -------
    y : array, same shape, dtype, namespace and device as ``x``.
    saved : BatchNormSaved
        Input to :func:`batch_norm_backward`: a reference to ``x``, the batch mean, the
        biased variance and ``invstd`` of shape (C,), in float32 for float16/bfloat16 ``x``.
        With ``virtual_batch_size``, the chunks' mean of means and mean of variances, and
        each chunk's own state in ``saved.groups``.

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
    plain = comm is None and virtual_batch_size is None and activation is None and residual is None
    route = _fast.express("train_express") if plain else None  # plain NumPy arrays: one step
    if route is not None and (done := route(x, weight, bias, axis, eps)) is not None:
        return done  # type: ignore[no-any-return]
    fn = "batch_norm_train"
    fused = activation is not None or residual is not None
    if fused:
        _check_activation(fn, activation)
        if comm is not None or virtual_batch_size is not None:
            raise ValueError(
                f"{fn}: activation= and residual= are not available with "
                f"{'comm' if comm is not None else 'virtual_batch_size'}= yet; apply the activation after"
            )
    if comm is not None:
        if virtual_batch_size is not None:
            raise ValueError(f"{fn}: comm and virtual_batch_size cannot be combined (got both)")
        return _train_synchronized(fn, x, weight, bias, axis, eps, comm)
    xp, layout, eps = _validated(fn, x, axis, eps, weight=weight, bias=bias)
    if virtual_batch_size is not None:
        return _ghost_train(fn, xp, x, layout, weight, bias, eps, virtual_batch_size)
    if layout.per_feature < 2:
        raise ValueError(
            f"{fn}: expected more than 1 value per feature when training, got x.shape = "
            f"{layout.shape} ({layout.per_feature} value(s) per feature along axis {layout.axis})"
        )
    if residual is not None:
        _check_residual(fn, xp, x, residual)
        kernels = _fast.kernels_for("train", xp, *_large(x, residual))
        return _train_stages(xp, x, layout, kernels, weight, bias, eps, activation, residual)
    return _train_plain(xp, x, layout, _fast.kernels_for("train", xp, x), weight, bias, eps, activation)


def _train_plain(
    xp: Namespace, x: Array, layout: Layout, kernels: Kernels, weight: Array | None, bias: Array | None,
    eps: float, activation: str | None = None,
) -> tuple[Array, BatchNormSaved]:
    """Batch normalization's training forward, fused with ``activation`` but no residual: a
    fast path's whole step in one compiled call where it has one (proven equal to the
    stages), else the stages."""
    whole = getattr(kernels, "train_whole", None)
    if whole is not None:
        done = whole(xp, x, layout, weight, bias, eps, activation=activation)
        if done is not None:
            return done
    return _train_stages(xp, x, layout, kernels, weight, bias, eps, activation)


def _train_stages(
    xp: Namespace, x: Array, layout: Layout, kernels: Kernels, weight: Array | None, bias: Array | None,
    eps: float, activation: str | None = None, residual: Array | None = None,
) -> tuple[Array, BatchNormSaved]:
    """The training forward as its three stages, on validated arguments."""
    # reductions
    sums = kernels.moments(xp, x, layout)
    # coefficients
    stats = stats_from_sums(xp, sums)
    coef = train_coefficients(xp, stats, weight, bias, eps)
    # apply
    if activation is None and residual is None:
        y = kernels.apply(xp, x, layout, coef.pivot, coef.scale, coef.shift, scratch=sums.scratch)
        return y, _batch_saved(xp, x, layout, stats, coef, weight, bias, eps)
    y = kernels.apply(xp, x, layout, coef.pivot, coef.scale, coef.shift, scratch=sums.scratch,
                      activation=activation, residual=residual)
    saved = _batch_saved(xp, x, layout, stats, coef, weight, bias, eps)
    saved.act = Activation(activation, coef.pivot, coef.scale, coef.shift, residual)
    return y, saved


def _batch_saved(
    xp: Namespace, x: Array, layout: Layout, stats: Stats, coef: Applied, weight: Array | None,
    bias: Array | None, eps: float,
) -> BatchNormSaved:
    """What backward needs from a training forward with batch statistics."""
    cdt = compute_dtype(xp, x.dtype)
    return BatchNormSaved(
        x=x,
        mean=_as(xp, stats.pivot + stats.delta, cdt),
        invstd=_as(xp, coef.invstd, cdt),
        var=_saturated(xp, stats.var, cdt),
        weight=weight,
        has_bias=bias is not None,
        axis=layout.axis,
        eps=eps,
        count=layout.per_feature,
        pivot=_as(xp, stats.pivot, cdt),
        delta=_as(xp, stats.delta, cdt),
        layout=layout,
    )


def _ghost_layout(fn: str, layout: Layout, virtual_batch_size: Any) -> tuple[Layout, int]:
    """The layout of one chunk of ``virtual_batch_size`` samples, and the number of chunks."""
    from ._checks import _integer

    v = _integer(fn, "virtual_batch_size", virtual_batch_size, "a positive int or None")
    n = layout.shape[0]
    if layout.axis == 0:
        raise ValueError(
            f"{fn}: virtual_batch_size needs the batch along axis 0 and the features on another "
            f"axis, got axis=0 (x.shape = {layout.shape})"
        )
    if v < 1 or n % v:
        raise ValueError(
            f"{fn}: virtual_batch_size={v} must be a positive divisor of the batch size "
            f"x.shape[0] = {n} (x.shape = {layout.shape})"
        )
    chunk = layout._replace(shape=(v,) + layout.shape[1:], outer=layout.outer // n * v)
    if chunk.per_feature < 2:
        raise ValueError(
            f"{fn}: expected more than 1 value per feature in each virtual batch when training, got "
            f"virtual_batch_size={v} with x.shape = {layout.shape} ({chunk.per_feature} value(s) per "
            f"feature per virtual batch)"
        )
    return chunk, n // v


def _ghost_train(
    fn: str, xp: Namespace, x: Array, layout: Layout, weight: Array | None, bias: Array | None, eps: float,
    virtual_batch_size: Any,
) -> tuple[Array, BatchNormSaved]:
    """Ghost batch normalization: each chunk of the batch axis with its own statistics.

    Where the features are not innermost (``inner > 1``: NCHW) the reductions and the apply
    are one pass each over x seen as ``outer * C`` planes (:func:`_grouped`): per-plane sums,
    merged per (chunk, feature) in O(outer * C), and per-plane coefficients. Channels-last
    and (N, C) inputs reduce each chunk (a contiguous slice) and apply each chunk, then
    concatenate the chunks.
    """
    chunk, groups = _ghost_layout(fn, layout, virtual_batch_size)
    v = chunk.shape[0]
    kernels = _fast.kernels_for("train", xp, x)  # a C-contiguous x has C-contiguous chunks
    if groups == 1:  # one chunk: the whole batch
        return _train_plain(xp, x, layout, kernels, weight, bias, eps)
    if layout.inner > 1:
        grouped = _grouped(layout, groups)
        # reductions: per plane, merged per (chunk, feature)
        planes = kernels.moments(xp, x, grouped)
        sums = _merge_planes(xp, planes, layout, groups)
        # coefficients, (G, C)
        stats = stats_from_sums(xp, sums)
        coef = train_coefficients(xp, stats, weight, bias, eps)
        # apply: centered on each plane's own pivot (the reductions' scratch is x minus it)
        scale = _expand(xp, coef.scale, layout, groups)
        shift = _expand(xp, coef.shift, layout, groups) + (planes.pivot - _expand(xp, coef.pivot, layout, groups)) * scale
        y = kernels.apply(xp, x, grouped, planes.pivot, scale, shift, scratch=planes.scratch)
        table = _batch_saved(xp, x, chunk, stats, coef, weight, bias, eps)  # (G, C) statistics, cast once
        assert table.pivot is not None and table.delta is not None
        saves = [
            BatchNormSaved(x=x[g * v : (g + 1) * v, ...], mean=table.mean[g, :], invstd=table.invstd[g, :],
                           var=table.var[g, :], weight=weight, has_bias=bias is not None, axis=layout.axis,
                           eps=eps, count=chunk.per_feature, pivot=table.pivot[g, :], delta=table.delta[g, :],
                           layout=chunk)
            for g in range(groups)
        ]
    else:
        ys, saves = [], []
        # a path that writes into slices takes each chunk's y straight into its rows: no concat
        into = xp.empty_like(x) if getattr(kernels, "writes_out", False) else None
        for g in range(groups):
            xg = x[g * v : (g + 1) * v, ...]
            # reductions
            chunk_sums = kernels.moments(xp, xg, chunk)
            # coefficients
            chunk_stats = stats_from_sums(xp, chunk_sums)
            c = train_coefficients(xp, chunk_stats, weight, bias, eps)
            # apply
            if into is not None:
                kernels.apply(xp, xg, chunk, c.pivot, c.scale, c.shift, out=into[g * v : (g + 1) * v, ...])
            else:
                ys.append(kernels.apply(xp, xg, chunk, c.pivot, c.scale, c.shift, scratch=chunk_sums.scratch))
            saves.append(_batch_saved(xp, xg, chunk, chunk_stats, c, weight, bias, eps))
        y = into if into is not None else (xp.concat(ys, axis=0) if groups > 1 else ys[0])
    mean, var = saves[0].mean, saves[0].var
    for part in saves[1:]:
        mean, var = mean + part.mean, var + part.var
    mean, var = mean / groups, var / groups
    saved = BatchNormSaved(
        x=x,
        mean=mean,
        invstd=1.0 / xp.sqrt(var + eps),
        var=var,
        weight=weight,
        has_bias=bias is not None,
        axis=layout.axis,
        eps=eps,
        count=chunk.per_feature,
        layout=layout,
        groups=tuple(saves),
    )
    return y, saved


def _merge_planes(xp: Namespace, planes: Sums, layout: Layout, groups: int) -> Sums:
    """Per-plane shifted sums merged into per-(chunk, feature) ones, shape (G, C).

    Each chunk's sums are re-centered on its first plane's pivot p: with e = pivot - p,
    sum(x - p) = s1 + n e and sum((x - p)**2) = s2 + 2 e s1 + n e**2 over each plane's n
    values. e is a difference of two samples of the chunk: small against its spread.
    """
    shape = (groups, layout.outer // groups, layout.features)
    n = planes.count
    pivot = xp.reshape(planes.pivot, shape)
    s1, s2 = xp.reshape(planes.s1, shape), xp.reshape(planes.s2, shape)
    p = pivot[:, 0, :]
    e = pivot - xp.reshape(p, (groups, 1, layout.features))
    return Sums(n * shape[1], p, xp.sum(s1 + n * e, axis=1), xp.sum(s2 + (2.0 * s1 + n * e) * e, axis=1))


def _grouped(layout: Layout, groups: int) -> Layout:
    """x of ``layout`` (inner > 1) seen as one sample of ``outer * C`` features.

    Each (outer slice, feature) plane gets coefficients of its own, so one apply pass
    serves every chunk: the chunks' (C,) coefficients, repeated over the chunk's slices.
    """
    return layout._replace(outer=1, features=layout.outer * layout.features)


def _expand(xp: Namespace, table: Array, layout: Layout, groups: int) -> Array:
    """A (G, C) table of the chunks' coefficients as one (outer * C,) vector for :func:`_grouped`."""
    table = xp.reshape(table, (groups, 1, layout.features))
    table = xp.broadcast_to(table, (groups, layout.outer // groups, layout.features))
    return xp.reshape(table, (layout.outer * layout.features,))


def batch_norm_fixed(
    x: Array,
    mean: Array,
    var: Array,
    weight: Array | None = None,
    bias: Array | None = None,
    *,
    axis: int = 1,
    eps: float = 1e-5,
    activation: str | None = None,
    residual: Array | None = None,
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
    activation : {None, "relu", "sigmoid"}, default None
        Fused activation, as in :func:`batch_norm_train`.
    residual : array, same shape as ``x``, optional
        Added before the activation, as in :func:`batch_norm_train`.

    Returns
    -------
    y : array, same shape, dtype, namespace and device as ``x``.
    saved : BatchNormSaved
        With ``batch_stats=False``; ``mean``, ``var`` and ``invstd`` in the compute dtype.
    """
    y, saved = _fixed("batch_norm_fixed", x, mean, var, weight, bias, axis=axis, eps=eps,
                      activation=activation, residual=residual)
    assert saved is not None
    return y, saved


def _fixed(
    fn: str, x: Array, mean: Array, var: Array, weight: Array | None, bias: Array | None, *, axis: Any,
    eps: Any, keep: bool = True, activation: str | None = None, residual: Array | None = None,
) -> tuple[Array, BatchNormSaved | None]:
    """:func:`batch_norm_fixed` under the name ``fn``; ``keep=False`` skips ``saved`` (inference)."""
    fused = activation is not None or residual is not None
    if fused:
        _check_activation(fn, activation)
    xp, layout, eps = _validated(fn, x, axis, eps, ("mean", "var"), mean=mean, var=var, weight=weight,
                                 bias=bias)
    if fused:
        _check_residual(fn, xp, x, residual)
    kernels = _fast.kernels_for("eval", xp, *_large(x, residual)) if fused else _fast.kernels_for("eval", xp, x)
    # one compiled call, proven equal; with an activation only for inference (backward would
    # recompute z from the coefficients below, which must be those that made y)
    whole = getattr(kernels, "eval_whole", None) if not fused or (residual is None and not keep) else None
    y = None if whole is None else whole(xp, x, layout, mean, var, weight, bias, eps, activation=activation)
    if y is not None and not keep:
        return y, None
    # no reductions: the statistics are given
    coef = fixed_coefficients(xp, mean, var, weight, bias, eps, kernels.coefficient_dtype(xp, x),
                              centering_is_free=kernels.centering_is_free, lazy=is_lazy(x))
    if y is None:
        y = kernels.apply(xp, x, layout, coef.pivot, coef.scale, coef.shift, activation=activation,
                          residual=residual)

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
        act=Activation(activation, coef.pivot, coef.scale, coef.shift, residual) if fused else None,
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
    activation: str | None = None,
    residual: Array | None = None,
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
    activation : {None, "relu", "sigmoid"}, default None
        Fused activation, as in :func:`batch_norm_train`.
    residual : array, same shape as ``x``, optional
        Added before the activation, as in :func:`batch_norm_train`.

    Returns
    -------
    y : array, same shape, dtype, namespace and device as ``x``.
    """
    route = _fast.express("eval_express") if activation is None and residual is None else None
    if route is not None and (y := route(x, mean, var, weight, bias, axis, eps)) is not None:
        return y  # plain NumPy arrays: one step
    y, _ = _fixed("batch_norm_eval", x, mean, var, weight, bias, axis=axis, eps=eps, keep=False,
                  activation=activation, residual=residual)
    return y


def batch_norm_backward(dy: Array, saved: BatchNormSaved) -> tuple[Array, ...]:
    """Gradients of batch normalization, from the output gradient and the saved forward state.

    With x-hat = (x - mean) * invstd recomputed from ``saved.x`` and m values per feature:

    - training (batch statistics):
      dx = weight * invstd * (dy - mean(dy) - x-hat * mean(dy * x-hat));
    - fixed statistics (inference, frozen): dx = weight * invstd * dy;

    dweight = sum(dy * x-hat) and dbias = sum(dy), summed over all axes but the feature axis.
    After a fused activation (``activation=``), ``dy`` is the gradient of the activation's
    output z, and dy * act'(z) takes its place, recomputed from x on the fly.

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
    dresidual : array, same shape and dtype as the residual
        Only when the forward pass was given ``residual=``: a fourth value.
    """
    route = _fast.express("backward_express")  # plain NumPy arrays: one step
    if route is not None and (done := route(dy, saved)) is not None:
        return done  # type: ignore[no-any-return]
    fn = "batch_norm_backward"
    if not isinstance(saved, BatchNormSaved):
        raise TypeError(
            f"{fn}: saved must be the BatchNormSaved returned by batch_norm_train, "
            f"got {type(saved).__name__}"
        )
    if saved.comm is not None:
        return _backward_synchronized(fn, dy, saved)
    x = saved.x
    xp = _checked_grad(fn, dy, x)
    layout = saved.layout if saved.layout is not None else layout_of(fn, xp, x, saved.axis)
    act = saved.act
    if act is not None and (act.residual is not None or saved.r is not None or saved.groups is not None):
        kernels = _fast.kernels_for("backward", xp, x, dy, *_large(act.residual))
        return _backward_stages(xp, x, dy, saved, layout, kernels)
    kernels = _fast.kernels_for("backward", xp, x, dy)
    if saved.groups is not None:
        return _ghost_backward(xp, dy, saved, kernels)
    # one compiled call where a fast path has it, proven equal (plain batch normalization,
    # fused with an activation or not)
    whole = getattr(kernels, "backward_whole", None) if saved.r is None else None
    if whole is not None and (done := whole(xp, dy, saved, layout)) is not None:
        return done
    return _backward_stages(xp, x, dy, saved, layout, kernels)


def _checked_grad(fn: str, dy: Array, x: Array) -> Namespace:
    """The namespace of ``dy``, checked against the forward input ``x``."""
    if type(dy) is type(x) is NDARRAY and dy.dtype.kind == "f" and dy.shape == x.shape:
        return numpy_namespace()  # plain NumPy: the short checks (see plain_numpy_layout)
    if dy is None:
        raise TypeError(f"{fn}: dy must be an array of the shape of the forward input, got None")
    xp = namespace_of(fn, dy=dy, x=x)
    check_floating(fn, "dy", xp, dy)
    if tuple(dy.shape) != tuple(x.shape):
        raise ValueError(
            f"{fn}: dy has shape {tuple(dy.shape)}, expected {tuple(x.shape)} = the shape of "
            f"the forward input"
        )
    return xp


def _backward_stages(
    xp: Namespace, x: Array, dy: Array, saved: BatchNormSaved, layout: Layout, kernels: Kernels
) -> tuple[Array, ...]:
    """The backward as its three stages, on validated arguments."""
    dtype = kernels.coefficient_dtype(xp, x)
    pivot = saved.mean if saved.pivot is None else saved.pivot
    # reductions: sum(dy) where dbias or the batch statistics need it, sum(dy * (x - pivot))
    # where dweight or the batch statistics do
    need_dot = saved.batch_stats or saved.weight is not None
    sums = None
    act = saved.act
    if act is None:
        if need_dot or saved.has_bias:
            sums = kernels.grad_sums(xp, x, dy, layout, pivot if need_dot else None)
    elif need_dot or saved.has_bias:
        sums = kernels.grad_sums(xp, x, dy, layout, pivot if need_dot else None, act=act)
    # coefficients
    coef = backward_coefficients(xp, saved, sums, dtype)
    # apply
    scratch = None if sums is None else sums.scratch
    if act is None:
        dx = kernels.grad_apply(xp, x, dy, layout, pivot, coef.a, coef.b, coef.k, scratch=scratch)
        return dx, coef.dweight, coef.dbias
    out = kernels.grad_apply(xp, x, dy, layout, pivot, coef.a, coef.b, coef.k, scratch=scratch, act=act)
    if act.residual is None:
        return out, coef.dweight, coef.dbias
    dx, dres = out
    return dx, coef.dweight, coef.dbias, dres


def _ghost_backward(
    xp: Namespace, dy: Array, saved: BatchNormSaved, kernels: Kernels
) -> tuple[Array, Array | None, Array | None]:
    """Each chunk's backward, with the grouping of :func:`_ghost_train`.

    ``inner > 1``: one reduction pass over the ``outer * C`` planes (summed per chunk and
    feature), the coefficients per chunk, one apply pass. Otherwise chunk by chunk. The
    parameter gradients are the sums of the chunks'.
    """
    assert saved.groups is not None and saved.layout is not None
    layout, groups, x = saved.layout, len(saved.groups), saved.x
    dtype = kernels.coefficient_dtype(xp, x)
    v = saved.groups[0].x.shape[0]
    parts = saved.groups
    if layout.inner > 1:
        grouped = _grouped(layout, groups)
        pivot = _expand(xp, xp.stack([_as(xp, part.pivot, dtype) for part in parts]), layout, groups)
        # reductions: per plane, summed per (chunk, feature)
        planes = kernels.grad_sums(xp, x, dy, grouped, pivot)
        shape = (groups, layout.outer // groups, layout.features)
        sum_dy = xp.sum(xp.reshape(planes.sum_dy, shape), axis=1)
        sum_dy_d = xp.sum(xp.reshape(planes.sum_dy_d, shape), axis=1)
        # coefficients, per chunk
        coefs = [backward_coefficients(xp, part, GradSums(sum_dy[g, :], sum_dy_d[g, :]), dtype)
                 for g, part in enumerate(parts)]
        # apply
        a, b, k = (_expand(xp, xp.stack([getattr(c, f) for c in coefs]), layout, groups) for f in ("a", "b", "k"))
        dx = kernels.grad_apply(xp, x, dy, grouped, pivot, a, b, k, scratch=planes.scratch)
    else:
        dxs, coefs = [], []
        into = xp.empty_like(x) if getattr(kernels, "writes_out", False) else None
        for g, part in enumerate(parts):
            assert part.layout is not None
            dyg = dy[g * v : (g + 1) * v, ...]
            # reductions
            sums = kernels.grad_sums(xp, part.x, dyg, part.layout, part.pivot)
            # coefficients
            c = backward_coefficients(xp, part, sums, dtype)
            coefs.append(c)
            # apply
            if into is not None:  # each chunk's dx straight into its rows
                kernels.grad_apply(xp, part.x, dyg, part.layout, part.pivot, c.a, c.b, c.k,
                                   out=into[g * v : (g + 1) * v, ...])
            else:
                dxs.append(kernels.grad_apply(xp, part.x, dyg, part.layout, part.pivot, c.a, c.b, c.k,
                                              scratch=sums.scratch))
        dx = into if into is not None else (xp.concat(dxs, axis=0) if groups > 1 else dxs[0])
    dweight, dbias = coefs[0].dweight, coefs[0].dbias
    for c in coefs[1:]:
        dweight = None if dweight is None else dweight + c.dweight
        dbias = None if dbias is None else dbias + c.dbias
    return dx, dweight, dbias


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


def _train_synchronized(
    fn: str, x: Array, weight: Array | None, bias: Array | None, axis: Any, eps: Any, comm: Any,
    error: Exception | None = None,
) -> tuple[Array, BatchNormSaved]:
    """The training forward over the global batch: reductions -> collectives -> coefficients -> apply.

    A local check that fails (or ``error``, from the caller's own checks) does not raise
    here before the header collective: the rank joins it with a not-ok flag, and every rank
    raises together.
    """
    from .distributed import _sync

    xp = layout = None
    if error is None:
        try:
            xp, layout, eps = _validated(fn, x, axis, eps, weight=weight, bias=bias)
        except (TypeError, ValueError) as e:
            error = e
    if error is None:
        assert layout is not None
        device = device_of(x)
        assert xp is not None
        kernels = _fast.kernels_for("train", xp, x)  # never its whole-step shortcut: it skips the stages
        dtype = kernels.coefficient_dtype(xp, x)
        bits = xp.finfo(_sync.payload_dtype(xp, device, dtype)).bits
        header = _sync.header_of(None, layout.per_feature, layout.features, bits)
    else:
        header = _sync.header_of(error, 0, -1, -1)
    counts = _sync.exchange_header(fn, comm, header, error)  # raises on every rank on any error
    assert xp is not None and layout is not None
    # reductions (none on an empty slice)
    n = layout.per_feature
    sums = kernels.moments(xp, x, layout) if n > 0 else None
    # collective, then coefficients: global statistics around this rank's pivot
    merged = _sync.merge_forward(comm, xp, sums, counts, layout.features, dtype, device)
    stats = Stats(merged.count, merged.pivot, merged.delta, merged.var)
    coef = train_coefficients(xp, stats, weight, bias, eps)
    # apply
    if n > 0:
        assert sums is not None
        y = kernels.apply(xp, x, layout, coef.pivot, coef.scale, coef.shift, scratch=sums.scratch)
    else:
        y = xp.zeros(layout.shape, dtype=x.dtype, device=device)

    cdt = compute_dtype(xp, x.dtype)
    saved = BatchNormSaved(
        x=x,
        mean=_as(xp, merged.mean, cdt),  # bitwise the same on every rank: so are running stats
        invstd=_as(xp, coef.invstd, cdt),
        var=_as(xp, merged.var, cdt),
        weight=weight,
        has_bias=bias is not None,
        axis=layout.axis,
        eps=eps,
        count=merged.count,
        pivot=_as(xp, merged.pivot, cdt),
        delta=_as(xp, merged.delta, cdt),
        layout=layout,
        comm=comm,
    )
    return y, saved


def _backward_synchronized(
    fn: str, dy: Array, saved: BatchNormSaved
) -> tuple[Array, Array | None, Array | None]:
    """The backward over the global batch: one all-reduce of the two sums (and an error flag).

    dx uses the global sums; dweight and dbias are this rank's own contribution (their sum
    over ranks is the global gradient, as in PyTorch's SyncBatchNorm).
    """
    from dataclasses import replace

    from ._moments import GradSums
    from .distributed import _sync

    x = saved.x
    xp = namespace_of(fn, x=x)
    error = None
    try:
        xp = _checked_grad(fn, dy, x)
    except (TypeError, ValueError) as e:
        error = e
    layout = saved.layout if saved.layout is not None else layout_of(fn, xp, x, saved.axis)
    device = device_of(x)
    n = layout.per_feature
    kernels = _fast.kernels_for("backward", xp, x, dy) if error is None and n > 0 else GENERIC
    dtype = kernels.coefficient_dtype(xp, x)
    assert saved.pivot is not None and saved.delta is not None
    pivot = _as(xp, saved.pivot, dtype)
    # reductions (zeros on an empty slice or after a failed check)
    if error is None and n > 0:
        local = kernels.grad_sums(xp, x, dy, layout, pivot)
    else:
        zeros = xp.zeros(layout.features, dtype=dtype, device=device)
        local = GradSums(zeros, zeros)
    # collective, then coefficients: dx from the global sums, dweight/dbias from this rank's
    total = _sync.reduce_backward(fn, saved.comm, xp, local, _as(xp, saved.delta, dtype), error, dtype,
                                  device)
    coef = backward_coefficients(xp, saved, total, dtype)
    own = backward_coefficients(xp, replace(saved, batch_stats=False), GradSums(local.sum_dy, local.sum_dy_d),
                                dtype)
    # apply
    if n > 0:
        dx = kernels.grad_apply(xp, x, dy, layout, pivot, coef.a, coef.b, coef.k, scratch=local.scratch)
    else:
        dx = xp.zeros(layout.shape, dtype=x.dtype, device=device)
    return dx, own.dweight, own.dbias


def _as(xp: Namespace, a: Array, dtype: Any) -> Array:
    return a if a.dtype == dtype else xp.astype(a, dtype)


def _saturated(xp: Namespace, a: Array, dtype: Any) -> Array:
    """``a`` in ``dtype``, values past its range as inf: a variance of float32 values near
    3e38, summed in float64, does not fit float32 (the cast would warn of overflow)."""
    if a.dtype == dtype:
        return a
    if xp.finfo(a.dtype).max > xp.finfo(dtype).max:
        a = xp.where(xp.abs(a) > xp.finfo(dtype).max, a * float("inf"), a)
    return xp.astype(a, dtype)


def _check_activation(fn: str, activation: Any) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(
            f"{fn}: activation must be one of {list(ACTIVATIONS)}, got {activation!r}"
        )


def _check_residual(fn: str, xp: Namespace, x: Array, residual: Array | None) -> None:
    """``residual`` must be None or an array of x's library, device and shape."""
    if residual is None:
        return
    namespace_of(fn, x=x, residual=residual)
    check_floating(fn, "residual", xp, residual)
    if tuple(residual.shape) != tuple(x.shape):
        raise ValueError(
            f"{fn}: residual has shape {tuple(residual.shape)}, expected {tuple(x.shape)} = the shape of x"
        )


def _large(*arrays: Array | None) -> tuple[Array, ...]:
    """The arrays the size of x a fast path must serve (None left out)."""
    return tuple(a for a in arrays if a is not None)
