"""Folding an inference-mode batch normalization into the linear or convolution before it.

A layer z = W x + b followed by y = (z - mean) / sqrt(var + eps) * gamma + beta is the one
layer y = W' x + b' with, per output channel o,

    s_o = gamma_o / sqrt(var_o + eps),   W'_o = W_o * s_o,   b'_o = (b_o - mean_o) * s_o + beta_o.

The weights use PyTorch's layouts: linear ``(out, in)``, convolution
``(out, in / groups, *kernel)``, transposed convolution ``(in, out / groups, *kernel)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import array_api_compat

from . import interop
from ._checks import _integer, check_eps
from ._namespace import Array, Namespace, describe, namespace_of

__all__ = ["fold_into_conv", "fold_into_linear"]

_STATS_KEYS = ("running_mean", "running_var")


def fold_into_linear(weight: Array, bias: Array | None, bn: Any) -> tuple[Array, Array]:
    """Fold an inference-mode batch normalization into the linear layer before it.

    Parameters
    ----------
    weight : array, shape (out, in)
        The linear layer's weight (PyTorch's layout), of a real floating dtype, any
        array-API library.
    bias : array of shape (out,), or None
        The linear layer's bias; None for a layer without one.
    bn : BatchNorm or mapping
        An :class:`anybn.BatchNorm` in eval mode (or frozen) with running statistics and
        ``num_features = out``, or its statistics: a mapping with ``running_mean`` and
        ``running_var`` and optionally ``weight``, ``bias`` (gamma, beta) and ``eps``
        (default 1e-5), arrays of any library (a state dict with ``eps`` added).

    Returns
    -------
    weight, bias : array, shapes (out, in) and (out,)
        The folded layer, in the namespace, device and dtype of ``weight``; the arithmetic
        runs in float64 where the backend has it.
    """
    fn = "fold_into_linear"
    xp = _check_weight(fn, weight, bias, min_ndim=2, max_ndim=2)
    return _fold(fn, xp, weight, bias, bn, out_axis=0, groups=1)


def fold_into_conv(
    weight: Array, bias: Array | None, bn: Any, *, transpose: bool = False, groups: int = 1
) -> tuple[Array, Array]:
    """Fold an inference-mode batch normalization into the convolution before it.

    Parameters
    ----------
    weight : array
        The convolution's weight, PyTorch's layout: ``(out, in / groups, *kernel)``, or for
        a transposed convolution (``transpose=True``) ``(in, out / groups, *kernel)``. Any
        array-API library, real floating dtype, 3 to 5 dimensions (1-D to 3-D kernels).
    bias : array of shape (out,), or None
        The convolution's bias; None for a layer without one.
    bn : BatchNorm or mapping
        As for :func:`fold_into_linear`, with ``num_features = out``.
    transpose : bool, default False
        Whether the layer is a transposed convolution.
    groups : int, default 1
        The transposed convolution's groups (out = groups * weight.shape[1]); a regular
        convolution's groups need not be given (its out is weight.shape[0]).

    Returns
    -------
    weight, bias : array, the shape of ``weight`` and (out,)
        The folded layer, in the namespace, device and dtype of ``weight``; the arithmetic
        runs in float64 where the backend has it.
    """
    fn = "fold_into_conv"
    xp = _check_weight(fn, weight, bias, min_ndim=3, max_ndim=5)
    groups = _integer(fn, "groups", groups, "a positive int")
    if groups < 1 or (transpose and weight.shape[0] % groups):
        raise ValueError(
            f"{fn}: groups must be a positive int dividing weight.shape[0] = {weight.shape[0]}, got {groups}"
        )
    if not transpose and groups != 1:
        groups = 1  # a convolution's output channels are weight.shape[0] whatever its groups
    return _fold(fn, xp, weight, bias, bn, out_axis=1 if transpose else 0, groups=groups)


def _check_weight(fn: str, weight: Any, bias: Any, *, min_ndim: int, max_ndim: int) -> Namespace:
    if not array_api_compat.is_array_api_obj(weight):
        raise TypeError(f"{fn}: weight must be an array of an array-API library, got {type(weight).__name__}")
    xp = namespace_of(fn, weight=weight, bias=bias)
    if not xp.isdtype(weight.dtype, "real floating"):
        raise TypeError(f"{fn}: weight must have a real floating dtype, got {weight.dtype}")
    if not min_ndim <= weight.ndim <= max_ndim:
        expected = "2 dimensions (out, in)" if max_ndim == 2 else "3 to 5 dimensions (out, in/groups, *kernel)"
        raise ValueError(f"{fn}: weight must have {expected}, got weight.shape = {tuple(weight.shape)}")
    return xp


def _statistics(fn: str, bn: Any) -> tuple[dict[str, Any], float]:
    """(running_mean, running_var, weight or None, bias or None), eps from a layer or a mapping."""
    from .layer import BatchNorm

    if isinstance(bn, BatchNorm):
        if bn.training and not bn.frozen:
            raise ValueError(
                f"{fn}: bn is in training mode, where it normalizes with batch statistics; "
                "call bn.eval() (or bn.freeze()) to fold its running statistics"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(f"{fn}: bn has track_running_stats=False: no statistics to fold")
        if bn.running_mean.ndim != 1:
            raise ValueError(f"{fn}: bn must have running statistics of shape (C,), got {tuple(bn.running_mean.shape)}")
        return ({"running_mean": bn.running_mean, "running_var": bn.running_var, "weight": bn.weight,
                 "bias": bn.bias}, bn.eps)
    if isinstance(bn, Mapping):
        missing = [k for k in _STATS_KEYS if bn.get(k) is None]
        if missing:
            raise ValueError(f"{fn}: bn is a mapping without {missing}: expected running_mean, running_var "
                             f"and optionally weight, bias, eps; got keys {sorted(bn)}")
        return ({k: bn.get(k) for k in ("running_mean", "running_var", "weight", "bias")},
                check_eps(fn, bn.get("eps", 1e-5)))
    raise TypeError(f"{fn}: bn must be an eval-mode anybn.BatchNorm or a mapping of its statistics, "
                    f"got {type(bn).__name__}")


def _work_dtype(xp: Namespace, a: Array) -> Any:
    """float64 where the backend has it on the device of ``a``, else the dtype of ``a``."""
    try:
        info = xp.__array_namespace_info__()
        dtypes = info.dtypes(device=array_api_compat.device(a), kind="real floating")
    except Exception:  # a namespace without the inspection API
        return a.dtype
    return dtypes.get("float64", a.dtype)


def _fold(
    fn: str, xp: Namespace, weight: Array, bias: Array | None, bn: Any, *, out_axis: int, groups: int
) -> tuple[Array, Array]:
    stats, eps = _statistics(fn, bn)
    out = weight.shape[out_axis] * groups
    c = _features(fn, stats["running_mean"])
    if c != out:
        where = "weight.shape[0]" if out_axis == 0 else f"groups * weight.shape[1] = {groups} * {weight.shape[1]}"
        raise ValueError(
            f"{fn}: bn has num_features = {c}, expected the layer's output channels {where} = {out} "
            f"(weight.shape = {tuple(weight.shape)})"
        )
    if bias is not None and tuple(bias.shape) != (out,):
        raise ValueError(f"{fn}: bias has shape {tuple(bias.shape)}, expected ({out},) = the output channels")
    dtype = _work_dtype(xp, weight)
    device = array_api_compat.device(weight)
    vec = {k: None if v is None else interop.to_namespace(fn, f"bn {k}", v, xp, device, dtype)
           for k, v in stats.items()}
    for k, v in vec.items():
        if v is not None and tuple(v.shape) != (out,):
            raise ValueError(f"{fn}: bn {k} has shape {tuple(v.shape)}, expected ({out},)")
    assert vec["running_var"] is not None and vec["running_mean"] is not None  # required keys
    s = 1.0 / xp.sqrt(vec["running_var"] + eps)
    if vec["weight"] is not None:
        s = vec["weight"] * s
    b = -vec["running_mean"] if bias is None else xp.astype(bias, dtype) - vec["running_mean"]
    b = b * s
    if vec["bias"] is not None:
        b = b + vec["bias"]
    w = xp.astype(weight, dtype) * _per_output(xp, s, weight, out_axis, groups)
    return xp.astype(w, weight.dtype), xp.astype(b, weight.dtype)


def _features(fn: str, running_mean: Any) -> int:
    shape = tuple(getattr(running_mean, "shape", ()))
    if len(shape) != 1:
        raise ValueError(f"{fn}: bn running_mean must have shape (C,), got {describe(running_mean)} of shape {shape}")
    return int(shape[0])


def _per_output(xp: Namespace, s: Array, weight: Array, out_axis: int, groups: int) -> Array:
    """``s`` (out,) shaped to scale ``weight`` along its output channels."""
    rest = (1,) * (weight.ndim - 2)
    if out_axis == 0:
        return xp.reshape(s, (weight.shape[0], 1) + rest)
    # transposed: weight[i, j] feeds output channel (i // (in / groups)) * (out / groups) + j
    n_in, per_group = weight.shape[0], weight.shape[1]
    if groups == 1:
        return xp.reshape(s, (1, per_group) + rest)
    device = array_api_compat.device(s)
    group_of = xp.arange(n_in, device=device) // (n_in // groups)
    index = xp.reshape(group_of * per_group, (n_in, 1)) + xp.reshape(xp.arange(per_group, device=device), (1, per_group))
    scale = xp.reshape(xp.take(s, xp.reshape(index, (-1,)), axis=0), (n_in, per_group))
    return xp.reshape(scale, (n_in, per_group) + rest)
