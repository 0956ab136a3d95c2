"""Sphinx configuration for the anybn documentation.

Build: ``python -m sphinx -W --keep-going -n -b html docs docs/_build/html``
(``tests/test_docs.py`` runs the same command into a temporary directory).
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

DOCS = Path(__file__).resolve().parent
# document the checkout next to this file, not whatever anybn happens to be installed
sys.path.insert(0, str(DOCS.parent))

import anybn  # noqa: E402

project = "anybn"
author = "The anybn developers"
copyright = "The anybn developers"
release = anybn.__version__
version = release

extensions = [
    "myst_parser",
    "numpydoc",
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
]

source_suffix = {".md": "markdown", ".rst": "restructuredtext"}
root_doc = "index"
exclude_patterns = ["_build"]
nitpicky = True

# -- MyST ------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath"]
# anchors for ## and ### headings, so pages can link to sections: [text](math.md#the-backward-pass)
myst_heading_anchors = 3

# -- MathJax, served from the built site --------------------------------------------------
# The math pages load MathJax 3 from _static/mathjax/ rather than from a CDN, so they render
# offline (a laptop on a train, a site opened from disk). The files come from the
# sphinx-mathjax-offline package (the docs extra), which ships the MathJax 3.2.2 release;
# _copy_mathjax copies only what tex-chtml needs, not the package's 24 MB.
mathjax_path = "mathjax/tex-chtml.js"  # relative: under the site's _static/
_MATHJAX_PACKAGE = "sphinx-mathjax-offline"
# the combined TeX-to-HTML component, its fonts, and what it loads on demand: TeX packages
# for macros outside the bundle (autoload), the accessibility and menu modules
_MATHJAX_FILES = ("tex-chtml.js", "output/chtml/fonts/woff-v2", "input/tex/extensions", "a11y", "ui")

# -- autodoc and numpydoc --------------------------------------------------------------
# The docstrings state shapes, dtypes, namespaces and devices in words; the annotations
# (Array = Any) would only add noise to the signatures.
autodoc_typehints = "none"
autodoc_member_order = "bysource"
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
numpydoc_xref_param_type = False

# -- HTML ------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"anybn {release}"
# _static holds the demo's figure once the demo has been run; an absent folder is no error
html_static_path = ["_static"] if (DOCS / "_static").is_dir() else []
html_show_sourcelink = False


def _mathjax_source() -> Path:
    spec = importlib.util.find_spec(_MATHJAX_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"docs/conf.py: the math pages need MathJax from the {_MATHJAX_PACKAGE} package, "
            "which is not installed: pip install '.[docs]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "static" / "mathjax"


def _copy_mathjax(app, exception) -> None:
    if exception is not None or app.builder.format != "html":
        return
    source, target = _mathjax_source(), Path(app.outdir) / "_static" / "mathjax"
    for name in _MATHJAX_FILES:
        if (source / name).is_dir():
            shutil.copytree(source / name, target / name, dirs_exist_ok=True)
        else:
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source / name, target / name)


def setup(app):
    _mathjax_source()  # fail before the build, with the command that fixes it
    app.connect("build-finished", _copy_mathjax)
