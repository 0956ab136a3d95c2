"""``python -m anybn.bench.threads``: 2 threads against 1, each library in its own process.

``anybn bench`` interleaves every backend in one process. With two threads on a 2-core
machine that puts numba's OpenMP pool (anybn's passes) and PyTorch's own OpenMP pool in one
process, where each pool's workers spin for a while after their work and take the cores the
other one needs next. This command times one library per process, so a pool only ever
competes with itself, and within that process alternates the thread counts round by round
(1 then 2, then 2 then 1, ...), so that the 2-thread / 1-thread ratio is a same-process,
same-minute comparison: the median over rounds of each round's ratio. (Timing each thread
count in a process of its own let the machine's drift between processes into the ratio:
0.30 to 1.09 on cases whose same-process ratio stays within 0.56 to 0.90.)

    python -m anybn.bench.threads run anybn a.json
    python -m anybn.bench.threads run torch t.json
    python -m anybn.bench.threads table a.json t.json

``all`` runs the two in fresh interpreters one after another and prints the table. Set the
glibc variables of ``anybn bench`` for every run. PyTorch is called as ``anybn bench`` calls
it: ``torch.ops.aten.native_batch_norm`` / ``native_batch_norm_backward``, channels_last for
NHWC. PyTorch's process also times ``copy``, ``Tensor.copy_`` of x into a preallocated
tensor, which PyTorch splits across its threads: how far the memory system lets two threads
go on each shape (a pass that reads x and writes y cannot scale better than a copy does).
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
THREADS = (1, 2)


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


def _set_threads(library: str) -> Callable[[int], None]:
    """A function that sets ``library``'s thread count for the calls that follow it."""
    if library == "anybn":
        def anybn_threads(n: int) -> None:
            os.environ["ANYBN_NUM_THREADS"] = str(n)  # read by anybn at each call

        return anybn_threads
    if library == "torch":
        import torch

        return torch.set_num_threads
    raise ValueError(f"library must be 'anybn' or 'torch', got {library!r}")


def _torch_copy(x: np.ndarray) -> Callable[[], Any]:
    import torch

    src = torch.from_numpy(x)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def measure(library: str, threads: Sequence[int] = THREADS) -> dict[str, Any]:
    """Time every (shape, op) of ``library`` ('anybn' or 'torch') on each of ``threads``.

    Returns ``{"threads": [...], "ms": {"<n>": {case: median ms per call}}, "ratio": {case:
    median over rounds of (ms on threads[-1]) / (ms on threads[0])}}``, cases named
    ``"<shape> <op>"``. The thread counts alternate within each round, in turn forwards
    and backwards, so that each round's ratio compares calls a few milliseconds apart.
    """
    if len(threads) < 2 or min(threads) < 1:
        raise ValueError(f"threads must be at least two positive counts, got {list(threads)!r}")
    set_threads = _set_threads(library)
    make = _anybn_ops if library == "anybn" else _torch_ops
    rng = np.random.default_rng(0)
    ms: dict[str, dict[str, float]] = {str(n): {} for n in threads}
    ratio: dict[str, float] = {}
    for name, shape, axis in SHAPES:
        x = rng.standard_normal(shape, dtype=np.float32)
        dy = rng.standard_normal(shape, dtype=np.float32)
        ops = make(x, dy, axis)
        if library == "torch":
            ops["copy"] = _torch_copy(x)
        samples: dict[tuple[int, str], list[float]] = {(n, op): [] for n in threads for op in ops}
        for r in range(ROUNDS):
            for n in (threads if r % 2 == 0 else list(reversed(threads))):
                set_threads(n)
                for op, fn in ops.items():
                    fn()  # untimed: whatever ran before settles
                    start = time.perf_counter()
                    for _ in range(CALLS):
                        fn()
                    samples[n, op].append((time.perf_counter() - start) / CALLS)
        for op in ops:
            case = f"{name} {op}"
            for n in threads:
                ms[str(n)][case] = 1e3 * statistics.median(samples[n, op])
            ratio[case] = statistics.median(
                hi / lo for hi, lo in zip(samples[threads[-1], op], samples[threads[0], op], strict=True))
    return {"threads": list(threads), "ms": ms, "ratio": ratio}


def table(anybn: dict[str, Any], torch: dict[str, Any]) -> str:
    """The two runs side by side: ms per call on 1 and 2 threads, each library's 2t / 1t
    (same-process, per-round medians), and anybn / PyTorch on 2 threads (across processes)."""
    lo, hi = (str(n) for n in (anybn["threads"][0], anybn["threads"][-1]))
    lines = [f"{'case':28s} {'anybn ' + lo + 't':>9s} {'anybn ' + hi + 't':>9s} {hi + 't/' + lo + 't':>6s} "
             f"{'torch ' + lo + 't':>9s} {'torch ' + hi + 't':>9s} {hi + 't/' + lo + 't':>6s} "
             f"{'anybn/torch ' + hi + 't':>15s}"]
    for key in torch["ratio"]:
        left = "{:9s} {:9s} {:6s}".format("-", "-", "-")
        versus = "-"
        if key in anybn["ratio"]:
            left = f"{anybn['ms'][lo][key]:9.3f} {anybn['ms'][hi][key]:9.3f} {anybn['ratio'][key]:6.2f}"
            versus = f"{anybn['ms'][hi][key] / torch['ms'][hi][key]:.2f}"
        lines.append(f"{key:28s} {left} {torch['ms'][lo][key]:9.3f} {torch['ms'][hi][key]:9.3f} "
                     f"{torch['ratio'][key]:6.2f} {versus:>15s}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) == 3 and args[0] == "run":
        with open(args[2], "w") as f:
            json.dump(measure(args[1]), f)
        return 0
    if len(args) == 3 and args[0] == "table":
        runs = []
        for path in args[1:]:
            with open(path) as f:
                runs.append(json.load(f))
        print(table(*runs))
        return 0
    if args == ["all"]:
        with tempfile.TemporaryDirectory() as tmp:
            paths = []
            for library in ("anybn", "torch"):
                path = os.path.join(tmp, f"{library}.json")
                subprocess.run([sys.executable, "-m", "anybn.bench.threads", "run", library, path], check=True)
                paths.append(path)
            return main(["table", *paths])
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
