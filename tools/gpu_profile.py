"""Where the CUDA path's time goes on a GPU: host launch overhead against device time.

The first GPU check (``tools/gpu_check.py``) times each step with CUDA events around the
call, as a user sees it; on the H200 every anybn step took about 1 ms whatever the size,
which is host time. This check separates the two:

1. ``launchers``: every kernel through ``CudaPath(launch="direct")`` and through numba's
   dispatch (``launch="numba"``), bit for bit (same compiled code, same configuration).
2. ``device``: each step's device time alone. A spin kernel keeps the GPU busy for
   ``DELAY_MS`` while the host enqueues the start event, the step and the stop event, so
   the events measure the GPU's work only (``host_ms`` must stay below the delay; the JSON
   records it), and its host time per call. anybn's steps on both launchers, its four
   kernels alone, PyTorch's steps and a copy.
3. ``profile``: cProfile of anybn's three steps on a 64 MiB input, each launcher, top
   functions by own time, written to ``gpu_profile.txt``.
4. ``large``: end to end, as ``anybn.batch_norm_*`` is called, on the generic CuPy path
   and the numba path, from 64 MiB to 1 GiB: whether the fast path wins anywhere.

Run with ``tools/gpu_check.sh``'s setup::

    python3 tools/gpu_profile.py --out "$OUT" [--budget 240]

Writes ``gpu_profile.json`` and ``gpu_profile.txt`` to ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import gpu_check as g  # noqa: E402 - puts ROOT on sys.path and applies the row_stack shim

DELAY_MS = 8.0
PROFILE_SHAPE = (64, 256, 32, 32)  # NCHW float32, 64 MiB
PROFILE_CALLS = 30
LAUNCHER_LARGE = [("NCHW 64MiB", (64, 256, 32, 32), 1), ("NHWC 64MiB", (64, 32, 32, 256), -1)]
RUNS = 15
DEVICE_CASES = [
    ("NCHW f32 64MiB", (64, 256, 32, 32), 1, np.float32),
    ("NHWC f32 64MiB", (64, 32, 32, 256), -1, np.float32),
    ("NCHW f16 64MiB", (128, 256, 32, 32), 1, np.float16),
    ("NCHW f32 256MiB", (256, 256, 32, 32), 1, np.float32),
    ("NHWC f32 256MiB", (256, 32, 32, 256), -1, np.float32),
    ("NCHW f32 4MiB", (16, 64, 32, 32), 1, np.float32),
]
LARGE_CASES = [
    ("NCHW f32 64MiB", (64, 256, 32, 32), 1, np.float32),
    ("NHWC f32 64MiB", (64, 32, 32, 256), -1, np.float32),
    ("NCHW f32 256MiB", (256, 256, 32, 32), 1, np.float32),
    ("NHWC f32 256MiB", (256, 32, 32, 256), -1, np.float32),
    ("NCHW f32 1GiB", (1024, 256, 32, 32), 1, np.float32),
]
_SPIN = r"""
extern "C" __global__ void spin(long long ns) {
    long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do { asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)); } while (t - t0 < ns);
}
"""


def device_time(cp: Any, spin: Any, fn: Callable[[], Any], runs: int = RUNS) -> dict[str, float]:
    """Median device milliseconds of ``fn`` (events behind a spin kernel) and host ms per call."""
    fn()
    cp.cuda.Device().synchronize()
    times, hosts = [], []
    for _ in range(runs):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        spin((1,), (1,), (np.int64(DELAY_MS * 1e6),))
        t0 = time.perf_counter()
        start.record()
        fn()
        stop.record()
        hosts.append((time.perf_counter() - t0) * 1e3)
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return {"device_ms": statistics.median(times), "device_min_ms": min(times),
            "host_ms": statistics.median(hosts), "host_max_ms": max(hosts)}


def section_device(budget: g.Budget) -> dict[str, Any]:
    import cupy as cp
    import torch
    import torch.nn.functional as F

    spin = cp.RawKernel(_SPIN, "spin")
    path = g._cuda_path("direct")
    numba_path = g._cuda_path("numba")
    rows = []
    for name, shape, axis, dtype in DEVICE_CASES:
        if budget.left() < 120:
            rows.append({"case": name, "error": "time budget"})
            continue
        row: dict[str, Any] = {"case": name, "shape": list(shape), "dtype": np.dtype(dtype).name,
                               "bytes": int(np.prod(shape)) * np.dtype(dtype).itemsize}
        try:
            layout = g.layout_of(shape, axis)
            x = cp.random.default_rng(0).standard_normal(shape, dtype=cp.float32).astype(dtype)
            dy = cp.random.default_rng(1).standard_normal(shape, dtype=cp.float32).astype(dtype)
            steps = g.AnybnSteps(cp, path, x, layout)
            nsteps = g.AnybnSteps(cp, numba_path, x, layout)
            _, saved = steps.train()
            pivot = saved[0]
            c = layout.features
            ones = cp.ones(c, dtype=cp.float64)
            fns: dict[str, Callable[[], Any]] = {
                "anybn_train": steps.train, "anybn_eval": steps.eval,
                "anybn_backward": lambda: steps.backward(dy, saved),
                "numba_train": nsteps.train, "numba_eval": nsteps.eval,
                "numba_backward": lambda: nsteps.backward(dy, saved),
                "kernel_moments": lambda: path.moments(x, layout),
                "kernel_apply": lambda: path.apply(x, layout, pivot, ones, ones),
                "kernel_grad_sums": lambda: path.grad_sums(x, dy, layout, pivot),
                "kernel_grad_apply": lambda: path.grad_apply(x, dy, layout, pivot, ones, ones, ones),
            }
            out = cp.empty_like(x)
            fns["copy"] = lambda: cp.copyto(out, x)
            tx, tdy = torch.from_dlpack(x), torch.from_dlpack(dy)
            if axis != 1:
                perm = (0, tx.ndim - 1, *range(1, tx.ndim - 1))
                tx, tdy = tx.permute(perm), tdy.permute(perm)
            pdt = torch.float32 if tx.dtype == torch.float16 else tx.dtype
            tw = torch.ones(c, device=tx.device, dtype=pdt, requires_grad=True)
            tb = torch.zeros(c, device=tx.device, dtype=pdt, requires_grad=True)
            rm, rv = torch.zeros(c, device=tx.device, dtype=pdt), torch.ones(c, device=tx.device, dtype=pdt)
            txg = tx.detach().requires_grad_(True)
            ty = F.batch_norm(txg, rm, rv, tw, tb, True, 0.1, 1e-5)
            fns["torch_train"] = lambda: F.batch_norm(tx, rm, rv, tw, tb, True, 0.1, 1e-5)
            fns["torch_eval"] = lambda: F.batch_norm(tx, rm, rv, tw, tb, False, 0.1, 1e-5)
            fns["torch_backward"] = lambda: torch.autograd.grad(ty, (txg, tw, tb), tdy, retain_graph=True)
            for key, fn in fns.items():
                # PyTorch's forwards without autograd's graph, as in gpu_check
                with torch.no_grad() if key in ("torch_train", "torch_eval") else contextlib.nullcontext():
                    row[key] = device_time(cp, spin, fn)
            del out, ty, txg
        except Exception as exc:  # noqa: BLE001 - recorded, the next case runs
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        rows.append(row)
        print(f"   {name}: " + ", ".join(f"{k}={v['device_ms']:.3f}/{v['host_ms']:.3f}"
                                        for k, v in row.items() if isinstance(v, dict)), flush=True)
        cp.get_default_memory_pool().free_all_blocks()
    return {"delay_ms": DELAY_MS, "runs": RUNS, "rows": rows}


def section_launchers() -> dict[str, Any]:
    """Every kernel through the direct launcher and through numba's dispatch: the same bits."""
    import cupy as cp

    direct, numba_path = g._cuda_path("direct"), g._cuda_path("numba")
    if direct._launcher is None:
        return {"failed": 1, "error": "CudaPath(launch='direct') fell back to numba's dispatch: the probe "
                                      "kernel did not launch or gave a wrong result through DirectLauncher"}
    checks = []
    for name, shape, axis in g.KERNEL_SHAPES + LAUNCHER_LARGE:
        for dtype in (np.float16, np.float32, np.float64):
            for activation, residual in g.ACTIVATION_CASES:
                case = f"{name}-{np.dtype(dtype).name}-{activation}-{'res' if residual else 'nores'}"
                try:
                    layout = g.layout_of(shape, axis)
                    c = layout.features
                    rng = cp.random.default_rng(3)
                    x = rng.standard_normal(shape, dtype=cp.float32).astype(dtype)
                    dy = rng.standard_normal(shape, dtype=cp.float32).astype(dtype)
                    r = rng.standard_normal(shape, dtype=cp.float32).astype(dtype) if residual else None
                    v = [rng.standard_normal(c, dtype=cp.float64) for _ in range(6)]
                    kw = {"activation": activation, "scale": v[1], "shift": v[2], "residual": r}
                    outs = []
                    for path in (direct, numba_path):
                        res = list(path.moments(x, layout))
                        res.append(path.apply(x, layout, v[0], v[1], v[2], activation=activation, residual=r))
                        res += list(path.grad_sums(x, dy, layout, v[0], **kw, z_pivot=v[3]))
                        dx, dres = path.grad_apply(x, dy, layout, v[0], v[3], v[4], v[5], **kw, z_pivot=v[3])
                        res += [dx] + ([] if dres is None else [dres])
                        outs.append(res)
                    same = len(outs[0]) == len(outs[1]) and all(
                        bool(cp.array_equal(a, b, equal_nan=True)) for a, b in zip(*outs))
                    checks.append({"case": case, "ok": same})
                except Exception as exc:  # noqa: BLE001
                    checks.append({"case": case, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:300]}"})
    return {"checks": checks, "failed": sum(not c["ok"] for c in checks)}


def section_profile(out: Path) -> dict[str, Any]:
    import cupy as cp

    text = io.StringIO()
    walls = {}
    for launch in ("direct", "numba"):
        walls[launch] = _profile(cp, g._cuda_path(launch), text, launch)
    (out / "gpu_profile.txt").write_text(text.getvalue())
    return {"ms_per_call_under_profiler": walls}


def _profile(cp: Any, path: Any, text: io.StringIO, launch: str) -> dict[str, float]:
    shape, axis = PROFILE_SHAPE, 1
    x = cp.random.default_rng(0).standard_normal(shape, dtype=cp.float32)
    dy = cp.random.default_rng(1).standard_normal(shape, dtype=cp.float32)
    steps = g.AnybnSteps(cp, path, x, g.layout_of(shape, axis))
    _, saved = steps.train()
    cp.cuda.Device().synchronize()
    walls = {}
    for name, fn in (("train", steps.train), ("eval", steps.eval), ("backward", lambda: steps.backward(dy, saved))):
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(PROFILE_CALLS):
            fn()
        prof.disable()
        walls[name] = (time.perf_counter() - t0) / PROFILE_CALLS * 1e3
        cp.cuda.Device().synchronize()
        text.write(f"===== {launch} launch, {name}: {PROFILE_CALLS} calls, {walls[name]:.3f} ms per call "
                   "under the profiler\n")
        pstats.Stats(prof, stream=text).sort_stats("tottime").print_stats(30)
    return walls


def section_large(budget: g.Budget) -> dict[str, Any]:
    import cupy as cp

    g.CROSSOVER_BYTES = 1 << 40  # time the generic and fast paths at every size here
    rows = []
    for name, shape, axis, dtype in LARGE_CASES:
        if budget.left() < 30:
            rows.append({"case": name, "error": "time budget"})
            continue
        x = cp.random.default_rng(0).standard_normal(shape, dtype=cp.float32).astype(dtype)
        dy = cp.random.default_rng(1).standard_normal(shape, dtype=cp.float32).astype(dtype)
        row = {"case": name, "shape": list(shape), "bytes": x.nbytes, **g._end_to_end(cp, x, dy, axis)}
        rows.append(row)
        print(f"   {name}: " + ", ".join(f"{k}={v['median_ms']:.3f}" for k, v in row.items()
                                        if isinstance(v, dict)), flush=True)
        del x, dy
        cp.get_default_memory_pool().free_all_blocks()
    return {"runs": g.RUNS, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")))
    p.add_argument("--budget", type=float, default=240.0)
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    budget = g.Budget(args.budget)
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "sections": {},
                              "numpy_row_stack_shim": g.ROW_STACK_SHIM}
    path = args.out / "gpu_profile.json"
    for name, fn in (("env", g.section_env), ("launchers", section_launchers),
                     ("device", lambda: section_device(budget)),
                     ("profile", lambda: section_profile(args.out)), ("large", lambda: section_large(budget))):
        g.run_section(report, name, fn, args.out, path.name)
    ok = all(s.get("ok") and not (s.get("result") or {}).get("failed") for s in report["sections"].values())
    print(f"wrote {path}; {'all ran' if ok else 'ERRORS: see JSON'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
