"""numba-cuda kernels of the GPU fast path: reductions and elementwise passes over a folded x.

Imported only when the GPU path first serves a call (``cuda.py``), and under numba-cuda's
simulator by ``tests/test_cuda_sim.py`` (``NUMBA_ENABLE_CUDASIM=1``: the same kernels run on
the CPU with NumPy arrays).

Every host function takes x reshaped to ``(outer, C, inner)`` (free for a C-contiguous
array) and device arrays: anything with ``__cuda_array_interface__`` (CuPy, numba), or NumPy
arrays under the simulator. The kernels index flat 1-D views, so no transposing copy is ever
made, and one traversal serves both layout classes:

- *rows* (``inner == 1``: (N, C), channels-last): a block is ``(TX, TY)`` threads, TX lanes
  over neighbouring features and TY over rows, so a warp reads contiguous memory even when
  C < 32 (several rows per warp);
- *planes* (``inner > 1``: NCHW): TX = 1, a block's TY threads walk the values of one
  feature, plane after plane, contiguous within each plane.

Each thread keeps one feature ``c`` for its whole life (its per-feature coefficients stay in
registers) and visits the flat indices ``t = t0, t0 + S, ...`` of that feature's
``outer * inner`` values, ``S`` being the threads per feature in the grid; ``(t // inner,
t % inner)`` is walked incrementally, so there is no division per element.

Numerics: reductions accumulate float64 in every thread (the H200 has full-rate FP64), of
values shifted by a per-feature ``pivot`` (a sample of the feature: ``x - pivot`` is exact in
float64 for float16/float32 inputs), and merge the per-block partial sums in a fixed order
(a second tiny kernel, no atomics), so results are deterministic. Elementwise passes compute
in float32 for float16/float32 inputs and in float64 for float64, ``x - pivot`` first.
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Callable
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np
from numba import cuda
from numba.cuda import types

__all__ = [
    "ACTIVATIONS",
    "LaunchConfig",
    "apply",
    "grad_apply",
    "grad_sums",
    "launch_config",
    "moments",
]

ACTIVATIONS = (None, "relu", "sigmoid")
_ACT = {None: 0, "relu": 1, "sigmoid": 2}

# Threads per block on the GPU: 8 blocks of 256 fill an SM's 2048 thread slots.
THREADS = 256
# Blocks resident per SM at 256 threads; the grid is capped at sm_count * this, and each
# thread loops over its share, so a launch is one wave however large x is.
BLOCKS_PER_SM = 8
# H200 (and H100 SXM): 132 SMs. cuda.py passes the device's own count.
SM_COUNT = 132
# Values per thread below which a reduction uses fewer chunks: each chunk costs a block
# reduction and 16 bytes of partial sums per feature.
ITEMS_PER_THREAD = 8
# Loads issued together per thread in the main loop: one load in flight per thread is far
# below what HBM3e needs to stay busy; four are (the tail takes one value at a time).
_UNROLL = 4
# CUDA's limit on gridDim.y, where the chunks go.
_MAX_GRID_Y = 65535
# Most threads of a merge block (CUDA's limit): lanes over features, the rest over chunks,
# so that merging ~500 partial sums per feature takes a few dependent loads per thread,
# not 500 (a load from L2 costs ~0.3 us of latency; one thread per feature took ~150 us).
_MERGE_THREADS = 1024


class LaunchConfig(NamedTuple):
    """How the kernels cover a folded x of shape (outer, C, inner).

    ``block = (TX, TY)``: TX lanes over neighbouring features (1 for planes), TY threads
    over the values of one feature. ``grid = (ceil(C / TX), chunks)``: chunks split each
    feature's values; a reduction leaves ``chunks`` partial sums per feature.
    ``merge_block = (MX, MY)``, ``merge_grid = (ceil(C / MX), 2)``: the second stage of a
    reduction, MX lanes over features and MY threads over chunks, one grid row per sum.
    """

    block: tuple[int, int]
    grid: tuple[int, int]
    merge_block: tuple[int, int]
    merge_grid: tuple[int, int]

    @property
    def threads(self) -> int:
        return self.block[0] * self.block[1]

    @property
    def chunks(self) -> int:
        return self.grid[1]


def launch_config(layout: Any, *, threads: int = THREADS, sm_count: int = SM_COUNT,
                  blocks_per_sm: int = BLOCKS_PER_SM, max_blocks: int | None = None,
                  items_per_thread: int = ITEMS_PER_THREAD) -> LaunchConfig:
    """The launch configuration for x folded as ``(layout.outer, layout.features, layout.inner)``.

    Parameters
    ----------
    layout : object with int attributes ``outer``, ``features``, ``inner``
        ``anybn._namespace.Layout`` or anything shaped like it.
    threads : int, power of two
        Threads per block (tests shrink it to 32 or 64 for the simulator).
    sm_count, blocks_per_sm : int
        The grid is capped at ``sm_count * blocks_per_sm`` blocks (or ``max_blocks``).
    items_per_thread : int
        Fewer chunks are used when each thread would get fewer values than this.

    Returns
    -------
    LaunchConfig
    """
    if threads < 1 or threads & (threads - 1):
        raise ValueError(f"launch_config: threads must be a power of two, got {threads}")
    features, count = layout.features, layout.outer * layout.inner
    # rows: lanes over features so a warp reads contiguous memory; the next power of two
    # at or above C keeps the block reduction a power-of-two tree over TY
    tx = 1 if layout.inner > 1 else min(32, threads, _next_pow2(max(features, 1)))
    ty = threads // tx
    gx = max(1, -(-features // tx))
    cap = max_blocks if max_blocks is not None else sm_count * blocks_per_sm
    wanted = -(-count // (ty * items_per_thread))
    chunks = max(1, min(wanted, cap // gx, _MAX_GRID_Y))
    # merge: lanes as for rows; over chunks, enough threads that each adds about 8
    mx = min(32, _next_pow2(max(features, 1)))
    my = max(1, min(min(_MERGE_THREADS, 4 * threads) // mx, _next_pow2(-(-chunks // 8))))
    return LaunchConfig(block=(tx, ty), grid=(gx, chunks), merge_block=(mx, my),
                        merge_grid=(-(-max(features, 1) // mx), 2))


def _next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


class _Fold(NamedTuple):
    outer: int
    features: int
    inner: int


# ------------------------------------------------------------------ host functions


def moments(x3: Any, pivot: Any, out: Any, *, config: LaunchConfig | None = None, stream: Any = 0,
            empty: Callable[..., Any] | None = None, launcher: Launcher | None = None) -> None:
    """Shifted per-feature sums: ``out[0, c] = sum(x - pivot[c])``, ``out[1, c] = sum((x - pivot[c])**2)``.

    Parameters
    ----------
    x3 : device array, shape (outer, C, inner), float16/float32/float64, C-contiguous
    pivot : device array, shape (C,), float64
        A value near each feature's mean; the caller takes ``x3[0, c, 0]``.
    out : device array, shape (2, C), float64, written
    config : LaunchConfig, optional
        Defaults to ``launch_config`` of x3's shape with the GPU's sizes.
    stream : numba stream or 0
    empty : callable (shape, dtype) -> device array, optional
        Allocates the (2, chunks, C) float64 partial sums; cuda.py passes ``cupy.empty`` so
        they come from CuPy's pool. Defaults to ``numba.cuda.device_array``.
    launcher : Launcher, optional
        How kernels are launched: numba's dispatch by default; ``DirectLauncher`` for CuPy
        arrays (then ``stream`` is its ``stream(ptr)``).
    """
    _reduce("moments", x3, None, None, pivot, pivot, pivot, pivot, out, None, config, stream, empty, launcher)


def grad_sums(x3: Any, dy3: Any, pivot: Any, out: Any, activation: str | None = None, scale: Any = None,
              shift: Any = None, residual3: Any = None, *, z_pivot: Any = None,
              config: LaunchConfig | None = None, stream: Any = 0,
              empty: Callable[..., Any] | None = None, launcher: Launcher | None = None) -> None:
    """Backward sums: ``out[0, c] = sum(dy')``, ``out[1, c] = sum(dy' * (x - pivot[c]))``.

    ``dy' = dy * act'(z)``, ``z = (x - z_pivot) * scale + shift [+ residual]`` recomputed
    exactly as ``apply`` computed it (same dtype, same order), so a ReLU mask here is the
    forward's; ``dy' = dy`` without activation (scale, shift and residual3 unused then).
    ``z_pivot`` is the forward apply's pivot, ``pivot`` by default.

    Parameters
    ----------
    x3, dy3 : device arrays, shape (outer, C, inner), same float dtype, C-contiguous
    pivot : device array, shape (C,), float64
    out : device array, shape (2, C), float64, written
    activation : None, "relu" or "sigmoid"
    scale, shift : device arrays, shape (C,), float64; required with an activation
    residual3 : device array like x3, optional
    z_pivot : device array, shape (C,), float64, optional
    config, stream, empty, launcher : as for ``moments``
    """
    act = _activation("grad_sums", activation, scale, shift)
    zp = pivot if z_pivot is None or not act else z_pivot
    _reduce("grad", x3, dy3, residual3 if act else None, pivot, zp, scale if act else pivot,
            shift if act else pivot, out, activation, config, stream, empty, launcher)


def apply(x3: Any, pivot: Any, scale: Any, shift: Any, y3: Any, activation: str | None = None,
          residual3: Any = None, *, config: LaunchConfig | None = None, stream: Any = 0,
          launcher: Launcher | None = None) -> None:
    """``y = act((x - pivot) * scale + shift [+ residual])`` per feature, in y's dtype.

    Parameters
    ----------
    x3 : device array, shape (outer, C, inner), float16/float32/float64, C-contiguous
    pivot, scale, shift : device arrays, shape (C,), float64
    y3 : device array like x3, written
    activation : None, "relu" or "sigmoid"
    residual3 : device array like x3, optional
    config, stream, launcher : as for ``moments``
    """
    _activation("apply", activation, scale, shift)
    _map("apply", x3, None, residual3, (pivot, scale, shift), y3, None, activation, config, stream, launcher)


def grad_apply(x3: Any, dy3: Any, pivot: Any, a: Any, b: Any, k: Any, dx3: Any,
               activation: str | None = None, scale: Any = None, shift: Any = None,
               residual3: Any = None, dres3: Any = None, *, z_pivot: Any = None,
               config: LaunchConfig | None = None, stream: Any = 0, launcher: Launcher | None = None) -> None:
    """``dx = k * (dy' + a * (x - pivot) + b)`` per feature; ``dres = dy'`` when dres3 is given.

    Parameters
    ----------
    x3, dy3 : device arrays, shape (outer, C, inner), same float dtype, C-contiguous
    pivot, a, b, k : device arrays, shape (C,), float64
        ``a`` and ``b`` None for fixed statistics: ``dx = k * dy'``, no term in x (which as
        ``0 * (x - pivot)`` would make dx NaN where x is infinite).
    dx3 : device array like x3, written
    activation, scale, shift, residual3, z_pivot : as for ``grad_sums``
    dres3 : device array like x3, optional, written
    config, stream, launcher : as for ``moments``
    """
    act = _activation("grad_apply", activation, scale, shift)
    if (a is None) != (b is None):
        raise ValueError("grad_apply: a and b must both be given (batch statistics) or both None (fixed)")
    zp = pivot if z_pivot is None or not act else z_pivot
    fixed = a is None  # placeholders in a's and b's slots, not read
    coefs = (pivot, pivot if fixed else a, pivot if fixed else b, k, scale if act else pivot,
             shift if act else pivot, zp)
    _map("grad_fixed" if fixed else "grad", x3, dy3, residual3 if act else None, coefs, dx3, dres3, activation,
         config, stream, launcher)


def _activation(fn: str, activation: str | None, scale: Any, shift: Any) -> int:
    if activation not in _ACT:
        raise ValueError(f"{fn}: activation must be None, 'relu' or 'sigmoid', got {activation!r}")
    if activation is not None and (scale is None or shift is None):
        raise ValueError(f"{fn}: activation {activation!r} needs scale and shift to recompute z")
    return _ACT[activation]


def _reduce(op: str, x3: Any, dy3: Any, r3: Any, pivot: Any, z_pivot: Any, scale: Any, shift: Any, out: Any,
            activation: str | None, config: LaunchConfig | None, stream: Any,
            empty: Callable[..., Any] | None, launcher: Launcher | None) -> None:
    outer, features, inner = x3.shape
    if features == 0:
        return
    config = config or launch_config(_Fold(outer, features, inner))
    partial = (empty or cuda.device_array)((2, config.chunks, features), np.float64)
    xf = _flat(x3)
    kernel = _reduce_kernel(op, _compute_type(x3.dtype), _ACT[activation], r3 is not None,
                            config.threads)
    launch = launcher or _dispatch
    launch(kernel, config.grid, config.block, stream,
           (xf, _flat(dy3, xf), _flat(r3, xf), pivot, z_pivot, scale, shift, features, inner, outer * inner,
            partial))
    launch(_merge_kernel(), config.merge_grid, config.merge_block, stream, (partial, out))


def _map(op: str, x3: Any, dy3: Any, r3: Any, coefs: tuple[Any, ...], o3: Any, o23: Any,
         activation: str | None, config: LaunchConfig | None, stream: Any, launcher: Launcher | None) -> None:
    outer, features, inner = x3.shape
    if features == 0 or outer * inner == 0:
        return
    config = config or launch_config(_Fold(outer, features, inner))
    coefs = coefs + (coefs[0],) * (7 - len(coefs))  # unused slots: any (C,) float64 array
    xf, of = _flat(x3), _flat(o3)
    kernel = _map_kernel(op, _compute_type(x3.dtype), _ACT[activation], r3 is not None,
                         o23 is not None)
    launch = launcher or _dispatch
    launch(kernel, config.grid, config.block, stream,
           (xf, _flat(dy3, xf), _flat(r3, xf), *coefs, features, inner, outer * inner, of, _flat(o23, xf)))


# ------------------------------------------------------------------ launching

#: ``launcher(kernel, grid, block, stream, args)``: launch a ``cuda.jit`` kernel.
Launcher = Callable[[Any, tuple[int, ...], tuple[int, ...], Any, tuple[Any, ...]], None]


def _dispatch(kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], stream: Any,
              args: tuple[Any, ...]) -> None:
    """numba's own launch: types the arguments, compiles on first use, marshals each array."""
    kernel[grid, block, stream](*args)


class DirectLauncher:
    """Launches the kernels on CuPy arrays without numba's per-call argument handling.

    Through numba's dispatch, each array argument is first wrapped (``cuda.as_cuda_array``:
    a driver query of the pointer, a ``DeviceNDArray``), then typed and marshalled at each
    launch; on an H200 every anybn step took about 1 ms that way whatever the input size
    (``tools/gpu_check.py``), host time, where PyTorch's took 0.1 ms on 64 MiB. This
    launcher compiles each kernel once per argument types through numba
    (``dispatcher.compile``), then passes the kernel parameters straight from the CuPy
    arrays with ``cuda.core.launch``, in numba's kernel ABI (``kernel_params``). That ABI is
    numba-cuda's own (``numba.cuda.dispatcher._Kernel._prepare_args``), not a public
    promise: ``cuda.py`` launches ``probe_kernel`` through this launcher and checks its
    result before using it, and ``tools/gpu_profile.py`` compares every kernel's results
    with numba's dispatch bit for bit.

    Only C-contiguous CuPy arrays and Python ints are passed (what ``_reduce`` and ``_map``
    pass when ``CudaPath`` calls them).
    """

    def __init__(self) -> None:
        from numba.cuda import config

        if getattr(config, "ENABLE_CUDASIM", False):
            raise RuntimeError("DirectLauncher: numba-cuda's simulator has no kernels to launch directly")
        from cuda.core import LaunchConfig, Stream, launch  # numba-cuda's own dependency

        self._launch, self._config, self._stream_type = launch, LaunchConfig, Stream
        self._kernels: dict[tuple[Any, ...], Any] = {}
        self._streams: dict[int, Any] = {}

    def stream(self, ptr: int) -> Any:
        """The cuda.core stream for a CUDA stream handle (0: the legacy default stream)."""
        s = self._streams.get(ptr)
        if s is None:
            s = self._streams[ptr] = self._stream_type.from_handle(ptr)
        return s

    def __call__(self, kernel: Any, grid: tuple[int, ...], block: tuple[int, ...], stream: Any,
                 args: tuple[Any, ...]) -> None:
        key = (kernel, *("i" if isinstance(a, int) else (a.dtype.char, a.ndim) for a in args))
        compiled = self._kernels.get(key)
        if compiled is None:
            compiled = kernel.compile(signature(args))
            compiled.bind()  # loads the module into the current context, runs its set-up once
            compiled = self._kernels[key] = compiled._codelibrary.get_cufunc().kernel
        self._launch(stream, self._config(grid=grid, block=block), compiled, *kernel_params(args))


def signature(args: tuple[Any, ...]) -> tuple[Any, ...]:
    """numba's argument types for ``args``: C-contiguous arrays and Python ints (int64)."""
    from numba.cuda.np.numpy_support import from_dtype

    return tuple(types.int64 if isinstance(a, int)  # type: ignore[attr-defined]
                 else types.Array(from_dtype(a.dtype), a.ndim, "C") for a in args)  # type: ignore[attr-defined]


def kernel_params(args: tuple[Any, ...]) -> list[Any]:
    """The kernel parameters of ``args`` in numba's ABI (``_Kernel._prepare_args``): an array
    as ``meminfo, parent`` (null), ``nitems, itemsize, data``, its shape, its byte strides; an
    int as a C int64. Arrays need ``size, itemsize, data.ptr, shape, strides`` (CuPy's)."""
    params: list[Any] = []
    for a in args:
        if isinstance(a, int):
            params.append(ctypes.c_int64(a))
        else:
            params += (0, 0, a.size, a.itemsize, a.data.ptr, *a.shape, *a.strides)
    return params


def _flat(a: Any, default: Any = None) -> Any:
    """The flat 1-D view of a contiguous array; ``default`` for None (an unread placeholder)."""
    return default if a is None else a.reshape(a.size)


def _compute_type(dtype: Any) -> Any:
    # float16 is only storage: its arithmetic runs in float32 (as PyTorch's kernels do)
    return types.float64 if np.dtype(dtype) == np.float64 else types.float32  # type: ignore[attr-defined]


# ------------------------------------------------------------------ element math


@lru_cache(maxsize=None)
def _element_ops(ctype: Any, act: int, has_res: bool) -> tuple[Any, Any]:
    """Device functions ``forward(x, r, p, s, h) -> y`` and ``backward(x, dy, r, p, s, h) -> dy'``.

    All arguments are in the compute type ``ctype``. Literals are cast to it: a Python float
    would promote float32 arithmetic to float64 on the GPU (not under the simulator).
    """
    zero, one = ctype(0.0), ctype(1.0)

    @cuda.jit(device=True)
    def preact(x, r, p, s, h):  # pragma: no cover - compiled
        z = (x - p) * s + h
        if has_res:
            z = z + r
        return z

    @cuda.jit(device=True)
    def sigmoid(z):  # pragma: no cover - compiled
        return one / (one + ctype(math.exp(-z)))

    @cuda.jit(device=True)
    def forward(x, r, p, s, h):  # pragma: no cover - compiled
        z = preact(x, r, p, s, h)
        if act == 1:
            return zero if z <= zero else z  # NaN stays NaN, as in PyTorch's relu
        if act == 2:
            return sigmoid(z)
        return z

    @cuda.jit(device=True)
    def backward(x, dy, r, p, s, h):  # pragma: no cover - compiled
        if act == 0:
            return dy
        z = preact(x, r, p, s, h)
        if act == 1:
            return zero if z <= zero else dy  # a NaN z passes dy, as PyTorch's threshold_backward
        g = sigmoid(z)
        return dy * (g * (one - g))

    return forward, backward


# ------------------------------------------------------------------ kernels


@lru_cache(maxsize=None)
def _reduce_kernel(op: str, ctype: Any, act: int, has_res: bool, threads: int) -> Any:
    """Kernel ``(xf, dyf, rf, pivot, z_pivot, scale, shift, C, inner, count, partial)``.

    Leaves per block two float64 sums per feature in ``partial[:, chunk, c]``: of
    ``x - pivot`` and its square (op "moments"), or of dy' and ``dy' * (x - pivot)`` (op
    "grad"). ``threads`` (= TX * TY of the launch) sizes the shared memory.
    """
    _, backward = _element_ops(ctype, act, has_res)
    grad = op == "grad"
    f64 = types.float64  # type: ignore[attr-defined]

    @cuda.jit(device=True)
    def terms(x, dy, r, p64, p, s, h):  # pragma: no cover - compiled
        d = f64(x) - p64  # exact for float16/float32 x: both are float32 values
        if grad:
            g = f64(backward(ctype(x), ctype(dy), ctype(r), p, s, h))
            return g, g * d
        return d, d * d

    @cuda.jit
    def kernel(xf, dyf, rf, pivot, z_pivot, scale, shift, features, inner, count, partial):  # pragma: no cover
        sh1 = cuda.shared.array(threads, types.float64)
        sh2 = cuda.shared.array(threads, types.float64)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        nx, ny = cuda.blockDim.x, cuda.blockDim.y
        c = cuda.blockIdx.x * nx + tx
        chunk = cuda.blockIdx.y
        a1 = f64(0.0)
        a2 = f64(0.0)
        if c < features:  # idle lanes (c >= C) still take part in the block reduction
            p64 = pivot[c]
            p, s, h = ctype(z_pivot[c]), ctype(scale[c]), ctype(shift[c])
            t = chunk * ny + ty
            stride = cuda.gridDim.y * ny
            plane = features * inner
            dn = stride // inner
            di = stride - dn * inner
            step = dn * plane + di
            wrap = plane - inner
            n = t // inner
            i = t - n * inner
            off = n * plane + c * inner + i
            while t + (_UNROLL - 1) * stride < count:
                o0 = off
                o1, i = _advance(o0, i, step, di, inner, wrap)
                o2, i = _advance(o1, i, step, di, inner, wrap)
                o3, i = _advance(o2, i, step, di, inner, wrap)
                off, i = _advance(o3, i, step, di, inner, wrap)
                x0, x1, x2, x3 = xf[o0], xf[o1], xf[o2], xf[o3]
                # placeholders are not read (the branches fold away at compile time)
                y0, y1, y2, y3 = (dyf[o0], dyf[o1], dyf[o2], dyf[o3]) if grad else (x0, x1, x2, x3)
                r0, r1, r2, r3 = (rf[o0], rf[o1], rf[o2], rf[o3]) if has_res else (x0, x1, x2, x3)
                u0, v0 = terms(x0, y0, r0, p64, p, s, h)
                u1, v1 = terms(x1, y1, r1, p64, p, s, h)
                u2, v2 = terms(x2, y2, r2, p64, p, s, h)
                u3, v3 = terms(x3, y3, r3, p64, p, s, h)
                a1 += (u0 + u1) + (u2 + u3)
                a2 += (v0 + v1) + (v2 + v3)
                t += _UNROLL * stride
            while t < count:
                x0 = xf[off]
                u0, v0 = terms(x0, dyf[off] if grad else x0, rf[off] if has_res else x0, p64, p, s, h)
                a1 += u0
                a2 += v0
                off, i = _advance(off, i, step, di, inner, wrap)
                t += stride
        # fixed-order tree over TY for each lane: deterministic, no atomics
        k = ty * nx + tx
        sh1[k] = a1
        sh2[k] = a2
        cuda.syncthreads()
        half = ny // 2
        while half > 0:
            if ty < half:
                sh1[k] += sh1[k + half * nx]
                sh2[k] += sh2[k + half * nx]
            cuda.syncthreads()
            half //= 2
        if ty == 0 and c < features:
            partial[0, chunk, c] = sh1[tx]
            partial[1, chunk, c] = sh2[tx]

    return kernel


@lru_cache(maxsize=None)
def _map_kernel(op: str, ctype: Any, act: int, has_res: bool, has_out2: bool) -> Any:
    """Kernel ``(xf, dyf, rf, q0, ..., q6, C, inner, count, of, of2)``, elementwise.

    op "apply": q = (pivot, scale, shift), ``of = act(z)``. op "grad": q = (pivot, a, b, k,
    scale, shift, z_pivot), ``of = k * (dy' + a * (x - pivot) + b)`` and ``of2 = dy'`` if
    has_out2; op "grad_fixed": the same with ``of = k * dy'`` (a and b not read).
    Unused q slots and arrays are placeholders, never read.
    """
    forward, backward = _element_ops(ctype, act, has_res)
    grad = op in ("grad", "grad_fixed")
    fixed = op == "grad_fixed"

    @cuda.jit(device=True)
    def element(x, dy, r, q0, q1, q2, q3, q4, q5, q6):  # pragma: no cover - compiled
        if grad:
            g = backward(x, dy, r, q6, q4, q5)
            if fixed:
                return q3 * g, g
            return q3 * (g + q1 * (x - q0) + q2), g
        y = forward(x, r, q0, q1, q2)
        return y, y

    @cuda.jit
    def kernel(xf, dyf, rf, c0, c1, c2, c3, c4, c5, c6, features, inner, count, of, of2):  # pragma: no cover
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        nx, ny = cuda.blockDim.x, cuda.blockDim.y
        c = cuda.blockIdx.x * nx + tx
        if c >= features:
            return  # no block-wide synchronization here: idle lanes may leave
        q0, q1, q2 = ctype(c0[c]), ctype(c1[c]), ctype(c2[c])
        q3, q4, q5, q6 = ctype(c3[c]), ctype(c4[c]), ctype(c5[c]), ctype(c6[c])
        t = cuda.blockIdx.y * ny + ty
        stride = cuda.gridDim.y * ny
        plane = features * inner
        dn = stride // inner
        di = stride - dn * inner
        step = dn * plane + di
        wrap = plane - inner
        n = t // inner
        i = t - n * inner
        off = n * plane + c * inner + i
        while t + (_UNROLL - 1) * stride < count:
            o0 = off
            o1, i = _advance(o0, i, step, di, inner, wrap)
            o2, i = _advance(o1, i, step, di, inner, wrap)
            o3, i = _advance(o2, i, step, di, inner, wrap)
            off, i = _advance(o3, i, step, di, inner, wrap)
            # all loads first: stores to of could alias xf for all the compiler knows
            x0, x1, x2, x3 = ctype(xf[o0]), ctype(xf[o1]), ctype(xf[o2]), ctype(xf[o3])
            y0, y1, y2, y3 = x0, x1, x2, x3  # placeholders, not read (folded at compile time)
            if grad:
                y0, y1, y2, y3 = ctype(dyf[o0]), ctype(dyf[o1]), ctype(dyf[o2]), ctype(dyf[o3])
            r0, r1, r2, r3 = x0, x1, x2, x3
            if has_res:
                r0, r1, r2, r3 = ctype(rf[o0]), ctype(rf[o1]), ctype(rf[o2]), ctype(rf[o3])
            e0, g0 = element(x0, y0, r0, q0, q1, q2, q3, q4, q5, q6)
            e1, g1 = element(x1, y1, r1, q0, q1, q2, q3, q4, q5, q6)
            e2, g2 = element(x2, y2, r2, q0, q1, q2, q3, q4, q5, q6)
            e3, g3 = element(x3, y3, r3, q0, q1, q2, q3, q4, q5, q6)
            of[o0] = e0
            of[o1] = e1
            of[o2] = e2
            of[o3] = e3
            if has_out2:
                of2[o0] = g0
                of2[o1] = g1
                of2[o2] = g2
                of2[o3] = g3
            t += _UNROLL * stride
        while t < count:
            x0 = ctype(xf[off])
            y0 = ctype(dyf[off]) if grad else x0
            r0 = ctype(rf[off]) if has_res else x0
            e0, g0 = element(x0, y0, r0, q0, q1, q2, q3, q4, q5, q6)
            of[off] = e0
            if has_out2:
                of2[off] = g0
            off, i = _advance(off, i, step, di, inner, wrap)
            t += stride

    return kernel


@cuda.jit(device=True)
def _advance(off, i, step, di, inner, wrap):  # pragma: no cover - compiled
    """The flat offset and in-plane index ``stride`` values further along one feature."""
    off += step
    i += di
    if i >= inner:
        i -= inner
        off += wrap
    return off, i


@lru_cache(maxsize=None)
def _merge_kernel() -> Any:
    """Kernel ``(partial, out)``: ``out[k, c] = sum over chunks of partial[k, chunk, c]``.

    Block (MX, MY), grid (ceil(C / MX), 2): lane ``tx`` is feature c, grid row k the sum;
    thread ``ty`` adds chunks ty, ty + MY, ... (four loads in flight), then a tree over MY
    in shared memory. The order depends only on the shapes: deterministic. Lanes read
    neighbouring partial sums (coalesced).
    """

    @cuda.jit
    def kernel(partial, out):  # pragma: no cover - compiled
        sh = cuda.shared.array(_MERGE_THREADS, types.float64)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        nx, ny = cuda.blockDim.x, cuda.blockDim.y
        c = cuda.blockIdx.x * nx + tx
        k = cuda.blockIdx.y
        chunks = partial.shape[1]
        acc = types.float64(0.0)
        if c < out.shape[1]:
            j = ty
            while j + 3 * ny < chunks:
                v0, v1 = partial[k, j, c], partial[k, j + ny, c]
                v2, v3 = partial[k, j + 2 * ny, c], partial[k, j + 3 * ny, c]
                acc += (v0 + v1) + (v2 + v3)
                j += 4 * ny
            while j < chunks:
                acc += partial[k, j, c]
                j += ny
        i = ty * nx + tx
        sh[i] = acc
        cuda.syncthreads()
        half = ny // 2
        while half > 0:
            if ty < half:
                sh[i] += sh[i + half * nx]
            cuda.syncthreads()
            half //= 2
        if ty == 0 and c < out.shape[1]:
            out[k, c] = sh[tx]

    return kernel


#: ``probe_kernel``'s launch: a float64 array of PROBE_SIZE, the int PROBE_N, one block.
PROBE_SIZE, PROBE_N, PROBE_GRID, PROBE_BLOCK = 37, 7, (1,), (64,)


@lru_cache(maxsize=None)
def probe_kernel() -> Any:
    """Kernel ``(a, n)``: ``a[i] = 10 n + a.size + i``; ``check_probe`` checks what it wrote."""

    @cuda.jit
    def kernel(a, n):  # pragma: no cover - compiled
        i = cuda.grid(1)
        if i < a.size:
            a[i] = n * 10 + a.size + i

    return kernel


def check_probe(got: Any) -> None:
    """Raise unless ``got`` (host float64) is what ``probe_kernel`` writes at PROBE_SIZE, PROBE_N."""
    expected = np.arange(PROBE_SIZE, dtype=np.float64) + (10 * PROBE_N + PROBE_SIZE)
    if not np.array_equal(got, expected):
        raise RuntimeError(f"probe kernel wrote {got[:4]}..., expected {expected[:4]}...")


def probe() -> None:
    """Compile and run a tiny kernel through numba now; raise if that fails or errs.

    ``numba.cuda.is_available()`` only finds a driver and a device: the compiler may still
    fail on its first kernel (numba-cuda 0.30.4 on NumPy 2.5 raises ``AttributeError:
    module 'numpy' has no attribute 'row_stack'`` while loading its typing registries, seen
    on an H200). ``CudaPath`` calls this once, before it serves anything.
    """
    a = cuda.device_array(PROBE_SIZE, np.float64)
    _dispatch(probe_kernel(), PROBE_GRID, PROBE_BLOCK, 0, (a, PROBE_N))
    check_probe(a.copy_to_host())
