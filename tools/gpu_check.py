"""The one prepared GPU check of the CUDA fast path (issue 14): correctness, speed, memory.

Run on a fresh GPU machine with CuPy, numba-cuda and PyTorch (CUDA) installed::

    pip install --no-deps wheels/*.whl        # array-api-compat
    python tools/gpu_check.py --out "$OUT"    # ~3-6 min on an H200; --budget caps it

Sections, in order, each in its own try/except (an error is recorded in the JSON and the
next section runs), all under one time budget (``--budget`` seconds, default 420):

1. ``env``: versions, the device, its SM count and memory.
2. ``kernels``: every kernel through ``CudaPath`` on CuPy arrays (rows, NHWC, NCHW; float16,
   float32, float64; activations and residuals) against float64 NumPy, with the error bounds
   of ``tests/test_cuda_sim.py``; the float32 mean/std = 1e4 case within 1e-4 of float64;
   bitwise-equal repeated reductions (fixed-order merges).
3. ``timing``: anybn's kernels (with their O(C) CuPy coefficient arithmetic) against
   ``torch.nn.functional.batch_norm`` on CUDA (training forward, inference, autograd
   backward; channels_last for NHWC) and a device-to-device copy, in the same run, timed with
   CUDA events, medians of 20 runs: inputs of 64 MiB and 256 MiB, ResNet-50's BN shapes at
   batch 32, and small inputs for the ``_MIN_BYTES`` crossover; plus ``anybn.batch_norm_train``
   end to end where ``anybn._fast`` selects the cuda path.
4. ``memory``: CuPy's pool holds nothing the size of x beyond the caller's arrays after
   each step.
5. ``pytest``: ``python -m pytest -q -k cupy`` (the CuPy test subset), with the time left; the
   whole log in ``pytest_cupy.txt``.

Writes ``gpu_check.json`` (after every section, so a killed run keeps what it had) and
``gpu_check.png`` to ``--out``. ``--plot-only results.json`` redraws the plot from a JSON.
Exit status 0 when every section ran and every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
# numba-cuda 0.30.4 (the newest on the package index, 2026-11) registers an overload of
# np.row_stack, which NumPy 2.5 removed: its compiler then fails on the first kernel (seen on
# the H200 image: numpy 2.5.2). anybn itself declines the GPU path there with a warning
# (CudaPath._load); to measure the kernels anyway, this check puts the alias back, in its
# own process and, through a sitecustomize, in the pytest child. Recorded in the JSON.
ROW_STACK_SHIM = not hasattr(np, "row_stack")
SHIM_DIR = Path("/tmp/anybn-row-stack-shim")
if ROW_STACK_SHIM:
    np.row_stack = np.vstack  # type: ignore[attr-defined]
sys.path.insert(0, str(ROOT))

MIB = 1 << 20
RUNS = 20
WARMUP = 3
RESNET50_BN = [(64, 112), (64, 56), (256, 56), (128, 56), (128, 28), (512, 28), (256, 28), (256, 14),
               (1024, 14), (512, 14), (512, 7), (2048, 7)]
SECTIONS = ("env", "kernels", "timing", "memory", "pytest")


# ------------------------------------------------------------------ running sections


class Budget:
    """Seconds left of the global budget."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


def run_section(report: dict[str, Any], name: str, fn: Callable[[], Any], out: Path,
                filename: str = "gpu_check.json") -> None:
    """Run one section, record its result or its error, and write the JSON to ``out / filename``."""
    print(f"== {name}", flush=True)
    start = time.monotonic()
    try:
        report["sections"][name] = {"ok": True, "result": fn()}
    except BaseException as exc:  # noqa: BLE001 - a check records every failure and moves on
        if isinstance(exc, KeyboardInterrupt):
            raise
        report["sections"][name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                                    "traceback": traceback.format_exc()[-4000:]}
        print(f"   error: {type(exc).__name__}: {exc}", flush=True)
    report["sections"][name]["seconds"] = round(time.monotonic() - start, 2)
    write_json(report, out, filename)


def write_json(report: dict[str, Any], out: Path, filename: str = "gpu_check.json") -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / filename).write_text(json.dumps(report, indent=1, default=_jsonable))


def _jsonable(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return str(v)


# ------------------------------------------------------------------ 1. env


def section_env() -> dict[str, Any]:
    import cupy as cp

    info: dict[str, Any] = {"python": platform.python_version(), "numpy": np.__version__,
                            "cupy": cp.__version__}
    for mod in ("numba", "numba_cuda", "torch", "array_api_compat"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception as exc:  # noqa: BLE001
            info[mod] = f"unavailable: {exc}"
    dev = cp.cuda.Device()
    props = cp.cuda.runtime.getDeviceProperties(dev.id)
    info["device"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    info["sm_count"] = dev.attributes["MultiProcessorCount"]
    info["memory_gib"] = round(dev.mem_info[1] / 2**30, 1)
    info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
    from numba import cuda

    info["numba_cuda_available"] = cuda.is_available()
    info["numpy_row_stack_shim"] = ROW_STACK_SHIM
    if ROW_STACK_SHIM:
        info["without_shim"] = _fallback_without_shim()
    return info


_FALLBACK = """
import json, warnings, cupy as cp, numpy as np, anybn
x = cp.random.default_rng(0).standard_normal((64, 64, 8, 8), dtype=cp.float32)  # 1 MiB
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    y, _ = anybn.batch_norm_train(x, axis=1)
x64 = cp.asnumpy(x).astype(np.float64)
m, v = x64.mean(axis=(0, 2, 3), keepdims=True), x64.var(axis=(0, 2, 3), keepdims=True)
err = float(np.abs(cp.asnumpy(y) - (x64 - m) / np.sqrt(v + 1e-5)).max())
print(json.dumps({"warnings": [str(w.message)[:300] for w in caught], "max_abs_err": err}))
"""


def _fallback_without_shim() -> dict[str, Any]:
    """anybn on a CuPy array in a process without the shim: what the user gets."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep)
                                                        if p and p != str(SHIM_DIR)])
    proc = subprocess.run([sys.executable, "-c", _FALLBACK], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=120)
    if proc.returncode:
        return {"rc": proc.returncode, "stderr": proc.stderr[-1500:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ 2. kernels


def _load_test_bounds() -> ModuleType:
    """tests/test_cuda_sim.py, for its float64 references and error bounds (not its tests).

    numba.cuda is imported for the real GPU first, so that module leaves the simulator off.
    """
    import numba.cuda  # noqa: F401

    spec = importlib.util.spec_from_file_location("_cuda_sim_bounds", ROOT / "tests" / "test_cuda_sim.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layout_of(shape: tuple[int, ...], axis: int) -> Any:
    """An ``anybn._namespace.Layout`` (or the same attributes) for x of ``shape``."""
    axis %= len(shape)
    outer, inner = int(np.prod(shape[:axis])), int(np.prod(shape[axis + 1:]))
    try:
        from anybn._layout import Layout

        return Layout(tuple(shape), axis, outer, shape[axis], inner)
    except Exception:  # noqa: BLE001 - the Layout under refactoring: its attributes suffice
        return SimpleNamespace(shape=tuple(shape), axis=axis, outer=outer, features=shape[axis], inner=inner)


def _cuda_path(launch: str = "numba") -> Any:
    """A loaded ``CudaPath(launch=...)``; raises where numba.cuda cannot serve."""
    from anybn._fast.cuda import CudaPath

    path = CudaPath(launch=launch)
    if path._load() is None:
        raise RuntimeError("CudaPath: numba.cuda is not available on this machine")
    return path


KERNEL_SHAPES = [
    ("rows-NC", (1000, 7), 1),
    ("rows-C>32", (333, 40), 1),
    ("NHWC", (8, 15, 15, 64), -1),
    ("NCHW", (16, 13, 17, 19), 1),
    ("NCL-short", (4097, 3, 3), 1),
]
ACTIVATION_CASES = [(None, False), (None, True), ("relu", True), ("sigmoid", True)]
LARGE_SHAPE = (64, 64, 64, 64)  # 64 MiB of float32: the mean/std = 1e4 and repeatability checks
MEMORY_CASES = [("NCHW 64MiB", (64, 256, 32, 32), 1), ("NHWC 64MiB", (64, 32, 32, 256), -1)]


def section_kernels(budget: Budget) -> dict[str, Any]:
    import cupy as cp

    t = _load_test_bounds()
    path = _cuda_path()
    checks: list[dict[str, Any]] = []

    def check(name: str, fn: Callable[[], None]) -> None:
        try:
            fn()
            checks.append({"name": name, "ok": True})
        except Exception as exc:  # noqa: BLE001
            checks.append({"name": name, "ok": False, "error": f"{type(exc).__name__}: {str(exc)[:600]}"})

    cases = [(name, shape, axis, dtype, activation, residual) for name, shape, axis in KERNEL_SHAPES
             for dtype in (np.float16, np.float32, np.float64) for activation, residual in ACTIVATION_CASES]
    for done, (name, shape, axis, dtype, activation, residual) in enumerate(cases):
        if budget.left() < 240:  # leave time for timing, memory and pytest
            checks.append({"name": f"{len(cases) - done} cases not run", "ok": False, "error": "time budget"})
            break
        case = f"{name}-{np.dtype(dtype).name}-{activation}-{'res' if residual else 'nores'}"
        check(case, lambda: _check_all_kernels(cp, t, path, shape, axis, dtype, activation, residual))
    check("float32 mean/std=1e4, 64 MiB NCHW", lambda: _check_large_offset(cp, path, LARGE_SHAPE, 1))
    check("float32 mean/std=1e4, 64 MiB NHWC", lambda: _check_large_offset(cp, path, LARGE_SHAPE, -1))
    check("reductions bitwise repeatable", lambda: _check_deterministic(cp, path))
    failed = [c for c in checks if not c["ok"]]
    return {"launcher": type(path._launcher).__name__ if path._launcher is not None else "numba dispatch",
            "passed": len(checks) - len(failed), "failed": len(failed), "checks": checks}


def _check_all_kernels(cp: ModuleType, t: ModuleType, path: Any, shape: tuple[int, ...], axis: int,
                       dtype: Any, activation: str | None, residual: bool) -> None:
    """moments, apply, grad_sums, grad_apply on the GPU against float64 NumPy (test bounds)."""
    layout = layout_of(shape, axis)
    fold = (layout.outer, layout.features, layout.inner)
    rng = np.random.default_rng(0)
    c = layout.features
    x = rng.normal(3.0, 2.0, size=shape).astype(dtype)
    dy = rng.normal(0.5, 1.0, size=shape).astype(dtype)
    r = rng.normal(0.0, 1.0, size=shape).astype(dtype) if residual else None
    scale = rng.uniform(0.5, 2.0, c) * rng.choice([-1.0, 1.0], c)
    shift = rng.normal(0.0, 1.0, c)
    a, b, k = rng.normal(0, 0.3, c), rng.normal(0, 0.5, c), rng.uniform(0.5, 2.0, c)
    x3, r3 = x.reshape(fold), None if r is None else r.reshape(fold)
    gx = cp.asarray(x)
    gr = None if r is None else cp.asarray(r)

    pivot, s1, s2 = path.moments(gx, layout)
    pivot = cp.asnumpy(pivot)
    assert np.array_equal(pivot, x3[0, :, 0].astype(np.float64)), "pivot is not x[0, :, 0]"
    d = x3.astype(np.float64) - t._v(pivot)
    t._assert_close(cp.asnumpy(s1), t._sum(d), t._sum_error(d), dtype=dtype, what="s1")
    t._assert_close(cp.asnumpy(s2), t._sum(d * d), t._sum_error(d * d, ops=2), dtype=dtype, what="s2")

    mean = x3.astype(np.float64).mean(axis=(0, 2))
    y = path.apply(gx, layout, cp.asarray(mean), cp.asarray(scale), cp.asarray(shift),
                   activation=activation, residual=gr)
    assert y.dtype == x.dtype and y.shape == x.shape
    z = t.ref_z(x3, mean, scale, shift, r3)
    expected = t.ref_act(z, activation)
    dz = t._z_error(x3, mean, scale, shift, r3, dtype)
    tol = t._act_error(z, dz, activation, dtype) + t._output_rounding(expected, dtype)
    t._assert_close(cp.asnumpy(y).reshape(fold), expected, tol, dtype=dtype, what="y")

    # z around the forward's pivot (the mean), sums around the sample pivot
    z = t.ref_z(x3, mean, scale, shift, r3)
    dz = t._z_error(x3, mean, scale, shift, r3, dtype)
    dy3 = dy.reshape(fold)
    if activation == "relu":  # dy = 0 where the mask could differ from float64's
        dy3 = np.where(np.abs(z) <= 2 * dz, 0, dy3).astype(dtype)
    gdy = cp.asarray(dy3.reshape(shape))
    gp, gs, gh, gm = cp.asarray(pivot), cp.asarray(scale), cp.asarray(shift), cp.asarray(mean)
    sum_dy, sum_dy_d = path.grad_sums(gx, gdy, layout, gp, activation=activation, scale=gs, shift=gh,
                                      residual=gr, z_pivot=gm)
    g = t.ref_dy_prime(dy3, z, activation)
    dg = t._dy_prime_error(dy3, z, dz, activation, dtype)
    t._assert_close(cp.asnumpy(sum_dy), t._sum(g), t._sum_error(g, dg), dtype=dtype, what="sum dy'")
    t._assert_close(cp.asnumpy(sum_dy_d), t._sum(g * d), t._sum_error(g * d, dg * np.abs(d), ops=2),
                    dtype=dtype, what="sum dy' d")

    dx, dres = path.grad_apply(gx, gdy, layout, gp, cp.asarray(a), cp.asarray(b), cp.asarray(k),
                               activation=activation, scale=gs, shift=gh, residual=gr, z_pivot=gm)
    inner = g + t._v(a) * d + t._v(b)
    expected = t._v(k) * inner
    uc = t._compute_unit(dtype)
    inner_err = dg + uc * (4 * np.abs(t._v(a)) * np.abs(d) + 3 * np.abs(g) + 3 * np.abs(t._v(b)))
    tol = np.abs(t._v(k)) * inner_err + 2 * uc * np.abs(expected) + t._output_rounding(expected, dtype)
    t._assert_close(cp.asnumpy(dx).reshape(fold), expected, tol, dtype=dtype, what="dx")
    if residual and activation is None:
        assert dres is gdy, "without an activation the residual's gradient is dy itself"
    elif residual:
        assert dres is not None, "no residual gradient"
        t._assert_close(cp.asnumpy(dres).reshape(fold), g, dg + t._output_rounding(g, dtype), dtype=dtype,
                        what="dres")
    else:
        assert dres is None


def _check_large_offset(cp: ModuleType, path: Any, shape: tuple[int, ...], axis: int) -> None:
    layout = layout_of(shape, axis)
    fold = (layout.outer, layout.features, layout.inner)
    n, eps = layout.outer * layout.inner, 1e-5
    gx = (1e4 + cp.random.default_rng(5).standard_normal(shape, dtype=cp.float32)).astype(cp.float32)
    x3 = cp.asnumpy(gx).reshape(fold).astype(np.float64)
    mean_ref = x3.mean(axis=(0, 2))
    var_ref = ((x3 - mean_ref[None, :, None]) ** 2).mean(axis=(0, 2))
    y_ref = (x3 - mean_ref[None, :, None]) / np.sqrt(var_ref[None, :, None] + eps)
    pivot, s1, s2 = path.moments(gx, layout)
    m1 = s1 / n
    mean, var = pivot + m1, s2 / n - m1 * m1
    scale = 1.0 / cp.sqrt(var + eps)
    y = cp.asnumpy(path.apply(gx, layout, pivot, scale, -m1 * scale)).reshape(fold)
    err = float(np.max(np.abs(y - y_ref)))
    assert err < 1e-4, f"float32 y off by {err:.3g} from float64 at mean/std = 1e4"


def _check_deterministic(cp: ModuleType, path: Any) -> None:
    shape = LARGE_SHAPE
    gx = cp.random.default_rng(6).standard_normal(shape, dtype=cp.float32)
    for axis in (1, -1):
        layout = layout_of(shape, axis)
        runs = [cp.asnumpy(cp.stack(path.moments(gx, layout)[1:])) for _ in range(3)]
        assert all(np.array_equal(runs[0], other) for other in runs[1:]), f"axis={axis}: sums differ run to run"


# ------------------------------------------------------------------ 3. timing


def timing_cases() -> list[tuple[str, tuple[int, ...], int, Any]]:
    """(name, shape, axis, dtype) of every timed input."""
    cases = [
        ("NCHW f32 64MiB", (64, 256, 32, 32), 1, np.float32),
        ("NHWC f32 64MiB", (64, 32, 32, 256), -1, np.float32),
        ("NC f32 64MiB", (131072, 128), 1, np.float32),
        ("NCHW f16 64MiB", (128, 256, 32, 32), 1, np.float16),
        ("NHWC f16 64MiB", (128, 32, 32, 256), -1, np.float16),
        ("NCHW f32 256MiB", (256, 256, 32, 32), 1, np.float32),
        ("NHWC f32 256MiB", (256, 32, 32, 256), -1, np.float32),
    ]
    for c, hw in RESNET50_BN:
        cases.append((f"R50 NCHW C{c} {hw}x{hw}", (32, c, hw, hw), 1, np.float32))
        cases.append((f"R50 NHWC C{c} {hw}x{hw}", (32, hw, hw, c), -1, np.float32))
    for kib in (64, 256, 1024, 4096, 16384):  # the _MIN_BYTES crossover
        n = kib * 1024 // 4 // 64
        cases.append((f"small NCHW f32 {kib}KiB", (n // 16, 64, 4, 4), 1, np.float32))
    return cases


def gpu_time(cp: ModuleType, fn: Callable[[], Any], runs: int = RUNS, warmup: int = WARMUP) -> dict[str, float]:
    """Median, min and max milliseconds of ``fn`` by CUDA events on the legacy default stream.

    CuPy's null stream and PyTorch's default stream are both that stream, so the same events
    bracket either library's work; each run is bracketed alone (gaps from host launch
    overhead count, as a user would see them).
    """
    for _ in range(warmup):
        fn()
    cp.cuda.Device().synchronize()
    times = []
    for _ in range(runs):
        start, stop = cp.cuda.Event(), cp.cuda.Event()
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(cp.cuda.get_elapsed_time(start, stop))
    return {"median_ms": statistics.median(times), "min_ms": min(times), "max_ms": max(times)}


class AnybnSteps:
    """Training forward, inference and backward from CudaPath's kernels and O(C) CuPy math.

    The coefficient arithmetic is written out here as the functional core will do it, so the
    kernels are timed with the small CuPy operations they come with.
    """

    def __init__(self, cp: ModuleType, path: Any, x: Any, layout: Any, eps: float = 1e-5,
                 momentum: float = 0.1) -> None:
        self.cp, self.path, self.x, self.layout = cp, path, x, layout
        c = layout.features
        self.n = layout.outer * layout.inner
        self.eps, self.momentum = eps, momentum
        self.weight = cp.ones(c, dtype=cp.float64)
        self.bias = cp.zeros(c, dtype=cp.float64)
        self.running_mean = cp.zeros(c, dtype=cp.float64)
        self.running_var = cp.ones(c, dtype=cp.float64)

    def train(self) -> tuple[Any, tuple[Any, ...]]:
        cp, n = self.cp, self.n
        pivot, s1, s2 = self.path.moments(self.x, self.layout)
        m1 = s1 / n
        var = cp.maximum(s2 / n - m1 * m1, 0.0)
        invstd = 1.0 / cp.sqrt(var + self.eps)
        scale = self.weight * invstd
        y = self.path.apply(self.x, self.layout, pivot, scale, self.bias - m1 * scale)
        mom = self.momentum
        self.running_mean = (1 - mom) * self.running_mean + mom * (pivot + m1)
        self.running_var = (1 - mom) * self.running_var + mom * var * (n / max(n - 1, 1))
        return y, (pivot, m1, invstd)

    def eval(self) -> Any:
        scale = self.weight / self.cp.sqrt(self.running_var + self.eps)
        return self.path.apply(self.x, self.layout, self.running_mean, scale, self.bias)

    def backward(self, dy: Any, saved: tuple[Any, ...]) -> tuple[Any, Any, Any]:
        pivot, m1, invstd = saved
        n = self.n
        sum_dy, sum_dy_d = self.path.grad_sums(self.x, dy, self.layout, pivot)
        dweight = invstd * (sum_dy_d - m1 * sum_dy)
        # dx = w invstd (dy - sum_dy / n - xhat dweight / n), xhat = (x - pivot - m1) invstd
        a = -invstd * dweight / n
        b = -sum_dy / n - a * m1
        dx, _ = self.path.grad_apply(self.x, dy, self.layout, pivot, a, b, self.weight * invstd)
        return dx, dweight, sum_dy


def section_timing(budget: Budget) -> dict[str, Any]:
    import cupy as cp
    import torch
    import torch.nn.functional as F

    path = _cuda_path()
    rows: list[dict[str, Any]] = []
    cases = timing_cases()
    for done, (name, shape, axis, dtype) in enumerate(cases):
        if budget.left() < 150:  # leave time for memory and pytest
            rows.append({"case": f"{len(cases) - done} cases not timed", "error": "time budget"})
            break
        row: dict[str, Any] = {"case": name, "shape": list(shape), "axis": axis,
                               "dtype": np.dtype(dtype).name, "bytes": int(np.prod(shape)) * np.dtype(dtype).itemsize}
        try:
            _time_case(cp, torch, F, path, row, shape, axis, dtype)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {str(exc)[:400]}"
        rows.append(row)
        print(f"   {name}: " + ", ".join(f"{k}={v['median_ms']:.3f}ms" for k, v in row.items()
                                        if isinstance(v, dict) and "median_ms" in v), flush=True)
        cp.get_default_memory_pool().free_all_blocks()
        torch.cuda.empty_cache()
    return {"runs": RUNS, "warmup": WARMUP, "rows": rows}


def _time_case(cp: ModuleType, torch: Any, F: Any, path: Any, row: dict[str, Any], shape: tuple[int, ...],
               axis: int, dtype: Any) -> None:
    layout = layout_of(shape, axis)
    x = cp.random.default_rng(0).standard_normal(shape, dtype=cp.float32).astype(dtype)
    dy = cp.random.default_rng(1).standard_normal(shape, dtype=cp.float32).astype(dtype)
    steps = AnybnSteps(cp, path, x, layout)
    y, saved = steps.train()
    row["anybn_train"] = gpu_time(cp, steps.train)
    row["anybn_eval"] = gpu_time(cp, steps.eval)
    row["anybn_backward"] = gpu_time(cp, lambda: steps.backward(dy, saved))
    out = cp.empty_like(x)
    row["copy_cupy"] = gpu_time(cp, lambda: cp.copyto(out, x))
    del y, out

    # torch on the same memory: NHWC as an NCHW view with channels_last strides
    tx = torch.from_dlpack(x)
    tdy = torch.from_dlpack(dy)
    if axis != 1:
        perm = (0, tx.ndim - 1, *range(1, tx.ndim - 1))
        tx, tdy = tx.permute(perm), tdy.permute(perm)
    c = layout.features
    tw = torch.ones(c, device=tx.device, dtype=tx.dtype, requires_grad=True)
    tb = torch.zeros(c, device=tx.device, dtype=tx.dtype, requires_grad=True)
    rm = torch.zeros(c, device=tx.device, dtype=torch.float32 if tx.dtype == torch.float16 else tx.dtype)
    rv = torch.ones_like(rm)
    if tx.dtype == torch.float16:  # PyTorch's half BN takes float32 parameters
        tw = torch.ones(c, device=tx.device, requires_grad=True)
        tb = torch.zeros(c, device=tx.device, requires_grad=True)
    with torch.no_grad():
        row["torch_train"] = gpu_time(cp, lambda: F.batch_norm(tx, rm, rv, tw, tb, True, 0.1, 1e-5))
        row["torch_eval"] = gpu_time(cp, lambda: F.batch_norm(tx, rm, rv, tw, tb, False, 0.1, 1e-5))
    txg = tx.detach().requires_grad_(True)
    ty = F.batch_norm(txg, rm, rv, tw, tb, True, 0.1, 1e-5)
    row["torch_backward"] = gpu_time(cp, lambda: torch.autograd.grad(ty, (txg, tw, tb), tdy, retain_graph=True))
    tout = torch.empty_like(tx)
    row["copy_torch"] = gpu_time(cp, lambda: tout.copy_(tx))
    del ty, txg, tout
    row.update(_end_to_end(cp, x, dy, axis))


CROSSOVER_BYTES = 16 * MIB  # up to this size of x, end to end also on each path forced


def _end_to_end(cp: ModuleType, x: Any, dy: Any, axis: int) -> dict[str, Any]:
    """``anybn.batch_norm_train`` / ``_backward`` / ``_eval`` timed as a user calls them, and
    the fast path ``anybn._fast`` selects for them.

    For x of at most ``CROSSOVER_BYTES`` the same calls are timed again on each path forced:
    ``generic`` (``ANYBN_FAST_PATHS=0``: CuPy's own kernels through the array-API code) and
    ``fast`` (``anybn._fast.cuda._MIN_BYTES = 0``: the numba-cuda kernels at any size), which
    gives the size from which the fast path should serve.
    """
    result: dict[str, Any] = {}
    try:
        import array_api_compat

        import anybn
        from anybn import _fast
        from anybn._fast import cuda as cuda_path

        xp = array_api_compat.array_namespace(x)
        chosen = _fast.select("train", xp, x)
        result["e2e_path"] = getattr(chosen, "name", None) or "generic"
        c = x.shape[axis]
        w, b = cp.ones(c, dtype=x.dtype), cp.zeros(c, dtype=x.dtype)
        mean, var = cp.zeros(c, dtype=x.dtype), cp.ones(c, dtype=x.dtype)

        def timed(prefix: str) -> None:
            y, saved = anybn.batch_norm_train(x, w, b, axis=axis)
            result[f"{prefix}_train"] = gpu_time(cp, lambda: anybn.batch_norm_train(x, w, b, axis=axis))
            result[f"{prefix}_backward"] = gpu_time(cp, lambda: anybn.batch_norm_backward(dy, saved))
            result[f"{prefix}_eval"] = gpu_time(cp, lambda: anybn.batch_norm_eval(x, mean, var, w, b, axis=axis))

        timed("e2e")
        if x.nbytes <= CROSSOVER_BYTES:
            saved_env, saved_min = os.environ.get("ANYBN_FAST_PATHS"), cuda_path._MIN_BYTES
            try:
                os.environ["ANYBN_FAST_PATHS"] = "0"
                timed("generic")
                os.environ.pop("ANYBN_FAST_PATHS")
                cuda_path._MIN_BYTES = 0
                result["forced_path"] = getattr(_fast.select("train", xp, x), "name", None) or "generic"
                timed("fast")
            finally:
                cuda_path._MIN_BYTES = saved_min
                if saved_env is None:
                    os.environ.pop("ANYBN_FAST_PATHS", None)
                else:
                    os.environ["ANYBN_FAST_PATHS"] = saved_env
    except Exception as exc:  # noqa: BLE001 - recorded, the next case runs
        result["e2e_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    return result


# ------------------------------------------------------------------ 4. memory


def section_memory() -> dict[str, Any]:
    """CuPy's pool after each step holds the caller's arrays, the result, and O(C) only."""
    import cupy as cp

    path = _cuda_path()
    pool = cp.get_default_memory_pool()
    results = []
    for name, shape, axis in MEMORY_CASES:
        x = cp.random.default_rng(0).standard_normal(shape, dtype=cp.float32)
        dy = cp.random.default_rng(1).standard_normal(shape, dtype=cp.float32)
        steps = AnybnSteps(cp, path, x, layout_of(shape, axis))
        for step in ("train", "eval", "backward"):
            y, saved = steps.train()
            cp.cuda.Device().synchronize()
            pool.free_all_blocks()
            base = pool.total_bytes()  # x, dy, y and the saved O(C) vectors, nothing cached
            if step == "train":
                out = steps.train()[0]
            elif step == "eval":
                out = steps.eval()
            else:
                out = steps.backward(dy, saved)[0]
            cp.cuda.Device().synchronize()
            extra = pool.total_bytes() - base - out.nbytes  # used or cached beyond the result
            results.append({"case": name, "step": step, "x_bytes": x.nbytes, "extra_bytes": int(extra),
                            "ok": bool(extra < x.nbytes // 16)})
            del out, y, saved
    return {"checks": results, "failed": sum(not r["ok"] for r in results)}


# ------------------------------------------------------------------ 5. pytest


def section_pytest(budget: Budget, out: Path) -> dict[str, Any]:
    """The test suite's CuPy cases (``-k cupy``), all of them (no ``-x``); the whole log is
    written to ``pytest_cupy.txt`` beside the JSON."""
    timeout = max(30.0, budget.left() - 15)
    cmd = [sys.executable, "-m", "pytest", "-q", "-rfE", "--maxfail=60", "-k", "cupy", "-p", "no:cacheprovider"]
    log = out / "pytest_cupy.txt"
    env = dict(os.environ)
    if ROW_STACK_SHIM:
        SHIM_DIR.mkdir(parents=True, exist_ok=True)
        (SHIM_DIR / "sitecustomize.py").write_text(
            "import numpy as np\nif not hasattr(np, 'row_stack'):\n    np.row_stack = np.vstack\n")
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SHIM_DIR), env.get("PYTHONPATH", "")]))
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        text = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
        log.write_text(text)
        return {"rc": None, "timed_out_after_s": round(timeout), "tail": text[-3000:]}
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    summary = (proc.stdout.strip().splitlines() or [""])[-1]
    if proc.returncode:
        raise AssertionError(f"pytest -k cupy failed (rc {proc.returncode}): {summary}\n{proc.stdout[-3000:]}")
    return {"rc": proc.returncode, "summary": summary, "tail": proc.stdout[-2000:]}


# ------------------------------------------------------------------ the plot


OPS = ("train", "eval", "backward")


def plot(report: dict[str, Any], png: Path) -> None:
    """Bars of anybn's time over PyTorch's per case and step (log scale; below 1: faster),
    and each step's bandwidth as a share of the same run's device-to-device copy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timing = report.get("sections", {}).get("timing", {})
    rows = [r for r in (timing.get("result") or {}).get("rows", []) if "anybn_train" in r and "torch_train" in r]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, 0.45 * len(rows) + 3), 9), sharex=True)
    title = f"anybn CUDA path vs torch.nn.functional.batch_norm — {report.get('device', '?')}"
    if not rows:
        ax1.text(0.5, 0.5, "no timings in this report", ha="center", va="center", transform=ax1.transAxes)
        ax1.set_title(title)
        fig.savefig(png, dpi=110)
        plt.close(fig)
        return
    width = 0.27
    xs = np.arange(len(rows))
    traffic = {"train": 3, "eval": 2, "backward": 5}  # passes of x's size: reads + writes
    for i, op in enumerate(OPS):
        ratio = [r[f"anybn_{op}"]["median_ms"] / r[f"torch_{op}"]["median_ms"] for r in rows]
        ax1.bar(xs + (i - 1) * width, ratio, width, label=op)
        share = [traffic[op] * r["bytes"] / (r[f"anybn_{op}"]["median_ms"] * 1e-3)
                 / (2 * r["bytes"] / (r["copy_cupy"]["median_ms"] * 1e-3)) for r in rows]
        ax2.bar(xs + (i - 1) * width, share, width, label=op)
    ax1.axhline(1.0, color="k", lw=0.8)
    ax1.set_yscale("log")
    ax1.set_ylabel("anybn time / PyTorch time")
    ax1.set_title(title)
    ax1.legend()
    ax2.axhline(1.0, color="k", lw=0.8)
    ax2.set_ylabel("bandwidth / D2D copy's")
    ax2.set_xticks(xs)
    ax2.set_xticklabels([r["case"] for r in rows], rotation=75, ha="right", fontsize=7)
    ax2.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "gpu_check_out")),
                   help="folder for gpu_check.json and gpu_check.png (default: $OUT or ./gpu_check_out)")
    p.add_argument("--budget", type=float, default=420.0, help="seconds for the whole run (default 420)")
    p.add_argument("--sections", default=",".join(SECTIONS),
                   help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--plot-only", type=Path, metavar="JSON", help="only redraw the plot from this JSON")
    args = p.parse_args(argv)
    unknown = set(args.sections.split(",")) - set(SECTIONS)
    if unknown:
        p.error(f"--sections: unknown {sorted(unknown)}, expected some of {list(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.plot_only:
        plot(json.loads(args.plot_only.read_text()), args.out / "gpu_check.png")
        print(f"wrote {args.out / 'gpu_check.png'}")
        return 0
    budget = Budget(args.budget)
    wanted = args.sections.split(",")
    report: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget,
                              "argv": sys.argv, "sections": {}}
    plan: list[tuple[str, Callable[[], Any]]] = [
        ("env", section_env),
        ("kernels", lambda: section_kernels(budget)),
        ("timing", lambda: section_timing(budget)),
        ("memory", section_memory),
        ("pytest", lambda: section_pytest(budget, args.out)),
    ]
    for name, fn in plan:
        if name not in wanted:
            continue
        if budget.left() < 20:
            report["sections"][name] = {"ok": False, "error": "skipped: time budget spent"}
            continue
        run_section(report, name, fn, args.out)
        if name == "env" and report["sections"]["env"]["ok"]:
            report["device"] = report["sections"]["env"]["result"].get("device")
    report["finished"] = time.strftime("%Y-%m-%d %H:%M:%S")
    write_json(report, args.out)
    try:
        plot(report, args.out / "gpu_check.png")
    except Exception as exc:  # noqa: BLE001
        report["plot_error"] = f"{type(exc).__name__}: {exc}"
        write_json(report, args.out)
    ok = all(s.get("ok") for s in report["sections"].values()) and all(
        not (s.get("result") or {}).get("failed") for s in report["sections"].values())
    print(f"wrote {args.out / 'gpu_check.json'} and gpu_check.png; {'all passed' if ok else 'FAILURES: see JSON'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
