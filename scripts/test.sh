#!/usr/bin/env bash
# Set up (idempotent: .venv with the test extra, and the Lava environment .venv-lava) and run
# the whole test suite; then, on a full run (no arguments), the numba tests once more with the
# kernels compiled for a generic x86-64 CPU (NUMBA_CPU_NAME=generic, in a JIT cache of its own),
# to catch kernels that work only with or only without the host's vector instructions (AVX-512).
# pytest's exit code 5 ("no tests collected") is an error here: a suite that runs nothing must
# not pass silently.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --test --lava || exit 1
export NUMBA_CACHE_DIR="${NUMBA_CACHE_DIR:-$PWD/.cache/numba}"
.venv/bin/python -m pytest -q "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
    echo "error: pytest collected no tests" >&2
    exit 1
fi
if [ "$rc" -eq 0 ] && [ "$#" -eq 0 ]; then
    echo "== numba kernels for a generic x86-64 CPU (NUMBA_CPU_NAME=generic)"
    NUMBA_CPU_NAME=generic NUMBA_CACHE_DIR="$PWD/.cache/numba-generic" \
        .venv/bin/python -m pytest -q -p no:cacheprovider tests/backends/test_numba.py tests/test_digits_example.py
    rc=$?
fi
exit "$rc"
