"""``python -m anybn bench``: anybn against the installed peers, timed in one run on this machine.

Every backend that is installed runs every (shape, op); a case that cannot run here is
skipped with its reason. Before timing, each case's output is checked against a float64
NumPy reference, so a fast wrong answer cannot pass for a result. Timing is in interleaved
rounds: each round runs every case of a shape once, and a copy of x's bytes, in an order
rotated by one from the round before, so that machine noise hits all of them alike; a
table of medians follows. See :mod:`anybn.bench.backends` for the backends,
:mod:`anybn.bench.shapes` for the byte counts and :mod:`anybn.bench.timing` for the copy
that "% copy" refers to.

Each row's per-round samples are judged by :func:`anybn.bench.timing.stability`: a row whose
samples are bimodal (two groups 2x or more apart, at least 2 rounds in each) gets no ratio
to PyTorch, and neither do the rows compared with a bimodal PyTorch row, since the median
then depends on which rounds stalled; a noisy row (the middle half of its rounds spread
more than 50 % of the median) gets its ratio marked ``?``. The JSON has ``stability`` and
``spread`` per row, ``vs_torch`` (None where no ratio is printed), ``vs_torch_raw`` (the
quotient of the medians, always) and ``vs_torch_flag`` (None, "noisy" or "bimodal").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import backends, cases, shapes, timing

__all__ = ["configure", "measure", "run", "table"]

DEFAULT_ROUNDS = 7
_MALLOC_HINT = (
    "hint: glibc page-faults fresh large outputs in at every call, which can dominate these "
    "timings; for steadier numbers start the process with "
    "MALLOC_MMAP_THRESHOLD_=1000000000 MALLOC_TRIM_THRESHOLD_=1000000000"
)


def _choices(kind: str, allowed: Sequence[str]):
    def parse(text: str) -> list[str]:
        names = [t.strip() for t in text.split(",") if t.strip()]
        unknown = [n for n in names if n not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {kind} {', '.join(unknown) or '(none given)'}; choose from {','.join(allowed)}"
            )
        return names

    return parse


def _shapes(text: str) -> list[shapes.Shape]:
    try:
        return [shapes.parse_shape(s) for s in text.split(",") if s.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the ``bench`` options to the subcommand's parser."""
    parser.description = (
        "Time anybn's batch norm (NumPy fast and generic paths, array_api_strict, Dask, CuPy) "
        "against PyTorch and naive NumPy on this machine: medians of interleaved rounds."
    )
    parser.epilog = (
        f"Rows whose rounds disagree are flagged: '! bimodal' (two groups of rounds "
        f"{timing.BIMODAL_GAP:g}x or more apart, {timing.MIN_MODE}+ rounds each) get no ratio to PyTorch "
        f"('\u2014'), '~ noisy' (the middle half of the rounds spreads more than "
        f"{100 * timing.NOISY_SPREAD:.0f}% of the median) get theirs marked '?'."
    )
    parser.add_argument("--shapes", type=_shapes, default=_shapes(",".join(shapes.DEFAULT_SHAPES)),
                        help="comma list of [layout:]NxC... shapes; the position of 'c' in the layout "
                             f"is the feature axis (default {','.join(shapes.DEFAULT_SHAPES)})")
    parser.add_argument("--dtype", choices=shapes.DTYPES, default="float32", help="default float32")
    parser.add_argument("--backend", type=_choices("backend", backends.BACKENDS),
                        default=list(backends.BACKENDS),
                        help=f"comma list of {','.join(backends.BACKENDS)} (default: all that are installed)")
    parser.add_argument("--ops", type=_choices("op", shapes.ALL_OPS), default=list(shapes.OPS),
                        help=f"comma list of {','.join(shapes.ALL_OPS)} (default: {','.join(shapes.OPS)}); "
                             "the _relu ops are BN fused with a ReLU, PyTorch's BN then its ReLU")
    parser.add_argument("--rounds", type=_positive, default=DEFAULT_ROUNDS,
                        help=f"interleaved rounds; the median is over these (default {DEFAULT_ROUNDS})")
    parser.add_argument("--threads", type=_positive, default=2,
                        help="threads for torch.set_num_threads, Dask, anybn's CPU fast path "
                             "(ANYBN_NUM_THREADS) and the reference copy (default 2)")
    parser.add_argument("--json", action="store_true",
                        help="write the results as JSON to stdout (the table is not printed)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars on stderr")
    parser.add_argument("--separate", action="store_true",
                        help="time each backend in a process of its own (the rounds still interleave within "
                             "it) and leave OMP_WAIT_POLICY as it is: no backend's thread pool shares the cores "
                             "with another's, so 2-thread ratios are fair to both sides")
    parser.add_argument("--repeats", type=_positive, default=1,
                        help="with --separate: run each backend's process this many times, the backends' "
                             "order reversed each time, and pool the samples of a row's processes (a machine "
                             "that drifts between processes then drifts for every side alike; default 1)")
    parser.add_argument("--spin", type=_positive, default=None, metavar="N",
                        help="one-process mode only: instead of OMP_WAIT_POLICY=PASSIVE, let the OpenMP "
                             "workers of both libraries spin N rounds after each parallel region before they "
                             "sleep (GOMP_SPINCOUNT=N; 10000 is some tens of microseconds): awake within a "
                             "timed sample, out of the other library's way between samples")
    parser.add_argument("--sweep", action="store_true",
                        help="the size sweep: float32 NCHW x from 64 KiB to 512 MiB (replaces --shapes; "
                             "backends numpy-fast and torch unless --backend is given); plot it with "
                             "python -m anybn.bench.plot --sweep results.json sweep.png")


def _environment(threads: int) -> dict[str, Any]:
    from importlib import metadata

    versions: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__}
    for name in ("torch", "dask", "array_api_strict", "numba", "cupy"):
        module = sys.modules.get(name)
        try:
            versions[name] = module.__version__ if module is not None else metadata.version(name)
        except (AttributeError, metadata.PackageNotFoundError):
            versions[name] = None
    return {
        "machine": platform.machine(),
        "processor": platform.processor() or None,
        "cpus": os.cpu_count(),
        "threads": threads,
        "malloc_thresholds": "MALLOC_MMAP_THRESHOLD_" in os.environ,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "gomp_spincount": os.environ.get("GOMP_SPINCOUNT"),
        "versions": versions,
    }


def measure(
    shape_specs: Sequence[str | shapes.Shape],
    ops: Sequence[str] = shapes.OPS,
    backend_names: Sequence[str] = backends.BACKENDS,
    *,
    dtype: str = "float32",
    rounds: int = DEFAULT_ROUNDS,
    threads: int = 2,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prepare, check and time every (shape, op, backend); return the results as plain data."""
    from .. import __version__
    from .._progress import progress

    parsed = [shapes.parse_shape(s) for s in shape_specs]
    prepared: dict[str, list[cases.Case]] = {}
    skipped: list[dict[str, str]] = []
    errors: dict[int, float] = {}
    todo = [(s, op, b) for s in parsed for op in ops for b in backend_names]
    for shape, op, backend in progress(todo, total=len(todo), desc="preparing", enabled=show_progress):
        try:
            case = cases.prepare(backend, shape, op, dtype, threads=threads)
        except cases.Unavailable as exc:
            skipped.append({"backend": backend, "shape": shape.spec, "op": op, "reason": str(exc)})
            continue
        errors[id(case)] = cases.check(case)
        prepared.setdefault(shape.spec, []).append(case)

    copies: dict[str, dict[str, Any]] = {}
    samples: dict[int, list[float]] = {}
    numbers: dict[int, int] = {}
    total = sum(rounds * (len(cs) + 1) for cs in prepared.values())
    bar = progress(range(total), total=total, desc="timing", enabled=show_progress)
    for spec, shape_cases in prepared.items():
        # The copy (the yardstick of "% copy", split over Python threads) is timed in rounds of
        # its own before the ops' rounds: interleaved with them, its Python threads left
        # numba's OpenMP workers asleep or displaced, and the next op paid for it (4096x1024
        # float32 training forward on 2 threads, after each such copy 1.09 ms, after a
        # single-thread copy of the same bytes 0.88, alone 0.72; PyTorch 1.11 / 1.12 / 1.05).
        with timing.CopyTimer(shape_cases[0].nbytes, threads) as copy:
            copy_number = timing.calibrate(copy.timer)
            copy_timer = copy.timer(copy_number)
            got: dict[str, list[float]] = {"copy": []}
            for _ in range(rounds):
                got["copy"].append(copy_timer())
                next(bar, None)
        timers = {}
        for case in shape_cases:
            numbers[id(case)] = timing.calibrate(case.timer)
            timers[str(id(case))] = case.timer(numbers[id(case)])
        got.update({k: [] for k in timers})
        for key in timing.schedule(list(timers), rounds):
            got[key].append(timers[key]())
            next(bar, None)
        for case in shape_cases:
            samples[id(case)] = got[str(id(case))]
        copy_s = statistics.median(got["copy"])
        copies[spec] = {"shape": spec, "nbytes": copy.nbytes, "traffic_bytes": copy.traffic,
                        "median_ms": copy_s * 1e3, "gbps": copy.traffic / copy_s / 1e9,
                        "threads": threads, "calls_per_sample": copy_number,
                        "samples_ms": [t * 1e3 for t in got["copy"]], **_stability_fields(got["copy"])}
    for _ in bar:  # drain, so the bar closes
        pass

    results: list[dict[str, Any]] = []
    for spec, shape_cases in prepared.items():
        for case in shape_cases:
            t = statistics.median(samples[id(case)])
            gbps = case.traffic / t / 1e9
            results.append({
                "shape": spec, "dims": list(case.shape.dims), "axis": case.shape.axis,
                "op": case.op, "backend": case.backend, "path": case.path, "device": case.device,
                "median_ms": t * 1e3, "min_ms": min(samples[id(case)]) * 1e3,
                "samples_ms": [s * 1e3 for s in samples[id(case)]],
                "calls_per_sample": numbers[id(case)],
                **_stability_fields(samples[id(case)]),
                "traffic_bytes": case.traffic, "gbps": gbps,
                "copy_fraction": gbps / copies[spec]["gbps"] if case.device == "cpu" else None,
                "max_error": errors[id(case)], "accurate": errors[id(case)] <= cases.tolerance(dtype),
            })
    _add_ratios(results)
    return {
        "anybn": __version__,
        "dtype": dtype,
        "rounds": rounds,
        "tolerance": cases.tolerance(dtype),
        "stability_rule": {"bimodal_gap": timing.BIMODAL_GAP, "min_mode": timing.MIN_MODE,
                           "noisy_spread": timing.NOISY_SPREAD},
        "environment": _environment(threads),
        "copies": list(copies.values()),
        "results": results,
        "skipped": skipped,
    }


def _stability_fields(samples: Sequence[float]) -> dict[str, Any]:
    verdict = timing.stability(samples)
    return {"stability": verdict.verdict, "spread": verdict.spread,
            "stability_note": verdict.describe(len(samples))}


_SEVERITY = {"stable": 0, "noisy": 1, "bimodal": 2}


def _add_ratios(results: list[dict[str, Any]]) -> None:
    """Set each row's time over the peer's: ``vs_torch`` only where both medians hold up.

    ``vs_torch_raw`` is the quotient of the medians whenever the peer ran; ``vs_torch_flag``
    the worse verdict of the two rows when it is not "stable"; ``vs_torch`` is None when
    that verdict is "bimodal" (the ratio then says which rounds stalled).
    """
    peer = {(r["shape"], r["op"]): r for r in results if r["backend"] == backends.PEER}
    for r in results:
        base = peer.get((r["shape"], r["op"]))
        if base is None:
            r.update(vs_torch=None, vs_torch_raw=None, vs_torch_flag=None)
            continue
        raw = r["median_ms"] / base["median_ms"]
        worst = max(r["stability"], base["stability"], key=_SEVERITY.__getitem__)
        r.update(vs_torch=None if worst == "bimodal" else raw, vs_torch_raw=raw,
                 vs_torch_flag=None if worst == "stable" else worst)


def _ms(value: float) -> str:
    # four significant figures down to 0.1 us, without switching to exponents
    for limit, spec in ((100, ".1f"), (10, ".2f"), (1, ".3f")):
        if value >= limit:
            return format(value, spec)
    return format(value, ".4f")


def _ratio(row: dict[str, Any]) -> str:
    if row["vs_torch_raw"] is None:
        return "-"  # no peer to compare with
    if row["vs_torch"] is None:
        return "\u2014"  # withheld: a bimodal row on either side
    return format(row["vs_torch"], ".3g") + ("?" if row["vs_torch_flag"] == "noisy" else "")


_FLAGS = {"noisy": "  ~ noisy", "bimodal": "  ! bimodal"}


def table(report: dict[str, Any]) -> str:
    """The results as a text table, one block per shape, with the copy as its first line."""
    env = report["environment"]
    lines = [
        f"anybn {report['anybn']} bench: {report['dtype']}, medians of {report['rounds']} interleaved "
        f"rounds, {env['threads']} threads, OMP_WAIT_POLICY={env.get('omp_wait_policy') or 'unset'}, "
        + (f"GOMP_SPINCOUNT={env['gomp_spincount']}, " if env.get("gomp_spincount") else "")
        + f"glibc malloc thresholds {'set' if env.get('malloc_thresholds') else 'unset'}",
        "ms: per call; GB/s: minimal traffic (train 3x, eval 2x, backward 5x the bytes of x); "
        "% copy: of the copy line's GB/s; spread: (75th - 25th percentile) / median of the rounds; "
        "/ torch: time over PyTorch's",
        "",
        f"{'shape':<20}{'op':<14}{'backend':<18}{'path':<11}{'ms':>9}{'GB/s':>8}{'% copy':>8}{'spread':>8}"
        f"{'/ torch':>9}",
    ]
    copies = {c["shape"]: c for c in report["copies"]}
    inaccurate = False
    unstable: list[str] = []
    for spec, copy in copies.items():
        lines.append(f"{spec:<20}{'copy':<14}{'np.copyto':<18}{'':<11}{_ms(copy['median_ms']):>9}"
                     f"{copy['gbps']:>8.1f}{100:>7d}%{_percent(copy.get('spread')):>8}{'':>9}"
                     f"{_FLAGS.get(copy.get('stability', 'stable'), '')}")
        if copy.get("stability", "stable") != "stable":
            unstable.append(f"  copy {spec}: {copy['stability_note']}")
        for r in (r for r in report["results"] if r["shape"] == spec):
            mark = _FLAGS.get(r["stability"], "")
            if not r["accurate"]:
                mark += "  ! inaccurate"
                inaccurate = True
            if r["stability"] != "stable":
                unstable.append(f"  {r['backend']} {r['op']} {spec}: {r['stability_note']}")
            pct = "-" if r["copy_fraction"] is None else f"{100 * r['copy_fraction']:.0f}%"
            lines.append(f"{'':<20}{r['op']:<14}{r['backend']:<18}{r['path']:<11}{_ms(r['median_ms']):>9}"
                         f"{r['gbps']:>8.1f}{pct:>8}{_percent(r['spread']):>8}{_ratio(r):>9}{mark}")
    if inaccurate:
        lines.append(f"! inaccurate: max error above {report['tolerance']:g} of the largest float64 "
                     "reference value; that time is not a time for batch norm")
    if unstable:
        rule = report.get("stability_rule", {})
        lines += [
            "",
            f"! bimodal: the rounds form two groups {rule.get('bimodal_gap', timing.BIMODAL_GAP):g}x or more "
            f"apart, {rule.get('min_mode', timing.MIN_MODE)} or more rounds each; the median depends on how "
            "many rounds stalled, so no ratio (\u2014) where either side is bimodal",
            f"~ noisy: the middle half of the rounds spreads more than "
            f"{100 * rule.get('noisy_spread', timing.NOISY_SPREAD):.0f}% of the median; ratios "
            "involving it are marked ?",
            "unstable rows (rerun on a quieter machine, or with more --rounds):",
            *unstable,
        ]
    reasons: dict[tuple[str, str], None] = {}
    for s in report["skipped"]:
        reasons.setdefault((s["backend"], s["reason"]), None)
    if reasons:
        lines.append("")
        lines.extend(f"skipped {backend}: {reason}" for backend, reason in reasons)
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.0f}%"


_SEPARATE_CHILD = "ANYBN_BENCH_SEPARATE"


def measure_separately(
    shape_specs: Sequence[str | shapes.Shape],
    ops: Sequence[str],
    backend_names: Sequence[str],
    *,
    dtype: str = "float32",
    rounds: int = DEFAULT_ROUNDS,
    threads: int = 2,
    repeats: int = 1,
) -> dict[str, Any]:
    """As :func:`measure`, with each backend in a fresh interpreter of its own.

    In one process, the OpenMP pools of two backends (numba's for anybn's fast path,
    PyTorch's own) take turns on the same cores: spinning workers of one slow the other,
    sleeping ones (``OMP_WAIT_POLICY=PASSIVE``) pay a wake-up per pass. Here each process
    holds one pool, and the ratios to PyTorch divide medians of different processes.

    A shared machine drifts between processes (on the 2-core VMs of this project the same
    process measured the same case up to 1.8x apart half an hour later), so ``repeats``
    runs every backend's process that many times, the order of the backends reversed at
    each repetition (A B, B A, A B, ...): a drift then falls on every side alike. Each row's
    samples from all its processes are pooled, and its median, spread and stability are
    those of the pool (a drift larger than 2x shows as bimodal). The copies likewise.
    """
    import subprocess

    if repeats < 1:
        raise ValueError(f"repeats must be a positive int, got {repeats}")
    specs = ",".join(s.spec if isinstance(s, shapes.Shape) else str(s) for s in shape_specs)
    env = dict(os.environ, **{_SEPARATE_CHILD: "1"})
    reports = []
    for repeat in range(repeats):
        for backend in backend_names if repeat % 2 == 0 else list(reversed(backend_names)):
            cmd = [sys.executable, "-m", "anybn", "bench", "--backend", backend, "--shapes", specs, "--ops",
                   ",".join(ops), "--dtype", dtype, "--rounds", str(rounds), "--threads", str(threads), "--json",
                   "--no-progress"]
            done = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if done.returncode not in (0, 1):  # 1: a wrong result, reported in the rows
                raise RuntimeError(f"anybn bench --backend {backend} failed: {done.stderr[-2000:]}")
            reports.append(json.loads(done.stdout))
    results = _pooled([row for r in reports for row in r["results"]], ("shape", "op", "backend"))
    copies = _pooled([c for r in reports for c in r["copies"]], ("shape",))
    for copy in copies:
        copy["gbps"] = copy["traffic_bytes"] / copy["median_ms"] / 1e6
    copy_gbps = {c["shape"]: c["gbps"] for c in copies}
    for row in results:
        row["gbps"] = row["traffic_bytes"] / row["median_ms"] / 1e6
        if row.get("copy_fraction") is not None and row["shape"] in copy_gbps:
            row["copy_fraction"] = row["gbps"] / copy_gbps[row["shape"]]
        row.pop("vs_torch", None)  # each process's ratios were to a peer it did not hold: redo them
    _add_ratios(results)
    report = dict(reports[0])
    skipped = {(s["backend"], s["shape"], s["op"]): s for r in reports for s in r["skipped"]}
    report.update(results=results, copies=copies, skipped=list(skipped.values()), separate=True,
                  repeats=repeats)
    return report


def _pooled(rows: list[dict[str, Any]], key: tuple[str, ...]) -> list[dict[str, Any]]:
    """Rows with the same ``key`` fields merged: their samples pooled, the statistics redone."""
    merged: dict[tuple[Any, ...], dict[str, Any]] = {}
    for row in rows:
        k = tuple(row[f] for f in key)
        if k not in merged:
            merged[k] = dict(row, samples_ms=list(row.get("samples_ms", [])), processes=1,
                             process_medians_ms=[row["median_ms"]])
            continue
        m = merged[k]
        m["samples_ms"] += row.get("samples_ms", [])
        m["processes"] += 1
        m["process_medians_ms"].append(row["median_ms"])
        if "max_error" in row:
            m["max_error"] = max(m["max_error"], row["max_error"])
            m["accurate"] = m["accurate"] and row["accurate"]
    for m in merged.values():
        if m["processes"] > 1 and m["samples_ms"]:
            m["median_ms"] = statistics.median(m["samples_ms"])
            if "min_ms" in m:
                m["min_ms"] = min(m["samples_ms"])
            m.update(_stability_fields(m["samples_ms"]))
    return list(merged.values())


def _wait_settings(spin: int | None) -> dict[str, str]:
    """The OpenMP settings of the one-process mode: sleeping workers (``PASSIVE``), or with
    ``spin`` workers that spin that many rounds after each region (``GOMP_SPINCOUNT``)."""
    if spin is None:
        return {"OMP_WAIT_POLICY": "PASSIVE"}
    return {"GOMP_SPINCOUNT": str(spin)}


def run(args: argparse.Namespace) -> int:
    """Run the benchmark the parsed ``args`` ask for; 1 when an anybn backend got a wrong answer."""
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # glibc reads these at start-up only: advise rather than re-exec behind the user's back
        print(_MALLOC_HINT, file=sys.stderr)
    # PyTorch's OpenMP workers spin after each call and slow whatever runs next in a round
    # (8-48 ms stalls of every torch call were seen, uniform across rounds, so no spread
    # test catches them): make them sleep. libgomp reads this when torch loads; an
    # explicit setting is kept.
    separate = args.separate or os.environ.get(_SEPARATE_CHILD) == "1"
    if args.spin is not None and separate:
        print("anybn bench: --spin is for the one-process mode (--separate leaves the wait policy alone)",
              file=sys.stderr)
        return 2
    if "torch" not in sys.modules and not separate:
        for name, value in _wait_settings(args.spin).items():
            os.environ.setdefault(name, value)
    shape_specs, backend_names = args.shapes, args.backend
    if args.sweep:
        shape_specs = list(shapes.SWEEP_SHAPES)
        if backend_names == list(backends.BACKENDS):  # not narrowed by the user
            backend_names = ["numpy-fast", "torch"]
    if args.repeats > 1 and not args.separate:
        print("anybn bench: --repeats needs --separate", file=sys.stderr)
        return 2
    if args.separate:
        report = measure_separately(shape_specs, args.ops, backend_names, dtype=args.dtype, rounds=args.rounds,
                                    threads=args.threads, repeats=args.repeats)
    else:
        report = measure(shape_specs, args.ops, backend_names, dtype=args.dtype, rounds=args.rounds,
                         threads=args.threads, show_progress=not args.no_progress)
    report["sweep"] = bool(args.sweep)
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        print(table(report))
    wrong = [f"{r['backend']} {r['op']} {r['shape']}" for r in report["results"]
             if not r["accurate"] and r["backend"] in backends.ANYBN_BACKENDS]
    if wrong:
        print(f"anybn bench: anybn's result differs from the float64 reference: {'; '.join(wrong)}",
              file=sys.stderr)
        return 1
    return 0
