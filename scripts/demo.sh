#!/usr/bin/env bash
# Set up (idempotent; what running needs, no test extra), compile the shipped examples and run
# them on the numba backend, each compared with onnxruntime on its source ONNX: the digits
# CSDformer (spiking transformer), then the digits CNN. MODEL=path.onnx runs just that model
# (DATA=file.npz gives its data; default digits). Each network is written to out/ under a name
# made from the model's folder and file (examples/digits_cnn/model.onnx -> out/digits_cnn.sir,
# examples/digits_cnn/model_qdq_static.onnx -> out/digits_cnn_model_qdq_static.sir).
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
    stem=$(basename "$m" .onnx)
    [ "$stem" = model ] || name="${name}_${stem}"
    echo "== $m -> out/$name.sir"
    .venv/bin/csdc compile "$m" -o "out/$name.sir"
    .venv/bin/csdc run "out/$name.sir" --backend numba --data "${DATA:-digits}" --compare "$m"
    echo
done
