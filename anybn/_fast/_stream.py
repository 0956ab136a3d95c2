"""Streaming (non-temporal) stores for the apply passes of outputs too large for the cache.

A plain store to a line that is not in cache first reads the line from memory (a read for
ownership), then writes it back when it is evicted: an output that cannot stay in cache
costs two transfers per byte written. A non-temporal store writes whole 64-byte lines
straight to memory, one transfer, and leaves the cache to the inputs. The CPU path uses
them for whole steps that read and write at least twice the last-level cache (see
``cpu.py``); below that, plain stores leave y in cache for whatever reads it next.
Kernel against kernel on (32, 256, 56, 56) float32 inference (98 MiB; 32 MiB L3, AMD EPYC):
7.3 -> 5.5 ms on one thread, 5.2 -> 3.9 ms on two (PyTorch: 6.4 and 5.1).

numba has no vector types, so each formula is an intrinsic that emits LLVM IR for one
64-byte vector: unaligned loads of the inputs (and of per-feature coefficients, for rows),
the arithmetic with the kernels' fast-math flags (``reassoc``, ``contract``), and one
aligned store marked ``!nontemporal`` (``vmovntps`` on x86). LLVM may contract and order
the plain loops' arithmetic otherwise, so the two agree within a few roundings, not to
the bit (``tests/test_stream.py`` bounds the difference). ``_affine_span`` and
``_grad_span`` cover a contiguous run: plain stores up to the output's next 64-byte
boundary, vectors, plain stores for the rest. The CPU path streams only runs of whole
lines into 64-byte aligned outputs, so that no plain store lands in a line beside streamed
ones (that stalled: rows of 64 float32 offset by 32 bytes ran 9x slower); the spans stay
correct for any alignment.

Formulas (``act``: 0 none, 1 ReLU; the kernels keep plain stores for other activations):

- affine: ``y = act((x - p) * s + t)``;
- grad: ``dx = k * (g + a * (x - p) + b)`` with ``g = dy``, or with ReLU
  ``g = 0 if (x - zp) * zs + zt <= 0 else dy`` (PyTorch's relu and threshold_backward).

Coefficients are scalars (planes: one feature per run) or 1-D arrays read at the run's
feature offset (rows: features contiguous). The pass functions at the end (``affine_rows``
and friends) take their flat views and addresses once per range: a reshape per row cost
more than the row's work.

numba's on-disk cache of ``_cpu_kernels`` is keyed on that file alone: after editing this
one, delete ``__pycache__/*.nbi`` and ``*.nbc`` beside it (an installed release has fresh
files throughout).
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba as nb
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_LINE = 64  # bytes per vector and per cache line
_FLAGS = ("reassoc", "contract")  # as the kernels' fastmath


def _typed_store(inputs: int, formula: Callable[..., Any], vector: bool, typingctx: Any, like: Any, out: Any,
                 i: Any, *rest: Any) -> Any:
    """The (signature, codegen) of an intrinsic ``f(like, out, i, *inputs, *coefficients, c, act)``
    that stores ``formula`` of the inputs at element ``i`` into ``out``: one 64-byte vector
    with a non-temporal store (``vector``; ``out`` + i 64-byte aligned), or one element with
    a plain store. ``like``: a scalar of the arrays' float dtype; ``out`` and the inputs:
    addresses of C-contiguous arrays of that dtype. Coefficients are scalars of the dtype
    (broadcast) or addresses (read at element ``c``). ``act``: 0 none, 1 ReLU, chosen per
    call by a select (the ReLU's coefficients must be readable either way).

    Addresses, not arrays: an array passed per row costs numba a reference-count increment
    and decrement each (the rows backward with ten arrays per row ran 5x slower on one thread)."""
    if not isinstance(like, types.Float):
        return None
    for t in (out, i, *rest[:inputs], *rest[-2:]):
        if not isinstance(t, types.Integer):
            return None
    for t in rest[inputs:-2]:
        if t != like and not isinstance(t, types.Integer):
            return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        element = context.get_value_type(signature.args[0])
        size = context.get_abi_sizeof(element)
        lanes = _LINE // size if vector else 1
        kind = ir.VectorType(element, lanes) if vector else element
        i, c = args[2], args[-2]
        relu = builder.icmp_signed("!=", args[-1], ir.Constant(args[-1].type, 0))

        def pointer(address: Any, index: Any) -> Any:
            base = builder.inttoptr(address, element.as_pointer())
            return builder.bitcast(builder.gep(base, [index]), kind.as_pointer())

        def splat(value: Any) -> Any:
            if not vector:
                return value
            one = builder.insert_element(ir.Constant(kind, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
            zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            return builder.shuffle_vector(one, ir.Constant(kind, ir.Undefined), zeros)

        values = []
        for position, (t, v) in enumerate(zip(signature.args[3:-2], args[3:-2])):
            if position < inputs:
                values.append(builder.load(pointer(v, i), align=size))
            elif isinstance(t, types.Integer):
                values.append(builder.load(pointer(v, c), align=size))
            else:
                values.append(splat(v))
        zero = ir.Constant(kind, [0.0] * lanes) if vector else ir.Constant(kind, 0.0)
        result = formula(_Ops(builder, zero, relu), *values)
        store = builder.store(result, pointer(args[1], i), align=_LINE if vector else size)
        if vector:
            store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(like, out, i, *rest), codegen


class _Ops:
    """Arithmetic in LLVM IR, on vectors or scalars, with the kernels' fast-math flags."""

    def __init__(self, builder: Any, zero: Any, relu: Any) -> None:
        self.b = builder
        self.zero = zero
        self.relu = relu  # an i1: whether the ReLU applies

    def sub(self, u: Any, v: Any) -> Any:
        return self.b.fsub(u, v, flags=_FLAGS)

    def mul(self, u: Any, v: Any) -> Any:
        return self.b.fmul(u, v, flags=_FLAGS)

    def add(self, u: Any, v: Any) -> Any:
        return self.b.fadd(u, v, flags=_FLAGS)

    def relu_pass(self, z: Any, value: Any) -> Any:
        """With the ReLU, 0 where z <= 0, else value (a NaN z passes value), as ``_act`` and
        ``_act_grad``; without, value."""
        passed = self.b.select(self.b.fcmp_ordered("<=", z, self.zero, flags=_FLAGS), self.zero, value)
        return self.b.select(self.relu, passed, value)


def _affine(o: _Ops, x: Any, p: Any, s: Any, t: Any) -> Any:
    return o.add(o.mul(o.sub(x, p), s), t)


def _affine_act(o: _Ops, x: Any, p: Any, s: Any, t: Any) -> Any:
    z = _affine(o, x, p, s, t)
    return o.relu_pass(z, z)


def _grad_act(o: _Ops, x: Any, dy: Any, p: Any, a: Any, b: Any, k: Any, zp: Any, zs: Any, zt: Any) -> Any:
    g = o.relu_pass(_affine(o, x, zp, zs, zt), dy)
    return o.mul(k, o.add(o.add(g, o.mul(a, o.sub(x, p))), b))


# f(like, out, i, x, p, s, t, c, act) and f(like, out, i, x, dy, p, a, b, k, zp, zs, zt, c, act):
# a streamed vector (*_vector) or one element with a plain store (*_one)


@intrinsic
def _affine_vector(typingctx, like, out, i, x, p, s, t, c, act):  # type: ignore[no-untyped-def]
    return _typed_store(1, _affine_act, True, typingctx, like, out, i, x, p, s, t, c, act)


@intrinsic
def _affine_one(typingctx, like, out, i, x, p, s, t, c, act):  # type: ignore[no-untyped-def]
    return _typed_store(1, _affine_act, False, typingctx, like, out, i, x, p, s, t, c, act)


@intrinsic
def _grad_vector(typingctx, like, out, i, x, dy, p, a, b, k, zp, zs, zt, c, act):  # type: ignore[no-untyped-def]
    return _typed_store(2, _grad_act, True, typingctx, like, out, i, x, dy, p, a, b, k, zp, zs, zt, c, act)


@intrinsic
def _grad_one(typingctx, like, out, i, x, dy, p, a, b, k, zp, zs, zt, c, act):  # type: ignore[no-untyped-def]
    return _typed_store(2, _grad_act, False, typingctx, like, out, i, x, dy, p, a, b, k, zp, zs, zt, c, act)


@nb.njit(inline="always")
def _head(out, i, n, size):  # pragma: no cover - compiled
    """Elements from element i of the array at address out to its next 64-byte boundary, at most n."""
    return min(n, ((_LINE - (out + i * size) % _LINE) % _LINE) // size)


@nb.njit(inline="always")
def _affine_span(like, size, out, x, i, n, p, s, t, c, act):  # pragma: no cover - compiled
    """y[i:i+n] = act((x[i:i+n] - p) * s + t) for y at address out, x at address x: plain
    stores up to y's next 64-byte boundary, streamed vectors, plain stores for the rest.
    p, s, t: scalars, or addresses of 1-D arrays read at c + j for element i + j."""
    head = _head(out, i, n, size)
    lanes = _LINE // size
    j = 0
    while j < head:
        _affine_one(like, out, i + j, x, p, s, t, c + j, act)
        j += 1
    while j + lanes <= n:
        _affine_vector(like, out, i + j, x, p, s, t, c + j, act)
        j += lanes
    while j < n:
        _affine_one(like, out, i + j, x, p, s, t, c + j, act)
        j += 1


@nb.njit(inline="always")
def _grad_span(like, size, out, x, dy, i, n, p, a, b, k, zp, zs, zt, c, act):  # pragma: no cover - compiled
    """dx[i:i+n] = k * (g + a * (x - p) + b), g = dy, or ReLU's where act is 1, as
    ``_affine_span`` (zp, zs, zt: the forward's coefficients; read, and unused, without ReLU)."""
    head = _head(out, i, n, size)
    lanes = _LINE // size
    j = 0
    while j < head:
        _grad_one(like, out, i + j, x, dy, p, a, b, k, zp, zs, zt, c + j, act)
        j += 1
    while j + lanes <= n:
        _grad_vector(like, out, i + j, x, dy, p, a, b, k, zp, zs, zt, c + j, act)
        j += lanes
    while j < n:
        _grad_one(like, out, i + j, x, dy, p, a, b, k, zp, zs, zt, c + j, act)
        j += 1


# ---- the passes' streaming forms (x, dy and the outputs C-contiguous, of one float dtype)


@nb.njit(inline="always")
def affine_rows(x, coef, act, lo, hi, y):  # pragma: no cover - compiled
    """y = act((x - coef[0]) * coef[1] + coef[2]) over rows lo..hi of (R, C) x, streaming."""
    features = x.shape[1]
    like, size = y.dtype.type(0), y.itemsize
    out, xa = y.ctypes.data, x.ctypes.data
    p, s, t = coef[0].ctypes.data, coef[1].ctypes.data, coef[2].ctypes.data
    for r in range(lo, hi):
        _affine_span(like, size, out, xa, r * features, features, p, s, t, 0, act)


@nb.njit(inline="always")
def affine_planes(x, coef, act, lo, hi, y):  # pragma: no cover - compiled
    """As ``affine_rows`` over planes lo..hi of (N, C, L) x."""
    features, inner = x.shape[1], x.shape[2]
    like, size = y.dtype.type(0), y.itemsize
    out, xa = y.ctypes.data, x.ctypes.data
    for u in range(lo, hi):
        c = u % features
        _affine_span(like, size, out, xa, u * inner, inner, coef[0, c], coef[1, c], coef[2, c], 0, act)


@nb.njit(inline="always")
def grad_rows(x, dy, pivot, coef, act, zp, zs, zt, lo, hi, dx):  # pragma: no cover - compiled
    """dx = k * (g + a * (x - pivot) + b) over rows lo..hi, (a, b, k) = coef[:3], g = dy or
    ReLU's (act 1, z = (x - zp) * zs + zt), streaming."""
    features = x.shape[1]
    like, size = dx.dtype.type(0), dx.itemsize
    out, xa, ga = dx.ctypes.data, x.ctypes.data, dy.ctypes.data
    p, a, b, k = pivot.ctypes.data, coef[0].ctypes.data, coef[1].ctypes.data, coef[2].ctypes.data
    zpa, zsa, zta = (zp.ctypes.data, zs.ctypes.data, zt.ctypes.data) if act else (p, a, b)  # readable stand-ins
    for r in range(lo, hi):
        _grad_span(like, size, out, xa, ga, r * features, features, p, a, b, k, zpa, zsa, zta, 0, act)


@nb.njit(inline="always")
def grad_planes(x, dy, pivot, coef, act, zp, zs, zt, lo, hi, dx):  # pragma: no cover - compiled
    """As ``grad_rows`` over planes lo..hi of (N, C, L) x."""
    features, inner = x.shape[1], x.shape[2]
    like, size = dx.dtype.type(0), dx.itemsize
    out, xa, ga = dx.ctypes.data, x.ctypes.data, dy.ctypes.data
    for u in range(lo, hi):
        c = u % features
        p = pivot[c]
        zpc, zsc, ztc = (zp[c], zs[c], zt[c]) if act else (p, p, p)  # unused without ReLU
        _grad_span(like, size, out, xa, ga, u * inner, inner, p, coef[0, c], coef[1, c], coef[2, c], zpc, zsc,
                   ztc, 0, act)
