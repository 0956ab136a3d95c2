"""The prepared GPU checks (tools/gpu_check.py, tools/gpu_profile.py) run to the end on the CPU.

A GPU session has minutes of device time; a bug in a tool costs a whole run (it happened:
a signature helper that numba-cuda does not have). Here both tools run in a child process
under numba-cuda's simulator with a NumPy stand-in for CuPy (``tests/gpu_tools``), on tiny
shapes: every section must run, every check of the kernels against float64 must pass, and
the JSON, plot and profile must hold what the docs read from them. The timings mean nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("numba_cuda", reason="numba-cuda is not installed (pip install numba-cuda)")
pytest.importorskip("torch", reason="torch is not installed (pip install torch==2.13.0)")
pytest.importorskip("matplotlib", reason="matplotlib is not installed (pip install anybn[bench])")

ROOT = Path(__file__).resolve().parent.parent
DRY_RUN = ROOT / "tests" / "gpu_tools" / "dry_run.py"
STEPS = ("train", "eval", "backward")


def _run(tool: str, out: Path, *args: str) -> None:
    env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1", PYTHONPATH=str(ROOT / "tests" / "gpu_tools" / "fake_cupy"))
    proc = subprocess.run([sys.executable, str(DRY_RUN), tool, "--out", str(out), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _sections(path: Path) -> dict:
    report = json.loads(path.read_text())
    for name, section in report["sections"].items():
        assert section["ok"], f"{name}: {section.get('error')}\n{section.get('traceback', '')}"
    return report["sections"]


def test_gpu_check_runs_every_section_and_its_kernel_checks_pass(tmp_path):
    _run("check", tmp_path, "--sections", "env,kernels,timing,memory")
    sections = _sections(tmp_path / "gpu_check.json")
    assert set(sections) == {"env", "kernels", "timing", "memory"}
    kernels = sections["kernels"]["result"]
    # 2 shapes x 3 dtypes x 2 activation cases, the 1e4 offset (NCHW, NHWC), repeatability
    assert kernels["failed"] == 0 and kernels["passed"] == 15, kernels
    (row,) = sections["timing"]["result"]["rows"]
    for prefix in ("anybn", "torch", "e2e", "generic", "fast"):
        for step in STEPS:
            assert row[f"{prefix}_{step}"]["median_ms"] > 0, (prefix, step)
    assert row["copy_cupy"]["median_ms"] > 0 and row["forced_path"] == "generic"  # the fake is no CuPy
    memory = sections["memory"]["result"]
    assert memory["failed"] == 0 and len(memory["checks"]) == 6
    assert (tmp_path / "gpu_check.png").stat().st_size > 10_000
    # the plot redrawn from the JSON alone
    replot = tmp_path / "replot"
    _run("check", replot, "--plot-only", str(tmp_path / "gpu_check.json"))
    assert (replot / "gpu_check.png").stat().st_size > 10_000


def test_gpu_profile_runs_every_section_and_the_launchers_agree(tmp_path):
    _run("profile", tmp_path)
    sections = _sections(tmp_path / "gpu_profile.json")
    launchers = sections["launchers"]["result"]
    assert launchers["failed"] == 0 and len(launchers["checks"]) == 12, launchers
    (row,) = sections["device"]["result"]["rows"]
    for key in ("anybn_train", "numba_train", "kernel_moments", "kernel_grad_apply", "torch_backward", "copy"):
        assert row[key]["device_ms"] >= 0 and row[key]["host_ms"] > 0, key
    walls = sections["profile"]["result"]["ms_per_call_under_profiler"]
    assert set(walls) == {"direct", "numba"} and all(set(w) == set(STEPS) for w in walls.values())
    text = (tmp_path / "gpu_profile.txt").read_text()
    assert text.count("=====") == 6 and "ncalls" in text
    (large,) = sections["large"]["result"]["rows"]
    assert all(large[f"{prefix}_{step}"]["median_ms"] > 0 for prefix in ("e2e", "generic", "fast") for step in STEPS)
