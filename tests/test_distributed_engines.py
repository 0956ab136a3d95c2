"""Synchronized BN on real engines: MPI (1, 2, 3 ranks) and torch.distributed gloo (3 processes).

Each case launches ``tests/sync_workers/worker.py`` under a timeout (it fails, never hangs)
and compares every rank's output with float64 NumPy references on the concatenated global
batch (``tests/reference.py``), never with anybn itself.

Tolerances: every quantity is a float64 computation of O(10) operations per value over
batches of 10 x 4 values per feature, so its rounding error is a few units of 2**-52
relative to its magnitude; 1e-12 relative (with an absolute floor of 1e-12 times the
quantity's scale, for entries near zero) leaves three orders of magnitude of room.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sync_workers import worker  # noqa: E402
from reference import reference_backward, reference_batch_norm, reference_moments  # noqa: E402

WORKER = Path(__file__).parent / "sync_workers" / "worker.py"
TIMEOUT_S = 120
RTOL = 1e-12


def _env() -> dict[str, str]:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("NUMBA_NUM_THREADS", "1")
    return env


def _run(cmds: list[list[str]], timeout: float = TIMEOUT_S) -> None:
    procs = [subprocess.Popen(c, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=timeout)
            outputs.append(out)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"distributed worker timed out after {timeout} s (a hang): {cmds[0]}")
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, f"worker exited with {p.returncode}:\n{out[-4000:]}"


def _close(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape}, expected {want.shape}"
    scale = max(float(np.max(np.abs(want))) if want.size else 0.0, 1e-300)
    err = np.abs(got - want)
    bound = RTOL * np.abs(want) + RTOL * scale
    assert np.all(err <= bound), f"{what}: max error {err.max():.3g} (scale {scale:.3g}), expected <= {RTOL} relative"


def _check(outdir: Path, size: int) -> None:
    ranks = [dict(np.load(outdir / f"rank{r}.npz")) for r in range(size)]
    sizes = worker.split_sizes(size)
    bounds = np.concatenate([[0], np.cumsum(sizes)])
    n = sum(sizes)
    w, b = worker.params()
    running_mean, running_var = np.zeros(worker.C), np.ones(worker.C)
    pop = []
    for step in range(worker.STEPS):
        x, dy = worker.global_batch(step, n)
        y = reference_batch_norm(x, 1, w, b)
        dx, dw, db = reference_backward(x, dy, 1, w)
        mean, var = reference_moments(x, 1)
        m = n * worker.L
        running_mean = 0.9 * running_mean + 0.1 * mean
        running_var = 0.9 * running_var + 0.1 * var * m / (m - 1)
        pop.append((mean, var, m))
        for r, got in enumerate(ranks):
            rows = slice(bounds[r], bounds[r + 1])
            _close(got[f"y{step}"], y[rows], f"rank {r} step {step} y")
            _close(got[f"dx{step}"], dx[rows], f"rank {r} step {step} dx")
            _close(got[f"rm{step}"], running_mean, f"rank {r} step {step} running_mean")
            _close(got[f"rv{step}"], running_var, f"rank {r} step {step} running_var")
            # bitwise the same running statistics on every rank
            assert np.array_equal(got[f"rm{step}"], ranks[0][f"rm{step}"])
            assert np.array_equal(got[f"rv{step}"], ranks[0][f"rv{step}"])
        # each rank's own contribution; their sum is the global gradient
        _close(sum(g[f"dw{step}"] for g in ranks), dw, f"step {step} sum of dweight")
        _close(sum(g[f"db{step}"] for g in ranks), db, f"step {step} sum of dbias")
        for r, got in enumerate(ranks):
            rows = slice(bounds[r], bounds[r + 1])
            xr, dyr = x[rows], dy[rows]
            own_db = dyr.sum(axis=(0, 2))
            own_dw = (dyr * (xr - mean[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5)).sum(axis=(0, 2))
            np.testing.assert_allclose(got[f"db{step}"], own_db, rtol=RTOL, atol=1e-12)
            np.testing.assert_allclose(got[f"dw{step}"], own_dw, rtol=RTOL, atol=1e-12)
    # float32 at mean/std = 1e4: within 1e-4 of float64 on the global batch
    xb = worker.big_offset(n)
    yb = reference_batch_norm(xb.astype(np.float64), 1)
    for r, got in enumerate(ranks):
        err = np.max(np.abs(got["y_big"] - yb[bounds[r] : bounds[r + 1]]), initial=0.0)
        assert err <= 1e-4, f"rank {r}: float32 at mean/std 1e4 is {err:.3g} off float64, expected <= 1e-4"
    # the bad input on the last rank: every rank raises, naming it, with its own message
    last = size - 1
    for r, got in enumerate(ranks):
        msg = str(got["error"])
        assert msg.startswith(f"ValueError: BatchNorm: rank {last}: x has 4 features along axis 1"), msg
        msg = str(got["error_weight"])
        assert msg.startswith(f"ValueError: batch_norm_train: rank {last}: weight has shape (4,), expected (3,)"), msg
    # population statistics across ranks, against the batches' float64 moments
    mean_all = np.mean([p[0] for p in pop], axis=0)
    x_all = np.concatenate([worker.global_batch(s, n)[0] for s in range(worker.STEPS)])
    pooled_mean, pooled_var = reference_moments(x_all, 1)
    m_all = x_all.shape[0] * worker.L
    paper_var = sum(p[1] * p[2] for p in pop) / sum(p[2] - 1 for p in pop)
    for r, got in enumerate(ranks):
        # the "paper" estimate sees each rank's slice of a step as its own batch
        per_batch = []
        for step in range(worker.STEPS):
            x, _ = worker.global_batch(step, n)
            for q in range(size):
                part = x[bounds[q] : bounds[q + 1]]
                if len(part):
                    per_batch.append((*reference_moments(part, 1), part.shape[0] * worker.L))
        paper_mean = sum(p[0] * p[2] for p in per_batch) / sum(p[2] for p in per_batch)
        paper_var = sum(p[1] * p[2] for p in per_batch) / sum(p[2] - 1 for p in per_batch)
        _close(got["pop_paper_mean"], paper_mean, f"rank {r} paper mean")
        _close(got["pop_paper_var"], paper_var, f"rank {r} paper var")
        _close(got["pop_pooled_mean"], pooled_mean, f"rank {r} pooled mean")
        _close(got["pop_pooled_var"], pooled_var * m_all / (m_all - 1), f"rank {r} pooled var")
        assert np.array_equal(got["pop_pooled_var"], ranks[0]["pop_pooled_var"])
    del mean_all
    # eval mode makes no collective: rank 0 ran it alone, and it matches the running statistics
    xe = worker.global_batch(0, n)[0][:2]
    _close(ranks[0]["eval"], reference_batch_norm(xe, 1, w, b, mean=running_mean, var=running_var), "eval")


def _has_mpi() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'anybn[mpi]')"
    if shutil.which("mpiexec") is None:
        return "mpiexec is not on PATH (pip install 'anybn[mpi]' brings mpich)"
    return None


@pytest.mark.skipif(_has_mpi() is not None, reason=str(_has_mpi()))
@pytest.mark.parametrize("size", [1, 2, 3])
def test_mpi_matches_single_process_float64(tmp_path: Path, size: int) -> None:
    _run([["mpiexec", "-n", str(size), sys.executable, str(WORKER), "mpi", str(tmp_path)]])
    _check(tmp_path, size)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torch_gloo_three_processes_match_single_process_float64(tmp_path: Path) -> None:
    port, size = _free_port(), 3
    _run([[sys.executable, str(WORKER), "torch", str(tmp_path), str(r), str(size), str(port)] for r in range(size)])
    _check(tmp_path, size)
