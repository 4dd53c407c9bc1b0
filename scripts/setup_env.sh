#!/usr/bin/env bash
# Create .venv with the package and its test dependencies (CPU torch). Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
. scripts/venv_lib.sh
# CPU torch first, so the package's torch range is already met and no CUDA build is pulled in.
.venv/bin/pip install -q "torch==2.13.0" 2>&1 | quiet
.venv/bin/pip install -q -e ".[dev]" 2>&1 | quiet
