"""One rank of the synchronized-BN scenario, on MPI or torch.distributed (gloo).

Run as ``mpiexec -n k python worker.py mpi OUT`` or, per process,
``python worker.py torch OUT RANK SIZE PORT``. Each rank writes ``OUT/rank<r>.npz`` with
what it computed; ``tests/test_distributed_engines.py`` compares them with float64 NumPy
references on the concatenated global batch. The data are drawn from fixed seeds, the same
on every rank, and each rank keeps its slice.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import numpy as np

C, L, STEPS = 3, 4, 3


def split_sizes(size: int) -> list[int]:
    """Unequal per-rank batch sizes; with 3 ranks, rank 1 is empty."""
    return {1: [10], 2: [7, 3], 3: [6, 0, 4]}[size]


def global_batch(step: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(100 + step)
    x = 3.0 + 2.0 * rng.standard_normal((n, C, L))
    dy = rng.standard_normal((n, C, L))
    return x, dy


def params() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(7)
    return 1.0 + 0.3 * rng.standard_normal(C), 0.5 * rng.standard_normal(C)


def big_offset(n: int) -> np.ndarray:
    """float32 data at mean/std = 1e4 (the core's numerics goal, across ranks)."""
    rng = np.random.default_rng(11)
    return (1e4 + rng.standard_normal((n, 5))).astype(np.float32)


def scenario(rank: int, size: int, comm: Any, xp: Any, to_np: Any) -> dict[str, Any]:
    import anybn

    sizes = split_sizes(size)
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    out: dict[str, Any] = {"sizes": np.array(sizes)}
    w, b = params()
    layer = anybn.BatchNorm(C, xp=xp, dtype="float64", comm=comm)
    layer.load_state_dict({"weight": w, "bias": b, "running_mean": np.zeros(C), "running_var": np.ones(C),
                           "num_batches_tracked": 0})
    for step in range(STEPS):
        x, dy = global_batch(step, sum(sizes))
        y = layer(xp.asarray(x[lo:hi]))
        dx = layer.backward(xp.asarray(dy[lo:hi]))
        out[f"y{step}"], out[f"dx{step}"] = to_np(y), to_np(dx)
        out[f"dw{step}"], out[f"db{step}"] = to_np(layer.grad_weight), to_np(layer.grad_bias)
        out[f"rm{step}"], out[f"rv{step}"] = to_np(layer.running_mean), to_np(layer.running_var)
    # eval mode: no collective (a rank alone would hang otherwise); checked by calling it on rank 0 only
    if rank == 0:
        out["eval"] = to_np(layer.eval()(xp.asarray(global_batch(0, sum(sizes))[0][:2])))
        layer.train()
    # float32 at mean/std = 1e4
    xb = big_offset(sum(sizes))
    yb, _ = anybn.batch_norm_train(xp.asarray(xb[lo:hi]), comm=comm)
    out["y_big"] = to_np(yb)
    # a bad input on the last rank: every rank raises, naming it, and nobody hangs
    bad = rank == size - 1
    xe = xp.asarray(np.ones((4, C + 1 if bad else C)) * np.arange(4.0)[:, None])
    try:
        layer(xe)
        out["error"] = "none"
    except (TypeError, ValueError) as e:
        out["error"] = f"{type(e).__name__}: {e}"
    # a wrong weight on the last rank, functional API
    wbad = xp.asarray(np.ones(C + 1 if bad else C))
    try:
        anybn.batch_norm_train(xp.asarray(np.ones((4, C)) * np.arange(4.0)[:, None]), wbad, comm=comm)
        out["error_weight"] = "none"
    except (TypeError, ValueError) as e:
        out["error_weight"] = f"{type(e).__name__}: {e}"
    # population statistics merged across ranks; rank 1 of 3 has seen no batch
    pop = anybn.PopulationStats(C, comm=comm)
    for step in range(STEPS):
        x, _ = global_batch(step, sum(sizes))
        if hi > lo:
            pop.update(xp.asarray(x[lo:hi]))
    for method in ("paper", "pooled"):
        mean, var = pop.result(method)
        out[f"pop_{method}_mean"], out[f"pop_{method}_var"] = to_np(mean), to_np(var)
    return out


def main() -> None:
    engine, outdir = sys.argv[1], sys.argv[2]
    if engine == "mpi":
        from anybn.distributed import MPIComm

        comm = MPIComm()
        rank, size = comm.rank, comm.size
        result = scenario(rank, size, comm, np, np.asarray)
    elif engine == "torch":
        import torch
        import torch.distributed as dist

        from anybn.distributed import TorchComm

        rank, size, port = int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
        try:
            comm = TorchComm()
            # a rank that saw no batch gets its population estimate as NumPy (it never saw torch data)
            result = scenario(rank, size, comm, torch,
                              lambda t: t if isinstance(t, np.ndarray) else t.detach().cpu().numpy())
        finally:
            dist.destroy_process_group()
    else:
        raise SystemExit(f"worker.py: unknown engine {engine!r}, expected mpi or torch")
    np.savez(os.path.join(outdir, f"rank{rank}.npz"), **result)


if __name__ == "__main__":
    main()
