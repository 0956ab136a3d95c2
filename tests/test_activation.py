"""Fused BN + activation (+ residual): z = act(BN(x) [+ residual]) and its backward.

References: PyTorch autograd of ``F.batch_norm`` followed by ``+ residual`` and
``torch.relu`` / ``torch.sigmoid`` in float64, never anybn itself.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import anybn
from conftest import numpy_fast_path_installed
from reference import make_data

torch = pytest.importorskip("torch")

LAYOUTS = [((16, 5), 1), ((4, 5, 6, 7), 1), ((4, 6, 7, 5), -1)]
FUSIONS = [("relu", False), ("sigmoid", False), (None, True), ("relu", True), ("sigmoid", True)]


def _torch_reference(x64, g64, w64, b64, r64, axis, activation, *, mean=None, var=None):
    """(z, dx, dweight, dbias, dresidual) by autograd, the feature axis moved to 1 and back."""
    ndim = x64.ndim
    perm = list(range(ndim))
    perm.insert(1, perm.pop(axis % ndim))
    inv = np.argsort(perm)
    t = lambda a: torch.tensor(np.transpose(a, perm), requires_grad=True)  # noqa: E731
    xt, rt = t(x64), (t(r64) if r64 is not None else None)
    wt, bt = torch.tensor(w64, requires_grad=True), torch.tensor(b64, requires_grad=True)
    if mean is None:
        z = torch.nn.functional.batch_norm(xt, None, None, wt, bt, training=True, eps=1e-5)
    else:
        z = torch.nn.functional.batch_norm(xt, torch.tensor(mean), torch.tensor(var), wt, bt, training=False,
                                           eps=1e-5)
    if rt is not None:
        z = z + rt
    z = {"relu": torch.relu, "sigmoid": torch.sigmoid, None: lambda a: a}[activation](z)
    z.backward(torch.tensor(np.transpose(g64, perm)))
    back = lambda a: np.transpose(a.detach().numpy(), inv)  # noqa: E731
    return (back(z), back(xt.grad), wt.grad.numpy(), bt.grad.numpy(),
            back(rt.grad) if rt is not None else None)


def _inputs(shape, axis, seed=0):
    c = shape[axis]
    return (make_data(shape, mean=1.0, std=2.0, seed=seed), make_data(shape, seed=seed + 1),
            make_data((c,), mean=1.0, std=0.3, seed=seed + 2), make_data((c,), std=0.5, seed=seed + 3),
            make_data(shape, std=0.7, seed=seed + 4))


@pytest.mark.parametrize("activation, with_residual", FUSIONS)
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_train_and_backward_match_torch_autograd_in_float64(backend, shape, axis, activation, with_residual):
    x64, g64, w64, b64, r64 = _inputs(shape, axis)
    if not with_residual:
        r64 = None
    a = backend.asarray
    y, saved = anybn.batch_norm_train(a(x64), a(w64), a(b64), axis=axis, activation=activation,
                                      residual=None if r64 is None else a(r64))
    out = anybn.batch_norm_backward(a(g64), saved)
    assert len(out) == (4 if with_residual else 3)
    ref = _torch_reference(x64, g64, w64, b64, r64, axis, activation)
    m = x64.size // shape[axis]
    # float64 throughout: a handful of roundings of O(1) values per element, sums of m terms
    np.testing.assert_allclose(backend.to_numpy(y), ref[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(out[0]), ref[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(out[1]), ref[2], rtol=1e-10, atol=1e-12 * m)
    np.testing.assert_allclose(backend.to_numpy(out[2]), ref[3], rtol=1e-10, atol=1e-12 * m)
    if with_residual:
        np.testing.assert_allclose(backend.to_numpy(out[3]), ref[4], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation, with_residual", FUSIONS)
def test_fixed_statistics_with_activation_match_torch(backend, activation, with_residual):
    shape, axis = (4, 5, 6, 7), 1
    x64, g64, w64, b64, r64 = _inputs(shape, axis, seed=10)
    if not with_residual:
        r64 = None
    mean, var = make_data((5,), seed=20), 0.5 + make_data((5,), seed=21) ** 2
    a = backend.asarray
    res = None if r64 is None else a(r64)
    y, saved = anybn.batch_norm_fixed(a(x64), a(mean), a(var), a(w64), a(b64), activation=activation, residual=res)
    y_eval = anybn.batch_norm_eval(a(x64), a(mean), a(var), a(w64), a(b64), activation=activation, residual=res)
    out = anybn.batch_norm_backward(a(g64), saved)
    ref = _torch_reference(x64, g64, w64, b64, r64, axis, activation, mean=mean, var=var)
    for got in (y, y_eval):
        np.testing.assert_allclose(backend.to_numpy(got), ref[0], rtol=1e-12, atol=1e-12)
    m = x64.size // 5
    np.testing.assert_allclose(backend.to_numpy(out[0]), ref[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(out[1]), ref[2], rtol=1e-10, atol=1e-12 * m)
    if with_residual:
        np.testing.assert_allclose(backend.to_numpy(out[3]), ref[4], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_relu_at_nan_and_inf_follows_torch(backend, shape, axis):
    """PyTorch's ReLU on every backend: relu(z) = 0 where z <= 0, else z (NaN stays NaN, -inf
    gives 0), and its gradient 0 where z <= 0 even for a NaN dy (``threshold_backward``), dy
    (NaN too) where z > 0. Fixed statistics, so that one value moves only its own z. The
    backward's x stays finite here; a non-finite x in the backward: the next test."""
    x64, g64, w64, b64, _ = _inputs(shape, axis, seed=30)
    c = shape[axis]
    mean, var = make_data((c,), seed=31), 0.5 + make_data((c,), seed=32) ** 2
    w64 = np.abs(w64) + 0.1  # z rises with x: x far below the mean is masked, far above passes
    feature = lambda i: np.unravel_index(i, shape)[axis]  # noqa: E731
    fx = x64.copy().reshape(-1)  # the forward's x: z NaN, inf, -inf
    fx[[3, 11, 19]] = np.nan, np.inf, -np.inf
    bx, bg = x64.reshape(-1), g64.reshape(-1)  # the backward's: a NaN dy where z < 0 and where z > 0
    bx[27], bg[27] = mean[feature(27)] - 100.0, np.nan
    bx[35], bg[35] = mean[feature(35)] + 100.0, np.nan
    a = backend.asarray
    fx = fx.reshape(shape)
    for got in (anybn.batch_norm_fixed(a(fx), a(mean), a(var), a(w64), a(b64), axis=axis, activation="relu")[0],
                anybn.batch_norm_eval(a(fx), a(mean), a(var), a(w64), a(b64), axis=axis, activation="relu")):
        got = backend.to_numpy(got)
        flat = got.reshape(-1)
        assert np.isnan(flat[3]) and flat[11] == np.inf and flat[19] == 0
        ref = _torch_reference(fx, g64, w64, b64, None, axis, "relu", mean=mean, var=var)
        np.testing.assert_allclose(got, ref[0], rtol=1e-12, atol=1e-12)  # NaN where torch's, and only there
    _, saved = anybn.batch_norm_fixed(a(x64), a(mean), a(var), a(w64), a(b64), axis=axis, activation="relu")
    dx, _, dbias = anybn.batch_norm_backward(a(g64), saved)
    ref = _torch_reference(x64, g64, w64, b64, None, axis, "relu", mean=mean, var=var)
    dx = backend.to_numpy(dx)
    assert dx.reshape(-1)[27] == 0 and np.isnan(dx.reshape(-1)[35])
    np.testing.assert_allclose(dx, ref[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(dbias), ref[3], rtol=1e-10, atol=1e-12 * x64.size)


@pytest.mark.parametrize("activation, with_residual", [("relu", False), ("sigmoid", False), ("relu", True)])
@pytest.mark.parametrize("shape, axis", LAYOUTS)
def test_fixed_statistics_backward_at_non_finite_x_follows_torch(backend, shape, axis, activation, with_residual):
    """With fixed statistics dx = k * dy' has no term in x, so an infinite or NaN x moves dx
    only through act'(z): relu passes dy where z = +inf or NaN and blocks it at -inf, the
    sigmoid's derivative is 0 at +-inf and NaN at NaN, as in PyTorch. (The CPU fast path
    computed k (dy' + 0 * (x - p) + 0), NaN at every non-finite x.)"""
    x64, g64, w64, b64, r64 = _inputs(shape, axis, seed=40)
    c = shape[axis]
    mean, var = make_data((c,), seed=41), 0.5 + make_data((c,), seed=42) ** 2
    w64 = np.abs(w64) + 0.1  # z rises with x
    x64.reshape(-1)[[3, 11, 19]] = np.inf, -np.inf, np.nan
    r64 = r64 if with_residual else None
    a = backend.asarray
    _, saved = anybn.batch_norm_fixed(a(x64), a(mean), a(var), a(w64), a(b64), axis=axis, activation=activation,
                                      residual=None if r64 is None else a(r64))
    with np.errstate(invalid="ignore"):  # dweight meets 0 * inf (NaN in PyTorch too): NumPy warns
        out = anybn.batch_norm_backward(a(g64), saved)
    ref = _torch_reference(x64, g64, w64, b64, r64, axis, activation, mean=mean, var=var)
    dx = backend.to_numpy(out[0]).reshape(-1)
    want_nan = [False, False, activation == "sigmoid"]
    assert list(np.isnan(dx[[3, 11, 19]])) == want_nan
    assert np.isnan(dx).sum() == sum(want_nan)  # NaN nowhere else
    np.testing.assert_allclose(dx.reshape(shape), ref[1], rtol=1e-12, atol=1e-12)  # NaN where torch's only
    for got, want in zip(out[1:3], ref[2:4]):  # dweight NaN or inf where PyTorch's is
        np.testing.assert_allclose(backend.to_numpy(got), want, rtol=1e-10, atol=1e-12 * x64.size)
    if with_residual:
        np.testing.assert_allclose(backend.to_numpy(out[3]), ref[4], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("with_residual", [True, False])  # without: the fast path's whole steps
@pytest.mark.parametrize("path", ["fast", "generic"])
@pytest.mark.parametrize("activation", ["relu", "sigmoid"])
@pytest.mark.parametrize("shape, axis", [((1030, 130), 1), ((6, 16, 33, 40), 1), ((6, 33, 40, 16), -1),
                                         ((1030, 520), 1)])  # 512+ features: four rows per sweep
def test_float32_fused_against_float64(monkeypatch, path, activation, shape, axis, with_residual):
    """float32 on the CPU fast path and the generic path, above the threading threshold.

    relu is 1-Lipschitz and sigmoid 1/4-Lipschitz, so z inherits BN's float32 error: a few
    roundings of |BN(x)| + |residual| (the shifted statistics keep the mean and variance
    to ~m u relative on the generic path, m = 7920 here). Where z is within that error of
    0, relu's derivative may flip: those elements (|z64| <= tol) are left out of dx, and a
    flip moves its feature's sums of dy' and dy' x-hat by |dy_i| and |dy_i x-hat_i|, so every
    dx_j of that feature by up to k (|dy_i| + |dy_i x-hat_i| |x-hat_j|) / m: added to the bound.
    """
    if path == "generic":
        monkeypatch.setenv("ANYBN_FAST_PATHS", "0")
    elif not numpy_fast_path_installed():
        pytest.skip("no NumPy fast path (pip install 'anybn[fast]')")
    x64, g64, w64, b64, r64 = _inputs(shape, axis, seed=30)
    f32 = lambda a: a.astype(np.float32)  # noqa: E731
    if not with_residual:
        r64 = np.zeros_like(r64)
    x32, g32, w32, b32, r32 = map(f32, (x64, g64, w64, b64, r64))
    y, saved = anybn.batch_norm_train(x32, w32, b32, axis=axis, activation=activation,
                                      residual=r32 if with_residual else None)
    if with_residual:
        dx, dw, db, dres = anybn.batch_norm_backward(g32, saved)
    else:
        dx, dw, db = anybn.batch_norm_backward(g32, saved)
    ref = _torch_reference(*(a.astype(np.float64) for a in (x32, g32, w32, b32, r32)), axis, activation)
    u = 2.0**-24
    m = x64.size // shape[axis]
    stat_u = 16 * u if path == "fast" else m * u  # the fast path sums blocks of 16 rows in float32
    pre = np.abs(x64 - x64.mean()) / x64.std() * np.abs(w64).max() + np.abs(b64).max() + np.abs(r64)
    tol_z = 8 * u * (pre + 1) + 4 * stat_u
    assert np.all(np.abs(y - ref[0]) <= tol_z)
    # dx = k (dy' + a (x - p) + b) with |k| <= 1.9 and |x-hat| <= 5 here: <= 5 roundings of
    # terms up to ~5 (|dy'| + 1), plus the statistics' error through a and b
    tol_dx = 16 * u * (np.abs(g64) + 1) * 5 + 8 * stat_u * 5
    safe = np.ones(shape, bool)
    if activation == "relu":  # the elements near the kink, and what their flips do to the sums
        f64 = lambda a: a.astype(np.float64)  # noqa: E731
        z_pre = _torch_reference(*map(f64, (x32, g32, w32, b32, r32)), axis, None)[0]
        safe = np.abs(z_pre) > tol_z
        last = lambda a: np.moveaxis(a, axis, -1).reshape(-1, shape[axis])  # noqa: E731
        xc = last(f64(x32))
        xhat = (xc - xc.mean(0)) / np.sqrt(xc.var(0) + 1e-5)
        near = ~last(safe)
        flip_dy = np.where(near, np.abs(last(g64)), 0).sum(0)
        flip_dyx = np.where(near, np.abs(last(g64) * xhat), 0).sum(0)
        k = np.abs(w64) / np.sqrt(xc.var(0) + 1e-5)
        extra = k * (flip_dy + flip_dyx * np.abs(xhat)) / xc.shape[0]
        tol_dx = tol_dx + np.moveaxis(extra.reshape(np.moveaxis(x32, axis, -1).shape), -1, axis)
    assert np.all(np.abs(dx - ref[1])[safe] <= tol_dx[safe])
    # the parameter gradients: float64 sums of float32 terms, each term off by a few roundings
    # (and the statistics' error through x-hat), plus what flips near the kink move
    if activation != "relu":
        last = lambda a: np.moveaxis(a, axis, -1).reshape(-1, shape[axis])  # noqa: E731
        xc = last(x32.astype(np.float64))
        xhat = (xc - xc.mean(0)) / np.sqrt(xc.var(0) + 1e-5)
        flip_dy = flip_dyx = 0.0
    terms = (np.abs(np.moveaxis(ref[0] if activation is None else g64, axis, -1).reshape(-1, shape[axis]))
             * (np.abs(xhat) + 1)).sum(0)
    tol_sum = 8 * (u + stat_u) * terms
    assert np.all(np.abs(db - ref[3]) <= tol_sum + flip_dy)
    assert np.all(np.abs(dw - ref[2]) <= tol_sum + flip_dyx)
    if with_residual:
        assert np.all(np.abs(dres - ref[4])[safe] <= 8 * u * np.abs(g64)[safe] + 1e-30)


def test_layer_with_activation_and_residual(backend):
    shape, axis = (8, 3, 4), 1
    x64, g64, w64, b64, r64 = _inputs(shape, axis, seed=40)
    layer = anybn.BatchNorm(3, xp=backend.module, device=backend.device, dtype=backend.dtype("float64"),
                            activation="relu")
    layer.load_state_dict({"weight": w64, "bias": b64, "running_mean": np.zeros(3), "running_var": np.ones(3),
                           "num_batches_tracked": 0})
    y = layer(backend.asarray(x64), backend.asarray(r64))
    dx = layer.backward(backend.asarray(g64))
    ref = _torch_reference(x64, g64, w64, b64, r64, axis, "relu")
    np.testing.assert_allclose(backend.to_numpy(y), ref[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(dx), ref[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(layer.grad_residual), ref[4], rtol=1e-12, atol=1e-12)
    layer(backend.asarray(x64))  # no residual this time
    layer.backward(backend.asarray(g64))
    assert layer.grad_residual is None


def test_bad_activation_arguments_are_rejected():
    x = make_data((6, 3))
    with pytest.raises(ValueError, match=r"batch_norm_train: activation must be one of \[None, 'relu', 'sigmoid'\], got 'tanh'"):
        anybn.batch_norm_train(x, activation="tanh")
    with pytest.raises(ValueError, match=r"residual has shape \(6, 4\), expected \(6, 3\) = the shape of x"):
        anybn.batch_norm_train(x, residual=np.ones((6, 4)))
    with pytest.raises(TypeError, match="residual must have a real floating dtype"):
        anybn.batch_norm_eval(x, np.zeros(3), np.ones(3), residual=np.ones((6, 3), dtype=np.int64))
    with pytest.raises(ValueError, match="not available with virtual_batch_size= yet"):
        anybn.batch_norm_train(x, activation="relu", virtual_batch_size=3)
    with pytest.raises(ValueError, match="BatchNorm: activation must be one of"):
        anybn.BatchNorm(3, activation="gelu")


@pytest.mark.skipif(not numpy_fast_path_installed(), reason="no NumPy fast path (pip install 'anybn[fast]')")
def test_fused_memory_is_the_outputs_plus_per_feature_vectors(monkeypatch):
    """Training forward with relu + residual allocates z plus O(C); backward dx and dresidual
    plus O(C): no pre-activation, no mask."""
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 32, 32, 32), dtype=np.float32)
    r = rng.standard_normal(x.shape, dtype=np.float32)
    g = rng.standard_normal(x.shape, dtype=np.float32)
    anybn.batch_norm_backward(g, anybn.batch_norm_train(x, activation="relu", residual=r)[1])  # compile
    slack = 64 * 1024
    tracemalloc.start()
    try:
        y, saved = anybn.batch_norm_train(x, activation="relu", residual=r)
        _, peak_forward = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        current, _ = tracemalloc.get_traced_memory()
        out = anybn.batch_norm_backward(g, saved)
        _, peak_backward = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak_forward <= x.nbytes + slack, peak_forward
    assert peak_backward - current <= 2 * x.nbytes + slack, peak_backward - current
    assert len(out) == 4
