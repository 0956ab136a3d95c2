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
