"""numba kernels of the CPU fast path: one loop nest per pass, each over a range of units.

Imported only when the CPU path first serves a call (importing numba costs ~0.3 s), and
compiled once per machine: ``cache=True`` stores the machine code beside this file (or in
numba's user-wide cache when the package directory is read-only).

Every kernel works on a range ``[lo, hi)`` of work units so that ``cpu.py`` can split a call
across threads (``nogil=True``):

- *rows* kernels take x as (R, C) with the features contiguous (2-D inputs, channels-last);
  a unit is a row, and the loop over C vectorizes without reordering any sum;
- *planes* kernels take x as (N, C, L) with L > 1 (NCHW and friends); a unit is one plane
  ``(n, c)`` of L contiguous values, summed with reassociation allowed (``fastmath`` below);
  the whole-step planes kernels take a group of features as their unit.

The ``*_whole`` functions chain a step's kernels with its coefficients on the calling
thread, the ``*_par`` ones split each pass across numba's pool (see the sections below).

Numerics: sums are of values shifted by a per-feature ``pivot`` near the mean (a sample of x,
exact in x's dtype), accumulated in float64: plane by plane for the planes kernels, and for
the rows kernels in x's own dtype over blocks of ``_BLOCK`` = 16 rows, flushed to float64
(twice the SIMD lanes, no conversions: 2.2x faster measured on 16 MiB). A block adds at most
16 rounding errors of 2**-24 relative to its sum of |x - pivot|, so float32 inputs at
mean/std = 1e4 keep their mean and variance to ~1e-6 relative, where unshifted float32
sums lose everything. Elementwise passes
compute ``x - pivot`` first in the input dtype (exact near the mean, by Sterbenz's lemma) and
carry the small rest of the mean in the per-feature shift.
"""

from __future__ import annotations

import numba as nb
import numpy as np
from llvmlite import ir
from numba.core import cgutils, types
from numba.extending import intrinsic

from . import _stream as streaming

# Sums may be reordered (vectorized); no nnan/ninf/nsz: NaN and inf propagate as in NumPy.
_FLAGS = {"reassoc", "contract"}
_kernel = nb.njit(nogil=True, cache=True, fastmath=_FLAGS, error_model="numpy", boundscheck=False)


@nb.njit(cache=True)
def addresses(a, b):  # pragma: no cover - compiled
    """The data addresses of two arrays, as ``ndarray.ctypes.data`` gives them (see
    ``cpu._empty`` for why they are read here)."""
    return a.ctypes.data, b.ctypes.data


def _launch_threads() -> None:
    """Start numba's threading layer, which registers the symbols below (numba's own
    intrinsics do so when typed). The CPU path calls these helpers only after its pool has
    started, so where numba lacks this private function, nothing is lost."""
    from numba.np.ufunc import parallel

    launch = getattr(parallel, "_launch_threads", None)
    if callable(launch):
        launch()


@intrinsic
def _get_threads(typingctx):  # type: ignore[no-untyped-def]
    """numba's thread count for the calling thread, from its threading layer's
    ``get_num_threads``, called by its symbol name as numba's own parallel code calls the
    layer's functions: code that calls ``numba.get_num_threads()`` holds the address of a
    ctypes object instead, and is not cached on disk."""
    _launch_threads()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.IntType(32), []), "get_num_threads")
        return builder.sext(builder.call(fn, []), ir.IntType(64))

    return types.int64(), codegen


@intrinsic
def _set_threads(typingctx, n):  # type: ignore[no-untyped-def]
    """Set numba's thread count for the calling thread (the layer's ``set_num_threads``),
    unchecked: the caller keeps 1 <= n <= NUMBA_NUM_THREADS."""
    if not isinstance(n, types.Integer):
        return None
    _launch_threads()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [ir.IntType(32)]),
                                            "set_num_threads")
        builder.call(fn, [builder.trunc(args[0], ir.IntType(32))])
        return context.get_dummy_value()

    return types.none(n), codegen


@nb.njit(cache=True)
def thread_count():  # pragma: no cover - compiled
    """``numba.get_num_threads()`` without its Python and ctypes (see ``cpu._thread_counter``)."""
    return _get_threads()


@nb.njit(cache=True)
def set_thread_count(n):  # pragma: no cover - compiled
    """``numba.set_num_threads(n)`` without its Python and ctypes, unchecked (1 <= n <=
    NUMBA_NUM_THREADS is the caller's to keep)."""
    _set_threads(n)


# ---------------------------------------------------------------- statistics (forward pass 1)


# Rows are summed in x's dtype over blocks of this many rows, around the pivot, then flushed
# to the float64 sums: float32 lanes are twice as many as float64 ones and need no
# conversion, and a block's rounding is at most _BLOCK * u of the block's sum of |x - pivot|.
_BLOCK = 16
# From this many features on, the rows kernels sum four rows per sweep over C: with C that
# long, a1 and a2 are memory more than registers, and their loads and stores bound the
# loop (16 MiB float32, one thread: 0.61 -> 0.51 ms at C = 1024, 0.58 -> 0.43 at 2048; no
# gain at 256, a loss at 128, where four short rows per sweep vectorize worse).
_WIDE = 512
# ... and for rows of at most this many bytes: there a sweep over C is a vector or two, and
# the loop's own overhead dominates (float32 moments / backward sums / ReLU backward sums,
# one thread: C = 16 1.73 / 2.42 / 4.07 -> 1.14 / 2.09 / 2.86 ms, C = 32 1.13 / 1.61 / 3.07
# -> 0.86 / 1.51 / 2.41 ms). Rows of 256 to 512 bytes ran up to 2.3x slower that way
# (float32 C = 64 to 128, float64 C = 32), hence bytes, not features.
_NARROW_BYTES = 128


@_kernel
def moments_rows(x, pivot, lo, hi, s1, s2):  # pragma: no cover - compiled
    """s1[c] += sum(x[r, c] - pivot[c]), s2[c] += sum((x[r, c] - pivot[c])**2) over rows lo..hi."""
    features = x.shape[1]
    narrow = features * x.itemsize <= _NARROW_BYTES
    p = pivot.astype(x.dtype)  # the pivot is a sample of x: exact in x's dtype
    a1 = np.zeros(features, dtype=x.dtype)
    a2 = np.zeros(features, dtype=x.dtype)
    r = lo
    while r < hi:
        end = min(r + _BLOCK, hi)
        rr = r
        if features >= _WIDE or narrow:  # four rows per sweep: a quarter of the loads and stores of a1, a2
            while rr + 4 <= end:
                for c in range(features):
                    d0 = x[rr, c] - p[c]
                    d1 = x[rr + 1, c] - p[c]
                    d2 = x[rr + 2, c] - p[c]
                    d3 = x[rr + 3, c] - p[c]
                    a1[c] += (d0 + d1) + (d2 + d3)
                    a2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
                rr += 4
        for rr in range(rr, end):
            for c in range(features):
                d = x[rr, c] - p[c]
                a1[c] += d
                a2[c] += d * d
        for c in range(features):
            s1[c] += a1[c]
            s2[c] += a2[c]
            a1[c] = 0
            a2[c] = 0
        r = end


@_kernel
def moments_rows64(x, pivot, lo, hi, s1, s2):  # pragma: no cover - compiled
    """As ``moments_rows``, summed in float64 throughout: for values whose squared deviations
    overflow x's dtype (float32 near its largest values)."""
    features = x.shape[1]
    r = lo
    # four rows per sweep: one load and store of s1[c], s2[c] per four values (2.7x faster)
    while r + 4 <= hi:
        for c in range(features):
            p = pivot[c]
            d0 = np.float64(x[r, c]) - p
            d1 = np.float64(x[r + 1, c]) - p
            d2 = np.float64(x[r + 2, c]) - p
            d3 = np.float64(x[r + 3, c]) - p
            s1[c] += (d0 + d1) + (d2 + d3)
            s2[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
        r += 4
    for r in range(r, hi):
        for c in range(features):
            d = np.float64(x[r, c]) - pivot[c]
            s1[c] += d
            s2[c] += d * d


@_kernel
def moments_planes(x, pivot, lo, hi, s1, s2):  # pragma: no cover - compiled
    """As ``moments_rows`` for x of shape (N, C, L), over planes p = n * C + c in lo..hi."""
    features, inner = x.shape[1], x.shape[2]
    for p in range(lo, hi):
        n, c = divmod(p, features)
        shift = pivot[c]
        a1 = 0.0
        a2 = 0.0
        for i in range(inner):
            d = np.float64(x[n, c, i]) - shift
            a1 += d
            a2 += d * d
        s1[c] += a1
        s2[c] += a2


# ------------------------------------------- normalize and affine (forward pass 2, inference)


@_kernel
def affine_rows(x, pivot, scale, shift, lo, hi, y):  # pragma: no cover - compiled
    """y = (x - pivot) * scale + shift, per feature, over rows lo..hi."""
    features = x.shape[1]
    for r in range(lo, hi):
        for c in range(features):
            y[r, c] = (x[r, c] - pivot[c]) * scale[c] + shift[c]


@_kernel
def affine_planes(x, pivot, scale, shift, lo, hi, y):  # pragma: no cover - compiled
    """As ``affine_rows`` for x of shape (N, C, L), over planes lo..hi."""
    features, inner = x.shape[1], x.shape[2]
    for p in range(lo, hi):
        n, c = divmod(p, features)
        pc, sc, tc = pivot[c], scale[c], shift[c]
        for i in range(inner):
            y[n, c, i] = (x[n, c, i] - pc) * sc + tc


# ------------------------------------------------------ backward: sums (pass 1) and dx (pass 2)


@_kernel
def grad_sums_rows(x, dy, pivot, lo, hi, sum_dy, sum_dy_d):  # pragma: no cover - compiled
    """sum_dy[c] += sum(dy), sum_dy_d[c] += sum(dy * (x - pivot[c])) over rows lo..hi.

    Summed in x's dtype over blocks of ``_BLOCK`` rows, flushed to float64, as in
    ``moments_rows``.
    """
    features = x.shape[1]
    narrow = features * x.itemsize <= _NARROW_BYTES
    p = pivot.astype(x.dtype)  # the forward's pivot: a value of x's dtype
    a1 = np.zeros(features, dtype=x.dtype)
    a2 = np.zeros(features, dtype=x.dtype)
    r = lo
    while r < hi:
        end = min(r + _BLOCK, hi)
        rr = r
        if features >= _WIDE or narrow:  # four rows per sweep, as in moments_rows
            while rr + 4 <= end:
                for c in range(features):
                    g0 = dy[rr, c]
                    g1 = dy[rr + 1, c]
                    g2 = dy[rr + 2, c]
                    g3 = dy[rr + 3, c]
                    a1[c] += (g0 + g1) + (g2 + g3)
                    a2[c] += (g0 * (x[rr, c] - p[c]) + g1 * (x[rr + 1, c] - p[c])) + (
                        g2 * (x[rr + 2, c] - p[c]) + g3 * (x[rr + 3, c] - p[c]))
                rr += 4
        for rr in range(rr, end):
            for c in range(features):
                g = dy[rr, c]
                a1[c] += g
                a2[c] += g * (x[rr, c] - p[c])
        for c in range(features):
            sum_dy[c] += a1[c]
            sum_dy_d[c] += a2[c]
            a1[c] = 0
            a2[c] = 0
        r = end


@_kernel
def grad_sums_rows64(x, dy, pivot, lo, hi, sum_dy, sum_dy_d):  # pragma: no cover - compiled
    """As ``grad_sums_rows``, summed in float64 throughout (see ``moments_rows64``)."""
    features = x.shape[1]
    r = lo
    while r + 4 <= hi:  # four rows per sweep, as in moments_rows
        for c in range(features):
            p = pivot[c]
            g0 = np.float64(dy[r, c])
            g1 = np.float64(dy[r + 1, c])
            g2 = np.float64(dy[r + 2, c])
            g3 = np.float64(dy[r + 3, c])
            sum_dy[c] += (g0 + g1) + (g2 + g3)
            sum_dy_d[c] += (g0 * (np.float64(x[r, c]) - p) + g1 * (np.float64(x[r + 1, c]) - p)) + (
                g2 * (np.float64(x[r + 2, c]) - p) + g3 * (np.float64(x[r + 3, c]) - p)
            )
        r += 4
    for r in range(r, hi):
        for c in range(features):
            g = np.float64(dy[r, c])
            sum_dy[c] += g
            sum_dy_d[c] += g * (np.float64(x[r, c]) - pivot[c])


@_kernel
def grad_sums_planes(x, dy, pivot, lo, hi, sum_dy, sum_dy_d):  # pragma: no cover - compiled
    """As ``grad_sums_rows`` for (N, C, L), over planes lo..hi."""
    features, inner = x.shape[1], x.shape[2]
    for p in range(lo, hi):
        n, c = divmod(p, features)
        shift = pivot[c]
        a1 = 0.0
        a2 = 0.0
        for i in range(inner):
            g = np.float64(dy[n, c, i])
            a1 += g
            a2 += g * (np.float64(x[n, c, i]) - shift)
        sum_dy[c] += a1
        sum_dy_d[c] += a2


@_kernel
def grad_input_rows(x, dy, pivot, a, b, k, lo, hi, dx):  # pragma: no cover - compiled
    """dx = k * (dy + a * (x - pivot) + b), per feature, over rows lo..hi."""
    features = x.shape[1]
    for r in range(lo, hi):
        for c in range(features):
            dx[r, c] = k[c] * (dy[r, c] + a[c] * (x[r, c] - pivot[c]) + b[c])


@_kernel
def grad_input_planes(x, dy, pivot, a, b, k, lo, hi, dx):  # pragma: no cover - compiled
    """As ``grad_input_rows`` for (N, C, L), over planes lo..hi."""
    features, inner = x.shape[1], x.shape[2]
    for p in range(lo, hi):
        n, c = divmod(p, features)
        pc, ac, bc, kc = pivot[c], a[c], b[c], k[c]
        for i in range(inner):
            dx[n, c, i] = kc * (dy[n, c, i] + ac * (x[n, c, i] - pc) + bc)


# ------------------------------------------------ fused activation and residual (BN + act)
# act: 0 none, 1 relu, 2 sigmoid. res is the residual folded like x, or an empty (0, ...)
# array for none. z = (x - pivot) * scale + shift (+ res) is never stored: backward
# recomputes it from x, the forward's coefficients and res, and applies act'(z) to dy.

ACT_CODES = {None: 0, "relu": 1, "sigmoid": 2}
# The ReLU as PyTorch's: relu(z) = 0 where z <= 0, else z (NaN stays NaN, -inf gives 0), and
# its gradient 0 where z <= 0, else dy (threshold_backward: a masked dy is 0 even if NaN).
# _ZERO is float32 so that a float32 select stays float32 (numba types float32 with an int
# literal as float64: the rows ReLU loops, when written ``dy * 0``, ran in float64 at half
# the vector width, and the NHWC ReLU backward sums took 1.8x the plain sums instead of 1.2x)
# and a float64 one float64. The sigmoid stays in float64 (``1 + exp(-z)``); computed in
# float32 it took the ReLU's planes loops, which share ``_act_grad``, out of vectorization.
_ZERO = np.float32(0)


@nb.njit(inline="always", fastmath=_FLAGS, error_model="numpy")
def _act(z, act):  # pragma: no cover - compiled
    if act == 1:
        return _ZERO if z <= 0 else z  # NaN stays NaN and -inf gives 0, as in PyTorch's relu
    if act == 2:
        return 1 / (1 + np.exp(-z))
    return z


@nb.njit(inline="always", fastmath=_FLAGS, error_model="numpy")
def _act_grad(g, z, act):  # pragma: no cover - compiled
    """g * act'(z): relu passes g where z > 0 (PyTorch's convention at 0), sigmoid s(1 - s)."""
    if act == 1:
        return _ZERO if z <= 0 else g  # as PyTorch's threshold_backward
    if act == 2:
        s = 1 / (1 + np.exp(-z))
        return g * (s * (1 - s))
    return g


@nb.njit(inline="always", fastmath=_FLAGS, error_model="numpy", boundscheck=False)
def _row_grad(x, dy, zp, zs, zt, res, act, r, z, g):  # pragma: no cover - compiled
    """g[c] = dy[r, c] * act'(z[c]) for one row, z recomputed: each loop plain and vectorizable
    (a branch on act inside the loop over C kept the rows kernels scalar, 10x slower)."""
    features = x.shape[1]
    for c in range(features):
        z[c] = (x[r, c] - zp[c]) * zs[c] + zt[c]
    if res.shape[0] > 0:
        for c in range(features):
            z[c] += res[r, c]
    if act == 1:
        for c in range(features):
            g[c] = _ZERO if z[c] <= 0 else dy[r, c]
    elif act == 2:
        for c in range(features):
            e = 1 / (1 + np.exp(-z[c]))
            g[c] = dy[r, c] * (e * (1 - e))
    else:
        for c in range(features):
            g[c] = dy[r, c]


@_kernel
def affine_act_rows(x, pivot, scale, shift, res, act, lo, hi, y):  # pragma: no cover - compiled
    """y = act((x - pivot) * scale + shift + res), per feature, over rows lo..hi."""
    features, has_res = x.shape[1], res.shape[0] > 0
    for r in range(lo, hi):
        for c in range(features):
            z = (x[r, c] - pivot[c]) * scale[c] + shift[c]
            if has_res:
                z += res[r, c]
            y[r, c] = _act(z, act)


@_kernel
def affine_act_planes(x, pivot, scale, shift, res, act, lo, hi, y):  # pragma: no cover - compiled
    """As ``affine_act_rows`` for (N, C, L), over planes lo..hi."""
    features, inner, has_res = x.shape[1], x.shape[2], res.shape[0] > 0
    for p in range(lo, hi):
        n, c = divmod(p, features)
        pc, sc, tc = pivot[c], scale[c], shift[c]
        for i in range(inner):
            z = (x[n, c, i] - pc) * sc + tc
            if has_res:
                z += res[n, c, i]
            y[n, c, i] = _act(z, act)


@_kernel
def grad_sums_act_rows(x, dy, pivot, zp, zs, zt, res, act, lo, hi, sum_dy, sum_dy_d):  # pragma: no cover
    """As ``grad_sums_rows`` with dy' = dy * act'(z), z = (x - zp) * zs + zt (+ res); summed in
    x's dtype over blocks of ``_BLOCK`` rows, flushed to float64, as there."""
    features = x.shape[1]
    narrow = features * x.itemsize <= _NARROW_BYTES
    p = pivot.astype(x.dtype)  # the forward's pivot: a value of x's dtype
    a1 = np.zeros(features, dtype=x.dtype)
    a2 = np.zeros(features, dtype=x.dtype)
    relu = act == 1 and res.shape[0] == 0
    z = np.empty(0 if relu else features, dtype=x.dtype)
    g = np.empty(0 if relu else features, dtype=x.dtype)
    r = lo
    while r < hi:
        end = min(r + _BLOCK, hi)
        if relu:  # BN + ReLU, the common case: one loop over C, the mask a select (vectorized)
            rr = r
            if features >= _WIDE or narrow:  # four rows per sweep, as in moments_rows
                while rr + 4 <= end:
                    for c in range(features):
                        zpc, zsc, ztc, pc = zp[c], zs[c], zt[c], p[c]
                        g0 = _ZERO if (x[rr, c] - zpc) * zsc + ztc <= 0 else dy[rr, c]
                        g1 = _ZERO if (x[rr + 1, c] - zpc) * zsc + ztc <= 0 else dy[rr + 1, c]
                        g2 = _ZERO if (x[rr + 2, c] - zpc) * zsc + ztc <= 0 else dy[rr + 2, c]
                        g3 = _ZERO if (x[rr + 3, c] - zpc) * zsc + ztc <= 0 else dy[rr + 3, c]
                        a1[c] += (g0 + g1) + (g2 + g3)
                        a2[c] += (g0 * (x[rr, c] - pc) + g1 * (x[rr + 1, c] - pc)) + (
                            g2 * (x[rr + 2, c] - pc) + g3 * (x[rr + 3, c] - pc))
                    rr += 4
            for rr in range(rr, end):
                for c in range(features):
                    gc = _ZERO if (x[rr, c] - zp[c]) * zs[c] + zt[c] <= 0 else dy[rr, c]
                    a1[c] += gc
                    a2[c] += gc * (x[rr, c] - p[c])
        else:
            for rr in range(r, end):
                _row_grad(x, dy, zp, zs, zt, res, act, rr, z, g)
                for c in range(features):
                    a1[c] += g[c]
                    a2[c] += g[c] * (x[rr, c] - p[c])
        for c in range(features):
            sum_dy[c] += a1[c]
            sum_dy_d[c] += a2[c]
            a1[c] = 0
            a2[c] = 0
        r = end


@_kernel
def grad_sums_act_planes(x, dy, pivot, zp, zs, zt, res, act, lo, hi, sum_dy, sum_dy_d):  # pragma: no cover
    """As ``grad_sums_act_rows`` for (N, C, L), over planes lo..hi."""
    features, inner, has_res = x.shape[1], x.shape[2], res.shape[0] > 0
    for p in range(lo, hi):
        n, c = divmod(p, features)
        zpc, zsc, ztc, pc = zp[c], zs[c], zt[c], pivot[c]
        a1 = 0.0
        a2 = 0.0
        if act == 1 and not has_res:  # BN + ReLU: a loop of its own, which LLVM vectorizes for sure
            for i in range(inner):  # (through _act_grad it did or did not, with the form of the select)
                g = np.float64(_ZERO if (x[n, c, i] - zpc) * zsc + ztc <= 0 else dy[n, c, i])
                a1 += g
                a2 += g * (np.float64(x[n, c, i]) - pc)
        else:
            for i in range(inner):
                z = (x[n, c, i] - zpc) * zsc + ztc
                if has_res:
                    z += res[n, c, i]
                g = np.float64(_act_grad(dy[n, c, i], z, act))
                a1 += g
                a2 += g * (np.float64(x[n, c, i]) - pc)
        sum_dy[c] += a1
        sum_dy_d[c] += a2


@_kernel
def grad_input_act_rows(x, dy, pivot, a, b, k, zp, zs, zt, res, act, lo, hi, dx, dres):  # pragma: no cover
    """dx = k * (dy' + a * (x - pivot) + b), and dres = dy' where dres is not empty.

    An empty ``a`` stands for fixed statistics: dx = k * dy', with no term in x, so that an
    infinite or NaN x gives what PyTorch gives (0 * inf would be NaN)."""
    features, want_dres, fixed = x.shape[1], dres.shape[0] > 0, a.shape[0] == 0
    if act == 1 and res.shape[0] == 0 and not want_dres and not fixed:  # BN + ReLU: one vectorized loop
        r = lo
        if features >= _WIDE:  # four rows per sweep: the seven per-feature loads once for four rows
            while r + 4 <= hi:  # (4096 x 1024 float32, 2 threads: 1.55 -> 1.29 ms)
                for c in range(features):
                    pc, ac, bc, kc, zpc, zsc, ztc = pivot[c], a[c], b[c], k[c], zp[c], zs[c], zt[c]
                    for q in range(4):
                        gq = _ZERO if (x[r + q, c] - zpc) * zsc + ztc <= 0 else dy[r + q, c]
                        dx[r + q, c] = kc * (gq + ac * (x[r + q, c] - pc) + bc)
                r += 4
        for r in range(r, hi):
            for c in range(features):
                gc = _ZERO if (x[r, c] - zp[c]) * zs[c] + zt[c] <= 0 else dy[r, c]
                dx[r, c] = k[c] * (gc + a[c] * (x[r, c] - pivot[c]) + b[c])
        return
    z = np.empty(features, dtype=x.dtype)
    g = np.empty(features, dtype=x.dtype)
    for r in range(lo, hi):
        _row_grad(x, dy, zp, zs, zt, res, act, r, z, g)
        if fixed:
            for c in range(features):
                dx[r, c] = k[c] * g[c]
        else:
            for c in range(features):
                dx[r, c] = k[c] * (g[c] + a[c] * (x[r, c] - pivot[c]) + b[c])
        if want_dres:
            for c in range(features):
                dres[r, c] = g[c]


@_kernel
def grad_input_act_planes(x, dy, pivot, a, b, k, zp, zs, zt, res, act, lo, hi, dx, dres):  # pragma: no cover
    """As ``grad_input_act_rows`` for (N, C, L), over planes lo..hi."""
    features, inner, has_res, want_dres = x.shape[1], x.shape[2], res.shape[0] > 0, dres.shape[0] > 0
    if a.shape[0] == 0:  # fixed statistics: dx = k * dy' (rare: one loop with its branches inside)
        for p in range(lo, hi):
            n, c = divmod(p, features)
            kc, zpc, zsc, ztc = k[c], zp[c], zs[c], zt[c]
            for i in range(inner):
                z = (x[n, c, i] - zpc) * zsc + ztc
                if has_res:
                    z += res[n, c, i]
                g = _act_grad(dy[n, c, i], z, act)
                dx[n, c, i] = kc * g
                if want_dres:
                    dres[n, c, i] = g
        return
    for p in range(lo, hi):
        n, c = divmod(p, features)
        pc, ac, bc, kc, zpc, zsc, ztc = pivot[c], a[c], b[c], k[c], zp[c], zs[c], zt[c]
        # one loop per case: a branch on has_res / want_dres inside would keep it scalar
        if has_res and want_dres:
            for i in range(inner):
                g = _act_grad(dy[n, c, i], (x[n, c, i] - zpc) * zsc + ztc + res[n, c, i], act)
                dx[n, c, i] = kc * (g + ac * (x[n, c, i] - pc) + bc)
                dres[n, c, i] = g
        elif has_res:
            for i in range(inner):
                g = _act_grad(dy[n, c, i], (x[n, c, i] - zpc) * zsc + ztc + res[n, c, i], act)
                dx[n, c, i] = kc * (g + ac * (x[n, c, i] - pc) + bc)
        else:
            for i in range(inner):
                g = _act_grad(dy[n, c, i], (x[n, c, i] - zpc) * zsc + ztc, act)
                dx[n, c, i] = kc * (g + ac * (x[n, c, i] - pc) + bc)


# ------------------------------------------------------------- whole steps in one compiled call
# A step through the stages makes ~25 small NumPy calls between its passes (256 x 64 float32:
# 42 us staged, 18 us whole), and on two threads each Python gap between two parallel passes
# also costs the pool's hand-over. For plain batch normalization the CPU path therefore runs
# the whole step in one compiled call: the kernels above chained with the coefficient
# formulas of anybn._steps compiled alongside. That is the one place the coefficients are
# written twice; variants (activation, ghost, renorm, synchronized) take the stages, and
# tests/test_pipeline.py proves both equal. An absent weight or bias is an empty array;
# rounding to x's dtype happens by storing into ``out``/``coef``, whose dtype is x's.
#
# Planes (N, C, L) go one feature at a time: its sums, its coefficients, then its apply while
# the feature's N planes are still in cache, so x (and dy) come from memory once per step
# instead of twice (torch's NCHW backward does the same). The split across threads is by
# features. Rows (R, C) cannot be taken apart by feature (every row holds all of them): their
# steps run the two parallel passes inside one call, with the coefficients between them.
# Partial sums live in (parts, 2, C + 8) buffers: each part's two sums 64 bytes apart beyond
# C, so sums a multiple of 4 KiB apart do not stall loads behind stores (4K aliasing).


@nb.njit(inline="always")
def _train_coefficient(s1, s2, first, count, eps, weight, bias, c, out):  # pragma: no cover - compiled
    """out[:, c] = pivot, scale, shift, invstd, var, delta of feature c from its sums of x - first.

    pivot is the mean rounded to out's dtype and delta = mean - pivot, so that
    y = (x - pivot) * scale + shift with shift = bias - delta * scale.
    """
    shifted_mean = s1 / count
    var = s2 / count - shifted_mean * shifted_mean
    if var < 0.0:  # rounding only; NaN stays NaN
        var = 0.0
    mean = first + shifted_mean
    invstd = 1.0 / np.sqrt(var + eps)
    scale = invstd * weight[c] if weight.size else invstd
    out[0, c] = mean
    delta = mean - np.float64(out[0, c])
    shift = -delta * scale
    if bias.size:
        shift += bias[c]
    out[1, c] = scale
    out[2, c] = shift
    out[3, c] = invstd
    out[4, c] = var
    out[5, c] = delta


@nb.njit(inline="always")
def _backward_coefficient(sum_dy, sum_dy_d, invstd, weight, delta, count, batch_stats, c,
                          out):  # pragma: no cover - compiled
    """out[:, c] = a, b, k, dweight, dbias of feature c from its sums of dy and dy * (x - pivot).

    dx = k * (dy + a * (x - pivot) + b) (a = b = 0 for fixed statistics), with
    dweight = sum(dy * x-hat) and dbias = sum(dy).
    """
    istd = np.float64(invstd[c])
    dlt = np.float64(delta[c]) if delta.size else 0.0
    sum_dy_xhat = (sum_dy_d - dlt * sum_dy) * istd
    a = 0.0
    b = 0.0
    if batch_stats:
        a = -istd * sum_dy_xhat / count
        b = -sum_dy / count - a * dlt
    out[0, c] = a
    out[1, c] = b
    out[2, c] = istd * weight[c] if weight.size else istd
    out[3, c] = sum_dy_xhat
    out[4, c] = sum_dy


@nb.njit(nogil=True, cache=True)
def train_coefficients(partial, first, count, eps, weight, bias, out):  # pragma: no cover - compiled
    """From the partial sums (parts, 2, >= C) of x - first: out (6, C) as in _train_coefficient."""
    for c in range(first.shape[0]):
        s1 = 0.0
        s2 = 0.0
        for p in range(partial.shape[0]):
            s1 += partial[p, 0, c]
            s2 += partial[p, 1, c]
        _train_coefficient(s1, s2, first[c], count, eps, weight, bias, c, out)


@nb.njit(nogil=True, cache=True)
def eval_coefficients(mean, var, eps, weight, bias, out):  # pragma: no cover - compiled
    """out = pivot, scale, shift with y = (x - pivot) * scale + shift = (x - mean) * invstd * weight + bias."""
    for c in range(mean.shape[0]):
        m = np.float64(mean[c])
        scale = 1.0 / np.sqrt(np.float64(var[c]) + eps)
        if weight.size:
            scale *= weight[c]
        out[0, c] = m
        shift = -(m - np.float64(out[0, c])) * scale
        if bias.size:
            shift += bias[c]
        out[1, c] = scale
        out[2, c] = shift


@nb.njit(nogil=True, cache=True)
def backward_coefficients(partial, invstd, weight, delta, count, batch_stats, out):  # pragma: no cover - compiled
    """From the partial sums (parts, 2, >= C) of dy and dy * (x - pivot): out (5, C) as in
    _backward_coefficient."""
    for c in range(invstd.shape[0]):
        sum_dy = 0.0
        sum_dy_d = 0.0
        for p in range(partial.shape[0]):
            sum_dy += partial[p, 0, c]
            sum_dy_d += partial[p, 1, c]
        _backward_coefficient(sum_dy, sum_dy_d, invstd, weight, delta, count, batch_stats, c, out)


@nb.njit(nogil=True, cache=True)
def _all_finite(partial, features):  # pragma: no cover - compiled
    for p in range(partial.shape[0]):
        for c in range(features):
            if not np.isfinite(partial[p, 1, c]):
                return False
    return True


# ---- planes: one group of features at a time
# act: the fused activation's code (0 none, as ACT_CODES); zp, zs, zt: the forward apply's
# coefficients, from which backward recomputes z (empty arrays without an activation). A
# residual always takes the stages.


@_kernel
def train_planes_features(x, eps, weight, bias, act, stream, lo, hi, y, coef):  # pragma: no cover - compiled
    """Training forward of (N, C, L) for the group of features lo..hi: their sums, their
    coefficients, then their apply, so that the apply finds the group's planes in cache.
    ``stream``: the apply writes y with streaming stores (``_stream``; act 0 or 1).

    Within each sample the group's planes are one contiguous run, read in order (feature by
    feature, each plane's prefetch stream restarts: 1.7x slower measured): the passes are
    ``moments_planes`` and ``_apply_planes`` over planes n * C + lo .. n * C + hi. coef
    (6, C) as in _train_coefficient; y = act(BN(x)).
    """
    planes, features, inner = x.shape[0], x.shape[1], x.shape[2]
    first = np.zeros(features)  # read at lo..hi only
    for c in range(lo, hi):
        first[c] = x[0, c, 0]
    s1 = np.zeros(features)
    s2 = np.zeros(features)
    for n in range(planes):
        moments_planes(x, first, n * features + lo, n * features + hi, s1, s2)
    for c in range(lo, hi):
        _train_coefficient(s1[c], s2[c], first[c], planes * inner, eps, weight, bias, c, coef)
    for n in range(planes):
        _apply_planes(x, coef, act, stream, n * features + lo, n * features + hi, y)


@_kernel
def backward_planes_features(x, dy, pivot, invstd, weight, delta, batch_stats, act, zp, zs, zt, stream, lo, hi,
                             dx, coef):  # pragma: no cover - compiled
    """Backward of (N, C, L) for the group of features lo..hi, as ``train_planes_features``,
    with the passes ``grad_sums_planes`` (``grad_sums_act_planes`` with an activation:
    dy' = dy * act'(z)) and ``_grad_input_planes_any``; coef (5, C) as in
    _backward_coefficient; ``stream`` as there."""
    planes, features, inner = x.shape[0], x.shape[1], x.shape[2]
    p64 = pivot.astype(np.float64)
    s1 = np.zeros(features)
    s2 = np.zeros(features)
    for n in range(planes):
        _grad_sums_planes_any(x, dy, p64, act, zp, zs, zt, n * features + lo, n * features + hi, s1, s2)
    for c in range(lo, hi):
        _backward_coefficient(s1[c], s2[c], invstd, weight, delta, planes * inner, batch_stats, c, coef)
    for n in range(planes):
        _grad_input_planes_any(x, dy, pivot, coef, act, zp, zs, zt, stream, n * features + lo, n * features + hi,
                               dx)


@nb.njit(nogil=True, cache=True)
def train_planes_whole(x, eps, weight, bias, act, stream, groups, y, coef):  # pragma: no cover - compiled
    """Training forward of (N, C, L) on the calling thread, in ``groups`` groups of features:
    y, and coef (6, C)."""
    features = x.shape[1]
    for g in range(groups):
        train_planes_features(x, eps, weight, bias, act, stream, features * g // groups,
                              features * (g + 1) // groups, y, coef)


@nb.njit(nogil=True, cache=True)
def backward_planes_whole(x, dy, pivot, invstd, weight, delta, batch_stats, act, zp, zs, zt, stream, groups, dx,
                          coef):  # pragma: no cover - compiled
    """Backward of (N, C, L) on the calling thread, in ``groups`` groups of features: dx, and coef (5, C)."""
    features = x.shape[1]
    for g in range(groups):
        backward_planes_features(x, dy, pivot, invstd, weight, delta, batch_stats, act, zp, zs, zt, stream,
                                 features * g // groups, features * (g + 1) // groups, dx, coef)


@nb.njit(nogil=True, cache=True)
def eval_planes_whole(x, mean, var, eps, weight, bias, act, stream, y, coef):  # pragma: no cover - compiled
    """Inference of (N, C, L) on the calling thread: coef (3, C) as in eval_coefficients."""
    eval_coefficients(mean, var, eps, weight, bias, coef)
    _apply_planes(x, coef, act, stream, 0, x.shape[0] * x.shape[1], y)


# ---- rows: two passes with the coefficients between them


@nb.njit(inline="always")
def _apply_rows(x, coef, act, stream, lo, hi, y):  # pragma: no cover - compiled
    """y = act((x - coef[0]) * coef[1] + coef[2]) over rows lo..hi; ``stream``: streaming
    stores, row by row (act 0 or 1)."""
    if stream and act < 2:
        streaming.affine_rows(x, coef, act, lo, hi, y)
    elif act == 0:
        affine_rows(x, coef[0], coef[1], coef[2], lo, hi, y)
    else:
        affine_act_rows(x, coef[0], coef[1], coef[2], np.empty((0, 0), dtype=x.dtype), act, lo, hi, y)


@nb.njit(inline="always")
def _apply_planes(x, coef, act, stream, lo, hi, y):  # pragma: no cover - compiled
    """As ``_apply_rows`` over planes lo..hi."""
    if stream and act < 2:
        streaming.affine_planes(x, coef, act, lo, hi, y)
    elif act == 0:
        affine_planes(x, coef[0], coef[1], coef[2], lo, hi, y)
    else:
        affine_act_planes(x, coef[0], coef[1], coef[2], np.empty((0, 0, 0), dtype=x.dtype), act, lo, hi, y)


@nb.njit(inline="always")
def _grad_sums_planes_any(x, dy, p64, act, zp, zs, zt, lo, hi, s1, s2):  # pragma: no cover - compiled
    if act == 0:
        grad_sums_planes(x, dy, p64, lo, hi, s1, s2)
    else:
        grad_sums_act_planes(x, dy, p64, zp, zs, zt, np.empty((0, 0, 0), dtype=x.dtype), act, lo, hi, s1, s2)


@nb.njit(inline="always")
def _grad_input_planes_any(x, dy, pivot, coef, act, zp, zs, zt, stream, lo, hi, dx):  # pragma: no cover - compiled
    if stream and act < 2:
        streaming.grad_planes(x, dy, pivot, coef, act, zp, zs, zt, lo, hi, dx)
    elif act == 0:
        grad_input_planes(x, dy, pivot, coef[0], coef[1], coef[2], lo, hi, dx)
    else:
        none = np.empty((0, 0, 0), dtype=x.dtype)
        grad_input_act_planes(x, dy, pivot, coef[0], coef[1], coef[2], zp, zs, zt, none, act, lo, hi, dx, none)


@nb.njit(inline="always")
def _grad_sums_rows_any(x, dy, p64, act, zp, zs, zt, lo, hi, s1, s2):  # pragma: no cover - compiled
    if act == 0:
        grad_sums_rows(x, dy, p64, lo, hi, s1, s2)
    else:
        grad_sums_act_rows(x, dy, p64, zp, zs, zt, np.empty((0, 0), dtype=x.dtype), act, lo, hi, s1, s2)


@nb.njit(inline="always")
def _grad_input_rows_any(x, dy, pivot, coef, act, zp, zs, zt, stream, lo, hi, dx):  # pragma: no cover - compiled
    if stream and act < 2:
        streaming.grad_rows(x, dy, pivot, coef, act, zp, zs, zt, lo, hi, dx)
    elif act == 0:
        grad_input_rows(x, dy, pivot, coef[0], coef[1], coef[2], lo, hi, dx)
    else:
        none = np.empty((0, 0), dtype=x.dtype)
        grad_input_act_rows(x, dy, pivot, coef[0], coef[1], coef[2], zp, zs, zt, none, act, lo, hi, dx, none)


@nb.njit(nogil=True, cache=True)
def train_rows_whole(x, eps, weight, bias, act, stream, y, coef):  # pragma: no cover - compiled
    """Training forward of (R, C) on the calling thread: y, and coef (6, C) as in _train_coefficient."""
    features = x.shape[1]
    first = x[0].astype(np.float64)
    partial = np.zeros((1, 2, features + 8))
    moments_rows(x, first, 0, x.shape[0], partial[0, 0, :features], partial[0, 1, :features])
    if not _all_finite(partial, features):  # blocked sums overflowed: float64 throughout
        partial[:] = 0
        moments_rows64(x, first, 0, x.shape[0], partial[0, 0, :features], partial[0, 1, :features])
    train_coefficients(partial, first, x.shape[0], eps, weight, bias, coef)
    _apply_rows(x, coef, act, stream, 0, x.shape[0], y)


@nb.njit(nogil=True, cache=True)
def backward_rows_whole(x, dy, pivot, invstd, weight, delta, batch_stats, act, zp, zs, zt, stream, dx,
                        coef):  # pragma: no cover - compiled
    """Backward of (R, C) on the calling thread: dx, and coef (5, C) as in _backward_coefficient."""
    features = x.shape[1]
    p64 = pivot.astype(np.float64)
    partial = np.zeros((1, 2, features + 8))
    _grad_sums_rows_any(x, dy, p64, act, zp, zs, zt, 0, x.shape[0], partial[0, 0, :features],
                        partial[0, 1, :features])
    if act == 0 and not _all_finite(partial, features):  # blocked sums overflowed: float64 throughout
        partial[:] = 0
        grad_sums_rows64(x, dy, p64, 0, x.shape[0], partial[0, 0, :features], partial[0, 1, :features])
    backward_coefficients(partial, invstd, weight, delta, x.shape[0], batch_stats, coef)
    _grad_input_rows_any(x, dy, pivot, coef, act, zp, zs, zt, stream, 0, x.shape[0], dx)


@nb.njit(nogil=True, cache=True)
def eval_rows_whole(x, mean, var, eps, weight, bias, act, stream, y, coef):  # pragma: no cover - compiled
    """Inference of (R, C) on the calling thread: coef (3, C) as in eval_coefficients."""
    eval_coefficients(mean, var, eps, weight, bias, coef)
    _apply_rows(x, coef, act, stream, 0, x.shape[0], y)


# ---- one range of a whole step's apply pass, for Python threads (where numba's pool cannot serve)


@_kernel
def apply_rows_range(x, coef, act, stream, lo, hi, y):  # pragma: no cover - compiled
    """``_apply_rows`` over rows lo..hi."""
    _apply_rows(x, coef, act, stream, lo, hi, y)


@_kernel
def apply_planes_range(x, coef, act, stream, lo, hi, y):  # pragma: no cover - compiled
    """``_apply_planes`` over planes lo..hi."""
    _apply_planes(x, coef, act, stream, lo, hi, y)


@_kernel
def grad_input_rows_range(x, dy, pivot, coef, act, zp, zs, zt, stream, lo, hi, dx):  # pragma: no cover - compiled
    """``_grad_input_rows_any`` over rows lo..hi."""
    _grad_input_rows_any(x, dy, pivot, coef, act, zp, zs, zt, stream, lo, hi, dx)


# ------------------------------------------------------- passes split across threads (prange)
# One call runs a whole pass on numba's thread pool: ``parts`` contiguous ranges of units,
# taken by the workers of numba's threading layer (OpenMP where available, whose workers
# spin briefly between passes instead of sleeping). Handing each range to a Python thread
# pool cost ~80 us per pass on 2-core VMs, more than a pass over 16 MiB takes.
#
# numba hands out prange iterations statically (on OpenMP, thread t takes the t-th block of
# iterations whatever numba's parallel chunk size; checked with get_thread_id), so a prange
# over the parts gave each thread a fixed half, and a core slowed by another process held
# up the whole pass. Here every prange iteration claims parts from a shared counter (an
# atomic add) until none are left: each thread's first iteration takes parts in turn with
# the other threads', its later iterations find none, and a slowed thread takes fewer parts.
# (The prange stays over the parts: ``numba.get_num_threads()`` in compiled code would keep
# the function out of numba's on-disk cache.) Each part's sums stay in its own row of
# ``partial``, merged in part order, so the results do not depend on which thread took
# which part.


@intrinsic
def _claim(typingctx, counter):  # type: ignore[no-untyped-def]
    """The value of ``counter[0]`` (an int64 array), incremented atomically: the next part."""
    if not (isinstance(counter, types.Array) and counter.dtype == types.int64):
        return None  # no match: numba reports a typing error

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        array = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.atomic_rmw("add", array.data, ir.Constant(ir.IntType(64), 1), "monotonic")

    return types.int64(counter), codegen


@nb.njit
def _claimed(claim, parts):  # pragma: no cover - compiled
    """The parts this thread claims from ``claim`` (see above), until all ``parts`` are
    taken. A generator: numba cannot inline it (a call per part), and it is not cached on its
    own (a cached generator loaded into a fresh compilation failed with a KeyError); the
    kernels that use it cache their code with it."""
    p = _claim(claim)
    while p < parts:
        yield p
        p = _claim(claim)

# prange loops only: NumPy calls in these functions (zeros, astype) stay serial calls
_PRANGE_ONLY = {"comprehension": False, "reduction": False, "inplace_binop": False, "setitem": False,
                "numpy": False, "stencil": False, "fusion": False, "prange": True}


def _parallel(fn):  # type: ignore[no-untyped-def]
    # a fresh dict per function: numba consumes the options it is given
    return nb.njit(nogil=True, cache=True, fastmath=_FLAGS, error_model="numpy", boundscheck=False,
                   parallel=dict(_PRANGE_ONLY))(fn)


@_parallel
def moments_rows_par(x, pivot, parts, partial):  # pragma: no cover - compiled
    """partial[p, 0, :C], partial[p, 1, :C] = the sums of ``moments_rows`` over range p of
    ``parts``; partial is (parts, 2, >= C), C-contiguous, so that its slices are too."""
    units, features = x.shape[0], x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            moments_rows(x, pivot, units * p // parts, units * (p + 1) // parts, partial[p, 0, :features],
                         partial[p, 1, :features])


@_parallel
def moments_planes_par(x, pivot, parts, partial):  # pragma: no cover - compiled
    """As ``moments_rows_par`` with ``moments_planes``."""
    units, features = x.shape[0] * x.shape[1], x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            moments_planes(x, pivot, units * p // parts, units * (p + 1) // parts, partial[p, 0, :features],
                           partial[p, 1, :features])


@_parallel
def grad_sums_rows_par(x, dy, pivot, parts, partial):  # pragma: no cover - compiled
    """As ``moments_rows_par`` with ``grad_sums_rows``."""
    units, features = x.shape[0], x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            grad_sums_rows(x, dy, pivot, units * p // parts, units * (p + 1) // parts, partial[p, 0, :features],
                           partial[p, 1, :features])


@_parallel
def grad_sums_planes_par(x, dy, pivot, parts, partial):  # pragma: no cover - compiled
    """As ``moments_rows_par`` with ``grad_sums_planes``."""
    units, features = x.shape[0] * x.shape[1], x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            grad_sums_planes(x, dy, pivot, units * p // parts, units * (p + 1) // parts, partial[p, 0, :features],
                             partial[p, 1, :features])


@_parallel
def affine_rows_par(x, pivot, scale, shift, parts, y):  # pragma: no cover - compiled
    """``affine_rows`` over all rows, in ``parts`` ranges across threads."""
    units = x.shape[0]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            affine_rows(x, pivot, scale, shift, units * p // parts, units * (p + 1) // parts, y)


@_parallel
def affine_planes_par(x, pivot, scale, shift, parts, y):  # pragma: no cover - compiled
    """``affine_planes`` over all planes, in ``parts`` ranges across threads."""
    units = x.shape[0] * x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            affine_planes(x, pivot, scale, shift, units * p // parts, units * (p + 1) // parts, y)


@_parallel
def grad_input_rows_par(x, dy, pivot, a, b, k, parts, dx):  # pragma: no cover - compiled
    """``grad_input_rows`` over all rows, in ``parts`` ranges across threads."""
    units = x.shape[0]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            grad_input_rows(x, dy, pivot, a, b, k, units * p // parts, units * (p + 1) // parts, dx)


@_parallel
def grad_input_planes_par(x, dy, pivot, a, b, k, parts, dx):  # pragma: no cover - compiled
    """``grad_input_planes`` over all planes, in ``parts`` ranges across threads."""
    units = x.shape[0] * x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            grad_input_planes(x, dy, pivot, a, b, k, units * p // parts, units * (p + 1) // parts, dx)


@_parallel
def affine_act_rows_par(x, pivot, scale, shift, res, act, parts, y):  # pragma: no cover - compiled
    """``affine_act_rows`` over all rows, in ``parts`` ranges across threads."""
    units = x.shape[0]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            affine_act_rows(x, pivot, scale, shift, res, act, units * p // parts, units * (p + 1) // parts, y)


@_parallel
def affine_act_planes_par(x, pivot, scale, shift, res, act, parts, y):  # pragma: no cover - compiled
    """``affine_act_planes`` over all planes, in ``parts`` ranges across threads."""
    units = x.shape[0] * x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            affine_act_planes(x, pivot, scale, shift, res, act, units * p // parts, units * (p + 1) // parts, y)


@_parallel
def grad_sums_act_rows_par(x, dy, pivot, zp, zs, zt, res, act, parts, partial):  # pragma: no cover - compiled
    """partial[p] = the sums of ``grad_sums_act_rows`` over range p of ``parts``."""
    units, features = x.shape[0], x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            grad_sums_act_rows(x, dy, pivot, zp, zs, zt, res, act, units * p // parts, units * (p + 1) // parts,
                               partial[p, 0, :features], partial[p, 1, :features])


@_parallel
def grad_sums_act_planes_par(x, dy, pivot, zp, zs, zt, res, act, parts, partial):  # pragma: no cover - compiled
    """partial[p] = the sums of ``grad_sums_act_planes`` over range p of ``parts``."""
    units, features = x.shape[0] * x.shape[1], x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            grad_sums_act_planes(x, dy, pivot, zp, zs, zt, res, act, units * p // parts, units * (p + 1) // parts,
                                 partial[p, 0, :features], partial[p, 1, :features])


@_parallel
def grad_input_act_rows_par(x, dy, pivot, a, b, k, zp, zs, zt, res, act, parts, dx, dres):  # pragma: no cover
    """``grad_input_act_rows`` over all rows, in ``parts`` ranges across threads."""
    units = x.shape[0]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            grad_input_act_rows(x, dy, pivot, a, b, k, zp, zs, zt, res, act, units * p // parts,
                                units * (p + 1) // parts, dx, dres)


@_parallel
def grad_input_act_planes_par(x, dy, pivot, a, b, k, zp, zs, zt, res, act, parts, dx, dres):  # pragma: no cover
    """``grad_input_act_planes`` over all planes, in ``parts`` ranges across threads."""
    units = x.shape[0] * x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            grad_input_act_planes(x, dy, pivot, a, b, k, zp, zs, zt, res, act, units * p // parts,
                                  units * (p + 1) // parts, dx, dres)


# ------------------------------------------------------------- whole steps across threads
# The whole steps above with their passes on numba's pool: planes split by features (each
# part a run of whole features), rows by ranges of rows with a pass per parallel loop.


@_parallel
def train_planes_whole_par(x, eps, weight, bias, act, stream, parts, y, coef):  # pragma: no cover - compiled
    """``train_planes_whole`` with its ``parts`` groups of features across threads."""
    features = x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            train_planes_features(x, eps, weight, bias, act, stream, features * p // parts,
                                  features * (p + 1) // parts, y, coef)


@_parallel
def backward_planes_whole_par(x, dy, pivot, invstd, weight, delta, batch_stats, act, zp, zs, zt, stream, parts,
                              dx, coef):  # pragma: no cover - compiled
    """``backward_planes_whole`` with its ``parts`` groups of features across threads."""
    features = x.shape[1]
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            backward_planes_features(x, dy, pivot, invstd, weight, delta, batch_stats, act, zp, zs, zt, stream,
                                     features * p // parts, features * (p + 1) // parts, dx, coef)


@_parallel
def train_rows_whole_par(x, eps, weight, bias, act, stream, parts, y, coef):  # pragma: no cover - compiled
    """``train_rows_whole`` with each pass in ``parts`` ranges of rows across threads."""
    units, features = x.shape[0], x.shape[1]
    first = x[0].astype(np.float64)
    partial = np.zeros((parts, 2, features + 8))
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            moments_rows(x, first, units * p // parts, units * (p + 1) // parts, partial[p, 0, :features],
                         partial[p, 1, :features])
    if not _all_finite(partial, features):  # blocked sums overflowed: float64 throughout
        partial[:] = 0
        claim = np.zeros(1, dtype=np.int64)
        for _ in nb.prange(parts):
            for p in _claimed(claim, parts):
                moments_rows64(x, first, units * p // parts, units * (p + 1) // parts, partial[p, 0, :features],
                               partial[p, 1, :features])
    train_coefficients(partial, first, units, eps, weight, bias, coef)
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            _apply_rows(x, coef, act, stream, units * p // parts, units * (p + 1) // parts, y)


@_parallel
def backward_rows_whole_par(x, dy, pivot, invstd, weight, delta, batch_stats, act, zp, zs, zt, stream, parts, dx,
                            coef):  # pragma: no cover - compiled
    """``backward_rows_whole`` with each pass in ``parts`` ranges of rows across threads."""
    units, features = x.shape[0], x.shape[1]
    p64 = pivot.astype(np.float64)
    partial = np.zeros((parts, 2, features + 8))
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            _grad_sums_rows_any(x, dy, p64, act, zp, zs, zt, units * p // parts, units * (p + 1) // parts,
                                partial[p, 0, :features], partial[p, 1, :features])
    if act == 0 and not _all_finite(partial, features):  # blocked sums overflowed: float64 throughout
        partial[:] = 0
        claim = np.zeros(1, dtype=np.int64)
        for _ in nb.prange(parts):
            for p in _claimed(claim, parts):
                grad_sums_rows64(x, dy, p64, units * p // parts, units * (p + 1) // parts, partial[p, 0, :features],
                                 partial[p, 1, :features])
    backward_coefficients(partial, invstd, weight, delta, units, batch_stats, coef)
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            _grad_input_rows_any(x, dy, pivot, coef, act, zp, zs, zt, stream, units * p // parts,
                                 units * (p + 1) // parts, dx)


@_parallel
def eval_rows_whole_par(x, mean, var, eps, weight, bias, act, stream, parts, y, coef):  # pragma: no cover - compiled
    """``eval_rows_whole`` with the pass in ``parts`` ranges of rows across threads."""
    units = x.shape[0]
    eval_coefficients(mean, var, eps, weight, bias, coef)
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            _apply_rows(x, coef, act, stream, units * p // parts, units * (p + 1) // parts, y)


@_parallel
def eval_planes_whole_par(x, mean, var, eps, weight, bias, act, stream, parts, y, coef):  # pragma: no cover
    """``eval_planes_whole`` with the pass in ``parts`` ranges of planes across threads."""
    units = x.shape[0] * x.shape[1]
    eval_coefficients(mean, var, eps, weight, bias, coef)
    claim = np.zeros(1, dtype=np.int64)
    for _ in nb.prange(parts):
        for p in _claimed(claim, parts):
            _apply_planes(x, coef, act, stream, units * p // parts, units * (p + 1) // parts, y)
