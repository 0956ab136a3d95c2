"""The README's NumPy example runs as written and does what its comments say."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from reference import reference_batch_norm

README = Path(__file__).resolve().parent.parent / "README.md"


def test_numpy_example_runs_and_normalizes():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    numpy_example = next(b for b in blocks if "import numpy as np" in b)
    namespace: dict = {}
    exec(compile(numpy_example, str(README), "exec"), namespace)
    x, y, bn = namespace["x"], namespace["y"], namespace["bn"]
    np.testing.assert_allclose(y, reference_batch_norm(x, 1), rtol=2e-4, atol=2e-4)
    assert namespace["dx"].shape == x.shape and bn.grad_weight.shape == (16,)
    # estimate_population with the paper's estimator over the four equal splits
    parts = np.split(x.astype(np.float64), 4)
    m = parts[0].size // 16
    batch_var = np.mean([p.var(axis=(0, 2, 3)) for p in parts], axis=0)
    np.testing.assert_allclose(bn.running_var, m / (m - 1) * batch_var, rtol=1e-5)
    assert not bn.training
