"""anybn (fast and generic NumPy paths) against PyTorch (the peer) and naive NumPy (the baseline).

Built on :mod:`anybn.bench.cases` (and its shapes, :mod:`anybn.bench.shapes`), the definitions the asv suite and ``python -m anybn bench``
use. Every (op, shape) pair is one pytest-benchmark group with a benchmark per backend, so
the comparison table shows their ratio directly; ``ratios.py`` turns the JSON into the
table of docs/benchmarks.md. Each benchmark checks the result of the call it timed against
a float64 NumPy reference, so no side can drift into a different computation.

These are skipped by the project's default ``--benchmark-skip``; run them with::

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 \
        python -m pytest tests/benchmarks --benchmark-only -p no:randomly \
        --benchmark-min-rounds=20 --benchmark-json=results.json
    python tests/benchmarks/ratios.py results.json

``numpy-generic`` runs with ``ANYBN_FAST_PATHS=0`` and ``numpy-fast`` with it set to 1, each
held only around its own benchmark. PyTorch runs with 2 threads (``torch.set_num_threads``),
as does anybn's CPU fast path (``ANYBN_NUM_THREADS``); the naive code is single-threaded
NumPy.
"""

from __future__ import annotations

import pytest

from anybn.bench import cases, shapes

BACKENDS = ("numpy-fast", "numpy-generic", "torch", "naive")
THREADS = 2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", shapes.DEFAULT_SHAPES)
@pytest.mark.parametrize("op", shapes.OPS)
def test_peer(benchmark, op, shape, backend):
    try:
        case = cases.prepare(backend, shape, op, "float32", threads=THREADS)
    except cases.Unavailable as exc:
        pytest.skip(str(exc))
    benchmark.group = f"{shapes.OP_LABELS[op]} {shape}"
    benchmark.extra_info.update(
        backend=backend, path=case.path, shape=shape, op=op, dtype=case.dtype,
        nbytes=case.nbytes, traffic_bytes=case.traffic,
    )
    with case.environment():
        outputs = benchmark(case.run)
    error = cases.check(case, outputs)
    assert error <= cases.tolerance(case.dtype), f"{case.name}: max error {error:.2e} of max |reference|"
