"""The GPU fast path: CuPy arrays through the numba-cuda kernels of ``_cuda_kernels``.

It serves C-contiguous CuPy arrays of float16, float32 or float64 above ``_MIN_BYTES`` and
supplies the two kinds of kernel the functional core composes every step from:

- reductions: ``moments`` (training forward) and ``grad_sums`` (backward), each one pass
  over x (and dy) with float64 per-feature sums merged in a fixed order;
- elementwise passes: ``apply`` (forward, inference) and ``grad_apply`` (backward), each
  one read of the inputs and one write of the result.

``CudaKernels`` puts the same methods behind ``anybn._kernels.Kernels``, the protocol the
functional core calls. The O(C) coefficient arithmetic between them is not here: it is written once in array-API
code and runs on CuPy like any other backend. This module is glue only: it views x as
``(outer, C, inner)`` (a free reshape), allocates results with ``cupy.empty`` (CuPy's pool),
and launches on CuPy's current stream, so the work is ordered with the caller's CuPy calls
and nothing synchronizes the host. cupy and numba.cuda are imported on the first call this
path serves, never when anybn is imported.
"""

from __future__ import annotations

import warnings
from types import ModuleType
from typing import Any

import array_api_compat
import numpy as np

from .._moments import GradSums, Sums

__all__ = ["CudaKernels", "CudaPath"]

# Up to this many bytes of x the generic CuPy path serves. Measured on an H200
# (tools/gpu_check.py, docs/benchmarks.md "On a GPU"): through numba's dispatch each step
# took about 1 ms whatever the size, host time (not profiled yet; the lead is the per-launch
# argument handling that DirectLauncher skips), and the generic CuPy path was faster at
# every size timed, 64 KiB to 16 MiB (training forward 0.49-0.95 against 1.13-2.01 ms,
# backward 0.31-0.64 against 1.04-1.89, inference 0.21-0.38 against 0.53-0.95; 15 sizes and
# layouts, each a median of 20). Above 16 MiB the generic path was not timed; the fast path
# keeps its memory bound there (nothing the size of x beyond the result, measured). To be
# measured again with the direct launcher (tools/gpu_profile.py).
_MIN_BYTES = 16 << 20

_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_STEPS = ("train", "eval", "backward")


class CudaPath:
    """The numba-cuda path for CuPy arrays; see the module docstring for what it serves."""

    name = "cuda-numba"

    def __init__(self, launch: str = "numba") -> None:
        """``launch``: ``"numba"`` (numba's own dispatch: run and checked on an H200) or
        ``"direct"`` (``_cuda_kernels.DirectLauncher``: far less host time per launch, not yet
        run on a GPU; it launches a probe kernel first and falls back to numba's dispatch
        unless the probe's result is right; ``tools/gpu_profile.py`` checks it)."""
        if launch not in ("direct", "numba"):
            raise ValueError(f"CudaPath: launch must be 'direct' or 'numba', got {launch!r}")
        self.launch = launch
        self._kernels: ModuleType | None = None
        self._unavailable = False
        self._launcher: Any = None
        self._sm_counts: dict[int, int] = {}

    # ------------------------------------------------------------------ selection

    def serves(self, step: str, xp: Any, arrays: tuple[Any, ...]) -> bool:
        """Whether ``step`` ('train', 'eval', 'backward') runs here for ``arrays`` ((x,) or (x, dy))."""
        if step not in _STEPS or not array_api_compat.is_cupy_namespace(xp):
            return False
        x = arrays[0]
        if x.dtype not in _DTYPES or x.nbytes <= _MIN_BYTES:
            return False
        for a in arrays:
            if not array_api_compat.is_cupy_array(a) or a.dtype != x.dtype or a.shape != x.shape:
                return False
            if not a.flags.c_contiguous:
                return False
        return self._load() is not None

    def _load(self) -> ModuleType | None:
        """The kernels module, or None where numba-cuda, a GPU or its compiler is missing.

        Decided once per path: a missing numba-cuda or driver declines silently (the generic
        CuPy path serves); a GPU whose compiler fails on a probe kernel declines with a
        ``RuntimeWarning`` naming the error, since that is a broken install, not a choice.
        """
        if self._kernels is None and not self._unavailable:
            try:
                from numba import cuda

                from . import _cuda_kernels
                available = cuda.is_available()
            except Exception:  # numba-cuda missing or no driver: the generic CuPy path serves
                available = False
            if available:
                try:
                    _cuda_kernels.probe()
                except Exception as exc:  # noqa: BLE001 - any compiler failure means: do not serve
                    warnings.warn(
                        f"anybn: numba-cuda finds a GPU but cannot compile kernels here "
                        f"({type(exc).__name__}: {exc}); CuPy arrays take the generic path",
                        RuntimeWarning, stacklevel=2)
                    available = False
            if available:
                self._kernels = _cuda_kernels
                if self.launch == "direct":
                    self._launcher = _direct_launcher(_cuda_kernels)
            else:
                self._unavailable = True
        return self._kernels

    @property
    def _k(self) -> ModuleType:
        """The kernels module; only called after ``serves`` has loaded it."""
        assert self._kernels is not None
        return self._kernels

    # ------------------------------------------------------------------ the kernels

    def moments(self, x: Any, layout: Any) -> tuple[Any, Any, Any]:
        """Shifted sums of x per feature.

        Parameters
        ----------
        x : cupy.ndarray, C-contiguous, float16/float32/float64, shape ``layout.shape``
        layout : anybn._namespace.Layout
            ``outer``, ``features`` (C), ``inner`` of x's fold.

        Returns
        -------
        pivot, s1, s2 : cupy.ndarray, shape (C,), float64
            ``pivot`` is x's first sample of each feature; ``s1 = sum(x - pivot)``,
            ``s2 = sum((x - pivot)**2)`` over the ``outer * inner`` values of each feature.
        """
        cp, launch = self._launch(x, layout)
        dev = self._dev
        x3 = _fold(x, layout)
        pivot = x3[0, :, 0].astype(cp.float64)
        out = cp.empty((2, layout.features), dtype=cp.float64)
        self._k.moments(dev(x3), dev(pivot), dev(out), **launch, empty=self._empty)
        return pivot, out[0], out[1]

    def apply(self, x: Any, layout: Any, pivot: Any, scale: Any, shift: Any, *,
              activation: str | None = None, residual: Any = None) -> Any:
        """``y = act((x - pivot) * scale + shift [+ residual])`` per feature.

        Parameters
        ----------
        x : cupy.ndarray, C-contiguous, float16/float32/float64, shape ``layout.shape``
        layout : anybn._namespace.Layout
        pivot, scale, shift : cupy.ndarray, shape (C,), float64
        activation : None, "relu" or "sigmoid"
        residual : cupy.ndarray like x, optional

        Returns
        -------
        y : cupy.ndarray, same shape and dtype as x
        """
        cp, launch = self._launch(x, layout)
        dev = self._dev
        y = cp.empty_like(x)
        self._k.apply(dev(_fold(x, layout)), dev(pivot), dev(scale), dev(shift), dev(_fold(y, layout)),
                      activation, dev(_fold(residual, layout)), **launch)
        return y

    def grad_sums(self, x: Any, dy: Any, layout: Any, pivot: Any, *, activation: str | None = None,
                  scale: Any = None, shift: Any = None, residual: Any = None,
                  z_pivot: Any = None) -> tuple[Any, Any]:
        """Per-feature ``sum(dy')`` and ``sum(dy' * (x - pivot))``, ``dy' = dy * act'(z)``.

        Parameters
        ----------
        x, dy : cupy.ndarray, C-contiguous, same float dtype, shape ``layout.shape``
        layout : anybn._namespace.Layout
        pivot : cupy.ndarray, shape (C,), float64
        activation, scale, shift, residual : as for ``apply`` (z recomputed from them)
        z_pivot : cupy.ndarray, shape (C,), float64, optional
            The forward apply's pivot, where it was not ``pivot``.

        Returns
        -------
        sum_dy, sum_dy_d : cupy.ndarray, shape (C,), float64
        """
        cp, launch = self._launch(x, layout)
        dev = self._dev
        out = cp.empty((2, layout.features), dtype=cp.float64)
        self._k.grad_sums(dev(_fold(x, layout)), dev(_fold(dy, layout)), dev(pivot), dev(out),
                          activation, dev(scale), dev(shift), dev(_fold(residual, layout)),
                          z_pivot=dev(z_pivot), **launch, empty=self._empty)
        return out[0], out[1]

    def grad_apply(self, x: Any, dy: Any, layout: Any, pivot: Any, a: Any, b: Any, k: Any, *,
                   activation: str | None = None, scale: Any = None, shift: Any = None,
                   residual: Any = None, z_pivot: Any = None) -> tuple[Any, Any]:
        """``dx = k * (dy' + a * (x - pivot) + b)`` per feature, and the residual's gradient.

        Parameters
        ----------
        x, dy : cupy.ndarray, C-contiguous, same float dtype, shape ``layout.shape``
        layout : anybn._namespace.Layout
        pivot, a, b, k : cupy.ndarray, shape (C,), float64
            ``a`` and ``b`` None for fixed statistics: ``dx = k * dy'``, no term in x.
        activation, scale, shift, residual, z_pivot : as for ``grad_sums``

        Returns
        -------
        dx : cupy.ndarray like x
        dres : cupy.ndarray like x, or None
            ``dy'`` when a residual was added (``dy`` itself without an activation, where
            ``dy' = dy``); None without a residual.
        """
        cp, launch = self._launch(x, layout)
        dev = self._dev
        dx = cp.empty_like(x)
        dres = cp.empty_like(x) if residual is not None and activation is not None else None
        self._k.grad_apply(dev(_fold(x, layout)), dev(_fold(dy, layout)), dev(pivot), dev(a), dev(b), dev(k),
                           dev(_fold(dx, layout)), activation, dev(scale), dev(shift),
                           dev(_fold(residual, layout)), dev(_fold(dres, layout)), z_pivot=dev(z_pivot),
                           **launch)
        if residual is not None and activation is None:
            dres = dy
        return dx, dres

    # ------------------------------------------------------------------ launching

    def _dev(self, a: Any) -> Any:
        """What the kernels' host functions take for a CuPy array: the array itself for the
        direct launcher, else a numba view of it."""
        return a if self._launcher is not None else _dev(a)

    def _launch(self, x: Any, layout: Any) -> tuple[ModuleType, dict[str, Any]]:
        """cupy, and the keyword arguments of a launch: configuration, CuPy's current stream
        and the launcher."""
        import cupy as cp

        device = x.device.id
        sm_count = self._sm_counts.get(device)
        if sm_count is None:
            sm_count = self._sm_counts[device] = cp.cuda.Device(device).attributes["MultiProcessorCount"]
        ptr = cp.cuda.get_current_stream().ptr
        config = self._k.launch_config(layout, sm_count=sm_count)
        if self._launcher is not None:
            return cp, {"config": config, "stream": self._launcher.stream(ptr), "launcher": self._launcher}
        from numba import cuda

        # ptr 0 is CuPy's null stream, CUDA's legacy default stream: numba's stream 0
        stream = cuda.external_stream(ptr) if ptr else 0
        return cp, {"config": config, "stream": stream}

    def _empty(self, shape: tuple[int, ...], dtype: Any) -> Any:
        """Scratch device memory from CuPy's pool (the reductions' partial sums)."""
        import cupy as cp

        return self._dev(cp.empty(shape, dtype=dtype))


class CudaKernels:
    """``CudaPath`` behind ``anybn._kernels.Kernels``: the protocol the functional core calls.

    It maps the protocol's conventions onto the path: ``None`` coefficients become zeros,
    ``Activation`` is unpacked, the sums' pivot and the forward's pivot (``act.pivot``) are
    passed separately, and results come back as ``Sums`` / ``GradSums``.
    """

    name = CudaPath.name
    # the pivot is subtracted in registers: centering costs the apply nothing
    centering_is_free = True

    def __init__(self, path: CudaPath | None = None) -> None:
        self.path = path or CudaPath()

    def serves(self, step: str, xp: Any, arrays: tuple[Any, ...]) -> bool:
        return self.path.serves(step, xp, arrays)

    def coefficient_dtype(self, xp: Any, x: Any) -> Any:
        return xp.float64  # the kernels sum in float64 for every input dtype

    def moments(self, xp: Any, x: Any, layout: Any) -> Sums:
        pivot, s1, s2 = self.path.moments(x, layout)
        return Sums(layout.outer * layout.inner, pivot, s1, s2)

    def apply(self, xp: Any, x: Any, layout: Any, pivot: Any, scale: Any, shift: Any, *, scratch: Any = None,
              activation: str | None = None, residual: Any = None, out: Any = None) -> Any:
        if out is not None:
            raise TypeError("the CUDA kernels do not write into out= yet (writes_out is not set)")
        c = layout.features
        return self.path.apply(x, layout, _coef(xp, pivot, c), _coef(xp, scale, c), _coef(xp, shift, c),
                               activation=activation, residual=residual)

    def grad_sums(self, xp: Any, x: Any, dy: Any, layout: Any, pivot: Any, *, act: Any = None) -> GradSums:
        c = layout.features
        z = _z_args(xp, act, c)
        # without a pivot only sum(dy) is wanted; any pivot does for the unused second sum
        sums_pivot = pivot if pivot is not None else z.get("z_pivot")
        sum_dy, sum_dy_d = self.path.grad_sums(x, dy, layout, _coef(xp, sums_pivot, c), **z)
        return GradSums(sum_dy, None if pivot is None else sum_dy_d)

    def grad_apply(self, xp: Any, x: Any, dy: Any, layout: Any, pivot: Any, a: Any, b: Any, k: Any, *,
                   scratch: Any = None, act: Any = None, out: Any = None) -> Any:
        if out is not None:
            raise TypeError("the CUDA kernels do not write into out= yet (writes_out is not set)")
        c = layout.features
        fixed = a is None  # fixed statistics: dx = k * dy', no term in x (0 * inf is NaN)
        dx, dres = self.path.grad_apply(x, dy, layout, _coef(xp, pivot, c), None if fixed else _coef(xp, a, c),
                                        None if fixed else _coef(xp, b, c), _coef(xp, k, c), **_z_args(xp, act, c))
        return dx if act is None or act.residual is None else (dx, dres)


def _coef(xp: Any, v: Any, features: int) -> Any:
    """A (C,) float64 coefficient vector for the kernels; zeros stand for None."""
    if v is None:
        return xp.zeros(features, dtype=xp.float64)
    return xp.asarray(v, dtype=xp.float64)


def _z_args(xp: Any, act: Any, features: int) -> dict[str, Any]:
    """The keyword arguments that recompute z = (x - act.pivot) * scale + shift [+ residual]."""
    if act is None:
        return {}
    return {"activation": act.kind, "scale": _coef(xp, act.scale, features),
            "shift": _coef(xp, act.shift, features), "residual": act.residual,
            "z_pivot": _coef(xp, act.pivot, features)}


def _fold(a: Any, layout: Any) -> Any:
    """The (outer, C, inner) view of a contiguous array; None stays None."""
    return None if a is None else a.reshape(layout.outer, layout.features, layout.inner)


def _dev(a: Any) -> Any:
    """A numba view of a CuPy array, zero copy; None stays None.

    ``sync=False``: numba would otherwise synchronize the host with the array's stream at
    every launch; the kernels run on that same stream, so the order already holds.
    """
    if a is None:
        return None
    from numba import cuda

    return cuda.as_cuda_array(a, sync=False)


def _direct_launcher(kernels: ModuleType) -> Any:
    """A ``DirectLauncher`` that has launched the probe kernel on a CuPy array and got its
    result, or None (numba's dispatch serves: no ``cuda.core``, the simulator, or a kernel
    ABI other than the one the launcher writes)."""
    try:
        import cupy as cp

        launcher = kernels.DirectLauncher()
        a = cp.zeros(kernels.PROBE_SIZE, dtype=cp.float64)
        launcher(kernels.probe_kernel(), kernels.PROBE_GRID, kernels.PROBE_BLOCK,
                 launcher.stream(cp.cuda.get_current_stream().ptr), (a, kernels.PROBE_N))
        kernels.check_probe(cp.asnumpy(a))
        return launcher
    except Exception:  # noqa: BLE001 - any failure: the slower, always-correct dispatch serves
        return None
