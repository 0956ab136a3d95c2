#!/usr/bin/env bash
# The prepared GPU check in one command: install the carried wheels (array-api-compat),
# then run tools/gpu_check.py, which writes gpu_check.json and gpu_check.png to $OUT.
#   tools/gpu_check.sh [--budget SECONDS] [--sections env,kernels,timing,memory,pytest]
set -u
cd "$(dirname "$0")/.."
if compgen -G "wheels/*.whl" > /dev/null; then
    pip install --no-deps -q wheels/*.whl
fi
exec python tools/gpu_check.py --out "${OUT:-gpu_check_out}" "$@"
