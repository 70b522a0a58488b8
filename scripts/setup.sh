#!/usr/bin/env bash
# Create .venv (Python 3.11) and install csdc with its test and training extras.
# lava-nc 0.10.0 declares Python < 3.11; it is installed without its metadata checks and
# made importable on 3.11 by csdc's import hook (docs/lava.md explains why and how).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
# torch is pinned to the CPU build (a looser pin would pull CUDA packages)
.venv/bin/python -m pip install --quiet -e ".[test]"
if ! .venv/bin/python -m pip show lava-nc >/dev/null 2>&1; then
    .venv/bin/python -m pip install --quiet --no-deps --ignore-requires-python "lava-nc==0.10.0"
fi
.venv/bin/python -m pip install --quiet -r requirements-lava.txt
