"""The ``csdc`` command line: compile, run, inspect, export.

Every user error is a :class:`csdc.errors.CsdcError`: its message names the culprit and the
fix, it goes to stderr, and the exit code is non-zero (2). Nothing is written on failure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys

import numpy as np

from csdc import __version__
from csdc.errors import CsdcError, DataError

BACKEND_CHOICES = ("numba", "reference", "lava")


def _fmt_count(v: float) -> str:
    for unit, f in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= f:
            return f"{v / f:.2f} {unit}"
    return f"{v:.0f}"


# -- compile -----------------------------------------------------------------------------
def cmd_compile(args: argparse.Namespace) -> int:
    from csdc.compiler.pipeline import CompileOptions, compile_onnx
    from csdc.ir import serialize

    opts = CompileOptions(delay=args.delay, frac_bits=args.frac_bits, weight_bits=args.weight_bits, profile=args.profile)
    net, rep = compile_onnx(args.model, opts)
    serialize.save(net, args.output)
    if args.json:
        print(json.dumps({"output": args.output, **rep.to_dict()}, indent=1))
        return 0
    print(f"compiled {args.model} -> {args.output} in {rep.seconds:.2f} s")
    print(f"  time steps T          {rep.T}")
    print(f"  delay D               {rep.delay}{'  (exact: D >= T)' if rep.delay >= rep.T else '  (D < T: may differ from the quantized model)'}")
    print(f"  latency               {rep.latency} steps (T + depth x D)")
    print(f"  populations           {rep.populations} ({rep.neurons} neurons)")
    print(f"  synapses              {rep.synapses}")
    chosen = f"--frac-bits {opts.frac_bits}" if opts.frac_bits is not None else "chosen per population"
    print(f"  integerization error  {rep.error_bound:.2e} of a quantization level, worst case"
          f"{f' (population {rep.error_population!r})' if rep.error_population else ''}; precision {chosen}")
    print(f"  threshold rounding    {rep.threshold_error:.2e} worst relative error")
    print(f"  weight rescaling      {rep.weight_error:.2e} worst relative error of one rescaled weight")
    print(f"  bias rounding         {rep.bias_error:.2e} of a threshold, worst case")
    if rep.float_weight_error:
        print(f"  float weights         quantized by csdc to {opts.weight_bits} bits, worst relative error {rep.float_weight_error:.2e}")
    split = rep.precision.get("split_synapses", {})
    if split:
        print(f"  weight splitting      {len(split)} synapse nodes wider than the profile's weights split into "
              f"{sum(split.values())} groups ({rep.synapses_before_split} -> {rep.synapses} synapses)")
    b = rep.bits
    # weights are integer mantissas times a power of two shared by a synapse node (Loihi's weight exponent):
    # "weights 20 (x 2^16)" = the widest mantissa needs 20 signed bits, the largest shared exponent is 16
    print(f"  bit widths            weights {b['weight_bits']} (x 2^{b['weight_exponent']}), thresholds {b['threshold_bits']}, membrane {b['membrane_bits']}, "
          f"readout {b['accumulator_bits']} (profile '{b['profile']}')")
    print("                        (weights: signed mantissa bits x the largest power of two shared by a synapse node)")
    for w in rep.warnings:
        print(f"  warning: {w}")
    if args.explain:
        print("\nsource node -> spiking IR")
        for src, made in rep.explain.items():
            print(f"  {src:<32} {', '.join(made)}")
        print("\npopulation -> worst-case integerization error (quantization levels; the readout: absolute logit "
              "error), the site whose exponent k sets its integer unit, threshold bits")
        for pop, pe in rep.precision["populations"].items():
            print(f"  {pop:<40} {pe['bound']:.2e}  (weights {pe['weights']:.1e}, bias {pe['bias']:.1e}, threshold "
                  f"{pe['threshold']:.1e})  k={pe['k']} from {pe['site']}, {pe['threshold_bits']}-bit threshold")
    return 0


# -- run -------------------------------------------------------------------------------------
def _load_data(spec: str, input_shape: tuple[int, ...], limit: int | None) -> tuple[np.ndarray, np.ndarray | None]:
    from csdc.runtime.datasets import load_digits_split, load_npz

    if spec == "digits":
        x, y = load_digits_split("test")
        if tuple(x.shape[1:]) != tuple(input_shape):
            raise DataError(f"the digits set has samples of shape {tuple(x.shape[1:])} but the network expects "
                            f"{tuple(input_shape)}; pass your own data with --data file.npz")
    else:
        x, y = load_npz(spec, tuple(input_shape))
    if limit is not None:
        if limit < 1:
            raise DataError(f"--limit must be >= 1, got {limit}")
        x, y = x[:limit], (y[:limit] if y is not None else None)
    return x, y


def _save_results(path: str, out) -> None:
    from csdc.ir.serialize import write_atomic

    buf = io.BytesIO()
    arrays = {"logits": out.logits.astype(np.float32), "readout": out.readout.astype(np.int64)}
    if out.labels is not None:
        arrays["labels"] = out.labels.astype(np.int64)
    np.savez(buf, **arrays)
    write_atomic(path, buf.getvalue())


def cmd_run(args: argparse.Namespace) -> int:
    from csdc.backends.base import get_backend
    from csdc.ir import serialize
    from csdc.ir.semantics import require_exact
    from csdc.runtime.evaluate import PJ_PER_AC, PJ_PER_MAC, compare, run_dataset

    net = serialize.load(args.sir)
    if args.delay is not None:
        if args.delay < 0:
            raise CsdcError(f"--delay must be >= 0, got {args.delay}")
        net = net.with_delay(args.delay)
    if args.batch < 1:
        raise CsdcError(f"--batch must be >= 1, got {args.batch}")
    x, y = _load_data(args.data, net.input_shape, args.limit)
    backend = get_backend(args.backend)
    if args.backend == "numba":
        from csdc.backends.numba import kernels_cached

        if not kernels_cached():
            print("compiling numba kernels (first run only; cached on disk for later runs)...", file=sys.stderr, flush=True)
    if args.backend == "reference":
        require_exact(net)  # fail before any work, naming the neuron
    out = run_dataset(net, backend, x, y, batch=args.batch, progress=not args.no_progress and not args.json)
    s = out.summary
    if args.compare:
        s.comparison = compare(args.compare, out, x)
    if args.output:
        _save_results(args.output, out)
    if args.json:
        print(json.dumps(s.to_dict(), indent=1))
        return 0
    n = s.samples
    print(f"csdc run {args.sir}  backend={s.backend}  samples={n}  T={s.T}  D={s.delay}  latency={s.latency_steps} steps"
          + (f" ({s.clock_latency_steps} on the backend's global clock)" if s.clock_latency_steps is not None else ""))
    if s.accuracy is not None:
        print(f"  SNN accuracy          {100 * s.accuracy:.2f} %")
    c = s.comparison
    if c is not None:
        if c.onnx_accuracy is not None:
            print(f"  ONNX accuracy         {100 * c.onnx_accuracy:.2f} %  (onnxruntime on {c.model})")
        print(f"  top-1 agreement       {100 * c.agreement:.2f} %  (max |logit difference| {c.max_abs_logit_diff:.3g})")
    print(f"  spikes                {_fmt_count(s.spikes / n)} per image, {s.spike_rate:.4f} per neuron per step")
    print(f"  synaptic operations   {_fmt_count(s.acs / n)} ACs, {_fmt_count(s.macs / n)} MACs per image")
    print(f"  energy estimate       {s.energy_uj_per_sample:.3f} uJ per image (45 nm: {PJ_PER_AC} pJ/AC, {PJ_PER_MAC} pJ/MAC)")
    print(f"  wall time             {s.seconds:.2f} s ({n / s.seconds:.0f} images/s)")
    if args.output:
        print(f"  results               {args.output}")
    by_op: dict[str, int] = {}
    for p in s.per_population.values():
        if p["acs"] or p["macs"]:
            by_op[p["op"]] = by_op.get(p["op"], 0) + p["acs"] + p["macs"]
    if by_op:
        print("  synaptic ops by op    " + ", ".join(f"{op} {_fmt_count(v / n)}" for op, v in sorted(by_op.items())))
    pops = {k: p for k, p in s.per_population.items() if p["neurons"]}
    if pops:
        width = max(max(len(k) for k in pops), len("spiking population")) + 2
        print(f"\n  {'spiking population':<{width}} {'op':<13} {'neurons':>8} {'spikes/step':>12} {'max|v|':>10}")
        for name, p in pops.items():
            print(f"  {name:<{width}} {p['op']:<13} {p['neurons']:>8} {p['rate']:>12.4f} {p['max_abs_v']:>10}")
    return 0


# -- sweep -------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from csdc.backends.base import get_backend
    from csdc.ir import serialize
    from csdc.ir.semantics import require_exact
    from csdc.runtime.sweep import markdown_table, parse_delays, plot, rows_to_dicts, sweep_delays

    net = serialize.load(args.sir)
    delays = parse_delays(args.delays, net.T)
    x, y = _load_data(args.data, net.input_shape, args.limit)
    if args.backend == "reference":
        require_exact(net.with_delay(min(delays)))  # fail before any work, naming the neuron
    rows = sweep_delays(net, get_backend(args.backend), delays, x, y, args.compare, args.batch,
                        progress=not args.no_progress and not args.json)
    if args.plot:
        plot(rows, net.T, f"{os.path.basename(args.sir)}: delay sweep ({len(x)} samples)", args.plot)
    if args.json:
        print(json.dumps({"T": net.T, "rows": rows_to_dicts(rows)}, indent=1))
    else:
        print(f"delay sweep of {args.sir} on {len(x)} samples, T={net.T}, backend {args.backend}\n")
        print(markdown_table(rows, net.T))
        if args.plot:
            print(f"\nplot: {args.plot}")
    return 0


# -- inspect -------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from csdc.ir import serialize
    from csdc.ir.ops import Neuron

    net = serialize.load(args.sir)
    rows = []
    for name, op in net.nodes():
        info = net.info(name)
        params = []
        for field, arr in op.arrays().items():
            if arr.size:
                params.append(f"{field}{list(arr.shape)} [{arr.min():.6g}, {arr.max():.6g}]")
        attrs = {k: v for k, v in op.attributes().items() if k not in ("shape",)}
        if attrs:
            params.append(" ".join(f"{k}={v}" for k, v in attrs.items()))
        rows.append({"name": name, "op": type(op).__name__, "inputs": net.inputs(name), "kind": info.kind,
                     "shape": list(info.shape), "params": "; ".join(params)})
    if args.json:
        print(json.dumps({"T": net.T, "metadata": net.metadata, "nodes": rows}, indent=1, default=str))
        return 0
    comp = net.metadata.get("compile", {})
    print(f"{args.sir}: T={net.T}, {len(net.neurons())} neuron populations, {len(rows)} nodes"
          + (f", compiled from {comp.get('source')}" if comp else ""))
    delays = sorted({net.op(n).delay for n in net.neurons() if isinstance(net.op(n), Neuron)})
    print(f"delays: {delays}; latency {comp.get('latency', '?')} steps")
    print(f"\n{'node':<30} {'op':<15} {'kind':<8} {'shape':<16} inputs / parameters")
    for r in rows:
        print(f"{r['name']:<30} {r['op']:<15} {r['kind']:<8} {str(tuple(r['shape'])):<16} "
              f"{', '.join(r['inputs']) or '-'}  {r['params']}")
    return 0


# -- export -------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from csdc.ir import serialize

    net = serialize.load(args.sir)
    try:
        from csdc.backends.lava.export import export_bundle
    except ImportError as exc:
        raise CsdcError(f"the Lava exporter is not available: {exc}") from None
    export_bundle(net, args.output)
    print(f"wrote a Lava deployment bundle for {args.sir} to {args.output}/ (see its README)")
    return 0


# -- train ---------------------------------------------------------------------------------
_CSDFORMER_ONLY = ("depth", "dim", "heads", "mlp_ratio", "input_levels")


def cmd_train(args: argparse.Namespace) -> int:
    try:  # csdc.training is the only part of csdc that needs PyTorch
        from csdc.training.recipe import TrainConfig, train_and_export
    except ImportError as exc:
        if "torch" not in str(exc):
            raise
        raise CsdcError("csdc train needs PyTorch, an optional dependency: pip install csdc[torch]") from None

    if args.model == "cnn":
        given = [f"--{k.replace('_', '-')}" for k in _CSDFORMER_ONLY if getattr(args, k) is not None]
        if given:
            raise CsdcError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to --model csdformer only")
    if os.path.isdir(args.output):
        raise CsdcError(f"-o {args.output} is a directory; give the .onnx file to write")
    overrides = {k: getattr(args, k) for k in _CSDFORMER_ONLY if getattr(args, k) is not None}
    config = TrainConfig(model=args.model, data=args.data if args.data is not None else args.dataset,
                         levels=args.levels, weight_bits=args.weight_bits, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, **overrides)
    c = config.resolved()
    arch = (f"CSDformer-{c.depth}-{c.dim} (heads {c.heads}, MLP ratio {c.mlp_ratio:g})" if c.model == "csdformer"
            else "digits CNN")
    print(f"training {arch}, L = {c.levels} levels, {c.weight_bits}-bit weights, {c.epochs} epoch{'s' if c.epochs != 1 else ''}, "
          f"Adam lr {c.lr:g}, batch {c.batch_size}, seed {c.seed}")
    r = train_and_export(config, args.output, progress=not args.no_progress)
    print(f"data                       {r.data_description}")
    print(f"parameters                 {r.num_parameters}")
    print(f"training time              {r.history.seconds:.1f} s")
    print(f"PyTorch eval accuracy      {100 * r.acc_torch:.2f} %  ({r.n_test} test images)")
    print(f"ONNX accuracy              {100 * r.acc_onnx:.2f} %  (onnxruntime)")
    print(f"top-1 agreement            {100 * r.agreement:.2f} %  (max |logit difference| {r.max_logit_diff:.3g})")
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1024:.0f} KB, QCDQ, {len(r.ops)} nodes); "
          f"compile it with: csdc compile {args.output} -o net.sir")
    return 0


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that runs a network on data (run, sweep)."""
    p.add_argument("sir", help="the compiled network (.sir)")
    p.add_argument("--backend", default="numba", choices=BACKEND_CHOICES,
                   help="numba: event-driven simulator (default); reference: count-domain interpreter (exact for D >= T); "
                        "lava: Lava processes (needs lava-nc)")
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's digits test split) or a .npz with x (N,C,H,W float32) and optional y")
    p.add_argument("--compare", metavar="MODEL.onnx", help="also run this ONNX model with onnxruntime and report agreement")
    p.add_argument("--batch", type=int, default=64, help="samples per batch (default 64)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csdc", description="Compile quantized ONNX networks into integer-only, spike-driven "
                                "networks (CSDformer conversion) and run them.")
    p.add_argument("--version", action="version", version=f"csdc {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compile", help="compile a QDQ/QCDQ ONNX model into a .sir spiking network",
                       description="Lower a quantized ONNX model (QDQ or QCDQ) into an integer-only spiking network.")
    c.add_argument("model", help="the quantized ONNX model (.onnx)")
    c.add_argument("-o", "--output", required=True, help="the .sir file to write (written atomically)")
    c.add_argument("--delay", type=int, default=None, metavar="D",
                   help="delay of the DIF neurons in time steps; default T (exact: the network equals the quantized model); "
                        "D=0 is the plain IF neuron")
    c.add_argument("--frac-bits", type=int, default=None, metavar="F",
                   help="override the chosen precision: every threshold gets at least F significant bits (a sum "
                        "of branches is kept in units of step / 2^F of the quantizer that reads it). By default the "
                        "precision is chosen per population from the --profile budget so that the worst-case "
                        "integerization error stays below 2^-8 of a quantization level (docs/precision.md)")
    c.add_argument("--weight-bits", type=int, default=8, metavar="B",
                   help="bit width for float weights that have no quantizer in the model (per-channel symmetric; default 8)")
    c.add_argument("--profile", default="generic", choices=("generic", "loihi2", "int64"),
                   help="hardware bit budget checked by the bit-width analysis (default generic: a 32-bit datapath with "
                        "24-bit weight mantissas, 24-bit thresholds, 32-bit membrane; loihi2: 8-bit weights, 24-bit membrane)")
    c.add_argument("--explain", action="store_true", help="print what each source node became in the IR")
    c.add_argument("--json", action="store_true", help="print the compile report as JSON")
    c.set_defaults(func=cmd_compile)

    r = sub.add_parser("run", help="run a .sir network on a dataset",
                       description="Run a compiled network and report accuracy, agreement with onnxruntime, spikes, "
                                   "synaptic operations, energy estimate and wall time.")
    _add_run_options(r)
    r.add_argument("--delay", type=int, default=None, metavar="D", help="override every neuron's delay for this run")
    r.add_argument("--output", metavar="RESULTS.npz", help="save per-sample logits (float32, N x classes), readout "
                   "integers and labels to this .npz")
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(func=cmd_run)

    w = sub.add_parser("sweep", help="accuracy and agreement against the neuron delay D",
                       description="Run a network once per delay D and report accuracy, agreement with onnxruntime "
                                   "and latency (T + depth x D); optionally plot them.")
    _add_run_options(w)
    w.add_argument("--delays", default="0..T", help="delays to try: a range '0..T' (default) or a list '0,1,4'")
    w.add_argument("--plot", metavar="FILE.png", help="write a plot of accuracy/agreement against D and latency")
    w.add_argument("--json", action="store_true", help="print the table as JSON")
    w.set_defaults(func=cmd_sweep)

    i = sub.add_parser("inspect", help="print a .sir network as a table", description="Print the nodes of a .sir network.")
    i.add_argument("sir", help="the compiled network (.sir)")
    i.add_argument("--json", action="store_true", help="print as JSON")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", help="export a .sir network for deployment",
                       description="Write a self-contained deployment bundle (Lava processes for Loihi-style hardware).")
    e.add_argument("sir", help="the compiled network (.sir)")
    e.add_argument("--to", default="lava", choices=("lava",), help="deployment target (default lava)")
    e.add_argument("-o", "--output", required=True, help="folder to write the bundle into")
    e.set_defaults(func=cmd_export)

    t = sub.add_parser(
        "train", help="train a quantized CSDformer or CNN (LSQ) and export it as QCDQ ONNX (needs csdc[torch])",
        description="Quantization-aware training (LSQ: learned activation steps, per-channel integer weights) of "
                    "the tailored transformer (CSDformer: conv tokenizer, NReLU attention, BatchNorm, no softmax / "
                    "LayerNorm / GELU) or the digits CNN, then QCDQ ONNX export that 'csdc compile' takes. Prints one "
                    "line per epoch, then the PyTorch-eval accuracy, the ONNX (onnxruntime) accuracy and their top-1 "
                    "agreement on the test split. Deterministic: the same options give a byte-identical file. "
                    "Needs PyTorch: pip install csdc[torch].")
    t.add_argument("--model", default="csdformer", choices=("csdformer", "cnn"),
                   help="csdformer (default): the tailored transformer; cnn: the small 8x8 digits CNN (2 conv stages + linear)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--dataset", default="digits", choices=("digits",),
                     help="built-in dataset (default digits): scikit-learn's 8x8 digits (offline), fixed 1347 / 450 train / test "
                          "split")
    src.add_argument("--data", metavar="FILE.npz", default=None,
                     help="your own data instead: x (N,C,H,W float32 in [0, 1], square images) and y (N int labels); "
                          "a fixed 20%% (seed 0) is held out for testing")
    t.add_argument("--depth", type=int, default=None, help="csdformer: number of transformer blocks (default 2)")
    t.add_argument("--dim", type=int, default=None, help="csdformer: token width d (default 64)")
    t.add_argument("--heads", type=int, default=None, help="csdformer: attention heads, must divide --dim (default 4)")
    t.add_argument("--mlp-ratio", type=float, default=None, help="csdformer: MLP hidden width / d (default 2)")
    t.add_argument("--levels", type=int, default=None, metavar="L",
                   help="levels of every hidden activation quantizer = time steps T of the spiking network "
                        "(default 4 for csdformer, 15 for cnn)")
    t.add_argument("--weight-bits", type=int, default=None, metavar="B",
                   help="bits of the signed per-channel weight quantizers, 2..8 (default 4)")
    t.add_argument("--input-levels", type=int, default=None, metavar="L_IN",
                   help="csdformer: levels of the input quantizer (step 1/L_IN on [0, 1]); default 16 for digits "
                        "(exact), 255 for --data")
    t.add_argument("--epochs", type=int, default=None, help="training epochs (default 15 for csdformer, 30 for cnn)")
    t.add_argument("--lr", type=float, default=None, help="Adam learning rate, cosine decay (default 0.002 for "
                   "csdformer, 0.01 for cnn)")
    t.add_argument("--batch-size", type=int, default=32, help="training batch size (default 32)")
    t.add_argument("--seed", type=int, default=0, help="random seed of the initial weights and the shuffling (default 0)")
    t.add_argument("-o", "--output", required=True, metavar="MODEL.onnx",
                   help="the QCDQ ONNX file to write (atomically, only after training and checking succeeded)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar (the per-epoch lines are still printed)")
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CsdcError as exc:
        print(f"csdc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("csdc: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser"]
