"""A grouped bar chart of ``anybn bench --json`` results: time relative to PyTorch.

    python -m anybn bench --json > results.json
    python -m anybn.bench.plot results.json bench.png

One group of bars per (op, shape), one bar per backend, its height the backend's median
time over the baseline's (PyTorch unless told otherwise) on a log scale, with a line at 1:
below it the backend is faster than the baseline. A bar whose row or baseline row has
bimodal samples (``"stability": "bimodal"``, see :func:`anybn.bench.timing.stability`) is
left out, as ``anybn bench`` prints no ratio for it, and the chart says how many.
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from os import PathLike
from typing import Any

__all__ = ["plot", "relative_times"]


def relative_times(report: dict[str, Any], baseline: str = "torch") -> tuple[dict[tuple[str, str, str], float], int]:
    """Each row's median over the baseline's of the same (op, shape), and how many were left out.

    Returns ``{(op, shape, backend): ratio}`` for every row but the baseline's, and the
    number of rows left out because their samples or the baseline's are bimodal.

    Raises ValueError when the report has no ``baseline`` results to divide by.
    """
    results = report["results"]
    base_rows = {(r["op"], r["shape"]): r for r in results if r["backend"] == baseline}
    if not base_rows:
        raise ValueError(f"plot: the report has no {baseline!r} results to compare with")
    ratio: dict[tuple[str, str, str], float] = {}
    left_out = 0
    for r in results:
        base = base_rows.get((r["op"], r["shape"]))
        if base is None or r["backend"] == baseline:
            continue
        if "bimodal" in (r.get("stability"), base.get("stability")):
            left_out += 1  # the median then says which rounds stalled, not how fast it is
            continue
        ratio[(r["op"], r["shape"], r["backend"])] = r["median_ms"] / base["median_ms"]
    return ratio, left_out


def plot(report: dict[str, Any] | str | PathLike[str], out: str | PathLike[str], *, baseline: str = "torch") -> None:
    """Write the chart of ``report`` (the ``--json`` output, or a path to it) to the PNG ``out``.

    Raises ValueError when the report has no ``baseline`` results to divide by.
    """
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

    if not isinstance(report, dict):
        with open(report) as f:
            report = json.load(f)
    assert isinstance(report, dict)
    results = report["results"]
    ratio, left_out = relative_times(report, baseline)
    compared = {(r["op"], r["shape"]) for r in results if r["backend"] == baseline}
    groups = [g for g in dict.fromkeys((r["op"], r["shape"]) for r in results) if g in compared]
    backends = [b for b in dict.fromkeys(r["backend"] for r in results) if b != baseline]

    width = 0.8 / max(1, len(backends))
    fig = Figure(figsize=(max(6.0, 1.1 * len(groups) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    for i, backend in enumerate(backends):
        xs = [g + (i - (len(backends) - 1) / 2) * width for g in range(len(groups))]
        heights = [ratio.get((op, shape, backend), float("nan")) for op, shape in groups]
        ax.bar(xs, heights, width, label=backend)
    ax.axhline(1.0, color="black", linewidth=1)
    ax.set_yscale("log")
    ax.set_xticks(range(len(groups)), [f"{op}\n{shape}" for op, shape in groups], fontsize=8)
    ax.set_ylabel(f"median time / {baseline}'s (log scale; below 1 is faster)")
    env = report.get("environment", {})
    ax.set_title(f"anybn {report.get('anybn', '')} bench, {report.get('dtype', '')}, "
                 f"{env.get('threads', '?')} threads, medians of {report.get('rounds', '?')} rounds",
                 fontsize=10)
    if left_out:
        ax.text(0.99, 0.98, f"{left_out} bar{'s' if left_out > 1 else ''} left out: bimodal samples",
                transform=ax.transAxes, ha="right", va="top", fontsize=8)
    fig.legend(loc="outside lower center", fontsize=8, ncols=max(1, len(backends)), frameon=False)
    fig.savefig(out, dpi=120)


def plot_sweep(report: dict[str, Any] | str | PathLike[str], out: str | PathLike[str], *,
               cache_bytes: Sequence[tuple[str, int]] = (("L2", 2 << 20), ("L3", 32 << 20))) -> None:
    """Write the size sweep of ``report`` (``anybn bench --sweep --json``) to the PNG ``out``.

    One column per op: ms per call (top) and GB/s of the op's minimal traffic (bottom)
    against the bytes of x, for every backend and for a copy of x timed in the same rounds.
    Dashed lines mark ``cache_bytes`` (name, bytes): where x stops fitting a cache level.
    """
    from matplotlib.figure import Figure

    if not isinstance(report, dict):
        with open(report) as f:
            report = json.load(f)
    assert isinstance(report, dict)
    results = report["results"]
    ops = list(dict.fromkeys(r["op"] for r in results))
    backends = list(dict.fromkeys(r["backend"] for r in results))
    copies = sorted(report["copies"], key=lambda c: c["nbytes"])
    fig = Figure(figsize=(4.2 * len(ops), 7.5), layout="constrained")
    axes = fig.subplots(2, len(ops), squeeze=False, sharex=True)
    for j, op in enumerate(ops):
        ms_ax, bw_ax = axes[0][j], axes[1][j]
        for backend in backends:
            rows = sorted((r for r in results if r["op"] == op and r["backend"] == backend),
                          key=lambda r: math.prod(r["dims"]))
            nbytes = [r["traffic_bytes"] / _traffic_factor(r) for r in rows]
            ms_ax.plot(nbytes, [r["median_ms"] for r in rows], "o-", label=backend)
            bw_ax.plot(nbytes, [r["gbps"] for r in rows], "o-", label=backend)
        ms_ax.plot([c["nbytes"] for c in copies], [c["median_ms"] for c in copies], "k.--", label="copy of x")
        bw_ax.plot([c["nbytes"] for c in copies], [c["gbps"] for c in copies], "k.--", label="copy of x")
        for ax in (ms_ax, bw_ax):
            ax.set_xscale("log", base=2)
            for name, size in cache_bytes:
                ax.axvline(size, color="grey", linestyle=":", linewidth=1)
                ax.text(size, 1.0, f" {name}", transform=ax.get_xaxis_transform(), va="top", fontsize=8)
        ms_ax.set_yscale("log")
        ms_ax.set_title(op)
        ms_ax.set_ylabel("ms per call")
        bw_ax.set_ylabel("GB/s (minimal traffic)")
        bw_ax.set_xlabel("bytes of x")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=len(labels), frameon=False)
    env = report.get("environment", {})
    fig.suptitle(f"anybn {report.get('anybn', '')} size sweep, {report.get('dtype', '')} NCHW, "
                 f"{env.get('threads', '?')} threads, medians of {report.get('rounds', '?')} rounds", fontsize=10)
    fig.savefig(out, dpi=110)


def _traffic_factor(row: dict[str, Any]) -> int:
    from .shapes import TRAFFIC

    return TRAFFIC[row["op"]]


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    sweep = "--sweep" in args
    if sweep:
        args.remove("--sweep")
    if len(args) != 2:
        print("usage: python -m anybn.bench.plot [--sweep] results.json out.png", file=sys.stderr)
        return 2
    (plot_sweep if sweep else plot)(args[0], args[1])
    return 0


if __name__ == "__main__":
    sys.exit(main())
