#!/usr/bin/env bash
# The test suite in the project's virtual environment: bash scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/setup_env.sh
# The suite starts many small training processes; one thread each keeps 2 cores from thrashing.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m pytest -q "$@" tests
