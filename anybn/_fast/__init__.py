"""Registry of backend fast paths.

A fast path supplies the two stages of each step that touch arrays the size of x, the
reductions and the apply, as compiled kernels for the arrays it serves: it implements
:class:`anybn._kernels.Kernels`. The coefficients between them are written once, in
``anybn._steps``, for every path. ``ANYBN_FAST_PATHS=0`` switches all fast paths off, read
at each call so a process can flip it without re-importing anybn.

A path is registered only when its library is installed, checked with ``find_spec`` so
that nothing is imported (einops-style): the library itself is imported by the path on the
first call it serves. The generic array-API kernels (``anybn._kernels.GENERIC``) serve
everything else and stay the reference; ``tests/test_fast.py`` proves each path equal to
them and to float64.

Registered paths:

- ``cpu``: NumPy float32/float64, C-contiguous, fused numba kernels on threads
  (``pip install "anybn[fast]"``).
- ``cuda``: CuPy float16/float32/float64, C-contiguous, above a size threshold: numba-cuda
  kernels on CuPy's current stream, arrays passed through ``__cuda_array_interface__``
  without copies (``pip install numba-cuda`` beside CuPy). Tested under numba-cuda's
  simulator (``pytest -m cuda_sim``) and checked on an H200 (``tools/gpu_check.py``), where
  the threshold (16 MiB) was measured.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

from .._env import EnvSetting
from .._kernels import GENERIC, Kernels, Step

__all__ = ["FastPath", "express", "fast_paths_enabled", "kernels_for", "registered", "select"]

#: A fast path is a :class:`anybn._kernels.Kernels` implementation.
FastPath = Kernels

_REGISTRY: tuple[Kernels, ...] | None = None


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _build_registry() -> tuple[Kernels, ...]:
    paths: list[Kernels] = []
    if _installed("numba"):
        from .cpu import CpuPath

        paths.append(CpuPath())
    if _installed("cupy") and _installed("numba_cuda"):
        from .cuda import CudaKernels

        paths.append(CudaKernels())
    return tuple(paths)


def _enabled(value: str | None) -> bool:
    return value is None or value.strip().lower() not in {"0", "false", "off", "no"}


_FAST_PATHS = EnvSetting("ANYBN_FAST_PATHS", _enabled)


def fast_paths_enabled() -> bool:
    """False when the environment sets ``ANYBN_FAST_PATHS=0`` (or 'false', 'off', 'no')."""
    return _FAST_PATHS()


def registered() -> tuple[Kernels, ...]:
    """All fast paths whose library is installed, enabled or not."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = _build_registry()
    return _REGISTRY


def select(step: Step, xp: Any, *arrays: Any) -> Kernels | None:
    """The first registered fast path serving ``step`` for ``arrays``, or None (generic path)."""
    if not fast_paths_enabled():
        return None
    for path in registered():
        if path.serves(step, xp, arrays):
            return path
    return None


def express(route: str) -> Callable[..., Any] | None:
    """The first registered path's express route ``route`` ("train_express", "eval_express"
    or "backward_express": a plain NumPy call in one step, see ``CpuPath.train_express``), or
    None: the usual route serves (also with the fast paths off, before the registry's first
    use, and before the CPU path's first call, which loads it)."""
    paths = _REGISTRY
    return getattr(paths[0], route, None) if paths and _FAST_PATHS() else None


def kernels_for(step: Step, xp: Any, *arrays: Any) -> Kernels:
    """The kernels for ``step``: the first fast path serving ``arrays``, else the generic ones."""
    fast = select(step, xp, *arrays)
    return GENERIC if fast is None else fast
