"""The array backends the test-suite runs on: :mod:`anybn.testing`'s table, seen as the tests need it.

Each backend skips cleanly where its library or device is absent, with
:func:`anybn.testing.backend`'s reason. The one difference from :class:`anybn.testing.Backend`:
``to_numpy`` gives float64 unless told otherwise, since the tests compare with float64
references.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from anybn import testing

# the fixture's backends, in the order the tests run them
NAMES = ("numpy", "numpy:generic", "array_api_strict", "array_api_strict:device1", "dask", "torch", "jax", "cupy")


@dataclasses.dataclass(frozen=True)
class Backend(testing.Backend):
    """One array library (and device) as the tests see it: :class:`anybn.testing.Backend`."""

    def to_numpy(self, a: Any, dtype: Any = np.float64) -> np.ndarray:
        """NumPy copy of a backend array (computing it where lazy), float64 unless ``dtype``."""
        return super().to_numpy(a, dtype)


_cache: dict[str, Backend | None] = {}
_reasons: dict[str, str] = {}


def get_backend(name: str) -> Backend | None:
    """The backend called ``name`` (one of :data:`NAMES`), or None where it cannot run here."""
    if name not in _cache:
        try:
            b = testing.backend(name)
        except testing.Unavailable as exc:
            _reasons[name] = str(exc)
            _cache[name] = None
        else:
            _cache[name] = Backend(**{f.name: getattr(b, f.name) for f in dataclasses.fields(b)})
    return _cache[name]


def skip_reason(name: str) -> str:
    """Why ``name`` cannot run here (after :func:`get_backend` gave None)."""
    get_backend(name)
    return _reasons.get(name, f"{name} is available")


FACTORIES: dict[str, Callable[[], Backend | None]] = {name: (lambda n=name: get_backend(n)) for name in NAMES}
