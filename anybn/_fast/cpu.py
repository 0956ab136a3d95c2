"""The CPU fast path: NumPy float32/float64 arrays through fused numba kernels on threads.

It serves C-contiguous ``numpy.ndarray`` inputs of float32 or float64 with the kernels of
:class:`anybn._kernels.Kernels` (the coefficients between them are the shared array-API
code of ``anybn._steps``):

- ``moments``: one pass over x, float64 sums of x shifted by its first sample per feature;
- ``apply``: one pass, x read once, y written once;
- ``grad_sums``: one pass, x and dy read once;
- ``grad_apply``: one pass, x and dy read again, dx written once.

Batch normalization itself, fused with an activation or not, takes the whole steps
(``train_whole``, ``eval_whole``, ``backward_whole``): the same passes and the coefficient
formulas compiled together in one call, so no Python runs between the passes. Planes
(NCHW) go by groups of features of a few MiB, each group's sums, coefficients and apply in
turn, so that the apply reads x (and dy) from cache rather than memory. The stages serve
the variants (residual, renormalization, ghost, synchronized) and the cases the whole steps
decline.

A whole step that reads and writes at least twice the last-level cache writes its output
with streaming stores (``_stream``), into an output aligned to 64 bytes.

Apart from y (or dx), every allocation is O(C). Work is split into contiguous ranges of
rows, planes or groups of features, a few per thread, run on numba's own thread pool
(``prange``, on the OpenMP or TBB threading layer), whose workers answer in microseconds;
handing ranges to Python threads cost ~80 us per pass on 2-core VMs, more than a pass over
16 MiB takes (docs/benchmarks.md has the measurement). Where numba's pool cannot serve (its
``workqueue`` layer, which is not thread-safe, or a process forked after the pool started,
where GNU OpenMP would abort), the same ranges go to Python threads instead (the kernels
release the GIL), with the same results to the bit. Small inputs run on the calling thread
(larger ones too where OpenMP's workers sleep between regions, ``OMP_WAIT_POLICY=PASSIVE``).
``ANYBN_NUM_THREADS`` caps the thread count (read at each call); the default is the number
of CPUs this process may run on.

numba is imported on the first call this path serves, not when anybn is imported, and its
machine code is cached on disk (see ``_cpu_kernels``).

How a whole step runs on a shape (its ranges, threads, streaming, kernel) is worked out once
and kept, per shape, dtype, axis and thread settings (``_Plan``). Plain NumPy calls reach
it by an express route (``train_express``, ``eval_express``, ``backward_express``) that the
public functions try first: the common case checked in one function, the rest declined to
the usual route, the same bits either way.
"""

from __future__ import annotations

import itertools
import math
import os
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any, NamedTuple

import numpy as np

from .._env import EnvSetting
from .._kernels import Activation
from .._layout import Layout, plain_numpy_layout, plain_vectors
from .._moments import GradSums, Sums
from .._saved import BatchNormSaved

__all__ = ["CpuPath"]

# Below this many bytes of x a call runs on the calling thread: handing work to another
# thread costs ~20-40 us, more than the kernels take on such inputs.
_PARALLEL_MIN_BYTES = 1 << 19
# ... and below this many where OpenMP's workers sleep between parallel regions
# (OMP_WAIT_POLICY=PASSIVE, as `anybn bench` sets for PyTorch's sake): each region then
# pays their wake-up, ~50 us on a 2-core VM. 2 threads over 1, NCHW float32 (train /
# backward / eval): 1.61 / 1.30 / 2.42 at 1 MiB, 1.15 / 0.91 / 1.62 at 2 MiB, 0.89 / 0.70 /
# 1.13 at 4 MiB, 0.67 / 0.57 / 0.72 at 8 MiB (spinning workers: 0.71 / 0.63 / 0.83 at 1 MiB).
_PASSIVE_MIN_BYTES = 1 << 23

# Ranges per thread: claimed in turn, on numba's pool as on Python threads (see
# ``_cpu_kernels._claim``), so that a core shared with another process slows a pass by a
# fraction of a range rather than by half the work. Each costs ~5 us and, for the sums, 16
# bytes per feature.
_RANGES_PER_THREAD = 4

# Planes training steps go by groups of features of about this many bytes of x (and dy), so
# that a group's apply finds its planes still in the cache its sums read them into: 1.6 to
# 6.4 MB groups took 0.75-0.8x the time of two passes over all of x on (32, 256, 56, 56)
# float32 (98 MiB, 2 threads; 32 MiB L3), groups of one feature 1.4x (short streams). At
# least this many features per thread, so that threads get shares within 25% of each other.
_GROUP_BYTES = 4 << 20
_FEATURES_PER_THREAD = 4

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_F32, _F64 = _DTYPES
_NUMPY_NAMESPACES = frozenset({"numpy", "array_api_compat.numpy"})


def _last_level_cache_bytes(sysfs: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest CPU cache's size in bytes: from Linux's sysfs (``index*/size``, e.g.
    ``32768K``), else ``sysconf``, else 32 MiB."""
    sizes = []
    for index in sysfs.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            unit = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            sizes.append(int(text.rstrip("KMG")) * unit)
        except (OSError, ValueError):
            continue
    if not sizes:
        try:
            sizes.append(os.sysconf("SC_LEVEL3_CACHE_SIZE"))
        except (ValueError, OSError, AttributeError):
            pass
    largest = max(sizes, default=0)
    return largest if largest > 0 else 32 << 20


# A whole step whose inputs and output together are at least twice the last-level cache
# writes its output with streaming stores (see ``_stream``): little of the output could
# stay in cache for its next reader, and a plain store reads each line before writing it.
# Smaller steps keep plain stores and leave the output in cache. Streaming needs runs (a
# row, or a plane) of whole 64-byte lines in an output aligned to 64 bytes: a plain store
# into a line beside streamed ones stalls (rows of 64 float32 offset by 32 bytes: 9x slower).
_STREAM_CACHE_BYTES = _last_level_cache_bytes()
_LINE = 64
_PAGE = 4096


def _thread_cap(value: str | None) -> int | None:
    """``ANYBN_NUM_THREADS`` parsed: a positive integer, or None when unset or blank."""
    value = (value or "").strip()
    if not value:
        return None
    try:
        return max(1, int(value))
    except ValueError:
        raise ValueError(f"ANYBN_NUM_THREADS must be a positive integer, got {value!r}") from None


def _passive(value: str | None) -> bool:
    return (value or "").strip().upper() == "PASSIVE"


# read at each call (see anybn._env for how, cheaply)
_THREAD_CAP = EnvSetting("ANYBN_NUM_THREADS", _thread_cap)
_WAIT_POLICY_PASSIVE = EnvSetting("OMP_WAIT_POLICY", _passive)


def _num_threads(cores: Callable[[], int]) -> int:
    """``ANYBN_NUM_THREADS`` (read at each call) if set, else ``cores()``."""
    cap = _THREAD_CAP()
    return cores() if cap is None else cap


def _usable_cores() -> int:
    """The cores this process may run on (its affinity mask), else the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _passive_workers() -> bool:
    """Whether OpenMP's workers sleep between parallel regions (``OMP_WAIT_POLICY=PASSIVE``)."""
    return _WAIT_POLICY_PASSIVE()


class _Threads:
    """A pool of worker threads, created on first use and grown when more are asked for."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._size = 0

    def run(self, task: Callable[[int, int, int], None], units: int, parts: int, workers: int) -> None:
        """Call ``task(part, lo, hi)`` for ``parts`` contiguous ranges covering ``range(units)``.

        ``workers`` threads (the caller and ``workers - 1`` from the pool) take the ranges in
        turn, so a thread slowed by another process on its core takes fewer of them.
        """
        bounds = [units * i // parts for i in range(parts + 1)]
        if workers == 1:
            for i in range(parts):
                task(i, bounds[i], bounds[i + 1])
            return
        claim = itertools.count()  # next() is atomic under the GIL

        def drain() -> None:
            for i in iter(claim.__next__, None):
                if i >= parts:
                    return
                task(i, bounds[i], bounds[i + 1])

        pool = self._get(workers - 1)
        futures = [pool.submit(drain) for _ in range(workers - 1)]
        drain()
        for future in futures:
            future.result()

    def _get(self, workers: int) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None or self._size < workers:
                # a smaller pool is dropped, not shut down: another thread may be submitting
                # to it; its idle workers exit when it is collected
                self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="anybn")
                self._size = workers
            return self._pool


class _View:
    """The folded x of a Layout as the kernels take it: rows (R, C) when the features are
    contiguous (inner == 1), else planes (N, C, L), and the number of work units."""

    def __init__(self, layout: Layout) -> None:
        self.features = layout.features
        self.rows = layout.inner == 1
        self.folded = (layout.outer, layout.features) if self.rows else layout.folded_shape
        self.units = layout.outer if self.rows else layout.outer * layout.features
        self.count = layout.per_feature

    def fold(self, a: np.ndarray) -> np.ndarray:
        return a.reshape(self.folded)


class _Plan(NamedTuple):
    """How a whole step runs on one shape, dtype and axis under the thread settings of the
    moment: worked out once (``CpuPath._plan``) and kept (``CpuPath._planned``)."""

    layout: Layout
    view: _View
    folds: bool  # x must be reshaped to view.folded (not already of that shape)
    stream: bool  # streaming stores (see _streams)
    parts: int
    threads: int  # on numba's pool where it can serve (_pool_ok), else Python threads
    kernel: str  # "{step}_{rows|planes}_whole"; "_par" appended on the pool
    by_groups: bool  # planes training steps: the kernel takes the parts (groups of features)


# the plans a CpuPath keeps (shapes, dtypes, axes and thread settings seen), and a marker
_PLANS_KEPT = 64
_UNPLANNED = object()


def _whole_backward_serves(saved: BatchNormSaved) -> bool:
    """Whether the whole backward serves ``saved``: batch statistics with their pivot, fused
    with an activation or not, no residual."""
    act = saved.act
    return saved.batch_stats and saved.pivot is not None and (act is None or act.residual is None)


class CpuPath:
    """The fused CPU kernels; see the module docstring for what they serve."""

    name = "cpu-numba"
    centering_is_free = True  # the apply subtracts the pivot in the same fused pass
    writes_out = True  # apply and grad_apply take out=: a slice of a larger result (ghost BN)

    def __init__(self) -> None:
        self._kernels: ModuleType | None = None
        self._unavailable = False
        self._threads = _Threads()
        self._pool_lock = threading.Lock()
        self._pool_pid: int | None = None  # the process numba's pool started in; -1: unusable
        self._on_pool: _OnPool = _no_pool  # runs a kernel on numba's pool, once the pool has started
        self._usable = 0  # this process's usable cores, once read
        self._plans: dict[tuple[Any, ...], _Plan | None] = {}  # see _planned
        _PATHS.add(self)  # a forked child resets both (_after_fork_in_child)

    # ------------------------------------------------------------------ selection

    def serves(self, step: str, xp: Any, arrays: tuple[Any, ...]) -> bool:
        # NumPy's namespace (the module or array-api-compat's wrapper), read without a call:
        # see plain_numpy_layout for why each step of a large call's Python counts
        if getattr(xp, "__name__", None) not in _NUMPY_NAMESPACES:
            return False
        dtype = arrays[0].dtype
        if dtype not in _DTYPES:
            return False
        for a in arrays:  # exact ndarray: subclasses (masked, matrix) keep the generic path
            if type(a) is not np.ndarray or a.dtype != dtype or not a.flags.c_contiguous:
                return False
        return self._load() is not None

    def coefficient_dtype(self, xp: Any, x: np.ndarray) -> Any:
        return np.float64  # the kernels' sums are float64 whatever x's dtype

    @property
    def _k(self) -> ModuleType:
        """The kernels module; only called after ``serves`` has loaded it."""
        assert self._kernels is not None
        return self._kernels

    def _load(self) -> ModuleType | None:
        if self._kernels is None and not self._unavailable:
            try:
                from . import _cpu_kernels
            except ImportError:  # numba missing or broken: the generic path serves, silently
                self._unavailable = True
            else:
                self._kernels = _cpu_kernels
        return self._kernels

    # ------------------------------------------------------------------ the kernels

    def moments(self, xp: Any, x: np.ndarray, layout: Layout) -> Sums:
        view = _View(layout)
        xv = view.fold(x)
        # float64 sums of x - (one sample of each feature): exact enough at any offset
        first = (xv[0] if view.rows else xv[0, :, 0]).astype(np.float64)
        kernel = self._k.moments_rows if view.rows else self._k.moments_planes
        s1, s2 = self._reduce(kernel, view, (xv, first))
        if view.rows and not np.all(np.isfinite(s2)):
            # the rows kernel sums blocks in x's dtype: squares of float32 deviations past
            # ~1.8e19 overflow there, so such inputs (and NaN/inf ones) are summed again in float64
            s1, s2 = self._reduce(self._k.moments_rows64, view, (xv, first))
        return Sums(view.count, first, s1, s2)

    def apply(self, xp: Any, x: np.ndarray, layout: Layout, pivot: Any, scale: Any, shift: Any, *,
              scratch: Any = None, activation: str | None = None, residual: Any = None,
              out: np.ndarray | None = None) -> np.ndarray:
        view = _View(layout)
        c, dtype = view.features, x.dtype
        coef = (_vector(pivot, dtype, c), _vector(scale, dtype, c), _vector(shift, dtype, c))
        xv = view.fold(x)
        if activation is None and residual is None:
            return self._affine(view, xv, *coef, out=_out(view, out, xv)).reshape(x.shape)
        y = _out(view, out, xv)
        kernel = self._k.affine_act_rows if view.rows else self._k.affine_act_planes
        args = (xv, *coef, _folded_or_empty(view, residual, dtype), self._k.ACT_CODES[activation])
        self._map(kernel, args, (y,), view, x.nbytes)
        return y.reshape(x.shape)

    def grad_sums(self, xp: Any, x: np.ndarray, dy: np.ndarray, layout: Layout, pivot: Any, *,
                  act: Any = None) -> GradSums:
        view = _View(layout)
        args: tuple[Any, ...] = (view.fold(x), view.fold(dy), _vector(pivot, np.float64, view.features))
        if act is None:
            kernel = self._k.grad_sums_rows if view.rows else self._k.grad_sums_planes
        else:
            kernel = self._k.grad_sums_act_rows if view.rows else self._k.grad_sums_act_planes
            args += _act_args(self._k, view, act, x.dtype)
        sum_dy, sum_dy_d = self._reduce(kernel, view, args)
        if view.rows and act is None and not np.all(np.isfinite(sum_dy_d)):  # as in moments
            sum_dy, sum_dy_d = self._reduce(self._k.grad_sums_rows64, view, args)
        return GradSums(sum_dy, None if pivot is None else sum_dy_d)

    def grad_apply(self, xp: Any, x: np.ndarray, dy: np.ndarray, layout: Layout, pivot: Any, a: Any, b: Any,
                   k: Any, *, scratch: Any = None, act: Any = None, out: np.ndarray | None = None) -> Any:
        view = _View(layout)
        c, dtype = view.features, x.dtype
        dyv = view.fold(dy)
        if act is not None:
            return self._grad_apply_act(view, x, dyv, pivot, a, b, k, act)
        if a is None:  # dx = k * dy
            zeros = np.zeros(c, dtype=dtype)
            return self._affine(view, dyv, zeros, _vector(k, dtype, c), zeros, out=_out(view, out, dyv)).reshape(x.shape)
        xv = view.fold(x)
        dx = _out(view, out, xv)
        kernel = self._k.grad_input_rows if view.rows else self._k.grad_input_planes
        args = (xv, dyv) + tuple(_vector(v, dtype, c) for v in (pivot, a, b, k))
        self._map(kernel, args, (dx,), view, x.nbytes)
        return dx.reshape(x.shape)

    def _grad_apply_act(self, view: _View, x: np.ndarray, dyv: np.ndarray, pivot: Any, a: Any, b: Any, k: Any,
                        act: Any) -> Any:
        c, dtype = view.features, x.dtype
        xv = view.fold(x)
        dx = np.empty_like(xv)
        dres = np.empty_like(xv) if act.residual is not None else np.empty((0,) * xv.ndim, dtype=dtype)
        kernel = self._k.grad_input_act_rows if view.rows else self._k.grad_input_act_planes
        # fixed statistics (a is None): an empty a, so that the kernels leave out the term in
        # x, whose 0 * inf would make dx NaN where x is infinite
        fixed = a is None
        args = (xv, dyv, _vector(pivot, dtype, c), _ABSENT_X[dtype] if fixed else _vector(a, dtype, c),
                _vector(b, dtype, c), _vector(k, dtype, c)) + _act_args(self._k, view, act, dtype)
        self._map(kernel, args, (dx, dres), view, x.nbytes)
        if act.residual is None:
            return dx.reshape(x.shape)
        return dx.reshape(x.shape), dres.reshape(x.shape)

    # ----------------------------------------------- whole steps in one call (plain BN only)
    # None where they cannot serve (numba's pool unusable on several threads, or too few
    # features to split planes by): the stages serve then.

    def train_whole(self, xp: Any, x: np.ndarray, layout: Layout, weight: Any, bias: Any, eps: float, *,
                    activation: str | None = None) -> tuple[np.ndarray, BatchNormSaved] | None:
        plan = self._planned("train", x, layout.axis, layout)
        return None if plan is None else self._train(plan, x, weight, bias, eps, activation)

    def eval_whole(self, xp: Any, x: np.ndarray, layout: Layout, mean: Any, var: Any, weight: Any, bias: Any,
                   eps: float, *, activation: str | None = None) -> np.ndarray | None:
        plan = self._planned("eval", x, layout.axis, layout)
        assert plan is not None  # only training steps decline
        return self._eval(plan, x, np.asarray(mean), np.asarray(var), weight, bias, eps,
                          self._k.ACT_CODES[activation])

    def backward_whole(self, xp: Any, dy: np.ndarray, saved: BatchNormSaved,
                       layout: Layout) -> tuple[np.ndarray, Any, Any] | None:
        if not _whole_backward_serves(saved):
            return None
        plan = self._planned("backward", saved.x, layout.axis, layout)
        return None if plan is None else self._backward(plan, dy, saved)

    # ----------------------------------------------- the express route of plain NumPy calls

    def train_express(self, x: Any, weight: Any, bias: Any, axis: Any,
                      eps: Any) -> tuple[np.ndarray, BatchNormSaved] | None:
        """``batch_norm_train(x, weight, bias, axis=axis, eps=eps)`` in one step, or None.

        The plain call (exact C-contiguous float32/float64 ndarrays, vectors of shape (C,)
        and x's dtype or None, a Python int axis in range, a finite float eps > 0, a step this
        path serves) skips the usual route's layers: validation, the path's choice and the
        plan are one function and a cached plan, and the kernels, their plan and the results
        are the usual route's (``tests/test_express.py``: the same bits). Anything else,
        errors included, returns None and takes the usual route, which decides and words
        the errors. Why: a call comes right after the previous call's passes have swept
        megabytes through the CPU's caches, and there each layer of Python is a run of cache
        misses: after a 128 MiB sweep, a 1 MiB inference's Python took ~140-195 us more than
        a bare kernel call by the usual route, ~100-115 by this one, and ~40 written out in a
        single function, without the layers kept here for clarity (docs/benchmarks.md).
        """
        plan = self._express_plan("train", x, axis, eps)
        if plan is None or not plain_vectors((weight, bias), 0, plan.layout.features, x.dtype):
            return None
        return self._train(plan, x, weight, bias, eps, None)

    def eval_express(self, x: Any, mean: Any, var: Any, weight: Any, bias: Any, axis: Any,
                     eps: Any) -> np.ndarray | None:
        """``batch_norm_eval(x, mean, var, weight, bias, axis=axis, eps=eps)`` in one step, or
        None: as ``train_express``, with mean and var required."""
        plan = self._express_plan("eval", x, axis, eps)
        if plan is None or not plain_vectors((mean, var, weight, bias), 2, plan.layout.features, x.dtype):
            return None
        return self._eval(plan, x, mean, var, weight, bias, eps, 0)

    def backward_express(self, dy: Any, saved: Any) -> tuple[np.ndarray, Any, Any] | None:
        """``batch_norm_backward(dy, saved)`` in one step, or None: as ``train_express``, for a
        ``saved`` of a training forward (fused with an activation or not, no residual) on an
        exact C-contiguous ndarray x, and dy an exact C-contiguous ndarray of x's shape and
        dtype."""
        if type(saved) is not BatchNormSaved or type(dy) is not np.ndarray or self._kernels is None:
            return None
        x, layout = saved.x, saved.layout
        if (type(x) is not np.ndarray or layout is None or saved.r is not None or saved.groups is not None
                or saved.comm is not None or not _whole_backward_serves(saved)):
            return None  # renormalized, ghost and synchronized states: functional's own routes
        dtype = x.dtype
        if ((dtype is not _F32 and dtype is not _F64 and dtype not in _DTYPES) or dy.shape != x.shape
                or (dy.dtype is not dtype and dy.dtype != dtype) or not x.flags.c_contiguous
                or not dy.flags.c_contiguous or layout.shape != x.shape):
            return None
        plan = self._planned("backward", x, layout.axis, layout)
        return None if plan is None else self._backward(plan, dy, saved)

    def _express_plan(self, step: str, x: Any, axis: Any, eps: Any) -> _Plan | None:
        """The cached plan of ``step`` for a plain call's x, axis and eps, or None."""
        if (type(x) is not np.ndarray or type(axis) is not int or type(eps) is not float
                or not 0.0 < eps < math.inf or self._kernels is None or not x.flags.c_contiguous):
            return None
        dtype = x.dtype
        ndim = x.ndim
        if not -ndim <= axis < ndim or (dtype is not _F32 and dtype is not _F64 and dtype not in _DTYPES):
            return None  # (the native float dtypes are those objects, save in odd cases)
        return self._planned(step, x, axis % ndim)

    # ----------------------------------------------- plans, and the steps they run

    def _planned(self, step: str, x: np.ndarray, axis: int, layout: Layout | None = None) -> _Plan | None:
        """``_plan`` for x (float32 or float64) and its normalized feature axis, kept per
        shape, dtype, axis and the thread settings read at each call (``ANYBN_NUM_THREADS``,
        ``OMP_WAIT_POLICY``); a forked child starts afresh. ``layout``: x's, where known;
        else folded here on a new shape (None for x the fold does not take)."""
        # OMP_WAIT_POLICY only decides below _PASSIVE_MIN_BYTES (see _split); each read costs
        passive = x.nbytes < _PASSIVE_MIN_BYTES and _passive_workers()
        key = (step, x.shape, x.dtype.char, axis, _THREAD_CAP(), passive)
        plan = self._plans.get(key, _UNPLANNED)
        if plan is _UNPLANNED:
            layout = layout if layout is not None else plain_numpy_layout(x, axis, {}, ())
            plan = None if layout is None else self._plan(step, x, layout)
            if len(self._plans) >= _PLANS_KEPT:
                self._plans.clear()
            self._plans[key] = plan
        return plan  # type: ignore[return-value]

    def _plan(self, step: str, x: np.ndarray, layout: Layout) -> _Plan | None:
        """How ``step`` ("train", "eval", "backward") runs on x: None where the stages serve."""
        view = _View(layout)
        moved = {"train": 2, "eval": 2, "backward": 3}[step] * x.nbytes
        if step == "train" and layout.per_feature < 2:
            return None  # functional refuses it; the stages would too
        split = self._whole_split(view, (2 if step == "backward" else 1) * x.nbytes, by_feature=step != "eval")
        if split is None:
            return None
        parts, threads = split
        stream = x.nbytes >= _PARALLEL_MIN_BYTES and _streams(view, moved, x.itemsize)
        return _Plan(layout, view, view.folded != layout.shape, stream, parts, threads,
                     f"{step}_{'rows' if view.rows else 'planes'}_whole", not view.rows and step != "eval")

    def _train(self, plan: _Plan, x: np.ndarray, weight: Any, bias: Any, eps: float,
               activation: str | None) -> tuple[np.ndarray, BatchNormSaved]:
        view, layout = plan.view, plan.layout
        xv = x.reshape(view.folded) if plan.folds else x
        coef = np.empty((6, view.features), dtype=x.dtype)  # pivot, scale, shift, invstd, var, delta
        y = _empty(xv, plan.stream, self._k)
        w = weight if type(weight) is np.ndarray else _given(weight)  # no call for the common case
        b = bias if type(bias) is np.ndarray else _given(bias)
        args = (xv, eps, w, b, self._k.ACT_CODES[activation], plan.stream)
        # what is returned is built before the kernel fills it: after the kernel's passes,
        # each line of Python run is a cache miss (these ones took ~40 us there, see _empty)
        pivot, scale, shift, invstd, var, delta = coef
        saved = BatchNormSaved(x=x, mean=pivot, invstd=invstd, var=var, weight=weight, has_bias=bias is not None,
                               axis=layout.axis, eps=eps, count=view.count, pivot=pivot, delta=delta, layout=layout)
        if activation is not None:  # backward recomputes z from x and these
            saved.act = Activation(activation, pivot, scale, shift, None)
        result = (y.reshape(x.shape) if plan.folds else y), saved
        self._run_whole(plan, args, y, coef)
        return result

    def _eval(self, plan: _Plan, x: np.ndarray, mean: np.ndarray, var: np.ndarray, weight: Any, bias: Any,
              eps: float, act: int) -> np.ndarray:
        view = plan.view
        xv = x.reshape(view.folded) if plan.folds else x
        coef = np.empty((3, view.features), dtype=x.dtype)
        y = _empty(xv, plan.stream, self._k)
        result = y.reshape(x.shape) if plan.folds else y  # before the pass, as in _train
        w = weight if type(weight) is np.ndarray else _given(weight)  # as in _train
        b = bias if type(bias) is np.ndarray else _given(bias)
        args = (xv, mean, var, eps, w, b, act, plan.stream)
        if plan.threads > 1 and not self._pool_ok():  # Python threads: the coefficients, then the pass
            self._k.eval_coefficients(*args[1:6], coef)
            self._threads.run(lambda i, lo, hi: self._apply_range(view, xv, coef, act, plan.stream, lo, hi, y),
                              view.units, plan.parts, plan.threads)
        else:
            self._run_whole(plan, args, y, coef)
        return result

    def _backward(self, plan: _Plan, dy: np.ndarray, saved: BatchNormSaved) -> tuple[np.ndarray, Any, Any]:
        x, act, view = saved.x, saved.act, plan.view
        dtype = x.dtype
        xv, dyv = (x.reshape(view.folded), dy.reshape(view.folded)) if plan.folds else (x, dy)
        dx = _empty(xv, plan.stream, self._k)
        coef = np.empty((5, view.features), dtype=dtype)  # a, b, k, dweight, dbias
        fused = _NO_ACTIVATION[dtype]
        if act is not None:
            c = view.features
            fused = (self._k.ACT_CODES[act.kind], _vector(act.pivot, dtype, c), _vector(act.scale, dtype, c),
                     _vector(act.shift, dtype, c))
        # the saved vectors as the kernels take them, without a call where they are so already
        # (a training forward on this path saved them so)
        pivot, invstd, weight, delta = saved.pivot, saved.invstd, saved.weight, saved.delta
        pivot = pivot if type(pivot) is np.ndarray and pivot.dtype is dtype else np.asarray(pivot, dtype=dtype)
        invstd = invstd if type(invstd) is np.ndarray else np.asarray(invstd)
        weight = weight if type(weight) is np.ndarray else _given(weight)
        delta = delta if type(delta) is np.ndarray else np.asarray(delta)
        args = (xv, dyv, pivot, invstd, weight, delta, True, *fused, plan.stream)
        result = (dx.reshape(x.shape) if plan.folds else dx, None if saved.weight is None else coef[3],
                  coef[4] if saved.has_bias else None)  # before the passes, as in _train
        self._run_whole(plan, args, dx, coef)
        return result

    def _run_whole(self, plan: _Plan, args: tuple[Any, ...], out: np.ndarray, coef: np.ndarray) -> None:
        """``plan.kernel`` (``_par`` on numba's pool) as ``plan`` says. The kernels are looked
        up by name, and the pool's state read, at each call: a kernel replaced on the module
        is the one run."""
        if plan.threads > 1 and self._pool_ok():
            self._on_pool(plan.threads, getattr(self._k, plan.kernel + "_par"), (*args, plan.parts, out, coef))
        elif plan.threads > 1:  # the same kernels on Python threads: the same bits
            threaded = self._train_threaded if plan.kernel.startswith("train") else self._backward_threaded
            threaded(plan.view, args, plan.parts, plan.threads, out, coef)
        elif plan.by_groups:  # planes training steps: the groups of features in turn
            getattr(self._k, plan.kernel)(*args, plan.parts, out, coef)
        else:
            getattr(self._k, plan.kernel)(*args, out, coef)

    def _whole_split(self, view: _View, nbytes: int, by_feature: bool = True) -> tuple[int, int] | None:
        """(parts, threads) for a whole step over ``nbytes`` (x, or x and dy), or None where
        the stages should serve.

        Rows, and planes inference (``by_feature=False``): the ranges of ``_split``. Planes
        training steps go by groups of features (see ``train_planes_features``): groups of
        about ``_GROUP_BYTES``, a multiple of the threads so that each gets as many. On
        several threads, None where a thread would get fewer than ``_FEATURES_PER_THREAD``
        features (C = 3 on 2 threads: the stages split planes evenly) or where one feature
        alone is larger than a group (its sums and its apply would not meet in cache).
        """
        parts, threads = self._split(view, nbytes)
        if by_feature and not view.rows and nbytes >= _PARALLEL_MIN_BYTES:
            features = view.features
            per_feature = max(1, nbytes // features)
            if threads > 1 and (features < _FEATURES_PER_THREAD * threads or per_feature > _GROUP_BYTES):
                return None
            groups = -(-features // max(1, _GROUP_BYTES // per_feature))  # ceiling divisions
            parts = min(features, -(-groups // threads) * threads)
        return parts, threads

    def _train_threaded(self, view: _View, args: tuple[Any, ...], parts: int, threads: int, y: np.ndarray,
                        coef: np.ndarray) -> None:
        """``train_*_whole_par`` on Python threads (where numba's pool cannot serve)."""
        k, xv, act, stream = self._k, args[0], args[4], args[5]
        if not view.rows:
            self._threads.run(lambda i, lo, hi: k.train_planes_features(*args, lo, hi, y, coef),
                              view.features, parts, threads)
            return
        first = xv[0].astype(np.float64)
        partial = self._partial_sums((k.moments_rows, k.moments_rows64), (xv, first), view, parts, threads)
        k.train_coefficients(partial, first, view.units, *args[1:4], coef)
        self._threads.run(lambda i, lo, hi: self._apply_range(view, xv, coef, act, stream, lo, hi, y),
                          view.units, parts, threads)

    def _apply_range(self, view: _View, xv: np.ndarray, coef: np.ndarray, act: int, stream: bool, lo: int,
                     hi: int, y: np.ndarray) -> None:
        """y = act((x - coef[0]) * coef[1] + coef[2]) over units lo..hi, on this thread."""
        (self._k.apply_rows_range if view.rows else self._k.apply_planes_range)(xv, coef, act, stream, lo, hi, y)

    def _backward_threaded(self, view: _View, args: tuple[Any, ...], parts: int, threads: int, dx: np.ndarray,
                           coef: np.ndarray) -> None:
        """``backward_*_whole_par`` on Python threads (where numba's pool cannot serve)."""
        k = self._k
        xv, dyv, pivot, invstd, weight, delta, batch_stats, act, zp, zs, zt, stream = args
        if not view.rows:
            self._threads.run(lambda i, lo, hi: k.backward_planes_features(*args, lo, hi, dx, coef),
                              view.features, parts, threads)
            return
        p64 = pivot.astype(np.float64)
        none = _folded_or_empty(view, None, xv.dtype)
        if act == 0:
            partial = self._partial_sums((k.grad_sums_rows, k.grad_sums_rows64), (xv, dyv, p64), view, parts,
                                         threads)
        else:
            partial = self._partial_sums((k.grad_sums_act_rows,), (xv, dyv, p64, zp, zs, zt, none, act), view,
                                         parts, threads)
        k.backward_coefficients(partial, invstd, weight, delta, view.units, batch_stats, coef)
        self._threads.run(
            lambda i, lo, hi: k.grad_input_rows_range(xv, dyv, pivot, coef, act, zp, zs, zt, stream, lo, hi, dx),
            view.units, parts, threads)

    def _partial_sums(self, kernels: tuple[Callable[..., None], ...], args: tuple[Any, ...], view: _View,
                      parts: int, threads: int) -> np.ndarray:
        """The (parts, 2, C + 8) partial sums of a rows reduction on Python threads, by the
        first of ``kernels``, summed again by the next (float64 throughout) where the blocked
        sums overflowed (as the ``*_whole_par`` kernels do)."""
        c = view.features
        partial = np.zeros((parts, 2, c + 8))
        for run in kernels:
            self._threads.run(lambda i, lo, hi: run(*args, lo, hi, partial[i, 0, :c], partial[i, 1, :c]),
                              view.units, parts, threads)
            if np.all(np.isfinite(partial[:, 1, :c])):
                break
            partial[:] = 0
        return partial

    # ------------------------------------------------------------------ threading

    def _pool_ok(self) -> bool:
        """Whether numba's thread pool may run the passes in this process (see the module doc)."""
        if self._pool_pid is None:
            with self._pool_lock:
                if self._pool_pid is None:
                    self._pool_pid, self._on_pool = _start_pool(self._k)
        return self._pool_pid > 0  # not in a child forked after the pool started (_forked)

    def _cores(self) -> int:
        """The usable cores (``_usable_cores``), read once per process: the affinity query is
        a system call, ~10 us after a large pass has flushed the caches."""
        cores = self._usable
        if not cores:
            cores = self._usable = _usable_cores()
        return cores

    def _forked(self) -> None:
        """In a child process just forked: numba's pool, if the parent started it, is not
        usable here (GNU OpenMP would abort), and the child may run on other cores. Set by
        ``os.register_at_fork`` rather than read through ``os.getpid()`` at each call, a
        system call that cost ~13 us there."""
        if self._pool_pid is not None:
            self._pool_pid, self._on_pool = -1, _no_pool
        self._usable = 0
        self._plans = {}

    def _split(self, view: _View, nbytes: int) -> tuple[int, int]:
        """(ranges, threads) for a pass over ``nbytes``: one range on the caller when small."""
        if nbytes < _PARALLEL_MIN_BYTES or (nbytes < _PASSIVE_MIN_BYTES and _passive_workers()):
            return 1, 1
        threads = max(1, min(_num_threads(self._cores), view.units))
        if threads == 1:  # ranges only balance threads; on one, a single call reads x in order
            return 1, 1
        return min(view.units, threads * _RANGES_PER_THREAD), threads

    def _map(self, kernel: Callable[..., None], args: tuple[Any, ...], outs: tuple[np.ndarray, ...], view: _View,
             nbytes: int) -> None:
        """``kernel(*args, lo, hi, *outs)`` over all units, split across threads when large."""
        parts, threads = self._split(view, nbytes)
        par = getattr(self._k, kernel.__name__ + "_par", None) if threads > 1 else None
        if par is not None and self._pool_ok():
            self._on_pool(threads, par, (*args, parts, *outs))
            return
        self._threads.run(lambda part, lo, hi: kernel(*args, lo, hi, *outs), view.units, parts, threads)

    def _reduce(self, kernel: Callable[..., None], view: _View,
                args: tuple[Any, ...]) -> tuple[np.ndarray, np.ndarray]:
        """Two per-feature float64 sums of ``kernel`` over all units, each of shape (C,)."""
        parts, threads = self._split(view, args[0].nbytes)
        par = getattr(self._k, kernel.__name__ + "_par", None) if threads > 1 else None
        # each range's two sums side by side, 64 bytes apart beyond C: sums a multiple of 4 KiB
        # apart stall the kernels' loads behind their stores (4K aliasing; 10-30% measured)
        buf = np.zeros((parts, 2, view.features + 8))
        partial = buf[:, :, : view.features]
        if threads == 1 and parts == 1:
            kernel(*args, 0, view.units, partial[0, 0], partial[0, 1])
            return partial[0, 0], partial[0, 1]
        if par is not None and self._pool_ok():
            self._on_pool(threads, par, (*args, parts, buf))  # the whole buffer: its slices vectorize
            total = partial.sum(axis=0)
            return total[0], total[1]
        self._threads.run(lambda part, lo, hi: kernel(*args, lo, hi, partial[part, 0], partial[part, 1]),
                          view.units, parts, threads)
        total = partial.sum(axis=0)
        return total[0], total[1]

    def _affine(self, view: _View, xv: np.ndarray, pivot: np.ndarray, scale: np.ndarray,
                shift: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """(x - pivot) * scale + shift per feature, into ``out`` (folded) or a new array."""
        k = self._k
        y = np.empty_like(xv) if out is None else out
        kernel = k.affine_rows if view.rows else k.affine_planes
        self._map(kernel, (xv, pivot, scale, shift), (y,), view, xv.nbytes)
        return y


_ABSENT = np.empty(0)
_ABSENT_X = {dtype: np.empty(0, dtype) for dtype in _DTYPES}  # no forward coefficients (no activation)
# a whole backward's activation arguments where the forward fused none: code 0, no coefficients
_NO_ACTIVATION = {dtype: (0, _ABSENT_X[dtype], _ABSENT_X[dtype], _ABSENT_X[dtype]) for dtype in _DTYPES}


def _out(view: _View, out: np.ndarray | None, like: np.ndarray) -> np.ndarray:
    """The folded output buffer: ``out`` (a C-contiguous slice of a larger result), or new."""
    if out is None:
        return np.empty_like(like)
    if not out.flags.c_contiguous or out.dtype != like.dtype or out.size != like.size:
        raise ValueError("out must be a C-contiguous array of x's dtype and size")
    return view.fold(out)


# ``on_pool(threads, kernel, args)``: ``kernel(*args)`` on numba's pool at ``threads`` threads
_OnPool = Callable[[int, Callable[..., None], tuple[Any, ...]], None]


_PATHS: weakref.WeakSet[CpuPath] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for path in list(_PATHS):
        path._forked()


if hasattr(os, "register_at_fork"):  # POSIX; elsewhere there is no fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _no_pool(threads: int, kernel: Callable[..., None], args: tuple[Any, ...]) -> None:
    raise RuntimeError("numba's thread pool has not been started")  # pragma: no cover - guarded by _pool_ok


def _start_pool(kernels: ModuleType) -> tuple[int, _OnPool]:
    """Start numba's thread pool with a tiny launch: (this pid where it is thread-safe, else
    -1; ``on_pool``, which runs a parallel kernel at a given number of threads).

    numba's ``workqueue`` layer (no OpenMP or TBB found) aborts on concurrent launches from
    several Python threads: there the passes keep to Python threads.

    numba's thread count is a setting of the calling thread (``numba.set_num_threads``),
    the caller's as much as ours: ``on_pool`` sets it for the kernel only where it differs
    from what the kernel wants (``ANYBN_NUM_THREADS``, at most NUMBA_NUM_THREADS), and puts
    the caller's back after. It reads and sets it with ``_thread_counter`` (compiled calls
    of the threading layer's own functions, where they work).
    """
    import numba

    x = np.zeros((2, 1))
    try:
        kernels.affine_rows_par(x, np.zeros(1), np.ones(1), np.zeros(1), 2, np.empty_like(x))
        layer = numba.threading_layer()
    except Exception:  # no usable layer at all: Python threads serve
        return -1, _no_pool
    most = numba.config.NUMBA_NUM_THREADS  # type: ignore[attr-defined]
    get, put = _thread_counter(kernels)

    def on_pool(threads: int, kernel: Callable[..., None], args: tuple[Any, ...]) -> None:
        want = max(1, min(threads, most))
        before = get()
        if before == want:  # the common case: one read
            kernel(*args)
            return
        put(want)
        try:
            kernel(*args)
        finally:
            put(before if 1 <= before <= most else most)

    return (os.getpid() if layer in ("omp", "tbb") else -1), on_pool


def _thread_counter(kernels: ModuleType) -> tuple[Callable[[], int], Callable[[int], None]]:
    """Functions that read and set numba's thread count for the calling thread (after numba's
    pool has started), the quickest that works here:

    1. ``kernels.thread_count`` / ``set_thread_count``: compiled, they call the threading
       layer's ``get_num_threads`` / ``set_num_threads`` directly;
    2. numba's private ``_get_num_threads`` / ``_set_num_threads`` (ctypes functions of the
       same two), which the public functions call after their checks;
    3. the public ``numba.get_num_threads`` / ``set_num_threads``.

    A call comes right after the previous call's passes have swept megabytes through the
    CPU's caches, and there each layer of Python or ctypes is a run of cache misses: after
    a 64 MiB copy, the compiled read added ~4 us to a call of ``_cpu_kernels.addresses``
    (~15 us), the ctypes one ~9, and the public function took ~53 alone (medians of 60-80).
    The first two are taken only where they read what the public function reads and move
    it as the public one does.
    """
    import numba
    from numba.np.ufunc import parallel

    public_get, public_set = numba.get_num_threads, numba.set_num_threads
    before = public_get()
    other = 1 if before != 1 else min(2, numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]
    for get, put in ((getattr(kernels, "thread_count", None), getattr(kernels, "set_thread_count", None)),
                     (getattr(parallel, "_get_num_threads", None), getattr(parallel, "_set_num_threads", None))):
        if not (callable(get) and callable(put)):
            continue
        try:
            if get() != before:
                continue
            put(other)
            moved = public_get() == other
            put(before)
        except Exception:  # a numba without these symbols or functions: the next candidate
            public_set(before)
            continue
        if moved and public_get() == before:
            return get, put
    return public_get, public_set


def _streams(view: _View, moved: int, itemsize: int) -> bool:
    """Whether a whole step that reads and writes ``moved`` bytes in all streams its output
    (see ``_STREAM_CACHE_BYTES``): its runs must be whole lines."""
    return moved >= 2 * _STREAM_CACHE_BYTES and view.folded[-1] * itemsize % _LINE == 0


def _empty(like: np.ndarray, aligned: bool, kernels: ModuleType) -> np.ndarray:
    """np.empty_like(like), C-contiguous, its data half a page away from like's in the page
    (and 64-byte aligned where ``aligned``): a view of a buffer one page longer.

    Large arrays from malloc or mmap start at the same offset in their pages, so with rows of
    a multiple of 4 KiB, row r of x, of dy and of the output all fall on the same L1 sets; a
    kernel that sweeps four rows at once then needs more lines of one set than the cache has
    ways. Half a page apart, the output's lines use other sets (the four-row ReLU backward
    apply on 4096 x 1024 float32, one thread: 2.4-2.5 ms with dx on x's sets, 1.8 off them;
    the plain apply 1.56-1.63 ms either way). Below ``_PARALLEL_MIN_BYTES`` (and unaligned)
    it is plain ``np.empty_like``: the view costs ~3 us, a sixth of a 256 x 64 step, and
    such inputs sit in L2, where a crowded L1 set costs little.

    The addresses come from compiled code (``kernels.addresses``): this runs right after the
    previous call's passes have swept megabytes through the caches, and there every line of
    Python and of its objects is a miss. ``ndarray.ctypes.data`` builds a ctypes helper
    object each time: ~30 us for one address in that state, against ~11 us for both here
    (medians after a 96 MiB copy). All of a public call's Python outside its kernel came to
    130-380 us on 16 MiB inputs in place, against ~10-20 us warm, before this and the short
    checks cut it by about a third (``tools/call_overhead.py``, docs/benchmarks.md).
    """
    if not aligned and like.nbytes < _PARALLEL_MIN_BYTES:
        return np.empty_like(like)
    raw = np.empty(like.nbytes + _PAGE, dtype=np.uint8)
    at, raw_at = kernels.addresses(like, raw)
    want = (at + _PAGE // 2) % _PAGE
    if aligned:
        want -= want % _LINE
    return np.ndarray(like.shape, like.dtype, raw, (want - raw_at) % _PAGE)  # one call: slice, view, reshape


def _folded_or_empty(view: _View, a: Any, dtype: Any) -> np.ndarray:
    """The residual folded like x for the kernels, or an empty array for none."""
    if a is None:
        return np.empty((0,) * len(view.folded), dtype=dtype)
    return view.fold(a)


def _act_args(kernels: ModuleType, view: _View, act: Any, dtype: Any) -> tuple[Any, ...]:
    """zp, zs, zt, res, act code: what the kernels need to recompute z and act'(z)."""
    c = view.features
    return (_vector(act.pivot, dtype, c), _vector(act.scale, dtype, c), _vector(act.shift, dtype, c),
            _folded_or_empty(view, act.residual, dtype), kernels.ACT_CODES[act.kind])


def _given(a: Any) -> np.ndarray:
    """A (C,) vector for the whole-step kernels; an empty one stands for None."""
    return _ABSENT if a is None else np.asarray(a)


def _vector(a: Any, dtype: Any, features: int) -> np.ndarray:
    """A (C,) NumPy array of ``dtype`` for the kernels; zeros stand for None."""
    if a is None:
        return np.zeros(features, dtype=dtype)
    return np.asarray(a, dtype=dtype)
