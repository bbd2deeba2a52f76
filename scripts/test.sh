#!/usr/bin/env bash
# The test suite in the project's virtual environment: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# The suite starts many small training processes; one thread each keeps 2 cores from thrashing.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Paths among the arguments (bash scripts/test.sh tests/test_metrics.py) replace the whole suite.
for arg in "$@"; do
    if [[ "$arg" != -* && -e "${arg%%::*}" ]]; then
        exec python -m pytest -q "$@"
    fi
done
exec python -m pytest -q "$@" tests
