"""The express route of plain NumPy calls (``CpuPath.train_express``, ``eval_express``,
``backward_express``).

It exists for speed only: it must give the usual route's bits (same kernels, same plan),
decline (None) everything off the common case so that the usual route decides and words
the errors, and follow what the usual route reads at each call (``ANYBN_FAST_PATHS``,
``ANYBN_NUM_THREADS``, kernels replaced on the module).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import anybn
from anybn import _fast
from conftest import numpy_fast_path_installed

pytestmark = pytest.mark.skipif(not numpy_fast_path_installed(),
                                reason="no NumPy fast path installed (pip install 'anybn[fast]')")

# small ones on the calling thread, ones of 1 MiB and more on threads; rows and planes
SHAPES = [((8, 3), 1), ((4, 3, 5), 1), ((2, 3, 4, 5), 1), ((2, 4, 5, 3), -1), ((5, 2), 0),
          ((1030, 130), 1), ((1024, 1024), 1), ((6, 16, 33, 40), 1), ((6, 33, 40, 16), -1),
          ((3, 7, 11, 517), -1), ((8, 64, 24, 24), 1)]


def _data(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = (3.0 + 1.5 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy, rng.uniform(0.5, 1.5, c).astype(dtype), rng.standard_normal(c).astype(dtype)


def _cpu_path():
    anybn.batch_norm_train(np.arange(8, dtype=np.float32).reshape(4, 2))  # loads the path
    path = _fast.registered()[0]
    assert type(path).__name__ == "CpuPath"
    return path


def _usual(monkeypatch):
    """Switch the express route off (the public functions then take the usual route)."""
    monkeypatch.setattr(_fast, "express", lambda route: None)


def _same_bits(got, want, what):
    assert type(got) is type(want), what
    if isinstance(want, np.ndarray):
        assert got.dtype == want.dtype and got.shape == want.shape, what
        np.testing.assert_array_equal(got, want, err_msg=what, strict=True)
    else:
        assert got == want, what


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape, axis", SHAPES)
def test_express_gives_the_usual_routes_bits(monkeypatch, shape, axis, affine, dtype):
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    path = _cpu_path()
    x, dy, w, b = _data(shape, axis, dtype)
    if not affine:
        w = b = None
    express = path.train_express(x, w, b, axis, 1e-5)
    assert express is not None
    y_eval = path.eval_express(x, express[1].mean, express[1].var, w, b, axis, 1e-5)
    assert y_eval is not None
    grads = path.backward_express(dy, express[1])
    assert grads is not None
    _usual(monkeypatch)
    y, saved = anybn.batch_norm_train(x, w, b, axis=axis)
    _same_bits(express[0], y, "y")
    for name in ("mean", "invstd", "var", "weight", "has_bias", "axis", "eps", "count", "batch_stats", "pivot",
                 "delta", "layout", "act"):
        _same_bits(getattr(express[1], name), getattr(saved, name), name)
    assert express[1].x is x and saved.x is x
    _same_bits(y_eval, anybn.batch_norm_eval(x, saved.mean, saved.var, w, b, axis=axis), "y_eval")
    for got, want, name in zip(grads, anybn.batch_norm_backward(dy, saved), ("dx", "dweight", "dbias")):
        if want is None:
            assert got is None, name
        else:
            _same_bits(got, want, name)


def _declined_train():
    x = np.ones((6, 4), np.float32) + np.arange(6, dtype=np.float32)[:, None]
    c = np.ones(4, np.float32)

    class Sub(np.ndarray):
        pass

    return {
        "float16": (x.astype(np.float16), None, None, 1, 1e-5),
        "big-endian float32": (x.astype(">f4"), None, None, 1, 1e-5),
        "int": (x.astype(np.int32), None, None, 1, 1e-5),
        "list": (x.tolist(), None, None, 1, 1e-5),
        "subclass": (x.view(Sub), None, None, 1, 1e-5),
        "fortran order": (np.asfortranarray(x), None, None, 1, 1e-5),
        "strided": (np.repeat(x, 2, axis=1)[:, ::2], None, None, 1, 1e-5),
        "1-D": (x[0], None, None, 0, 1e-5),
        "0-D": (np.float32(1.0) * np.ones((), np.float32), None, None, 0, 1e-5),
        "one value per feature": (x[:1], None, None, 1, 1e-5),
        "axis numpy int": (x, None, None, np.int64(1), 1e-5),
        "axis float": (x, None, None, 1.0, 1e-5),
        "axis out of range": (x, None, None, 2, 1e-5),
        "axis below range": (x, None, None, -3, 1e-5),
        "eps int": (x, None, None, 1, 1),
        "eps numpy float": (x, None, None, 1, np.float64(1e-5)),
        "eps zero": (x, None, None, 1, 0.0),
        "eps negative": (x, None, None, 1, -1e-5),
        "eps inf": (x, None, None, 1, float("inf")),
        "eps nan": (x, None, None, 1, float("nan")),
        "weight wrong shape": (x, np.ones(3, np.float32), None, 1, 1e-5),
        "weight wrong dtype": (x, c.astype(np.float64), None, 1, 1e-5),
        "weight list": (x, [1.0] * 4, None, 1, 1e-5),
        "bias 2-D": (x, None, c[None], 1, 1e-5),
        "bias subclass": (x, None, c.view(Sub), 1, 1e-5),
    }


@pytest.mark.parametrize("case", sorted(_declined_train()))
def test_express_declines_what_the_usual_route_must_decide(case):
    path = _cpu_path()
    x, w, b, axis, eps = _declined_train()[case]
    plain = np.ones((6, 4), np.float32) + np.arange(6, dtype=np.float32)[:, None]
    assert path.train_express(plain, None, None, 1, 1e-5) is not None  # that shape planned
    assert path.train_express(x, w, b, axis, eps) is None
    if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.shape[1] == 4):
        return
    mean, var = np.zeros(4, x.dtype), np.ones(4, x.dtype)
    if case == "one value per feature":  # inference needs no batch statistics: plain
        assert path.eval_express(x, mean, var, w, b, axis, eps) is not None
    else:
        assert path.eval_express(x, mean, var, w, b, axis, eps) is None


def test_express_inference_declines_missing_or_mismatched_statistics():
    path = _cpu_path()
    x = np.ones((6, 4), np.float32)
    c = np.ones(4, np.float32)
    assert path.eval_express(x, c, c, None, None, 1, 1e-5) is not None
    for mean, var in ((None, c), (c, None), (c[:3], c), (c, c.astype(np.float64)), (c.tolist(), c)):
        assert path.eval_express(x, mean, var, None, None, 1, 1e-5) is None


def test_declined_calls_raise_the_usual_routes_errors():
    x = np.ones((6, 4), np.float32)
    with pytest.raises(ValueError, match="eps"):
        anybn.batch_norm_train(x, eps=0.0)
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        anybn.batch_norm_train(x, axis=2)
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        anybn.batch_norm_train(x[:1])
    with pytest.raises(ValueError, match="weight"):
        anybn.batch_norm_train(x, np.ones(3, np.float32))
    with pytest.raises(TypeError, match="mean is required"):
        anybn.batch_norm_eval(x, None, np.ones(4, np.float32))


def test_express_follows_the_environment_at_each_call(monkeypatch):
    """ANYBN_FAST_PATHS=0 sends plain calls to the generic path; ANYBN_NUM_THREADS and
    OMP_WAIT_POLICY change the plan (one thread: the one-thread kernel; two: numba's pool),
    with the same bits."""
    from anybn._fast import _cpu_kernels as k

    path = _cpu_path()
    x, _, w, b = _data((1024, 256), 1, np.float32)  # 1 MiB: threads where allowed
    monkeypatch.setenv("ANYBN_FAST_PATHS", "0")
    for route in ("train_express", "eval_express", "backward_express"):
        assert _fast.express(route) is None
    monkeypatch.delenv("ANYBN_FAST_PATHS")
    assert _fast.express("train_express")(x, w, b, 1, 1e-5) is not None
    assert _fast.express("eval_express")(x, w, w, w, b, 1, 1e-5) is not None
    ran = []
    for name in ("train_rows_whole", "train_rows_whole_par"):
        kernel = getattr(k, name)
        monkeypatch.setattr(k, name, lambda *args, _k=kernel, _n=name: (ran.append(_n), _k(*args))[1])
    monkeypatch.setenv("ANYBN_NUM_THREADS", "1")
    y1, _ = anybn.batch_norm_train(x, w, b)
    monkeypatch.setenv("ANYBN_NUM_THREADS", "2")
    y2, _ = anybn.batch_norm_train(x, w, b)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # sleeping workers: below 8 MiB, one thread
    y3, _ = anybn.batch_norm_train(x, w, b)
    monkeypatch.delenv("OMP_WAIT_POLICY")
    y4, _ = anybn.batch_norm_train(x, w, b)
    assert ran[0] == "train_rows_whole" and ran[2] == "train_rows_whole"
    if path._pool_ok():
        assert ran == ["train_rows_whole", "train_rows_whole_par", "train_rows_whole", "train_rows_whole_par"]
    for y in (y2, y3, y4):
        np.testing.assert_array_equal(y1, y)


def test_plans_are_kept_for_a_bounded_number_of_shapes():
    from anybn._fast import cpu

    path = _cpu_path()
    for rows in range(2, 2 + 2 * cpu._PLANS_KEPT):
        x = np.ones((rows, 3), np.float32)
        assert path.train_express(x, None, None, 1, 1e-5) is not None
        assert len(path._plans) <= cpu._PLANS_KEPT


def _declined_backward():
    x = (np.ones((6, 4)) + np.arange(6.0)[:, None] * np.arange(1.0, 5.0)).astype(np.float32)
    dy = np.ones_like(x)
    c = np.ones(4, np.float32)
    _, plain = anybn.batch_norm_train(x, c, c)
    _, fixed = anybn.batch_norm_fixed(x, c, c)
    _, with_residual = anybn.batch_norm_train(x, activation="relu", residual=x)
    _, ghost = anybn.batch_norm_train(np.concatenate([x, x + 1]), virtual_batch_size=6)
    _, renorm = anybn.batch_renorm_train(x, c, c, np.zeros(4, np.float32), c, rmax=1.5, dmax=0.5)
    return {
        "dy float16": (dy.astype(np.float16), plain),
        "dy float64": (dy.astype(np.float64), plain),
        "dy list": (dy.tolist(), plain),
        "dy wrong shape": (dy[:5], plain),
        "dy fortran order": (np.asfortranarray(dy), plain),
        "dy strided": (np.repeat(dy, 2, axis=1)[:, ::2], plain),
        "fixed statistics": (dy, fixed),
        "batch statistics off, pivot kept": (dy, dataclasses.replace(plain, batch_stats=False)),
        "residual": (dy, with_residual),
        "ghost": (np.concatenate([dy, dy]), ghost),
        "renorm": (dy, renorm),
        "not a saved state": (dy, {"x": x}),
    }


@pytest.mark.parametrize("case", sorted(_declined_backward()))
def test_express_backward_declines_what_the_usual_route_must_decide(case):
    path = _cpu_path()
    dy, saved = _declined_backward()[case]
    assert path.backward_express(dy, saved) is None


def test_express_backward_serves_fused_activations_as_the_usual_route(monkeypatch):
    path = _cpu_path()
    x, dy, w, b = _data((1024, 256), 1, np.float32)
    _, saved = anybn.batch_norm_train(x, w, b, activation="relu")
    express = path.backward_express(dy, saved)
    assert express is not None
    _usual(monkeypatch)
    for got, want in zip(express, anybn.batch_norm_backward(dy, saved)):
        _same_bits(got, want, "relu backward")
