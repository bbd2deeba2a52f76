#!/usr/bin/env bash
# Create .venv (once) and install requirements.txt into it, then put it first on PATH. Sourced by
# quickstart.sh and test.sh; safe to source from an interactive shell too (the work runs in a
# subshell, so its `set -e` does not stay behind in the caller).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! (
    set -euo pipefail
    PY="${PYTHON:-python3}"
    if [ ! -x "$ROOT/.venv/bin/python" ]; then
        echo "Creating $ROOT/.venv"
        "$PY" -m venv "$ROOT/.venv"
    fi
    # Installing is a no-op when everything is already there.
    "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
); then
    echo "setup_env.sh: could not create $ROOT/.venv or install requirements.txt into it" >&2
    return 1 2>/dev/null || exit 1
fi
export PATH="$ROOT/.venv/bin:$PATH"
