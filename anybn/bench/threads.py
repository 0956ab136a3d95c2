"""``python -m anybn.bench.threads``: anybn's CPU fast path and PyTorch, each in its own process.

``anybn bench`` interleaves every backend in one process. With two threads on a 2-core
machine that puts numba's OpenMP pool (anybn's passes) and PyTorch's own OpenMP pool in one
process, where each pool's workers spin for a while after their work and take the cores the
other one needs next. This command times one library and one thread count per process
(rounds of a few calls of each op, medians), so a pool only ever competes with itself:

    python -m anybn.bench.threads run anybn 1 a1.json
    python -m anybn.bench.threads run anybn 2 a2.json
    python -m anybn.bench.threads run torch 1 t1.json
    python -m anybn.bench.threads run torch 2 t2.json
    python -m anybn.bench.threads table a1.json a2.json t1.json t2.json

``all`` runs the four in fresh interpreters one after another and prints the table. Set the
glibc variables of ``anybn bench`` for every run. PyTorch is called as ``anybn bench`` calls
it: ``torch.ops.aten.native_batch_norm`` / ``native_batch_norm_backward``, channels_last for
NHWC.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

SHAPES: tuple[tuple[str, tuple[int, ...], int], ...] = (
    ("4096x1024", (4096, 1024), 1),
    ("nchw:32x64x56x56", (32, 64, 56, 56), 1),
    ("nhwc:32x56x56x64", (32, 56, 56, 64), -1),
    ("nchw:32x256x56x56", (32, 256, 56, 56), 1),
    ("256x64", (256, 64), 1),
)
ROUNDS = 15
CALLS = 5


def _anybn_ops(x: np.ndarray, dy: np.ndarray, axis: int) -> dict[str, Callable[[], Any]]:
    import anybn

    c = x.shape[axis]
    w, b = np.ones(c, np.float32), np.zeros(c, np.float32)
    _, saved = anybn.batch_norm_train(x, w, b, axis=axis)
    return {"train": lambda: anybn.batch_norm_train(x, w, b, axis=axis),
            "backward": lambda: anybn.batch_norm_backward(dy, saved),
            "eval": lambda: anybn.batch_norm_eval(x, saved.mean, saved.var, w, b, axis=axis)}


def _torch_ops(x: np.ndarray, dy: np.ndarray, axis: int) -> dict[str, Callable[[], Any]]:
    import torch

    aten = torch.ops.aten
    xt, dyt = torch.from_numpy(x), torch.from_numpy(dy)
    if axis == -1:  # channels-last data as an NCHW tensor in channels_last memory: no copy
        xt, dyt = xt.permute(0, 3, 1, 2), dyt.permute(0, 3, 1, 2)
    c = x.shape[axis]
    w, b, rm, rv = torch.ones(c), torch.zeros(c), torch.zeros(c), torch.ones(c)
    _, mean, invstd = aten.native_batch_norm(xt, w, b, rm, rv, True, 0.1, 1e-5)
    return {"train": lambda: aten.native_batch_norm(xt, w, b, rm, rv, True, 0.1, 1e-5),
            "backward": lambda: aten.native_batch_norm_backward(dyt, xt, w, rm, rv, mean, invstd, True, 1e-5,
                                                                [True, True, True]),
            "eval": lambda: aten.native_batch_norm(xt, w, b, rm, rv, False, 0.1, 1e-5)}


def measure(library: str, threads: int) -> dict[str, float]:
    """Median ms per call of each (shape, op) for ``library`` ('anybn' or 'torch') on ``threads``."""
    if library == "anybn":
        os.environ["ANYBN_NUM_THREADS"] = str(threads)
        make = _anybn_ops
    elif library == "torch":
        import torch

        torch.set_num_threads(threads)
        make = _torch_ops
    else:
        raise ValueError(f"library must be 'anybn' or 'torch', got {library!r}")
    rng = np.random.default_rng(0)
    out: dict[str, float] = {}
    for name, shape, axis in SHAPES:
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        ops = make(x, dy, axis)
        samples: dict[str, list[float]] = {op: [] for op in ops}
        for _ in range(ROUNDS):
            for op, fn in ops.items():
                fn()  # untimed: whatever ran before settles
                start = time.perf_counter()
                for _ in range(CALLS):
                    fn()
                samples[op].append((time.perf_counter() - start) / CALLS)
        for op, values in samples.items():
            out[f"{name} {op}"] = 1e3 * statistics.median(values)
    return out


def table(a1: dict[str, float], a2: dict[str, float], t1: dict[str, float], t2: dict[str, float]) -> str:
    """The four runs side by side: ms, anybn's 2-thread / 1-thread, and anybn / PyTorch on 2 threads."""
    lines = [f"{'case':28s} {'anybn 1t':>9s} {'anybn 2t':>9s} {'2t/1t':>6s} {'torch 1t':>9s} {'torch 2t':>9s} "
             f"{'anybn/torch 2t':>15s}"]
    for key in a1:
        lines.append(f"{key:28s} {a1[key]:9.3f} {a2[key]:9.3f} {a2[key] / a1[key]:6.2f} {t1[key]:9.3f} "
                     f"{t2[key]:9.3f} {a2[key] / t2[key]:15.2f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 4 and args[0] == "run":
        with open(args[3], "w") as f:
            json.dump(measure(args[1], int(args[2])), f)
        return 0
    if len(args) == 5 and args[0] == "table":
        runs = []
        for path in args[1:]:
            with open(path) as f:
                runs.append(json.load(f))
        print(table(*runs))
        return 0
    if args == ["all"]:
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for library, threads in (("anybn", 1), ("anybn", 2), ("torch", 1), ("torch", 2)):
                path = os.path.join(tmp, f"{library}{threads}.json")
                subprocess.run([sys.executable, "-m", "anybn.bench.threads", "run", library, str(threads), path],
                               check=True)
                paths.append(path)
            return main(["table", *paths])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
