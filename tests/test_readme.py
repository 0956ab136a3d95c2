"""The README's examples run as written and do what their comments say.

Every ```python block runs on its own, in a fresh namespace, as a reader pasting it would
run it; a block whose libraries are not installed (CuPy without a GPU) is skipped with the
reason. The NumPy and functional examples are then checked against float64 references.
"""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np
import pytest
from reference import reference_backward, reference_batch_norm

README = Path(__file__).resolve().parent.parent / "README.md"
_IMPORT = re.compile(r"^(?:import|from)\s+([A-Za-z_]\w*)", re.M)


def _blocks(language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", README.read_text(encoding="utf-8"), re.S)


def _skip_reason(modules: set[str]) -> str | None:
    """Why a block cannot run here: a library that is not installed, or CuPy without a GPU."""
    missing = sorted(m for m in modules if importlib.util.find_spec(m) is None)
    if missing:
        return f"imports {', '.join(missing)}, which is not installed"
    if "cupy" in modules:
        import cupy

        try:
            if cupy.cuda.runtime.getDeviceCount() == 0:
                return "CuPy sees no GPU"
        except cupy.cuda.runtime.CUDARuntimeError as exc:
            return f"CuPy sees no GPU ({exc})"
    return None


def _run(code: str, where: str) -> dict:
    namespace: dict = {"__name__": "readme"}
    exec(compile(code, where, "exec"), namespace)
    return namespace


def _block_params() -> list[pytest.param]:
    params = []
    for i, code in enumerate(_blocks("python")):
        libraries = sorted(set(_IMPORT.findall(code)) - {"numpy", "anybn"}) or ["numpy"]
        params.append(pytest.param(i, code, id=f"block{i + 1}-{'-'.join(libraries)}"))
    return params


def test_readme_has_python_examples():
    assert len(_blocks("python")) >= 3, "the README's NumPy, CuPy and functional examples are gone"


@pytest.mark.parametrize("index, code", _block_params())
def test_every_python_block_runs_on_its_own(index, code, monkeypatch):
    reason = _skip_reason(set(_IMPORT.findall(code)))
    if reason:
        pytest.skip(f"README python block {index + 1} {reason}")
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    assert "import anybn" in code, f"README python block {index + 1} does not import anybn: it cannot run alone"
    _run(code, f"README.md, python block {index + 1}")


def _example(marker: str) -> dict:
    code = next(b for b in _blocks("python") if marker in b)
    return _run(code, str(README))


def test_numpy_example_runs_and_normalizes():
    namespace = _example("bn = anybn.BatchNorm(16)")
    x, y, bn = namespace["x"], namespace["y"], namespace["bn"]
    np.testing.assert_allclose(y, reference_batch_norm(x, 1), rtol=2e-4, atol=2e-4)
    assert namespace["dx"].shape == x.shape and bn.grad_weight.shape == (16,)
    # estimate_population with the paper's estimator over the four equal splits
    parts = np.split(x.astype(np.float64), 4)
    m = parts[0].size // 16
    batch_var = np.mean([p.var(axis=(0, 2, 3)) for p in parts], axis=0)
    np.testing.assert_allclose(bn.running_var, m / (m - 1) * batch_var, rtol=1e-5)
    assert not bn.training


def test_functional_example_runs_and_matches_references():
    ns = _example("anybn.batch_norm_train(")
    x, w, b = (ns[k].astype(np.float64) for k in ("x", "weight", "bias"))
    np.testing.assert_allclose(ns["y"], reference_batch_norm(x, 1, w, b), rtol=2e-4, atol=2e-4)
    dx, dw, db = reference_backward(x, ns["dy"].astype(np.float64), 1, w)
    np.testing.assert_allclose(ns["dx"], dx, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ns["dweight"], dw, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(ns["dbias"], db, rtol=1e-3, atol=1e-2)
    # the paper's estimator over the four equal batches: mean of means, m/(m-1) * mean of variances
    parts = np.split(x, 4)
    m = parts[0].size // 16
    mean = np.mean([p.mean(axis=(0, 2, 3)) for p in parts], axis=0)
    var = m / (m - 1) * np.mean([p.var(axis=(0, 2, 3)) for p in parts], axis=0)
    np.testing.assert_allclose(ns["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ns["var"], var, rtol=1e-5)
    np.testing.assert_allclose(ns["y_eval"], reference_batch_norm(x, 1, w, b, mean=mean, var=var),
                               rtol=2e-4, atol=2e-4)


def test_set_up_commands_are_the_ones_ci_and_the_demo_use():
    bash = "\n".join(_blocks("bash"))
    assert 'pip install ".[demo]" && python -m anybn demo' in bash
    assert 'pip install ".[test]" torch==2.13.0 jax && python -m pytest' in bash
    ci = (README.parent / ".ci" / "run").read_text(encoding="utf-8")
    assert 'pip install ".[test]" torch==2.13.0 jax && python -m pytest' in ci
