"""The backend fixture: every backend-parametrized test runs once per array library."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from backends import FACTORIES, MISSING_REASON, get_backend  # noqa: E402

ALL_BACKENDS = list(FACTORIES)


@pytest.fixture(params=ALL_BACKENDS)
def backend(request):
    """A :class:`backends.Backend`; skips with the reason where the library is absent."""
    b = get_backend(request.param)
    if b is None:
        pytest.skip(MISSING_REASON[request.param])
    return b
