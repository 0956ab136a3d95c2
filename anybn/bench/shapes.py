"""What the benchmarks measure: the ops, the shapes, the inputs and the bytes each op moves.

Shapes are written ``[layout:]N x C x ...`` (:func:`parse_shape`): the layout letters name
the axes and the position of ``c`` is the feature axis, so ``nchw:32x64x56x56`` has axis 1
and ``nhwc:32x56x56x64`` the last axis; without a layout the feature axis is 1.

Bytes moved (:func:`traffic_bytes`) count the minimal memory traffic of each op for an
input of ``nbytes``: the training forward reads x twice (statistics, then normalization)
and writes y, 3 x nbytes; eval reads x and writes y, 2 x nbytes; backward reads x and dy
twice each (the two sums, then dx) and writes dx, 5 x nbytes; fused with a ReLU, the same
(the activation and its derivative are applied on the fly). A copy moves 2 x nbytes (read
and write): see :class:`anybn.bench.timing.CopyTimer`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import numpy as np

__all__ = [
    "COPY_TRAFFIC",
    "DEFAULT_SHAPES",
    "SWEEP_SHAPES",
    "DTYPES",
    "EPS",
    "ALL_OPS",
    "FUSED_OPS",
    "OPS",
    "OP_LABELS",
    "TRAFFIC",
    "Data",
    "Shape",
    "make_data",
    "op_data",
    "parse_shape",
    "traffic_bytes",
]

OPS = ("train", "backward", "eval")
# BN fused with a ReLU (``activation="relu"``; PyTorch: its batch norm, then its ReLU), on
# request (``--ops``): the forward returns relu(BN(x)), the backward takes dy through both
FUSED_OPS = ("train_relu", "backward_relu")
ALL_OPS = OPS + FUSED_OPS
OP_LABELS = {"train": "train forward", "backward": "backward", "eval": "eval forward",
             "train_relu": "train forward + ReLU", "backward_relu": "backward through ReLU"}
DEFAULT_SHAPES = ("4096x1024", "nchw:32x64x56x56", "nhwc:32x56x56x64", "256x64")

# The size sweep (``anybn bench --sweep``): float32 NCHW with C = 64, x from 64 KiB to 512 MiB
# in steps of 4x (and the last 2x), through L2 (~1-2 MiB per core), L3 (32 MiB here) and DRAM.
SWEEP_SHAPES = (
    "nchw:1x64x16x16",      # 64 KiB
    "nchw:1x64x32x32",      # 256 KiB
    "nchw:4x64x32x32",      # 1 MiB
    "nchw:16x64x32x32",     # 4 MiB
    "nchw:64x64x32x32",     # 16 MiB
    "nchw:256x64x32x32",    # 64 MiB
    "nchw:1024x64x32x32",   # 256 MiB
    "nchw:2048x64x32x32",   # 512 MiB
)
DTYPES = ("float32", "float64", "float16")
EPS = 1e-5

# Minimal memory traffic of each op, in multiples of x.nbytes (see the module docstring).
TRAFFIC = {"train": 3, "eval": 2, "backward": 5, "train_relu": 3, "backward_relu": 5}
COPY_TRAFFIC = 2


@dataclasses.dataclass(frozen=True)
class Shape:
    """A benchmark shape: ``spec`` as written, the dimensions, the feature axis (>= 0)."""

    spec: str
    dims: tuple[int, ...]
    axis: int
    layout: str  # the axis letters, e.g. "nchw"; "nc" for 2-D

    @property
    def channels_last(self) -> bool:
        return len(self.dims) > 2 and self.axis == len(self.dims) - 1

    @property
    def features(self) -> int:
        return self.dims[self.axis]

    def __str__(self) -> str:
        return self.spec


def parse_shape(spec: str | Shape) -> Shape:
    """``"4096x1024"``, ``"nchw:32x64x56x56"`` or ``"nhwc:32x56x56x64"`` as a :class:`Shape`."""
    if isinstance(spec, Shape):
        return spec
    text = spec.strip().lower()
    layout, _, dims_text = text.rpartition(":")
    try:
        dims = tuple(int(d) for d in dims_text.split("x"))
    except ValueError:
        raise ValueError(f"shape {spec!r}: expected sizes joined by 'x', e.g. 'nchw:32x64x56x56'") from None
    if len(dims) < 2 or min(dims) < 1:
        raise ValueError(f"shape {spec!r}: expected at least two sizes >= 1 (N x C ...)")
    if not layout:
        layout = "nc" + "dhw"[max(0, 5 - len(dims)):]  # "nc", "ncw", "nchw", "ncdhw"
    if len(layout) != len(dims) or layout.count("c") != 1 or layout[0] != "n":
        raise ValueError(
            f"shape {spec!r}: layout {layout!r} must name each of the {len(dims)} axes, start "
            f"with 'n' and contain one 'c' (e.g. 'nchw', 'nhwc')"
        )
    axis = layout.index("c")
    if axis not in (1, len(dims) - 1):
        raise ValueError(f"shape {spec!r}: the feature axis 'c' must come second or last")
    return Shape(spec.strip(), dims, axis, layout)


class Data(NamedTuple):
    """Deterministic NumPy inputs: C-contiguous x and dy, per-feature vectors of size C."""

    x: np.ndarray
    dy: np.ndarray
    gamma: np.ndarray
    beta: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray


def make_data(shape: str | Shape, dtype: str = "float32") -> Data:
    """Inputs for ``shape`` in ``dtype``: x ~ 0.5 + 2 N(0, 1), dy ~ N(0, 1), gamma in [0.5, 1.5].

    The same arrays for the same (shape, dtype) while they are among the last four asked for.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    shape = parse_shape(shape)
    return _make_data(shape.dims, shape.axis, dtype)


@functools.lru_cache(maxsize=4)
def _make_data(dims: tuple[int, ...], axis: int, dtype: str) -> Data:
    rng = np.random.default_rng(20240611)
    draw = np.float64 if dtype == "float64" else np.float32
    c = dims[axis]
    x = rng.standard_normal(dims, dtype=draw)
    x *= 2.0
    x += 0.5
    dy = rng.standard_normal(dims, dtype=draw)
    vectors = (
        rng.uniform(0.5, 1.5, c),
        rng.standard_normal(c),
        0.5 + 0.1 * rng.standard_normal(c),
        rng.uniform(2.0, 6.0, c),
    )
    return Data(*(a.astype(dtype, copy=False) for a in (x, dy, *vectors)))


def op_data(shape: str | Shape, op: str, dtype: str = "float32") -> Data:
    """The inputs of ``op``: :func:`make_data`'s, with x kept away from the ReLU's kink for the
    fused ops (see :func:`_away_from_kink`)."""
    shape = parse_shape(shape)
    if op in FUSED_OPS:
        return _away_from_kink(shape.dims, shape.axis, dtype)
    return make_data(shape, dtype)


@functools.lru_cache(maxsize=2)
def _away_from_kink(dims: tuple[int, ...], axis: int, dtype: str) -> Data:
    """make_data's inputs with no BN output within 64 ulp (of x's dtype, in units of the
    standardized x) of the ReLU's kink at 0.

    Where the float64 reference puts z = BN(x) a rounding error away from 0, an
    implementation's z may land on the other side, and its gradient flips there: an error of
    |dy| in that element of dx and of sum(dy) in dbias, whatever its accuracy. Those x are
    moved to 64 ulp from the kink on their own side (a few in a million in float32; the
    statistics move by far less than that).
    """
    d = _make_data(dims, axis, dtype)
    x = np.moveaxis(d.x, axis, -1).astype(np.float64)
    mean = x.reshape(-1, x.shape[-1]).mean(axis=0)
    std = np.sqrt(((x - mean) ** 2).reshape(-1, x.shape[-1]).mean(axis=0) + EPS)
    gamma, beta = d.gamma.astype(np.float64), d.beta.astype(np.float64)
    kink = -beta / gamma  # the standardized x where z = 0
    band = 64 * float(np.finfo(dtype).eps)
    xhat = (x - mean) / std
    near = np.abs(xhat - kink) < band
    side = np.where(xhat >= kink, 1.0, -1.0)
    x = np.where(near, mean + (kink + side * band) * std, x)
    return d._replace(x=np.ascontiguousarray(np.moveaxis(x, -1, axis)).astype(dtype))


def traffic_bytes(op: str, nbytes: int) -> int:
    """Minimal bytes moved by ``op`` on an input of ``nbytes`` (3x train, 2x eval, 5x backward)."""
    return TRAFFIC[op] * nbytes
