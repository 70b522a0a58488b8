"""The CSDformer paper's studies on Fashion-MNIST: writes docs/fashion_mnist.md and its plots.

    .venv/bin/python scripts/fashion_studies.py [--train] [--limit N] [--levels 2 4 8]

For every number of levels L (T = L) it takes ``examples/fashion_csdformer/model_L{L}.onnx``
(``--train`` trains the missing ones with the shipped recipe: ``csdc train --dataset
fashion-mnist --levels L --epochs 3 --batch-size 64``, 15-20 minutes each on 2 idle cores),
compiles it at default options and runs the SNN on the test set (numba backend) with
onnxruntime on the same ONNX beside it. Then, for the L = 4 reference model:

- the delay study (the paper's Table 4): accuracy, agreement and latency for D = 0..T;
- the spike rate of every population and a raster of one test image on the global clock
  (a population of depth k fires in steps k*D + 1 .. k*D + T).

Needs Debian's ``dataset-fashion-mnist`` (or ``--data-dir``).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
MODEL_DIR = os.path.join(ROOT, "examples", "fashion_csdformer")
DOCS = os.path.join(ROOT, "docs")
EPOCHS, BATCH = 3, 64


def model_path(levels: int) -> str:
    return os.path.join(MODEL_DIR, "model.onnx" if levels == 4 else f"model_L{levels}.onnx")


def train_missing(levels: int, data_dir: str | None) -> None:
    from csdc.training.recipe import TrainConfig, train_and_export

    path = model_path(levels)
    if os.path.exists(path):
        return
    print(f"training L = {levels} -> {path}", file=sys.stderr)
    r = train_and_export(TrainConfig(data="fashion-mnist", data_dir=data_dir, levels=levels, epochs=EPOCHS,
                                     batch_size=BATCH), path, progress=False)
    print(f"  QAT accuracy {100 * r.acc_torch:.2f} %, ONNX {100 * r.acc_onnx:.2f} %, "
          f"{r.history.seconds:.0f} s", file=sys.stderr)


def node_depths(net) -> dict[str, int]:
    """Number of neuron populations on the longest path from the input to each node (inclusive)."""
    from csdc.ir.ops import Neuron

    d: dict[str, int] = {}
    for name, op in net.nodes():
        prev = max((d[s] for s in net.inputs(name)), default=0)
        d[name] = prev + (1 if isinstance(op, Neuron) else 0)
    return d


def raster(net, x1: np.ndarray, path: str, per_population: int = 48) -> None:
    """Spikes of one image on the global clock, ``per_population`` of the active neurons of each
    population (spread from the busiest to the sparsest) (D = net's delay, so population k's step t happens at (k - 1) * D + t)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from csdc.backends.numba import NumbaBackend
    from csdc.ir.ops import Neuron

    res = NumbaBackend().run(net, x1, keep_trains=True)
    depth = node_depths(net)
    D = max(net.op(n).delay for n in net.neurons())
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    row, ticks, labels = 0, [], []
    for name in net.neurons():
        if not isinstance(net.op(name), Neuron) or name not in res.trains:
            continue
        tr = res.trains[name][0].reshape(net.T, -1).astype(np.int64)  # (T, neurons), 0/1
        counts = tr.sum(0)
        active = np.argsort(-counts, kind="stable")[: int(np.count_nonzero(counts))]
        # evenly spaced over the active neurons ordered by count: busy and sparse ones alike
        keep = active[np.unique(np.linspace(0, len(active) - 1, min(per_population, len(active))).astype(np.int64))] \
            if len(active) else active
        t, i = np.nonzero(tr[:, keep])
        ax.scatter((depth[name] - 1) * D + t + 1, row + i, s=2, marker="|", color="k")
        ticks.append(row + len(keep) / 2)
        labels.append("/".join(name.split("/")[-3:])[-36:])
        row += len(keep) + 4
    ax.set_yticks(ticks)
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel(f"global time step (T = {net.T}, D = {D})")
    ax.set_title(f"spike raster of one test image (up to {per_population} active neurons per population)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def rate_plot(per_population: dict[str, dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, p in per_population.items() if p["neurons"]]
    rates = [per_population[n]["rate"] for n in names]
    fig, ax = plt.subplots(figsize=(8, 0.25 * len(names) + 1.5), dpi=120)
    ax.barh(range(len(names)), rates, color="steelblue")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([n[-40:] for n in names], fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("spikes per neuron per time step")
    ax.set_title("spike rate per population (Fashion-MNIST test set)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def levels_plot(rows: list[tuple[int, float, float, float, int]], path: str) -> None:
    """SNN accuracy, energy and latency against the number of levels L (= T); rows are
    (L, accuracy, agreement, energy uJ, latency steps)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    L = [r[0] for r in rows]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120)
    a1.plot(L, [100 * r[1] for r in rows], "o-", label="SNN accuracy")
    a1.plot(L, [100 * r[2] for r in rows], "s--", label="agreement with onnxruntime")
    a1.set_xlabel("levels L = time steps T")
    a1.set_ylabel("%")
    a1.set_xticks(L)
    a1.grid(alpha=0.3)
    a1.legend(loc="lower right", fontsize=8)
    a2.plot(L, [r[3] for r in rows], "o-", color="tab:red", label="energy per image (uJ)")
    a2.set_xlabel("levels L = time steps T")
    a2.set_ylabel("uJ per image", color="tab:red")
    a2.set_xticks(L)
    twin = a2.twinx()
    twin.plot(L, [r[4] for r in rows], "s--", color="tab:gray")
    twin.set_ylabel("latency (steps, D = T)", color="tab:gray")
    a2.grid(alpha=0.3)
    fig.suptitle("Fashion-MNIST CSDformer-2-64: levels L (T = L, D = T)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train", action="store_true", help="train the models that are missing")
    ap.add_argument("--levels", type=int, nargs="+", default=[2, 4, 8])
    ap.add_argument("--limit", type=int, default=None, help="test images to use (default: all 10,000)")
    ap.add_argument("--data-dir", default=None)
    args = ap.parse_args(argv)

    from csdc.backends.numba import NumbaBackend
    from csdc.compiler.pipeline import compile_onnx
    from csdc.runtime.datasets import load_builtin
    from csdc.runtime.evaluate import compare, run_dataset
    from csdc.runtime.sweep import markdown_table, plot, sweep_delays

    x, y = load_builtin("fashion-mnist", "test", args.data_dir)
    if args.limit:
        x, y = x[:args.limit], y[:args.limit]
    for L in args.levels:
        if args.train:
            train_missing(L, args.data_dir)
        elif not os.path.exists(model_path(L)):
            print(f"{model_path(L)} is missing; run with --train", file=sys.stderr)
            return 2
    backend = NumbaBackend()
    parts = ["# Fashion-MNIST: the CSDformer studies\n",
             f"Generated by `python scripts/fashion_studies.py` on {len(x)} test images of Fashion-MNIST "
             f"(csdc, Python {platform.python_version()}, {os.cpu_count()} cores, numba backend, default compile "
             "options). Models: `csdc train --dataset fashion-mnist --levels L --epochs "
             f"{EPOCHS} --batch-size {BATCH}` (CSDformer-2-64, 4 heads, 4-bit weights).\n",
             "## Levels L (T = L), D = T\n",
             "| L = T | QAT accuracy (ONNX) | SNN accuracy | agreement | max abs logit diff | spikes / image | "
             "energy / image | latency (steps) | images/s |", "|---|---|---|---|---|---|---|---|---|"]
    reference, level_rows = None, []
    for L in args.levels:
        path = model_path(L)
        net, _ = compile_onnx(path)
        t0 = time.perf_counter()
        out = run_dataset(net, backend, x, y, batch=128, progress=False)
        wall = time.perf_counter() - t0
        s = out.summary
        c = compare(path, out, x)
        parts.append(f"| {L} | {100 * c.onnx_accuracy:.2f} % | {100 * s.accuracy:.2f} % | {100 * c.agreement:.2f} % | "
                     f"{c.max_abs_logit_diff:.3g} | {s.spikes / s.samples / 1e3:.1f} k | "
                     f"{s.energy_uj_per_sample:.2f} uJ | {s.latency_steps} | {len(x) / wall:.0f} |")
        level_rows.append((L, s.accuracy, c.agreement, s.energy_uj_per_sample, s.latency_steps))
        print(f"L = {L}: done", file=sys.stderr)
        if L == 4:
            reference = (path, net, s)
    if len(level_rows) > 1:
        levels_plot(level_rows, os.path.join(DOCS, "fashion_levels.png"))
        parts.append("\n![levels study](fashion_levels.png)\n")
    if reference is not None:
        path, net, s = reference
        rows = sweep_delays(net, backend, list(range(net.T + 1)), x, y, compare=path, batch=128, progress=False)
        plot(rows, net.T, "Fashion-MNIST CSDformer-2-64 (T = 4): delay sweep", os.path.join(DOCS, "fashion_delay_sweep.png"))
        rate_plot(s.per_population, os.path.join(DOCS, "fashion_spike_rates.png"))
        raster(net, x[:1], os.path.join(DOCS, "fashion_raster.png"))
        parts += ["\n## Delay D (L = 4), the paper's Table 4 on this data set\n", markdown_table(rows, net.T),
                  "\n![delay sweep](fashion_delay_sweep.png)\n",
                  "## Spikes\n", "![spike rate per population](fashion_spike_rates.png)\n",
                  "![raster of one test image](fashion_raster.png)\n"]
    with open(os.path.join(DOCS, "fashion_mnist.md"), "w") as fh:
        fh.write("\n".join(parts) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
