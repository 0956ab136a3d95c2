"""The collectives of synchronized batch normalization, between reductions and coefficients.

- :func:`exchange_header`: one small host collective per training forward: every rank's
  status (ok, or the kind of error its local checks raised), count, feature count and
  dtype width. Any error raises on every rank, naming the rank and carrying its message
  (a second collective carries the messages, on the error path only).
- :func:`merge_forward`: one collective per training forward: every rank's
  (pivot, delta, M2), merged with Chan's formula around a shared pivot in rank order, so
  every rank gets bitwise the same global mean and variance.
- :func:`reduce_backward`: one collective per backward: the two sums, and an error flag.
- :func:`merge_population`: the same merge for :class:`anybn.PopulationStats`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from .._moments import BatchMoments, GradSums, Sums, merge_moments
from .._namespace import Array, Namespace, accumulation_dtype

__all__ = ["Header", "Merged", "exchange_header", "merge_forward", "merge_population", "reduce_backward"]

_OK, _VALUE_ERROR, _TYPE_ERROR = 0, 1, 2
_MESSAGE_BYTES = 1024  # a rank's error message, truncated to this many UTF-8 bytes


class Header(NamedTuple):
    """What a rank tells the others before the payload: int64 on the host."""

    status: int  # 0 ok, 1 ValueError, 2 TypeError
    # values per feature on this rank (``count`` shadows tuple.count)
    count: int  # type: ignore[assignment]
    features: int  # C, or -1 when unknown (the input was not an array)
    bits: int  # width of the payload's float dtype, or -1


def header_of(error: Exception | None, count: int, features: int, bits: int) -> Header:
    """The header of a rank whose local checks raised ``error`` (or None)."""
    if error is None:
        return Header(_OK, count, features, bits)
    return Header(_TYPE_ERROR if isinstance(error, TypeError) else _VALUE_ERROR, 0, -1, -1)


def _strip(fn: str, message: str) -> str:
    prefix = f"{fn}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def _encode(message: str) -> np.ndarray:
    raw = message.encode("utf-8")[:_MESSAGE_BYTES]
    buf = np.zeros(_MESSAGE_BYTES, dtype=np.uint8)
    buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
    return buf.view(np.int64)


def _decode(row: np.ndarray) -> str:
    raw = np.ascontiguousarray(row, dtype=np.int64).view(np.uint8).tobytes()
    return raw.rstrip(b"\x00").decode("utf-8", errors="replace")


def _host(a: Any) -> np.ndarray:
    return np.asarray(a, dtype=np.int64)


def exchange_header(fn: str, comm: Any, header: Header, error: Exception | None) -> list[int]:
    """Share the headers; raise on every rank if any rank failed or the ranks disagree.

    Returns every rank's count, in rank order. Checks: every rank's local checks passed;
    every rank has rank 0's feature count and dtype width; the global count is above 1.
    """
    size = int(comm.size)
    if getattr(comm, "uniform_checks", False):
        # every rank traces the same program on the same shapes: a local error is everyone's
        if error is not None:
            raise error
        return [header.count] * size
    table = _host(comm.all_gather(np.asarray(header, dtype=np.int64)))
    failed = [r for r in range(size) if table[r, 0] != _OK]
    if failed:
        own = "" if error is None else _strip(fn, str(error))
        messages = _host(comm.all_gather(_encode(own)))
        parts = [f"rank {r}: {_decode(messages[r])}" for r in failed]
        kind = TypeError if table[failed[0], 0] == _TYPE_ERROR else ValueError
        raise kind(f"{fn}: " + "; ".join(parts)) from error
    for r in range(1, size):
        if table[r, 2] != table[0, 2]:
            raise ValueError(
                f"{fn}: rank {r}: x has {table[r, 2]} features, expected {table[0, 2]} as on rank 0"
            )
        if table[r, 3] != table[0, 3]:
            raise TypeError(
                f"{fn}: rank {r}: x's statistics are accumulated in a {table[r, 3]}-bit float, "
                f"expected {table[0, 3]}-bit as on rank 0 (give every rank the same dtype and library)"
            )
    counts = [int(c) for c in table[:, 1]]
    if sum(counts) < 2:
        raise ValueError(
            f"{fn}: expected more than 1 value per feature when training, got {sum(counts)} across "
            f"{size} ranks (per rank: {counts})"
        )
    return counts


class Merged(NamedTuple):
    """Global statistics, with the local pivot: mean = pivot + delta on this rank."""

    # global (``count`` shadows tuple.count)
    count: int  # type: ignore[assignment]
    pivot: Array  # (C,) this rank's pivot, in the coefficient dtype
    delta: Array  # (C,) global mean - pivot, in the coefficient dtype
    var: Array  # (C,) global biased variance, in the coefficient dtype
    mean: Array  # (C,) global mean, bitwise the same on every rank, in the coefficient dtype


def payload_dtype(xp: Namespace, device: Any, dtype: Any) -> Any:
    """float64 where the backend has it on ``device``: the merge runs in it."""
    return accumulation_dtype(xp, device, dtype)


def merge_forward(
    comm: Any, xp: Namespace, sums: Sums | None, counts: list[int], features: int, dtype: Any,
    device: Any,
) -> Merged:
    """All-gather every rank's (pivot, delta, M2) and merge them in rank order.

    Each rank's mean is sent as its pivot plus a small delta. The merge runs around a shared
    pivot (that of the first rank with data): ``pivot_r - P`` is exact for nearby values,
    so the Chan updates add small numbers, and the merged mean is ``P + d``. Every rank runs
    the same arithmetic on the same gathered numbers: bitwise the same mean and variance.
    ``sums`` is None on a rank with no values.
    """
    acc = payload_dtype(xp, device, dtype)
    c = features
    if sums is not None:
        n = sums.count
        pivot = xp.astype(sums.pivot, acc)
        s1 = xp.astype(sums.s1, acc)
        delta = s1 / n
        m2 = xp.maximum(xp.astype(sums.s2, acc) - s1 * delta, 0.0)
        local = xp.concat([pivot, delta, m2])
    else:
        local = xp.zeros(3 * c, dtype=acc, device=device)
    table = comm.all_gather(local)
    first = next(r for r, n_r in enumerate(counts) if n_r > 0)
    shared = table[first, :c]
    total: BatchMoments | None = None
    for r, n_r in enumerate(counts):
        if n_r == 0:
            continue
        part = BatchMoments(n_r, (table[r, :c] - shared) + table[r, c : 2 * c], table[r, 2 * c :])
        total = part if total is None else merge_moments(total, part)
    assert total is not None
    mean = shared + total.mean
    var = xp.maximum(total.m2 / total.count, 0.0)
    if sums is not None:
        own_pivot = sums.pivot
        delta_global = (shared - xp.astype(sums.pivot, acc)) + total.mean
    else:  # no values here: center on the global mean
        own_pivot = xp.astype(mean, dtype)
        delta_global = xp.zeros(c, dtype=acc, device=device)
    return Merged(total.count, xp.astype(own_pivot, dtype), xp.astype(delta_global, dtype),
                  xp.astype(var, dtype), xp.astype(mean, dtype))


def reduce_backward(
    fn: str, comm: Any, xp: Namespace, local: GradSums, delta: Array, error: Exception | None,
    dtype: Any, device: Any,
) -> GradSums:
    """All-reduce sum(dy) and sum(dy * (x - global mean)), with an error flag, in one collective.

    ``local`` holds this rank's sums, ``sum_dy_d`` around its own pivot; ``delta`` is the
    global mean minus that pivot. The result's ``sum_dy_d`` is around the same local pivot,
    as :func:`anybn._steps.backward_coefficients` expects. A rank whose checks raised
    ``error`` sends zeros and a flag: every rank raises, naming it.
    """
    acc = payload_dtype(xp, device, dtype)
    c = local.sum_dy.shape[0]
    sum_dy = xp.astype(local.sum_dy, acc)
    centered = xp.astype(local.sum_dy_d, acc) - xp.astype(delta, acc) * sum_dy
    rank = comm.rank if not getattr(comm, "uniform_checks", False) else 0
    flags = xp.asarray([1.0 if error is not None else 0.0, float(rank) if error is not None else 0.0],
                       dtype=acc, device=device)
    total = comm.all_reduce_sum(xp.concat([sum_dy, centered, flags]))
    if not getattr(comm, "uniform_checks", False):
        n_failed = int(total[2 * c])
        if n_failed:
            if error is not None:
                raise type(error)(f"{fn}: rank {comm.rank}: {_strip(fn, str(error))}") from error
            which = f"rank {int(total[2 * c + 1])}" if n_failed == 1 else f"{n_failed} ranks"
            raise ValueError(f"{fn}: {which} failed its checks (see the error on that rank)")
    g_dy = total[:c]
    g_centered = total[c : 2 * c]
    g_dy_d = g_centered + xp.astype(delta, acc) * g_dy
    return GradSums(xp.astype(g_dy, dtype), xp.astype(g_dy_d, dtype))


def merge_population(
    fn: str, comm: Any, xp: Namespace | None, total: BatchMoments | None, within_m2: Array | None,
    batches: int, features: int, acc: Any, device: Any,
) -> tuple[BatchMoments, Array, int, Namespace]:
    """Merge every rank's population moments: two collectives (counts, then moments)."""
    size = int(comm.size)
    count = 0 if total is None else total.count
    if getattr(comm, "uniform_checks", False):
        counts, batch_counts = [count] * size, [batches] * size
    else:
        table = _host(comm.all_gather(np.asarray([count, batches, features], dtype=np.int64)))
        for r in range(size):
            if table[r, 2] != features:
                raise ValueError(f"{fn}: rank {r}: {table[r, 2]} features, expected {features} as on rank 0")
        counts, batch_counts = [int(v) for v in table[:, 0]], [int(v) for v in table[:, 1]]
    if sum(counts) == 0:
        raise ValueError(f"{fn}: no batch has been added on any of the {size} ranks; call update(x) first")
    if xp is None:  # no batch here: join with host zeros (engines that take NumPy arrays)
        xp = np
        acc = np.float64
        local = np.zeros(3 * features, dtype=acc)
    else:
        assert total is not None and within_m2 is not None
        local = xp.concat([xp.astype(total.mean, acc), xp.astype(total.m2, acc), xp.astype(within_m2, acc)])
    table = comm.all_gather(local)
    c = features
    merged: BatchMoments | None = None
    within = None
    for r, n_r in enumerate(counts):
        if n_r == 0:
            continue
        part = BatchMoments(n_r, table[r, :c], table[r, c : 2 * c])
        merged = part if merged is None else merge_moments(merged, part)
        within = table[r, 2 * c :] if within is None else within + table[r, 2 * c :]
    assert merged is not None
    return merged, within, sum(batch_counts), xp
