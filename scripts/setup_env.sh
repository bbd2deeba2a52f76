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
    # PyPI's Linux torch is a CUDA build of several GB, which once filled a CI machine's disk. Where
    # pip's find-links hold a torch wheel that fits requirements.txt (this project's machines keep a
    # CPU build there), take it first, without the index; the install below then adds only what it
    # needs. With no such wheel this step does nothing and torch comes from the index as usual.
    if ! "$ROOT/.venv/bin/python" -c "import torch" 2>/dev/null; then
        "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check --no-index --no-deps \
            "$(grep -E '^torch([<>=!~ ]|$)' "$ROOT/requirements.txt")" 2>/dev/null || true
    fi
    # Installing is a no-op when everything is already there.
    "$ROOT/.venv/bin/python" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"
); then
    echo "setup_env.sh: could not create $ROOT/.venv or install requirements.txt into it" >&2
    return 1 2>/dev/null || exit 1
fi
export PATH="$ROOT/.venv/bin:$PATH"
