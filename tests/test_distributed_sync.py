"""Synchronized BN in one process: ranks are threads meeting at a barrier (tests/sync_workers/fake.py).

These tests cover what needs no engine: the number of collectives per step, that a bad
input on one rank raises on every rank and hangs none (a missing collective would break
the barrier after 20 s), the global-count rule, empty ranks, :func:`synchronize`, and the
adapters' checks. Values are compared with float64 NumPy references (``tests/reference.py``);
float64 tolerance 1e-12 relative as in ``test_distributed_engines.py``.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

import anybn
from anybn.distributed import Communicator, NCCLComm, synchronize

sys.path.insert(0, str(Path(__file__).parent))
from sync_workers.fake import run_ranks  # noqa: E402
from reference import reference_backward, reference_batch_norm  # noqa: E402


def _raise_any(results: list) -> list:
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _slices(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    return np.split(x, np.cumsum(sizes)[:-1])


@pytest.mark.parametrize("sizes, axis", [([5, 0, 6], 1), ([1, 1], 1), ([4, 3, 2, 1], -1)])
def test_collectives_per_step_and_values(sizes: list[int], axis: int) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(sum(sizes), 4, 5))
    if axis == -1:
        x = np.ascontiguousarray(np.moveaxis(x, 1, -1))
    dy = rng.normal(size=x.shape)
    w, b = rng.normal(size=4), rng.normal(size=4)
    xs, dys = _slices(x, sizes), _slices(dy, sizes)

    def body(comm):
        layer = anybn.BatchNorm(4, axis=axis, dtype="float64", comm=comm)
        layer.weight, layer.bias = w, b
        y = layer(xs[comm.rank])
        forward = list(comm.calls)
        dx = layer.backward(dys[comm.rank])
        backward = comm.calls[len(forward):]
        layer.eval()(xs[comm.rank])
        return y, dx, forward, backward, len(comm.calls)

    out = _raise_any(run_ranks(len(sizes), body))
    for y, dx, forward, backward, total in out:
        assert forward == ["all_gather", "all_gather"]  # header, payload
        assert backward == ["all_reduce_sum"]
        assert total == 3  # eval mode made none
    np.testing.assert_allclose(np.concatenate([o[0] for o in out]), reference_batch_norm(x, axis, w, b),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([o[1] for o in out]), reference_backward(x, dy, axis, w)[0],
                               rtol=1e-12, atol=1e-12)


def test_global_count_rule() -> None:
    """One value per feature in all is an error on every rank; one per rank on two ranks is fine."""
    def body(comm):
        x = np.ones((1 if comm.rank == 0 else 0, 3))
        return anybn.batch_norm_train(x, comm=comm)

    for r in run_ranks(3, body):
        assert isinstance(r, ValueError), r
        assert "expected more than 1 value per feature when training, got 1 across 3 ranks" in str(r)
    ok = _raise_any(run_ranks(2, lambda comm: anybn.batch_norm_train(np.full((1, 3), comm.rank * 2.0),
                                                                     comm=comm)[0]))
    np.testing.assert_allclose(np.concatenate(ok), [[-1.0] * 3, [1.0] * 3], rtol=1e-5)  # eps=1e-5 in var=1


@pytest.mark.parametrize("bad, kind, message", [
    (lambda: np.ones((4, 3), dtype=np.int64), TypeError, "rank 1: x must have a real floating dtype"),
    (lambda: np.ones(4), ValueError, "rank 1: x must have at least 2 dimensions"),
    (lambda: "not an array", TypeError, "rank 1: x must be an array"),
])
def test_bad_input_on_one_rank_raises_everywhere(bad, kind, message) -> None:
    def body(comm):
        x = bad() if comm.rank == 1 else np.arange(12.0).reshape(4, 3)
        return anybn.batch_norm_train(x, comm=comm)

    results = run_ranks(3, body)
    for r in results:
        assert isinstance(r, kind), repr(r)
        assert str(r).startswith(f"batch_norm_train: {message}"), str(r)


def test_ranks_that_disagree_on_features_or_dtype() -> None:
    def features(comm):
        return anybn.batch_norm_train(np.ones((4, 3 if comm.rank == 0 else 5)), comm=comm)

    for r in run_ranks(2, features):
        assert isinstance(r, ValueError) and "rank 1: x has 5 features, expected 3 as on rank 0" in str(r), r

    def dtypes(comm):
        x = np.arange(12.0).reshape(4, 3)
        return anybn.batch_norm_train(x.astype(np.float32 if comm.rank else np.float64), comm=comm)

    # float32 and float64 NumPy both merge in float64: the same payload, so both are accepted
    _raise_any(run_ranks(2, dtypes))


def test_bad_gradient_on_one_rank_raises_everywhere() -> None:
    def body(comm):
        x = np.arange(12.0).reshape(4, 3) + comm.rank
        y, saved = anybn.batch_norm_train(x, comm=comm)
        dy = np.ones((5, 3)) if comm.rank == 2 else np.ones_like(y)
        return anybn.batch_norm_backward(dy, saved)

    results = run_ranks(3, body)
    assert isinstance(results[2], ValueError) and "rank 2: dy has shape (5, 3)" in str(results[2])
    for r in results[:2]:
        assert isinstance(r, ValueError) and "rank 2 failed its checks" in str(r), r


def test_float32_large_offset_across_ranks() -> None:
    rng = np.random.default_rng(3)
    x = (1e4 + rng.standard_normal((30, 6))).astype(np.float32)
    xs = _slices(x, [13, 0, 17])
    out = _raise_any(run_ranks(3, lambda comm: anybn.batch_norm_train(xs[comm.rank], comm=comm)[0]))
    err = np.max(np.abs(np.concatenate(out) - reference_batch_norm(x.astype(np.float64), 1)))
    assert err <= 1e-4, err


def test_population_update_from_synchronized_forward() -> None:
    rng = np.random.default_rng(4)
    x = rng.normal(2.0, 3.0, size=(12, 3))
    xs = _slices(x, [7, 5])

    def body(comm):
        layer = anybn.BatchNorm(3, dtype="float64", comm=comm)
        layer.population = anybn.PopulationStats(3)
        layer(xs[comm.rank])
        mean, var = layer.population.result("pooled")
        doubled = anybn.PopulationStats(3, comm=comm)
        with pytest.raises(ValueError, match="counted once per rank"):
            doubled.update_from(layer._saved)
        return mean, var

    out = _raise_any(run_ranks(2, body))
    for mean, var in out:
        np.testing.assert_allclose(mean, x.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(var, x.var(axis=0, ddof=1), rtol=1e-12)
        assert np.array_equal(mean, out[0][0]) and np.array_equal(var, out[0][1])


class _Net:
    def __init__(self) -> None:
        self.norms = [anybn.BatchNorm(3), anybn.BatchNorm(4)]


def test_synchronize_sets_comm_and_checks_it() -> None:
    def body(comm):
        net = _Net()
        found = synchronize(net, comm)
        assert found == net.norms and all(n.comm is comm for n in net.norms)
        assert isinstance(comm, Communicator)
        synchronize(net.norms, None)
        return [n.comm for n in net.norms]

    assert _raise_any(run_ranks(1, body)) == [[None, None]]
    with pytest.raises(TypeError, match="comm must satisfy anybn.distributed.Communicator"):
        synchronize(_Net(), object())
    with pytest.raises(TypeError, match="found no batch normalization layer"):
        synchronize([1, 2], None)


def test_comm_with_virtual_batches_is_refused() -> None:
    with pytest.raises(ValueError, match="comm and virtual_batch_size cannot be combined"):
        anybn.batch_norm_train(np.ones((4, 3)), comm=object(), virtual_batch_size=2)


class _FakeNcclBackend:
    """The surface of cupyx.distributed's NCCL backend that NCCLComm reads."""

    rank = 1
    _n_devices = 2

    def all_reduce(self, *args):  # pragma: no cover - not called without a GPU
        raise AssertionError


def test_nccl_adapter_reads_rank_and_size_without_a_gpu() -> None:
    comm = NCCLComm(_FakeNcclBackend())
    assert (comm.rank, comm.size) == (1, 2)
    assert isinstance(comm, Communicator)


@pytest.mark.skipif(importlib.util.find_spec("cupy") is None, reason="cupy is not installed: NCCL needs a GPU")
def test_nccl_single_rank_roundtrip() -> None:  # pragma: no cover - GPU machines only
    import cupy
    from cupy.cuda import nccl

    uid = nccl.get_unique_id()
    comm = NCCLComm(nccl.NcclCommunicator(1, uid, 0))
    a = cupy.arange(6, dtype=cupy.float64)
    cupy.testing.assert_array_equal(comm.all_gather(a), a[None])
    cupy.testing.assert_array_equal(comm.all_reduce_sum(a), a)
    x = cupy.asarray(np.random.default_rng(0).normal(3, 2, size=(8, 3)))
    y, _ = anybn.batch_norm_train(x, comm=comm)
    np.testing.assert_allclose(cupy.asnumpy(y), reference_batch_norm(cupy.asnumpy(x), 1), rtol=1e-12)


def test_torch_comm_needs_an_initialized_process_group() -> None:
    pytest.importorskip("torch")
    from anybn.distributed import TorchComm

    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        TorchComm()
