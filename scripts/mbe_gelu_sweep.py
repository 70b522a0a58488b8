"""The bases / steps trade-off of --nonlinear mbe on a small GELU network (docs/mbe.md).

Makes the models of the MBE tests (tests/compiler/gelu_models.py: Conv -> Flatten -> Linear -> GELU ->
Linear trained on scikit-learn's digits, torch.onnx at opset 20 (one Gelu op) and 17 (the Erf form),
onnxruntime's quantize_static with uint8 activations and int8 weights), compiles with --nonlinear mbe for
each number of bases and encoding steps, runs the numba backend on the digits test split and prints a
markdown table: the fit's worst-case / mean error (steps of the quantizer after GELU), accuracy, top-1
agreement with onnxruntime, the MBE population's spikes per image and the latency.

    python scripts/mbe_gelu_sweep.py [--bases 1,2,4,8,16,32] [--steps 16,4] [--plot docs/mbe_sweep.png]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np


def make_models(tmp: Path) -> dict[int, Path]:
    """The models of the MBE tests (tests/compiler/gelu_models.py): one recipe for both."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "compiler"))
    from gelu_models import gelu_qdq_models

    made = gelu_qdq_models(tmp)
    return {20: made["20"], 17: made["17"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bases", default="1,2,4,8,16,32")
    ap.add_argument("--steps", default="16,4")
    ap.add_argument("--plot", metavar="FILE.png", help="also plot worst-case error and agreement against the bases")
    args = ap.parse_args()
    rows: list[tuple[str, int, int, float, float, float]] = []  # (model, steps, bases, worst, agreement, spikes)
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
                    rows.append((form, steps, a["bases"], a["max_abs_error"], agree, spikes))
                    print(f"| {form} | {a['bases']} | {steps} ({a['steps']}) | {a['max_abs_error']:.3g} | "
                          f"{a['mean_abs_error']:.3g} | {100 * acc:.2f} % | {100 * float(np.mean(ref.argmax(1) == y)):.2f} % | "
                          f"{100 * agree:.2f} % | {spikes:.0f} | {rep.latency} |", flush=True)

    if args.plot:
        plot(rows, args.plot)


def plot(rows: list[tuple[str, int, int, float, float, float]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_err, ax_agree) = plt.subplots(1, 2, figsize=(10, 4))
    for key in dict.fromkeys((r[0], r[1]) for r in rows):
        sel = [r for r in rows if (r[0], r[1]) == key]
        label = f"{key[0]}, S = {key[1]}"
        ax_err.plot([r[2] for r in sel], [r[3] for r in sel], marker="o", label=label)
        ax_agree.plot([r[2] for r in sel], [100 * r[4] for r in sel], marker="o", label=label)
    for ax in (ax_err, ax_agree):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("MBE bases K")
    ax_err.set_yscale("log")
    ax_err.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax_err.set_ylabel("worst-case error over all 256 levels (output steps)")
    ax_agree.set_ylabel("top-1 agreement with onnxruntime (%)")
    ax_agree.legend(fontsize=8)
    fig.suptitle("GELU by MBE neurons (digits GELU network, quantize_static uint8, T = 255; latency 1530 steps for every K, S)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
