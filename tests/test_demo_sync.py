"""``python -m anybn demo --sync``: the data-parallel demo against the single-process run.

The split rule and the gradient all-reduce are tested in-process with thread ranks
(tests/sync_workers/fake.py); the whole demo runs under ``mpiexec -n 3`` in a subprocess
with a timeout, and its float64 parameters after 300 steps must equal the single-process
run's to 1e-9 (relative), its float32 test accuracies within a few predictions.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from anybn import cli
from anybn.demo import data as demo_data
from anybn.demo.experiment import Config, run_experiment
from anybn.demo.mlp import MLP, init_weights, softmax_cross_entropy
from anybn.demo.parallel import all_reduce_gradients, share, shares
from anybn.distributed import synchronize
from sync_workers.fake import run_ranks

ROOT = Path(__file__).resolve().parents[1]
MPI_TIMEOUT_S = 300
RTOL = 1e-9
FEW_PREDICTIONS = 3  # float32: test accuracies may differ by this many of the test images


@pytest.fixture(scope="module")
def digits() -> demo_data.Dataset:
    pytest.importorskip("sklearn", reason="scikit-learn is not installed (pip install anybn[demo])")
    return demo_data.load_digits()


def _max_relative_difference(got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> tuple[float, str]:
    """The largest max|got - want| / max|want| over the arrays, and the array where it is."""
    assert set(got) == set(want), f"parameter names differ: {sorted(set(got) ^ set(want))}"
    worst, where = 0.0, ""
    for name, w in want.items():
        diff = float(np.max(np.abs(got[name] - w))) / max(float(np.max(np.abs(w))), np.finfo(np.float64).tiny)
        if diff >= worst:
            worst, where = diff, name
    return worst, where


def _load(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


# -- the split ------------------------------------------------------------------------------


def test_shares_are_uneven_contiguous_and_cover_the_minibatch():
    assert shares(60, 1) == [60]
    assert shares(60, 2) == [20, 40]
    assert shares(60, 3) == [10, 20, 30]
    assert shares(60, 6) == [2, 4, 6, 8, 10, 30]
    assert shares(5, 3) == [0, 0, 5]
    for size in range(1, 13):
        for batch in (1, 7, 60, 61):
            bounds = [share(batch, k, size) for k in range(size)]
            assert bounds[0][0] == 0 and bounds[-1][1] == batch
            assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:])), bounds
            counts = shares(batch, size)
            if batch >= size * (size + 1) // 2:
                assert len(set(counts)) == size, f"batch {batch} on {size} ranks: {counts} are not all different"


@pytest.mark.parametrize("batch, rank, size", [(0, 0, 1), (60, 3, 3), (60, -1, 3), (60, 0, 0)])
def test_share_rejects_impossible_splits(batch, rank, size):
    with pytest.raises(ValueError, match="share: need batch >= 1"):
        share(batch, rank, size)


# -- the loss and the gradient all-reduce ---------------------------------------------------


def test_loss_terms_over_the_global_size_sum_to_the_mean_loss():
    rng = np.random.default_rng(0)
    logits, labels = rng.normal(size=(60, 10)), rng.integers(0, 10, 60)
    # independent: plain float64 log-softmax over the whole minibatch
    log_p = logits - logits.max(axis=1, keepdims=True)
    log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
    want_loss = -log_p[np.arange(60), labels].mean()
    want_grad = (np.exp(log_p) - np.eye(10)[labels]) / 60
    parts = [softmax_cross_entropy(logits[a:b], labels[a:b], total=60) for a, b in (share(60, k, 3) for k in range(3))]
    np.testing.assert_allclose(sum(float(loss) for loss, _ in parts), want_loss, rtol=1e-13)
    np.testing.assert_allclose(np.concatenate([g for _, g in parts]), want_grad, rtol=1e-13, atol=1e-17)
    empty_loss, empty_grad = softmax_cross_entropy(logits[:0], labels[:0], total=60)
    assert float(empty_loss) == 0.0 and empty_grad.shape == (0, 10)


@pytest.mark.parametrize("batch_norm", [True, False])
def test_summed_gradients_equal_the_single_process_gradients(batch_norm):
    rng = np.random.default_rng(1)
    weights = init_weights((6, 5, 4, 3), rng=rng, std=0.7)
    x, labels = rng.normal(1.0, 2.0, size=(12, 6)), rng.integers(0, 3, 12)
    whole = MLP([w.copy() for w in weights], batch_norm=batch_norm)
    _, dlogits = softmax_cross_entropy(whole(x), labels)
    whole.backward(dlogits)

    def rank(comm):
        net = MLP([w.copy() for w in weights], batch_norm=batch_norm)
        if batch_norm:
            synchronize(net, comm)
        start, stop = share(12, comm.rank, comm.size)
        loss, dlogits = softmax_cross_entropy(net(x[start:stop]), labels[start:stop], total=12)
        net.backward(dlogits)
        loss = all_reduce_gradients(net, comm, loss)
        calls = list(comm.calls)
        return net, float(loss), calls

    results = run_ranks(3, rank)
    for r, result in enumerate(results):
        assert not isinstance(result, BaseException), f"rank {r}: {result!r}"
        net, loss, calls = result
        # one all-reduce for every gradient; each synchronized BN adds 2 all-gathers forward, 1 all-reduce backward
        layers = len(net.norms)
        assert calls == ["all_gather"] * 2 * layers + ["all_reduce_sum"] * (layers + 1), calls
        np.testing.assert_allclose(loss, float(softmax_cross_entropy(whole(x), labels)[0]), rtol=1e-12)
        for got, want in zip(net.grad_weights, whole.grad_weights):
            np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
        for got, want in zip(net.grad_biases, whole.grad_biases):
            assert (got is None) == (want is None)
            if want is not None:
                np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
        for got, want in zip(net.norms, whole.norms):
            np.testing.assert_allclose(got.grad_weight, want.grad_weight, rtol=1e-10, atol=1e-14)
            np.testing.assert_allclose(got.grad_bias, want.grad_bias, rtol=1e-10, atol=1e-14)


def test_all_reduce_gradients_needs_a_backward_pass():
    net = MLP(init_weights((4, 3, 2), rng=np.random.default_rng(0), std=0.5), batch_norm=True)
    with pytest.raises(ValueError, match="a batch norm has no gradients"):
        all_reduce_gradients(net, None, np.float64(0.0))


# -- the experiment with thread ranks -------------------------------------------------------


def test_thread_ranks_train_the_single_process_networks(digits, tmp_path):
    config = Config(steps=60, eval_every=30, dtype="float64")
    single = run_experiment(digits, config, threads=0, save_params=tmp_path / "single.npz")

    def rank(comm):
        return run_experiment(digits, config, threads=0, comm=comm, save_params=tmp_path / f"rank{comm.rank}.npz")

    results = run_ranks(3, rank)
    for r, result in enumerate(results):
        assert not isinstance(result, BaseException), f"rank {r}: {result!r}"
    assert results[1] is None and results[2] is None, "only rank 0 returns the results"
    assert not (tmp_path / "rank1.npz").exists() and not (tmp_path / "rank2.npz").exists()
    parallel = results[0]
    assert parallel["data_parallel"] == {"ranks": 3, "shares": [10, 20, 30]}
    worst, where = _max_relative_difference(_load(tmp_path / "rank0.npz"), _load(tmp_path / "single.npz"))
    assert worst <= RTOL, f"{where}: parameters {worst:.3g} off the single-process run (relative)"
    assert parallel["curves"]["bn"]["test_accuracy"] == single["curves"]["bn"]["test_accuracy"]
    assert parallel["curves"]["plain"]["test_accuracy"] == single["curves"]["plain"]["test_accuracy"]
    assert parallel["final"] == single["final"]
    np.testing.assert_allclose(parallel["curves"]["bn"]["train_loss"][1:], single["curves"]["bn"]["train_loss"][1:],
                               rtol=1e-12)


# -- the command line -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--sync", "--backend", "torch"], "--sync runs over MPI with numpy or cupy arrays"),
        (["--sync", "--experiment", "renorm"], "--sync runs --experiment figure1 only"),
    ],
)
def test_cli_sync_refuses_what_it_cannot_run(tmp_path, capsys, argv, message):
    assert cli.main(["demo", *argv, "--out", str(tmp_path), "--no-progress"]) == 2
    assert message in capsys.readouterr().err


# -- mpiexec -n 3 ---------------------------------------------------------------------------


def _no_mpi() -> str | None:
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install 'anybn[mpi]')"
    if shutil.which("mpiexec") is None:
        return "mpiexec is not on PATH (pip install 'anybn[mpi]' brings mpich)"
    return None


def _mpiexec_demo(out: Path, *options: str) -> subprocess.CompletedProcess[str]:
    """``mpiexec -n 3 python -m anybn demo --sync ...``; fails (never hangs) after MPI_TIMEOUT_S."""
    command = ["mpiexec", "-n", "3", sys.executable, "-m", "anybn", "demo", "--sync", "--no-progress",
               "--out", str(out), "--save-params", str(out / "params.npz"), *options]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    # its own session: a timeout kills mpiexec and every rank it started
    process = subprocess.Popen(command, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=MPI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(command)} ran past {MPI_TIMEOUT_S} s (a hang?)\n{stdout[-2000:]}\n{stderr[-2000:]}")
    assert process.returncode == 0, f"{' '.join(command)} exited {process.returncode}\n{stdout[-2000:]}\n{stderr[-4000:]}"
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.skipif(_no_mpi() is not None, reason=str(_no_mpi()))
def test_mpiexec_float64_parameters_equal_the_single_process_run(digits, tmp_path):
    config = Config(steps=300, eval_every=300, dtype="float64")
    single = run_experiment(digits, config, save_params=tmp_path / "single.npz")
    done = _mpiexec_demo(tmp_path / "sync", "--steps", "300", "--eval-every", "300", "--dtype", "float64")
    assert "data-parallel over 3 MPI ranks: rows per rank of each minibatch [10, 20, 30]" in done.stdout
    assert done.stdout.count("wrote ") == 1, "only rank 0 writes"
    worst, where = _max_relative_difference(_load(tmp_path / "sync/params.npz"), _load(tmp_path / "single.npz"))
    assert worst <= RTOL, f"{where}: parameters after 300 steps {worst:.3g} off the single-process run (relative)"
    parallel = json.loads((tmp_path / "sync/results.json").read_text())
    assert parallel["data_parallel"] == {"ranks": 3, "shares": [10, 20, 30]}
    assert parallel["final"] == single["final"]
    assert (tmp_path / "sync/figure1.png").stat().st_size > 0


@pytest.mark.skipif(_no_mpi() is not None, reason=str(_no_mpi()))
def test_mpiexec_float32_accuracies_within_a_few_predictions(digits, tmp_path):
    config = Config(steps=300, eval_every=50, dtype="float32")
    single = run_experiment(digits, config)
    _mpiexec_demo(tmp_path, "--steps", "300", "--eval-every", "50")
    parallel = json.loads((tmp_path / "results.json").read_text())
    n_test = digits.x_test.shape[0]
    for name in ("bn", "plain"):
        got = np.array(parallel["curves"][name]["test_accuracy"]) * n_test
        want = np.array(single["curves"][name]["test_accuracy"]) * n_test
        assert got.shape == want.shape == (7,)
        assert np.max(np.abs(got - want)) <= FEW_PREDICTIONS + 1e-9, f"{name}: {got} against {want}"
    for got, want in ((parallel["final"]["bn"]["running"], single["final"]["bn"]["running"]),
                      (parallel["final"]["bn"]["population"], single["final"]["bn"]["population"]),
                      (parallel["final"]["plain"], single["final"]["plain"])):
        assert abs(got - want) * n_test <= FEW_PREDICTIONS + 1e-9
