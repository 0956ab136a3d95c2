"""The CPU fast path (``anybn/_fast/cpu.py``): equal to the generic path, and what it serves.

The generic array-API path is the reference here (``ANYBN_FAST_PATHS=0``), with the torch
conformance tolerances; both are also checked against float64 NumPy. The whole suite runs
on both paths too (the ``numpy`` / ``numpy:generic`` backends, and the torch conformance
cases for each).
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import tracemalloc

import array_api_compat
import numpy as np
import pytest

import anybn
from anybn import _fast
from conftest import numpy_fast_path_installed
from reference import bcast, features_last, reference_backward, reference_batch_norm, reference_moments

pytestmark = pytest.mark.skipif(not numpy_fast_path_installed(),
                                reason="no NumPy fast path installed (pip install 'anybn[fast]')")

RTOL = {"float64": 1e-9, "float32": 2e-4}  # as in test_torch_conformance
NP = array_api_compat.array_namespace(np.empty(0))

# (shape, axis): rows kernels (features contiguous) and planes kernels (NCHW-like), small
# ones on the calling thread and ones above the parallel threshold (512 KiB) on threads
SHAPES = [
    ((8, 3), 1),
    ((4, 3, 5), 1),
    ((2, 3, 4, 5), 1),
    ((2, 4, 5, 3), -1),
    ((3, 1, 7), 1),
    ((6, 5, 1), 1),
    ((5, 2), 0),
    ((1030, 130), 1),
    ((6, 16, 33, 40), 1),
    ((6, 33, 40, 16), -1),
    ((1027, 600), 1),  # rows of 512+ features: four rows per sweep, and a tail of 3 rows
    ((3, 7, 11, 517), -1),
]


def _data(shape, axis, dtype, offset=0.0, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (offset + 1.5 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(dtype)
    b = rng.standard_normal(c).astype(dtype)
    return x, dy, w, b


def _run_all(x, dy, w, b, axis):
    y, saved = anybn.batch_norm_train(x, w, b, axis=axis)
    dx, dw, db = anybn.batch_norm_backward(dy, saved)
    y_eval = anybn.batch_norm_eval(x, saved.mean, saved.var, w, b, axis=axis)
    return {"y": y, "mean": saved.mean, "var": saved.var, "invstd": saved.invstd,
            "dx": dx, "dweight": dw, "dbias": db, "y_eval": y_eval}


def _generic(monkeypatch, fn, *args, **kwargs):
    monkeypatch.setenv("ANYBN_FAST_PATHS", "0")
    try:
        return fn(*args, **kwargs)
    finally:
        monkeypatch.delenv("ANYBN_FAST_PATHS")


def _assert_close(got, want, rtol, what):
    if want is None:
        assert got is None, what
        return
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, f"{what}: {got.shape} {got.dtype} vs {want.shape} {want.dtype}"
    scale = max(float(np.max(np.abs(want.astype(np.float64)))), 1.0)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * scale, err_msg=what)


def _bounds(x64, dy64, w64, b64, axis, dtype, path):
    """Elementwise error bounds against float64 for y, dx, dweight, dbias, y_eval.

    With u the unit roundoff of ``dtype``, m values per feature, x-hat in float64 and
    R = max |x-hat| (the pivot lies within the data, so |mean - pivot| * invstd <= R):

    - the fast path sums blocks of 16 rows in ``dtype`` (<= 16u of the block's sum of
      |x - pivot|) and the blocks in float64 (m * 2**-53, not negligible for float64
      inputs), so its statistics carry 16u + m * 2**-53 relative error; it rounds each coefficient
      to ``dtype`` once and does <= 4 roundings per element: y is off by at most
      8u (|w| (|x-hat| + 2R) + |b|); dx = k (dy + a (x - p) + b) by
      8u |k| (|dy| + |mean dy| + |mean(dy x-hat)| (|x-hat| + 2R)); the parameter gradients,
      sums in float64 of products of rounded inputs, by 4u sum(|dy| (|x-hat| + 1)).
    - the generic path sums in ``dtype`` itself: the shifted mean and the sums of the
      backward carry <= m u relative error each (the classic bound for recursive summation;
      BLAS's blocked sums do better), so u is replaced by m u in the terms that come
      through the statistics.

    A relative error of 1e-4 in any output exceeds these bounds for the fast path
    (8u(1 + 2R) + 128u(1 + R) ~ 5e-5 for float32 at R ~ 5).
    """
    u = np.finfo(dtype).eps / 2
    m = x64.size // x64.shape[axis]
    # the statistics: blocked sums on the fast path, dtype sums on the generic one
    stat_u = 16 * u + m * 2.0**-53 if path == "fast" else m * u
    mean, var = reference_moments(x64, axis)
    invstd = 1.0 / np.sqrt(var + 1e-5)
    xhat = features_last(x64 - bcast(mean, x64.ndim, axis), axis) * invstd
    g = features_last(dy64, axis)
    r = np.abs(xhat).max(0)
    w = np.ones(xhat.shape[1]) if w64 is None else np.abs(w64)
    b = np.zeros(xhat.shape[1]) if b64 is None else np.abs(b64)
    mg, mgx = np.abs(g.mean(0)), np.abs((g * xhat).mean(0))
    tol_y = 8 * u * (w * (np.abs(xhat) + 2 * r) + b) + 8 * stat_u * w * (1 + r)
    k = w * invstd
    tol_dx = 8 * u * k * (np.abs(g) + mg + mgx * (np.abs(xhat) + 2 * r)) + 8 * stat_u * k * (mg + mgx * (1 + r))
    tol_sum = 4 * stat_u * (np.abs(g) * (np.abs(xhat) + 1)).sum(0) + 4 * u * np.abs(g).sum(0)
    return tol_y, tol_dx, tol_sum


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_fast_path_equals_generic_path(monkeypatch, shape, axis, affine, dtype):
    """Both paths against float64 with bounds from their error analyses (``_bounds``), and
    the fast path's statistics against the generic path's."""
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    x, dy, w, b = _data(shape, axis, dtype, offset=3.0)
    if not affine:
        w = b = None
    assert _fast.select("train", NP, x) is not None
    results = {"fast": _run_all(x, dy, w, b, axis), "generic": _generic(monkeypatch, _run_all, x, dy, w, b, axis)}
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    w64 = None if w is None else w.astype(np.float64)
    b64 = None if b is None else b.astype(np.float64)
    ref_y = features_last(reference_batch_norm(x64, axis, w64, b64), axis)
    ref_dx, ref_dw, ref_db = reference_backward(x64, dy64, axis, w64)
    ref_dx = features_last(ref_dx, axis)
    for path, got in results.items():
        tol_y, tol_dx, tol_sum = _bounds(x64, dy64, w64, b64, axis, dtype, path)
        for key, ref, tol in (("y", ref_y, tol_y), ("dx", ref_dx, tol_dx)):
            err = np.abs(features_last(got[key], axis) - ref)
            assert np.all(err <= tol), f"{path} {key}: max err/tol = {np.max(err / tol):.3g}"
        for key, ref in (("dweight", ref_dw), ("dbias", ref_db)):
            if w is None:
                assert got[key] is None
                continue
            err = np.abs(got[key] - ref)
            assert np.all(err <= tol_sum), f"{path} {key}: max err/tol = {np.max(err / tol_sum):.3g}"
        # y_eval with the batch's own (rounded) statistics is y up to the rounding of the mean
        err = np.abs(features_last(got["y_eval"], axis) - ref_y)
        u = np.finfo(dtype).eps / 2
        mean, var = reference_moments(x64, axis)
        scale = (1.0 if w64 is None else np.abs(w64)) / np.sqrt(var + 1e-5)
        assert np.all(err <= tol_y + 4 * u * np.abs(mean) * scale), f"{path} y_eval"
    for key in ("mean", "var", "invstd"):
        _assert_close(results["fast"][key], results["generic"][key], RTOL[dtype], key)


@pytest.mark.parametrize("shape, axis", [((4096, 5), 1), ((8, 4, 30, 30), 1), ((8, 30, 30, 4), -1)])
def test_float32_at_mean_over_std_1e4_matches_float64(monkeypatch, shape, axis):
    """The core's numerics goal holds on the fast path: within 1e-5 of float64 (measured ~5e-7)."""
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    x, dy, _, _ = _data(shape, axis, np.float32, offset=1.5e4)
    ones, zeros = np.ones(shape[axis], np.float32), np.zeros(shape[axis], np.float32)
    y, saved = anybn.batch_norm_train(x, ones, zeros, axis=axis)
    dx, dw, db = anybn.batch_norm_backward(dy, saved)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    ref_dx, ref_dw, ref_db = reference_backward(x64, dy64, axis)
    assert np.max(np.abs(y - reference_batch_norm(x64, axis))) < 1e-5
    assert np.max(np.abs(dx - ref_dx)) < 1e-5
    m = x.size // x.shape[axis]
    assert np.max(np.abs(dw - ref_dw)) < 1e-5 * np.sqrt(m)  # sums of m terms of O(1)
    assert np.max(np.abs(db - ref_db)) < 1e-5 * np.sqrt(m)
    ref_var = x64.var(axis=tuple(i for i in range(x.ndim) if i != axis % x.ndim))
    np.testing.assert_allclose(saved.var, ref_var, rtol=1e-6)


@pytest.mark.parametrize("source", ["fast", "generic"])
def test_saved_state_crosses_paths(monkeypatch, source):
    """A forward on one path and backward on the other agree: BatchNormSaved means the same."""
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    x, dy, w, b = _data((6, 16, 33, 40), 1, np.float32, offset=1e3)
    if source == "generic":
        _, saved = _generic(monkeypatch, anybn.batch_norm_train, x, w, b)
        got = anybn.batch_norm_backward(dy, saved)
    else:
        _, saved = anybn.batch_norm_train(x, w, b)
        got = _generic(monkeypatch, anybn.batch_norm_backward, dy, saved)
    want = reference_backward(x.astype(np.float64), dy.astype(np.float64), 1, w.astype(np.float64))
    for name, g, e in zip(("dx", "dweight", "dbias"), got, want):
        _assert_close(g.astype(np.float64), e, 2e-4, name)


@pytest.mark.parametrize("affine", [True, False])
def test_backward_with_fixed_statistics(monkeypatch, affine):
    """Inference-mode backward (the layer in eval mode): dx = weight * invstd * dy."""
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    x, dy, _, _ = _data((6, 16, 33, 40), 1, np.float32)
    bn = anybn.BatchNorm(16, affine=affine)
    if affine:
        rng = np.random.default_rng(1)
        bn.weight = rng.uniform(0.5, 1.5, 16).astype(np.float32)
        bn.bias = rng.standard_normal(16).astype(np.float32)
    bn(x)
    bn.eval()
    y = bn(x)
    dx = bn.backward(dy)
    grads = (bn.grad_weight, bn.grad_bias)
    y_generic = _generic(monkeypatch, bn, x)
    dx_generic = _generic(monkeypatch, bn.backward, dy)
    _assert_close(y, y_generic, 2e-4, "y")
    _assert_close(dx, dx_generic, 2e-4, "dx")
    for got, want in zip(grads, (bn.grad_weight, bn.grad_bias)):
        _assert_close(got, want, 2e-4, "grads")


def test_inputs_are_not_written_and_may_be_read_only(monkeypatch):
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    arrays = _data((6, 16, 33, 40), 1, np.float32)
    copies = [a.copy() for a in arrays]
    for a in arrays:
        a.flags.writeable = False
    x, dy, w, b = arrays
    y, saved = anybn.batch_norm_train(x, w, b)
    anybn.batch_norm_backward(dy, saved)
    anybn.batch_norm_eval(x, saved.mean, saved.var, w, b)
    for a, c in zip(arrays, copies):
        np.testing.assert_array_equal(a, c)
    assert y.flags.writeable and y.flags.c_contiguous and y.shape == x.shape


@pytest.mark.parametrize("what", ["float16", "non-contiguous", "fortran", "subclass", "mixed dy"])
def test_arrays_the_path_does_not_serve_take_the_generic_path(monkeypatch, what):
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    x, dy, _, _ = _data((32, 6, 10), 1, np.float32)
    step, arrays = "train", (x,)
    if what == "float16":
        x = x.astype(np.float16)
        arrays = (x,)
    elif what == "non-contiguous":
        x = np.repeat(x, 2, axis=2)[:, :, ::2]
        arrays = (x,)
    elif what == "fortran":
        x = np.asfortranarray(x)
        arrays = (x,)
    elif what == "subclass":
        x = np.ma.masked_array(x)
        arrays = (x,)
    else:
        step, arrays = "backward", (x, dy.astype(np.float64))
    assert _fast.select(step, NP, *arrays) is None
    # and the generic path still computes the right thing for them
    y, saved = anybn.batch_norm_train(np.asarray(arrays[0]))
    want = reference_batch_norm(np.asarray(arrays[0], dtype=np.float64), 1)
    np.testing.assert_allclose(y.astype(np.float64), want, atol=2e-3 if what == "float16" else 2e-5)


def test_switch_off_with_environment_variable(monkeypatch):
    x = np.ones((4, 3), dtype=np.float32)
    monkeypatch.setenv("ANYBN_FAST_PATHS", "0")
    assert _fast.select("train", NP, x) is None
    monkeypatch.setenv("ANYBN_FAST_PATHS", "1")
    assert _fast.select("train", NP, x).name == "cpu-numba"


def test_nan_stays_in_its_feature(monkeypatch):
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    x, dy, _, _ = _data((1030, 130), 1, np.float32)
    x[17, 5] = np.nan
    y, saved = anybn.batch_norm_train(x)
    assert np.isnan(y[:, 5]).all() and np.isnan(saved.var[5])
    assert np.isfinite(np.delete(y, 5, axis=1)).all()
    dx, _, _ = anybn.batch_norm_backward(dy, saved)
    assert np.isnan(dx[:, 5]).all() and np.isfinite(np.delete(dx, 5, axis=1)).all()


def test_thread_count_changes_only_the_summation_order(monkeypatch):
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    x, dy, w, b = _data((6, 16, 33, 40), 1, np.float64, offset=2.0)
    results = []
    for threads in ("1", "2", "5"):
        monkeypatch.setenv("ANYBN_NUM_THREADS", threads)
        results.append(_run_all(x, dy, w, b, 1))
    for other in results[1:]:
        for key in results[0]:
            _assert_close(other[key], results[0][key], 1e-12, key)
    monkeypatch.setenv("ANYBN_NUM_THREADS", "two")
    with pytest.raises(ValueError, match="ANYBN_NUM_THREADS must be a positive integer, got 'two'"):
        anybn.batch_norm_train(x)


def test_concurrent_calls_from_python_threads(monkeypatch):
    """Embedding libraries call from their own threads: each call gets its own result."""
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    inputs = [_data((6, 16, 33, 40), 1, np.float32, offset=float(i), seed=i) for i in range(4)]
    expected = [_run_all(x, dy, w, b, 1) for x, dy, w, b in inputs]
    # the sequential results themselves against float64: the threaded ones must equal them
    for (x, dy, w, b), e in zip(inputs, expected):
        x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
        tol_y, tol_dx, _ = _bounds(x64, dy.astype(np.float64), w64, b64, 1, np.float32, "fast")
        assert np.all(np.abs(features_last(e["y"], 1) - features_last(reference_batch_norm(x64, 1, w64, b64), 1))
                      <= tol_y)
        ref_dx = reference_backward(x64, dy.astype(np.float64), 1, w64)[0]
        assert np.all(np.abs(features_last(e["dx"], 1) - features_last(ref_dx, 1)) <= tol_dx)
    got: list = [None] * 4
    errors: list = []

    def work(i):
        try:
            for _ in range(3):
                got[i] = _run_all(*inputs[i], 1)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for g, e in zip(got, expected):
        for key in e:
            np.testing.assert_array_equal(g[key], e[key], err_msg=key)


@pytest.mark.parametrize("shape, axis", [((2048, 256), 1), ((8, 32, 32, 32), 1), ((8, 32, 32, 32), -1)])
def test_memory_is_the_output_plus_per_feature_vectors(monkeypatch, shape, axis):
    """Training forward allocates y plus O(C); backward dx plus O(C); saved keeps no copy of x."""
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    x, dy, w, b = _data(shape, axis, np.float32)
    anybn.batch_norm_backward(dy, anybn.batch_norm_train(x, w, b, axis=axis)[1])  # warm up (JIT)
    slack = 64 * 1024
    tracemalloc.start()
    try:
        y, saved = anybn.batch_norm_train(x, w, b, axis=axis)
        _, peak_forward = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        current, _ = tracemalloc.get_traced_memory()
        dx, _, _ = anybn.batch_norm_backward(dy, saved)
        _, peak_backward = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_forward <= x.nbytes + slack, peak_forward
    assert peak_backward - current <= x.nbytes + slack, peak_backward - current
    for name in ("mean", "invstd", "var", "pivot", "delta"):
        assert getattr(saved, name).size == shape[axis], name
    assert saved.x is x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_kernels_compute_in_the_dtype_of_x(dtype):
    """The rows ReLU kernels' masked gradient stays in x's dtype: numba types float32 times an
    int literal (``dy * 0``) as float64, which ran every float32 ReLU loop of the rows kernels
    in float64 at half the vector width. Checked on numba's own typing of the kernels (fresh
    compilations: cached ones keep no type annotation)."""
    import numba

    from anybn._fast import _cpu_kernels as k

    want = numba.from_dtype(np.dtype(dtype))

    def typed(kernel, *args):  # the masked gradient's locals (g0..g3, gc, gq) as numba typed them
        fresh = numba.njit(kernel.py_func)
        fresh(*args)
        typemap = fresh.overloads[fresh.signatures[0]].type_annotation.typemap
        return {name: t for name, t in typemap.items() if name.split(".")[0] in {"g0", "g1", "g2", "g3", "gc", "gq"}}

    x = np.ones((8, 512), dtype)
    v, s64, none = np.ones(512, dtype), np.zeros(512), np.empty((0, 0), dtype)
    sums = typed(k.grad_sums_act_rows, x, x, s64, v, v, v, none, 1, 0, 8, s64, s64.copy())
    apply = typed(k.grad_input_act_rows, x, x, v, v, v, v, v, v, v, none, 1, 0, 8, np.empty_like(x), none)
    assert {"g0", "g1", "g2", "g3", "gc"} <= {n.split(".")[0] for n in sums} and "gq" in apply
    assert all(t == want for t in [*sums.values(), *apply.values()]), (sums, apply)


def _python(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ANYBN_FAST_PATHS"}
    return subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True,
                          timeout=120, env=env)


def test_importing_anybn_does_not_import_numba():
    done = _python("import sys, numpy as np, anybn; anybn.batch_norm_train(np.ones((4, 3), np.float16));"
                   "assert 'numba' not in sys.modules, 'numba imported'")
    assert done.returncode == 0, done.stderr


def test_without_numba_nothing_is_registered_and_nothing_warns():
    code = (
        "import sys; sys.modules['numba'] = None\n"  # makes `import numba` raise ImportError
        "import importlib.util, numpy as np, anybn\n"
        "from anybn import _fast\n"
        "real = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda n, *a: None if n == 'numba' else real(n, *a)\n"
        "assert _fast.registered() == (), _fast.registered()\n"
        "y, s = anybn.batch_norm_train(np.ones((4, 3), np.float32) + np.arange(4.0, dtype=np.float32)[:, None])\n"
        "assert abs(float(y[0, 0]) + 1.3416) < 1e-3, y\n"
    )
    done = _python(code)
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_a_broken_numba_leaves_the_generic_path_serving(monkeypatch):
    """numba found but failing to import: the path declines, silently."""
    from anybn._fast.cpu import CpuPath

    path = CpuPath()
    monkeypatch.delattr(_fast, "_cpu_kernels", raising=False)
    monkeypatch.setitem(sys.modules, "anybn._fast._cpu_kernels", None)  # import raises ImportError
    assert not path.serves("train", NP, (np.ones((4, 3)),))


@pytest.mark.parametrize("shape, axis, dtype", [
    ((6, 16, 33, 40), 1, np.float32),  # forward on the calling thread, backward split
    ((8, 16, 40, 40), 1, np.float32),  # planes by groups of features
    ((2048, 130), 1, np.float32),  # rows
    ((16, 30, 30, 40), -1, np.float64),  # channels-last rows
])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_numba_pool_and_python_threads_give_the_same_bits(monkeypatch, shape, axis, dtype, activation):
    """The passes split the same ranges whichever threads run them: identical results."""
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    monkeypatch.setenv("ANYBN_NUM_THREADS", "2")
    path = _fast.select("train", NP, np.ones((4, 3), np.float32))
    x, dy, w, b = _data(shape, axis, dtype, offset=2.0)

    def run():
        if activation is None:
            return _run_all(x, dy, w, b, axis)
        y, saved = anybn.batch_norm_train(x, w, b, axis=axis, activation=activation)
        dx, dw, db = anybn.batch_norm_backward(dy, saved)
        y_eval = anybn.batch_norm_eval(x, saved.mean, saved.var, w, b, axis=axis, activation=activation)
        return {"y": y, "dx": dx, "dweight": dw, "dbias": db, "y_eval": y_eval}

    pooled = run()
    monkeypatch.setattr(path, "_pool_pid", -1)  # as where numba's pool cannot serve
    threaded = run()
    for key in pooled:
        np.testing.assert_array_equal(pooled[key], threaded[key], err_msg=key)


def test_parts_are_claimed_once_each_on_numbas_pool():
    """The parallel passes' threads claim parts from a shared counter: every part is summed
    exactly once (a part taken twice would double its sums, one skipped leave zeros), into
    its own row, with the bits of the same part summed on the calling thread."""
    import numba

    from anybn._fast import _cpu_kernels as k

    claim = numba.njit(lambda counter: k._claim(counter))
    counter = np.zeros(1, np.int64)
    assert [claim(counter) for _ in range(3)] == [0, 1, 2] and counter[0] == 3
    with pytest.raises(numba.core.errors.TypingError):  # an int64 counter only
        claim(np.zeros(1))
    left = numba.njit(lambda counter, parts: [p for p in k._claimed(counter, parts)])
    assert left(np.array([2], np.int64), 5) == [2, 3, 4]  # what is left, in turn
    x, _, _, _ = _data((997, 37), 1, np.float32, offset=3.0)
    pivot = x[0].astype(np.float64)
    for parts in (1, 2, 13, 40):
        numba.set_num_threads(min(2, numba.config.NUMBA_NUM_THREADS))
        partial = np.zeros((parts, 2, 37 + 8))
        k.moments_rows_par(x, pivot, parts, partial)
        for p in range(parts):
            s1, s2 = np.zeros(37), np.zeros(37)
            k.moments_rows(x, pivot, 997 * p // parts, 997 * (p + 1) // parts, s1, s2)
            np.testing.assert_array_equal(partial[p, 0, :37], s1)
            np.testing.assert_array_equal(partial[p, 1, :37], s2)


def test_pooled_calls_keep_numbas_thread_count_to_themselves(monkeypatch):
    """A call on numba's pool runs its kernel at the threads it plans (``ANYBN_NUM_THREADS``,
    at most NUMBA_NUM_THREADS) and leaves the calling thread's numba count as it found it,
    an error in the kernel included; through numba's own getter and setter, or the public
    functions where numba lacks those."""
    import numba
    from numba.np.ufunc import parallel

    from anybn._fast import _cpu_kernels as k
    from anybn._fast import cpu

    most = numba.config.NUMBA_NUM_THREADS
    if most < 2:
        pytest.skip("numba runs one thread here")
    x = np.random.default_rng(0).standard_normal((1024, 256)).astype(np.float32)  # 1 MiB: pooled
    monkeypatch.setenv("ANYBN_NUM_THREADS", "2")
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    y0, _ = anybn.batch_norm_train(x)
    seen = []
    kernel = k.train_rows_whole_par

    def spy(*args):
        seen.append(numba.get_num_threads())
        return kernel(*args)

    monkeypatch.setattr(k, "train_rows_whole_par", spy)
    try:
        numba.set_num_threads(1)  # the caller's own setting
        y, _ = anybn.batch_norm_train(x)
        assert seen == [2] and numba.get_num_threads() == 1
        np.testing.assert_array_equal(y, y0)
        monkeypatch.setenv("ANYBN_NUM_THREADS", str(most + 5))  # more than numba has: all of them
        anybn.batch_norm_train(x)
        assert seen == [2, most] and numba.get_num_threads() == 1

        def broken(*args):
            raise FloatingPointError("planted")

        monkeypatch.setattr(k, "train_rows_whole_par", broken)
        with pytest.raises(FloatingPointError, match="planted"):
            anybn.batch_norm_train(x)
        assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(most)

    calls = []  # neither compiled nor private getter and setter: the public ones
    monkeypatch.delattr(k, "thread_count")
    monkeypatch.delattr(parallel, "_get_num_threads")
    monkeypatch.delattr(parallel, "_set_num_threads")
    monkeypatch.setattr(numba, "get_num_threads", lambda: 3)
    monkeypatch.setattr(numba, "set_num_threads", calls.append)
    pid, on_pool = cpu._start_pool(k)
    assert pid in (os.getpid(), -1)
    ran = []
    on_pool(most + 1, lambda *a: ran.append(a), (1, 2))
    assert ran == [(1, 2)] and calls == [most, 3 if most >= 3 else most]


def test_thread_counter_takes_the_quickest_way_that_reads_and_moves_numbas_count(monkeypatch):
    """Compiled calls of the threading layer's functions where they agree with numba's public
    functions, else numba's private ctypes ones, else the public ones; each read and set
    what ``numba.get_num_threads`` reads."""
    import types

    import numba
    from numba.np.ufunc import parallel

    from anybn._fast import _cpu_kernels as k
    from anybn._fast import cpu

    most = numba.config.NUMBA_NUM_THREADS
    if most < 2:
        pytest.skip("numba runs one thread here")
    cpu._start_pool(k)
    try:
        get, put = cpu._thread_counter(k)
        assert (get, put) == (k.thread_count, k.set_thread_count)
        numba.set_num_threads(1)
        assert get() == 1
        put(2)
        assert numba.get_num_threads() == 2 and get() == 2
        bare = types.SimpleNamespace()  # kernels without the compiled pair
        assert cpu._thread_counter(bare) == (parallel._get_num_threads, parallel._set_num_threads)
        wrong = types.SimpleNamespace(thread_count=lambda: 0, set_thread_count=k.set_thread_count)
        assert cpu._thread_counter(wrong)[0] is parallel._get_num_threads  # reads wrong: skipped
        stuck = types.SimpleNamespace(thread_count=k.thread_count, set_thread_count=lambda n: None)
        assert cpu._thread_counter(stuck)[0] is parallel._get_num_threads  # does not move it: skipped
        assert numba.get_num_threads() == 2  # the probes put the count back
        real_get, real_set = parallel._get_num_threads, parallel._set_num_threads
        monkeypatch.setattr(numba, "get_num_threads", lambda: real_get())  # the public ones use them
        monkeypatch.setattr(numba, "set_num_threads", lambda n: real_set(n))
        monkeypatch.delattr(parallel, "_get_num_threads")  # a numba without them: the public ones
        assert cpu._thread_counter(bare) == (numba.get_num_threads, numba.set_num_threads)
    finally:
        numba.set_num_threads(most)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_keeps_working():
    """GNU OpenMP aborts a forked child that launches parallel work: the child of a process
    that started numba's pool takes Python threads instead (its plans and core count start
    afresh), and gets the right answer."""
    code = (
        "import os, numpy as np, anybn\n"
        "x = np.random.default_rng(0).standard_normal((2048, 256)).astype(np.float32) + 5\n"
        "y0, _ = anybn.batch_norm_train(x)\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    path = anybn._fast.select('train', np, x)\n"
        "    fresh = path._plans == {}  # plans made with the parent's pool are dropped\n"
        "    y, _ = anybn.batch_norm_train(x)\n"
        "    os._exit(0 if np.array_equal(y, y0) and fresh and not path._pool_ok() else 3)\n"
        "_, status = os.waitpid(pid, 0)\n"
        "assert os.waitstatus_to_exitcode(status) == 0, status\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("ANYBN_FAST_PATHS", "ANYBN_NUM_THREADS")}
    env["ANYBN_NUM_THREADS"] = "2"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.parametrize("policy, threads", [("", 2), ("PASSIVE", 1), ("passive", 1), ("ACTIVE", 2)])
def test_sleeping_workers_raise_the_threading_threshold(monkeypatch, policy, threads):
    """2 MiB of x is split across 2 threads when OpenMP's workers spin, not when they sleep
    between regions (OMP_WAIT_POLICY=PASSIVE: each region would pay their wake-up)."""
    from anybn._fast.cpu import CpuPath, _View
    from anybn._layout import layout_of

    monkeypatch.setenv("ANYBN_NUM_THREADS", "2")
    monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    x = np.zeros((8, 64, 32, 32), np.float32)  # 2 MiB
    view = _View(layout_of("t", NP, x, 1))
    assert CpuPath()._split(view, x.nbytes)[1] == threads
    big = np.zeros((32, 64, 32, 32), np.float32)  # 8 MiB: split whatever the policy
    assert CpuPath()._split(_View(layout_of("t", NP, big, 1)), big.nbytes)[1] == 2
