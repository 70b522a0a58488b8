"""Train the digits CNN and write the ONNX models csdc ships as examples.

    python examples/digits_cnn/train.py            # seed 0, 30 epochs, L = 15

writes into the output directory (default: this script's directory):

- ``model.onnx``             LSQ quantization-aware trained CNN, QCDQ form
- ``model_float.onnx``       a float CNN of the same shape (trained separately)
- ``model_qdq_static.onnx``  ``model_float.onnx`` quantized by onnxruntime
                             ``quantize_static`` (QDQ, uint8 activations, int8
                             per-channel weights)
- ``README.md``              the command, the accuracies and the node patterns

Everything is deterministic: the same arguments give byte-identical files.
Needs PyTorch (``pip install csdc[torch]``); nothing is downloaded (the digits set
ships with scikit-learn).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import numpy as np
import onnx

from csdc.runtime.datasets import load_digits_split
from csdc.training.cnn import (
    build_cnn,
    evaluate,
    export_float_onnx,
    export_qcdq_onnx,
    onnx_predict,
    predict_logits,
    quantize_static_model,
    train,
)
from csdc.training.export import describe_io, sha256_file

HERE = os.path.dirname(os.path.abspath(__file__))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--levels", type=int, default=15,
                   help="levels L of the hidden activation quantizers = time steps T (default 15)")
    p.add_argument("--weight-bits", type=int, default=4, help="weight bits (default 4)")
    p.add_argument("--lr", type=float, default=1e-2, help="Adam learning rate (default 0.01)")
    p.add_argument("--out-dir", default=HERE, help="output directory (default: next to this script)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def _ops(model: onnx.ModelProto) -> list[str]:
    return [n.op_type for n in model.graph.node]



def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    progress = not args.no_progress
    os.makedirs(args.out_dir, exist_ok=True)
    x_train, y_train = load_digits_split("train")
    x_test, y_test = load_digits_split("test")
    print(f"digits: {len(x_train)} train / {len(x_test)} test images (scikit-learn, offline)")
    t0 = time.perf_counter()

    # 1. LSQ quantization-aware training, QCDQ export.
    print(f"\n[1/3] QAT CNN: L = {args.levels} levels, {args.weight_bits}-bit weights, "
          f"{args.epochs} epochs, seed {args.seed}")
    qat = build_cnn(args.seed, levels=args.levels, weight_bits=args.weight_bits)
    hist_q = train(qat, x_train, y_train, args.epochs, args.lr, args.seed, progress,
                   eval_data=(x_test, y_test), summaries=True)
    qcdq_path = os.path.join(args.out_dir, "model.onnx")
    qcdq = export_qcdq_onnx(qat, qcdq_path)
    torch_logits = predict_logits(qat, x_test)
    ort_logits = onnx_predict(qcdq, x_test)
    acc_torch = float(np.mean(torch_logits.argmax(1) == y_test))
    acc_qcdq = float(np.mean(ort_logits.argmax(1) == y_test))
    agree = float(np.mean(torch_logits.argmax(1) == ort_logits.argmax(1)))
    print(f"  PyTorch eval {100 * acc_torch:.2f}%  ONNX (onnxruntime) {100 * acc_qcdq:.2f}%  "
          f"top-1 agreement {100 * agree:.2f}%  max |logit diff| "
          f"{np.abs(torch_logits - ort_logits).max():.2e}  ({hist_q.seconds:.1f} s)")

    # 2. Float CNN (same layers, ReLU, no quantizers).
    print(f"\n[2/3] float CNN: {args.epochs} epochs, seed {args.seed}")
    flt = build_cnn(args.seed, quantize=False)
    hist_f = train(flt, x_train, y_train, args.epochs, args.lr, args.seed, progress,
                   eval_data=(x_test, y_test), summaries=True)
    float_path = os.path.join(args.out_dir, "model_float.onnx")
    float_model = export_float_onnx(flt, float_path)
    acc_float_torch = evaluate(flt, x_test, y_test)
    acc_float = float(np.mean(onnx_predict(float_model, x_test).argmax(1) == y_test))
    print(f"  PyTorch eval {100 * acc_float_torch:.2f}%  ONNX (onnxruntime) {100 * acc_float:.2f}%  "
          f"({hist_f.seconds:.1f} s)")

    # 3. onnxruntime post-training static quantization of the float model.
    print("\n[3/3] onnxruntime quantize_static (QDQ, uint8 activations, int8 per-channel weights)")
    static_path = os.path.join(args.out_dir, "model_qdq_static.onnx")
    static = quantize_static_model(float_path, x_train, static_path)
    acc_static = float(np.mean(onnx_predict(static, x_test).argmax(1) == y_test))
    print(f"  ONNX (onnxruntime) {100 * acc_static:.2f}%")

    command = "python examples/digits_cnn/train.py"
    extra = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--no-progress"]
    if extra:
        command += " " + " ".join(shlex.quote(a) for a in extra)
    readme = _readme(args, command, acc_torch, acc_qcdq, agree, acc_float_torch, acc_float,
                     acc_static, qcdq, float_model, static,
                     {p: sha256_file(os.path.join(args.out_dir, p))
                      for p in ("model.onnx", "model_float.onnx", "model_qdq_static.onnx")})
    with open(os.path.join(args.out_dir, "README.md.tmp"), "w", encoding="utf-8") as fh:
        fh.write(readme)
    os.replace(os.path.join(args.out_dir, "README.md.tmp"), os.path.join(args.out_dir, "README.md"))
    print(f"\nwrote {qcdq_path}, {float_path}, {static_path} and README.md "
          f"in {time.perf_counter() - t0:.1f} s")
    return 0


def _readme(args: argparse.Namespace, command: str, acc_torch: float, acc_qcdq: float,
            agree: float, acc_float_torch: float, acc_float: float, acc_static: float,
            qcdq: onnx.ModelProto, float_model: onnx.ModelProto, static: onnx.ModelProto,
            hashes: dict[str, str]) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.2f}%"

    return f"""# Digits CNN example

Small CNNs for scikit-learn's 8x8 digits (bundled with scikit-learn, no download),
the models csdc's examples and tests compile. Input: `pixel / 16` in [0, 1]; the
split is `csdc.runtime.datasets.load_digits_split` (stratified, 25% test,
`random_state=0`: 1347 train / 450 test images).

Reproduce (deterministic: same arguments, byte-identical files; about a minute on a CPU):

```
{command}
```

(seed {args.seed}, {args.epochs} epochs, L = {args.levels}, {args.weight_bits}-bit weights,
Adam lr {args.lr}, batch 32, cosine schedule, one torch thread; needs `pip install csdc[torch]`.)

## Files and accuracies on the digits test split (450 images)

| file | what | accuracy |
|---|---|---|
| `model.onnx` | LSQ quantization-aware trained CNN, QCDQ | PyTorch eval {pct(acc_torch)}, onnxruntime {pct(acc_qcdq)} (top-1 agreement {pct(agree)}) |
| `model_float.onnx` | float CNN, same layers (trained separately, same seed) | PyTorch eval {pct(acc_float_torch)}, onnxruntime {pct(acc_float)} |
| `model_qdq_static.onnx` | `model_float.onnx` after onnxruntime `quant_pre_process` + `quantize_static` (QDQ, uint8 activations, int8 per-channel weights, MinMax calibration on the 1347 training images) | onnxruntime {pct(acc_static)} |

All three: {describe_io(qcdq, quote="'")} (N dynamic), opset 17.

## Node patterns (op types in graph order)

`model.onnx` (QCDQ; activation quantizers are `QuantizeLinear(scale s, zero point
uint8 0) -> Clip(0, L) -> DequantizeLinear`; the input quantizer has s = 1/16, L = 16,
exact for digits pixels; hidden ones have learned s and L = {args.levels}; weights are
int8 initializers (levels -{2 ** (args.weight_bits - 1) - 1}..{2 ** (args.weight_bits - 1) - 1})
behind `DequantizeLinear(per-channel scale, int8 zero point 0, axis=0)`; convolutions have
no bias, BatchNormalization is kept as a node):

```
{", ".join(_ops(qcdq))}
```

`model_float.onnx` (the exporter folded BatchNormalization into the Conv weights and bias):

```
{", ".join(_ops(float_model))}
```

`model_qdq_static.onnx` (onnxruntime removed the Relu nodes: the uint8 zero-point-0
QuantizeLinear after each Conv clips at 0; biases are int32 behind a per-channel
DequantizeLinear; the input is quantized with scale 1/255; MaxPool and Flatten are
re-quantized with the scale of their input; the logits get an asymmetric uint8
QuantizeLinear/DequantizeLinear pair with a non-zero zero point):

```
{", ".join(_ops(static))}
```

## SHA-256

```
{chr(10).join(f"{h}  {p}" for p, h in hashes.items())}
```
"""


if __name__ == "__main__":
    sys.exit(main())
