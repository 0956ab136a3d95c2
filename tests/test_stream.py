"""Streaming stores (``anybn/_fast/_stream.py``): the same results as plain stores, within
the rounding of one formula evaluated two ways, and when the CPU path takes them.

The streaming vectors are LLVM IR of their own, and LLVM may contract and reassociate the
plain loops differently (``fastmath`` allows it), so the two agree to a few roundings, not
bitwise. Bounds, with u the unit roundoff of x's dtype and d = x - p (the same rounded
difference on both sides; subtraction is never fused):

- apply, y = (d * s + t): each evaluation is within u|d s| (the product, unless fused) plus
  u(|d s| + |t|) (the sum) of the exact value, so two are within 4u(|d s| + |t|); ReLU,
  1-Lipschitz, keeps the bound;
- backward, dx = k * (dy + a d + b): a product and two sums in any order, then a product:
  each within 4u|k|(|dy| + |a d| + |b|), two within 8u|k|(...). With ReLU, dy passes where
  z = (x - zp) * zs + zt > 0; elements with z within the apply bound of 0 may take either
  side, and are checked against both.

All with a 1 % margin for the second-order terms. A planted 1e-4 relative error in any
streaming formula fails these (the bounds are ~1e-6 relative in float32).
"""

from __future__ import annotations

import array_api_compat
import numpy as np
import pytest

from conftest import numpy_fast_path_installed

pytestmark = pytest.mark.skipif(not numpy_fast_path_installed(),
                                reason="no NumPy fast path installed (pip install 'anybn[fast]')")

DTYPES = [np.float32, np.float64]
# (shape of the folded x, misalign the output by one element): rows (R, C) and planes (N, C, L);
# runs of whole lines, and runs with a head and a tail (odd lengths, misaligned outputs)
CASES = [
    ((96, 64), False), ((40, 48), False), ((33, 37), False), ((96, 64), True),
    ((3, 5, 64), False), ((4, 3, 100), False), ((3, 5, 64), True), ((2, 3, 7), False),
]


def _k():
    from anybn._fast import _cpu_kernels

    return _cpu_kernels


def _empty(shape, dtype, misalign):
    """An output of ``shape``, 64-byte aligned, or one element past such an address."""
    n = int(np.prod(shape))
    raw = np.empty((n + 64) * np.dtype(dtype).itemsize, np.uint8).view(dtype)
    start = (-raw.ctypes.data % 64) // raw.itemsize + (1 if misalign else 0)
    return raw[start:start + n].reshape(shape)


def _data(shape, dtype, seed=0, axis=1):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w, b = rng.uniform(0.5, 1.5, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    return x, dy, w, b


def _per_feature(v, shape):
    """A (C,) vector broadcast against x of the folded ``shape`` (rows or planes)."""
    return v.astype(np.float64)[:, None] if len(shape) == 3 else v.astype(np.float64)


def _apply_bound(x, p, s, t, u):
    d = (x - _per_feature(p, x.shape).astype(x.dtype)).astype(np.float64)
    return 4.04 * u * (np.abs(d * _per_feature(s, x.shape)) + np.abs(_per_feature(t, x.shape)))


def _assert_apply_close(streamed, plain, x, p, s, t):
    u = np.finfo(x.dtype).eps / 2
    gap = np.abs(streamed.astype(np.float64) - plain)
    assert np.all(gap <= _apply_bound(x, p, s, t, u)), float(np.max(gap))


def _backward_bound(x, dy, p, a, b, k, u):
    f = lambda v: _per_feature(v, x.shape)  # noqa: E731
    d = (x - f(p).astype(x.dtype)).astype(np.float64)
    return 8.08 * u * np.abs(f(k)) * (np.abs(dy.astype(np.float64)) + np.abs(f(a) * d) + np.abs(f(b)))


def _assert_backward_close(streamed, plain, x, dy, p, a, b, k, relu=None):
    """relu: (zp, zs, zt) of the forward apply, or None."""
    u = np.finfo(x.dtype).eps / 2
    bound = _backward_bound(x, dy, p, a, b, k, u)
    gap = np.abs(streamed.astype(np.float64) - plain)
    if relu is None:
        assert np.all(gap <= bound), float(np.max(gap))
        return
    f = lambda v: _per_feature(v, x.shape)  # noqa: E731
    z = (x - f(relu[0]).astype(x.dtype)).astype(np.float64) * f(relu[1]) + f(relu[2])
    near = np.abs(z) <= _apply_bound(x, *relu, u)
    assert np.all(gap[~near] <= bound[~near]), float(np.max(gap[~near]))
    # at the kink: dy passed or not, on each side (dy * 0 leaves k * (a d + b))
    dropped = _backward_bound(x, dy * 0, p, a, b, k, u)
    for got in (streamed, plain):
        as_passed = np.abs(got - _reference_grad(x, dy, p, a, b, k)) <= bound
        as_dropped = np.abs(got - _reference_grad(x, dy * 0, p, a, b, k)) <= dropped
        assert np.all((as_passed | as_dropped)[near])


def _reference_grad(x, dy, p, a, b, k):
    f = lambda v: _per_feature(v, x.shape)  # noqa: E731
    d = (x - f(p).astype(x.dtype)).astype(np.float64)
    return f(k) * (dy.astype(np.float64) + f(a) * d + f(b))


def _whole(name, x):
    return getattr(_k(), f"{name}_{'rows' if x.ndim == 2 else 'planes'}_whole")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, misalign", CASES)
@pytest.mark.parametrize("act", [0, 1])
def test_streamed_inference_equals_plain_stores(shape, misalign, dtype, act):
    x, _, w, b = _data(shape, dtype)
    rng = np.random.default_rng(1)
    mean, var = rng.standard_normal(shape[1]).astype(dtype), rng.uniform(0.5, 2, shape[1]).astype(dtype)
    outs = []
    for stream in (True, False):
        y, coef = _empty(shape, dtype, misalign and stream), np.empty((3, shape[1]), dtype)
        _whole("eval", x)(x, mean, var, 1e-5, w, b, act, stream, y, coef)
        outs.append((y, coef))
    (ys, coef), (yp, coef_plain) = outs
    np.testing.assert_array_equal(coef, coef_plain)
    _assert_apply_close(ys, yp, x, *coef)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, misalign", CASES)
@pytest.mark.parametrize("act", [0, 1])
def test_streamed_training_forward_equals_plain_stores(shape, misalign, dtype, act):
    x, _, w, b = _data(shape, dtype)
    outs = []
    for stream in (True, False):
        y, coef = _empty(shape, dtype, misalign and stream), np.empty((6, shape[1]), dtype)
        if x.ndim == 2:
            _whole("train", x)(x, 1e-5, w, b, act, stream, y, coef)
        else:  # in two groups of features
            _whole("train", x)(x, 1e-5, w, b, act, stream, 2, y, coef)
        outs.append((y, coef))
    (ys, coef), (yp, coef_plain) = outs
    np.testing.assert_array_equal(coef, coef_plain)  # the same sums: streaming is the apply only
    _assert_apply_close(ys, yp, x, *coef[:3])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape, misalign", CASES)
@pytest.mark.parametrize("act", [0, 1])
def test_streamed_backward_equals_plain_stores(shape, misalign, dtype, act):
    x, dy, w, b = _data(shape, dtype)
    c = shape[1]
    forward = np.empty((6, c), dtype)
    _whole("train", x)(x, 1e-5, w, b, 0, False, np.empty_like(x), forward) if x.ndim == 2 else \
        _whole("train", x)(x, 1e-5, w, b, 0, False, 1, np.empty_like(x), forward)
    pivot, scale, shift, invstd, _, delta = forward
    absent = np.empty(0, dtype)
    fused = (pivot, scale, shift) if act else (absent, absent, absent)
    outs = []
    for stream in (True, False):
        dx, coef = _empty(shape, dtype, misalign and stream), np.empty((5, c), dtype)
        args = (x, dy, pivot, invstd.astype(np.float64), w, delta.astype(np.float64), True, act, *fused, stream)
        if x.ndim == 2:
            _whole("backward", x)(*args, dx, coef)
        else:
            _whole("backward", x)(*args, 2, dx, coef)
        outs.append((dx, coef))
    (ds, coef), (dp, coef_plain) = outs
    np.testing.assert_array_equal(coef, coef_plain)
    _assert_backward_close(ds, dp, x, dy, pivot, *coef[:3], relu=(pivot, scale, shift) if act else None)


def test_streamed_runs_cover_every_element_exactly_once():
    """Heads, vectors and tails of misaligned runs of every length from 0 to 3 lines: each
    element written, none outside (sentinels around the output stay)."""
    k = _k()
    for dtype in DTYPES:
        lanes = 64 // np.dtype(dtype).itemsize
        for inner in range(1, 3 * lanes + 2):
            for offset in range(lanes):
                x = np.arange(2 * 3 * inner, dtype=dtype).reshape(2, 3, inner)
                raw = np.full(x.size + 2 * lanes + 64, -7, dtype)
                start = (-raw.ctypes.data % 64) // raw.itemsize + lanes + offset
                y = raw[start:start + x.size].reshape(x.shape)
                coef = np.array([[0.0] * 3, [1.0] * 3, [0.5] * 3], dtype)
                k.apply_planes_range(x, coef, 0, True, 0, 6, y)
                np.testing.assert_array_equal(y, x + dtype(0.5))
                assert np.all(raw[:start] == -7) and np.all(raw[start + x.size:] == -7)


def test_the_path_streams_only_large_steps_of_whole_lines(monkeypatch):
    from anybn._fast import cpu
    from anybn._layout import layout_of

    monkeypatch.setattr(cpu, "_STREAM_CACHE_BYTES", 1 << 20)
    xp = array_api_compat.array_namespace(np.empty(0))

    def streams(shape, axis, moved):
        x = np.empty(shape, np.float32)
        return cpu._streams(cpu._View(layout_of("t", xp, x, axis)), moved, x.itemsize)

    assert streams((8, 4, 16, 16), 1, 2 << 20)  # planes of 256 float32: 16 lines
    assert not streams((8, 4, 16, 16), 1, (2 << 20) - 1)  # moves less than twice the cache
    assert not streams((8, 4, 15, 15), 1, 2 << 20)  # planes of 225 float32: not whole lines
    assert streams((512, 16), 1, 2 << 20)  # rows of 16 float32: one line each
    assert not streams((512, 24), 1, 2 << 20)


def test_outputs_start_half_a_page_from_their_input():
    """The whole steps' large outputs (y, dx) start half a page from x in the page (64-byte
    aligned for streaming), so that their rows of 4 KiB do not share x's L1 sets: one page
    more."""
    from anybn._fast import cpu

    shape = (3, 5, 7, 1024)  # 840 KiB of float64: above the parallel threshold
    size = int(np.prod(shape)) * 8
    assert size >= cpu._PARALLEL_MIN_BYTES
    for aligned in (True, False):
        for offset in (0, 8, 16, 2056, 4088):  # like's data at several places in its page
            raw = np.empty(size + 8192, np.uint8)
            start = (offset - raw.ctypes.data) % 4096
            like = raw[start:start + size].view(np.float64).reshape(shape)
            out = cpu._empty(like, aligned, _k())
            assert out.shape == like.shape and out.dtype == like.dtype and out.flags.c_contiguous
            assert out.ctypes.data % 64 == 0 or not aligned
            assert out.ctypes.data % 8 == 0
            # about half a page away from like in the page: other L1 sets for rows of 4 KiB
            apart = (out.ctypes.data - like.ctypes.data) % 4096
            assert 2048 - 64 < apart <= 2048 if aligned else apart == 2048

    # small outputs are plain arrays: the view would cost more than the crowding
    small = np.empty((256, 64), np.float32)
    assert small.nbytes < cpu._PARALLEL_MIN_BYTES and cpu._empty(small, False, _k()).flags.owndata
    # and the whole steps take their outputs from it: rows of 4 KiB, forward and backward
    from anybn import functional

    x = np.random.default_rng(0).standard_normal((512, 1024), dtype=np.float32)
    for activation in (None, "relu"):
        y, saved = functional.batch_norm_train(x, activation=activation)
        dx = functional.batch_norm_backward(np.ones_like(x), saved)[0]
        for out in (y, dx):
            assert (out.ctypes.data - x.ctypes.data) % 4096 == 2048


def test_last_level_cache_size_from_sysfs(tmp_path):
    from anybn._fast.cpu import _last_level_cache_bytes

    for index, size in enumerate(["32K", "1024K", "32768K", "oops"]):
        (tmp_path / f"index{index}").mkdir()
        (tmp_path / f"index{index}" / "size").write_text(size + "\n")
    assert _last_level_cache_bytes(tmp_path) == 32 << 20
    assert _last_level_cache_bytes(tmp_path / "absent") > 0  # sysconf, or the 32 MiB default


@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("shape, axis", [((2048, 128), 1), ((8, 32, 32, 32), 1), ((8, 32, 32, 64), -1)])
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_the_path_streams_where_told_and_agrees_with_plain_stores(monkeypatch, shape, axis, threads, activation):
    """Through the public API, streaming forced (a 'cache' of 0 bytes) and barred: outputs
    within 8 ulp of max(|out|, 1) (the apply and backward bounds above, at this data's
    scale: |d s|, |t|, |dy|, |a d|, |b| are all below 8 and k below 2); sigmoid keeps
    plain stores (identical bits). For ReLU, dx is compared where z is not within that
    bound of the kink. numba's pool and Python threads stream the same ranges with the
    same code: identical bits."""
    import anybn
    from anybn import _fast
    from anybn._fast import cpu

    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    monkeypatch.setenv("ANYBN_NUM_THREADS", threads)
    x, dy, w, b = _data(shape, np.float32, seed=3, axis=axis)
    c = shape[axis]
    mean, var = np.zeros(c, np.float32), np.full(c, 2.0, np.float32)

    def run(act=activation):
        y, saved = anybn.batch_norm_train(x, w, b, axis=axis, activation=act)
        dx, dw, db = anybn.batch_norm_backward(dy, saved)
        return y, dx, dw, db, anybn.batch_norm_eval(x, mean, var, w, b, axis=axis, activation=act)

    monkeypatch.setattr(cpu, "_STREAM_CACHE_BYTES", 0)
    streamed = run()
    for out in (streamed[0], streamed[1], streamed[4]):
        assert out.ctypes.data % 64 == 0
    registered = _fast.select("train", array_api_compat.array_namespace(x), x)
    pid = registered._pool_pid
    registered._pool_pid = -1  # as where numba's pool cannot serve: Python threads
    try:
        threaded = run()
    finally:
        registered._pool_pid = pid
    for got, want in zip(streamed, threaded):
        np.testing.assert_array_equal(got, want)
    monkeypatch.setattr(cpu, "_STREAM_CACHE_BYTES", 1 << 60)
    plain = run()
    z = run(None)[0]  # the ReLU's input, as the plain apply computes it
    ulp = np.finfo(np.float32).eps
    for got, want, what in zip(streamed, plain, ("y", "dx", "dweight", "dbias", "y_eval")):
        if activation == "sigmoid" or what in ("dweight", "dbias"):
            np.testing.assert_array_equal(got, want, err_msg=what)  # not streamed / not an output pass
            continue
        tol = 8 * ulp * max(float(np.max(np.abs(want))), 1.0)
        far = np.abs(z) > 8 * ulp * max(float(np.max(np.abs(z))), 1.0) if (what == "dx" and activation) else True
        assert np.all(np.abs(got - want)[far] <= tol), what


@pytest.mark.parametrize("act", [0, 1])
def test_streamed_nan_and_inf_land_where_plain_stores_put_them(act):
    """NaN and inf land where the plain loops put them through the ReLU's select (0 where
    z <= 0, as ``_act`` and ``_act_grad``), with and without streaming."""
    x, dy, w, b = _data((4, 3, 64), np.float32)
    x[0, 1, 5], x[2, 0, 17], x[3, 2, 63] = np.nan, np.inf, -np.inf
    dy[1, 1, 3] = np.nan
    coef = np.array([[0.5] * 3, [2.0] * 3, [-0.25] * 3], np.float32)
    outs = []
    for stream in (True, False):
        y = _empty(x.shape, np.float32, False)
        _k().apply_planes_range(x, coef, act, stream, 0, 12, y)
        dx = _empty(x.shape, np.float32, False)
        _k().grad_input_rows_range(x.reshape(12, 64), dy.reshape(12, 64), np.full(64, 0.5, np.float32),
                                   np.ones((5, 64), np.float32), act, *(np.full(64, 0.5, np.float32),) * 3, stream,
                                   0, 12, dx.reshape(12, 64))
        outs.append((y, dx))
    for streamed, plain in zip(*outs):
        np.testing.assert_array_equal(np.isnan(streamed), np.isnan(plain))
        np.testing.assert_array_equal(np.isinf(streamed), np.isinf(plain))
        assert np.isnan(streamed).any()
