#!/usr/bin/env bash
# Create .venv (once) and install requirements.txt into it. Sourced by quickstart.sh and test.sh.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-python3}"
if [ ! -x "$ROOT/.venv/bin/python" ]; then
    echo "Creating $ROOT/.venv"
    "$PY" -m venv "$ROOT/.venv"
fi
# Installing is a no-op when everything is already there.
"$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
export PATH="$ROOT/.venv/bin:$PATH"
