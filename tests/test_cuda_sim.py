"""The GPU fast path's kernels (anybn/_fast/_cuda_kernels.py) under numba-cuda's simulator.

``NUMBA_ENABLE_CUDASIM=1`` runs ``@cuda.jit`` kernels on the CPU with NumPy arrays: threads,
blocks, shared memory and ``syncthreads`` emulated, out-of-bounds indexing raising. Each
kernel is compared with an independent float64 NumPy reference written plainly below, on
every layout class (rows (N, C), NHWC, NCHW planes), float16/32/64, prime feature counts,
sizes that are not multiples of a block, one block and many, with the launch configuration
the GPU path computes, shrunk (32-64 threads per block, a few blocks) so the simulator runs
it in seconds. ``python -m pytest -m cuda_sim`` runs exactly these tests.

The simulator is chosen when numba.cuda is first imported, for the whole process. So the
tests run here only when this module can make that choice: when numba.cuda is already
imported for a real GPU, or a GPU is present (other tests of the process want the real
target), they run in a child pytest process instead (``test_simulator_suite_in_subprocess``).

Error analysis (``u`` is the unit roundoff: ``u64 = 2**-53``; ``uc`` that of the compute
type, ``2**-24`` for float16/float32 inputs, ``u64`` for float64; ``uo`` that of the output
dtype, ``2**-11`` for float16). First-order bounds (second-order terms are ``u`` times
smaller); the float64 reference errs by the same formulas with ``u64``, so each bound below
is taken with ``uc + u64`` in place of ``uc``:

- sums (``moments``, ``grad_sums``): ``x - pivot`` is exact in float64 for float16/32 inputs
  (two float32 values); any order of summing n float64 terms errs by at most
  ``(n - 1) * u64 * sum|term|``, one more ``u64`` per product/subtraction, for the kernel and
  the reference each;
- ``z = (x - p) * s + h [+ r]`` in the compute type: ``p`` rounds by ``p_err`` (zero when the
  pivot is a sample of x), ``d = x - p`` by ``uc |d|``, ``s`` and the product by ``uc |s d|``
  each, ``h`` by ``uc |h|``, the two additions by ``uc |z|`` at most each:
  ``|dz| <= |s| p_err + uc (5 |s d| + 3 |h| + |r|)`` (an FMA only removes a rounding);
- ReLU is 1-Lipschitz; sigmoid has ``|s'| <= 1/4`` and its own exp, add and divide cost
  ``<= 8 uc`` relative (exp within 2 ulp); ``s (1 - s)`` has slope ``|s'(1 - 2 s)| <= 0.1``
  in z, and its two operations and the product with dy cost ``4 uc`` relative;
- ``dx = k (dy' + a d + b)``: a, b, k and ``x - p`` round once each, ``a d``, ``+ dy'``,
  ``+ b`` and ``* k`` once each: ``|k| (|dy'| err + |a| p_err + uc (4 |a d| + 3 |dy'| + 3 |b|))
  + 2 uc |dx|``;
- elementwise outputs then round once to the output dtype: ``uo |y|``, plus half the
  subnormal spacing (float16: ``2**-25``) for values below its normal range.

Power: for float32 and float64 each check asserts (``_assert_close``) that some checked
value has a tolerance below ``2.5e-5`` of its expected value; a planted relative error of
``1e-4`` in a kernel shifts every value it computes, so it shifts that one by at least four
times its tolerance, three after the kernel's own error, and the check fails. (float16 outputs
round by ``2**-11 = 4.9e-4``, so their elementwise checks cannot see 1e-4; the same kernel
code is checked at that power by the float32 cases.) Checked by hand once, each kernel with
a planted error: every one failed tests (see the commit message).
"""

from __future__ import annotations

import ctypes
import functools
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any, NamedTuple

import numpy as np
import pytest

pytestmark = pytest.mark.cuda_sim

_ROOT = Path(__file__).resolve().parent.parent
_CHILD_FLAG = "ANYBN_CUDASIM_CHILD"


def _in_process() -> tuple[bool, str]:
    """Whether the simulator can run in this process, and why not."""
    if os.environ.get(_CHILD_FLAG) == "1":
        return True, ""
    module = sys.modules.get("numba.cuda")
    if module is not None:
        if getattr(module.device_array, "__module__", "").startswith("numba.cuda.simulator"):
            return True, ""
        return False, "numba.cuda is already imported for a real GPU in this process"
    if os.path.exists("/dev/nvidiactl") or shutil.which("nvidia-smi"):
        return False, "a GPU is present: this process keeps numba.cuda's real target for the CuPy tests"
    return True, ""


IN_PROCESS, WHY_NOT = _in_process()
cuda: Any = None
K: Any = None
if IN_PROCESS:
    # numba-cuda's config is numba.core.config, read from the environment when numba is
    # imported and again at every CPU compilation (reload_config); numba.cuda picks the
    # simulator when imported, and cuda.jit checks the flag again at each kernel it builds.
    # So the variable stays set for the rest of this process (subprocesses that need the
    # real target drop it, as tests/test_pipeline.py does), and the config is reloaded now
    # in case numba was imported before this module.
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    if "numba.core.config" in sys.modules:
        sys.modules["numba.core.config"].reload_config()
    # numba's own deprecated numba.cuda (without the numba-cuda package) differs from it and
    # lacks what the kernels use: skip unless numba-cuda itself is installed
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (pip install numba-cuda)")
    cuda = pytest.importorskip("numba.cuda", reason="numba-cuda is not installed")
    K = pytest.importorskip("anybn._fast._cuda_kernels", reason="numba-cuda is not installed")

in_simulator = pytest.mark.skipif(not IN_PROCESS, reason=f"{WHY_NOT}; run by test_simulator_suite_in_subprocess")

U64 = 2.0**-53
UNIT = {np.dtype(np.float16): 2.0**-11, np.dtype(np.float32): 2.0**-24, np.dtype(np.float64): U64}
DTYPES = [np.float16, np.float32, np.float64]


@pytest.fixture(autouse=True)
def _short_switch_interval():
    # the simulator runs each CUDA thread as a Python thread: a 0.5 ms GIL switch interval
    # (default 5 ms) makes its barriers 2-3x faster
    old = sys.getswitchinterval()
    sys.setswitchinterval(5e-4)
    yield
    sys.setswitchinterval(old)


# ------------------------------------------------------------------ geometries


class Fold(NamedTuple):
    outer: int
    features: int
    inner: int


class Geometry(NamedTuple):
    """An input shape, its feature axis, and the shrunk launch configuration for it."""

    name: str
    shape: tuple[int, ...]
    axis: int
    config: dict[str, int]

    @property
    def fold(self) -> Fold:
        axis = self.axis % len(self.shape)
        return Fold(int(np.prod(self.shape[:axis])), self.shape[axis], int(np.prod(self.shape[axis + 1:])))


# The GPU's formula (THREADS per block, a grid capped at sm_count * blocks_per_sm blocks,
# ITEMS_PER_THREAD values per thread at least) with sizes shrunk for the simulator; each
# geometry's comment says which parts of the kernels it reaches.
GPU_SHRUNK = {"threads": 64, "sm_count": 2, "blocks_per_sm": 4}
GEOMETRIES = [
    # one block: lanes (8) x rows (8), C = 7 prime leaves a lane idle; 37 rows = 4 full
    # unrolled sweeps of 8 + a tail of 5
    Geometry("rows-NC-one-block", (37, 7), 1, GPU_SHRUNK),
    # C = 40 > 32 lanes: a second block column whose lanes 8..31 are idle; two chunks
    Geometry("rows-C>32-idle-lanes", (9, 40), 1, {"threads": 32, "sm_count": 2, "blocks_per_sm": 4}),
    # channels-last: 120 rows of 13 features, six chunks of 2 rows, unrolled + tail
    Geometry("NHWC-many-chunks", (4, 5, 6, 13), -1, {"threads": 32, "max_blocks": 6, "items_per_thread": 1}),
    # NCHW planes of 20 < 32 threads: each step crosses planes (dn = 1, di = 12)
    Geometry("NCHW-planes", (3, 5, 4, 5), 1, {"threads": 32, "sm_count": 2, "blocks_per_sm": 4}),
    # (N, C, L) with L = 3: a thread jumps 10 planes per step and wraps; 120 = unrolled + tail
    Geometry("NCL-short-planes", (40, 2, 3), 1, {"threads": 32, "sm_count": 2, "blocks_per_sm": 4}),
    # long planes (161) split over two chunks per feature: stride 64 inside a plane
    Geometry("NCHW-two-chunks", (2, 3, 7, 23), 1, {"threads": 32, "max_blocks": 6, "items_per_thread": 1}),
]
GEOMETRY_IDS = [g.name for g in GEOMETRIES]

# activation and residual per dtype: every combination on float32, two on the others
ACTIVATION_CASES = [
    (np.float64, None, False), (np.float64, "sigmoid", True),
    (np.float32, None, False), (np.float32, "relu", True), (np.float32, "sigmoid", False),
    (np.float32, "sigmoid", True),
    (np.float16, "relu", False), (np.float16, "sigmoid", True),
]
ACTIVATION_IDS = [f"{np.dtype(d).name}-{a}-{'res' if r else 'nores'}" for d, a, r in ACTIVATION_CASES]


def _config(geometry: Geometry) -> Any:
    return K.launch_config(geometry.fold, **geometry.config)


# ------------------------------------------------------------------ data and references


class Case(NamedTuple):
    """Inputs of one kernel call: host (NumPy) arrays, folded to (outer, C, inner)."""

    x: np.ndarray
    dy: np.ndarray
    residual: np.ndarray
    sample: np.ndarray  # x[0, :, 0] in float64: the pivot the caller takes
    mean: np.ndarray  # float64 per-feature mean: a pivot not representable in float32
    scale: np.ndarray
    shift: np.ndarray


def _case(geometry: Geometry, dtype: Any, seed: int = 0) -> Case:
    rng = np.random.default_rng(seed)
    fold = geometry.fold
    shape = tuple(fold)
    x = rng.normal(3.0, 2.0, size=shape).astype(dtype)
    dy = rng.normal(0.5, 1.0, size=shape).astype(dtype)  # nonzero mean: well-conditioned sums
    residual = rng.normal(0.0, 1.0, size=shape).astype(dtype)
    c = fold.features
    scale = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    shift = rng.normal(0.0, 1.0, c)
    x64 = x.astype(np.float64)
    return Case(x, dy, residual, x64[0, :, 0].copy(), x64.mean(axis=(0, 2)), scale, shift)


def _v(a: np.ndarray) -> np.ndarray:
    """A (C,) vector broadcast against (outer, C, inner)."""
    return np.asarray(a, dtype=np.float64)[None, :, None]


def ref_z(x, pivot, scale, shift, residual=None):
    z = (x.astype(np.float64) - _v(pivot)) * _v(scale) + _v(shift)
    return z if residual is None else z + residual.astype(np.float64)


def ref_act(z, activation):
    if activation == "relu":
        return np.maximum(z, 0.0)
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    return z


def ref_dy_prime(dy, z, activation):
    dy = dy.astype(np.float64)
    if activation == "relu":  # PyTorch's threshold_backward: 0 where z <= 0, else dy (a NaN z passes dy)
        return np.where(z <= 0.0, 0.0, dy)
    if activation == "sigmoid":
        s = 1.0 / (1.0 + np.exp(-z))
        return dy * s * (1.0 - s)
    return dy


def _sum(a):
    return a.sum(axis=(0, 2))


# ------------------------------------------------------------------ error bounds


def _compute_unit(dtype: Any) -> float:
    """uc + u64: the kernel's unit roundoff plus the float64 reference's (bounds are linear in u)."""
    return (U64 if np.dtype(dtype) == np.float64 else 2.0**-24) + U64


def _pivot_error(pivot: np.ndarray, dtype: Any) -> np.ndarray:
    """|p - compute_type(p)|: exact, since the kernel casts the float64 pivot once."""
    ctype = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    return np.abs(pivot - pivot.astype(ctype).astype(np.float64))


def _z_error(x, pivot, scale, shift, residual, dtype) -> np.ndarray:
    """Bound on |z_kernel - z| (see the module docstring)."""
    uc = _compute_unit(dtype)
    d = np.abs(x.astype(np.float64) - _v(pivot))
    r = 0.0 if residual is None else np.abs(residual.astype(np.float64))
    return np.abs(_v(scale)) * _v(_pivot_error(pivot, dtype)) + uc * (
        5 * np.abs(_v(scale)) * d + 3 * np.abs(_v(shift)) + r)


def _act_error(z, dz, activation, dtype) -> np.ndarray:
    """Bound on |act_kernel(z_kernel) - act(z)| before the output rounds."""
    if activation == "sigmoid":
        return dz / 4 + 8 * _compute_unit(dtype) * ref_act(z, "sigmoid")
    return dz


def _dy_prime_error(dy, z, dz, activation, dtype) -> np.ndarray:
    """Bound on |dy'_kernel - dy'| (ReLU: 0, the test keeps dy = 0 where the mask is unsure)."""
    if activation == "sigmoid":
        s = ref_act(z, "sigmoid")
        uc = _compute_unit(dtype)
        return np.abs(dy.astype(np.float64)) * (0.1 * dz + 8 * uc * s + 4 * uc * s * (1 - s))
    return np.zeros_like(z)


def _output_rounding(y: np.ndarray, dtype: Any) -> np.ndarray:
    """Bound on rounding y to ``dtype``: ``uo |y|``, or half the subnormal spacing below the
    normal range (float16 gradients reach it: 2**-25 = 3e-8)."""
    return UNIT[np.dtype(dtype)] * np.abs(y) + float(np.finfo(dtype).smallest_subnormal) / 2


def _sum_error(terms: np.ndarray, term_errors: np.ndarray | float = 0.0, ops: int = 1) -> np.ndarray:
    """Bound on a float64 sum over (outer, inner) of ``terms`` each known to ``term_errors``."""
    n = terms.shape[0] * terms.shape[2]
    return _sum(np.broadcast_to(term_errors, terms.shape)) + 2 * (n + ops) * U64 * _sum(np.abs(terms))


def _assert_close(actual, expected, tol, *, dtype, what: str, power: bool = True) -> None:
    """|actual - expected| <= tol everywhere; and, for float32/float64, tol below 2.5e-5 of
    |expected| somewhere, so that a planted 1e-4 relative error cannot pass."""
    actual = np.asarray(actual, dtype=np.float64)
    err = np.abs(actual - expected)
    worst = np.unravel_index(np.argmax(err - tol), err.shape)
    assert np.all(err <= tol), (
        f"{what}: |error| {err[worst]:.3g} > tolerance {np.broadcast_to(tol, err.shape)[worst]:.3g} at {worst} "
        f"(got {actual[worst]!r}, expected {expected[worst]!r})")
    if power and np.dtype(dtype) != np.float16:
        nonzero = expected != 0
        margin = np.min(np.broadcast_to(tol, err.shape)[nonzero] / np.abs(expected[nonzero]), initial=np.inf)
        assert margin < 2.5e-5, f"{what}: tolerances ({margin:.3g} relative at best) too loose to catch 1e-4"


def _dev(a: np.ndarray) -> Any:
    # device arrays, as on the GPU: the simulator copies plain NumPy arguments in and out of
    # every launch, which would also hide aliasing between arguments
    return cuda.to_device(np.ascontiguousarray(a))


# ------------------------------------------------------------------ the kernels


@in_simulator
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_moments_match_float64_reference(geometry, dtype):
    case = _case(geometry, dtype)
    out = cuda.device_array((2, geometry.fold.features), np.float64)
    K.moments(_dev(case.x), _dev(case.sample), out, config=_config(geometry))
    s1, s2 = out.copy_to_host()
    d = case.x.astype(np.float64) - _v(case.sample)
    _assert_close(s1, _sum(d), _sum_error(d), dtype=dtype, what="sum(x - pivot)")
    _assert_close(s2, _sum(d * d), _sum_error(d * d, ops=2), dtype=dtype, what="sum((x - pivot)**2)")


@in_simulator
@pytest.mark.parametrize("dtype, activation, residual", ACTIVATION_CASES, ids=ACTIVATION_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_apply_matches_float64_reference(geometry, dtype, activation, residual):
    case = _case(geometry, dtype, seed=1)
    r = case.residual if residual else None
    y = cuda.device_array(case.x.shape, case.x.dtype)
    # the pivot is a float64 mean here (as in inference), not a sample of x
    K.apply(_dev(case.x), _dev(case.mean), _dev(case.scale), _dev(case.shift), y, activation,
            None if r is None else _dev(r), config=_config(geometry))
    z = ref_z(case.x, case.mean, case.scale, case.shift, r)
    expected = ref_act(z, activation)
    dz = _z_error(case.x, case.mean, case.scale, case.shift, r, dtype)
    tol = _act_error(z, dz, activation, dtype) + _output_rounding(expected, dtype)
    _assert_close(y.copy_to_host(), expected, tol, dtype=dtype, what=f"y ({activation})")


def _backward_case(geometry, dtype, activation, residual, seed):
    """A case whose dy is 0 where ReLU's mask could differ from the reference's (|z| tiny).

    z is recomputed around the forward apply's pivot (``z_pivot``: the float64 mean here),
    the sums are shifted by another (a sample of x), as when inference's backward runs.
    """
    case = _case(geometry, dtype, seed=seed)
    r = case.residual if residual else None
    z = ref_z(case.x, case.mean, case.scale, case.shift, r)
    dz = _z_error(case.x, case.mean, case.scale, case.shift, r, dtype)
    dy = case.dy
    if activation == "relu":
        dy = np.where(np.abs(z) <= 2 * dz, 0, dy).astype(dtype)
    return case, r, z, dz, dy


@in_simulator
@pytest.mark.parametrize("dtype, activation, residual", ACTIVATION_CASES, ids=ACTIVATION_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_grad_sums_match_float64_reference(geometry, dtype, activation, residual):
    case, r, z, dz, dy = _backward_case(geometry, dtype, activation, residual, seed=2)
    out = cuda.device_array((2, geometry.fold.features), np.float64)
    K.grad_sums(_dev(case.x), _dev(dy), _dev(case.sample), out, activation, _dev(case.scale),
                _dev(case.shift), None if r is None else _dev(r), z_pivot=_dev(case.mean),
                config=_config(geometry))
    sum_dy, sum_dy_d = out.copy_to_host()
    g = ref_dy_prime(dy, z, activation)
    dg = _dy_prime_error(dy, z, dz, activation, dtype)
    d = case.x.astype(np.float64) - _v(case.sample)
    _assert_close(sum_dy, _sum(g), _sum_error(g, dg), dtype=dtype, what="sum(dy')")
    _assert_close(sum_dy_d, _sum(g * d), _sum_error(g * d, dg * np.abs(d), ops=2), dtype=dtype,
                  what="sum(dy' * (x - pivot))")


@in_simulator
@pytest.mark.parametrize("dtype, activation, residual", ACTIVATION_CASES, ids=ACTIVATION_IDS)
@pytest.mark.parametrize("geometry", GEOMETRIES, ids=GEOMETRY_IDS)
def test_grad_apply_matches_float64_reference(geometry, dtype, activation, residual):
    case, r, z, dz, dy = _backward_case(geometry, dtype, activation, residual, seed=3)
    rng = np.random.default_rng(4)
    c = geometry.fold.features
    a, b, k = rng.normal(0, 0.3, c), rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)
    dx = cuda.device_array(case.x.shape, case.x.dtype)
    dres = cuda.device_array(case.x.shape, case.x.dtype) if activation else None
    K.grad_apply(_dev(case.x), _dev(dy), _dev(case.sample), _dev(a), _dev(b), _dev(k), dx, activation,
                 _dev(case.scale), _dev(case.shift), None if r is None else _dev(r), dres,
                 z_pivot=_dev(case.mean), config=_config(geometry))
    g = ref_dy_prime(dy, z, activation)
    dg = _dy_prime_error(dy, z, dz, activation, dtype)
    d = case.x.astype(np.float64) - _v(case.sample)
    inner = g + _v(a) * d + _v(b)
    expected = _v(k) * inner
    uc = _compute_unit(dtype)
    # a, b, k round to the compute type; x - p, a * d, + dy', + b, * k round once each
    p_err = _v(_pivot_error(case.sample, dtype))  # zero: the pivot is a sample of x
    inner_err = dg + np.abs(_v(a)) * p_err + uc * (4 * np.abs(_v(a)) * np.abs(d) + 3 * np.abs(g) + 3 * np.abs(_v(b)))
    tol = np.abs(_v(k)) * inner_err + 2 * uc * np.abs(expected) + _output_rounding(expected, dtype)
    _assert_close(dx.copy_to_host(), expected, tol, dtype=dtype, what=f"dx ({activation})")
    if dres is not None:
        _assert_close(dres.copy_to_host(), g, dg + _output_rounding(g, dtype), dtype=dtype, what="dres = dy'")


@in_simulator
@pytest.mark.parametrize("dtype, activation, residual", [(np.float32, None, False), (np.float32, "relu", True),
                                                         (np.float32, "sigmoid", False), (np.float64, "relu", False)])
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[2], GEOMETRIES[3]], ids=["rows", "NHWC", "planes"])
def test_grad_apply_with_fixed_statistics_has_no_term_in_x(geometry, dtype, activation, residual):
    """a = b = None (fixed statistics): dx = k * dy', so an infinite or NaN x gives what
    PyTorch gives (k dy or 0 by act'(z); NaN only where the sigmoid meets a NaN z), where
    k (dy' + 0 * (x - p) + 0) was NaN at every non-finite x."""
    case, r, z, dz, dy = _backward_case(geometry, dtype, activation, residual, seed=5)
    x = case.x.copy()
    planted = (0, 1, 0), (1, 0, 0), (1, 2, 0)  # +inf, -inf, NaN
    for where, value in zip(planted, (np.inf, -np.inf, np.nan)):
        x[where] = value
    c = geometry.fold.features
    k = np.random.default_rng(6).uniform(0.5, 2.0, c)
    dx = cuda.device_array(x.shape, x.dtype)
    K.grad_apply(_dev(x), _dev(dy), _dev(case.sample), None, None, _dev(k), dx, activation,
                 _dev(case.scale), _dev(case.shift), None if r is None else _dev(r), z_pivot=_dev(case.mean),
                 config=_config(geometry))
    got = dx.copy_to_host().astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        z_all = ref_z(x, case.mean, case.scale, case.shift, r)
        expected = _v(k) * ref_dy_prime(dy, z_all, activation)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)  # NaN only at the sigmoid's NaN z
    assert nan.sum() == (1 if activation == "sigmoid" else 0)
    hit = np.zeros(x.shape, bool)
    for where in planted:
        hit[where] = True
    uc = _compute_unit(dtype)
    # at the planted x: dy' is dy, 0 or (sigmoid at +-inf) 0 exactly; k and k * dy' round once each
    edge = hit & ~nan
    assert np.all(np.abs(got[edge] - expected[edge]) <= (2 * uc * np.abs(expected) + _output_rounding(expected, dtype))[edge])
    # elsewhere as in test_grad_apply_matches_float64_reference with a = b = 0
    g = ref_dy_prime(dy, z, activation)
    dg = _dy_prime_error(dy, z, dz, activation, dtype)
    want = _v(k) * g
    tol = np.abs(_v(k)) * (dg + 3 * uc * np.abs(g)) + 2 * uc * np.abs(want) + _output_rounding(want, dtype)
    _assert_close(np.where(hit, 0.0, got), np.where(hit, 0.0, want), np.where(hit, 0.0, tol), dtype=dtype,
                  what=f"dx, fixed statistics ({activation})")
    with pytest.raises(ValueError, match="a and b must both be given"):
        K.grad_apply(_dev(x), _dev(dy), _dev(case.sample), _dev(k), None, _dev(k), dx)


@in_simulator
@pytest.mark.parametrize("geometry", [GEOMETRIES[0], GEOMETRIES[3]], ids=["rows", "planes"])
def test_float32_at_mean_over_std_1e4_within_1em4_of_float64(geometry):
    # x = 1e4 + N(0, 1): float32 keeps ~3 significant digits of each deviation's square
    # around the mean, so naive float32 statistics fail here (checked below)
    fold = geometry.fold
    x = (1e4 + np.random.default_rng(5).standard_normal(tuple(fold))).astype(np.float32)
    x64 = x.astype(np.float64)
    n, eps = fold.outer * fold.inner, 1e-5
    mean_ref = x64.mean(axis=(0, 2))
    var_ref = ((x64 - _v(mean_ref)) ** 2).mean(axis=(0, 2))
    y_ref = (x64 - _v(mean_ref)) / np.sqrt(_v(var_ref) + eps)

    pivot = x64[0, :, 0].copy()
    out = cuda.device_array((2, fold.features), np.float64)
    config = _config(geometry)
    K.moments(_dev(x), _dev(pivot), out, config=config)
    s1, s2 = out.copy_to_host()
    mean = pivot + s1 / n
    var = s2 / n - (s1 / n) ** 2
    y64 = (x64 - _v(mean)) / np.sqrt(_v(var) + eps)
    assert np.max(np.abs(y64 - y_ref)) < 1e-4

    # and y written by the apply kernel in float32 from those statistics
    scale = 1.0 / np.sqrt(var + eps)
    y = cuda.device_array(x.shape, np.float32)
    K.apply(_dev(x), _dev(pivot), _dev(scale), _dev((pivot - mean) * scale), y, config=config)
    assert np.max(np.abs(y.copy_to_host() - y_ref)) < 1e-4

    # the test can fail: float32 E[x^2] - E[x]^2 (no shift) is off by far more than 1e-4
    x32 = x.astype(np.float32)
    naive_mean = x32.mean(axis=(0, 2), dtype=np.float32)
    naive_var = (x32 * x32).mean(axis=(0, 2), dtype=np.float32) - naive_mean * naive_mean
    naive = (x64 - _v(naive_mean)) / np.sqrt(np.maximum(_v(naive_var), 0) + eps)
    assert np.max(np.abs(naive - y_ref)) > 1e-2


@in_simulator
def test_sums_count_every_value_once_and_are_deterministic():
    # x = 1 everywhere, pivot 0: sum = count and sum of squares = count, exactly
    geometry = GEOMETRIES[5]
    fold = geometry.fold
    ones = _dev(np.ones(tuple(fold), np.float32))
    out = cuda.device_array((2, fold.features), np.float64)
    K.moments(ones, _dev(np.zeros(fold.features)), out, config=_config(geometry))
    assert np.array_equal(out.copy_to_host(), np.full((2, fold.features), float(fold.outer * fold.inner)))
    case = _case(geometry, np.float32)
    runs = []
    for _ in range(2):
        K.moments(_dev(case.x), _dev(case.sample), out, config=_config(geometry))
        runs.append(out.copy_to_host())
    assert np.array_equal(runs[0], runs[1])  # fixed-order reductions: bitwise equal


@in_simulator
@pytest.mark.parametrize("outer", [200, 9], ids=["40-chunks", "3-chunks"])
def test_merge_adds_every_chunk(outer):
    # the second stage alone, on random partial sums: 40 chunks (8 threads over chunks, each
    # one unrolled sweep of 4 and a tail of 1) and 3 (fewer chunks than threads)
    config = K.launch_config(Fold(outer, 7, 1), threads=32, max_blocks=40, items_per_thread=1)
    partial = np.random.default_rng(7).normal(1.0, 1.0, (2, config.chunks, 7))
    out = cuda.device_array((2, 7), np.float64)
    K._merge_kernel()[config.merge_grid, config.merge_block](_dev(partial), out)
    expected = partial.sum(axis=1)
    n = config.chunks
    tol = 2 * n * U64 * np.abs(partial).sum(axis=1)
    _assert_close(out.copy_to_host(), expected, tol, dtype=np.float64, what="merged sums")


@in_simulator
def test_default_launch_configuration_runs():
    # no config given: the GPU's own sizes (256 threads); one small case to prove the
    # defaults are wired through (the simulator runs 256 threads per block slowly)
    geometry = Geometry("default", (3, 2, 5), 1, {})
    case = _case(geometry, np.float64)
    out = cuda.device_array((2, 2), np.float64)
    K.moments(_dev(case.x), _dev(case.sample), out)
    d = case.x - _v(case.sample)
    _assert_close(out.copy_to_host()[1], _sum(d * d), _sum_error(d * d, ops=2), dtype=np.float64,
                  what="sum((x - pivot)**2)")


@in_simulator
def test_errors_name_the_argument():
    x = _dev(np.ones((2, 3, 1)))
    v = _dev(np.ones(3))
    with pytest.raises(ValueError, match="activation must be None, 'relu' or 'sigmoid', got 'tanh'"):
        K.apply(x, v, v, v, x, "tanh")
    with pytest.raises(ValueError, match="grad_sums: activation 'relu' needs scale and shift"):
        K.grad_sums(x, x, v, cuda.device_array((2, 3)), "relu")
    with pytest.raises(ValueError, match="threads must be a power of two, got 48"):
        K.launch_config(Fold(2, 3, 1), threads=48)


# ------------------------------------------------------------------ launch configuration

RESNET50_BN = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14),
               (1024, 14), (512, 14), (512, 7), (2048, 7)]


@in_simulator
@pytest.mark.parametrize("channels_last", [False, True], ids=["NCHW", "NHWC"])
@pytest.mark.parametrize("c, hw", RESNET50_BN, ids=[f"C{c}-{hw}x{hw}" for c, hw in RESNET50_BN])
def test_gpu_launch_configuration_for_resnet50_at_batch_32(c, hw, channels_last):
    fold = Fold(32 * hw * hw, c, 1) if channels_last else Fold(32, c, hw * hw)
    config = K.launch_config(fold)
    tx, ty = config.block
    gx, chunks = config.grid
    count = fold.outer * fold.inner
    assert tx * ty == K.THREADS
    assert tx == (min(32, c) if channels_last else 1)
    assert gx * tx >= c > (gx - 1) * tx  # every feature has a lane, no block column idle
    assert 1 <= chunks <= 65535
    assert gx * chunks <= max(gx, K.SM_COUNT * K.BLOCKS_PER_SM)  # one wave (unless C alone exceeds it)
    assert (chunks - 1) * ty * K.ITEMS_PER_THREAD < count  # no chunk without work
    if count >= K.SM_COUNT * K.BLOCKS_PER_SM * K.THREADS * K.ITEMS_PER_THREAD:
        assert gx * chunks > K.SM_COUNT * K.BLOCKS_PER_SM // 2  # large inputs fill the GPU
    mx, my = config.merge_block
    assert mx * my <= 1024 and config.merge_grid == (-(-c // mx), 2)
    assert -(-chunks // my) <= 17  # a merge thread adds few partial sums (8, up to 17 at C = 64)


# ------------------------------------------------------------------ the glue without a GPU


@in_simulator
def test_cuda_path_imports_nothing_and_declines_numpy():
    code = (
        "import sys, numpy as np, array_api_compat.numpy as xp\n"
        "from anybn._fast.cuda import CudaPath\n"
        "p = CudaPath()\n"
        "assert p.name == 'cuda-numba'\n"
        "assert not p.serves('train', xp, (np.ones((4096, 64), np.float32),))\n"
        "assert 'cupy' not in sys.modules and 'numba.cuda' not in sys.modules, sorted(sys.modules)\n"
    )
    _run_python(code)


class _FakeCupyArray(np.ndarray):
    """A NumPy array with CuPy's ``device.id``: what the glue reads of a CuPy array."""

    device = SimpleNamespace(id=0)


def _fake_cupy() -> ModuleType:
    """The few CuPy calls CudaPath makes, on NumPy (the simulator's device memory)."""
    cp = ModuleType("cupy")
    cp.float64 = np.float64
    cp.empty = lambda shape, dtype: np.empty(shape, dtype).view(_FakeCupyArray)
    cp.empty_like = lambda a: np.empty_like(a)
    cp.cuda = SimpleNamespace(get_current_stream=lambda: SimpleNamespace(ptr=0),
                              Device=lambda i: SimpleNamespace(attributes={"MultiProcessorCount": 2}))
    return cp


@in_simulator
@pytest.mark.parametrize("shape, axis", [((5, 3, 4), 1), ((6, 2, 7), -1)], ids=["NCL", "NLC"])
def test_cuda_path_glue_under_the_simulator(monkeypatch, shape, axis):
    # CudaPath's methods with a stand-in for CuPy: folding, pivot, allocation, argument
    # order and the (dx, dres) rule, checked against the float64 references
    from anybn._fast import cuda as glue

    monkeypatch.setitem(sys.modules, "cupy", _fake_cupy())
    monkeypatch.setattr(glue, "_dev", lambda a: a)  # the simulator takes NumPy arrays as they are
    monkeypatch.setattr(K, "launch_config", functools.partial(K.launch_config, threads=32))
    path = glue.CudaPath()
    path._kernels = K
    geometry = Geometry("glue", shape, axis, {})
    fold = geometry.fold
    layout = SimpleNamespace(shape=shape, axis=axis % len(shape), **fold._asdict())
    case = _case(geometry, np.float64, seed=8)
    x = case.x.reshape(shape).view(_FakeCupyArray)
    dy = case.dy.reshape(shape).view(_FakeCupyArray)
    r = case.residual.reshape(shape).view(_FakeCupyArray)
    d = case.x - _v(case.sample)

    pivot, s1, s2 = path.moments(x, layout)
    assert np.array_equal(pivot, case.sample)
    _assert_close(s2, _sum(d * d), _sum_error(d * d, ops=2), dtype=np.float64, what="s2")

    y = path.apply(x, layout, case.mean, case.scale, case.shift, activation="sigmoid", residual=r)
    z = ref_z(case.x, case.mean, case.scale, case.shift, case.residual)
    expected = ref_act(z, "sigmoid")
    dz = _z_error(case.x, case.mean, case.scale, case.shift, case.residual, np.float64)
    tol = _act_error(z, dz, "sigmoid", np.float64) + _output_rounding(expected, np.float64)
    _assert_close(np.asarray(y).reshape(tuple(fold)), expected, tol, dtype=np.float64, what="y")

    sum_dy, _ = path.grad_sums(x, dy, layout, pivot)
    _assert_close(sum_dy, _sum(case.dy), _sum_error(case.dy), dtype=np.float64, what="sum dy")
    ones = np.ones(fold.features)
    dx, dres = path.grad_apply(x, dy, layout, pivot, 0 * ones, 0 * ones, 2 * ones,
                               activation="relu", scale=case.scale, shift=case.shift, residual=r)
    z = ref_z(case.x, case.sample, case.scale, case.shift, case.residual)
    g = ref_dy_prime(case.dy, z, "relu")  # float64: a mask flip needs |z| < 1e-15, not here
    assert np.array_equal(np.asarray(dres).reshape(tuple(fold)), g)
    assert np.array_equal(np.asarray(dx).reshape(tuple(fold)), 2 * g)
    assert path.grad_apply(x, dy, layout, pivot, ones, ones, ones, residual=r)[1] is dy  # dy' = dy
    assert path.grad_apply(x, dy, layout, pivot, ones, ones, ones)[1] is None

    # the same behind anybn._kernels.Kernels: None coefficients, Activation, Sums/GradSums
    kernels = glue.CudaKernels(path)
    sums = kernels.moments(np, x, layout)
    assert sums.count == fold.outer * fold.inner and np.array_equal(sums.s2, s2)
    y = kernels.apply(np, x, layout, None, case.scale, None)
    expected = case.x * _v(case.scale)  # float64: one rounding each side
    _assert_close(np.asarray(y).reshape(tuple(fold)), expected, 2 * U64 * np.abs(expected),
                  dtype=np.float64, what="x * scale")
    act = SimpleNamespace(kind="relu", pivot=case.mean, scale=case.scale, shift=case.shift, residual=r)
    g = ref_dy_prime(case.dy, ref_z(case.x, case.mean, case.scale, case.shift, case.residual), "relu")
    grad = kernels.grad_sums(np, x, dy, layout, None, act=act)
    assert grad.sum_dy_d is None
    _assert_close(grad.sum_dy, _sum(g), _sum_error(g), dtype=np.float64, what="sum dy'")
    dx, dres = kernels.grad_apply(np, x, dy, layout, None, None, None, 2 * ones, act=act)
    assert np.array_equal(np.asarray(dx).reshape(tuple(fold)), 2 * g)
    assert np.array_equal(np.asarray(dres).reshape(tuple(fold)), g)


@in_simulator
def test_cuda_path_loads_its_kernels_after_a_probe_compile(monkeypatch):
    from anybn._fast import cuda as glue

    monkeypatch.setattr(cuda, "is_available", lambda: True)
    K.probe()  # compiles, runs and checks the probe kernel (raises otherwise)
    path = glue.CudaPath()
    assert path._load() is K
    assert path._launcher is None  # no direct launches under the simulator: numba's dispatch


def test_kernel_params_follow_numbas_array_abi():
    # numba-cuda's _Kernel._prepare_args: meminfo, parent, nitems, itemsize, data, shape, strides
    a = SimpleNamespace(size=24, itemsize=4, data=SimpleNamespace(ptr=0x1000), shape=(2, 3, 4), strides=(48, 16, 4))
    params = K.kernel_params((a, 5))
    assert params[:11] == [0, 0, 24, 4, 0x1000, 2, 3, 4, 48, 16, 4]
    assert isinstance(params[11], ctypes.c_int64) and params[11].value == 5 and len(params) == 12


def test_cuda_path_serves_only_above_its_measured_threshold(monkeypatch):
    # the generic CuPy path was faster up to 16 MiB on an H200 (docs/benchmarks.md)
    from anybn._fast import cuda as glue

    cp = ModuleType("cupy")
    cp.ndarray = _FakeCupyArray
    monkeypatch.setitem(sys.modules, "cupy", cp)
    path = glue.CudaPath()
    monkeypatch.setattr(path, "_load", lambda: K)
    per_row = 1024 * 4  # (n, 1024) float32

    def x(rows: int, dtype: Any = np.float32, order: str = "C") -> Any:
        return np.zeros((rows, 1024), dtype, order=order).view(_FakeCupyArray)

    at = (16 << 20) // per_row
    assert not path.serves("train", cp, (x(at),))
    assert path.serves("train", cp, (x(at + 1),))
    assert path.serves("backward", cp, (x(at + 1), x(at + 1)))
    assert not path.serves("backward", cp, (x(at + 1), x(at + 1, np.float64)))  # dtypes differ
    assert not path.serves("eval", cp, (x(at + 1, order="F"),))
    assert not path.serves("eval", np, (np.zeros((at + 1, 1024), np.float32),))
    assert not path.serves("population", cp, (x(at + 1),))


class _FakeKernel:
    """A numba dispatcher as DirectLauncher uses it: compile(sig) -> bind, cufunc.kernel."""

    def __init__(self) -> None:
        self.compiled: list[tuple[Any, ...]] = []

    def compile(self, sig: tuple[Any, ...]) -> Any:
        self.compiled.append(sig)
        cufunc = SimpleNamespace(kernel=("cufunc", len(self.compiled)))
        return SimpleNamespace(bind=lambda: None, _codelibrary=SimpleNamespace(get_cufunc=lambda: cufunc))


def test_direct_launcher_compiles_once_per_argument_types_and_passes_numbas_abi():
    launcher = object.__new__(K.DirectLauncher)  # without __init__: no cuda.core needed
    launches: list[tuple[Any, ...]] = []
    launcher._launch = lambda stream, config, kernel, *params: launches.append((stream, config, kernel, params))
    launcher._config = lambda grid, block: (grid, block)
    launcher._kernels = {}

    def arr(n: int, dtype: Any, ptr: int) -> Any:
        return SimpleNamespace(dtype=np.dtype(dtype), ndim=1, size=n, itemsize=np.dtype(dtype).itemsize,
                               data=SimpleNamespace(ptr=ptr), shape=(n,), strides=(np.dtype(dtype).itemsize,))

    kernel = _FakeKernel()
    launcher(kernel, (2, 3), (32, 8), "s", (arr(10, np.float32, 0x100), 5))
    launcher(kernel, (2, 3), (32, 8), "s", (arr(20, np.float32, 0x200), 6))  # other sizes and ints: cached
    launcher(kernel, (1,), (64,), "s", (arr(10, np.float64, 0x300), 5))  # another dtype: compiled
    assert [tuple(map(str, sig)) for sig in kernel.compiled] == [
        ("array(float32, 1d, C)", "int64"), ("array(float64, 1d, C)", "int64")]
    assert [launch[2] for launch in launches] == [("cufunc", 1), ("cufunc", 1), ("cufunc", 2)]
    stream, config, _, params = launches[1]
    assert stream == "s" and config == ((2, 3), (32, 8))
    assert params[:7] == (0, 0, 20, 4, 0x200, 20, 4) and params[7].value == 6


def test_launch_path_argument_validated():
    from anybn._fast.cuda import CudaPath

    with pytest.raises(ValueError, match=r"launch must be 'direct' or 'numba', got 'fast'"):
        CudaPath(launch="fast")


@in_simulator
def test_cuda_path_declines_with_a_warning_where_numba_cuda_cannot_compile(monkeypatch):
    # numba-cuda 0.30.4 on NumPy 2.5 finds the GPU, then fails on its first kernel (seen on
    # an H200): the path must decline, say why once, and let the generic CuPy path serve
    from anybn._fast import cuda as glue

    def broken() -> None:
        raise AttributeError("module 'numpy' has no attribute 'row_stack'")

    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(K, "probe", broken)
    path = glue.CudaPath()
    with pytest.warns(RuntimeWarning, match=r"cannot compile kernels here \(AttributeError: .*row_stack"):
        assert path._load() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert path._load() is None  # decided once: no second probe, no second warning


# ------------------------------------------------------------------ the real CUDA target

_LOWER = r"""
import re
import types as pytypes
import numba.cuda.dispatcher as dispatcher
# device functions ask the current device for its compute capability: there is none here
dispatcher.get_current_device = lambda: pytypes.SimpleNamespace(compute_capability=(9, 0))
from numba.cuda import types
from numba.cuda.compiler import compile_cuda
from anybn._fast import _cuda_kernels as K

def arr(dt, nd=1):
    return types.Array(dt, nd, "C")

f64 = types.float64
# every kernel for float16 (loads, stores and arithmetic of the storage-only type), the
# activations for float32 (no float64 arithmetic may creep in), two kernels for float64
REDUCE = {types.float16: [("moments", 0, False), ("grad", 2, True)], types.float32: [("grad", 1, True)],
          types.float64: [("moments", 0, False)]}
MAP = {types.float16: [("apply", 2, True, False), ("grad", 1, True, True)],
       types.float32: [("apply", 2, True, False), ("grad", 2, True, True), ("grad_fixed", 1, False, False)],
       types.float64: [("grad", 0, False, False)]}
for dt in (types.float16, types.float32, types.float64):
    ct = K._compute_type(str(dt))
    for op, act, res in REDUCE[dt]:
        sig = (arr(dt),) * 3 + (arr(f64),) * 4 + (types.int64,) * 3 + (arr(f64, 3),)
        compile_cuda(K._reduce_kernel(op, ct, act, res, K.THREADS).py_func, types.void, sig, cc=(9, 0))
    for op, act, res, out2 in MAP[dt]:
        sig = (arr(dt),) * 3 + (arr(f64),) * 7 + (types.int64,) * 3 + (arr(dt),) * 2
        cres = compile_cuda(K._map_kernel(op, ct, act, res, out2).py_func, types.void, sig, cc=(9, 0))
        if dt != types.float64:  # float32 arithmetic stays float32 (a Python float literal would not)
            ir = cres.library.get_llvm_str()
            assert not re.search(r"= f(?:add|sub|mul|div|cmp \w+) double", ir), "float64 math in " + op
compile_cuda(K._merge_kernel().py_func, types.void, (arr(f64, 3), arr(f64, 2)), cc=(9, 0))
print("lowered")
"""


_SIGNATURE = r"""
import numpy as np
from numba.cuda.typing.typeof import Purpose, typeof
from anybn._fast import _cuda_kernels as K

args = (np.empty(5, np.float16), np.empty(5, np.float32), np.empty(3), np.empty((2, 3, 4)), np.empty((2, 3)),
        7, 2**40)
want = tuple(typeof(a, Purpose.argument) for a in args)
assert K.signature(args) == want, (K.signature(args), want)
print("same")
"""


@in_simulator
def test_direct_launch_signature_is_what_numba_types_the_arguments_as():
    # the direct launcher compiles for these types; numba's dispatch would type the same
    # arguments so (checked without the simulator, whose typeof differs)
    _run_python(_SIGNATURE, internal_api=True)


@in_simulator
def test_kernels_type_and_lower_for_the_real_cuda_target():
    # the simulator runs kernels as Python, so it cannot see typing errors of the CUDA
    # target (e.g. float32 promoted to float64 by a literal): compile each kernel variant to
    # LLVM IR for compute capability 9.0 (H200) in a process without the simulator; no GPU,
    # driver or NVVM needed for this stage
    _run_python(_LOWER, internal_api=True)


def _run_python(code: str, *, internal_api: bool = False) -> None:
    """Run ``code`` in a fresh interpreter without the simulator; fail with its stderr.

    ``internal_api``: the code uses numba-cuda internals (``compile_cuda``, the dispatcher's
    device query); if those moved (ImportError, AttributeError), skip rather than fail.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", _CHILD_FLAG)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=_ROOT, capture_output=True,
                          text=True, timeout=300)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    if proc.returncode and internal_api and last.startswith(("ImportError", "AttributeError")):
        pytest.skip(f"numba-cuda's internal compiler API differs here: {last}")
    assert proc.returncode == 0, proc.stderr[-4000:]


# ------------------------------------------------------------------ GPU machines


@pytest.mark.skipif(IN_PROCESS, reason="the simulator runs in this process")
def test_simulator_suite_in_subprocess():
    pytest.importorskip("numba_cuda", reason="numba-cuda is not installed")
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", **{_CHILD_FLAG: "1"})
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda_sim", __file__],
        env=env, cwd=_ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
