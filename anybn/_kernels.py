"""The kernel protocol: the two stages that read and write the large arrays.

Every step of the algorithm is reductions -> coefficients -> apply. The coefficients are
O(C) array-API code, written once (``anybn._steps``). The reductions and the apply read and
write arrays the size of x; a path supplies them as a :class:`Kernels` object:

- :data:`GENERIC`, the array-API implementation, serving every library;
- fast paths (``anybn._fast``): fused compiled kernels for the arrays they serve.

A reduction returns O(C) results only. An apply is one elementwise pass that takes the
per-feature coefficients and writes a fresh array. Neither writes to its inputs.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, Protocol

import array_api_compat

from ._layout import Layout, fold, unfold
from ._moments import FeatureReducer, GradSums, Sums, grad_sums, shifted_sums
from ._namespace import Array, Namespace, compute_dtype, device_of

__all__ = ["ACTIVATIONS", "GENERIC", "Activation", "GenericKernels", "Kernels", "Step"]

Step = Literal["train", "eval", "backward"]

#: The activations an apply can fuse: z = act(BN(x) [+ residual]).
ACTIVATIONS = (None, "relu", "sigmoid")


class Activation(NamedTuple):
    """What backward needs to recompute z = (x - pivot) * scale + shift [+ residual] and
    apply act'(z) to dy: the forward apply's coefficients, and the residual it added."""

    kind: str | None  # None, "relu" or "sigmoid"
    pivot: Array | None
    scale: Array
    shift: Array | None
    residual: Array | None


class Kernels(Protocol):
    """What a path supplies: reduction and apply kernels, never coefficient arithmetic."""

    name: str
    #: True when subtracting a per-feature pivot costs the apply nothing extra (a fused
    #: kernel); False when it costs a pass (the generic path), so inference folds the mean
    #: into the shift where that is precise.
    centering_is_free: bool
    #: Optional (absent means False): ``apply`` and ``grad_apply`` honour ``out=``, a
    #: C-contiguous slice of a larger result to write into (ghost BN's chunks); callers pass
    #: ``out`` only to a path that sets ``writes_out = True``.
    #: writes_out: bool

    def serves(self, step: Step, xp: Namespace, arrays: tuple[Array, ...]) -> bool:
        """Whether this path serves ``step`` for ``arrays``: ``(x,)``, or ``(x, dy)``."""
        ...

    def coefficient_dtype(self, xp: Namespace, x: Array) -> Any:
        """The dtype the reductions accumulate in and the coefficients are computed in."""
        ...

    def moments(self, xp: Namespace, x: Array, layout: Layout) -> Sums:
        """Per-feature shifted sums of x (one read of x)."""
        ...

    def apply(
        self,
        xp: Namespace,
        x: Array,
        layout: Layout,
        pivot: Array | None,
        scale: Array,
        shift: Array | None,
        *,
        scratch: Any = None,
        activation: str | None = None,
        residual: Array | None = None,
        out: Array | None = None,
    ) -> Array:
        """y = act((x - pivot) * scale + shift [+ residual]) per feature (None: 0), shape
        and dtype of x.

        ``scratch`` is what this path's ``moments`` returned with the sums, if anything.
        """
        ...

    def grad_sums(
        self, xp: Namespace, x: Array, dy: Array, layout: Layout, pivot: Array | None, *,
        act: Activation | None = None,
    ) -> GradSums:
        """``sum(dy')`` and ``sum(dy' * (x - pivot))`` per feature (``pivot=None``: the first
        only), with dy' = dy * act'(z) recomputed from ``act``, or dy itself."""
        ...

    def grad_apply(
        self,
        xp: Namespace,
        x: Array,
        dy: Array,
        layout: Layout,
        pivot: Array | None,
        a: Array | None,
        b: Array | None,
        k: Array,
        *,
        scratch: Any = None,
        act: Activation | None = None,
        out: Array | None = None,
    ) -> Any:
        """dx = k * (dy' + a * (x - pivot) + b) per feature; ``a = b = None``: dx = k * dy'.

        dy' = dy * act'(z) as in ``grad_sums``. Returns dx, or ``(dx, dy')`` when
        ``act.residual`` is given (dy' is the residual's gradient).
        """
        ...


def _may_write(a: Array) -> bool:
    # a buffer that autograd recorded must not change under it (torch tensors that require grad)
    return not getattr(a, "requires_grad", False)


class GenericKernels:
    """The array-API kernels: BLAS products for the reductions, ufuncs for the apply.

    The training forward's reduction leaves ``x - pivot`` in a buffer of its own, and the
    apply finishes y in it: one allocation the size of x per step.
    """

    name = "generic"
    centering_is_free = False

    def serves(self, step: Step, xp: Namespace, arrays: tuple[Array, ...]) -> bool:
        return True

    def coefficient_dtype(self, xp: Namespace, x: Array) -> Any:
        return compute_dtype(xp, x.dtype)

    def moments(self, xp: Namespace, x: Array, layout: Layout) -> Sums:
        return shifted_sums(xp, x, layout, compute_dtype(xp, x.dtype), device_of(x),
                            bool(array_api_compat.is_lazy_array(x)))

    def apply(self, xp, x, layout, pivot, scale, shift, *, scratch=None, activation=None,  # type: ignore[no-untyped-def]
              residual=None, out=None):
        _no_out(out)
        b = layout.broadcastable
        if scratch is not None and _may_write(scratch):
            buf = scratch  # x - pivot, ours
            buf *= b(xp, scale)
        elif scratch is not None:
            buf = scratch * b(xp, scale)
        else:
            xf = fold(xp, x, layout, compute_dtype(xp, x.dtype))
            buf = (xf if pivot is None else xf - b(xp, pivot)) * b(xp, scale)
        if shift is not None:
            if _may_write(buf):
                buf += b(xp, shift)
            else:
                buf = buf + b(xp, shift)
        if residual is not None or activation is not None:
            buf = _activate(xp, buf, layout, activation, residual)
        return unfold(xp, buf, layout, x.dtype)

    def grad_sums(self, xp, x, dy, layout, pivot, *, act=None):  # type: ignore[no-untyped-def]
        cdt, device = compute_dtype(xp, x.dtype), device_of(x)
        if act is None:
            return grad_sums(xp, x, dy, layout, pivot, cdt, device)
        dyp = _activation_grad(xp, x, dy, layout, act, cdt)
        reducer = FeatureReducer(xp, layout, cdt, device)
        sum_dy = reducer.sum(dyp)
        if pivot is None:
            return GradSums(sum_dy, None, (None, dyp))
        centered = fold(xp, x, layout, cdt) - layout.broadcastable(xp, pivot)
        return GradSums(sum_dy, reducer.dot(dyp, centered), (centered, dyp))

    def grad_apply(self, xp, x, dy, layout, pivot, a, b, k, *, scratch=None, act=None,  # type: ignore[no-untyped-def]
                   out=None):
        _no_out(out)
        if act is not None:
            return self._grad_apply_act(xp, x, dy, layout, pivot, a, b, k, scratch, act)
        v = layout.broadcastable
        cdt = compute_dtype(xp, x.dtype)
        dyf = fold(xp, dy, layout, cdt)
        if a is None:
            return unfold(xp, dyf * v(xp, k), layout, x.dtype)
        centered = scratch
        if centered is None:
            centered = fold(xp, x, layout, cdt) - v(xp, pivot)
        if _may_write(centered) and _may_write(dyf):
            # dx = k * (dy + a * (x - pivot) + b), built in the scratch buffer: no temporary
            centered *= v(xp, a)
            centered += dyf
            centered += v(xp, b)
            centered *= v(xp, k)
            dx = centered
        else:
            dx = (dyf + centered * v(xp, a) + v(xp, b)) * v(xp, k)
        return unfold(xp, dx, layout, x.dtype)

    def _grad_apply_act(self, xp, x, dy, layout, pivot, a, b, k, scratch, act):  # type: ignore[no-untyped-def]
        v = layout.broadcastable
        cdt = compute_dtype(xp, x.dtype)
        centered, dyp = scratch if scratch is not None else (None, None)
        if dyp is None:
            dyp = _activation_grad(xp, x, dy, layout, act, cdt)
        if a is None:
            dx = dyp * v(xp, k)
        else:
            if centered is None:
                centered = fold(xp, x, layout, cdt) - v(xp, pivot)
            dx = (dyp + centered * v(xp, a) + v(xp, b)) * v(xp, k)
        dx = unfold(xp, dx, layout, x.dtype)
        if act.residual is None:
            return dx
        return dx, unfold(xp, dyp, layout, act.residual.dtype)


def _no_out(out: Any) -> None:
    # in-place writes into a caller's slice are not portable (JAX, Dask): writes_out is unset
    if out is not None:
        raise TypeError("these kernels do not write into out= (writes_out is not set)")


def _activate(xp: Namespace, z: Array, layout: Layout, activation: str | None, residual: Array | None) -> Array:
    """act(z [+ residual]) for the folded pre-activation z (a buffer of our own)."""
    if residual is not None:
        r = fold(xp, residual, layout, z.dtype)
        if _may_write(z):
            z += r
        else:
            z = z + r
    if activation == "relu":
        return xp.where(z <= 0, _zero(xp, z), z)  # NaN stays NaN, -inf gives 0: torch's relu
    if activation == "sigmoid":
        return 1.0 / (1.0 + xp.exp(-z))
    return z


def _activation_grad(xp: Namespace, x: Array, dy: Array, layout: Layout, act: Activation, cdt: Any) -> Array:
    """dy * act'(z), folded, with z recomputed from x and the forward apply's coefficients."""
    v = layout.broadcastable
    xf = fold(xp, x, layout, cdt)
    z = (xf if act.pivot is None else xf - v(xp, act.pivot)) * v(xp, act.scale)
    if act.shift is not None:
        z = z + v(xp, act.shift)
    if act.residual is not None:
        z = z + fold(xp, act.residual, layout, cdt)
    dyf = fold(xp, dy, layout, cdt)
    if act.kind == "relu":
        return xp.where(z <= 0, _zero(xp, dyf), dyf)  # torch's threshold_backward: 0 even for a NaN dy
    if act.kind == "sigmoid":
        s = 1.0 / (1.0 + xp.exp(-z))
        return dyf * (s * (1.0 - s))
    return dyf


def _zero(xp: Namespace, like: Array) -> Array:
    """A 0-d zero of ``like``'s dtype and device, which ``where`` broadcasts: no array the size of x."""
    return xp.zeros((), dtype=like.dtype, device=device_of(like))


GENERIC = GenericKernels()
