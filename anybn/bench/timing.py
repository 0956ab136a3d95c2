"""Timing: calls per sample, interleaved rounds, the reference copy, and whether samples agree.

:class:`CopyTimer` times a copy of x's bytes as the best of a 1-thread and an n-thread
``np.copyto`` into a buffer whose pages are already mapped, in the same process; the
fraction of copy bandwidth (:func:`bandwidth_fraction`) is then (op bytes / op time) /
(copy bytes / copy time).

:func:`stability` judges one row's per-round samples, so that a median that depends on
which rounds the machine stalled in is flagged rather than reported as a time. On the 2-core
VMs of this project PyTorch's 2-thread timings were sometimes bimodal: most rounds at
~0.02 ms, others at ~8 ms or a multiple of it (a thread woken late), and when the slow
group held half the rounds the median was the stall, giving ratios such as 0.000377. Two
measures, thresholds documented with their constants:

- **bimodal**: sorted, the samples fall into two groups of at least :data:`MIN_MODE`
  samples each, the fastest of the slow group at least :data:`BIMODAL_GAP` (2x) the slowest
  of the fast group. The median then says which group got more rounds, not how long the op
  takes; no ratio is printed for it.
- **noisy**: otherwise, when the middle half of the samples spreads by more than
  :data:`NOISY_SPREAD` (50 %) of the median: (75th - 25th percentile) / median. One or two
  outliers among 7 rounds do not count (the median is robust to them); on a quiet 2-core VM
  rows measured 0.0-0.4. A ratio involving it is printed marked.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .shapes import COPY_TRAFFIC

if TYPE_CHECKING:
    from .cases import Case

__all__ = [
    "BIMODAL_GAP",
    "MIN_MODE",
    "NOISY_SPREAD",
    "CopyTimer",
    "Stability",
    "bandwidth_fraction",
    "calibrate",
    "schedule",
    "stability",
]

BIMODAL_GAP = 2.0  # a slow group at least this many times the fast group's slowest sample
MIN_MODE = 2  # samples in each group: a single slow round is an outlier, not a mode
NOISY_SPREAD = 0.5  # (75th - 25th percentile) / median above this: noisy


class CopyTimer:
    """Times a copy of ``nbytes`` between two buffers whose pages are already mapped.

    Each call returns the seconds per copy of the faster of a single ``np.copyto`` and the
    same copy split over ``threads`` threads (``np.copyto`` releases the GIL): the best
    this process can do moving those bytes, the yardstick for the ops' bandwidth.
    """

    def __init__(self, nbytes: int, threads: int = 2) -> None:
        self.nbytes = int(nbytes)
        self.threads = max(1, int(threads))
        self._src = np.ones(self.nbytes, dtype=np.uint8)
        self._dst = np.ones(self.nbytes, dtype=np.uint8)  # written: pages faulted in now
        self._pool = ThreadPoolExecutor(self.threads - 1) if self.threads > 1 else None
        bounds = np.linspace(0, self.nbytes, self.threads + 1).astype(int)
        self._parts = [(self._dst[a:b], self._src[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]

    @property
    def traffic(self) -> int:
        return COPY_TRAFFIC * self.nbytes

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None

    def __enter__(self) -> CopyTimer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _split(self) -> None:
        assert self._pool is not None
        futures = [self._pool.submit(np.copyto, dst, src) for dst, src in self._parts[1:]]
        np.copyto(*self._parts[0])
        for f in futures:
            f.result()

    def timer(self, number: int = 1) -> Callable[[], float]:
        """A function timing ``number`` copies each way: seconds per copy, the faster way."""
        dst, src = self._dst, self._src

        def timed() -> float:
            np.copyto(dst, src)  # untimed first copy, as in Case.timer
            t0 = time.perf_counter()
            for _ in range(number):
                np.copyto(dst, src)
            best = time.perf_counter() - t0
            if self._pool is not None:
                t0 = time.perf_counter()
                for _ in range(number):
                    self._split()
                best = min(best, time.perf_counter() - t0)
            return best / number

        return timed


def calibrate(
    timer: Callable[[int], Callable[[], float]],
    min_sample: float = 1e-3,
    cap: int = 1000,
    probes: int = 3,
    budget: float = 0.05,
) -> int:
    """Calls per sample so that one sample lasts at least ``min_sample`` seconds.

    A call's time is the fastest of up to ``probes`` single calls, probing again only while
    every probe so far took ``min_sample`` or more and together less than ``budget``
    seconds: one probe that hit a stall (an 8 ms wake-up of a PyTorch thread) would
    otherwise set one call per sample, and every sample would be a single call, stalled or
    not. An op that really takes ``budget`` or more is probed once.
    """
    once, spent = math.inf, 0.0
    for _ in range(max(1, probes)):
        t = timer(1)()
        once, spent = min(once, t), spent + t
        if once < min_sample or spent >= budget:
            break
    return 1 if once >= min_sample else min(cap, math.ceil(min_sample / max(once, 1e-7)))


def schedule(names: Sequence[str], rounds: int) -> Iterator[str]:
    """Every name once per round, the order rotated by one each round.

    Machine noise (another process, frequency changes) then hits every contender alike,
    and each takes each position in the round equally often.
    """
    names = list(names)
    for r in range(rounds):
        k = r % len(names) if names else 0
        yield from names[k:] + names[:k]


def bandwidth_fraction(case: Case, copy: CopyTimer, rounds: int = 7) -> float:
    """The case's bytes per second over the copy's, medians of interleaved rounds."""
    timers = {"op": case.timer(calibrate(case.timer)), "copy": copy.timer(calibrate(copy.timer))}
    samples: dict[str, list[float]] = {k: [] for k in timers}
    for name in schedule(list(timers), rounds):
        samples[name].append(timers[name]())
    op_rate = case.traffic / statistics.median(samples["op"])
    copy_rate = copy.traffic / statistics.median(samples["copy"])
    return op_rate / copy_rate


class Stability(NamedTuple):
    """The verdict on one row's per-round samples (see the module docstring for the rules)."""

    verdict: str  # "stable", "noisy" or "bimodal"
    spread: float  # (75th - 25th percentile) / median of the samples
    slow: int  # bimodal: how many samples are in the slow group; 0 otherwise
    gap: float  # bimodal: the slow group's fastest over the fast group's slowest; 1.0 otherwise

    def describe(self, n: int) -> str:
        """A phrase for the table's notes, for ``n`` samples."""
        if self.verdict == "bimodal":
            gap = f"{self.gap:.0f}" if self.gap >= 10 else f"{self.gap:.2g}"
            return f"bimodal, {self.slow} of {n} rounds {gap}x or more slower than the rest"
        if self.verdict == "noisy":
            return f"noisy, middle half of {n} rounds spread {100 * self.spread:.0f}% of the median"
        return "stable"


def stability(samples: Sequence[float]) -> Stability:
    """Judge the per-round samples of one row: "stable", "noisy" or "bimodal".

    Parameters
    ----------
    samples : sequence of float, length n >= 1
        Seconds (or any positive unit) per call, one per round.

    Returns
    -------
    Stability
        "bimodal" when the sorted samples split into two groups of at least
        :data:`MIN_MODE` each with a ratio of at least :data:`BIMODAL_GAP` between them (the
        widest such gap is reported); else "noisy" when (75th - 25th percentile) / median
        exceeds :data:`NOISY_SPREAD`; else "stable". Fewer than 2 x MIN_MODE samples cannot
        be bimodal.
    """
    s = np.sort(np.asarray(samples, dtype=np.float64))
    if s.size == 0:
        raise ValueError("stability: no samples")
    if not np.all(s > 0):
        raise ValueError(f"stability: samples must be positive times, got {s.tolist()}")
    q25, median, q75 = np.percentile(s, [25, 50, 75])
    spread = float((q75 - q25) / median)
    # ratios across each split that leaves MIN_MODE samples on either side
    ratios = s[MIN_MODE:s.size - MIN_MODE + 1] / s[MIN_MODE - 1:s.size - MIN_MODE]
    if ratios.size and ratios.max() >= BIMODAL_GAP:
        k = int(np.argmax(ratios)) + MIN_MODE  # samples in the fast group
        return Stability("bimodal", spread, int(s.size - k), float(ratios.max()))
    return Stability("noisy" if spread > NOISY_SPREAD else "stable", spread, 0, 1.0)
