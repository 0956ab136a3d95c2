"""Folding BN into linear and convolution weights, against torch.nn.utils.fusion.

Tolerances: folding is two multiplications and an addition per element, in float64 where
the backend has it, rounded once to the weight's dtype: 1e-14 relative in float64, one
float32 ulp (6e-8) in float32, so 2e-7. On JAX without float64 (not the test backend) the
arithmetic is float32: a few ulps.
"""

from __future__ import annotations

import numpy as np
import pytest

import anybn

torch = pytest.importorskip("torch")
from torch.nn.utils.fusion import fuse_conv_bn_weights, fuse_linear_bn_weights  # noqa: E402

RTOL = {"float64": 1e-13, "float32": 2e-7}


def assert_close(got, expected, rtol):
    expected = np.asarray(expected, dtype=np.float64)
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def _bn_stats(c, seed=0):
    rng = np.random.default_rng(seed)
    return {"running_mean": rng.normal(0, 2, c), "running_var": rng.uniform(0.1, 3.0, c),
            "weight": rng.uniform(0.5, 1.5, c), "bias": rng.normal(0, 1, c), "eps": 1e-3}


def _torch_fused(kind, w, b, st, transpose=False):
    t = lambda a: None if a is None else torch.tensor(a)  # noqa: E731
    args = (t(w), t(b), t(st["running_mean"]), t(st["running_var"]), st["eps"], t(st["weight"]), t(st["bias"]))
    if kind == "linear":
        fw, fb = fuse_linear_bn_weights(*args)
    else:
        fw, fb = fuse_conv_bn_weights(*args, transpose=transpose)
    return fw.detach().numpy(), fb.detach().numpy()


CASES = [("linear", (6, 4), False), ("conv", (6, 3, 3), False), ("conv", (6, 2, 3, 3), False),
         ("conv", (6, 2, 2, 2, 2), False), ("conv", (3, 6, 3, 3), True)]


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("kind, shape, transpose", CASES)
def test_matches_torch_fusion(backend, kind, shape, transpose, with_bias, dtype):
    rng = np.random.default_rng(1)
    w = rng.normal(size=shape).astype(dtype)
    out = shape[1] if transpose else shape[0]
    b = rng.normal(size=out).astype(dtype) if with_bias else None
    st = _bn_stats(out)
    st32 = {k: (v.astype(dtype) if isinstance(v, np.ndarray) else v) for k, v in st.items()}
    # the reference in float64 from the same (rounded) inputs
    rw, rb = _torch_fused(kind, w.astype(np.float64), None if b is None else b.astype(np.float64),
                          {k: (v.astype(np.float64) if isinstance(v, np.ndarray) else v) for k, v in st32.items()},
                          transpose)
    a = lambda v: None if v is None else backend.asarray(v, dtype)  # noqa: E731
    bn = {k: (a(v) if isinstance(v, np.ndarray) else v) for k, v in st32.items()}
    if kind == "linear":
        fw, fb = anybn.fold_into_linear(a(w), a(b), bn)
    else:
        fw, fb = anybn.fold_into_conv(a(w), a(b), bn, transpose=transpose)
    assert fw.dtype == backend.dtype(dtype) and fb.dtype == backend.dtype(dtype)
    assert tuple(fw.shape) == shape and tuple(fb.shape) == (out,)
    assert_close(backend.to_numpy(fw), rw, RTOL[dtype])
    assert_close(backend.to_numpy(fb), rb, RTOL[dtype])


def test_from_eval_layer_any_library(backend):
    layer = anybn.BatchNorm(4, xp=backend.module, device=backend.device, dtype="float64", eps=1e-3)
    st = _bn_stats(4, seed=2)
    layer.load_state_dict({**{k: st[k] for k in ("running_mean", "running_var", "weight", "bias")},
                           "num_batches_tracked": 3})
    layer.eval()
    w = np.random.default_rng(3).normal(size=(4, 5))
    fw, fb = anybn.fold_into_linear(backend.asarray(w), None, layer)
    rw, rb = _torch_fused("linear", w, None, st)
    assert_close(backend.to_numpy(fw), rw, 1e-13)
    assert_close(backend.to_numpy(fb), rb, 1e-13)


@pytest.mark.parametrize("groups", [2, 3])
def test_transposed_conv_with_groups_matches_the_layers(groups):
    rng = np.random.default_rng(4)
    conv = torch.nn.ConvTranspose2d(6, 3 * groups, 3, groups=groups).double()
    bn = torch.nn.BatchNorm2d(3 * groups).double().eval()
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 2.0)
    bn.weight.data.uniform_(0.5, 1.5)
    x = torch.tensor(rng.normal(size=(2, 6, 5, 5)))
    state = {k: v.numpy() for k, v in bn.state_dict().items() if k != "num_batches_tracked"}
    fw, fb = anybn.fold_into_conv(conv.weight.detach().numpy(), conv.bias.detach().numpy(), state,
                                  transpose=True, groups=groups)
    expected = bn(conv(x)).detach().numpy()
    got = torch.nn.functional.conv_transpose2d(x, torch.tensor(fw), torch.tensor(fb), groups=groups).numpy()
    assert_close(got, expected, 1e-12)


def test_folded_float32_layer_matches_the_pair():
    """A folded float32 conv gives the conv -> BN pair's float32 outputs to 1e-6 relative."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(8, 16, 3, padding=1)
    bn = torch.nn.BatchNorm2d(16)
    with torch.no_grad():
        bn.running_mean.normal_(0, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    bn.eval()
    layer = anybn.BatchNorm(16).eval()
    layer.load_state_dict({k: v.numpy() for k, v in bn.state_dict().items()})
    fw, fb = anybn.fold_into_conv(conv.weight.detach().numpy(), conv.bias.detach().numpy(), layer)
    x = torch.randn(4, 8, 12, 12)
    with torch.no_grad():
        pair = bn(conv(x)).numpy()
        folded = torch.nn.functional.conv2d(x, torch.tensor(fw), torch.tensor(fb), padding=1).numpy()
    err = np.abs(folded - pair).max() / np.abs(pair).max()
    assert err <= 1e-6, err


def test_inputs_not_modified():
    w, b = np.ones((3, 2)), np.ones(3)
    st = _bn_stats(3)
    anybn.fold_into_linear(w, b, st)
    np.testing.assert_array_equal(w, np.ones((3, 2)))
    np.testing.assert_array_equal(b, np.ones(3))


def test_errors():
    st = _bn_stats(4)
    with pytest.raises(ValueError, match=r"bn has num_features = 4, expected .* weight.shape\[0\] = 5"):
        anybn.fold_into_linear(np.ones((5, 3)), None, st)
    with pytest.raises(ValueError, match=r"bn has num_features = 4, expected .*groups \* weight.shape\[1\]"):
        anybn.fold_into_conv(np.ones((2, 3, 3, 3)), None, st, transpose=True)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        anybn.fold_into_linear(np.ones((4, 3, 3)), None, st)
    with pytest.raises(ValueError, match="weight must have 3 to 5 dimensions"):
        anybn.fold_into_conv(np.ones((4, 3)), None, st)
    with pytest.raises(ValueError, match=r"bias has shape \(3,\), expected \(4,\)"):
        anybn.fold_into_linear(np.ones((4, 3)), np.ones(3), st)
    with pytest.raises(ValueError, match="training mode"):
        anybn.fold_into_linear(np.ones((4, 3)), None, anybn.BatchNorm(4))
    with pytest.raises(ValueError, match="without"):
        anybn.fold_into_linear(np.ones((4, 3)), None, {"running_mean": np.zeros(4)})
    with pytest.raises(TypeError, match="bn must be"):
        anybn.fold_into_linear(np.ones((4, 3)), None, (np.zeros(4), np.ones(4)))
    with pytest.raises(TypeError, match="real floating"):
        anybn.fold_into_linear(np.ones((4, 3), dtype=np.int64), None, st)
    with pytest.raises(ValueError, match="groups must be a positive int"):
        anybn.fold_into_conv(np.ones((3, 4, 3, 3)), None, st, transpose=True, groups=2)
    # a frozen layer in training mode folds
    anybn.fold_into_linear(np.ones((4, 3)), None, anybn.BatchNorm(4).freeze())
