#!/usr/bin/env bash
# Set up .venv (Python 3.11) with csdc installed editable: what running needs (the core:
# numpy, onnx, onnxruntime, numba, ...), plus with --test the test extra (pytest, torch,
# brevitas, qonnx), and with --lava the Lava environment .venv-lava (lava-nc 0.10.0 with
# numpy<2 in a virtualenv of its own, made by `csdc lava-env`; docs/lava.md).
# One line per step with its time; pip's output goes to .venv/setup.log and is shown only if
# a step fails. Idempotent: a step whose inputs did not change is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRA=""
LAVA=0
for arg in "$@"; do
    case "$arg" in
        --test) EXTRA="[test]" ;;
        --lava) LAVA=1 ;;
        *) echo "usage: bash scripts/setup.sh [--test] [--lava]" >&2; exit 2 ;;
    esac
done
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null 2>&1 || PY=python3
LOG=.venv/setup.log

# step LABEL CMD...: run CMD with its output in $LOG, print one line with the elapsed time
step() {
    local label=$1 start=$SECONDS
    shift
    printf 'setup: %-62s' "$label"
    : >"$LOG"
    if ! "$@" >>"$LOG" 2>&1; then
        printf ' FAILED after %d s\n' $((SECONDS - start))
        cat "$LOG" >&2
        echo "setup failed: $*" >&2
        exit 1
    fi
    printf ' %4d s\n' $((SECONDS - start))
}

if [ ! -x .venv/bin/python ]; then
    mkdir -p .venv
    step "create .venv ($("$PY" -c 'import sys; print("Python", sys.version.split()[0])'))" "$PY" -m venv --clear .venv
fi
# the install is redone only when pyproject.toml, the extras or the checkout's place change
STAMP=.venv/.csdc-setup
hash=$(sha256sum pyproject.toml | cut -d' ' -f1)
want="$hash $EXTRA $PWD"
installed() { grep -qxF "$want" "$STAMP" 2>/dev/null || { [ -z "$EXTRA" ] && grep -qxF "$hash [test] $PWD" "$STAMP" 2>/dev/null; }; }
if ! installed; then
    if ! .venv/bin/python -m pip --version 2>/dev/null | grep -qE '^pip (2[4-9]|[3-9][0-9])'; then
        step "upgrade pip" .venv/bin/python -m pip install --upgrade pip
    fi
    # torch is pinned to the CPU build (a looser pin would pull CUDA packages)
    step "install csdc${EXTRA:+ with the test extra (pytest, torch, brevitas, qonnx)}" \
        .venv/bin/python -m pip install --disable-pip-version-check -e ".$EXTRA"
    echo "$want" >>"$STAMP"
else
    echo "setup: csdc${EXTRA:+ with the test extra} already installed in .venv"
fi
if [ -n "$EXTRA" ] && [ ! -d /usr/share/datasets/fashion-mnist ]; then
    # the Fashion-MNIST tests read Debian's dataset-fashion-mnist (idx files, 30 MB); without apt (or root)
    # they are skipped, and the suite says so in its summary
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        step "install Debian's dataset-fashion-mnist (Fashion-MNIST tests)" \
            sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist'
    else
        echo "setup: WARNING: cannot install Debian's dataset-fashion-mnist (no apt-get or not root):" \
             "the Fashion-MNIST tests will be skipped" >&2
    fi
fi
if [ "$LAVA" = 1 ]; then
    # csdc lava-env prints its own steps; an up-to-date environment is left alone
    if ! .venv/bin/csdc lava-env; then
        echo "setup failed: csdc lava-env (see docs/lava.md)" >&2
        exit 1
    fi
fi
