"""Streaming (non-temporal) stores for the apply passes of outputs larger than the cache.

A plain store to a line that is not in cache first reads the line from memory (a read for
ownership), then writes it back when it is evicted: an output that cannot stay in cache
costs two transfers per byte written. A non-temporal store writes whole 64-byte lines
straight to memory, one transfer, and leaves the cache to the inputs. The CPU path uses
them where the output is at least as large as the last-level cache (see ``cpu.py``), the
rule glibc's ``memcpy`` follows; below that, plain stores leave y in cache for whatever
reads it next. Measured on (32, 256, 56, 56) float32 inference (98 MiB, 32 MiB L3,
AMD EPYC): 7.3 -> 5.5 ms on one thread, 5.2 -> 3.9 ms on two (PyTorch: 6.4 and 5.1).

numba has no vector types, so each formula is an intrinsic that emits LLVM IR for one
64-byte vector: unaligned loads of the inputs (and of per-feature coefficients, for rows),
the arithmetic with the same fast-math flags as the kernels (``reassoc``, ``contract``:
the same fused multiply-adds, so the bits equal the plain loops', which tests check), and
one aligned store marked ``!nontemporal`` (``vmovntps`` on x86). The ``*_run`` helpers
cover a contiguous run: plain stores up to the first 64-byte boundary of the output, then
vectors, then the rest plainly.

Formulas (``act``: 0 none, 1 ReLU; the kernels keep plain stores for other activations):

- affine: ``y = act((x - p) * s + t)``;
- grad: ``dx = k * (g + a * (x - p) + b)`` with ``g = dy``, or with ReLU
  ``g = dy if (x - zp) * zs + zt > 0 else dy * 0``.

Coefficients are scalars (planes: one feature per run) or 1-D arrays read at the run's
feature offset (rows: features contiguous).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numba as nb
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

_LINE = 64  # bytes per vector and per cache line
_FLAGS = ("reassoc", "contract")  # as the kernels' fastmath


def _vector_store(inputs: int, formula: Callable[..., Any], typingctx: Any, like: Any, out: Any, i: Any,
                  *rest: Any) -> Any:
    """The (signature, codegen) of an intrinsic ``f(like, out, i, *inputs, *coefficients, c)``
    that stores ``formula`` of one 64-byte vector of the inputs at element ``i`` into ``out``
    with a non-temporal store. ``like``: a scalar of the arrays' float dtype; ``out`` and the
    inputs: addresses of C-contiguous arrays of that dtype (``out`` + i 64-byte aligned).
    Coefficients are scalars of the dtype (broadcast) or addresses (read at element ``c``).

    Addresses rather than arrays: array arguments cost reference counting on every call
    (numba's NRT; 8.7 ms instead of ~1 ms for rows of 64 float32 over 25 MiB)."""
    if not isinstance(like, types.Float):
        return None
    for t in (out, i, *rest[:inputs], rest[-1]):
        if not isinstance(t, types.Integer):
            return None
    for t in rest[inputs:-1]:
        if t != like and not isinstance(t, types.Integer):
            return None

    def codegen(context: Any, builder: Any, signature: Any, args: Any) -> Any:
        element = context.get_value_type(signature.args[0])
        size = context.get_abi_sizeof(element)
        lanes = _LINE // size
        vector = ir.VectorType(element, lanes)
        i, c = args[2], args[-1]

        def pointer(address: Any, index: Any) -> Any:
            base = builder.inttoptr(address, element.as_pointer())
            return builder.bitcast(builder.gep(base, [index]), vector.as_pointer())

        def splat(value: Any) -> Any:
            one = builder.insert_element(ir.Constant(vector, ir.Undefined), value, ir.Constant(ir.IntType(32), 0))
            zeros = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            return builder.shuffle_vector(one, ir.Constant(vector, ir.Undefined), zeros)

        values = []
        for position, (t, v) in enumerate(zip(signature.args[3:-1], args[3:-1])):
            if position < inputs:
                values.append(builder.load(pointer(v, i), align=size))
            elif isinstance(t, types.Integer):
                values.append(builder.load(pointer(v, c), align=size))
            else:
                values.append(splat(v))
        store = builder.store(formula(_Ops(builder, vector), *values), pointer(args[1], i), align=_LINE)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)]))
        return context.get_dummy_value()

    return types.void(like, out, i, *rest), codegen


class _Ops:
    """Vector arithmetic in LLVM IR with the kernels' fast-math flags."""

    def __init__(self, builder: Any, vector: Any) -> None:
        self.b = builder
        self.zero = ir.Constant(vector, [0.0] * vector.count)

    def sub(self, u: Any, v: Any) -> Any:
        return self.b.fsub(u, v, flags=_FLAGS)

    def mul(self, u: Any, v: Any) -> Any:
        return self.b.fmul(u, v, flags=_FLAGS)

    def add(self, u: Any, v: Any) -> Any:
        return self.b.fadd(u, v, flags=_FLAGS)

    def pass_positive(self, z: Any, value: Any) -> Any:
        """value where z > 0, else value * 0 (NaN stays NaN): ``_act`` / ``_act_grad`` of ReLU."""
        return self.b.select(self.b.fcmp_ordered(">", z, self.zero, flags=_FLAGS), value, self.mul(value, self.zero))


def _affine(o: _Ops, x: Any, p: Any, s: Any, t: Any) -> Any:
    return o.add(o.mul(o.sub(x, p), s), t)


def _grad(o: _Ops, x: Any, dy: Any, p: Any, a: Any, b: Any, k: Any) -> Any:
    return o.mul(k, o.add(o.add(dy, o.mul(a, o.sub(x, p))), b))


def _affine_relu(o: _Ops, x: Any, p: Any, s: Any, t: Any) -> Any:
    return o.pass_positive(_affine(o, x, p, s, t), _affine(o, x, p, s, t))


def _grad_relu(o: _Ops, x: Any, dy: Any, p: Any, a: Any, b: Any, k: Any, zp: Any, zs: Any, zt: Any) -> Any:
    return _grad(o, x, o.pass_positive(_affine(o, x, zp, zs, zt), dy), p, a, b, k)


@intrinsic
def _affine_vector(typingctx, like, out, i, x, p, s, t, c):  # type: ignore[no-untyped-def]
    return _vector_store(1, _affine, typingctx, like, out, i, x, p, s, t, c)


@intrinsic
def _affine_relu_vector(typingctx, like, out, i, x, p, s, t, c):  # type: ignore[no-untyped-def]
    return _vector_store(1, _affine_relu, typingctx, like, out, i, x, p, s, t, c)


@intrinsic
def _grad_vector(typingctx, like, out, i, x, dy, p, a, b, k, c):  # type: ignore[no-untyped-def]
    return _vector_store(2, _grad, typingctx, like, out, i, x, dy, p, a, b, k, c)


@intrinsic
def _grad_relu_vector(typingctx, like, out, i, x, dy, p, a, b, k, zp, zs, zt, c):  # type: ignore[no-untyped-def]
    return _vector_store(2, _grad_relu, typingctx, like, out, i, x, dy, p, a, b, k, zp, zs, zt, c)


@nb.njit(inline="always", fastmath=set(_FLAGS), error_model="numpy", boundscheck=False)
def _affine_span(xf, yf, i, n, p, s, t, vp, vs, vt, c, act):  # pragma: no cover - compiled
    """yf[i:i+n] = act((xf[i:i+n] - p) * s + t): plain stores up to yf's next 64-byte
    boundary, streaming vectors, plain stores for the rest. p, s, t: scalars, or 1-D arrays
    read at c + j for element i + j; vp, vs, vt: the same scalars, or those arrays' addresses."""
    like, size = yf.dtype.type(0), yf.itemsize
    out, xa = yf.ctypes.data, xf.ctypes.data
    head = min(n, ((_LINE - (out + i * size) % _LINE) % _LINE) // size)
    for j in range(head):
        yf[i + j] = _affine_scalar(xf[i + j], p, s, t, c + j, act)
    j = head
    lanes = _LINE // size
    if act == 0:
        while j + lanes <= n:
            _affine_vector(like, out, i + j, xa, vp, vs, vt, c + j)
            j += lanes
    else:
        while j + lanes <= n:
            _affine_relu_vector(like, out, i + j, xa, vp, vs, vt, c + j)
            j += lanes
    for j in range(j, n):
        yf[i + j] = _affine_scalar(xf[i + j], p, s, t, c + j, act)


@nb.njit(inline="always", fastmath=set(_FLAGS), error_model="numpy", boundscheck=False)
def _grad_span(xf, gf, df, i, n, p, a, b, k, zp, zs, zt, vp, va, vb, vk, vzp, vzs, vzt, c,
               act):  # pragma: no cover - compiled
    """df[i:i+n] = k * (g + a * (xf - p) + b) with g = gf, or ReLU's g where act is 1, as
    ``_affine_span`` (v*: the coefficients as the vectors take them)."""
    like, size = df.dtype.type(0), df.itemsize
    out, xa, ga = df.ctypes.data, xf.ctypes.data, gf.ctypes.data
    head = min(n, ((_LINE - (out + i * size) % _LINE) % _LINE) // size)
    for j in range(head):
        df[i + j] = _grad_scalar(xf[i + j], gf[i + j], p, a, b, k, zp, zs, zt, c + j, act)
    j = head
    lanes = _LINE // size
    if act == 0:
        while j + lanes <= n:
            _grad_vector(like, out, i + j, xa, ga, vp, va, vb, vk, c + j)
            j += lanes
    else:
        while j + lanes <= n:
            _grad_relu_vector(like, out, i + j, xa, ga, vp, va, vb, vk, vzp, vzs, vzt, c + j)
            j += lanes
    for j in range(j, n):
        df[i + j] = _grad_scalar(xf[i + j], gf[i + j], p, a, b, k, zp, zs, zt, c + j, act)


# ---- the passes' streaming forms, called once per range (a flat view costs ~15 ns per call)


@nb.njit(inline="always")
def affine_rows(x, coef, act, lo, hi, y):  # pragma: no cover - compiled
    """y = act((x - coef[0]) * coef[1] + coef[2]) over rows lo..hi of (R, C) x, streaming."""
    features = x.shape[1]
    xf, yf = x.reshape(-1), y.reshape(-1)
    p, s, t = coef[0], coef[1], coef[2]
    vp, vs, vt = p.ctypes.data, s.ctypes.data, t.ctypes.data
    for r in range(lo, hi):
        _affine_span(xf, yf, r * features, features, p, s, t, vp, vs, vt, 0, act)


@nb.njit(inline="always")
def affine_planes(x, coef, act, lo, hi, y):  # pragma: no cover - compiled
    """As ``affine_rows`` over planes lo..hi of (N, C, L) x."""
    features, inner = x.shape[1], x.shape[2]
    xf, yf = x.reshape(-1), y.reshape(-1)
    for u in range(lo, hi):
        c = u % features
        p, s, t = coef[0, c], coef[1, c], coef[2, c]
        _affine_span(xf, yf, u * inner, inner, p, s, t, p, s, t, 0, act)


@nb.njit(inline="always")
def grad_rows(x, dy, pivot, coef, act, zp, zs, zt, lo, hi, dx):  # pragma: no cover - compiled
    """dx = k * (g + a * (x - pivot) + b) over rows lo..hi, (a, b, k) = coef[:3], g = dy or
    ReLU's (act 1, z = (x - zp) * zs + zt), streaming."""
    features = x.shape[1]
    xf, gf, df = x.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    a, b, k = coef[0], coef[1], coef[2]
    vp, va, vb, vk = pivot.ctypes.data, a.ctypes.data, b.ctypes.data, k.ctypes.data
    vzp, vzs, vzt = zp.ctypes.data, zs.ctypes.data, zt.ctypes.data
    for r in range(lo, hi):
        _grad_span(xf, gf, df, r * features, features, pivot, a, b, k, zp, zs, zt, vp, va, vb, vk, vzp, vzs, vzt,
                   0, act)


@nb.njit(inline="always")
def grad_planes(x, dy, pivot, coef, act, zp, zs, zt, lo, hi, dx):  # pragma: no cover - compiled
    """As ``grad_rows`` over planes lo..hi of (N, C, L) x."""
    features, inner = x.shape[1], x.shape[2]
    xf, gf, df = x.reshape(-1), dy.reshape(-1), dx.reshape(-1)
    for u in range(lo, hi):
        c = u % features
        p, a, b, k = pivot[c], coef[0, c], coef[1, c], coef[2, c]
        zpc, zsc, ztc = (zp[c], zs[c], zt[c]) if act else (p, p, p)  # unread without ReLU
        _grad_span(xf, gf, df, u * inner, inner, p, a, b, k, zpc, zsc, ztc, p, a, b, k, zpc, zsc, ztc, 0, act)


def _at(v: Any, c: int) -> Any:
    """Coefficient v for element c of a run: v[c] of an array, v itself of a scalar (compiled only)."""
    raise NotImplementedError


@overload(_at, inline="always")
def _at_overload(v, c):  # type: ignore[no-untyped-def]  # numba compares the signatures
    if isinstance(v, types.Array):
        return lambda v, c: v[c]
    return lambda v, c: v


@nb.njit(inline="always", fastmath=set(_FLAGS), error_model="numpy", boundscheck=False)
def _affine_scalar(x, p, s, t, c, act):  # pragma: no cover - compiled
    z = (x - _at(p, c)) * _at(s, c) + _at(t, c)
    if act == 1:
        return z if z > 0 else z * 0
    return z


@nb.njit(inline="always", fastmath=set(_FLAGS), error_model="numpy", boundscheck=False)
def _grad_scalar(x, dy, p, a, b, k, zp, zs, zt, c, act):  # pragma: no cover - compiled
    g = dy
    if act == 1:
        g = dy if (x - _at(zp, c)) * _at(zs, c) + _at(zt, c) > 0 else dy * 0
    return _at(k, c) * (g + _at(a, c) * (x - _at(p, c)) + _at(b, c))
