"""The package type-checks: mypy over anybn/ finds no error (the type hints are kept true)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_finds_no_error(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (it is in the test extra)")
    done = subprocess.run(
        [sys.executable, "-m", "mypy", "anybn", "--ignore-missing-imports", "--cache-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
