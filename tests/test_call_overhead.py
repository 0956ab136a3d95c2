"""tools/call_overhead.py (the Python around the compiled whole steps, measured after large
passes) runs and reports every op, its overhead a part of the call."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from conftest import numpy_fast_path_installed

TOOL = Path(__file__).resolve().parent.parent / "tools" / "call_overhead.py"


@pytest.mark.skipif(not numpy_fast_path_installed(), reason="the CPU fast path (numba) is not installed")
def test_call_overhead_reports_every_op():
    done = subprocess.run([sys.executable, str(TOOL), "--rounds", "3", "--shapes", "256x64,8x16x32x32"],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [(s, op) for s in ("256x64", "8x16x32x32")
                                            for op in ("train", "eval", "backward")]
    for _, _, overhead, ours, _ in rows:
        assert 0 < float(overhead) < float(ours)
