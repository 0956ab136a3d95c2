"""Memory: the bytes one call of a case allocates, and how many of them its result keeps.

Counted with ``tracemalloc`` (:func:`traced_memory`), which sees NumPy's array buffers
whatever the allocator does with freed pages; the asv suite's ``peakmem_`` benchmarks
measure the process's peak RSS instead.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .. import testing

if TYPE_CHECKING:
    from .cases import Case

__all__ = ["traced_memory"]


def traced_memory(case: Case) -> tuple[int, int]:
    """Bytes allocated by one ``run``: the peak above the start, and what its result keeps.

    Counted with ``tracemalloc``, which sees NumPy's array buffers (and so those of the
    NumPy-backed backends: array_api_strict, Dask, the naive code) whatever the allocator
    does with freed pages; PyTorch's and CuPy's allocators are invisible to it, so those
    backends raise :class:`anybn.testing.Unavailable`. The result stays alive until the count is taken:
    for the training forward, y and whatever is saved for backward (anybn: O(C) vectors and
    a reference to x; the naive code: a cache holding copies the size of x).
    """
    import gc
    import tracemalloc

    if case.path == "aten" or case.device != "cpu":
        raise testing.Unavailable(f"{case.backend}: its allocator is not visible to tracemalloc")
    gc.collect()
    tracing = tracemalloc.is_tracing()
    if not tracing:
        tracemalloc.start()
    try:
        with case.environment():
            before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
            out = case.run()
            current, peak = tracemalloc.get_traced_memory()
        del out
    finally:
        if not tracing:
            tracemalloc.stop()
    return peak - before, current - before

