"""``python -m anybn check``: every installed backend against a float64 reference."""

from __future__ import annotations

import subprocess
import sys

from anybn import cli


def test_check_passes_on_installed_backends(capsys):
    assert cli.main(["check", "--shape", "16,3,5"]) == 0
    out = capsys.readouterr().out
    assert "numpy" in out and "FAIL" not in out
    rows = cli.check(["numpy", "no_such_backend_module"], (16, 3, 5))
    assert rows[1]["status"] == "not installed"
    numpy_row = rows[0]
    assert numpy_row["status"] == "ok"
    # float32 against float64: a few ulp of O(1) values
    assert max(numpy_row["train"], numpy_row["backward"], numpy_row["eval"]) < 1e-5


def test_module_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "anybn", "check", "--shape", "8,2,3"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "max |error| vs float64" in done.stdout
