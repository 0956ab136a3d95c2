#!/usr/bin/env bash
# The prepared GPU check in one command: install the carried wheels (array-api-compat, from
# .whl/ as the device tool's README lays them out, or wheels/), then run tools/gpu_check.py,
# which writes gpu_check.json, gpu_check.png and pytest_cupy.txt to $OUT.
#   tools/gpu_check.sh [--budget SECONDS] [--sections env,kernels,timing,memory,pytest]
# Here, once:  python3 -m pip download --no-deps --only-binary=:all: -d .whl array-api-compat
set -u
cd "$(dirname "$0")/.."
source tools/device_env.sh
exec "$PY" tools/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"
