"""``python -m anybn check`` (every backend against a float64 reference) and ``--version``."""

from __future__ import annotations

import shutil
import subprocess
import sys
from importlib import metadata

import pytest

from anybn import cli


def test_check_passes_on_installed_backends(capsys):
    assert cli.main(["check", "--shape", "16,3,5"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "FAIL" not in out
    rows = cli.check(["numpy", "numpy:generic", "no_such_backend"], (16, 3, 5))
    assert rows[2]["status"].startswith("skipped: backend 'no_such_backend': expected one of numpy,")
    for row in rows[:2]:
        assert row["status"] == "ok"
        # float32 against float64: a few ulp of O(1) values
        assert max(row["train"], row["backward"], row["eval"]) < 1e-5


def test_check_reports_a_missing_library(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)  # as if torch were not installed
    (row,) = cli.check(["torch"], (8, 2, 3))
    assert row["status"].startswith("skipped: torch is not installed (pip install torch==2.13.0)")


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "anybn", "check", "--shape", "8,2,3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "max |error| vs float64" in done.stdout


def test_version(capsys):
    want = f"anybn {metadata.version('anybn')}"  # the installed distribution's, not anybn.__version__
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == want
    done = subprocess.run([sys.executable, "-m", "anybn", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == want


def test_version_of_the_console_script():
    script = shutil.which("anybn")
    if script is None:
        pytest.skip("the anybn console script is not on PATH (pip install -e . puts it there)")
    done = subprocess.run([script, "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"anybn {metadata.version('anybn')}"
