# Sourced by tools/gpu_check.sh and tools/gpu_session.sh on the GPU machine: PY (its python3,
# the one with PyTorch and CuPy), the carried wheels (.whl/ as the device tool's README lays
# them out, or wheels/) installed to /tmp/anybn-site and put on PYTHONPATH, unbuffered output.
PY=$(command -v python3 || command -v python)
for dir in .whl wheels; do
    if compgen -G "$dir/*.whl" > /dev/null; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/anybn-site "$dir"/*.whl || exit 1
        export PYTHONPATH="/tmp/anybn-site${PYTHONPATH:+:$PYTHONPATH}"
    fi
done
export PYTHONUNBUFFERED=1
