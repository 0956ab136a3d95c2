"""Benchmarks of anybn against its peers, imported only when asked for.

One definition of what is measured, shared by the asv suite (``asv_bench/``),
pytest-benchmark (``tests/benchmarks/``) and ``python -m anybn bench``, one module per job:

- :mod:`anybn.bench.cases`: a prepared case (:class:`~anybn.bench.cases.Case`,
  :func:`~anybn.bench.cases.prepare`) and its check against :mod:`anybn.testing`'s float64
  reference;
- :mod:`anybn.bench.shapes`: the ops, shapes, inputs and the bytes each op moves;
- :mod:`anybn.bench.backends`: how each backend (anybn on each library, PyTorch, the naive
  code) runs an op, built on :mod:`anybn.testing`'s backend table;
- :mod:`anybn.bench.timing`: calls per sample, interleaved rounds, the reference copy, and
  the stability of each row's samples;
- :mod:`anybn.bench.memory`: bytes allocated by a call (tracemalloc);
- :mod:`anybn.bench.naive`: the cs231n-style NumPy baseline;
- :mod:`anybn.bench.cli`: ``python -m anybn bench``;
- :mod:`anybn.bench.plot`: a bar chart of its ``--json`` output.

Nothing here imports torch, CuPy, Dask or matplotlib until a case or a chart needs it.
"""
