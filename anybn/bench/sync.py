"""Cost of synchronization per training step (forward + backward), under MPI.

Run with ``mpiexec -n K python -m anybn.bench.sync [--repeats R] [--shapes ...]``. For each
per-rank shape (float32), every rank times, in turn and interleaved, the step of local BN
(``comm=None``) and of synchronized BN (``comm=MPIComm()``) on the same input, with a
barrier before each sample so that ranks start together; and the collectives alone (the
header and payload all-gathers and the backward all-reduce, on (C,)-sized arrays). Rank 0
prints one line per shape: medians in ms over the samples, the ratio sync / local, and the
collectives' latency.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import numpy as np

SHAPES = {"4096x1024": (4096, 1024), "32x64x56x56": (32, 64, 56, 56)}


def _step(x: np.ndarray, dy: np.ndarray, w: np.ndarray, b: np.ndarray, comm: Any) -> None:
    import anybn

    _, saved = anybn.batch_norm_train(x, w, b, comm=comm)
    anybn.batch_norm_backward(dy, saved)


def _collectives(comm: Any, c: int) -> None:
    comm.all_gather(np.zeros(4, dtype=np.int64))
    comm.all_gather(np.zeros(3 * c))
    comm.all_reduce_sum(np.zeros(2 * c + 2))


def _medians_ms(fns: list[Any], mpi: Any, repeats: int) -> list[float]:
    """Median ms of each of ``fns``, timed in interleaved rounds (order alternating), so that
    a load that comes and goes, or a clock that changes, hits them alike."""
    for fn in fns:
        fn()  # warm: JIT, allocations
    samples: list[list[float]] = [[] for _ in fns]
    for r in range(repeats):
        order = range(len(fns)) if r % 2 == 0 else reversed(range(len(fns)))
        for i in order:
            mpi.Barrier()
            t = time.perf_counter()
            fns[i]()
            samples[i].append(time.perf_counter() - t)
    return [1e3 * statistics.median(s) for s in samples]


def main(argv: list[str] | None = None) -> int:
    from mpi4py import MPI

    from anybn.distributed import MPIComm

    parser = argparse.ArgumentParser(prog="python -m anybn.bench.sync", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--shapes", nargs="+", choices=sorted(SHAPES), default=sorted(SHAPES))
    args = parser.parse_args(argv)
    world = MPI.COMM_WORLD
    comm = MPIComm(world)
    rows = []
    for name in args.shapes:
        shape = SHAPES[name]
        rng = np.random.default_rng(comm.rank)
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        c = shape[1]
        w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
        local, synced, coll = _medians_ms([lambda: _step(x, dy, w, b, None), lambda: _step(x, dy, w, b, comm),
                                           lambda: _collectives(comm, c)], world, args.repeats)
        rows.append((name, local, synced, coll))
    if comm.rank == 0:
        print(f"# ranks={comm.size} float32 per-rank shapes, median of {args.repeats} steps (fwd+bwd), ms")
        print(f"{'shape':>14} {'local':>9} {'sync':>9} {'ratio':>6} {'collectives':>12}")
        for name, local, synced, coll in rows:
            print(f"{name:>14} {local:9.2f} {synced:9.2f} {synced / local:6.2f} {coll:12.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
