"""``anybn.testing``: its reference against the suite's own and PyTorch's, its backends, ``assert_close``.

The expected values come from ``tests/reference.py`` (float64 NumPy written separately, the
backward through the staged computational graph) and from PyTorch in float64
(``torch.nn.functional.batch_norm`` and autograd), never from ``anybn.testing`` itself.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from reference import make_data, reference_backward, reference_batch_norm, reference_moments

from anybn import testing

CASES = [((16, 5), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((3, 4, 7), 1), ((2, 3, 2, 3, 4), 1)]
RTOL, ATOL = 1e-10, 1e-12  # float64 against float64, written differently


def _params(shape: tuple[int, ...], axis: int, seed: int = 1) -> tuple[np.ndarray, ...]:
    """x at mean 3, std 2; dy; weight, bias, running mean and variance of size C."""
    rng = np.random.default_rng(seed)
    c = shape[axis]
    x = make_data(shape, mean=3.0, std=2.0, seed=seed)
    dy = rng.standard_normal(shape)
    return x, dy, rng.uniform(0.5, 1.5, c), rng.standard_normal(c), rng.standard_normal(c), rng.uniform(0.5, 2.0, c)


# --------------------------------------------------- the reference against tests/reference.py


@pytest.mark.parametrize("shape, axis", CASES)
def test_moments_match_the_suite_reference(shape, axis):
    x = _params(shape, axis)[0]
    mean, var = testing.reference_moments(x, axis=axis)
    want_mean, want_var = reference_moments(x, axis)
    assert mean.shape == var.shape == (shape[axis],) and mean.dtype == np.float64
    testing.assert_close(mean, want_mean, rtol=RTOL, atol=ATOL)
    testing.assert_close(var, want_var, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape, axis", CASES)
@pytest.mark.parametrize("affine", [False, True])
def test_forward_matches_the_suite_reference(shape, axis, affine):
    x, _, w, b, rm, rv = _params(shape, axis)
    w, b = (w, b) if affine else (None, None)
    y = testing.reference_train(x, w, b, axis=axis, eps=1e-3)
    assert y.shape == x.shape and y.dtype == np.float64
    testing.assert_close(y, reference_batch_norm(x, axis, w, b, eps=1e-3), rtol=RTOL, atol=ATOL)
    ye = testing.reference_eval(x, rm, rv, w, b, axis=axis, eps=1e-3)
    testing.assert_close(ye, reference_batch_norm(x, axis, w, b, eps=1e-3, mean=rm, var=rv), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("shape, axis", CASES)
@pytest.mark.parametrize("affine", [False, True])
def test_backward_matches_the_suite_reference(shape, axis, affine):
    x, dy, w, *_ = _params(shape, axis)
    w = w if affine else None
    dx, dw, db = testing.reference_backward(dy, x, w, axis=axis)
    want = reference_backward(x, dy, axis, w)
    assert dx.shape == x.shape and dw.shape == db.shape == (shape[axis],)
    for got, expected, name in zip((dx, dw, db), want, ("dx", "dweight", "dbias")):
        testing.assert_close(got, expected, rtol=1e-9, atol=1e-11, err_msg=name)


def test_reference_takes_float32_and_computes_in_float64():
    x32 = _params((8, 3), 1)[0].astype(np.float32)
    y = testing.reference_train(x32)
    assert y.dtype == np.float64
    testing.assert_close(y, reference_batch_norm(x32.astype(np.float64), 1), rtol=RTOL, atol=ATOL)


def test_reference_errors():
    with pytest.raises(ValueError, match="axis 2 is out of range for an array of 2 dimensions"):
        testing.reference_moments(np.ones((4, 3)), axis=2)
    with pytest.raises(ValueError, match=r"dy has shape \(4, 2\), expected x's shape \(4, 3\)"):
        testing.reference_backward(np.ones((4, 2)), np.ones((4, 3)))


# ------------------------------------------------------------- the reference against PyTorch


@pytest.mark.parametrize("shape, axis", CASES)
def test_reference_matches_torch(shape, axis):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    x, dy, w, b, rm, rv = _params(shape, axis, seed=2)
    eps = 1e-5

    def channels_first(a: np.ndarray) -> np.ndarray:
        return np.moveaxis(a, axis, 1)

    def back(t) -> np.ndarray:
        return np.moveaxis(t.detach().numpy(), 1, axis)

    xt = torch.tensor(channels_first(x), dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    bt = torch.tensor(b, dtype=torch.float64, requires_grad=True)
    yt = F.batch_norm(xt, None, None, wt, bt, training=True, eps=eps)
    yt.backward(torch.tensor(channels_first(dy)))
    testing.assert_close(testing.reference_train(x, w, b, axis=axis, eps=eps), back(yt), rtol=RTOL, atol=ATOL)
    dx, dw, db = testing.reference_backward(dy, x, w, axis=axis, eps=eps)
    testing.assert_close(dx, back(xt.grad), rtol=1e-9, atol=1e-11, err_msg="dx")
    testing.assert_close(dw, wt.grad.numpy(), rtol=1e-9, atol=1e-11, err_msg="dweight")
    testing.assert_close(db, bt.grad.numpy(), rtol=1e-9, atol=1e-11, err_msg="dbias")
    # eval: the given statistics
    ye = F.batch_norm(torch.tensor(channels_first(x)), torch.tensor(rm), torch.tensor(rv), torch.tensor(w),
                      torch.tensor(b), training=False, eps=eps)
    testing.assert_close(testing.reference_eval(x, rm, rv, w, b, axis=axis, eps=eps), back(ye), rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------------ assert_close


def test_assert_close_passes_within_tolerance():
    d = np.linspace(-3.0, 3.0, 60).reshape(6, 10)
    testing.assert_close(d, d)
    testing.assert_close(d * (1 + 5e-11), d, rtol=RTOL, atol=ATOL)
    testing.assert_close(d + 0.9e-3, d, rtol=0, atol=1e-3)
    nan_inf = np.array([np.nan, np.inf, -np.inf, 1.0])
    testing.assert_close(nan_inf, nan_inf.copy())


@pytest.mark.parametrize("rtol, atol", [(RTOL, ATOL), (1e-9, 1e-11), (1e-5, 1e-7)])
def test_a_planted_error_of_1e_4_fails(rtol, atol):
    # the tolerances used in these tests, and a float32-like one: each must catch the error
    desired = np.linspace(0.5, 2.0, 400).reshape(20, 20)
    actual = desired.copy()
    actual[13, 7] *= 1 + 1e-4
    with pytest.raises(AssertionError) as exc:
        testing.assert_close(actual, desired, rtol=rtol, atol=atol, err_msg="planted")
    message = str(exc.value)
    assert message.startswith("planted\n")
    assert "mismatched elements: 1 / 400" in message
    abs_error = desired[13, 7] * 1e-4  # computed here, not read back from the function
    assert f"max absolute error: {abs_error:.6g} at index (13, 7)" in message
    assert "max relative error: 0.0001 at index (13, 7)" in message
    assert f"desired {float(desired[13, 7])!r}" in message
    testing.assert_close(actual, desired, rtol=1e-3)  # and passes where 1e-4 is allowed


def test_assert_close_reports_the_largest_errors_apart():
    desired = np.array([[1000.0, 1.0], [0.001, 5.0]])
    actual = desired + np.array([[1.0, 0.0], [0.001, 0.0]])  # absolute: 1 at (0, 0); relative: 100% at (1, 0)
    with pytest.raises(AssertionError) as exc:
        testing.assert_close(actual, desired, rtol=1e-6)
    message = str(exc.value)
    assert "max absolute error: 1 at index (0, 0)" in message
    assert "max relative error: 1 at index (1, 0)" in message
    assert "mismatched elements: 2 / 4 (50%)" in message


def test_assert_close_errors():
    with pytest.raises(AssertionError, match=r"actual has shape \(3,\), desired \(1, 3\)"):
        testing.assert_close(np.ones(3), np.ones((1, 3)))  # no broadcasting
    with pytest.raises(AssertionError, match=r"NaN in only one of the arrays, first at index \(1,\)"):
        testing.assert_close(np.array([1.0, np.nan]), np.array([1.0, 2.0]), rtol=1.0)
    with pytest.raises(AssertionError, match="mismatched elements: 1 / 2"):
        testing.assert_close(np.array([np.inf, 1.0]), np.array([-np.inf, 1.0]))
    with pytest.raises(AssertionError, match="max absolute error: 2e-06"):
        testing.assert_close(np.zeros(2), np.array([0.0, 2e-6]), atol=1e-6)


# -------------------------------------------------------------------------------- backends


def _backend_or_skip(name: str) -> testing.Backend:
    try:
        return testing.backend(name)
    except testing.Unavailable as exc:
        pytest.skip(str(exc))


@pytest.mark.parametrize("name", testing.BACKENDS)
def test_each_backend_round_trips(name):
    be = _backend_or_skip(name)
    data = np.arange(12.0).reshape(3, 4) / 7
    a = be.asarray(data)
    assert be.dtype("float64") == a.dtype  # float64 kept
    back = be.to_numpy(a)
    assert isinstance(back, np.ndarray) and back.dtype == np.float64
    np.testing.assert_array_equal(back, data)
    f = be.asarray(data, "float32")
    assert f.dtype == be.dtype("float32")
    np.testing.assert_array_equal(be.to_numpy(f), data.astype(np.float32))
    assert be.to_numpy(f, "float64").dtype == np.float64
    be.synchronize(a, f)
    assert be.float16 == (name not in ("array_api_strict", "array_api_strict:device1"))
    if be.float16:
        assert be.to_numpy(be.asarray(data, "float16")).dtype == np.float16
    if be.bfloat16 is not None:
        h = be.asarray(np.array([1.0, 1.0 + 2**-7, 3.0]), "bfloat16")  # all exact in bfloat16
        assert h.dtype == be.bfloat16
        np.testing.assert_array_equal(be.to_numpy(h), np.array([1.0, 1.0 + 2**-7, 3.0], dtype=np.float32))
    assert be.lazy == (name == "dask")
    assert be.name == name


def test_backend_devices_and_namespaces():
    import array_api_compat

    for name in ("array_api_strict:device1", "dask", "jax", "torch"):
        try:
            be = testing.backend(name)
        except testing.Unavailable:
            continue
        a = be.asarray(np.ones((2, 3)))
        assert array_api_compat.array_namespace(a) is be.xp, name
        assert str(array_api_compat.device(a)) == str(be.device) or be.device == "cpu", name
    strict = _backend_or_skip("array_api_strict:device1")
    assert strict.asarray(np.ones(2)).device == strict.module.Device("device1")
    dask = _backend_or_skip("dask")
    assert dask.asarray(np.ones((8, 3))).numblocks == (2, 1)  # reductions cross chunks


def test_generic_only_backend_holds_the_fast_path_switch(monkeypatch):
    monkeypatch.setenv("ANYBN_FAST_PATHS", "1")
    generic = testing.backend("numpy:generic")
    assert generic.generic_only and not testing.backend("numpy").generic_only
    import os

    with generic.environment():
        assert os.environ["ANYBN_FAST_PATHS"] == "0"
    assert os.environ["ANYBN_FAST_PATHS"] == "1"
    monkeypatch.delenv("ANYBN_FAST_PATHS")
    with generic.environment():
        assert os.environ["ANYBN_FAST_PATHS"] == "0"
    assert "ANYBN_FAST_PATHS" not in os.environ


def test_missing_backends_say_why(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    with pytest.raises(testing.Unavailable, match=r"torch is not installed \(pip install torch==2.13.0\)"):
        testing.backend("torch")
    assert issubclass(testing.Unavailable, NotImplementedError)  # asv's skip
    with pytest.raises(ValueError, match="backend 'numpy:fast': expected one of numpy, numpy:generic"):
        testing.backend("numpy:fast")


def test_for_module():
    be = testing.for_module(np)
    assert be.name == "numpy" and be.device is None and be.float16 and not be.lazy
    np.testing.assert_array_equal(be.to_numpy(be.asarray([1.5, 2.5], "float32")), np.array([1.5, 2.5], np.float32))
    import json

    with pytest.raises(ValueError, match="backend json: it has no asarray"):
        testing.for_module(json)


def test_importing_testing_imports_no_array_library():
    code = ("import sys, anybn.testing; "
            "print(sorted(m for m in ('torch', 'jax', 'dask', 'cupy', 'array_api_strict') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
