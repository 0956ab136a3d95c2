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

from typing import Any, Literal, Protocol

import array_api_compat

from ._layout import Layout, fold, unfold
from ._moments import GradSums, Sums, grad_sums, shifted_sums
from ._namespace import Array, Namespace, compute_dtype, device_of

__all__ = ["GENERIC", "GenericKernels", "Kernels", "Step"]

Step = Literal["train", "eval", "backward"]


class Kernels(Protocol):
    """What a path supplies: reduction and apply kernels, never coefficient arithmetic."""

    name: str
    #: True when subtracting a per-feature pivot costs the apply nothing extra (a fused
    #: kernel); False when it costs a pass (the generic path), so inference folds the mean
    #: into the shift where that is precise.
    centering_is_free: bool

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
    ) -> Array:
        """y = (x - pivot) * scale + shift per feature (None: 0), shape and dtype of x.

        ``scratch`` is what this path's ``moments`` returned with the sums, if anything.
        """
        ...

    def grad_sums(
        self, xp: Namespace, x: Array, dy: Array, layout: Layout, pivot: Array | None
    ) -> GradSums:
        """``sum(dy)`` and ``sum(dy * (x - pivot))`` per feature; ``pivot=None``: the first only."""
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
    ) -> Array:
        """dx = k * (dy + a * (x - pivot) + b) per feature; ``a = b = None``: dx = k * dy."""
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

    def apply(self, xp, x, layout, pivot, scale, shift, *, scratch=None):  # type: ignore[no-untyped-def]
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
        return unfold(xp, buf, layout, x.dtype)

    def grad_sums(self, xp, x, dy, layout, pivot):  # type: ignore[no-untyped-def]
        return grad_sums(xp, x, dy, layout, pivot, compute_dtype(xp, x.dtype), device_of(x))

    def grad_apply(self, xp, x, dy, layout, pivot, a, b, k, *, scratch=None):  # type: ignore[no-untyped-def]
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


GENERIC = GenericKernels()
