"""The benchmark cases: one definition for the asv suite, pytest-benchmark and ``anybn bench``.

A case is one (backend, shape, op, dtype). :func:`prepare` builds it: the inputs converted
to the backend outside any timing, the backward's forward pass already done, and a
zero-argument ``run`` that performs the op once and returns only when its result exists. A
backend that cannot run here raises :class:`Unavailable` (:class:`anybn.testing.Unavailable`,
a ``NotImplementedError``, which asv reports as a skip). :func:`check` compares a case's
outputs with :func:`expected`, the float64 reference of :mod:`anybn.testing` on the case's
inputs.

The other jobs live next door: :mod:`~anybn.bench.shapes` (ops, shapes, inputs, bytes
moved), :mod:`~anybn.bench.backends` (how each backend runs an op), :mod:`~anybn.bench.timing`
(calls per sample, rounds, the copy, stability of the samples) and
:mod:`~anybn.bench.memory` (bytes allocated).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .. import testing
from .backends import environ, runner
from .shapes import ALL_OPS, EPS, OP_LABELS, Shape, make_data, op_data, parse_shape, traffic_bytes

__all__ = ["Case", "Unavailable", "check", "expected", "prepare", "tolerance"]

Unavailable = testing.Unavailable

_N_OUTPUTS = {"train": 1, "eval": 1, "backward": 3, "train_relu": 1, "backward_relu": 3}


@dataclasses.dataclass(eq=False)
class Case:
    """One prepared (backend, shape, op, dtype): call ``run`` inside ``environment()``."""

    backend: str
    shape: Shape
    op: str
    dtype: str
    run: Callable[[], tuple]  # the op once, finished (computed, synchronized): its outputs
    to_host: Callable[[Any], np.ndarray]  # one output as NumPy, in x's layout
    env: Mapping[str, str]  # environment variables held while timing
    path: str  # what serves it: "generic", a fast path's name, "aten", "naive"
    nbytes: int  # of x
    device: str = "cpu"

    @property
    def name(self) -> str:
        return f"{self.backend} {OP_LABELS[self.op]} {self.shape} {self.dtype}"

    @property
    def traffic(self) -> int:
        return traffic_bytes(self.op, self.nbytes)

    def to_numpy(self, outputs: tuple) -> tuple[np.ndarray, ...]:
        """``run``'s results as NumPy: (y,) or (dx, dweight, dbias).

        A training forward's further outputs (what it keeps for backward) are left out.
        """
        return tuple(self.to_host(a) for a in outputs[:_N_OUTPUTS[self.op]])

    def environment(self) -> contextlib.AbstractContextManager[None]:
        """Hold ``env`` (e.g. ``ANYBN_FAST_PATHS=0``) in ``os.environ``; restore it after."""
        return environ(self.env)

    def timer(self, number: int = 1) -> Callable[[], float]:
        """A function timing ``number`` calls of ``run``: seconds per call.

        The environment is switched and the last result freed outside the timed region.
        """

        def timed() -> float:
            with self.environment():
                run = self.run
                # one untimed call first: what ran before it must not land in this sample
                # (PyTorch's OpenMP and OpenBLAS's workers spin on a core for a while after
                # each call; measured here, that made the next case up to 2x slower)
                del_out = run()
                del del_out
                t0 = time.perf_counter()
                for _ in range(number):
                    out = run()
                elapsed = time.perf_counter() - t0
            del out
            return elapsed / number

        return timed


def prepare(
    backend: str,
    shape: str | Shape,
    op: str,
    dtype: str = "float32",
    *,
    threads: int = 2,
    warmup: bool = True,
) -> Case:
    """Build the case; raise :class:`Unavailable` when ``backend`` cannot run it here.

    ``threads`` sets PyTorch's intra-op threads, Dask's workers and anybn's CPU fast path
    threads (``ANYBN_NUM_THREADS``, held in the case's environment). ``warmup`` runs the op
    once (JIT compilation, first-touch allocations) before returning.
    """
    shape = parse_shape(shape)
    if op not in ALL_OPS:
        raise ValueError(f"op {op!r}: expected one of {', '.join(ALL_OPS)}")
    data = op_data(shape, op, dtype)
    r = runner(backend, shape, op, dtype, data, threads)
    case = Case(backend, shape, op, dtype, r.run, r.to_host, r.env, r.path, data.x.nbytes, r.device)
    if warmup:
        with case.environment():
            case.run()
    return case


# ------------------------------------------------------------------------- correctness


def expected(shape: str | Shape, op: str, dtype: str = "float32") -> tuple[np.ndarray, ...]:
    """The op's outputs in float64 on :func:`~anybn.bench.shapes.make_data`'s inputs: (y,) or (dx, dgamma, dbeta).

    From :mod:`anybn.testing`'s reference; the last two are cached.
    """
    if op not in ALL_OPS:
        raise ValueError(f"op {op!r}: expected one of {', '.join(ALL_OPS)}")
    shape = parse_shape(shape)
    make_data(shape, dtype)  # validates dtype
    return _expected(shape, op, dtype)


@functools.lru_cache(maxsize=2)
def _expected(shape: Shape, op: str, dtype: str) -> tuple[np.ndarray, ...]:
    d, axis = op_data(shape, op, dtype), shape.axis
    if op == "eval":
        return (testing.reference_eval(d.x, d.running_mean, d.running_var, d.gamma, d.beta, axis=axis, eps=EPS),)
    if op == "train":
        return (testing.reference_train(d.x, d.gamma, d.beta, axis=axis, eps=EPS),)
    if op == "backward":
        return testing.reference_backward(d.dy, d.x, d.gamma, axis=axis, eps=EPS)
    z = testing.reference_train(d.x, d.gamma, d.beta, axis=axis, eps=EPS)
    if op == "train_relu":
        return (np.maximum(z, 0.0),)
    # backward_relu: dy through the ReLU (passed where z > 0), then through BN
    return testing.reference_backward(np.where(z > 0, d.dy, 0.0), d.x, d.gamma, axis=axis, eps=EPS)


def tolerance(dtype: str) -> float:
    """Allowed error relative to the largest magnitude of each reference output."""
    return {"float64": 1e-10, "float32": 1e-4, "float16": 1e-2}[dtype]


def check(case: Case, outputs: Any = None) -> float:
    """Largest error of the case's outputs against :func:`expected`, relative to max |expected|.

    Runs the case once when ``outputs`` is not given. Shapes must match exactly.
    """
    if outputs is None:
        with case.environment():
            outputs = case.run()
    got = case.to_numpy(outputs)
    want = expected(case.shape, case.op, case.dtype)
    worst = 0.0
    for g, w in zip(got, want, strict=True):
        if g.shape != w.shape:
            raise AssertionError(f"{case.name}: output shape {g.shape}, expected {w.shape}")
        scale = float(np.max(np.abs(w))) or 1.0
        worst = max(worst, float(np.max(np.abs(g.astype(np.float64) - w))) / scale)
    return worst
