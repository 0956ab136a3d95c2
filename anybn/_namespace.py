"""Namespaces, devices and dtypes of the inputs, and the dtypes statistics are computed in.

Everything here works on array-API namespaces obtained through ``array_api_compat``
(``array_namespace(x)``, never ``x.__array_namespace__()``, which CuPy 14 lacks); no array
library is imported.
"""

from __future__ import annotations

from typing import Any, NoReturn

import array_api_compat
import numpy  # a hard dependency, and the default backend

Array = Any
Namespace = Any

__all__ = [
    "NDARRAY",
    "Array",
    "Namespace",
    "accumulation_dtype",
    "compute_dtype",
    "describe",
    "device_of",
    "library_name",
    "namespace_from_module",
    "namespace_of",
    "numpy_namespace",
]


def describe(a: Any) -> str:
    """Short name of an object's library, for error messages (``numpy``, ``torch``, ``list``)."""
    module = type(a).__module__.split(".")[0]
    return {"builtins": type(a).__name__}.get(module, module)


def library_name(xp: Namespace) -> str:
    """``numpy`` for ``array_api_compat.numpy``: the name a user knows the library by."""
    return xp.__name__.removeprefix("array_api_compat.")


def device_of(a: Array) -> Any:
    """The device of ``a``, or None where it is unknown (a JAX array traced under ``jit``)."""
    try:
        return array_api_compat.device(a)
    except Exception:  # tracers of some JAX versions raise instead of answering
        return None


def namespace_of(fn: str, **arrays: Array | None) -> Namespace:
    """The array-API namespace shared by all non-None ``arrays``, checking devices agree.

    The first keyword names the reference array (``x``); errors name the offending argument.
    An array whose device is unknown (JAX tracers under ``jit`` report none) is not compared:
    JAX itself places what a traced function captures.
    """
    present = [(name, a) for name, a in arrays.items() if a is not None]
    # plain NumPy arrays, the common case: skip array_namespace's general search (~4 us)
    if present and all(type(a) is _ndarray for _, a in present):
        return numpy_namespace()
    try:
        xp = array_api_compat.array_namespace(*(a for _, a in present))
    except TypeError:
        _raise_mixed(fn, present)
    # NumPy and Dask arrays all live on the one CPU device: nothing to compare
    if len(present) > 1 and not _single_device(xp):
        (ref_name, ref), *others = present
        ref_device = device_of(ref)
        if ref_device is None:
            return xp
        for name, a in others:
            device = device_of(a)
            if device is not None and device != ref_device:
                raise ValueError(
                    f"{fn}: {name} is on device {device!r}, expected the device of {ref_name} "
                    f"({ref_device!r})"
                )
    return xp


_ndarray = numpy.ndarray
#: ``numpy.ndarray``: inputs of exactly this type (no subclass) take the short checks.
NDARRAY = _ndarray
_NUMPY: list[Namespace] = []


def numpy_namespace() -> Namespace:
    """array-api-compat's NumPy namespace, as ``array_namespace`` returns it for ndarrays."""
    if not _NUMPY:
        _NUMPY.append(array_api_compat.array_namespace(numpy.empty(0)))
    return _NUMPY[0]


def _single_device(xp: Namespace) -> bool:
    return array_api_compat.is_numpy_namespace(xp) or array_api_compat.is_dask_namespace(xp)


def _raise_mixed(fn: str, present: list[tuple[str, Any]]) -> NoReturn:
    """Name the first argument that is not an array of the reference array's library."""
    if not present:
        raise TypeError(f"{fn}: expected an array, got None")
    (ref_name, ref), *others = present
    try:
        xp = array_api_compat.array_namespace(ref)
    except TypeError:
        raise TypeError(
            f"{fn}: {ref_name} must be an array of an array-API library "
            f"(numpy, cupy, torch, jax, dask, array_api_strict, ...), got {type(ref).__name__}"
        ) from None
    for name, a in others:
        try:
            same = array_api_compat.array_namespace(a) is xp
        except TypeError:
            same = False
        if not same:
            raise TypeError(
                f"{fn}: {name} is a {describe(a)} {type(a).__name__}, expected an array of the "
                f"same library as {ref_name} ({describe(ref)})"
            ) from None
    raise TypeError(f"{fn}: the arrays {[n for n, _ in present]} mix array libraries")


def namespace_from_module(module: Any) -> Namespace:
    """The array-API compatible namespace for a library module (numpy, torch, cupy, ...)."""
    if module is None:
        import numpy  # the default backend, and a hard dependency

        module = numpy
    try:
        return array_api_compat.array_namespace(module.zeros(0))
    except (AttributeError, TypeError):
        raise TypeError(
            f"xp must be an array library module such as numpy, cupy, torch or jax.numpy, "
            f"got {module!r}"
        ) from None


def compute_dtype(xp: Namespace, dtype: Any) -> Any:
    """The dtype statistics are computed in: float32 for float16/bfloat16, else ``dtype``."""
    # finfo, not ``dtype == xp.float16``: a namespace without float16 would compare to None
    return xp.float32 if xp.finfo(dtype).bits < 32 else dtype


def accumulation_dtype(xp: Namespace, device: Any, dtype: Any) -> Any:
    """The widest real floating dtype ``xp`` offers on ``device`` (float64 unless disabled)."""
    try:
        available = xp.__array_namespace_info__().dtypes(device=device, kind="real floating")
    except Exception:  # a namespace without the inspection API: keep what we have
        return dtype
    return available.get("float64", dtype)


def portable(xp: Namespace | None, device: Any) -> tuple[str | None, Any]:
    """A picklable stand-in for a namespace and a device: the module's name, and the device
    itself, or for JAX (whose devices do not pickle) its platform and id."""
    if xp is None:
        return None, device
    if array_api_compat.is_jax_namespace(xp) and device is not None and hasattr(device, "platform"):
        device = ("jax-device", device.platform, device.id)
    return xp.__name__, device


def restore(name: str | None, device: Any) -> tuple[Namespace | None, Any]:
    """The namespace and device that :func:`portable` stood in for, imported again."""
    if name is None:
        return None, device
    import importlib

    xp = importlib.import_module(name)
    if isinstance(device, tuple) and len(device) == 3 and device[0] == "jax-device":
        import jax

        device = next(d for d in jax.devices(device[1]) if d.id == device[2])
    return xp, device


class PortableState:
    """Pickling for objects that hold a namespace module in ``_xp`` and a device in
    ``_device``: neither a module nor a JAX device pickles, their names do."""

    _xp: Namespace
    _device: Any

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_xp"], state["_device"] = portable(self._xp, self._device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        state = dict(state)
        state["_xp"], state["_device"] = restore(state["_xp"], state["_device"])
        self.__dict__.update(state)
