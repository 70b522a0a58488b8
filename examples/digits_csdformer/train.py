"""Train the digits CSDformer and write the ONNX model csdc ships as an example.

    python examples/digits_csdformer/train.py      # seed 0: CSDformer-2-64, 4 heads, L = 4

is the same training as

    csdc train --model csdformer --dataset digits --depth 2 --dim 64 --heads 4 --levels 4 \\
        --mlp-ratio 2 --epochs 15 --seed 0 -o examples/digits_csdformer/model.onnx

and additionally writes ``README.md`` next to the model (the command, accuracies, the
node list and the ops of one block with their attributes). Deterministic: the same
arguments give byte-identical files. Needs PyTorch (``pip install csdc[torch]``);
nothing is downloaded (the digits set ships with scikit-learn).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time

import onnx
from onnx import numpy_helper

from csdc.training.export import describe_io, sha256_file
from csdc.training.recipe import TrainConfig, TrainResult, train_and_export

HERE = os.path.dirname(os.path.abspath(__file__))


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--epochs", type=int, default=15, help="training epochs (default 15)")
    p.add_argument("--depth", type=int, default=2, help="transformer blocks (default 2)")
    p.add_argument("--dim", type=int, default=64, help="token width (default 64)")
    p.add_argument("--heads", type=int, default=4, help="attention heads (default 4)")
    p.add_argument("--levels", type=int, default=4, help="activation levels L = time steps T (default 4)")
    p.add_argument("--mlp-ratio", type=float, default=2.0, help="MLP hidden width / dim (default 2)")
    p.add_argument("--weight-bits", type=int, default=4, help="weight bits (default 4)")
    p.add_argument("--lr", type=float, default=2e-3, help="Adam learning rate (default 0.002)")
    p.add_argument("--out-dir", default=HERE, help="output directory (default: next to this script)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)



def _const(inits: dict[str, onnx.TensorProto], name: str) -> str:
    a = numpy_helper.to_array(inits[name])
    if a.size == 1:
        v = a.reshape(-1)[0]
        return f"{v:.9g}" if a.dtype.kind == "f" else str(int(v))
    return str([int(v) for v in a.reshape(-1)]) if a.dtype.kind in "iu" else f"{a.dtype}{list(a.shape)}"


def describe_node(node: onnx.NodeProto, inits: dict[str, onnx.TensorProto]) -> str:
    """``Op(details)``: perms, axes, shapes, constants and activation levels of one node."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    op = node.op_type
    if op == "Transpose":
        return f"Transpose(perm {','.join(map(str, attrs['perm']))})"
    if op == "Reshape":
        return f"Reshape({_const(inits, node.input[1])})"
    if op in ("Mul", "Div", "Add") and node.input[1] in inits:
        return f"{op}({_const(inits, node.input[1])})"
    if op == "Clip":
        return f"Clip({_const(inits, node.input[1])}, {_const(inits, node.input[2])})"
    if op == "DequantizeLinear" and node.input[0] in inits:
        w = inits[node.input[0]]
        return f"DequantizeLinear(int8 {list(w.dims)} weight, axis {attrs.get('axis', 1)})"
    if op == "ReduceMean":
        return f"ReduceMean(axes {list(attrs['axes'])}, keepdims {attrs.get('keepdims', 1)})"
    return op


def block_ops(model: onnx.ModelProto, index: int = 0) -> list[str]:
    """The described nodes of transformer block ``index`` in graph order."""
    inits = {t.name: t for t in model.graph.initializer}
    prefix = f"/blocks/blocks.{index}/"
    return [describe_node(n, inits) for n in model.graph.node if n.name.startswith(prefix)]


def _without(argv: list[str], flags: tuple[str, ...], options: tuple[str, ...]) -> list[str]:
    """``argv`` without the given flags and options (with their values): they do not change the model."""
    out: list[str] = []
    skip = False
    for a in argv:
        if skip:
            skip = False
        elif a in flags or any(a.startswith(o + "=") for o in options):
            continue
        elif a in options:
            skip = True
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    os.makedirs(args.out_dir, exist_ok=True)
    config = TrainConfig(model="csdformer", data="digits", depth=args.depth, dim=args.dim, heads=args.heads,
                         mlp_ratio=args.mlp_ratio, levels=args.levels, weight_bits=args.weight_bits,
                         epochs=args.epochs, lr=args.lr, seed=args.seed)
    print(f"CSDformer-{args.depth}-{args.dim}, {args.heads} heads, L = {args.levels}, "
          f"{args.weight_bits}-bit weights, {args.epochs} epochs, seed {args.seed}")
    t0 = time.perf_counter()
    path = os.path.join(args.out_dir, "model.onnx")
    r = train_and_export(config, path, progress=not args.no_progress)
    print(f"PyTorch eval {100 * r.acc_torch:.2f}%  ONNX (onnxruntime) {100 * r.acc_onnx:.2f}%  "
          f"top-1 agreement {100 * r.agreement:.2f}%  max |logit diff| {r.max_logit_diff:.2e}  "
          f"({r.history.seconds:.1f} s training)")
    command = "python examples/digits_csdformer/train.py"
    extra = _without(sys.argv[1:] if argv is None else argv, ("--no-progress",), ("--out-dir",))
    if extra:
        command += " " + " ".join(shlex.quote(a) for a in extra)
    readme = _readme(args, command, r, os.path.getsize(path), sha256_file(path))
    tmp = os.path.join(args.out_dir, "README.md.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(readme)
    os.replace(tmp, os.path.join(args.out_dir, "README.md"))
    print(f"wrote {path} and README.md in {time.perf_counter() - t0:.1f} s")
    return 0


def _readme(args: argparse.Namespace, command: str, r: TrainResult, size: int, digest: str) -> str:
    def pct(v: float) -> str:
        return f"{100 * v:.2f}%"

    model = r.onnx_model
    dk = args.dim // args.heads
    tokens = int(r.model.tokens)  # type: ignore[arg-type]
    mm = "MatMul"
    block = block_ops(model, 0)
    return f"""# Digits CSDformer example

A tailored, conversion-oriented quantized transformer (CSDformer, SPEC section 1) for
scikit-learn's 8x8 digits (bundled, no download): LSQ quantization-aware trained, QCDQ
ONNX. Input: `pixel / 16` in [0, 1]; split `csdc.runtime.datasets.load_digits_split`
(stratified, 25% test, `random_state=0`: {r.n_train} train / {r.n_test} test images).

Reproduce (deterministic: same arguments, byte-identical file; about a minute on one CPU thread):

```
{command}
```

which trains exactly like

```
csdc train --model csdformer --dataset digits --depth {args.depth} --dim {args.dim} --heads {args.heads} \\
    --levels {args.levels} --mlp-ratio {args.mlp_ratio:g} --weight-bits {args.weight_bits} --epochs {args.epochs} \\
    --lr {args.lr:g} --seed {args.seed} -o model.onnx
```

(Adam lr {args.lr:g}, batch 32, cosine schedule, one torch thread; needs `pip install csdc[torch]`.)

## Model

CSDformer-{args.depth}-{args.dim}: {r.num_parameters} parameters, {args.heads} heads (d_k = {dk}),
MLP ratio {args.mlp_ratio:g}, L = {args.levels} levels for every hidden activation quantizer
(T = {args.levels} time steps), {args.weight_bits}-bit per-channel weights (levels
-{2 ** (args.weight_bits - 1) - 1}..{2 ** (args.weight_bits - 1) - 1}).

- input quantizer: step 1/16, 16 levels (exact for digits pixels k/16)
- tokenizer: `Conv 3x3 (1->{args.dim // 2}) -> BN -> q`, `Conv 3x3 ({args.dim // 2}->{args.dim}) -> BN -> q -> MaxPool 2`
  -> {r.model.grid}x{r.model.grid} map -> `Reshape(-1, {args.dim}, {tokens}) -> Transpose(0,2,1)`: N = {tokens} tokens of width {args.dim}
- block (x{args.depth}): `z = z + BN(Wo(TSA(q(z))))`, `z = z + BN(W2(q(BN(W1(q(z))))))`, with
  TSA `A = q(ReLU(Q K^T * 1/sqrt(d_k)) * 1/N)`, `O = q(A V)`, Q/K/V = `q(BN(W x))`
- head: `q(z) -> ReduceMean over tokens -> Gemm` (no quantizer after it)

Token linear layers have no bias (a BatchNorm follows each) and export as
`DequantizeLinear(int8 (in, out) weight, per-output-channel scale, axis=1) -> MatMul`,
then `Transpose(0,2,1) -> BatchNormalization -> Transpose(0,2,1)`. The classifier is a
`Gemm(transB=1)` with `DequantizeLinear(axis=0)` weights; convolutions use
`DequantizeLinear(axis=0)`. Activation quantizers are `QuantizeLinear(scale s, zero
point uint8 0) -> Clip(0, L) -> DequantizeLinear`. There are {2 * args.depth} activation x
activation MatMuls ({args.depth} x (Q K^T, A V)); no Softmax, LayerNormalization or Gelu.

## Accuracy on the digits test split ({r.n_test} images)

| | accuracy |
|---|---|
| PyTorch eval | {pct(r.acc_torch)} |
| ONNX (onnxruntime) | {pct(r.acc_onnx)} |
| top-1 agreement PyTorch / onnxruntime | {pct(r.agreement)} (max logit difference {r.max_logit_diff:.2g}) |

`model.onnx`: {size} bytes, opset 17, {describe_io(model)} (N dynamic), {len(model.graph.node)} nodes.

## One block (`blocks.0`), nodes in graph order

Constants: 1/sqrt(d_k) = 1/sqrt({dk}), 1/N = 1/{tokens}. K's head split and K^T are one
`Transpose(perm 0,2,3,1)` (the exporter merged `transpose(1, 2)` and `transpose(-2, -1)`).

```
{chr(10).join(block)}
```

## All nodes (op types in graph order)

```
{", ".join(r.ops)}
```

{sum(1 for o in r.ops if o == mm)} MatMul nodes: {6 * args.depth} token linear layers with constant weights
and {2 * args.depth} products of two activations.

## SHA-256

```
{digest}  model.onnx
```
"""


if __name__ == "__main__":
    sys.exit(main())
