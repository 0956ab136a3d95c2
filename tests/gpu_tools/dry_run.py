"""Run tools/gpu_check.py or tools/gpu_profile.py on the CPU: numba-cuda's simulator for the
kernels, ``fake_cupy`` for CuPy, tiny shapes, one timed run. It checks that the prepared GPU
checks run to the end and write what they promise, so a GPU session's few minutes are not
lost to a bug in the tools (``tests/test_gpu_tools.py``).

    NUMBA_ENABLE_CUDASIM=1 PYTHONPATH=tests/gpu_tools/fake_cupy python tests/gpu_tools/dry_run.py \
        check|profile --out DIR [tool arguments]
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT)]

import gpu_check as g  # noqa: E402
import gpu_profile as gp  # noqa: E402

from anybn._fast import _cuda_kernels as K  # noqa: E402
from anybn._fast import cuda as glue  # noqa: E402

TINY = [("NCHW f32 tiny", (4, 2, 4, 4), 1, np.float32), ("NHWC f16 tiny", (4, 4, 4, 2), -1, np.float16)]


class _SimLauncher:
    """Stands in for ``DirectLauncher`` (which needs a GPU): numba's dispatch behind the
    launcher interface, so ``CudaPath``'s launcher plumbing and the tools' comparison run."""

    def stream(self, ptr: int) -> int:
        return 0

    def __call__(self, kernel: Any, grid: Any, block: Any, stream: Any, args: Any) -> None:
        K._dispatch(kernel, grid, block, stream, args)


def _path(launch: str = "numba") -> glue.CudaPath:
    path = glue.CudaPath(launch=launch)
    path._kernels = K
    path._launcher = _SimLauncher() if launch == "direct" else None
    return path


def main() -> int:
    glue._dev = lambda a: a  # the simulator takes the NumPy-backed arrays as they are
    K.launch_config = functools.partial(K.launch_config, threads=32, blocks_per_sm=1)
    g.RUNS, g.WARMUP, gp.RUNS = 1, 0, 1
    g.KERNEL_SHAPES = [("rows", (40, 7), 1), ("NCHW", (6, 3, 5, 7), 1)]
    g.ACTIVATION_CASES = [(None, False), ("relu", True)]
    g.timing_cases = lambda: TINY[:1]
    g.LARGE_SHAPE = (4, 2, 4, 4)
    g.MEMORY_CASES = [(name, shape, axis) for name, shape, axis, _ in TINY]
    gp.DEVICE_CASES = gp.LARGE_CASES = TINY[:1]
    gp.PROFILE_SHAPE = (4, 2, 4, 4)
    gp.PROFILE_CALLS = 1
    gp.LAUNCHER_LARGE = []
    g._cuda_path = _path
    tool, argv = sys.argv[1], sys.argv[2:]
    return (g.main if tool == "check" else gp.main)(argv)


if __name__ == "__main__":
    sys.exit(main())
