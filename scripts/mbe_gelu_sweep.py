"""The bases / steps trade-off of --nonlinear mbe on a small GELU network (docs/mbe.md).

Trains Conv -> Flatten -> Linear -> GELU -> Linear on scikit-learn's digits (seed 0, 60 full-batch Adam
steps), exports it with torch.onnx at opset 20 (one Gelu op) and 17 (the Erf form), quantizes each with
onnxruntime's quantize_static (QDQ, uint8 activations, int8 weights), compiles with --nonlinear mbe for
each number of bases and encoding steps, runs the numba backend on the digits test split and prints a
markdown table: the fit's worst-case / mean error (steps of the quantizer after GELU), accuracy, top-1
agreement with onnxruntime, the MBE population's spikes per image and the latency.

    python scripts/mbe_gelu_sweep.py [--bases 1,2,4,8,16,32] [--steps 16,4]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np


def make_models(tmp: Path) -> dict[int, Path]:
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from csdc.runtime.datasets import load_digits_split

    x, y = load_digits_split("train")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 32),
                                torch.nn.GELU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x[i:i + 32]} for i in range(0, 256, 32)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    out = {}
    for opset in (20, 17):
        fp = tmp / f"float{opset}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, xt[:1], str(fp), input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamo=False, dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
            quantize_static(str(fp), str(tmp / f"qdq{opset}.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        out[opset] = tmp / f"qdq{opset}.onnx"
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", default="1,2,4,8,16,32")
    ap.add_argument("--steps", default="16,4")
    args = ap.parse_args()
    from csdc.backends.numba import NumbaBackend
    from csdc.compiler.pipeline import CompileOptions, compile_onnx
    from csdc.runtime.datasets import load_digits_split
    from csdc.runtime.evaluate import onnx_logits

    x, y = load_digits_split("test")
    print("| model | bases | steps (used) | worst error | mean error | SNN accuracy | ONNX accuracy | agreement "
          "| MBE spikes / image | latency (steps) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        models = make_models(Path(tmp))
        for opset, path in models.items():
            ref = onnx_logits(path, x)
            for steps in (int(s) for s in args.steps.split(",")):
                for k in (int(b) for b in args.bases.split(",")):
                    net, rep = compile_onnx(path, CompileOptions(nonlinear="mbe", mbe_bases=k, mbe_steps=steps))
                    a = rep.approximations[0]
                    res = NumbaBackend().run(net, x)
                    acc = float(np.mean(res.logits.argmax(1) == y))
                    agree = float(np.mean(res.logits.argmax(1) == ref.argmax(1)))
                    spikes = res.stats[a["mbe_node"]].spikes / len(x)
                    form = "Gelu (opset 20)" if opset == 20 else "Erf form (opset 17)"
                    print(f"| {form} | {a['bases']} | {steps} ({a['steps']}) | {a['max_abs_error']:.3g} | "
                          f"{a['mean_abs_error']:.3g} | {100 * acc:.2f} % | {100 * float(np.mean(ref.argmax(1) == y)):.2f} % | "
                          f"{100 * agree:.2f} % | {spikes:.0f} | {rep.latency} |", flush=True)


if __name__ == "__main__":
    main()
