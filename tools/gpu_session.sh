#!/usr/bin/env bash
# The next GPU session's whole device work in one call (about 5 minutes on an H200):
#   1. tools/gpu_profile.py: the direct launcher against numba's dispatch bit for bit,
#      device time against host time, a cProfile of each step, generic vs fast up to 1 GiB;
#   2. tools/gpu_check.py: the kernels against float64, timings, memory, the CuPy tests.
# Results land in $OUT: gpu_profile.json, gpu_profile.txt, gpu_check.json, gpu_check.png,
# pytest_cupy.txt. Here, once, before the call:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl array-api-compat==1.16.0
# and call the device tool's run with  command: bash tools/gpu_session.sh  carry: [".whl"]
#   tools/gpu_session.sh [PROFILE_BUDGET_S [CHECK_BUDGET_S]]   (defaults 170 and 230)
set -u
cd "$(dirname "$0")/.."
source tools/device_env.sh
OUT_DIR="${OUT:-gpu_check_out}"
quiet() { grep -v -i -e "NumbaPerformanceWarning" -e "warn(errors"; }
"$PY" tools/gpu_profile.py --out "$OUT_DIR" --budget "${1:-170}" 2>&1 | quiet
profile=${PIPESTATUS[0]}
"$PY" tools/gpu_check.py --out "$OUT_DIR" --budget "${2:-230}" 2>&1 | quiet
check=${PIPESTATUS[0]}
echo "gpu_profile rc=$profile gpu_check rc=$check"
[ "$profile" = 0 ] && [ "$check" = 0 ]
