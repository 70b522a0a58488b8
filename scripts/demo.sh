#!/usr/bin/env bash
# Set up (idempotent), compile the shipped examples and run them on the numba backend, each
# compared with onnxruntime on its source ONNX: the digits CSDformer (spiking transformer),
# then the digits CNN. MODEL=path.onnx runs just that model.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
mkdir -p out
if [ -n "${MODEL:-}" ]; then
    MODELS=("$MODEL")
else
    MODELS=(examples/digits_csdformer/model.onnx examples/digits_cnn/model.onnx)
fi
for m in "${MODELS[@]}"; do
    name=$(basename "$(dirname "$m")")
    echo "== $m"
    .venv/bin/csdc compile "$m" -o "out/$name.sir"
    .venv/bin/csdc run "out/$name.sir" --backend numba --data digits --compare "$m"
    echo
done
