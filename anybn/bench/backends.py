"""How each benchmarked backend runs one op: anybn on each array library, PyTorch, the naive code.

Backends (:data:`BACKENDS`):

- ``numpy-fast``: anybn on NumPy arrays with fast paths enabled (``ANYBN_FAST_PATHS=1``):
  whatever ``anybn._fast`` selects, the generic path where nothing serves;
- ``numpy-generic``: anybn on NumPy with ``ANYBN_FAST_PATHS=0``, the pure array-API path;
- ``array_api_strict``, ``dask``: anybn's generic path on those libraries;
- ``torch``: the peer, PyTorch's CPU kernels called directly
  (``torch.ops.aten.native_batch_norm`` and ``native_batch_norm_backward``), channels-last
  memory for channels-last shapes, ``torch.set_num_threads(threads)``;
- ``naive``: the cs231n-style NumPy code of :mod:`anybn.bench.naive`, the baseline;
- ``cupy``, ``torch-cuda``: anybn on CuPy and PyTorch's CUDA kernels, when a GPU is present.

The libraries come from :mod:`anybn.testing`'s backend table (import on first use, the
conversions from and to NumPy, the synchronization, the reason a backend is missing), so
nothing here imports torch, CuPy or Dask before a case for them is prepared.

:func:`runner` gives a :class:`Runner`: a zero-argument ``run`` that performs the op once
and returns only when its result exists (Dask: the graph is built and ``.compute()``-d
inside ``run``; GPUs: the stream is synchronized inside ``run``). A training forward's
``run`` returns y and what the implementation keeps for backward (anybn's
``BatchNormSaved``, PyTorch's saved mean and invstd, the naive code's cache), so that
memory measurements see what a training step holds on to.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import numpy as np

from .. import testing
from .shapes import EPS, Data, Shape

__all__ = [
    "ANYBN_BACKENDS",
    "BACKENDS",
    "CPU_BACKENDS",
    "GPU_BACKENDS",
    "PEER",
    "Runner",
    "environ",
    "runner",
]

GPU_BACKENDS = ("cupy", "torch-cuda")
CPU_BACKENDS = ("numpy-fast", "numpy-generic", "array_api_strict", "dask", "torch", "naive")
BACKENDS = CPU_BACKENDS + GPU_BACKENDS
PEER = "torch"
ANYBN_BACKENDS = ("numpy-fast", "numpy-generic", "array_api_strict", "dask", "cupy")

_FAST_PATHS = "ANYBN_FAST_PATHS"


class Runner(NamedTuple):
    """One backend's way of running one (shape, op, dtype) on prepared inputs."""

    run: Callable[[], tuple]  # the op once, finished (computed, synchronized): its outputs
    to_host: Callable[[Any], np.ndarray]  # one output as NumPy, in x's layout
    env: Mapping[str, str]  # environment variables to hold while it runs
    path: str  # what serves it: "generic", a fast path's name, "aten", "naive"
    device: str  # "cpu" or "gpu"


@contextlib.contextmanager
def environ(env: Mapping[str, str]) -> Iterator[None]:
    """Hold ``env`` in ``os.environ``; restore what was there after."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def runner(backend: str, shape: Shape, op: str, dtype: str, data: Data, threads: int) -> Runner:
    """Convert ``data`` for ``backend`` (outside any timing) and return how to run ``op`` on it.

    Raises :class:`anybn.testing.Unavailable` when the backend cannot run it here, and
    ValueError for a backend not in :data:`BACKENDS`.
    """
    if backend not in _RUNNERS:
        raise ValueError(f"backend {backend!r}: expected one of {', '.join(BACKENDS)}")
    return _RUNNERS[backend](backend, shape, op, dtype, data, threads)


# anybn on any array-API backend: convert the NumPy inputs, call the functional API,
# `finish` the outputs (compute, synchronize), convert them back with `to_host`.


def _anybn(
    shape: Shape,
    op: str,
    data: Data,
    be: testing.Backend,
    env: Mapping[str, str],
    finish: Callable[[tuple], tuple],
    device: str = "cpu",
    after_forward: Callable[[Any], Any] = lambda saved: saved,
    to_host: Callable[[Any], np.ndarray] | None = None,
) -> Runner:
    import array_api_compat

    import anybn
    from anybn import _fast

    axis = shape.axis
    x = be.asarray(data.x)
    g, b = be.asarray(data.gamma), be.asarray(data.beta)
    act = "relu" if op in ("train_relu", "backward_relu") else None
    if op in ("train", "train_relu"):

        def run() -> tuple:
            y, saved = anybn.batch_norm_train(x, g, b, axis=axis, eps=EPS, activation=act)
            return (*finish((y,)), saved)  # saved: what backward needs, kept as a layer would

    elif op == "eval":
        rm, rv = be.asarray(data.running_mean), be.asarray(data.running_var)

        def run() -> tuple:
            return finish((anybn.batch_norm_eval(x, rm, rv, g, b, axis=axis, eps=EPS),))

    else:
        dy = be.asarray(data.dy)
        with environ(env):  # the forward on the same path as the timed backward
            _, saved = anybn.batch_norm_train(x, g, b, axis=axis, eps=EPS, activation=act)
        saved = after_forward(saved)

        def run() -> tuple:
            return finish(anybn.batch_norm_backward(dy, saved))

    with environ(env):
        step = op.removesuffix("_relu")
        fast = _fast.select(step, array_api_compat.array_namespace(x), x)  # type: ignore[arg-type]
    path = "generic" if fast is None else str(getattr(fast, "name", type(fast).__name__))
    return Runner(run, be.to_numpy if to_host is None else to_host, env, path, device)


def _unchanged(out: tuple) -> tuple:
    return out


def _nothing() -> None:
    pass


def _numpy(backend: str, shape: Shape, op: str, dtype: str, data: Data, threads: int) -> Runner:
    # ANYBN_NUM_THREADS: the CPU fast path's thread count, the peer's torch.set_num_threads
    env = {_FAST_PATHS: "1" if backend == "numpy-fast" else "0", "ANYBN_NUM_THREADS": str(threads)}
    return _anybn(shape, op, data, testing.backend("numpy"), env, _unchanged)


def _strict(backend: str, shape: Shape, op: str, dtype: str, data: Data, threads: int) -> Runner:
    be = testing.backend("array_api_strict")
    try:
        be.dtype(dtype)
    except TypeError:
        raise testing.Unavailable(f"array_api_strict has no {dtype}") from None
    return _anybn(shape, op, data, be, {_FAST_PATHS: "0"}, _unchanged)


def _dask_chunks(dims: tuple[int, ...], itemsize: int) -> tuple[int, ...]:
    # split the batch axis into pieces of about 8 MiB, so the reductions cross chunks and the
    # threaded scheduler has work for every worker, without a graph of thousands of tasks;
    # the (C,) vectors stay whole
    if len(dims) < 2:
        return dims
    pieces = max(1, min(dims[0], round(math.prod(dims) * itemsize / 2**23)))
    return (math.ceil(dims[0] / pieces), *dims[1:])


def _dask(backend: str, shape: Shape, op: str, dtype: str, data: Data, threads: int) -> Runner:
    be = dataclasses.replace(testing.backend("dask"), chunks=_dask_chunks)
    import dask
    import dask.array as da

    def finish(out: tuple) -> tuple:
        present = [o for o in out if o is not None]
        done = iter(dask.compute(*present, scheduler="threads", num_workers=threads))
        return tuple(None if o is None else next(done) for o in out)

    def after_forward(saved: Any) -> Any:
        # the saved (C,) statistics as computed arrays, so backward does not redo the forward
        names = [f.name for f in dataclasses.fields(saved)
                 if f.name != "x" and dask.is_dask_collection(getattr(saved, f.name))]
        values = dask.compute(*(getattr(saved, n) for n in names), scheduler="sync")
        return dataclasses.replace(saved, **{n: da.from_array(v) for n, v in zip(names, values)})

    # `finish` computes: the outputs are NumPy arrays already
    return _anybn(shape, op, data, be, {_FAST_PATHS: "0"}, finish, after_forward=after_forward,
                  to_host=np.asarray)


def _cupy(backend: str, shape: Shape, op: str, dtype: str, data: Data, threads: int) -> Runner:
    be = testing.backend("cupy")

    def finish(out: tuple) -> tuple:
        be.synchronize(*out)
        return out

    return _anybn(shape, op, data, be, {}, finish, device="gpu")


def _torch_perm(shape: Shape) -> tuple[int, ...] | None:
    # channels-last data as a torch (N, C, *spatial) tensor in channels_last memory
    n = len(shape.dims)
    return (0, n - 1, *range(1, n - 1)) if shape.channels_last else None


def _torch(backend: str, shape: Shape, op: str, dtype: str, data: Data, threads: int) -> Runner:
    cuda = backend == "torch-cuda"
    be = testing.backend("torch:cuda" if cuda else "torch")
    torch = be.module
    if not cuda:
        torch.set_num_threads(threads)
    perm = _torch_perm(shape)
    inverse = () if perm is None else tuple(int(i) for i in np.argsort(perm))

    def convert(a: np.ndarray) -> Any:
        t = be.asarray(a)  # contiguous in the data's layout, on the device
        if perm is not None and a.ndim == len(perm):
            t = t.permute(*perm)  # NHWC memory seen as NCHW: channels_last
        return t

    def to_host(t: Any) -> np.ndarray:
        if perm is not None and t.ndim == len(perm):
            t = t.permute(*inverse)
        return be.to_numpy(t)

    # on the CPU, nothing to wait for: no call at all inside the timed region
    sync = be.synchronize if cuda else _nothing

    aten = torch.ops.aten
    x, g, b = convert(data.x), convert(data.gamma), convert(data.beta)
    if op == "train":

        def run() -> tuple:
            out = aten.native_batch_norm(x, g, b, None, None, True, 0.1, EPS)  # y, mean, invstd
            sync()
            return tuple(out)

    elif op == "eval":
        rm, rv = convert(data.running_mean), convert(data.running_var)

        def run() -> tuple:
            y, _, _ = aten.native_batch_norm(x, g, b, rm, rv, False, 0.1, EPS)
            sync()
            return (y,)

    elif op == "train_relu":  # what torch.nn.BatchNorm2d then torch.nn.ReLU run

        def run() -> tuple:
            y, mean, invstd = aten.native_batch_norm(x, g, b, None, None, True, 0.1, EPS)
            z = aten.relu(y)
            sync()
            return z, mean, invstd

    elif op == "backward_relu":  # autograd's backward of the two: ReLU's, then BN's
        dy = convert(data.dy)
        y, save_mean, save_invstd = aten.native_batch_norm(x, g, b, None, None, True, 0.1, EPS)
        z = aten.relu(y)  # ReLU keeps its output for its backward
        mask = [True, True, True]

        def run() -> tuple:
            dz = aten.threshold_backward(dy, z, 0)
            out = aten.native_batch_norm_backward(dz, x, g, None, None, save_mean, save_invstd, True, EPS, mask)
            sync()
            return tuple(out)

    else:
        dy = convert(data.dy)
        _, save_mean, save_invstd = aten.native_batch_norm(x, g, b, None, None, True, 0.1, EPS)
        mask = [True, True, True]

        def run() -> tuple:
            out = aten.native_batch_norm_backward(dy, x, g, None, None, save_mean, save_invstd,
                                                  True, EPS, mask)
            sync()
            return tuple(out)

    return Runner(run, to_host, {}, "aten", "gpu" if cuda else "cpu")


def _naive(backend: str, shape: Shape, op: str, dtype: str, data: Data, threads: int) -> Runner:
    from . import naive

    if len(shape.dims) == 2:
        fwd, bwd, ev = naive.batchnorm_forward, naive.batchnorm_backward_alt, naive.batchnorm_eval
    elif shape.channels_last:
        fwd, bwd, ev = (naive.spatial_batchnorm_forward_nhwc, naive.spatial_batchnorm_backward_nhwc,
                        naive.spatial_batchnorm_eval_nhwc)
    elif len(shape.dims) == 4:
        fwd, bwd, ev = (naive.spatial_batchnorm_forward_nchw, naive.spatial_batchnorm_backward_nchw,
                        naive.spatial_batchnorm_eval_nchw)
    else:
        raise testing.Unavailable(f"naive: written for 2-D, NCHW and channels-last inputs, not {shape.layout}")
    if op not in ("train", "backward", "eval"):
        raise testing.Unavailable(f"naive: no fused activation ({op})")
    x, g, b = data.x, data.gamma, data.beta
    if op == "train":

        def run() -> tuple:
            return fwd(x, g, b, EPS)  # (out, cache): the cache is part of what it costs

    elif op == "eval":
        rm, rv = data.running_mean, data.running_var

        def run() -> tuple:
            return (ev(x, rm, rv, g, b, EPS),)

    else:
        dy = data.dy
        _, cache = fwd(x, g, b, EPS)

        def run() -> tuple:
            return bwd(dy, cache)

    return Runner(run, np.asarray, {}, "naive", "cpu")


_RUNNERS: dict[str, Callable[..., Runner]] = {
    "numpy-fast": _numpy,
    "numpy-generic": _numpy,
    "array_api_strict": _strict,
    "dask": _dask,
    "torch": _torch,
    "naive": _naive,
    "cupy": _cupy,
    "torch-cuda": _torch,
}
