"""anybn's batch norm against PyTorch (the peer) and naive NumPy (the baseline), for asv.

Every benchmark is parametrized over backend x shape (x op): the cases
(:mod:`anybn.bench.cases`), backends (:mod:`anybn.bench.backends`), shapes, data and byte
counts (:mod:`anybn.bench.shapes`), the copy (:mod:`anybn.bench.timing`) and the memory
count (:mod:`anybn.bench.memory`) are those of ``python -m anybn bench`` and
``tests/benchmarks``. A backend that cannot run here (not
installed, no GPU) raises NotImplementedError in ``setup``, which asv shows as skipped.

- ``Time.time_op``: seconds per call. Dask builds its graph and ``.compute()``s inside the
  timing; CuPy and torch-cuda synchronize the stream inside it.
- ``BandwidthFraction.track_copy_fraction``: the op's minimal traffic per second over that
  of a copy of x's bytes timed in the same process (train 3x, eval 2x, backward 5x
  ``x.nbytes``; the copy 2x), medians of interleaved rounds.
- ``PeakMemTrainForward.peakmem_train_forward``: the process's peak RSS around one training
  forward (imports and inputs included; compare a backend with itself across commits).
- ``TrainForwardMemory.track_peak`` / ``track_retained``: NumPy bytes allocated by one
  training forward, at its peak and still held with its result alive, in multiples of
  ``x.nbytes`` (tracemalloc; not for PyTorch, whose allocator it cannot see). anybn keeps
  y and O(C) vectors (1x); the naive code keeps y and a cache with two copies of x (3x).
"""

from __future__ import annotations

try:
    from anybn.bench import backends, cases, memory, shapes, timing
except ImportError:  # commits before anybn.bench.cases was split (asv runs over history)
    from anybn.bench import cases

    backends = memory = shapes = timing = cases  # type: ignore[misc]

SHAPES = list(shapes.DEFAULT_SHAPES)
THREADS = 2  # torch.set_num_threads, Dask workers, ANYBN_NUM_THREADS, the copy


class _Case:
    """Holds one prepared case and its environment (ANYBN_FAST_PATHS) from setup to teardown."""

    timeout = 300.0
    warmup = True

    def _prepare(self, backend: str, shape: str, op: str) -> None:
        self.case = cases.prepare(backend, shape, op, "float32", threads=THREADS, warmup=self.warmup)
        self._env = self.case.environment()
        self._env.__enter__()

    def teardown(self, *params: str) -> None:
        env = getattr(self, "_env", None)
        if env is not None:
            env.__exit__(None, None, None)


class Time(_Case):
    params = (list(backends.BACKENDS), SHAPES, list(shapes.OPS))
    param_names = ("backend", "shape", "op")

    def setup(self, backend: str, shape: str, op: str) -> None:
        self._prepare(backend, shape, op)

    def time_op(self, backend: str, shape: str, op: str) -> None:
        self.case.run()


class BandwidthFraction(_Case):
    params = (list(backends.CPU_BACKENDS), SHAPES, list(shapes.OPS))
    param_names = ("backend", "shape", "op")
    rounds = 5

    def setup(self, backend: str, shape: str, op: str) -> None:
        self._prepare(backend, shape, op)
        self.copy = timing.CopyTimer(self.case.nbytes, THREADS)

    def teardown(self, *params: str) -> None:
        copy = getattr(self, "copy", None)
        if copy is not None:
            copy.close()
        super().teardown(*params)

    def track_copy_fraction(self, backend: str, shape: str, op: str) -> float:
        return timing.bandwidth_fraction(self.case, self.copy, rounds=self.rounds)

    track_copy_fraction.unit = "fraction of copy bandwidth"  # type: ignore[attr-defined]


class PeakMemTrainForward(_Case):
    params = (list(backends.CPU_BACKENDS), SHAPES)
    param_names = ("backend", "shape")
    warmup = False  # the peak RSS is the process's: one call, nothing before it

    def setup(self, backend: str, shape: str) -> None:
        self._prepare(backend, shape, "train")

    def peakmem_train_forward(self, backend: str, shape: str) -> None:
        self.result = self.case.run()


class TrainForwardMemory(_Case):
    # tracemalloc sees NumPy's buffers, not PyTorch's allocator
    params = ([b for b in backends.CPU_BACKENDS if b != backends.PEER], SHAPES)
    param_names = ("backend", "shape")

    def setup(self, backend: str, shape: str) -> None:
        self._prepare(backend, shape, "train")

    def track_peak(self, backend: str, shape: str) -> float:
        return memory.traced_memory(self.case)[0] / self.case.nbytes

    def track_retained(self, backend: str, shape: str) -> float:
        return memory.traced_memory(self.case)[1] / self.case.nbytes

    track_peak.unit = "x.nbytes"  # type: ignore[attr-defined]
    track_retained.unit = "x.nbytes"  # type: ignore[attr-defined]
