"""The Python around anybn's compiled whole steps, measured where it runs: after large passes.

Each sample times one public call (``batch_norm_train`` / ``_eval`` / ``_backward`` on the
CPU fast path) right after two calls of PyTorch's op and two of the same anybn op, as a
benchmark round does, and subtracts the time of the compiled whole-step call inside it
(every ``*_whole`` / ``*_whole_par`` kernel is wrapped to time itself). What is left is the
call's Python: validation, kernel choice, the thread plan, the output's allocation, the
saved state. Warm (``timeit`` of a small call), that is ~10-20 us; here the previous passes
have swept megabytes through the caches, and every line of it is a miss.

    MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000 GOMP_SPINCOUNT=10000 \\
        python tools/call_overhead.py [--rounds 15] [--shapes 4096x1024,32x64x56x56]

Prints, per shape and op: the median overhead, anybn's median call and PyTorch's (us).
PyTorch is optional: without it the rounds run anybn alone.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np


def _timed_kernels(kernels: Any, spent: list[float]) -> None:
    """Wrap every whole-step kernel of the module to append its own time to ``spent``."""
    for name in dir(kernels):
        if not (name.endswith("_whole") or name.endswith("_whole_par")):
            continue
        kernel = getattr(kernels, name)

        @functools.wraps(kernel)  # the name too: the path looks up name + "_par"
        def timed(*args: Any, _kernel: Callable[..., Any] = kernel) -> Any:
            t0 = time.perf_counter()
            out = _kernel(*args)
            spent.append(time.perf_counter() - t0)
            return out

        setattr(kernels, name, timed)


def measure(shape: tuple[int, ...], rounds: int, spent: list[float]) -> dict[str, dict[str, float]]:
    """{op: {"overhead", "anybn", "torch"}} in microseconds (medians) for float32 x of ``shape``."""
    import anybn

    try:
        import torch
    except ImportError:
        torch = None
    rng = np.random.default_rng(0)
    c = shape[1]
    x = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
    dy = rng.standard_normal(shape, dtype=np.float32)
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    rm, rv = rng.standard_normal(c).astype(np.float32), rng.random(c).astype(np.float32) + 0.5
    _, saved = anybn.batch_norm_train(x, w, b)
    ours = {"train": lambda: anybn.batch_norm_train(x, w, b),
            "eval": lambda: anybn.batch_norm_eval(x, rm, rv, w, b),
            "backward": lambda: anybn.batch_norm_backward(dy, saved)}
    theirs: dict[str, Callable[[], Any]] = {op: (lambda: None) for op in ours}
    if torch is not None:
        aten = torch.ops.aten
        xt, dyt, wt, bt, rmt, rvt = map(torch.from_numpy, (x, dy, w, b, rm, rv))
        _, mean_t, invstd_t = aten.native_batch_norm(xt, wt, bt, None, None, True, 0.1, 1e-5)
        theirs = {
            "train": lambda: aten.native_batch_norm(xt, wt, bt, None, None, True, 0.1, 1e-5),
            "eval": lambda: aten.native_batch_norm(xt, wt, bt, rmt, rvt, False, 0.1, 1e-5),
            "backward": lambda: aten.native_batch_norm_backward(dyt, xt, wt, None, None, mean_t, invstd_t, True,
                                                                1e-5, [True, True, True]),
        }
    samples: dict[tuple[str, str], list[float]] = {}
    for r in range(rounds):
        for op in ours:
            order = [("anybn", ours[op]), ("torch", theirs[op])]
            for who, call in order if r % 2 else order[::-1]:
                theirs[op]()
                theirs[op]()
                call()
                call()
                spent.clear()
                t0 = time.perf_counter()
                call()
                elapsed = time.perf_counter() - t0
                samples.setdefault((op, who), []).append(elapsed)
                if who == "anybn":
                    if len(spent) != 1:
                        raise RuntimeError(f"{op}: expected one whole-step kernel call, saw {len(spent)}")
                    samples.setdefault((op, "overhead"), []).append(elapsed - spent[0])
    return {op: {k: statistics.median(samples[(op, k)]) * 1e6 for k in ("overhead", "anybn", "torch")}
            for op in ours}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--shapes", default="4096x1024,32x64x56x56", help="comma list of NxC[xHxW] (NCHW)")
    args = parser.parse_args(argv)
    import anybn
    from anybn import _fast

    probe = np.zeros((2, 2), np.float32)
    path = _fast.kernels_for("train", anybn._namespace.numpy_namespace(), probe)
    if path is _fast.GENERIC:
        print("the CPU fast path does not serve here (pip install 'anybn[fast]')", file=sys.stderr)
        return 1
    anybn.batch_norm_train(probe + np.arange(4, dtype=np.float32).reshape(2, 2))  # loads the kernels
    spent: list[float] = []
    _timed_kernels(path._k, spent)
    print(f"{'shape':14s} {'op':9s} {'overhead':>9s} {'anybn':>9s} {'torch':>9s}   (us, medians of {args.rounds})")
    for spec in args.shapes.split(","):
        shape = tuple(int(n) for n in spec.split("x"))
        for op, got in measure(shape, args.rounds, spent).items():
            print(f"{spec:14s} {op:9s} {got['overhead']:9.1f} {got['anybn']:9.1f} {got['torch']:9.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
