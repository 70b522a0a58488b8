"""Standard ViTs without retraining: the acceptance study of docs/vit.md.

For the digits ViT and the MNIST-5k ViT (``csdc train --model vit``, float), this script

1. trains the model (or reuses the shipped one from ``--models``, examples/vit) and exports it at opset 17 (LayerNormalization,
   erf GELU), opset 20 (Gelu) and opset 16 (LayerNorm decomposed), TorchScript exporter;
2. quantizes each export with onnxruntime's quantize_static exactly as ``csdc compile --calibrate``
   does (csdc.compiler.calibrate: training split, MinMax, uint8 activations, int8 symmetric
   per-channel weights) and measures the accuracy of the float and the QDQ model under onnxruntime
   on the full test split, and their top-1 agreement;
3. lists the nonlinear nodes of each QDQ model and the float ops onnxruntime left between a
   DequantizeLinear and the next QuantizeLinear (what the spiking lowering must take);
4. compiles each QDQ model with ``--nonlinear mbe`` and, for every ``--mbe-bases`` value of the sweep,
   runs the SNN with numba (``csdc run --compare``: accuracy, agreement, latency, spikes and energy per
   image) and writes the accuracy-latency plot. When the compiler refuses a model, the refused nodes
   are the result for that model (printed and written to the table).

    python scripts/vit_studies.py [--models examples/vit] [--out out/vit] [--sets digits,mnist5k] [--markdown table.md]

Deterministic for the fixed seed (training runs one thread).
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sys
import time
import contextlib

import numpy as np
import onnx

from csdc.compiler.calibrate import calibration_images, quantize_static_qdq
from csdc.runtime.datasets import load_builtin
from csdc.runtime.evaluate import onnx_logits

#: set -> (epochs, recipe overrides); both take about a minute on one thread
RECIPES = {"digits": (30, {}), "mnist5k": (15, {})}
#: the exports studied: (label, opset)
OPSETS = (("opset17", 17), ("opset20", 20), ("opset16", 16))
#: the accuracy-latency sweep of the opset-17 models: (--mbe-bases, --mbe-steps); None = the compiler's choice / default
SWEEP = ((2, None), (4, None), (8, None), (None, 8))
NONLINEAR = {"Softmax", "LayerNormalization", "Gelu", "Erf", "ReduceMean", "Sub", "Pow", "Sqrt", "Div", "Reciprocal"}


def train_models(name: str, models: str) -> dict[str, str]:
    """The float exports of the ``name`` ViT in folder ``models`` (trained once; reused when all files exist)."""
    paths = {label: os.path.join(models, f"{name}_vit_{label}.onnx") for label, _ in OPSETS}
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    from csdc.training.recipe import TrainConfig, train_and_export
    from csdc.training.vit import export_vit_onnx

    epochs, overrides = RECIPES[name]
    t0 = time.perf_counter()
    r = train_and_export(TrainConfig(model="vit", data=name, epochs=epochs, **overrides), paths["opset17"],
                         progress=False, summaries=False)
    print(f"{name}: trained ViT-{r.config.depth}-{r.config.dim} in {time.perf_counter() - t0:.0f} s, "
          f"PyTorch {100 * r.acc_torch:.2f} %, ONNX {100 * r.acc_onnx:.2f} %", flush=True)
    for label, opset in OPSETS[1:]:
        export_vit_onnx(r.model, paths[label], opset=opset)
    return paths


def float_paths(q: onnx.ModelProto) -> tuple[dict[str, int], list[str]]:
    """(count of nonlinear ops, the non-Q/DQ nodes with a float input that is not a DequantizeLinear output or
    a float output not read by a QuantizeLinear alone) of a QDQ model."""
    producer = {o: n for n in q.graph.node for o in n.output}
    readers = collections.defaultdict(list)
    for n in q.graph.node:
        for i in n.input:
            readers[i].append(n)
    inits = {t.name for t in q.graph.initializer}
    census = collections.Counter(n.op_type for n in q.graph.node if n.op_type in NONLINEAR)
    loose = []
    for n in q.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            continue
        ins = [producer[i].op_type for i in n.input if i and i not in inits and i in producer]
        outs = [r.op_type for o in n.output for r in readers[o]]
        if any(k != "DequantizeLinear" for k in ins) or any(k != "QuantizeLinear" for k in outs):
            loose.append(f"{n.name} ({n.op_type})")
    return dict(census), loose


def _refusal(qdq: str, sir: str) -> str:
    """The error of a plain ``csdc compile QDQ`` (every refused node), or "" if it compiles."""
    from csdc.cli import main

    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["compile", qdq, "-o", sir])
    return err.getvalue().strip().replace("csdc: error: ", "") if code else ""


def compile_and_run(qdq: str, x: np.ndarray, y: np.ndarray, bases: int | None, tmp: str, steps: int | None = None) -> dict:
    """``csdc compile QDQ --nonlinear mbe [--mbe-bases K] [--mbe-steps S]`` then ``csdc run --compare QDQ --json``, or
    the refusal."""
    from csdc.cli import main

    sir = os.path.join(tmp, f"{os.path.basename(qdq)}.{bases}.{steps}.sir")
    argv = (["compile", qdq, "-o", sir, "--json", "--nonlinear", "mbe"] + (["--mbe-bases", str(bases)] if bases else [])
            + (["--mbe-steps", str(steps)] if steps else []))
    t0 = time.perf_counter()
    buf, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
            code = main(argv)
    except SystemExit as exc:  # argparse: an option this csdc does not know
        code = int(exc.code or 2)
    if code != 0 and "unrecognized arguments: --nonlinear" in err.getvalue():
        # this csdc has no spiking lowering of the nonlinear ops yet: record what it refuses, node by node
        return {"refused": "(csdc has no --nonlinear option) " + _refusal(qdq, sir)}
    if code != 0:
        return {"refused": err.getvalue().strip().replace("csdc: error: ", "")}
    rep = json.loads(buf.getvalue())
    compile_s = time.perf_counter() - t0
    data = os.path.join(tmp, "test.npz")
    np.savez(data, x=x, y=y)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        main(["run", sir, "--data", data, "--compare", qdq, "--json", "--batch", "100"])
    run = json.loads(buf.getvalue())
    return {"T": rep["T"], "latency": run["latency_steps"], "compile_s": compile_s, "bases": bases, "steps": steps, "snn_acc": run["accuracy"],
            "agreement": run["comparison"]["agreement"], "spikes": run["spikes"] / run["samples"],
            "energy_uj": run.get("energy_uj_per_sample"), "report": rep,
            # time steps and error of every approximated op (the compile report's list)
            "ops": [{k: a.get(k) for k in ("op", "source", "bases", "steps", "latency_steps", "max_abs_error",
                                           "mean_abs_error")} for a in rep.get("approximations", [])]}


def study(name: str, models: str, out: str, exports: list[str], sweep: bool) -> list[dict]:
    paths = {k: v for k, v in train_models(name, models).items() if k in exports}
    x_te, y_te = load_builtin(name, "test")
    rows = []
    for label, path in paths.items():
        model = onnx.load(path)
        qdq = os.path.join(out, f"{name}_vit_{label}.qdq.onnx")  # always made anew: what --calibrate makes here
        quantize_static_qdq(path, calibration_images(name, model), qdq)
        fl, qd = onnx_logits(path, x_te), onnx_logits(qdq, x_te)
        census, loose = float_paths(onnx.load(qdq))
        row = {"set": name, "export": label, "float_acc": float(np.mean(fl.argmax(1) == y_te)),
               "qdq_acc": float(np.mean(qd.argmax(1) == y_te)), "float_qdq_agreement": float(np.mean(fl.argmax(1) == qd.argmax(1))),
               "nonlinear": census, "float_paths": loose, "snn": {}}
        for bases, steps in ((None, None), *SWEEP) if label == "opset17" and sweep else ((None, None),):
            key = "None" if bases is None and steps is None else f"{bases}/{steps}"
            row["snn"][key] = r = compile_and_run(qdq, x_te, y_te, bases, out, steps)
            if "refused" in r:
                break  # the same refusal for every setting
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "snn"}), flush=True)
        for bases, r in row["snn"].items():
            print(f"  --mbe-bases/--mbe-steps {bases}: " + (r["refused"] if "refused" in r else
                  f"SNN {100 * r['snn_acc']:.2f} %, agreement {100 * r['agreement']:.2f} %, latency {r['latency']}, "
                  f"{r['spikes']:.0f} spikes and {r['energy_uj']} uJ per image; "
                  + ", ".join(f"{o['op']} {o['bases']}x{o['steps']} steps" for o in r["ops"])), flush=True)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| set | export | float ONNX | QDQ ONNX | SNN (`--nonlinear mbe`) | SNN-QDQ top-1 agreement | latency (steps) "
             "| spikes / image | energy / image | compile |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        snn = r["snn"]["None"]
        if "refused" in snn:
            refused_ops = sorted({ln.split("(op ")[1].split(")")[0] for ln in snn["refused"].splitlines() if "(op " in ln})
            cell = "refused: " + ("; ".join(refused_ops) if refused_ops else snn["refused"].splitlines()[0][:120])
            lines.append(f"| {r['set']} | {r['export']} | {100 * r['float_acc']:.2f} % | {100 * r['qdq_acc']:.2f} % | "
                         f"{cell} | | | | | |")
            continue
        lines.append(f"| {r['set']} | {r['export']} | {100 * r['float_acc']:.2f} % | {100 * r['qdq_acc']:.2f} % | "
                     f"{100 * snn['snn_acc']:.2f} % | {100 * snn['agreement']:.2f} % | {snn['latency']} | "
                     f"{snn['spikes'] / 1e6:.2f} M | {snn['energy_uj']:.1f} uJ | {snn['compile_s']:.0f} s |")
    return "\n".join(lines)


def ops_markdown(rows: list[dict]) -> str:
    """Time steps and errors of every approximated op of the default compiles (one line per op kind and model)."""
    lines = ["| set | export | op | count | bases x steps | latency per op (steps) | worst error (output steps) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        snn = r["snn"]["None"]
        if "ops" not in snn:
            continue
        kinds = collections.defaultdict(list)
        for o in snn["ops"]:
            kinds[o["op"]].append(o)
        for op, ops in sorted(kinds.items()):
            shapes = sorted({f"{o['bases']}x{o['steps']}" for o in ops})
            lines.append(f"| {r['set']} | {r['export']} | {op} | {len(ops)} | {', '.join(shapes)} | "
                         f"{ops[0]['latency_steps']} | {max(o['max_abs_error'] for o in ops):.3g} |")
    return "\n".join(lines)


def _label(key: str) -> str:
    if key == "None":
        return "default"
    bases, steps = key.split("/")
    return ", ".join(
        x for x in (f"K = {bases}" if bases != "None" else "", f"S = {steps}" if steps != "None" else "") if x)


def sweep_markdown(rows: list[dict]) -> str:
    """The --mbe-bases / --mbe-steps sweep of the opset 17 models ("" if none ran)."""
    lines = []
    for r in rows:
        if r["export"] != "opset17" or len(r["snn"]) < 2:
            continue
        for key, v in r["snn"].items():
            if "snn_acc" in v:
                lines.append(f"| {r['set']} | {_label(key) if key != 'None' else 'default'} | {100 * v['snn_acc']:.2f} % | "
                             f"{100 * r['qdq_acc']:.2f} % | {100 * v['agreement']:.2f} % | {v['latency']} | "
                             f"{v['spikes'] / 1e6:.2f} M | {v['energy_uj']:.1f} uJ |")
            else:
                lines.append(f"| {r['set']} | {_label(key)} | refused: {v['refused'].splitlines()[-1][:100]} | | | | | |")
    if not lines:
        return ""
    return "\n".join(["| set | --mbe-bases / --mbe-steps | SNN | QDQ ONNX | agreement | latency (steps) | spikes / image "
                      "| energy / image |", "|---|---|---|---|---|---|---|---|", *lines])


def plot(rows: list[dict], path: str) -> bool:
    """SNN accuracy and top-1 agreement with the QDQ model per setting of the sweep (the latency is the same for
    every setting: an MBE population costs T steps whatever its bases and steps); False when no sweep ran."""
    swept = [r for r in rows if r["export"] == "opset17" and len(r["snn"]) > 1]
    if not swept:
        return False
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for r in swept:
        keys = [k for k, v in r["snn"].items() if "snn_acc" in v]
        xs = range(len(keys))
        line, = ax.plot(xs, [100 * r["snn"][k]["snn_acc"] for k in keys], "o-", label=f"{r['set']} ViT: SNN accuracy")
        ax.plot(xs, [100 * r["snn"][k]["agreement"] for k in keys], "s:", color=line.get_color(),
                label=f"{r['set']} ViT: top-1 agreement with the QDQ model")
        ax.axhline(100 * r["qdq_acc"], color=line.get_color(), ls="--", lw=0.8, label=f"{r['set']} QDQ ONNX accuracy")
        ax.set_xticks(list(xs), [_label(k) for k in keys])
        latency = r["snn"][keys[0]]["latency"]
    ax.set_xlabel(f"--mbe-bases K / --mbe-steps S (latency {latency} steps for every setting)")
    ax.set_ylabel("%")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="examples/vit", help="folder of the float models (default examples/vit; "
                   "missing ones are trained there)")
    p.add_argument("--out", default="out/vit", help="folder for the QDQ models and networks (default out/vit)")
    p.add_argument("--sets", default="digits,mnist5k", help="comma-separated: digits, mnist5k")
    p.add_argument("--exports", default="opset17,opset20,opset16", help="comma-separated: opset17, opset20, opset16")
    p.add_argument("--sweep", default="digits", help="comma-separated sets whose opset-17 model is swept over --mbe-bases "
                   "and --mbe-steps (default digits; '' for none)")
    p.add_argument("--markdown", default=None, help="also write the table to this file")
    p.add_argument("--plot", default="docs/vit_sweep.png", help="the accuracy-latency plot (written only if a model compiles)")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    os.makedirs(args.models, exist_ok=True)
    rows = [row for name in args.sets.split(",") for row in study(name, args.models, args.out, args.exports.split(","),
                                                                    name in args.sweep.split(","))]
    table = markdown(rows) + "\n\n" + ops_markdown(rows)
    sweep = sweep_markdown(rows)
    table += "\n\n" + sweep if sweep else ""
    print("\n" + table)
    if args.markdown:
        with open(args.markdown, "w") as fh:
            fh.write(table + "\n")
    with open(os.path.join(args.out, "studies.json"), "w") as fh:
        json.dump(rows, fh, indent=1)
    if plot(rows, args.plot):
        print(f"plot: {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
