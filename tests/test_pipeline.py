"""The stage pipeline: module layering, the kernel protocol, and the public building blocks.

References come from PyTorch (autograd of ``F.batch_norm`` with fixed statistics, the
running statistics of ``nn.BatchNorm1d``) and from the float64 NumPy code of
``tests/reference.py``, never from anybn.
"""

from __future__ import annotations

import ast
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import anybn
from anybn import _fast
from anybn._kernels import GENERIC, Kernels
from conftest import numpy_fast_path_installed
from reference import bcast, make_data, reference_batch_norm, reference_moments

PACKAGE = Path(anybn.__file__).parent
MODULES = sorted(
    m.name for m in pkgutil.walk_packages([str(PACKAGE)], prefix="anybn.") if not m.name.endswith("__main__")
)

# What each module of the core may import from anybn (the architecture page's table).
# Nothing below ``functional`` imports ``functional``.
LAYERS = {
    "anybn._namespace": set(),
    "anybn._env": set(),
    "anybn._checks": {"anybn._namespace"},
    "anybn._layout": {"anybn._checks", "anybn._namespace"},
    "anybn._saved": {"anybn._layout", "anybn._namespace"},
    "anybn._moments": {"anybn._layout", "anybn._namespace"},
    "anybn._kernels": {"anybn._layout", "anybn._moments", "anybn._namespace"},
    "anybn._steps": {"anybn._moments", "anybn._namespace", "anybn._saved"},
    "anybn._fast": {"anybn._env", "anybn._kernels", "anybn._fast.cpu", "anybn._fast.cuda"},  # the registry builds its paths
    "anybn._fast.cpu": {"anybn._env", "anybn._kernels", "anybn._layout", "anybn._moments", "anybn._saved",
                        "anybn._fast._cpu_kernels"},
    "anybn._fast._cpu_kernels": {"anybn._fast._stream"},
    "anybn._fast._stream": set(),
}


def _anybn_imports(module: str) -> set[str]:
    """The anybn modules that ``module`` imports (absolute names), from its source."""
    path = PACKAGE.joinpath(*module.split(".")[1:])
    path = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                target = f"{base}.{node.module}" if node.module else base
                names = [f"{target}.{a.name}" for a in node.names]
            else:
                target, names = node.module or "", []
            # "from . import x" imports x, not the package's own module body
            for name in ([target] if node.module else []) + names:
                if name in MODULES or name == "anybn":
                    found.add(name)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("anybn")}
    # "from . import _fast" names the subpackage; "from ._x import y" the module, not y
    return {n for n in found if n in MODULES and n != module}


@pytest.mark.parametrize("module", sorted(LAYERS))
def test_core_modules_import_only_what_the_layering_allows(module):
    assert _anybn_imports(module) <= LAYERS[module], _anybn_imports(module) - LAYERS[module]


def test_nothing_below_functional_imports_functional():
    for module in MODULES:
        if module.startswith("anybn._"):
            assert "anybn.functional" not in _anybn_imports(module), module


@pytest.mark.parametrize("module", MODULES)
def test_every_module_imports_alone_in_a_fresh_interpreter(module):
    env = {k: v for k, v in os.environ.items() if k != "NUMBA_ENABLE_CUDASIM"}
    if module.startswith("anybn._fast._cuda") or module == "anybn._fast.cuda":
        pytest.importorskip("numba.cuda")
    done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-2000:]


# -- the kernel protocol -------------------------------------------------------------------


def _paths() -> list[Kernels]:
    return [GENERIC, *_fast.registered()]


@pytest.mark.parametrize("path", _paths(), ids=lambda p: p.name)
def test_every_path_implements_the_kernel_protocol(path):
    for member in ("name", "centering_is_free", "serves", "coefficient_dtype", "moments", "apply",
                   "grad_sums", "grad_apply"):
        assert hasattr(path, member), member


def test_cpu_path_holds_no_coefficient_arithmetic():
    """cpu.py launches kernels: no sqrt, no mean or variance formula (the coefficients are
    anybn._steps's, shared by every path; the small-input whole steps are compiled kernels)."""
    source = (PACKAGE / "_fast" / "cpu.py").read_text(encoding="utf-8")
    for token in ("sqrt", "invstd *", "/ count", "var +"):
        assert token not in source, token


@pytest.mark.skipif(not numpy_fast_path_installed(), reason="no NumPy fast path (pip install 'anybn[fast]')")
@pytest.mark.parametrize("threads", ["1", "2"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("shape, axis", [
    ((64, 7), 1), ((4, 5, 6, 7), 1), ((4, 6, 7, 5), -1),  # small: one call on the calling thread
    ((2048, 130), 1), ((16, 40, 30, 30), 1), ((16, 30, 30, 40), -1),  # large: split across threads
    ((3, 400, 23, 29), 1),  # planes in several groups of features (2 MiB of x in float64)
])
@pytest.mark.parametrize("activation", [None, "relu", "sigmoid"])
def test_whole_steps_equal_the_stages(monkeypatch, shape, axis, dtype, threads, activation):
    """The CPU path's whole-step kernels (BN, fused with an activation or not) against its own
    stages and float64.

    Both compute the same float64 sums and round the same coefficients to x's dtype: they
    may differ by the rounding of the pivot split (mean rounded vs one sample), a few ulps
    of the output's magnitude. Bound: 8 ulp of max(|y|, 1) in x's dtype. (No z of this
    data lies within such a rounding of ReLU's kink, where the two could take different
    sides: that would fail loudly, by |dy|, not within the bound.)
    """
    from anybn._fast.cpu import CpuPath

    monkeypatch.setenv("ANYBN_NUM_THREADS", threads)
    rng = np.random.default_rng(1)
    x = (5.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[axis]
    w, b = rng.uniform(0.5, 1.5, c).astype(dtype), rng.standard_normal(c).astype(dtype)
    mean, var = rng.standard_normal(c).astype(dtype), rng.uniform(0.5, 2, c).astype(dtype)

    def run():
        y, saved = anybn.batch_norm_train(x, w, b, axis=axis, activation=activation)
        dx, dw, db = anybn.batch_norm_backward(dy, saved)
        return y, dx, dw, db, anybn.batch_norm_eval(x, mean, var, w, b, axis=axis, activation=activation)

    whole = run()
    for name in ("train_whole", "eval_whole", "backward_whole"):
        monkeypatch.setattr(CpuPath, name, lambda self, *a, **k: None)
    staged = run()
    ulp = np.finfo(dtype).eps
    for got, want, what in zip(whole, staged, ("y", "dx", "dweight", "dbias", "y_eval")):
        scale = max(float(np.max(np.abs(want))), 1.0)
        m = x.size // c if what in ("dweight", "dbias") else 1
        assert np.max(np.abs(got - want)) <= 8 * ulp * scale * m, what
    # both against a reference in long double (64-bit significand on x86): the fast path's
    # statistics carry at most stat_u relative error (float32: blocks of 16 rows summed in
    # float32 and flushed to float64; float64: recursive float64 sums of at most m terms
    # after blocks of 16), which reaches y through the mean and the scale
    xl = np.moveaxis(x.astype(np.longdouble), axis, -1)
    mean_l = xl.mean(axis=tuple(range(xl.ndim - 1)))
    invstd_l = 1 / np.sqrt(((xl - mean_l) ** 2).mean(axis=tuple(range(xl.ndim - 1))) + np.longdouble(1e-5))
    y_l = (xl - mean_l) * invstd_l * w.astype(np.longdouble) + b.astype(np.longdouble)
    if activation == "relu":  # both 1-Lipschitz: the bound below still holds
        y_l = np.maximum(y_l, 0)
    elif activation == "sigmoid":
        y_l = 1 / (1 + np.exp(-y_l))
    u, m = ulp / 2, x.size // c
    stat_u = 16 * u + m * 2.0**-53 if dtype == "float32" else (16 + m) * u
    r = float(np.max(np.abs((xl - mean_l) * invstd_l)))
    bound = 16 * ulp * float(np.max(np.abs(y_l))) + 8 * stat_u * float(np.max(np.abs(w))) * (1 + r)
    assert float(np.max(np.abs(np.moveaxis(whole[0], axis, -1) - y_l))) <= bound


# -- batch_norm_fixed ---------------------------------------------------------------------


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("shape, axis", [((6, 3), 1), ((2, 3, 4, 5), 1), ((2, 4, 5, 3), -1)])
def test_batch_norm_fixed_matches_torch_autograd_with_constant_statistics(backend, shape, axis, affine):
    torch = pytest.importorskip("torch")
    c = shape[axis]
    x64 = make_data(shape, mean=1.0, std=2.0, seed=3)
    dy64 = make_data(shape, seed=4)
    mean64, var64 = make_data((c,), seed=5), 0.5 + make_data((c,), seed=6) ** 2
    w64, b64 = make_data((c,), mean=1.0, std=0.3, seed=7), make_data((c,), seed=8)
    asarray = backend.asarray
    w, b = (asarray(w64), asarray(b64)) if affine else (None, None)
    y, saved = anybn.batch_norm_fixed(asarray(x64), asarray(mean64), asarray(var64), w, b, axis=axis)
    dx, dw, db = anybn.batch_norm_backward(asarray(dy64), saved)

    # torch wants (N, C, ...): move the feature axis to 1
    perm = list(range(len(shape)))
    perm.insert(1, perm.pop(axis % len(shape)))
    xt = torch.tensor(np.transpose(x64, perm), requires_grad=True)
    wt = torch.tensor(w64, requires_grad=True) if affine else None
    bt = torch.tensor(b64, requires_grad=True) if affine else None
    yt = torch.nn.functional.batch_norm(xt, torch.tensor(mean64), torch.tensor(var64), wt, bt,
                                        training=False, eps=1e-5)
    yt.backward(torch.tensor(np.transpose(dy64, perm)))
    inverse = np.argsort(perm)
    # float64 on every backend: a few roundings of values of order 1
    rtol = 1e-12
    np.testing.assert_allclose(backend.to_numpy(y), np.transpose(yt.detach().numpy(), inverse), rtol=rtol, atol=rtol)
    np.testing.assert_allclose(backend.to_numpy(dx), np.transpose(xt.grad.numpy(), inverse), rtol=rtol, atol=rtol)
    m = x64.size // c
    if affine:
        np.testing.assert_allclose(backend.to_numpy(dw), wt.grad.numpy(), rtol=rtol * m, atol=rtol * m)
        np.testing.assert_allclose(backend.to_numpy(db), bt.grad.numpy(), rtol=rtol * m, atol=rtol * m)
    else:
        assert dw is None and db is None
    assert saved.batch_stats is False and saved.layout.shape == tuple(shape)


@pytest.mark.parametrize("missing", ["mean", "var"])
def test_batch_norm_fixed_and_eval_require_their_statistics(backend, missing):
    """None for mean or var once reached the CPU kernels as garbage memory."""
    x = backend.asarray(make_data((4, 3)))
    stats = {"mean": backend.asarray(np.zeros(3)), "var": backend.asarray(np.ones(3))}
    stats[missing] = None
    for fn in (anybn.batch_norm_eval, anybn.batch_norm_fixed):
        with pytest.raises(TypeError, match=rf"{fn.__name__}: {missing} is required: expected an array of shape \(C,\), got None"):
            fn(x, stats["mean"], stats["var"])


# -- update_running_stats -----------------------------------------------------------------


@pytest.mark.parametrize("momentum", [0.1, 0.37, None])
def test_update_running_stats_follows_torch(backend, momentum):
    torch = pytest.importorskip("torch")
    bn = torch.nn.BatchNorm1d(3, momentum=momentum, dtype=torch.float64)
    rm, rv = backend.asarray(np.zeros(3)), backend.asarray(np.ones(3))
    for step in range(1, 4):
        x64 = make_data((5 + step, 3), mean=2.0 * step, std=step, seed=step)
        bn(torch.tensor(x64))
        _, saved = anybn.batch_norm_train(backend.asarray(x64))
        rm, rv = anybn.update_running_stats(rm, rv, saved, momentum=momentum, num_batches_tracked=step)
        np.testing.assert_allclose(backend.to_numpy(rm), bn.running_mean.numpy(), rtol=1e-13, atol=1e-13)
        np.testing.assert_allclose(backend.to_numpy(rv), bn.running_var.numpy(), rtol=1e-13, atol=1e-13)


def test_update_running_stats_rejects_bad_arguments():
    x = make_data((4, 3))
    _, saved = anybn.batch_norm_train(x)
    _, fixed = anybn.batch_norm_fixed(x, np.zeros(3), np.ones(3))
    rm, rv = np.zeros(3), np.ones(3)
    with pytest.raises(TypeError, match="saved must be the BatchNormSaved of a training forward pass"):
        anybn.update_running_stats(rm, rv, fixed)
    with pytest.raises(ValueError, match=r"momentum must be in \[0, 1\] or None, got 1.5"):
        anybn.update_running_stats(rm, rv, saved, momentum=1.5)
    with pytest.raises(ValueError, match=r"running_var has shape \(4,\), expected \(3,\)"):
        anybn.update_running_stats(rm, np.ones(4), saved)
    with pytest.raises(ValueError, match="num_batches_tracked must be an int >= 1, got 0"):
        anybn.update_running_stats(rm, rv, saved, momentum=None, num_batches_tracked=0)
    assert np.all(rm == 0) and np.all(rv == 1)


# -- population statistics from forward passes --------------------------------------------


def test_layer_population_collects_in_forward_passes_without_touching_running_stats(backend):
    batches64 = [make_data((6 + k, 3, 4), mean=3.0, std=1.0 + k, seed=10 + k) for k in range(4)]
    layer = anybn.BatchNorm(3, xp=backend.module, device=backend.device, dtype=backend.dtype("float64"))
    running = (backend.to_numpy(layer.running_mean), backend.to_numpy(layer.running_var))
    layer.population = anybn.PopulationStats(3)
    for x in batches64:
        y = layer(backend.asarray(x))
        # still normalized with the batch's own statistics
        np.testing.assert_allclose(backend.to_numpy(y), reference_batch_norm(x, 1), rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(backend.to_numpy(layer.running_mean), running[0])
    np.testing.assert_array_equal(backend.to_numpy(layer.running_var), running[1])
    assert layer.num_batches_tracked == 0
    layer.estimate_population(layer.population, method="pooled")
    everything = np.concatenate([np.moveaxis(x, 1, -1).reshape(-1, 3) for x in batches64])
    np.testing.assert_allclose(backend.to_numpy(layer.running_mean), everything.mean(0), rtol=1e-12)
    np.testing.assert_allclose(backend.to_numpy(layer.running_var), everything.var(0, ddof=1), rtol=1e-12)
    # the paper's estimate from the same statistics: sum(m_i var_i) / sum(m_i - 1)
    layer.estimate_population(layer.population, method="paper")
    ms = [x.size // 3 for x in batches64]
    within = sum(m * reference_moments(x, 1)[1] for m, x in zip(ms, batches64)) / (sum(ms) - len(ms))
    np.testing.assert_allclose(backend.to_numpy(layer.running_var), within, rtol=1e-12)


def test_estimate_population_rejects_stats_of_another_size():
    layer = anybn.BatchNorm(3)
    with pytest.raises(ValueError, match="PopulationStats has num_features = 4, expected 3"):
        layer.estimate_population(anybn.PopulationStats(4).update(np.ones((2, 4), np.float32)))
    with pytest.raises(TypeError, match="batches must be an iterable of arrays or a PopulationStats, got NoneType"):
        layer.estimate_population(None)


def test_population_update_from_saved_equals_update():
    rng = np.random.default_rng(0)
    a, b = anybn.PopulationStats(5, axis=-1), anybn.PopulationStats(5, axis=-1)
    for k in range(3):
        x = (1e3 + rng.standard_normal((7 + k, 4, 5))).astype(np.float32)
        a.update(x)
        b.update_from(anybn.batch_norm_train(x, axis=-1)[1])
    for method in ("paper", "pooled"):
        for got, want in zip(a.result(method), b.result(method)):
            # both from the same float64-merged moments of the same float32 batches; saved
            # rounds delta and var to float32 (relative 2**-24 of the std-sized terms)
            np.testing.assert_allclose(got, want, rtol=1e-6)
