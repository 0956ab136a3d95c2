"""An in-process communicator: k threads, one per rank, meeting at a barrier.

It satisfies :class:`anybn.distributed.Communicator` with nothing but NumPy, so the
synchronized paths can be tested without an engine, and counts the collectives each
rank makes. A rank that does not arrive makes the others' barrier time out (a
``threading.BrokenBarrierError``), so a missing collective fails a test instead of hanging it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np

TIMEOUT_S = 20.0


class ThreadGroup:
    def __init__(self, size: int) -> None:
        self.size = size
        self.barrier = threading.Barrier(size, timeout=TIMEOUT_S)
        self.slots: list[Any] = [None] * size

    def comms(self) -> list[FakeComm]:
        return [FakeComm(self, r) for r in range(self.size)]


class FakeComm:
    def __init__(self, group: ThreadGroup, rank: int) -> None:
        self.group, self.rank, self.size = group, rank, group.size
        self.calls: list[str] = []

    def _exchange(self, a: Any) -> list[Any]:
        g = self.group
        g.slots[self.rank] = np.array(a, copy=True)
        g.barrier.wait()
        parts = list(g.slots)
        g.barrier.wait()  # nobody overwrites a slot before everyone has read them all
        shapes = {p.shape for p in parts}
        if len(shapes) != 1:
            raise RuntimeError(f"FakeComm: ranks sent arrays of different shapes {shapes}")
        return parts

    def all_gather(self, a: Any) -> Any:
        self.calls.append("all_gather")
        return np.stack(self._exchange(a))

    def all_reduce_sum(self, a: Any) -> Any:
        self.calls.append("all_reduce_sum")
        parts = self._exchange(a)
        total = parts[0].copy()
        for p in parts[1:]:
            total = total + p
        return total


def run_ranks(size: int, body: Callable[[FakeComm], Any]) -> list[Any]:
    """Run ``body(comm)`` on ``size`` threads; return each rank's result or exception."""
    group = ThreadGroup(size)
    comms = group.comms()
    results: list[Any] = [None] * size

    def target(r: int) -> None:
        try:
            results[r] = body(comms[r])
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            results[r] = e

    threads = [threading.Thread(target=target, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT_S * 3)
    if any(t.is_alive() for t in threads):
        raise TimeoutError(f"run_ranks: a rank of {size} is still running after {TIMEOUT_S * 3} s (a hang)")
    return results
