"""Testing tools for batch norm on any array library: a float64 reference, the backends, ``assert_close``.

Three parts, used by ``python -m anybn check``, the benchmarks (``anybn.bench``), the
demo and the test-suite, and meant for anyone embedding anybn in a library of their own:

- **the float64 reference**, written plainly from the formulas in NumPy float64:
  :func:`reference_moments` (batch mean and biased variance), :func:`reference_train`
  (training-mode forward, batch statistics), :func:`reference_eval` (forward with given
  statistics) and :func:`reference_backward` (``dx``, ``dweight``, ``dbias`` of the
  training-mode forward). They take NumPy arrays (or anything ``np.asarray`` takes) in any
  real dtype and compute in float64; the arguments follow anybn's functional API;
- **the backends**: :data:`BACKENDS` names every array library (and device) anybn is
  tested on; :func:`backend` loads one as a :class:`Backend` (its module and array-API
  namespace, device, float16 / bfloat16 support, whether it is lazy, and the conversions
  from and to NumPy and a synchronization), or raises :class:`Unavailable` with the reason;
  :func:`for_module` builds one for any array-API module and device. No library is
  imported when this module is: each is imported the first time a backend of it is asked
  for;
- :func:`assert_close`, NumPy's ``|actual - desired| <= atol + rtol * |desired|``
  elementwise, whose failure message gives the largest absolute and relative errors and
  where they are.

Example::

    import numpy as np
    import anybn
    from anybn import testing

    be = testing.backend("torch")                  # raises testing.Unavailable without torch
    x = np.random.default_rng(0).normal(3.0, 2.0, (8, 4, 5))
    y, _ = anybn.batch_norm_train(be.asarray(x, "float32"))
    testing.assert_close(be.to_numpy(y, "float64"), testing.reference_train(x), rtol=1e-4, atol=1e-5)
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
from collections.abc import Callable, Iterator, Sequence
from types import ModuleType
from typing import Any

import numpy as np

__all__ = [
    "BACKENDS",
    "Backend",
    "Unavailable",
    "assert_close",
    "backend",
    "for_module",
    "reference_backward",
    "reference_eval",
    "reference_moments",
    "reference_train",
]

Array = Any  # an array of any array-API library

# ------------------------------------------------------------------------ float64 reference


def _reduce_axes(ndim: int, axis: int) -> tuple[int, ...]:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for an array of {ndim} dimensions")
    return tuple(i for i in range(ndim) if i != axis % ndim)


def _per_feature(v: Any, ndim: int, axis: int) -> np.ndarray:
    # a (C,) vector as float64, shaped to broadcast along `axis`
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return np.asarray(v, dtype=np.float64).reshape(shape)


def reference_moments(x: Any, *, axis: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature batch mean and biased variance, two-pass in float64.

    Parameters
    ----------
    x : array_like, shape ``(N, C, *spatial)`` for ``axis=1``, or ``(N, *spatial, C)`` for ``axis=-1``
        NumPy data of any real dtype.
    axis : int
        The feature axis; every other axis is reduced.

    Returns
    -------
    mean, var : np.ndarray, shape (C,), float64
        ``var`` is the mean squared deviation from ``mean`` (divided by m, not m - 1).
    """
    x = np.asarray(x, dtype=np.float64)
    axes = _reduce_axes(x.ndim, axis)
    mean = x.mean(axis=axes)
    var = ((x - _per_feature(mean, x.ndim, axis)) ** 2).mean(axis=axes)
    return mean, var


def reference_eval(
    x: Any, mean: Any, var: Any, weight: Any = None, bias: Any = None, *, axis: int = 1, eps: float = 1e-5
) -> np.ndarray:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` in float64, with the statistics given.

    Parameters
    ----------
    x : array_like, shape ``(N, C, *spatial)`` for ``axis=1``, or ``(N, *spatial, C)`` for ``axis=-1``
    mean, var : array_like, shape (C,)
    weight, bias : array_like, shape (C,), optional
        1 and 0 when None.
    axis : int
    eps : float

    Returns
    -------
    y : np.ndarray, the shape of ``x``, float64
    """
    x = np.asarray(x, dtype=np.float64)
    y = (x - _per_feature(mean, x.ndim, axis)) / np.sqrt(_per_feature(var, x.ndim, axis) + eps)
    if weight is not None:
        y = y * _per_feature(weight, x.ndim, axis)
    if bias is not None:
        y = y + _per_feature(bias, x.ndim, axis)
    return y


def reference_train(x: Any, weight: Any = None, bias: Any = None, *, axis: int = 1, eps: float = 1e-5) -> np.ndarray:
    """The training-mode forward in float64: :func:`reference_eval` with the batch's statistics.

    Parameters
    ----------
    x : array_like, shape ``(N, C, *spatial)`` for ``axis=1``, or ``(N, *spatial, C)`` for ``axis=-1``
    weight, bias : array_like, shape (C,), optional
        1 and 0 when None.
    axis : int
    eps : float

    Returns
    -------
    y : np.ndarray, the shape of ``x``, float64
    """
    mean, var = reference_moments(x, axis=axis)
    return reference_eval(x, mean, var, weight, bias, axis=axis, eps=eps)


def reference_backward(
    dy: Any, x: Any, weight: Any = None, *, axis: int = 1, eps: float = 1e-5
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of the training-mode forward, in float64.

    With x-hat = (x - mean) / sqrt(var + eps) over the m = x.size / C values of each feature:
    ``dbias = sum(dy)``, ``dweight = sum(dy * x-hat)`` and
    ``dx = weight / sqrt(var + eps) * (dy - dbias / m - x-hat * dweight / m)``.

    Parameters
    ----------
    dy : array_like, the shape of ``x``
        Gradient of the loss with respect to the forward's output.
    x : array_like, shape ``(N, C, *spatial)`` for ``axis=1``, or ``(N, *spatial, C)`` for ``axis=-1``
        The forward's input.
    weight : array_like, shape (C,), optional
        1 when None.
    axis : int
    eps : float

    Returns
    -------
    dx : np.ndarray, the shape of ``x``, float64
    dweight, dbias : np.ndarray, shape (C,), float64
    """
    x = np.asarray(x, dtype=np.float64)
    dy = np.asarray(dy, dtype=np.float64)
    if dy.shape != x.shape:
        raise ValueError(f"reference_backward: dy has shape {dy.shape}, expected x's shape {x.shape}")
    axes = _reduce_axes(x.ndim, axis)
    m = x.size // x.shape[axis]
    mean, var = reference_moments(x, axis=axis)
    invstd = 1.0 / np.sqrt(_per_feature(var, x.ndim, axis) + eps)
    xhat = (x - _per_feature(mean, x.ndim, axis)) * invstd
    dbias = dy.sum(axis=axes)
    dweight = (dy * xhat).sum(axis=axes)
    w = 1.0 if weight is None else _per_feature(weight, x.ndim, axis)
    dx = w * invstd * (dy - _per_feature(dbias, x.ndim, axis) / m - xhat * _per_feature(dweight, x.ndim, axis) / m)
    return dx, dweight, dbias


# ----------------------------------------------------------------------------- assert_close


def assert_close(actual: Any, desired: Any, *, rtol: float = 1e-7, atol: float = 0.0, err_msg: str = "") -> None:
    """Raise AssertionError unless ``|actual - desired| <= atol + rtol * |desired|`` everywhere.

    The test of ``numpy.testing.assert_allclose``, except that the shapes must be equal (no
    broadcasting) and the message names the largest absolute and relative errors, the
    indices where they occur, and the values there. NaNs must sit at the same places.

    Parameters
    ----------
    actual, desired : array_like, the same shape
        NumPy data (convert backend arrays with :meth:`Backend.to_numpy`); compared in
        float64.
    rtol, atol : float
        Relative and absolute tolerance.
    err_msg : str
        Put first in the message.
    """
    a = np.asarray(actual, dtype=np.float64)
    d = np.asarray(desired, dtype=np.float64)
    head = f"{err_msg}\n" if err_msg else ""
    if a.shape != d.shape:
        raise AssertionError(f"{head}assert_close: actual has shape {a.shape}, desired {d.shape}")
    nan_a, nan_d = np.isnan(a), np.isnan(d)
    if not np.array_equal(nan_a, nan_d):
        where = _index(np.argmax(nan_a != nan_d), a.shape)
        raise AssertionError(f"{head}assert_close: NaN in only one of the arrays, first at index {where}: "
                             f"actual {float(a[where])!r}, desired {float(d[where])!r}")
    same = nan_a | (a == d)  # NaN against NaN, and equal infinities, are equal
    with np.errstate(invalid="ignore"):  # inf - inf where they differ in sign: inf, as it should
        error = np.where(same, 0.0, np.abs(a - d))
        # an infinity equals only itself: rtol * inf must not let -inf pass for inf
        bad = ~same & (~(error <= atol + rtol * np.abs(d)) | np.isinf(a) | np.isinf(d))
    if not bad.any():
        return
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = np.where(error == 0, 0.0, error / np.abs(d))
    at_abs = _index(np.argmax(error), a.shape)
    at_rel = _index(np.argmax(relative), a.shape)
    raise AssertionError(
        f"{head}assert_close: not equal to tolerance rtol={rtol:g}, atol={atol:g}\n"
        f"mismatched elements: {int(bad.sum())} / {bad.size} ({100 * bad.mean():.3g}%)\n"
        f"max absolute error: {float(error[at_abs]):.6g} at index {at_abs}: "
        f"actual {float(a[at_abs])!r}, desired {float(d[at_abs])!r}\n"
        f"max relative error: {float(relative[at_rel]):.6g} at index {at_rel}: "
        f"actual {float(a[at_rel])!r}, desired {float(d[at_rel])!r}"
    )


def _index(flat: Any, shape: tuple[int, ...]) -> tuple[int, ...]:
    # a flat index as a tuple of Python ints, which print as (13, 7)
    return tuple(int(i) for i in np.unravel_index(int(flat), shape))


# --------------------------------------------------------------------------------- backends


class Unavailable(NotImplementedError):
    """This backend cannot run here: its library is not installed, or its device is absent.

    The message says which and, where it helps, how to install it. A ``NotImplementedError``,
    so that benchmark runners such as asv record a skip rather than a failure.
    """


class _Library:
    """How one array library trades arrays with NumPy (one subclass per library, as einops does).

    ``import_name`` is the module users pass as ``xp`` (``jax.numpy``, ``dask.array``); it is
    imported by :meth:`load`, never before.
    """

    import_name = ""
    install = ""  # what to run when it is missing
    lazy = False

    def load(self) -> ModuleType:
        try:
            return importlib.import_module(self.import_name)
        except ImportError as exc:
            hint = f" ({self.install})" if self.install else ""
            raise Unavailable(f"{self.import_name} is not installed{hint}: {exc}") from None

    def dtype(self, xp: Any, name: str) -> Any:
        """The library's dtype called ``name``, or None when it has none."""
        return getattr(xp, name, None)

    def from_numpy(self, xp: Any, a: np.ndarray, device: Any, chunks: Any) -> Array:
        # through the compat namespace: every library's asarray then takes device=
        return xp.asarray(a) if device is None else xp.asarray(a, device=device)

    def to_numpy(self, a: Array) -> np.ndarray:
        return np.asarray(a)

    def synchronize(self, arrays: Sequence[Array], device: Any) -> None:
        """Wait for the device work that computes ``arrays`` (nothing on CPU libraries)."""


class _NumPy(_Library):
    import_name = "numpy"


class _Strict(_Library):
    import_name = "array_api_strict"
    install = "pip install array-api-strict"

    def to_numpy(self, a: Array) -> np.ndarray:
        import array_api_strict as strict

        # NumPy refuses arrays on array_api_strict's other devices: move to its CPU device first
        return np.asarray(strict.asarray(a, device=strict.Device("CPU_DEVICE")))


class _Dask(_Library):
    import_name = "dask.array"
    install = "pip install 'dask[array]'"
    lazy = True

    def dtype(self, xp: Any, name: str) -> Any:
        # Dask's arrays take NumPy dtypes; its array-API namespace lacks float16
        try:
            return np.dtype(name)
        except TypeError:
            return None

    def from_numpy(self, xp: Any, a: np.ndarray, device: Any, chunks: Any) -> Array:
        import dask.array as da

        return da.from_array(a, chunks=-1 if chunks is None else chunks(a.shape, a.itemsize))

    def to_numpy(self, a: Array) -> np.ndarray:
        return np.asarray(a.compute())


class _Torch(_Library):
    import_name = "torch"
    install = "pip install torch==2.13.0"

    def to_numpy(self, a: Array) -> np.ndarray:
        import torch

        t = a.detach()
        if t.dtype == torch.bfloat16:  # NumPy has no bfloat16; float32 holds it exactly
            t = t.to(torch.float32)
        return t.cpu().numpy()

    def synchronize(self, arrays: Sequence[Array], device: Any) -> None:
        if getattr(device, "type", "cpu") == "cuda":
            import torch

            torch.cuda.synchronize(device)


class _Jax(_Library):
    import_name = "jax.numpy"
    install = "pip install jax"

    def to_numpy(self, a: Array) -> np.ndarray:
        out = np.asarray(a)
        # ml_dtypes' bfloat16 is a NumPy dtype that little else understands; float32 holds it exactly
        return out.astype(np.float32) if out.dtype.name == "bfloat16" else out

    def synchronize(self, arrays: Sequence[Array], device: Any) -> None:
        for a in arrays:  # JAX dispatches asynchronously
            a.block_until_ready()


class _CuPy(_Library):
    import_name = "cupy"
    install = "pip install 'anybn[cuda12]' or 'anybn[cuda13]'"

    def to_numpy(self, a: Array) -> np.ndarray:
        import cupy

        return cupy.asnumpy(a)

    def synchronize(self, arrays: Sequence[Array], device: Any) -> None:
        import cupy

        cupy.cuda.get_current_stream().synchronize()


class _Other(_Library):
    """Any other array-API library: conversions through DLPack."""

    def to_numpy(self, a: Array) -> np.ndarray:
        try:
            return np.from_dlpack(a)
        except (TypeError, AttributeError, RuntimeError, BufferError):
            return np.asarray(a)


_LIBRARIES: tuple[_Library, ...] = (_NumPy(), _Strict(), _Dask(), _Torch(), _Jax(), _CuPy())


def _library_of(module: ModuleType) -> _Library:
    name = module.__name__
    for library in _LIBRARIES:
        if name == library.import_name or name == f"array_api_compat.{library.import_name}":
            return library
    return _Other()


@dataclasses.dataclass(frozen=True)
class Backend:
    """One array library on one device, as a test or a benchmark sees it.

    Attributes
    ----------
    name : str
        Its name in :data:`BACKENDS` (or the module's name, from :func:`for_module`).
    module : module
        What a user passes as ``BatchNorm(xp=...)``: ``numpy``, ``torch``, ``jax.numpy``, ...
    xp : module
        The array-API namespace of its arrays (``array_api_compat``'s where it wraps one).
    device : object or None
        The device arrays are made on, in the library's terms; None: its default.
    float16 : bool
        Whether the library has float16.
    bfloat16 : dtype or None
        The library's bfloat16 dtype, or None where it has none.
    lazy : bool
        Whether its arrays are task graphs, computed only on request (Dask):
        :meth:`to_numpy` computes them, :meth:`synchronize` does not.
    generic_only : bool
        Whether it runs anybn with ``ANYBN_FAST_PATHS=0`` (see :meth:`environment`).
    chunks : callable or None
        Dask only: ``chunks(shape, itemsize)`` gives the chunk shape of an array made by
        :meth:`asarray`; None: one chunk.
    """

    name: str
    module: ModuleType
    xp: Any
    device: Any
    float16: bool
    bfloat16: Any
    lazy: bool
    generic_only: bool = False
    chunks: Callable[[tuple[int, ...], int], tuple[int, ...]] | None = None
    _library: _Library = dataclasses.field(default_factory=_Other, repr=False, compare=False)

    def dtype(self, name: Any) -> Any:
        """The library's dtype called ``name`` ("float32", "bfloat16", ...); a dtype is returned as given.

        Raises
        ------
        TypeError
            When the library has no such dtype.
        """
        if not isinstance(name, str):
            return name
        found = self.bfloat16 if name == "bfloat16" else self._library.dtype(self.xp, name)
        if found is None:
            raise TypeError(f"{self.name} has no dtype {name!r}")
        return found

    def asarray(self, a: Any, dtype: Any = None) -> Array:
        """NumPy data as an array of this backend, on its device.

        Parameters
        ----------
        a : array_like
            NumPy data, or a Python scalar.
        dtype : str or dtype, optional
            The result's dtype; converted on the backend's side, so "bfloat16" works where
            the library has it. None keeps the dtype of ``np.asarray(a)`` (float64 stays
            float64).

        Returns
        -------
        array of ``xp``, shape ``np.shape(a)``, on ``device``
        """
        out = self._library.from_numpy(self.xp, np.asarray(a), self.device, self.chunks)
        return out if dtype is None else self.xp.astype(out, self.dtype(dtype))

    def to_numpy(self, a: Array, dtype: Any = None) -> np.ndarray:
        """An array of this backend as NumPy data on the host (computed first where lazy).

        Parameters
        ----------
        a : array of ``xp``
        dtype : str or NumPy dtype, optional
            The result's dtype. None keeps the array's own, bfloat16 becoming float32 (exact).

        Returns
        -------
        np.ndarray, the shape of ``a``
        """
        out = self._library.to_numpy(a)
        return out if dtype is None else np.asarray(out, dtype=dtype)

    def synchronize(self, *arrays: Array) -> None:
        """Return when the device work computing ``arrays`` is done (GPUs, JAX's async dispatch).

        Nothing to wait for on CPU libraries; a lazy (Dask) array is not computed.
        """
        self._library.synchronize(arrays, self.device)

    @contextlib.contextmanager
    def environment(self) -> Iterator[None]:
        """Hold ``ANYBN_FAST_PATHS=0`` in ``os.environ`` for a ``generic_only`` backend; restore it after."""
        if not self.generic_only:
            yield
            return
        saved = os.environ.get("ANYBN_FAST_PATHS")
        os.environ["ANYBN_FAST_PATHS"] = "0"
        try:
            yield
        finally:
            if saved is None:
                os.environ.pop("ANYBN_FAST_PATHS", None)
            else:
                os.environ["ANYBN_FAST_PATHS"] = saved


def for_module(module: ModuleType, device: Any = None, *, name: str | None = None) -> Backend:
    """A :class:`Backend` for any array-API module (``numpy``, ``torch``, ``jax.numpy``, ...).

    The known libraries get their own conversions (PyTorch's ``detach``, CuPy's
    ``asnumpy``, Dask's ``compute``, ...); any other module converts through DLPack.

    Parameters
    ----------
    module : module
        The array module; it must have ``asarray``.
    device : optional
        The device for :meth:`Backend.asarray`, in the library's terms; None: its default.
    name : str, optional
        The backend's name; the module's by default.

    Raises
    ------
    ValueError
        When ``module`` has no ``asarray``, or its arrays are not array-API arrays.
    """
    import array_api_compat

    if not callable(getattr(module, "asarray", None)):
        raise ValueError(f"backend {module.__name__}: it has no asarray; it is not an array library")
    library = _library_of(module)
    try:
        xp = array_api_compat.array_namespace(module.asarray(np.zeros(1, dtype=np.float32)))
    except TypeError:
        raise ValueError(f"backend {module.__name__}: its arrays are not array-API arrays") from None
    float16 = library.dtype(xp, "float16") is not None
    return Backend(name or module.__name__, module, xp, device, float16, getattr(module, "bfloat16", None),
                   library.lazy, _library=library)


# ------------------------------------------------------------------------- the backend table


def _cpu(module: ModuleType) -> Any:
    return "cpu"


def _strict_device(device_name: str | None) -> Callable[[ModuleType], Any]:
    def device(module: ModuleType) -> Any:
        return None if device_name is None else module.Device(device_name)

    return device


def _torch_device(kind: str) -> Callable[[ModuleType], Any]:
    def device(module: ModuleType) -> Any:
        if kind == "cuda" and not module.cuda.is_available():
            raise Unavailable("torch: no CUDA device is available")
        return module.device(kind)

    return device


def _jax_cpu(module: ModuleType) -> Any:
    import jax

    # float64 arrays must stay float64 for the float64 checks; JAX makes them float32 otherwise
    jax.config.update("jax_enable_x64", True)
    return jax.devices("cpu")[0]


def _cupy_device(module: ModuleType) -> Any:
    try:
        count = module.cuda.runtime.getDeviceCount()
    except Exception as exc:  # no driver, no device: CuPy raises its own runtime errors
        raise Unavailable(f"cupy: no usable GPU ({type(exc).__name__}: {exc})") from None
    if count < 1:
        raise Unavailable("cupy: no GPU is present")
    return module.cuda.Device(0)


def _halves(shape: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    # two chunks along the batch axis, so that reductions really cross chunk boundaries
    return tuple(max(1, s // 2) if i == 0 else s for i, s in enumerate(shape))


@dataclasses.dataclass(frozen=True)
class _Entry:
    library: _Library
    device: Callable[[ModuleType], Any]  # raises Unavailable where the device is absent
    generic_only: bool = False
    chunks: Callable[[tuple[int, ...], int], tuple[int, ...]] | None = None


_TABLE: dict[str, _Entry] = {
    "numpy": _Entry(_NumPy(), _cpu),
    "numpy:generic": _Entry(_NumPy(), _cpu, generic_only=True),
    "array_api_strict": _Entry(_Strict(), _strict_device(None)),
    "array_api_strict:device1": _Entry(_Strict(), _strict_device("device1")),
    "dask": _Entry(_Dask(), _cpu, chunks=_halves),
    "torch": _Entry(_Torch(), _torch_device("cpu")),
    "torch:cuda": _Entry(_Torch(), _torch_device("cuda")),
    "jax": _Entry(_Jax(), _jax_cpu),
    "cupy": _Entry(_CuPy(), _cupy_device),
}

#: The backends of :func:`backend`: ``numpy`` (with anybn's fast paths where installed) and
#: ``numpy:generic`` (``ANYBN_FAST_PATHS=0``), ``array_api_strict`` (its default device and
#: ``device1``), ``dask`` (two chunks along the first axis), ``torch`` (CPU) and
#: ``torch:cuda``, ``jax`` (CPU, with ``jax_enable_x64`` turned on) and ``cupy`` (GPU 0).
BACKENDS: tuple[str, ...] = tuple(_TABLE)


def backend(name: str) -> Backend:
    """The backend called ``name`` (one of :data:`BACKENDS`), its library imported now.

    Each call looks the library up again (cheap once imported), so a test that hides a
    library from ``sys.modules`` sees it missing. Loading ``jax`` turns JAX's
    ``jax_enable_x64`` on.

    Raises
    ------
    Unavailable
        When its library is not installed or its device is absent; the message says which.
    ValueError
        When ``name`` is not in :data:`BACKENDS`.
    """
    if name not in _TABLE:
        raise ValueError(f"backend {name!r}: expected one of {', '.join(BACKENDS)}")
    entry = _TABLE[name]
    module = entry.library.load()
    device = entry.device(module)
    b = for_module(module, device, name=name)
    return dataclasses.replace(b, generic_only=entry.generic_only, chunks=entry.chunks)
