"""``python -m anybn.bench.variants``: the BN variants against plain BN on the CPU fast path.

Each variant changes one stage, so it should run at plain batch normalization's speed:
renormalization (coefficients), ghost BN (how the reductions group rows), frozen BN (no
reductions: inference's path). Every case runs in interleaved rounds in one process (one
untimed call before each timed one), so a load that comes and goes hits every case alike;
the ratios to plain BN are medians over the rounds. Prints a table, or JSON with ``--json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

import anybn

__all__ = ["SHAPES", "measure"]

#: name -> (shape, axis), float32: a conv activation (NCHW), its channels-last twin, and (N, C)
SHAPES: dict[str, tuple[tuple[int, ...], int]] = {
    "nchw 32x64x56x56": ((32, 64, 56, 56), 1),
    "nhwc 32x56x56x64": ((32, 56, 56, 64), -1),
    "rows 8192x1024": ((8192, 1024), 1),
}


def _cases(shape: tuple[int, ...], axis: int, groups: int) -> dict[str, tuple[str, Callable[[], Any]]]:
    """case name -> (its baseline's name, the call)."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
    dy = rng.standard_normal(shape, dtype=np.float32)
    c = shape[axis]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    rm, rv = np.full(c, 0.5, np.float32), np.full(c, 2.0, np.float32)
    v = shape[0] // groups
    _, plain = anybn.batch_norm_train(x, w, b, axis=axis)
    _, renorm = anybn.batch_renorm_train(x, w, b, rm, rv, rmax=3.0, dmax=5.0, axis=axis)
    _, ghost = anybn.batch_norm_train(x, w, b, axis=axis, virtual_batch_size=v)
    _, frozen = anybn.batch_norm_fixed(x, rm, rv, w, b, axis=axis)
    return {
        "bn train": ("bn train", lambda: anybn.batch_norm_train(x, w, b, axis=axis)),
        "renorm train": ("bn train", lambda: anybn.batch_renorm_train(x, w, b, rm, rv, rmax=3.0, dmax=5.0, axis=axis)),
        f"ghost train (G={groups})": ("bn train",
                                      lambda: anybn.batch_norm_train(x, w, b, axis=axis, virtual_batch_size=v)),
        "bn backward": ("bn backward", lambda: anybn.batch_norm_backward(dy, plain)),
        "renorm backward": ("bn backward", lambda: anybn.batch_norm_backward(dy, renorm)),
        f"ghost backward (G={groups})": ("bn backward", lambda: anybn.batch_norm_backward(dy, ghost)),
        "eval": ("eval", lambda: anybn.batch_norm_eval(x, rm, rv, w, b, axis=axis)),
        "frozen forward": ("eval", lambda: anybn.batch_norm_fixed(x, rm, rv, w, b, axis=axis)),
        "frozen backward": ("bn backward", lambda: anybn.batch_norm_backward(dy, frozen)),
    }


def measure(rounds: int = 15, groups: int = 4) -> dict[str, dict[str, dict[str, float]]]:
    """shape -> case -> {"ms": median, "ratio": median of the per-round ratios to its baseline}."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, (shape, axis) in SHAPES.items():
        cases = _cases(shape, axis, groups)
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(rounds):
            for key, (_, call) in cases.items():
                call()  # untimed: the thread pool awake, the buffers recycled
                start = time.perf_counter()
                call()
                times[key].append(time.perf_counter() - start)
        out[name] = {
            key: {"ms": statistics.median(t) * 1e3,
                  "ratio": statistics.median(a / b for a, b in zip(t, times[cases[key][0]]))}
            for key, t in times.items()
        }
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m anybn.bench.variants", description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--groups", type=int, default=4, help="ghost BN chunks per batch (default 4)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results = measure(args.rounds, args.groups)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        return 0
    for name, cases in results.items():
        print(name)
        for key, r in cases.items():
            print(f"  {key:24s} {r['ms']:9.2f} ms   x{r['ratio']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
