"""Speed benchmark of the numba simulator (issue 5): one command, one table.

    .venv/bin/python benchmarks/run.py [--quick] [--output docs/benchmarks.md]

For each model (the shipped digits CSDformer, a randomly initialised CIFAR-size
CSDformer-4-384 exported into a temporary directory, optionally the digits CNN) it

1. compiles the ONNX in a child process (wall time and the child's peak RSS);
2. runs the numba backend on one batch (a warm-up run, then ``--repeats`` timed runs,
   median), counting synaptic ops per op kind from the run's NodeStats (ACs + MACs of
   DenseSynapse / ConvSynapse / DiagonalSynapse / SpikeMatMul) and timing each node;
3. runs onnxruntime on the source ONNX on the same batch (default graph optimizations,
   the fast setting; same process, same run);
4. runs an equivalent SpikingJelly network built from the IR (multi-step ``IFNode``,
   torch CPU, float32; plain IF neurons, i.e. D = 0, which is the work SpikingJelly
   does whatever D) when spikingjelly is importable;
5. runs the Lava backend on a few images when lava-nc is importable (``--lava-images``).

A synaptic op is one presynaptic event times one target of its fan-out (the ACs and
MACs the simulator reports: only real events are counted). ``ops/s`` of an op kind is its
ops divided by its share of the batch's median wall time, the share being the kind's
summed node time (wall clock around each node, so Python overhead and waits for the GIL
count too) over all nodes' time, from separate profiled runs (worker threads overlap, so
node times add up to more than the wall time). Ratios: ``SNN/ORT`` = SNN wall time
per batch over onnxruntime's (lower is better); ``SJ/numba`` and ``Lava/numba`` = the other
simulator's time per image over numba's (higher is better).

Nothing here is a test: timings depend on the machine and its load (reported with the
table); medians of repeated runs are shown.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SYNAPSE_KINDS = ("DenseSynapse", "ConvSynapse", "DiagonalSynapse", "SpikeMatMul")


# -- machine ------------------------------------------------------------------------------
def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import numba
    import onnxruntime
    import torch

    info = {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "numba threads": str(numba.get_num_threads()),
        "torch threads": str(torch.get_num_threads()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
        "load average (1/5/15 min, at start)": " / ".join(f"{v:.2f}" for v in os.getloadavg()),
    }
    try:
        from importlib.metadata import version

        import spikingjelly  # noqa: F401

        info["spikingjelly"] = version("spikingjelly")
    except Exception:  # noqa: BLE001
        info["spikingjelly"] = "not installed"
    try:
        from importlib.metadata import version

        info["lava-nc"] = version("lava-nc")
    except Exception:  # noqa: BLE001
        info["lava-nc"] = "not installed"
    return info


# -- compile in a child process (time, peak memory) -----------------------------------------
def _rss_mib(field_name: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _compile_child(model: str, out: str) -> None:
    """Child-process entry: compile ``model`` and write it to ``out`` (what ``csdc compile`` does),
    and print a JSON line with the wall time and the peak RSS of that alone (the high-water mark is
    reset after imports through /proc/self/clear_refs, so the imports' peak does not hide it)."""
    import onnx  # noqa: F401  (import cost outside the measured region)

    from csdc.compiler.pipeline import compile_onnx
    from csdc.ir.ops import compact
    from csdc.ir.serialize import save

    base = _rss_mib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        pass
    t0 = time.perf_counter()
    net, rep = compile_onnx(model)
    save(net, out)
    seconds = time.perf_counter() - t0
    peak = _rss_mib("VmHWM")
    params = sum(int(compact(arr).size) for _, op in net.nodes() for arr in op.arrays().values())
    print(json.dumps({"seconds": seconds, "peak_rss_mib": peak, "base_rss_mib": base,
                      "synapses": int(rep.synapses), "neurons": int(rep.neurons), "ir_values": params}))


def compile_model(model: Path, out: Path) -> dict:
    res = subprocess.run([sys.executable, __file__, "--compile-child", str(model), str(out)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"compiling {model} failed:\n{res.stderr}")
    info = json.loads(res.stdout.strip().splitlines()[-1])
    info["onnx_mib"] = model.stat().st_size / 2**20
    return info


# -- SpikingJelly equivalent of the IR ------------------------------------------------------
def build_spikingjelly(net):
    """A torch module running ``net`` clock-driven with SpikingJelly multi-step IF neurons.

    Tensors are (T, B, *shape) float32. A Neuron becomes ``IFNode(v_threshold=1,
    v_reset=None, step_mode='m')`` fed ``(I + bias) / theta`` (plus ``v0 / theta`` on the
    first step); synapses are torch linear / conv2d on the spike tensors; SpikeMaxPool and
    SpikeMatMul use their temporal decompositions on cumulative counts.
    """
    import torch
    import torch.nn.functional as F
    from spikingjelly.activation_based import functional as sjf
    from spikingjelly.activation_based import neuron as sjn

    from csdc.ir import ops
    from csdc.ir.semantics import encode

    T = net.T

    class SJNet(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.steps = []
            self.ifs = torch.nn.ModuleDict()
            for name, op in net.nodes():
                self.steps.append((name, op, net.inputs(name), self._prepare(name, op)))

        def _prepare(self, name, op):
            if isinstance(op, ops.DenseSynapse):
                return torch.from_numpy(op.weight.astype(np.float32))
            if isinstance(op, ops.ConvSynapse):
                return torch.from_numpy(op.weight.astype(np.float32))
            if isinstance(op, ops.DiagonalSynapse):
                return torch.from_numpy(op.weight.astype(np.float32))
            if isinstance(op, ops.Neuron):
                key = f"n{len(self.ifs)}"
                self.ifs[key] = sjn.IFNode(v_threshold=1.0, v_reset=None, step_mode="m")
                th = op.threshold.astype(np.float64)
                return (key, torch.from_numpy((1.0 / th).astype(np.float32)),
                        torch.from_numpy((op.bias / th).astype(np.float32)),
                        torch.from_numpy((op.v0 / th).astype(np.float32)))
            return None

        @torch.no_grad()
        def forward(self, x: np.ndarray) -> torch.Tensor:
            vals = {}
            out = None
            for name, op, ins, p in self.steps:
                a = [vals[s] for s in ins]
                if isinstance(op, ops.Encode):
                    q = torch.from_numpy(encode(op, x).astype(np.float32))
                    y = q.unsqueeze(0).expand(T, *q.shape).contiguous()
                elif isinstance(op, ops.DenseSynapse):
                    y = F.linear(a[0], p)
                elif isinstance(op, ops.ConvSynapse):
                    s = a[0]
                    t_, b_ = s.shape[:2]
                    z = s.flatten(0, 1)
                    pt, pl, pb, pr = op.padding
                    if (pt, pl) != (pb, pr):
                        z = F.pad(z, (pl, pr, pt, pb))
                        pad = 0
                    else:
                        pad = (pt, pl)
                    z = F.conv2d(z, p, stride=op.stride, padding=pad, dilation=op.dilation, groups=op.groups)
                    y = z.reshape(t_, b_, *z.shape[1:])
                elif isinstance(op, ops.DiagonalSynapse):
                    y = a[0] * p
                elif isinstance(op, ops.Add):
                    y = a[0]
                    for other in a[1:]:
                        y = y + other
                elif isinstance(op, ops.Neuron):
                    key, inv_th, bias, v0 = p
                    cur = (a[0] * inv_th + bias).clone()
                    cur[0] += v0
                    y = self.ifs[key](cur)
                elif isinstance(op, (ops.SpikeMaxPool, ops.SumPool)):
                    s = a[0]
                    t_, b_ = s.shape[:2]
                    z = s.flatten(0, 1)
                    pt, pl, pb, pr = op.padding
                    if isinstance(op, ops.SpikeMaxPool):
                        c = torch.cumsum(s, 0).flatten(0, 1)
                        c = F.pad(c, (pl, pr, pt, pb))  # counts >= 0: zero padding never wins
                        m = F.max_pool2d(c, op.kernel, op.stride)
                        m = m.reshape(t_, b_, *m.shape[1:])
                        y = torch.diff(m, dim=0, prepend=torch.zeros_like(m[:1]))
                    else:
                        z = F.pad(z, (pl, pr, pt, pb))
                        z = F.avg_pool2d(z, op.kernel, op.stride, divisor_override=1)
                        y = z.reshape(t_, b_, *z.shape[1:])
                elif isinstance(op, ops.SpikeMatMul):
                    A, B = a
                    ca = torch.cumsum(A, 0)
                    cb = torch.cumsum(B, 0)
                    y = float(op.weight) * (torch.matmul(A, cb) + torch.matmul(ca - A, B))
                elif type(op).__name__ == "ReduceSum":  # (T, B, *shape): element axes from 2
                    y = a[0].sum(dim=tuple(ax + 2 for ax in op.axes))
                elif isinstance(op, ops.Reshape):
                    s = a[0]
                    y = s.reshape(*s.shape[:2], *op.shape)
                elif isinstance(op, ops.Transpose):
                    s = a[0]
                    y = s.permute(0, 1, *(q + 2 for q in op.perm)).contiguous()
                elif isinstance(op, ops.Readout):
                    y = a[0].sum(0)
                    out = y
                else:
                    raise NotImplementedError(type(op).__name__)
                vals[name] = y
            sjf.reset_net(self)
            return out

    return SJNet().eval()


# -- measurements ----------------------------------------------------------------------------
MIN_TIMED_SECONDS = 0.5  # short runs are repeated until they add up to this (at most 100 runs)


def timed_repeats(seconds: float, repeats: int) -> int:
    """``repeats``, or more for runs shorter than MIN_TIMED_SECONDS / repeats (a median of 5
    runs of a few milliseconds moves with every hiccup of a shared machine)."""
    return max(repeats, min(100, int(MIN_TIMED_SECONDS / max(seconds, 1e-6))))


def median_time(fn, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs (more for short runs, see timed_repeats)."""
    times = []
    while len(times) < (repeats if not times else timed_repeats(times[0], repeats)):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@dataclass
class Row:
    model: str
    batch: int
    T: int
    D: int
    ops_per_image: float = 0.0
    ops_by_kind: dict[str, float] = field(default_factory=dict)  # per image
    ops_per_s_by_kind: dict[str, float] = field(default_factory=dict)
    ops_per_s_total: float = 0.0
    numba_s: float = 0.0  # per batch
    ort_s: float | None = None
    sj_s: float | None = None  # per batch
    lava_s_per_image: float | None = None
    compile: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def images_per_s(self) -> float:
        return self.batch / self.numba_s


def bench_numba(net, x: np.ndarray, repeats: int) -> tuple[float, dict[str, float], dict[str, float], float]:
    from csdc.backends.numba import NumbaBackend

    be = NumbaBackend()
    be.run(net, x)  # warm-up: JIT load / compile, plan
    wall = median_time(lambda: be.run(net, x), repeats)
    prof = NumbaBackend(profile=True)
    prof.run(net, x)
    prof.node_seconds.clear()
    runs = []
    for _ in range(timed_repeats(wall, repeats)):
        prof.node_seconds.clear()
        res = prof.run(net, x)
        runs.append(dict(prof.node_seconds))
    ops: dict[str, float] = {}
    secs: dict[str, float] = {}
    for name, st in res.stats.items():
        kind = type(net.op(name)).__name__
        if kind in SYNAPSE_KINDS:
            ops[kind] = ops.get(kind, 0) + st.acs + st.macs
            secs[kind] = secs.get(kind, 0.0) + statistics.median(r[name] for r in runs)
    # Worker threads overlap: split the median wall time among op kinds in proportion to
    # their summed node time, so the per-kind figures are per wall second on all cores.
    total = sum(statistics.median(r[name] for r in runs) for name in runs[0])
    per_s = {k: ops[k] / (wall * secs[k] / total) if secs[k] > 0 else float("nan") for k in ops}
    return wall, {k: v / len(x) for k, v in ops.items()}, per_s, sum(ops.values()) / wall


def bench_ort(model: Path, x: np.ndarray, repeats: int) -> float:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(model), opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    feed = {name: np.ascontiguousarray(x, dtype=np.float32)}
    sess.run(None, feed)
    return median_time(lambda: sess.run(None, feed), repeats)


def bench_spikingjelly(net, x: np.ndarray, repeats: int) -> float | None:
    try:
        import spikingjelly  # noqa: F401
    except ImportError:
        return None
    sj = build_spikingjelly(net)
    sj(x)
    return median_time(lambda: sj(x), repeats)


def bench_lava(net, x: np.ndarray, images: int) -> float | None:
    if images <= 0:
        return None
    try:
        from csdc.backends.lava import LavaBackend
    except ImportError:
        return None
    be = LavaBackend()
    t0 = time.perf_counter()
    be.run(net, x[:images])
    return (time.perf_counter() - t0) / images


def load_models(args: argparse.Namespace, tmp: Path) -> list[tuple[str, Path, np.ndarray]]:
    from csdc.runtime.datasets import load_digits_split

    models = []
    xd, _ = load_digits_split("test")
    models.append(("digits CSDformer-2-64", ROOT / "examples/digits_csdformer/model.onnx", xd[:args.batch]))
    if args.cnn:
        models.append(("digits CNN", ROOT / "examples/digits_cnn/model.onnx", xd[:args.batch]))
    if not args.no_cifar:
        from csdc.training.transformer import export_csdformer_cifar

        path = tmp / "csdformer_cifar.onnx"
        export_csdformer_cifar(str(path), seed=0)
        rng = np.random.default_rng(0)
        xc = (np.round(rng.random((args.cifar_batch, 3, 32, 32)) * 255) / 255).astype(np.float32)
        models.append(("CIFAR CSDformer-4-384 (random)", path, xc))
    return models


def bench_model(label: str, onnx_path: Path, x: np.ndarray, args: argparse.Namespace, tmp: Path) -> Row:
    from csdc.ir.serialize import load

    sir = tmp / (onnx_path.stem + ".sir")
    comp = compile_model(onnx_path, sir)
    net = load(sir)
    D = max((net.op(n).delay for n in net.neurons()), default=0)
    row = Row(label, len(x), net.T, D, compile=comp)
    row.numba_s, row.ops_by_kind, row.ops_per_s_by_kind, row.ops_per_s_total = bench_numba(net, x, args.repeats)
    row.ops_per_image = sum(row.ops_by_kind.values())
    row.ort_s = bench_ort(onnx_path, x, args.repeats)
    row.sj_s = bench_spikingjelly(net, x, args.repeats)
    if row.sj_s is None:
        row.notes.append("spikingjelly not importable: install with `pip install --no-deps spikingjelly loguru`")
    lava_images = args.lava_images if "digits" in label else args.lava_images_large
    try:
        row.lava_s_per_image = bench_lava(net, x, lava_images)
    except Exception as exc:  # noqa: BLE001 (report, do not abort the table)
        row.notes.append(f"lava failed: {exc}")
    return row


# -- output ----------------------------------------------------------------------------------
def _g(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f} {unit}"
    return f"{v:.0f}"


def table(rows: list[Row]) -> str:
    head = ["model", "batch", "T", "D", "syn. ops / image", "ops/s by kind", "ops/s (whole net)", "images/s",
            "SNN / ORT", "SJ / numba", "Lava / numba", "compile", "compile peak memory"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        kinds = "<br>".join(f"{k.replace('Synapse', '')} {_g(r.ops_per_s_by_kind[k])}/s ({_g(r.ops_by_kind[k])})"
                            for k in SYNAPSE_KINDS if k in r.ops_by_kind)
        ort = f"{r.numba_s / r.ort_s:.2f}x ({r.ort_s * 1e3:.1f} ms vs {r.numba_s * 1e3:.1f} ms)" if r.ort_s else "-"
        sj = f"{r.sj_s / r.numba_s:.1f}x ({r.sj_s * 1e3:.0f} ms)" if r.sj_s else "not installed"
        lava = (f"{r.lava_s_per_image / (r.numba_s / r.batch):.0f}x ({r.lava_s_per_image:.1f} s/img)"
                if r.lava_s_per_image else "-")
        c = r.compile
        mem = (f"+{c['peak_rss_mib'] - c['base_rss_mib']:.0f} MiB over {c['base_rss_mib']:.0f} MiB after imports "
               f"(ONNX {c['onnx_mib']:.1f} MiB)")
        out.append("| " + " | ".join([r.model, str(r.batch), str(r.T), str(r.D), _g(r.ops_per_image), kinds,
                                      f"{_g(r.ops_per_s_total)}/s", f"{r.images_per_s:.0f}", ort, sj, lava,
                                      f"{c['seconds']:.2f} s", mem]) + " |")
    return "\n".join(out)


def targets(rows: list[Row]) -> list[str]:
    """The issue's speed targets, checked on this run."""
    out = []
    for r in rows:
        checks = []
        # Issue 5 sets the dense and conv rates for the two CSDformers; for the digits CNN the
        # conv rate only (its one dense layer is the 10-class readout, ~2 % of its synaptic ops).
        goals = (("ConvSynapse", 6e9),) if "CNN" in r.model else (("DenseSynapse", 12e9), ("ConvSynapse", 6e9))
        for kind, goal in goals:
            if kind in r.ops_per_s_by_kind:
                v = r.ops_per_s_by_kind[kind]
                checks.append(f"{kind} {_g(v)}/s {'>=' if v >= goal else '<'} {_g(goal)}/s")
        if r.sj_s:
            v = r.sj_s / r.numba_s
            checks.append(f"SpikingJelly/numba {v:.1f}x {'>=' if v >= 3 else '<'} 3x")
        if r.lava_s_per_image:
            v = r.lava_s_per_image / (r.numba_s / r.batch)
            checks.append(f"Lava/numba {v:.0f}x {'>=' if v >= 300 else '<'} 300x")
        if "CIFAR" in r.model and r.ort_s:
            v = r.numba_s / r.ort_s
            checks.append(f"SNN/onnxruntime {v:.2f}x {'<=' if v <= 3 else '>'} 3x")
        out.append(f"{r.model}: " + "; ".join(checks))
    return out


BEGIN, END = "<!-- benchmarks/run.py: begin -->", "<!-- benchmarks/run.py: end -->"


def write_markdown(path: Path, text: str) -> None:
    """Write ``text`` between the BEGIN/END markers of ``path`` (hand-written parts of the
    file outside the markers are kept), or as the whole file."""
    block = f"{BEGIN}\n{text}\n{END}\n"
    old = path.read_text() if path.exists() else ""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        tail = rest.split(END, 1)[1].lstrip("\n")
        path.write_text(head + block + tail)
    else:
        path.write_text(block)


def main(argv: list[str] | None = None) -> int:
    if argv is None and len(sys.argv) == 4 and sys.argv[1] == "--compile-child":
        _compile_child(sys.argv[2], sys.argv[3])
        return 0
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats, no Lava")
    p.add_argument("--batch", type=int, default=64, help="batch of the digits models (default 64)")
    p.add_argument("--cifar-batch", type=int, default=32, help="batch of the CIFAR-size model (default 32)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per measurement (median; default 5)")
    p.add_argument("--cnn", action="store_true", help="also the digits CNN")
    p.add_argument("--no-cifar", action="store_true", help="skip the CIFAR-size CSDformer")
    p.add_argument("--lava-images", type=int, default=2, help="images through Lava for the digits models (0: skip)")
    p.add_argument("--lava-images-large", type=int, default=0, help="images through Lava for the CIFAR model")
    p.add_argument("--output", help="also write the table and machine description to this markdown file")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.lava_images = 0
        args.lava_images_large = 0
    info = machine()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, path, x in load_models(args, Path(tmp)):
            print(f"benchmarking {label} ...", file=sys.stderr, flush=True)
            rows.append(bench_model(label, path, x, args, Path(tmp)))
    info["load average (1/5/15 min, at end)"] = " / ".join(f"{v:.2f}" for v in os.getloadavg())
    text = table(rows)
    notes = [n for r in rows for n in (f"{r.model}: {m}" for m in r.notes)]
    goals = targets(rows)
    print(text)
    for n in notes:
        print("note:", n)
    for g in goals:
        print("target:", g)
    if args.output:
        lines = ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
        cmd = " ".join(["benchmarks/run.py", *(argv if argv is not None else sys.argv[1:])])
        write_markdown(Path(args.output), "\n".join([
            (f"Made by `python {cmd}` (medians of at least {args.repeats} timed runs after a warm-up; runs "
             f"shorter than {MIN_TIMED_SECONDS / args.repeats * 1e3:.0f} ms are repeated until they add up to "
             f"{MIN_TIMED_SECONDS} s)."), "",
            "### Machine", "", *lines, "", "### Results", "", text, "", "### Targets (issue 5)", "",
            *(f"- {g}" for g in goals), *(f"- note: {n}" for n in notes)]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
