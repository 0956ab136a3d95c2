"""Synchronized BN with JaxComm under shard_map on 4 host CPU devices (a subprocess, timed out).

Compared with float64 NumPy references on the whole batch; tolerances as in
``test_distributed_engines.py`` (float64, O(10) operations per value: 1e-12 relative).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from reference import reference_backward, reference_batch_norm, reference_moments  # noqa: E402

pytestmark = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")


def test_jax_shard_map_four_devices_matches_single_process(tmp_path: Path) -> None:
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
    env["JAX_PLATFORMS"] = "cpu"
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    script = Path(__file__).parent / "sync_workers" / "jax_worker.py"
    try:
        done = subprocess.run([sys.executable, str(script), str(tmp_path)], env=env, capture_output=True,
                              text=True, timeout=120)
    except subprocess.TimeoutExpired:
        pytest.fail("the JAX worker timed out after 120 s (a hang)")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    r = dict(np.load(tmp_path / "jax.npz"))
    x, dy, w, b = r["x"], r["dy"], r["w"], r["b"]
    np.testing.assert_allclose(r["y"], reference_batch_norm(x, 1, w, b), rtol=1e-12, atol=1e-12)
    dx, dw, db = reference_backward(x, dy, 1, w)
    np.testing.assert_allclose(r["dx"], dx, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r["dw"].sum(axis=0), dw, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(r["db"].sum(axis=0), db, rtol=1e-12, atol=1e-12)
    mean, var = reference_moments(x, 1)
    m = x.shape[0] * x.shape[2]
    np.testing.assert_allclose(r["rm"][0], 0.1 * mean, rtol=1e-12)
    np.testing.assert_allclose(r["rv"][0], 0.9 + 0.1 * var * m / (m - 1), rtol=1e-12)
    assert all(np.array_equal(r["rm"][k], r["rm"][0]) and np.array_equal(r["rv"][k], r["rv"][0]) for k in range(4))
    big_err = np.max(np.abs(r["big"] - reference_batch_norm(r["xb"].astype(np.float64), 1)))
    assert big_err <= 1e-4, f"float32 at mean/std 1e4: {big_err:.3g} off float64, expected <= 1e-4"
    assert str(r["error"]).startswith("ValueError: batch_norm_train: weight has shape (4,)"), str(r["error"])
