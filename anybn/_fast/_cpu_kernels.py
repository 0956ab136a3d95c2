"""numba kernels of the CPU fast path: one loop nest per pass, each over a range of units.

Imported only when the CPU path first serves a call (importing numba costs ~0.3 s), and
compiled once per machine: ``cache=True`` stores the machine code beside this file (or in
numba's user-wide cache when the package directory is read-only).

Every kernel works on a range ``[lo, hi)`` of work units so that ``cpu.py`` can split a call
across threads (``nogil=True``):

- *rows* kernels take x as (R, C) with the features contiguous (2-D inputs, channels-last);
  a unit is a row, and the loop over C vectorizes without reordering any sum;
- *planes* kernels take x as (N, C, L) with L > 1 (NCHW and friends); a unit is one plane
  ``(n, c)`` of L contiguous values, summed with reassociation allowed (``fastmath`` below).

Numerics: sums are float64, of values shifted by a per-feature ``pivot`` near the mean, so
float32 inputs at mean/std = 1e4 keep their variance to ~1e-12 relative. Elementwise passes
compute ``x - pivot`` first in the input dtype (exact near the mean, by Sterbenz's lemma) and
carry the small rest of the mean in the per-feature shift.
"""

from __future__ import annotations

import numba as nb
import numpy as np

# Sums may be reordered (vectorized); no nnan/ninf/nsz: NaN and inf propagate as in NumPy.
_FLAGS = {"reassoc", "contract"}
_kernel = nb.njit(nogil=True, cache=True, fastmath=_FLAGS, error_model="numpy", boundscheck=False)


# ---------------------------------------------------------------- statistics (forward pass 1)


@_kernel
def moments_rows(x, pivot, lo, hi, s1, s2):  # pragma: no cover - compiled
    """s1[c] += sum(x[r, c] - pivot[c]), s2[c] += sum((x[r, c] - pivot[c])**2) over rows lo..hi."""
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
    """sum_dy[c] += sum(dy), sum_dy_d[c] += sum(dy * (x - pivot[c])) over rows lo..hi."""
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


# ------------------------------------- whole steps for small inputs, on the calling thread only
# Below ~512 KiB a step is dominated by call overhead: the stages' ~25 small NumPy calls cost
# more than the passes over x (256 x 64 float32: 42 us staged, 18 us whole). These chain the
# kernels above with the coefficient formulas of anybn._steps compiled alongside: the one
# place the coefficients are written twice, kept for plain BN only (variants take the
# stages) and proven equal to the stages by tests/test_fast.py. An absent weight or bias is
# an empty array; rounding to x's dtype happens by storing into ``out``, whose dtype is x's.


@nb.njit(nogil=True, cache=True)
def train_coefficients(partial, first, count, eps, weight, bias, out):  # pragma: no cover - compiled
    """From the partial sums (2, parts, C) of x - first: out = pivot, scale, shift, invstd, var, delta.

    pivot is the mean rounded to out's dtype and delta = mean - pivot, so that
    y = (x - pivot) * scale + shift with shift = bias - delta * scale.
    """
    for c in range(first.shape[0]):
        s1 = 0.0
        s2 = 0.0
        for p in range(partial.shape[1]):
            s1 += partial[0, p, c]
            s2 += partial[1, p, c]
        shifted_mean = s1 / count
        var = s2 / count - shifted_mean * shifted_mean
        if var < 0.0:  # rounding only; NaN stays NaN
            var = 0.0
        mean = first[c] + shifted_mean
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
    """From the partial sums (2, parts, C) of dy and dy * (x - pivot): out = a, b, k, dweight, dbias.

    dx = k * (dy + a * (x - pivot) + b) (a = b = 0 for fixed statistics), with
    dweight = sum(dy * x-hat) and dbias = sum(dy).
    """
    for c in range(invstd.shape[0]):
        sum_dy = 0.0
        sum_dy_d = 0.0
        for p in range(partial.shape[1]):
            sum_dy += partial[0, p, c]
            sum_dy_d += partial[1, p, c]
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
def train_rows_whole(x, eps, weight, bias, y, coef):  # pragma: no cover - compiled
    """Training forward of (R, C) on the calling thread: y and coef as in train_coefficients."""
    first = x[0].astype(np.float64)
    partial = np.zeros((2, 1, x.shape[1]))
    moments_rows(x, first, 0, x.shape[0], partial[0, 0], partial[1, 0])
    train_coefficients(partial, first, x.shape[0], eps, weight, bias, coef)
    affine_rows(x, coef[0], coef[1], coef[2], 0, x.shape[0], y)


@nb.njit(nogil=True, cache=True)
def train_planes_whole(x, eps, weight, bias, y, coef):  # pragma: no cover - compiled
    """As train_rows_whole for (N, C, L)."""
    first = x[0, :, 0].astype(np.float64)
    partial = np.zeros((2, 1, x.shape[1]))
    units = x.shape[0] * x.shape[1]
    moments_planes(x, first, 0, units, partial[0, 0], partial[1, 0])
    train_coefficients(partial, first, x.shape[0] * x.shape[2], eps, weight, bias, coef)
    affine_planes(x, coef[0], coef[1], coef[2], 0, units, y)


@nb.njit(nogil=True, cache=True)
def backward_rows_whole(x, dy, pivot, invstd, weight, delta, batch_stats, dx, coef):  # pragma: no cover
    """Backward of (R, C) on the calling thread: dx, and coef as in backward_coefficients."""
    partial = np.zeros((2, 1, x.shape[1]))
    grad_sums_rows(x, dy, pivot.astype(np.float64), 0, x.shape[0], partial[0, 0], partial[1, 0])
    backward_coefficients(partial, invstd, weight, delta, x.shape[0], batch_stats, coef)
    grad_input_rows(x, dy, pivot, coef[0], coef[1], coef[2], 0, x.shape[0], dx)


@nb.njit(nogil=True, cache=True)
def backward_planes_whole(x, dy, pivot, invstd, weight, delta, batch_stats, dx, coef):  # pragma: no cover
    """As backward_rows_whole for (N, C, L)."""
    partial = np.zeros((2, 1, x.shape[1]))
    units = x.shape[0] * x.shape[1]
    grad_sums_planes(x, dy, pivot.astype(np.float64), 0, units, partial[0, 0], partial[1, 0])
    backward_coefficients(partial, invstd, weight, delta, x.shape[0] * x.shape[2], batch_stats, coef)
    grad_input_planes(x, dy, pivot, coef[0], coef[1], coef[2], 0, units, dx)


@nb.njit(nogil=True, cache=True)
def eval_rows_whole(x, mean, var, eps, weight, bias, y, coef):  # pragma: no cover - compiled
    """Inference of (R, C) on the calling thread: coef (3, C) as in eval_coefficients."""
    eval_coefficients(mean, var, eps, weight, bias, coef)
    affine_rows(x, coef[0], coef[1], coef[2], 0, x.shape[0], y)


@nb.njit(nogil=True, cache=True)
def eval_planes_whole(x, mean, var, eps, weight, bias, y, coef):  # pragma: no cover - compiled
    """As eval_rows_whole for (N, C, L)."""
    eval_coefficients(mean, var, eps, weight, bias, coef)
    affine_planes(x, coef[0], coef[1], coef[2], 0, x.shape[0] * x.shape[1], y)
