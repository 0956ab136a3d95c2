"""The backend fixture: every backend-parametrized test runs once per array library."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from backends import NAMES, get_backend, skip_reason  # noqa: E402

ALL_BACKENDS = list(NAMES)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request, monkeypatch):
    """A :class:`backends.Backend`; skips with the reason where the library is absent.

    "numpy" takes the fast path where one is installed (numba), "numpy:generic" the
    array-API path (``ANYBN_FAST_PATHS=0``), so every test covers both. The backends are
    those of :mod:`anybn.testing` (see ``backends.py``).
    """
    b = get_backend(request.param)
    if b is None:
        pytest.skip(skip_reason(request.param))
    if b.generic_only:
        monkeypatch.setenv("ANYBN_FAST_PATHS", "0")
    return b


def numpy_fast_path_installed() -> bool:
    import numpy as np

    from anybn import _fast

    x = np.ones((2, 2))
    xp = get_backend("numpy").xp
    return any(p.serves("train", xp, (x,)) for p in _fast.registered())


@pytest.fixture(params=["fast", "generic"])
def numpy_path(request, monkeypatch):
    """Run a NumPy test on the CPU fast path and on the generic path (ANYBN_FAST_PATHS=0)."""
    if request.param == "generic":
        monkeypatch.setenv("ANYBN_FAST_PATHS", "0")
    else:
        monkeypatch.delenv("ANYBN_FAST_PATHS", raising=False)
        if not numpy_fast_path_installed():
            pytest.skip("no NumPy fast path installed (pip install 'anybn[fast]')")
    return request.param
