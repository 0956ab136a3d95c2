"""Adapters from data-parallel engines to :class:`anybn.distributed.Communicator`.

Each imports its engine on first use, so that importing anybn never imports an engine.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["JaxComm", "MPIComm", "NCCLComm", "TorchComm"]

Array = Any


def _is_numpy(a: Any) -> bool:
    return isinstance(a, np.ndarray)


def _is_cupy(a: Any) -> bool:
    return type(a).__module__.split(".")[0] == "cupy"


class MPIComm:
    """mpi4py communicator: NumPy arrays, and CuPy arrays where the MPI is CUDA-aware.

    Parameters
    ----------
    comm : mpi4py.MPI.Comm, optional
        Defaults to ``MPI.COMM_WORLD``.
    """

    def __init__(self, comm: Any = None) -> None:
        if comm is None:
            from mpi4py import MPI

            comm = MPI.COMM_WORLD
        self.comm = comm
        self.rank: int = comm.Get_rank()
        self.size: int = comm.Get_size()

    def _buffers(self, fn: str, a: Array, shape: tuple[int, ...]) -> tuple[Array, Array]:
        if _is_numpy(a):
            return np.ascontiguousarray(a), np.empty(shape, dtype=a.dtype)
        if _is_cupy(a):
            import cupy

            send = cupy.ascontiguousarray(a)
            out = cupy.empty(shape, dtype=a.dtype)
            # MPI reads device memory outside CuPy's stream: finish the work that wrote it
            cupy.cuda.get_current_stream().synchronize()
            return send, out
        raise TypeError(
            f"MPIComm.{fn}: expected a NumPy or CuPy array, got {type(a).__module__}.{type(a).__name__}"
        )

    def all_gather(self, a: Array) -> Array:
        """Every rank's ``a`` in rank order, shape ``(size, *a.shape)``."""
        send, out = self._buffers("all_gather", a, (self.size, *a.shape))
        self.comm.Allgather(send, out)
        return out

    def all_reduce_sum(self, a: Array) -> Array:
        """The sum over ranks of ``a``."""
        from mpi4py import MPI

        send, out = self._buffers("all_reduce_sum", a, tuple(a.shape))
        self.comm.Allreduce(send, out, op=MPI.SUM)
        return out

    def __repr__(self) -> str:
        return f"MPIComm(rank={self.rank}, size={self.size})"


class TorchComm:
    """torch.distributed process group (gloo, nccl, ...) for torch tensors.

    Parameters
    ----------
    group : torch.distributed.ProcessGroup, optional
        Defaults to the default group; ``torch.distributed.init_process_group`` must have run.

    Notes
    -----
    NumPy arrays (the small headers) travel as tensors on the group's device: CPU for
    gloo, the current CUDA device for nccl.
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError(
                "TorchComm: torch.distributed is not initialized; call "
                "torch.distributed.init_process_group first"
            )
        self.group = group
        self.rank: int = dist.get_rank(group)
        self.size: int = dist.get_world_size(group)
        self._device: Any = None

    def _host_device(self) -> Any:
        if self._device is None:
            import torch
            import torch.distributed as dist

            cuda = str(dist.get_backend(self.group)) == "nccl"
            self._device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
        return self._device

    def _tensor(self, a: Array) -> tuple[Any, bool]:
        import torch

        if _is_numpy(a):
            return torch.from_numpy(np.ascontiguousarray(a)).to(self._host_device()), True
        return a.detach().contiguous(), False

    def all_gather(self, a: Array) -> Array:
        """Every rank's ``a`` in rank order, shape ``(size, *a.shape)``."""
        import torch
        import torch.distributed as dist

        t, host = self._tensor(a)
        parts = [torch.empty_like(t) for _ in range(self.size)]
        dist.all_gather(parts, t, group=self.group)
        out = torch.stack(parts)
        return out.cpu().numpy() if host else out

    def all_reduce_sum(self, a: Array) -> Array:
        """The sum over ranks of ``a``."""
        import torch.distributed as dist

        t, host = self._tensor(a)
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t.cpu().numpy() if host else t

    def __repr__(self) -> str:
        return f"TorchComm(rank={self.rank}, size={self.size})"


class JaxComm:
    """``lax`` collectives over a named mapped axis, inside ``shard_map`` or ``pmap``.

    Parameters
    ----------
    axis_name : hashable
        The mapped axis whose shards form the global batch.

    Notes
    -----
    Every shard has the same shape and the program is traced once, so an input error is
    raised while tracing, on every rank alike: the forward takes no header collective
    (``uniform_checks = True``) and one ``all_gather`` only. Use it inside the mapped
    function only.
    """

    uniform_checks = True

    def __init__(self, axis_name: Any) -> None:
        self.axis_name = axis_name

    @property
    def size(self) -> int:
        from jax import lax

        return int(lax.axis_size(self.axis_name))

    @property
    def rank(self) -> Any:
        from jax import lax

        return lax.axis_index(self.axis_name)

    def all_gather(self, a: Array) -> Array:
        """Every shard's ``a`` in axis order, shape ``(size, *a.shape)``."""
        from jax import lax

        return lax.all_gather(a, self.axis_name)

    def all_reduce_sum(self, a: Array) -> Array:
        """The sum over the axis of ``a``."""
        from jax import lax

        return lax.psum(a, self.axis_name)

    def __repr__(self) -> str:
        return f"JaxComm({self.axis_name!r})"


# NCCL's data types, by NumPy dtype name (cupy.cuda.nccl constants)
_NCCL_TYPES = {
    "int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32", "int64": "NCCL_INT64",
    "float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
}


class NCCLComm:
    """CuPy arrays through NCCL: a ``cupy.cuda.nccl.NcclCommunicator`` or a ``cupyx.distributed`` backend.

    Parameters
    ----------
    communicator : cupy.cuda.nccl.NcclCommunicator or cupyx.distributed.NCCLBackend
        One rank per GPU, as NCCL requires.

    Notes
    -----
    NumPy arrays (the small headers) are copied to the current device and back. The
    collectives run on CuPy's current stream.
    """

    def __init__(self, communicator: Any) -> None:
        self.communicator = communicator
        if hasattr(communicator, "all_reduce"):  # cupyx.distributed backend
            self.rank: int = int(communicator.rank)
            self.size: int = int(getattr(communicator, "_n_devices", getattr(communicator, "size", 0)))
        else:
            self.rank = int(communicator.rank_id())
            self.size = int(communicator.size())

    def _device_array(self, a: Array) -> tuple[Array, bool]:
        if _is_numpy(a):
            import cupy

            return cupy.asarray(a), True
        return a, False

    def _nccl_type(self, dtype: Any) -> int:
        from cupy.cuda import nccl

        name = np.dtype(dtype).name
        if name not in _NCCL_TYPES:
            raise TypeError(f"NCCLComm: NCCL has no type for dtype {name}, expected one of {sorted(_NCCL_TYPES)}")
        return int(getattr(nccl, _NCCL_TYPES[name]))

    def all_gather(self, a: Array) -> Array:
        """Every rank's ``a`` in rank order, shape ``(size, *a.shape)``."""
        import cupy

        d, host = self._device_array(a)
        d = cupy.ascontiguousarray(d)
        out = cupy.empty((self.size, *d.shape), dtype=d.dtype)
        c = self.communicator
        if hasattr(c, "all_gather"):
            c.all_gather(d, out, d.size)
        else:
            stream = cupy.cuda.get_current_stream().ptr
            c.allGather(d.data.ptr, out.data.ptr, d.size, self._nccl_type(d.dtype), stream)
        return cupy.asnumpy(out) if host else out

    def all_reduce_sum(self, a: Array) -> Array:
        """The sum over ranks of ``a``."""
        import cupy

        d, host = self._device_array(a)
        d = cupy.ascontiguousarray(d)
        out = cupy.empty_like(d)
        c = self.communicator
        if hasattr(c, "all_reduce"):
            c.all_reduce(d, out, "sum")
        else:
            from cupy.cuda import nccl

            stream = cupy.cuda.get_current_stream().ptr
            c.allReduce(d.data.ptr, out.data.ptr, d.size, self._nccl_type(d.dtype), nccl.NCCL_SUM, stream)
        return cupy.asnumpy(out) if host else out

    def __repr__(self) -> str:
        return f"NCCLComm(rank={self.rank}, size={self.size})"
