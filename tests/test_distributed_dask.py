"""Population statistics of Dask arrays on a dask.distributed LocalCluster.

One graph with a tree reduction of per-chunk mergeable moments: the paper and pooled
estimates equal float64 NumPy's on the materialized data (float64 sums of 10**6 values
of magnitude ~10: relative error ~1e-15 * log(chunks); 1e-12 relative), and the peak
memory while computing a dataset 16 times the chunk size stays a few chunks.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import anybn

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    cluster = distributed.LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None)
    with distributed.Client(cluster) as c:
        yield c
    cluster.close()


def _data(rows: int, chunk_rows: int):
    return da.random.default_rng(0).normal(5.0, 2.0, size=(rows, 8), chunks=(chunk_rows, 8))


def test_paper_and_pooled_equal_numpy_on_materialized_data(client) -> None:
    x = _data(40_000, 2_500)
    batches = [x[i : i + 10_000] for i in range(0, 40_000, 10_000)]
    layer = anybn.BatchNorm(8, xp=da, dtype="float64")
    stats = anybn.PopulationStats(8)
    for b in batches:
        stats.update(b)
    paper, pooled = stats.result("paper"), stats.result("pooled")
    assert all(isinstance(a, da.Array) for a in (*paper, *pooled))  # lazy: one graph
    paper, pooled = client.compute([paper, pooled], sync=True)
    xn = x.compute()
    np.testing.assert_allclose(pooled[0], xn.mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(pooled[1], xn.var(axis=0, ddof=1), rtol=1e-12)
    parts = np.split(xn, 4)
    np.testing.assert_allclose(paper[0], np.mean([p.mean(axis=0) for p in parts], axis=0), rtol=1e-12)
    np.testing.assert_allclose(paper[1], np.mean([p.var(axis=0, ddof=1) for p in parts], axis=0), rtol=1e-12)
    layer.estimate_population(batches, method="pooled")
    np.testing.assert_allclose(layer.running_var.compute(), xn.var(axis=0, ddof=1), rtol=1e-12)


def _peak_bytes(client, chunks: int, chunk_rows: int) -> tuple[int, int]:
    x = _data(chunks * chunk_rows, chunk_rows)
    mean, var = anybn.PopulationStats(8).update(x).result("pooled")
    tracemalloc.start()
    try:
        client.compute([mean, var], sync=True)
        return tracemalloc.get_traced_memory()[1], x.nbytes
    finally:
        tracemalloc.stop()


def test_memory_stays_a_few_chunks_however_large_the_dataset(client) -> None:
    """16 and 48 chunks of 2 MiB: the peak stays ~8 chunks (measured 15 and 17 MiB)."""
    chunk_rows = 32_768  # 2 MiB chunks of float64 (8 features)
    chunk_bytes = chunk_rows * 8 * 8
    small, _ = _peak_bytes(client, 16, chunk_rows)
    large, total = _peak_bytes(client, 48, chunk_rows)
    # 2 threads, each with a chunk being generated and one being reduced (two temporaries),
    # plus the scheduler's and tracemalloc's own: about 8 chunks, whatever the data size
    assert large <= 11 * chunk_bytes, f"peak {large / 2**20:.1f} MiB for {total / 2**20:.0f} MiB of data"
    assert large <= small + 3 * chunk_bytes, f"peak grew from {small / 2**20:.1f} to {large / 2**20:.1f} MiB"
    assert large < total / 4
