"""Registry of backend fast paths.

A fast path replaces a whole step of the algorithm (training forward, backward, inference)
for the arrays it serves. Each entry is a small object with ``serves(xp, x) -> bool`` and
one method per step it implements. Paths for libraries that are not installed are simply
never registered. ``ANYBN_FAST_PATHS=0`` switches all of them off, read at each call so a
process can flip it without re-importing anybn.

No fast path is registered yet: the generic array-API path in ``anybn.functional`` is the
reference, and fast paths join here (CPU and CuPy issues), proven equal to it by tests.
"""

from __future__ import annotations

import os
from typing import Any, Protocol

__all__ = ["FastPath", "fast_paths_enabled", "registered", "select"]


class FastPath(Protocol):
    name: str

    def serves(self, step: str, xp: Any, x: Any) -> bool:
        """Whether this path implements ``step`` ('train', 'backward', 'eval') for ``x``."""
        ...

    def train(self, x: Any, weight: Any, bias: Any, *, axis: int, eps: float) -> tuple[Any, Any]:
        """Replaces the generic training forward: returns ``(y, BatchNormSaved)``."""
        ...

    def eval(self, x: Any, mean: Any, var: Any, weight: Any, bias: Any, *, axis: int, eps: float) -> Any:
        """Replaces the generic inference forward: returns ``y``."""
        ...

    def backward(self, dy: Any, saved: Any) -> tuple[Any, Any, Any]:
        """Replaces the generic backward: returns ``(dx, dweight, dbias)``."""
        ...


_REGISTRY: tuple[FastPath, ...] = ()


def fast_paths_enabled() -> bool:
    """False when the environment sets ``ANYBN_FAST_PATHS=0`` (or 'false', 'off', 'no')."""
    value = os.environ.get("ANYBN_FAST_PATHS", "1").strip().lower()
    return value not in {"0", "false", "off", "no"}


def registered() -> tuple[FastPath, ...]:
    """All fast paths whose library is installed, enabled or not."""
    return _REGISTRY


def select(step: str, xp: Any, x: Any) -> FastPath | None:
    """The first registered fast path serving ``step`` for ``x``, or None for the generic path."""
    if not _REGISTRY or not fast_paths_enabled():
        return None
    for path in _REGISTRY:
        if path.serves(step, xp, x):
            return path
    return None
