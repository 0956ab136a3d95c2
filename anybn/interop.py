"""Converting state across libraries: PyTorch state dicts and Keras weights.

The layer (:class:`anybn.BatchNorm`) stays a thin shell: what it loads is converted here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import array_api_compat

from ._namespace import Array, Namespace, describe, library_name

__all__ = ["KERAS_NAMES", "as_count", "keras_state", "keras_weight_names", "to_namespace"]

#: Keras's names of a BatchNormalization layer's weights, in ``get_weights()`` order.
KERAS_NAMES = ("gamma", "beta", "moving_mean", "moving_variance")


def to_namespace(fn: str, key: str, value: Any, xp: Namespace, device: Any, dtype: Any) -> Array:
    """A copy of ``value`` (an array of any library, or a sequence) in ``xp``, on ``device``,
    in the real floating ``dtype``."""
    # tensors that require grad (torch Parameters) refuse export until detached
    detach = getattr(value, "detach", None)
    if callable(detach):
        value = detach()
    out = None
    if array_api_compat.is_array_api_obj(value):
        try:
            same_library = array_api_compat.array_namespace(value) is xp
        except TypeError:
            same_library = False
        if not same_library:
            try:  # across libraries and devices: DLPack, the standard's exchange protocol
                out = xp.from_dlpack(value, device=device, copy=True)
            except Exception:
                out = None
    if out is None:
        try:
            out = xp.asarray(value, device=device, copy=True)
        except Exception:
            raise TypeError(
                f"{fn}: cannot convert {key} ({describe(value)} {type(value).__name__}) to a "
                f"{library_name(xp)} array on {device!r}"
            ) from None
    if not xp.isdtype(out.dtype, "real floating") and not xp.isdtype(out.dtype, "integral"):
        raise TypeError(f"{fn}: {key} must be a real numeric array, got dtype {out.dtype}")
    return xp.astype(out, dtype)


def as_count(fn: str, value: Any) -> int:
    """num_batches_tracked from an int or a 0-d / one-element integer array of any library."""
    try:
        if hasattr(value, "shape") and len(value.shape) > 1:
            raise ValueError
        count = int(value.item() if hasattr(value, "item") else value)
    except (TypeError, ValueError):
        raise ValueError(
            f"{fn}: num_batches_tracked must be a non-negative integer or 0-d integer array, got {value!r}"
        ) from None
    if count < 0:
        raise ValueError(f"{fn}: num_batches_tracked must be >= 0, got {count}")
    return count


def keras_weight_names(fn: str, weights: Mapping[str, Any] | Sequence[Any]) -> dict[str, Any]:
    """Keras weights as a dict by name, from a dict or from ``layer.get_weights()``'s list."""
    if isinstance(weights, Mapping):
        return dict(weights)
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence):
        raise TypeError(
            f"{fn}: weights must be a dict with keys {list(KERAS_NAMES)} or the list from Keras's "
            f"get_weights(), got {type(weights).__name__}"
        )
    values = list(weights)
    if len(values) != 4:
        raise ValueError(
            f"{fn}: a weight list needs 4 arrays in the order {list(KERAS_NAMES)}, "
            f"got {len(values)}; pass a dict for center=False or scale=False"
        )
    return dict(zip(KERAS_NAMES, values))


def keras_state(
    fn: str, weights: Mapping[str, Any], *, affine: bool, track_running_stats: bool, ones: Array,
    zeros: Array,
) -> dict[str, Any]:
    """A PyTorch-named state dict from Keras-named weights (``gamma``/``beta`` optional)."""
    if not isinstance(weights, Mapping):
        raise TypeError(f"{fn}: weights must be a dict with keys {list(KERAS_NAMES)}, got {type(weights).__name__}")
    unknown = sorted(set(weights) - set(KERAS_NAMES))
    if unknown or not {"moving_mean", "moving_variance"} <= set(weights):
        raise ValueError(
            f"{fn}: expected keys {list(KERAS_NAMES)} (gamma and beta optional), got {sorted(weights)}"
        )
    if not affine and ("gamma" in weights or "beta" in weights):
        raise ValueError(f"{fn}: the layer has affine=False but weights hold gamma/beta")
    if not track_running_stats:
        raise ValueError(f"{fn}: the layer has track_running_stats=False: no moving statistics to load")
    state: dict[str, Any] = {
        "running_mean": weights["moving_mean"],
        "running_var": weights["moving_variance"],
        "num_batches_tracked": 0,
    }
    if affine:
        state["weight"] = weights.get("gamma", ones)
        state["bias"] = weights.get("beta", zeros)
    return state
