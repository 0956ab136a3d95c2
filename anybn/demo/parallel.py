"""Data parallelism for the demo: the uneven split of each minibatch, and the gradient all-reduce.

Every rank draws the same minibatch from the same seeded generator and trains on its own
rows of it (:func:`share`); the batch norms see the global batch through their
communicator (:func:`anybn.distributed.synchronize`), and after each backward pass one
all-reduce sums every parameter gradient across ranks (:func:`all_reduce_gradients`). The
loss of each rank is divided by the *global* minibatch size, so the summed gradient is the
single-process gradient of the mean loss over the whole minibatch.
"""

from __future__ import annotations

from typing import Any

import array_api_compat

from .mlp import MLP

__all__ = ["all_reduce_gradients", "mpi_communicator", "share", "shares"]

Array = Any


def share(batch: int, rank: int, size: int) -> tuple[int, int]:
    """The rows ``[start, stop)`` of a minibatch of ``batch`` that rank ``rank`` of ``size`` trains on.

    Contiguous rows, in rank order. With ``T = size(size+1)/2`` and ``q = batch // T``, rank
    k gets ``(k + 1) q`` rows, and the last rank also the ``batch - qT`` left over: 60 rows
    are 60 on one rank, 20 and 40 on two, 10, 20 and 30 on three, 2, 4, 6, 8, 10 and 30 on
    six. Every rank's share differs from the others' whenever ``batch >= T``; with fewer
    rows than that, the last rank takes them all and the others train on none (they still
    join every collective).

    Raises
    ------
    ValueError
        When ``batch < 1``, ``size < 1`` or ``rank`` is not in ``[0, size)``.
    """
    if batch < 1 or size < 1 or not 0 <= rank < size:
        raise ValueError(f"share: need batch >= 1, size >= 1 and 0 <= rank < size, got batch={batch}, "
                         f"rank={rank}, size={size}")
    unit = batch // (size * (size + 1) // 2)
    start = unit * (rank * (rank + 1) // 2)
    stop = batch if rank == size - 1 else start + unit * (rank + 1)
    return start, stop


def shares(batch: int, size: int) -> list[int]:
    """The number of rows of each rank, in rank order (see :func:`share`); they sum to ``batch``."""
    return [stop - start for start, stop in (share(batch, k, size) for k in range(size))]


def _gradients(net: MLP) -> list[Array]:
    """Every gradient of ``net`` in a fixed order: linear weights, linear biases, batch norm gammas and betas."""
    grads = [*net.grad_weights, *(g for g in net.grad_biases if g is not None)]
    for norm in net.norms:
        if norm.grad_weight is None or norm.grad_bias is None:
            raise ValueError("all_reduce_gradients: a batch norm has no gradients; call backward first")
        grads += [norm.grad_weight, norm.grad_bias]
    return grads


def all_reduce_gradients(net: MLP, comm: Any, loss: Array) -> Array:
    """Sum every gradient of ``net``, and ``loss``, over the ranks of ``comm``, in one all-reduce.

    The usual data-parallel gradient all-reduce: the gradients are packed into one 1-D
    buffer (one collective per step, however many layers), summed, and unpacked into
    ``net.grad_weights``, ``net.grad_biases`` and each batch norm's ``grad_weight`` and
    ``grad_bias`` (which hold the rank's own contribution before the call).

    Parameters
    ----------
    net : MLP
        After :meth:`MLP.backward`; its gradients are replaced by their sums over ranks.
    comm : anybn.distributed.Communicator
    loss : 0-d array
        This rank's loss term, in the namespace, dtype and device of the gradients.

    Returns
    -------
    0-d array: the sum of ``loss`` over the ranks (the loss of the global minibatch when
    each rank divided its term by the global size).
    """
    grads = _gradients(net)
    xp = array_api_compat.array_namespace(*grads)
    flat = xp.concat([xp.reshape(g, (-1,)) for g in grads] + [xp.reshape(loss, (1,))])
    total = comm.all_reduce_sum(flat)
    summed, offset = [], 0
    for g in grads:
        size = 1
        for d in g.shape:
            size *= d
        summed.append(xp.reshape(total[offset : offset + size], g.shape))
        offset += size
    parts = iter(summed)
    net.grad_weights = [next(parts) for _ in net.grad_weights]
    net.grad_biases = [None if g is None else next(parts) for g in net.grad_biases]
    for norm in net.norms:
        norm.grad_weight, norm.grad_bias = next(parts), next(parts)
    return total[offset]


def mpi_communicator(backend: str) -> Any:
    """``MPIComm(MPI.COMM_WORLD)`` for ``python -m anybn demo --sync`` on ``backend``.

    Raises
    ------
    ValueError
        When mpi4py cannot be imported, or ``backend`` is not numpy or cupy (the array
        libraries :class:`anybn.distributed.MPIComm` sends).
    """
    if backend not in ("numpy", "cupy"):
        raise ValueError(f"--sync runs over MPI with numpy or cupy arrays, got --backend {backend}")
    try:
        from mpi4py import MPI
    except ImportError as exc:
        raise ValueError(f"--sync needs mpi4py and an MPI (pip install 'anybn[mpi]'): {exc}") from None
    from ..distributed import MPIComm

    return MPIComm(MPI.COMM_WORLD)
