#!/usr/bin/env bash
# Create .venv (once) and install requirements.txt into it, then put it first on PATH. Sourced by
# quickstart.sh and test.sh; safe to source from an interactive shell too (the work runs in a
# subshell, which exits at the first failed step; bash ignores `set -e` inside an `if` test).
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if ! (
    PY="${PYTHON:-python3}"
    VENV_PY="$ROOT/.venv/bin/python"
    if ! "$VENV_PY" -c "" 2>/dev/null; then
        # Absent, or left by an interpreter that is gone (its bin/python a dead link): made anew.
        if [ -e "$ROOT/.venv" ]; then
            echo "Recreating $ROOT/.venv (its python does not run)"
        else
            echo "Creating $ROOT/.venv"
        fi
        "$PY" -m venv --clear "$ROOT/.venv" || exit 1
    fi
    # PyPI's Linux torch is a CUDA build of several GB, which once filled a CI machine's disk. Where
    # pip's find-links hold a torch wheel that fits requirements.txt (this project's machines keep a
    # CPU build there), take it first, without the index; the install below then adds only what it
    # needs. With no such wheel this step does nothing and torch comes from the index as usual.
    if ! "$VENV_PY" -c "import torch" 2>/dev/null; then
        "$VENV_PY" -m pip install -q --disable-pip-version-check --no-index --no-deps \
            "$(grep -E '^torch([<>=!~ ]|$)' "$ROOT/requirements.txt")" 2>/dev/null || true
    fi
    # Installing is a no-op when everything is already there.
    if ! "$VENV_PY" -m pip install -q --disable-pip-version-check -r "$ROOT/requirements.txt"; then
        version=$("$VENV_PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
        echo "setup_env.sh: pip could not install requirements.txt into $ROOT/.venv (Python $version; the" \
             "project is tested on 3.11). If that Python is the cause, remove .venv and run again with" \
             "PYTHON set to a Python 3.11 (PYTHON=python3.11 bash scripts/test.sh)" >&2
        exit 1
    fi
); then
    echo "setup_env.sh: could not create $ROOT/.venv or install requirements.txt into it" >&2
    return 1 2>/dev/null || exit 1
fi
export PATH="$ROOT/.venv/bin:$PATH"
