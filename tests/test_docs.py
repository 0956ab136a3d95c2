"""The documentation: the Sphinx site builds with warnings as errors, and its examples run.

The build is the command CI and ``docs/conf.py`` document, nitpicky, into a temporary
directory. The examples are the ```python blocks of the pages; every ``print(...)`` line
that ends in a comment must print what the comment says (up to a ``:`` that starts an
explanation), so the outputs shown on the pages are checked, not only the code.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from reference import reference_backward, reference_batch_norm

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"

PUBLIC = (
    "batch_norm_train",
    "batch_norm_backward",
    "batch_norm_eval",
    "batch_norm_fixed",
    "update_running_stats",
    "BatchNormSaved",
    "BatchNorm",
    "PopulationStats",
    "batch_renorm_train",
    "renorm_limits",
    "BatchRenorm",
    "RecurrentBatchNorm",
    "fold_into_linear",
    "fold_into_conv",
)
PAGES = ("getting-started", "activation", "math", "backends", "embedding", "migrating", "demo", "benchmarks", "numerics", "architecture", "renorm", "ghost",
         "recurrent", "frozen", "folding", "api")
# The build is a few seconds here; this catches a configuration that makes it crawl.
BUILD_SECONDS_MAX = 120


# -- the site ----------------------------------------------------------------------------


def _tree(folder: Path) -> dict[str, int]:
    return {
        str(p.relative_to(folder)): p.stat().st_mtime_ns
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The HTML site, built once for this module: (output folder, seconds taken)."""
    pytest.importorskip("sphinx", reason="sphinx is not installed: pip install '.[docs]'")
    out = tmp_path_factory.mktemp("html")
    before = _tree(DOCS)
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-n", "-b", "html", "-q",
         "-d", str(out / ".doctrees"), str(DOCS), str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    seconds = time.perf_counter() - start
    assert proc.returncode == 0, (
        f"sphinx -W -n failed (rc {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    # the build writes nothing into the source tree (docs/_build/ is for local builds only)
    assert _tree(DOCS) == before, "the docs build wrote into docs/"
    return out, seconds


def test_site_builds_with_warnings_as_errors(site):
    out, seconds = site
    assert (out / "index.html").is_file()
    assert seconds < BUILD_SECONDS_MAX, f"the docs build took {seconds:.0f} s"


def test_every_page_is_in_the_toctree(site):
    out, _ = site
    index = (out / "index.html").read_text(encoding="utf-8")
    for page in PAGES:
        assert (out / f"{page}.html").is_file(), f"{page}.html was not built"
        assert f'href="{page}.html"' in index, f"{page} is not linked from the index's toctree"


def test_api_page_documents_the_public_names(site):
    out, _ = site
    api = (out / "api.html").read_text(encoding="utf-8")
    import anybn

    assert set(PUBLIC) == set(anybn.__all__)
    for name in PUBLIC:
        assert f'id="anybn.{name}"' in api, f"anybn.{name} has no entry on the API page"
    for method in ("forward", "backward", "estimate_population", "state_dict", "load_state_dict",
                   "from_keras", "load_keras_weights"):
        assert f'id="anybn.BatchNorm.{method}"' in api, f"BatchNorm.{method} is not documented"
    for member in ("update", "result"):
        assert f'id="anybn.PopulationStats.{member}"' in api
    # numpydoc rendered the sections, autodoc the signature
    assert "Parameters" in api and "Returns" in api and "Attributes" in api
    assert "batch_norm_train" in (out / "index.html").read_text(encoding="utf-8")


def test_math_is_rendered_as_math(site):
    out, _ = site
    math = (out / "math.html").read_text(encoding="utf-8")
    assert 'class="math' in math and "mathjax" in math.lower()
    assert r"\sum_{j} g_j \hat{x}_j" in math  # the simplified backward formula
    assert "$$" not in math  # every $$ block was parsed (dollarmath)


def test_math_renders_offline(site):
    """MathJax comes from the built site itself: every script of the math page is local."""
    out, _ = site
    math = (out / "math.html").read_text(encoding="utf-8")
    scripts = re.findall(r"<script\b[^>]*\bsrc=\"([^\"]+)\"", math)
    remote = [src for src in scripts if re.match(r"(?:[a-z]+:)?//", src)]
    assert not remote, f"math.html loads scripts from the network: {remote}"
    assert "_static/mathjax/tex-chtml.js" in scripts, f"math.html does not load the local MathJax: {scripts}"
    assert not re.search(r"cdn\.jsdelivr|cdnjs|unpkg\.com|mathjax\.org", math), "math.html names a MathJax CDN"
    mathjax = out / "_static" / "mathjax"
    assert (mathjax / "tex-chtml.js").stat().st_size > 500_000, "the MathJax bundle is missing or truncated"
    # CommonHTML output draws with MathJax's own web fonts, fetched relative to the script
    assert (mathjax / "output/chtml/fonts/woff-v2/MathJax_Main-Regular.woff").is_file()
    assert (mathjax / "output/chtml/fonts/woff-v2/MathJax_Math-Italic.woff").is_file()


def test_import_loads_no_other_array_library():
    """docs/embedding.md: ``import anybn`` imports no array library but NumPy, nor numba."""
    others = ("torch", "jax", "cupy", "dask", "array_api_strict", "numba")
    code = f"import sys, anybn; print(sorted(m for m in {others!r} if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]", f"import anybn imported {proc.stdout.strip()}"


def test_build_output_is_ignored_by_git():
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert "docs/_build/" in lines


# -- the examples ------------------------------------------------------------------------

_PRINT_WITH_COMMENT = re.compile(r"^\s*print\(.*\)\s+#\s?(?P<expected>.*)$")
_IMPORT = re.compile(r"^(?:import|from)\s+([A-Za-z_][\w]*)", re.M)


def _blocks(page: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", (DOCS / page).read_text(encoding="utf-8"), re.S)


def _expected_outputs(code: str) -> list[str | None]:
    """One entry per print line: the comment's text before any ':' explanation, or None."""
    expected = []
    for line in code.splitlines():
        if line.lstrip().startswith("print("):
            m = _PRINT_WITH_COMMENT.match(line)
            expected.append(m.group("expected").split(":")[0].strip() if m else None)
    return expected


def _missing_modules(code: str) -> list[str]:
    return sorted({m for m in _IMPORT.findall(code) if importlib.util.find_spec(m) is None})


def _run(code: str, namespace: dict, where: str) -> None:
    """Execute ``code`` in ``namespace`` and check its prints against their comments."""
    printed: list[str] = []
    namespace["print"] = lambda *args, sep=" ", **_: printed.append(sep.join(str(a) for a in args))
    exec(compile(code, where, "exec"), namespace)
    expected = _expected_outputs(code)
    assert len(printed) == len(expected), f"{where}: {len(printed)} prints ran, the code has {len(expected)}"
    for got, want in zip(printed, expected):
        if want is not None:
            assert got == want, f"{where}: printed {got!r}, the page says {want!r}"


def _run_page(page: str, monkeypatch) -> dict:
    """Run a page's blocks in order in one namespace, as a reader would paste them."""
    blocks = _blocks(page)
    assert blocks, f"{page} has no python examples"
    missing = _missing_modules("\n".join(blocks))
    if missing:
        pytest.skip(f"{page} imports {', '.join(missing)}, which is not installed")
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)  # restored afterwards
    namespace: dict = {"__name__": f"docs_{page.replace('-', '_').removesuffix('.md')}"}
    for i, code in enumerate(blocks):
        _run(code, namespace, f"docs/{page}, python block {i + 1}")
    return namespace


def test_index_example_runs(monkeypatch):
    ns = _run_page("index.md", monkeypatch)
    np.testing.assert_allclose(ns["y"], reference_batch_norm(ns["x"], 1), rtol=2e-4, atol=2e-4)


def test_getting_started_examples_run(monkeypatch):
    ns = _run_page("getting-started.md", monkeypatch)
    x, w = ns["x"], np.linspace(0.5, 1.5, 16)
    np.testing.assert_allclose(ns["y"], reference_batch_norm(x, 1, w), rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(ns["y_last"], np.moveaxis(reference_batch_norm(x, 1), 1, -1), rtol=2e-4, atol=2e-4)
    dx, dw, db = reference_backward(x, ns["dy"], 1, w)
    np.testing.assert_allclose(ns["dx"], dx, rtol=1e-3, atol=1e-3)
    np.testing.assert_allclose(ns["dweight"], dw, rtol=1e-3, atol=1e-2)
    np.testing.assert_allclose(ns["dbias"], db, rtol=1e-3, atol=1e-2)
    # the paper's estimator over four equal batches: mean of means, m/(m-1) * mean of variances
    parts = [b.astype(np.float64) for b in ns["batches"]]
    m = parts[0].size // 16
    np.testing.assert_allclose(ns["mean"], np.mean([p.mean(axis=(0, 2, 3)) for p in parts], axis=0), rtol=1e-5)
    np.testing.assert_allclose(ns["var"], m / (m - 1) * np.mean([p.var(axis=(0, 2, 3)) for p in parts], axis=0),
                               rtol=1e-5)


def test_migrating_examples_run(monkeypatch):
    ns = _run_page("migrating.md", monkeypatch)
    assert ns["bn"].eps == pytest.approx(1e-3) and ns["bn"].momentum == pytest.approx(0.01)


def _backends_blocks() -> list[pytest.param]:
    params = []
    for i, code in enumerate(_blocks("backends.md")):
        libraries = sorted(set(_IMPORT.findall(code)) - {"os", "numpy", "anybn"}) or ["numpy"]
        params.append(pytest.param(i, code, id="-".join(libraries)))
    return params


@pytest.mark.parametrize("index, code", _backends_blocks())
def test_backends_examples_run(index, code, monkeypatch):
    """Each block of the backends page stands alone, so each skips on its own."""
    missing = _missing_modules(code)
    if missing:
        pytest.skip(f"docs/backends.md block {index + 1} imports {', '.join(missing)}, which is not installed")
    monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
    _run(code, {"__name__": "docs_backends"}, f"docs/backends.md, python block {index + 1}")


def test_embedding_examples_run(monkeypatch):
    ns = _run_page("embedding.md", monkeypatch)
    assert ns["restored"].num_batches_tracked == 1


def _embedding_functions(monkeypatch):
    ns = _run_page("embedding.md", monkeypatch)
    return ns["hidden_forward"], ns["hidden_backward"]


def _hidden_problem(seed=3, n=12, d=5, hidden=4):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(n, d)),
        "W": rng.normal(size=(d, hidden)),
        "gamma": rng.uniform(0.5, 1.5, size=hidden),
        "beta": rng.normal(size=hidden),
        "da": rng.normal(size=(n, hidden)),
    }


def test_embedding_example_gradients_match_torch_autograd(monkeypatch):
    """The page's Linear + BN + sigmoid, run on float64 torch tensors, against autograd."""
    torch = pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
    forward, backward = _embedding_functions(monkeypatch)
    p = {k: torch.from_numpy(v) for k, v in _hidden_problem().items()}
    params = {k: p[k] for k in ("W", "gamma", "beta")}
    a, cache = forward(params, p["x"])
    dx, grads = backward(params, p["da"], cache)

    leaves = {k: v.clone().requires_grad_(True) for k, v in p.items() if k != "da"}
    h = leaves["x"] @ leaves["W"]
    z = torch.nn.functional.batch_norm(h, None, None, leaves["gamma"], leaves["beta"], training=True, eps=1e-5)
    expected_a = torch.sigmoid(z)
    (expected_a * p["da"]).sum().backward()

    torch.testing.assert_close(a, expected_a.detach(), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dx, leaves["x"].grad, rtol=1e-9, atol=1e-12)
    for k in ("W", "gamma", "beta"):
        torch.testing.assert_close(grads[k], leaves[k].grad, rtol=1e-9, atol=1e-12, msg=f"d{k}")


@pytest.mark.parametrize("library", ["array_api_strict", "jax.numpy", "dask.array"])
def test_embedding_example_runs_unchanged_on_other_libraries(library, monkeypatch):
    """The page says the two functions run unchanged on other array libraries."""
    root = library.split(".")[0]
    if importlib.util.find_spec(root) is None:
        pytest.skip(f"{root} is not installed")
    forward, backward = _embedding_functions(monkeypatch)
    problem = _hidden_problem()
    params64 = {k: problem[k] for k in ("W", "gamma", "beta")}
    a0, cache0 = forward(params64, problem["x"])
    dx0, grads0 = backward(params64, problem["da"], cache0)

    if root == "jax":
        import jax

        jax.config.update("jax_enable_x64", True)
    xp = importlib.import_module(library)
    arrays = {k: xp.asarray(v) for k, v in problem.items()}
    params = {k: arrays[k] for k in ("W", "gamma", "beta")}
    a, cache = forward(params, arrays["x"])
    dx, grads = backward(params, arrays["da"], cache)
    np.testing.assert_allclose(np.asarray(a), a0, rtol=1e-10)
    np.testing.assert_allclose(np.asarray(dx), dx0, rtol=1e-9, atol=1e-12)
    for k in grads:
        np.testing.assert_allclose(np.asarray(grads[k]), grads0[k], rtol=1e-9, atol=1e-12)
