"""The :class:`Communicator` protocol, and :func:`synchronize`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol, runtime_checkable

__all__ = ["Communicator", "synchronize"]

Array = Any


@runtime_checkable
class Communicator(Protocol):
    """What synchronized batch normalization needs from a data-parallel engine.

    Attributes
    ----------
    rank : int
        This process's index, ``0 <= rank < size``. (Under JAX tracing it may be a traced
        value: it is only used in error messages.)
    size : int
        The number of ranks.

    Optional attribute ``uniform_checks`` (default False): True when every rank runs the
    same program on inputs of the same shape (JAX under ``shard_map``/``pmap``, which traces
    once), so that an input error is raised on every rank by itself and the forward needs no
    header collective.

    Every rank must call the methods in the same order with arrays of the same shape and
    dtype. They are called with 1-D arrays of the data's namespace and device, and with
    small 1-D NumPy int64 arrays (the header, counts and error flags, which live on the
    host); each method returns an array of the namespace and device it was given.
    """

    rank: Any
    size: int

    def all_gather(self, a: Array) -> Array:
        """Every rank's ``a``, stacked in rank order: shape ``(size, *a.shape)``."""
        ...

    def all_reduce_sum(self, a: Array) -> Array:
        """The elementwise sum of every rank's ``a``, shape ``a.shape``, the same on every rank."""
        ...


def synchronize(layers: Any, comm: Communicator | None) -> list[Any]:
    """Give every batch normalization layer in ``layers`` the communicator ``comm``.

    The equivalent of PyTorch's ``SyncBatchNorm.convert_sync_batchnorm`` for a network
    built first: the layers keep their parameters and running statistics, and their next
    training forward passes normalize with the statistics of the global batch.

    Parameters
    ----------
    layers : BatchNorm, or an iterable of them, or an object with a ``norms`` or ``layers``
        attribute holding them (searched recursively through lists, tuples and dicts).
    comm : Communicator or None
        None makes the layers local again.

    Returns
    -------
    list
        The layers that were given ``comm``, in the order found.

    Raises
    ------
    TypeError
        When ``comm`` does not satisfy :class:`Communicator`, or no layer was found.
    """
    if comm is not None and not isinstance(comm, Communicator):
        raise TypeError(
            f"synchronize: comm must satisfy anybn.distributed.Communicator (rank, size, all_gather, "
            f"all_reduce_sum), got {type(comm).__name__}"
        )
    found = _layers_in(layers, set())
    if not found:
        raise TypeError(
            f"synchronize: found no batch normalization layer (an object with a comm attribute) in "
            f"{type(layers).__name__}"
        )
    for layer in found:
        layer.comm = comm
    return found


def _layers_in(obj: Any, seen: set[int]) -> list[Any]:
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if hasattr(obj, "comm") and hasattr(obj, "num_features"):
        return [obj]
    if isinstance(obj, dict):
        obj = list(obj.values())
    if isinstance(obj, (list, tuple)):
        return [layer for item in obj for layer in _layers_in(item, seen)]
    for name in ("norms", "layers"):
        if hasattr(obj, name):
            return _layers_in(getattr(obj, name), seen)
    if isinstance(obj, Iterable) and not isinstance(obj, (str, bytes)):
        return [layer for item in obj for layer in _layers_in(item, seen)]
    return []
