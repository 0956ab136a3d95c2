"""Synchronized batch normalization: the statistics of the global batch, on any engine.

Every rank of a data-parallel job holds a slice of the global batch. With ``comm=`` the
training forward of :func:`anybn.batch_norm_train` (and :class:`anybn.BatchNorm`) sends each
rank's per-feature (count, mean, M2) to every rank, merges them with Chan's formula in rank
order, and normalizes with the global statistics; the backward all-reduces its two
per-feature sums. anybn brings no engine of its own: ``comm`` is any object that satisfies
:class:`Communicator`, and four adapters wrap the engines people run:

- :class:`MPIComm` (mpi4py: NumPy arrays, CuPy arrays with a CUDA-aware MPI),
- :class:`TorchComm` (``torch.distributed``: gloo, nccl),
- :class:`JaxComm` (``lax`` collectives inside ``shard_map`` / ``pmap``),
- :class:`NCCLComm` (CuPy arrays through ``cupy.cuda.nccl`` or ``cupyx.distributed``).

Each adapter imports its engine on first use. :func:`synchronize` gives the layers of a
network already built a communicator, like PyTorch's ``SyncBatchNorm.convert_sync_batchnorm``.
"""

from __future__ import annotations

from ._adapters import JaxComm, MPIComm, NCCLComm, TorchComm
from ._protocol import Communicator, synchronize

__all__ = ["Communicator", "JaxComm", "MPIComm", "NCCLComm", "TorchComm", "synchronize"]
