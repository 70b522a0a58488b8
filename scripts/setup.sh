#!/usr/bin/env bash
# Create .venv (Python 3.11) and install csdc with its test and training extras.
# lava-nc 0.10.0 declares Python < 3.11; it is installed without its metadata checks and
# made importable on 3.11 by csdc's import hook (docs/lava.md explains why and how).
# pip's output goes to .venv/setup.log and is shown only if a step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv with $PY" >&2
    "$PY" -m venv .venv
fi
LOG=.venv/setup.log
pipi() {
    if ! .venv/bin/python -m pip install --quiet "$@" >"$LOG" 2>&1; then
        cat "$LOG" >&2
        echo "setup failed: pip install $*" >&2
        exit 1
    fi
}
pipi --upgrade pip
# torch is pinned to the CPU build (a looser pin would pull CUDA packages)
pipi -e ".[test]"
if ! .venv/bin/python -m pip show lava-nc >/dev/null 2>&1; then
    pipi --no-deps --ignore-requires-python "lava-nc==0.10.0"
fi
pipi -r requirements-lava.txt
