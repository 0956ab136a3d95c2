"""``python -m anybn demo``: the options, the run, the printed table and the files written."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .data import Dataset, load_digits, load_mnist
from .experiment import Config, import_backend, run_experiment
from .parallel import mpi_communicator, shares
from .renorm import SETTINGS, RenormConfig, plot_renorm, run_renorm_experiment

__all__ = ["configure", "run"]

_DEFAULTS = Config()
RESULTS_NAME = "results.json"
FIGURE_NAME = "figure1.png"
RENORM_FIGURE_NAME = "renorm.png"
_RENORM_DEFAULTS = RenormConfig()


def configure(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to the ``demo`` sub-parser."""
    parser.description = (
        "Reproduce Figure 1 of Ioffe & Szegedy (2015): a 3x100 sigmoid MLP trained with and "
        "without batch norm, from the same weights on the same minibatches. Writes "
        f"{RESULTS_NAME} and {FIGURE_NAME} to --out."
    )
    parser.add_argument("--data", metavar="DIR", default=None,
                        help="directory of MNIST IDX files (t10k-* and/or train-*, raw or .gz); "
                             "default: scikit-learn's bundled 8x8 digits")
    parser.add_argument("--backend", default="numpy",
                        help="array library: numpy, cupy, torch, jax, array_api_strict, or any "
                             "importable array-API module (default numpy)")
    parser.add_argument("--device", default=None,
                        help="device in the backend's terms, e.g. cuda:0 for torch (default: the backend's default)")
    parser.add_argument("--experiment", choices=("figure1", "renorm"), default="figure1",
                        help="figure1: Figure 1 of the BN paper (default); renorm: BN against batch "
                             "renormalization on 2-class minibatches, 3 seeds (Ioffe 2017), writes "
                             f"{RESULTS_NAME} and {RENORM_FIGURE_NAME}")
    parser.add_argument("--steps", type=int, default=None,
                        help=f"SGD steps, minibatches of {_DEFAULTS.batch_size} (default {_DEFAULTS.steps}; "
                             f"{_RENORM_DEFAULTS.steps} for --experiment renorm)")
    parser.add_argument("--lr", type=float, default=_DEFAULTS.lr, help=f"learning rate (default {_DEFAULTS.lr})")
    parser.add_argument("--seed", type=int, default=_DEFAULTS.seed,
                        help=f"seed of the initial weights and the minibatches (default {_DEFAULTS.seed})")
    parser.add_argument("--init-std", type=float, default=_DEFAULTS.init_std,
                        help=f"standard deviation of the Gaussian initial weights (default {_DEFAULTS.init_std})")
    parser.add_argument("--eval-every", type=int, default=0,
                        help="steps between test evaluations (default: steps // 100)")
    parser.add_argument("--dtype", choices=("float32", "float64"), default=_DEFAULTS.dtype,
                        help=f"floating dtype of the networks (default {_DEFAULTS.dtype})")
    parser.add_argument("--threads", type=int, default=1,
                        help="threads for the CPU math libraries (BLAS, OpenMP) during training; 0 leaves "
                             "their defaults (default 1: the matrices are small, and extra threads only "
                             "contend for the cores)")
    parser.add_argument("--out", metavar="DIR", default="demo-output",
                        help="output directory (default demo-output)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--sync", action="store_true",
                        help="train data-parallel over the MPI ranks (mpiexec -n K python -m anybn demo "
                             "--sync): each minibatch split unevenly across ranks, synchronized batch norm, "
                             "summed gradients; rank 0 evaluates and writes the files")
    parser.add_argument("--save-params", metavar="PATH", default=None,
                        help="also write the final parameters of both networks to PATH (.npz, float64), "
                             "to compare runs")


def run(args: argparse.Namespace) -> int:
    """Run the demo for parsed ``args``: print the split and the table, write the files.

    Returns 0, or 2 after a message on stderr when an option, the data or the backend is
    unusable (checked before training starts).
    """
    sync = getattr(args, "sync", False)
    if sync and getattr(args, "experiment", "figure1") != "figure1":
        print("anybn demo: --sync runs --experiment figure1 only", file=sys.stderr)
        return 2
    if getattr(args, "experiment", "figure1") == "renorm":
        return _run_renorm(args)
    comm = None
    try:
        steps = _DEFAULTS.steps if args.steps is None else args.steps
        config = Config(steps=steps, lr=args.lr, seed=args.seed, init_std=args.init_std,
                        eval_every=args.eval_every, dtype=args.dtype)
        import_backend(args.backend)
        comm = mpi_communicator(args.backend) if sync else None
        data = load_digits() if args.data is None else load_mnist(args.data)
    except ValueError as exc:
        if comm is None or comm.rank == 0:  # every rank meets the same error: one message
            print(f"anybn demo: {exc}", file=sys.stderr)
        return 2
    lead = comm is None or comm.rank == 0  # only rank 0 prints and writes
    if lead:
        _print_split(data)
        print(f"backend {args.backend}, {config.dtype}; {config.steps} SGD steps, lr {config.lr}, minibatches "
              f"of {config.batch_size}, initial weights N(0, {config.init_std}^2), seed {config.seed}")
    if lead and comm is not None:
        print(f"data-parallel over {comm.size} MPI ranks: rows per rank of each minibatch "
              f"{shares(config.batch_size, comm.size)}")

    start = time.perf_counter()
    results = run_experiment(data, config, backend=args.backend, device=args.device, threads=args.threads,
                             show_progress=not args.no_progress, comm=comm,
                             save_params=getattr(args, "save_params", None))
    elapsed = time.perf_counter() - start
    if results is None:  # a rank other than 0 of --sync
        return 0

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    from .figure import plot_figure1

    figure_path = plot_figure1(results, out / FIGURE_NAME)
    print()
    print(format_table(results))
    print()
    print(f"trained in {elapsed:.1f} s; wrote {results_path} and {figure_path}")
    return 0


def _run_renorm(args: argparse.Namespace) -> int:
    """``--experiment renorm``: BN and batch renorm on non-i.i.d. minibatches, over 3 seeds."""
    try:
        steps = _RENORM_DEFAULTS.steps if args.steps is None else args.steps
        config = RenormConfig(steps=steps, lr=args.lr, init_std=args.init_std, dtype=args.dtype,
                              seeds=tuple(args.seed + i for i in range(3)))
        import_backend(args.backend)
        data = load_digits() if args.data is None else load_mnist(args.data)
    except ValueError as exc:
        print(f"anybn demo: {exc}", file=sys.stderr)
        return 2
    _print_split(data)
    print(f"backend {args.backend}, {config.dtype}; {config.steps} SGD steps, lr {config.lr}, minibatches of "
          f"{config.batch_size} ({config.classes_per_batch} classes each for *_noniid), seeds {list(config.seeds)}")
    start = time.perf_counter()
    results = run_renorm_experiment(data, config, backend=args.backend, device=args.device, threads=args.threads,
                                    show_progress=not args.no_progress)
    elapsed = time.perf_counter() - start
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_NAME
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    figure_path = plot_renorm(results, out / RENORM_FIGURE_NAME)
    print()
    print(f"{'test accuracy (running statistics)':<36}" + "".join(f"{'seed ' + str(s):>10}" for s in config.seeds)
          + f"{'mean':>10}")
    for setting in SETTINGS:
        values = results["accuracy"][setting]
        print(f"{setting:<36}" + "".join(f"{v:>10.4f}" for v in values) + f"{results['mean'][setting]:>10.4f}")
    print()
    print(f"trained in {elapsed:.1f} s; wrote {results_path} and {figure_path}")
    return 0


def _print_split(data: Dataset) -> None:
    d = data.describe()
    print(f"data: {d['name']} from {d['source']}: {d['train']} train / {d['test']} test images, "
          f"{d['features']} pixels in [0, 1], split seed {d['split_seed']}")


def _index_near(steps: list[int], target: float) -> int:
    return min(range(len(steps)), key=lambda i: abs(steps[i] - target))


def format_table(results: dict[str, Any]) -> str:
    """The printed summary: test accuracy at a few steps, the final accuracies, and the
    median input to the tracked sigmoid."""
    curves, bands, final = results["curves"], results["percentiles"], results["final"]
    steps = curves["bn"]["step"]
    picks = sorted({_index_near(steps, f * steps[-1]) for f in (0.02, 0.1, 0.3)})
    picks = [i for i in picks if i != len(steps) - 1]
    head = f"{'test accuracy':<22}" + "".join(f"{'step ' + str(steps[i]):>12}" for i in picks) + f"{'final':>12}"
    blank = " " * 12 * len(picks)
    rows = [
        head,
        f"{'without BN':<22}" + "".join(f"{curves['plain']['test_accuracy'][i]:>12.4f}" for i in picks)
        + f"{final['plain']:>12.4f}",
        f"{'with BN, running avg':<22}" + "".join(f"{curves['bn']['test_accuracy'][i]:>12.4f}" for i in picks)
        + f"{final['bn']['running']:>12.4f}",
        f"{'with BN, population':<22}" + blank + f"{final['bn']['population']:>12.4f}",
    ]
    unit = results.get("sigmoid_unit", {})
    rows += [
        "",
        f"median input to sigmoid {unit.get('index', '?')} of hidden layer {unit.get('layer', '?')} "
        "(over the test set)",
        f"{'':<22}{'step 0':>12}{'final':>12}{'min':>12}{'max':>12}",
    ]
    for name, label in (("plain", "without BN"), ("bn", "with BN")):
        p50 = bands[name]["p50"]
        rows.append(f"{label:<22}{p50[0]:>12.3f}{p50[-1]:>12.3f}{min(p50):>12.3f}{max(p50):>12.3f}")
    return "\n".join(rows)
