"""Command line: ``python -m anybn check``, ``demo``, ``bench``, and ``--version``.

Nothing in the library imports this module; it may import any installed backend because
the user asked it to run.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import __version__, testing
from .functional import batch_norm_backward, batch_norm_eval, batch_norm_train

CHECK_TOLERANCE = 1e-4  # max |error| of float32 results of O(1) against float64


def _inputs(shape: tuple[int, ...]) -> tuple[np.ndarray, ...]:
    """float32 x ~ 3 + 2 N(0, 1), dy ~ N(0, 1), weight and bias spread over the features."""
    rng = np.random.default_rng(0)
    x = (3.0 + 2.0 * rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[1]
    w = np.linspace(0.5, 1.5, c).astype(np.float32)
    b = np.linspace(-1.0, 1.0, c).astype(np.float32)
    return x, dy, w, b


def _check_one(be: testing.Backend, x: np.ndarray, dy: np.ndarray, w: np.ndarray, b: np.ndarray) -> dict[str, float]:
    """Max |error| of train y, backward dx and eval y on ``be`` against :mod:`anybn.testing`'s reference."""
    mean, var = testing.reference_moments(x, axis=1)
    want = {
        "train": testing.reference_train(x, w, b),
        "backward": testing.reference_backward(dy, x, w)[0],
        "eval": testing.reference_eval(x, mean, var, w, b),
    }
    xa, dya, wa, ba = (be.asarray(a) for a in (x, dy, w, b))
    with be.environment():
        y, saved = batch_norm_train(xa, wa, ba)
        dx, _, _ = batch_norm_backward(dya, saved)
        ye = batch_norm_eval(xa, be.asarray(mean, "float32"), be.asarray(var, "float32"), wa, ba)
    got = {"train": y, "backward": dx, "eval": ye}
    return {op: float(np.max(np.abs(be.to_numpy(got[op], "float64") - want[op]))) for op in want}


def check(backends: Sequence[str], shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """Run train, backward and eval on each backend of :mod:`anybn.testing` against its float64 reference.

    Returns one row per backend: ``status`` "ok" with the max |error| of ``train``,
    ``backward`` and ``eval``, "skipped: <why>" where it cannot run here, or
    "error: <exception>".
    """
    x, dy, w, b = _inputs(shape)
    rows: list[dict[str, Any]] = []
    for name in backends:
        try:
            be = testing.backend(name)
        except (testing.Unavailable, ValueError) as exc:
            rows.append({"backend": name, "status": f"skipped: {exc}"})
            continue
        try:
            rows.append({"backend": name, "status": "ok", **_check_one(be, x, dy, w, b)})
        except Exception as exc:  # report, do not crash: this is a diagnostic
            rows.append({"backend": name, "status": f"error: {type(exc).__name__}: {exc}"})
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anybn", description=f"anybn {__version__}")
    parser.add_argument("--version", action="version", version=f"anybn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    p_check = sub.add_parser("check", help="check anybn on every installed backend against float64")
    p_check.add_argument("--shape", default="64,16,32", help="input shape N,C,L (default 64,16,32)")
    # demo and bench live in their own packages; they are imported only when asked for.
    p_demo = sub.add_parser("demo", help="reproduce Figure 1 of Ioffe & Szegedy (2015) on MNIST or digits")
    p_bench = sub.add_parser("bench", help="time anybn against the installed peers on this machine")
    if argv is None:
        argv = sys.argv[1:]
    command = next((a for a in argv if not a.startswith("-")), None)
    if command == "demo":
        from .demo import cli as demo_cli

        demo_cli.configure(p_demo)
    elif command == "bench":
        from .bench import cli as bench_cli

        bench_cli.configure(p_bench)
    args = parser.parse_args(argv)

    if args.command == "demo":
        return demo_cli.run(args)
    if args.command == "bench":
        return bench_cli.run(args)

    if args.command == "check":
        shape = tuple(int(s) for s in args.shape.split(","))
        rows = check(testing.BACKENDS, shape)
        print(f"anybn {__version__}: float32 input of shape {shape}, max |error| vs float64")
        print(f"{'backend':<26}{'train y':>12}{'backward dx':>14}{'eval y':>12}")
        failed = False
        for r in rows:
            if r["status"] == "ok":
                bad = max(r["train"], r["backward"], r["eval"]) > CHECK_TOLERANCE
                failed |= bad
                print(f"{r['backend']:<26}{r['train']:>12.1e}{r['backward']:>14.1e}{r['eval']:>12.1e}"
                      + ("  FAIL" if bad else ""))
            else:
                failed |= r["status"].startswith("error")
                print(f"{r['backend']:<26}  {r['status']}")
        return 1 if failed else 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
