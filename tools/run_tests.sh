#!/usr/bin/env bash
# Set up (tools/setup_env.sh), lint (ruff format + check), then run the whole test suite.
# This is the README's test command and exactly what .ci/run executes.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup_env.sh
export OMP_NUM_THREADS=1
.venv/bin/ruff format --check .
.venv/bin/ruff check .
.venv/bin/python -m pytest "$@"
