#!/usr/bin/env bash
# Set up (idempotent), compile the shipped digits example and run it on the numba backend,
# compared with onnxruntime on the same ONNX model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
MODEL=${MODEL:-examples/digits_cnn/model.onnx}
mkdir -p out
.venv/bin/csdc compile "$MODEL" -o out/digits.sir
.venv/bin/csdc run out/digits.sir --backend numba --data digits --compare "$MODEL"
