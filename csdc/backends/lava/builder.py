"""Build and run the Lava process graph of a deployment plan.

Depends only on numpy, scipy, lava-nc and the sibling modules ``_hook`` and ``processes``:
this file is copied verbatim into deployment bundles, so the backend and a bundle build the
very same process graph from the very same plan. The plan (``plan.json`` + ``arrays.npz``) is
produced by :mod:`csdc.backends.lava.plan`; see there for the schedule.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp

from . import _hook

_hook.prepare_lava()

from lava.magma.core.process.process import AbstractProcess
from lava.magma.core.run_conditions import RunSteps
from lava.magma.core.run_configs import Loihi2SimCfg
from lava.proc.conv.process import Conv
from lava.proc.dense.process import Dense
from lava.proc.sparse.process import Sparse
from lava.utils.weightutils import SignMode

from . import processes as P

PLAN_FORMAT = "csdc-lava-plan"
SUPPORTED_PLAN_VERSIONS = (1, 2)  # 2: two-word DIF populations
_SPIKING = ("neuron", "ternary", "maxpool")  # process kinds that record spike counts


def encode_levels(x: np.ndarray, scale: float, lo: int, hi: int) -> np.ndarray:
    """Integer input levels ``clip(round_half_even(x / scale), lo, hi)`` in float32 (like ONNX
    QuantizeLinear and csdc's reference semantics)."""
    x = np.asarray(x, dtype=np.float32)
    q = np.rint(x / np.float32(scale))
    return np.clip(q, lo, hi).astype(np.int64)


def readout_logits(readout: np.ndarray, scale: np.ndarray, offset: np.ndarray) -> np.ndarray:
    """Float logits from accumulated readout currents (float64, then float32), as csdc's
    reference semantics compute them."""
    return (np.asarray(readout).astype(np.float64) * scale + offset).astype(np.float32)


@dataclass
class LavaGraph:
    """The Lava processes of one plan: ``source`` (input encoder), ``processes`` (every process by
    name, including source and sink), ``sink`` (readout) and the plan they came from."""

    source: AbstractProcess
    processes: dict[str, AbstractProcess]
    sink: AbstractProcess
    plan: dict
    n_samples: int
    keep_trains: bool

    @property
    def total_steps(self) -> int:
        """Global steps needed to push all samples through the pipeline."""
        m = self.plan["meta"]
        if self.n_samples == 0:
            return 0
        return (self.n_samples - 1) * m["period"] + m["latency"]


@dataclass
class GraphOutput:
    """What a run produced: readout integers (n, classes), counts / trains per spiking IR node
    (signed for ternary neurons), spikes of both signs per element of each ternary neuron node
    (``events``), max |v| per neuron node, and timings."""

    readout: np.ndarray
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    events: dict[str, np.ndarray] = field(default_factory=dict)
    trains: dict[str, np.ndarray] = field(default_factory=dict)
    max_abs_v: dict[str, int] = field(default_factory=dict)
    mbe_spikes: dict[str, np.ndarray] = field(default_factory=dict)
    steps: int = 0
    seconds_build: float = 0.0
    seconds_run: float = 0.0
    seconds_fetch: float = 0.0


def check_plan(plan: dict) -> None:
    """Reject plans of another format or an unknown version."""
    if plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a csdc Lava plan (format {plan.get('format')!r})")
    if plan.get("version") not in SUPPORTED_PLAN_VERSIONS:
        raise ValueError(f"unsupported Lava plan version {plan.get('version')!r}; supported {SUPPORTED_PLAN_VERSIONS}")


def _csr(arrays: dict[str, np.ndarray], keys: dict[str, str]) -> sp.csr_matrix:
    shape = tuple(int(s) for s in arrays[keys["shape"]])
    return sp.csr_matrix((arrays[keys["data"]].astype(np.int64), arrays[keys["indices"]], arrays[keys["indptr"]]),
                         shape=shape, dtype=np.int64)


def build_graph(plan: dict, arrays: dict[str, np.ndarray], levels: np.ndarray, *, keep_trains: bool = False) -> LavaGraph:
    """Create (not run) the Lava processes and connections of ``plan`` for the integer input
    ``levels`` (n, *input_shape)."""
    check_plan(plan)
    meta = plan["meta"]
    T, period = int(meta["T"]), int(meta["period"])
    levels = np.asarray(levels, dtype=np.int64)
    n = int(levels.shape[0])
    if tuple(levels.shape[1:]) != tuple(meta["input_shape"]):
        raise ValueError(f"input levels have shape {levels.shape[1:]}, the network expects {tuple(meta['input_shape'])}")
    procs: dict[str, AbstractProcess] = {}
    source = sink = None
    for p in plan["processes"]:
        name, kind, impl, prm = p["name"], p["kind"], p["impl"], p["params"]
        arr = {k: arrays[v] for k, v in p["arrays"].items()}
        if kind == "encode":
            proc = source = P.CsdcEncode(levels=levels, T=T, period=period, name=name)
        elif kind in ("neuron", "ternary") and prm.get("shift"):  # two-word membrane, two compartments
            neuron = P.CsdcTwoWordNeuron if kind == "neuron" else P.CsdcTwoWordTernaryNeuron
            proc = neuron(**{k: (arr[f"{k}_hi"], arr[f"{k}_lo"]) for k in ("threshold", "v0", "bias")},
                          shift=prm["shift"], word_bits=prm["word_bits"], T=T, delay=prm["delay"], start=p["start"],
                          period=period, n_samples=n, keep_trains=keep_trains, name=name)
        elif kind in ("neuron", "ternary"):
            neuron = P.CsdcNeuron if kind == "neuron" else P.CsdcTernaryNeuron
            proc = neuron(threshold=arr["threshold"], v0=arr["v0"], bias=arr["bias"], T=T, delay=prm["delay"],
                          start=p["start"], period=period, n_samples=n, keep_trains=keep_trains, name=name)
        elif kind == "mbe":
            proc = P.CsdcMBENeuron(v0=arr["v0"], offset=arr["offset"], threshold=arr["threshold"], reset=arr["reset"],
                                   weight=arr["weight"], T=T, start=p["start"], period=period, n_samples=n, name=name)
        elif kind == "maxpool":
            proc = P.CsdcMaxPool(in_shape=tuple(p["in_port"]), kernel=tuple(prm["kernel"]), stride=tuple(prm["stride"]),
                                 padding=tuple(prm["padding"]), T=T, start=p["start"], period=period, n_samples=n,
                                 keep_trains=keep_trains, name=name)
        elif kind == "delay":
            proc = P.CsdcDelay(shape=tuple(p["out_port"]), steps=prm["steps"], name=name)
        elif kind == "matmul":
            proc = P.CsdcSpikeMatMul(a_shape=tuple(p["in_port"]), b_shape=tuple(p["in_port_b"]), weight=prm["weight"],
                                     T=T, start=p["start"], period=period, n_samples=n, name=name)
        elif kind == "readout":
            proc = sink = P.CsdcReadout(num_classes=int(p["in_port"][0]), T=T, start=p["start"], period=period,
                                        n_samples=n, name=name)
        elif kind == "synapse" and impl == "lava.Dense":
            proc = Dense(weights=arr["weights"].astype(np.int32), weight_exp=int(prm["weight_exp"]),
                         num_weight_bits=int(prm["num_weight_bits"]), sign_mode=SignMode.MIXED,
                         num_message_bits=int(prm["num_message_bits"]), name=name)
        elif kind == "synapse" and impl == "lava.Sparse":
            proc = Sparse(weights=_csr(arrays, p["arrays"]).astype(np.int32), weight_exp=int(prm["weight_exp"]),
                          num_weight_bits=int(prm["num_weight_bits"]), sign_mode=SignMode.MIXED,
                          num_message_bits=int(prm["num_message_bits"]), name=name)
        elif kind == "synapse" and impl == "lava.Conv":
            w, h, c = p["in_port"]
            proc = Conv(weight=arr["weight"].astype(np.int32), input_shape=(w, h, c), padding=tuple(prm["padding"]),
                        stride=tuple(prm["stride"]), dilation=tuple(prm["dilation"]), groups=int(prm["groups"]),
                        num_message_bits=int(prm["num_message_bits"]), name=name)
        elif kind == "synapse" and impl == "custom":
            proc = P.CsdcSynapse(matrix=_csr(arrays, p["arrays"]), in_shape=tuple(p["in_port"]),
                                 out_shape=tuple(p["out_port"]), name=name)
        else:
            raise ValueError(f"process '{name}': unknown kind/impl {kind}/{impl}")
        procs[name] = proc
    if source is None or sink is None:
        raise ValueError("the plan has no encoder or no readout")
    for c in plan["connections"]:
        port = _out_port(procs[c["src"]])
        for kind, arg in c["transforms"]:
            port = port.reshape(tuple(arg)) if kind == "reshape" else port.transpose(list(arg))
        dst = procs[c["dst"]]
        port.connect(getattr(dst, c["dst_port"]) if c.get("dst_port") else _in_port(dst))
    return LavaGraph(source=source, processes=procs, sink=sink, plan=plan, n_samples=n, keep_trains=keep_trains)


def _out_port(proc: AbstractProcess):
    for attr in ("a_out", "s_out"):
        if hasattr(proc, attr):
            return getattr(proc, attr)
    raise ValueError(f"process {proc.name} has no output port")


def _in_port(proc: AbstractProcess):
    for attr in ("s_in", "a_in"):
        if hasattr(proc, attr):
            return getattr(proc, attr)
    raise ValueError(f"process {proc.name} has no input port")


def run_config(graph: LavaGraph | None = None) -> Loihi2SimCfg:
    """Loihi 2 simulation with fixed-point models (``select_tag="fixed_pt"``).

    csdc's custom processes are mapped to their models explicitly. Lava 0.10's compiler looks
    the exception map up by process *instance* (``proc in exception_proc_model_map``), so the
    map holds the graph's instances (and the classes, for Lava versions that look up classes);
    without a match Lava would search for models by executing every module file next to the
    process class."""
    mapping: dict = dict(P.PROCESS_MODELS)
    if graph is not None:
        for proc in graph.processes.values():
            model = P.PROCESS_MODELS.get(type(proc))
            if model is not None:
                mapping[proc] = model
    return Loihi2SimCfg(select_tag="fixed_pt", exception_proc_model_map=mapping)


def run_graph(graph: LavaGraph) -> GraphOutput:
    """Run all samples through the pipeline in one Lava run, fetch the results and stop."""
    meta = graph.plan["meta"]
    T, n = int(meta["T"]), graph.n_samples
    out = GraphOutput(readout=np.zeros((n, int(meta["num_classes"])), dtype=np.int64))
    if n == 0:  # nothing to run: empty results of the right shapes
        for p in graph.plan["processes"]:
            if p["kind"] in _SPIKING:
                out.counts[p["ir_node"]] = np.zeros((0, *p["out_port"]), dtype=np.int64)
                if p["kind"] == "ternary":
                    out.events[p["ir_node"]] = np.zeros((0, *p["out_port"]), dtype=np.int64)
                if graph.keep_trains:
                    out.trains[p["ir_node"]] = np.zeros((0, T, *p["out_port"]), dtype=np.int64)
            if p["kind"] == "mbe":
                out.mbe_spikes[p["ir_node"]] = np.zeros((0, *p["out_port"]), dtype=np.int64)
        return out
    steps = graph.total_steps
    t0 = time.perf_counter()
    try:
        graph.sink.run(condition=RunSteps(num_steps=steps), run_cfg=run_config(graph))
        t1 = time.perf_counter()
        out.readout = np.rint(np.asarray(graph.sink.readout.get(), dtype=np.float64)).astype(np.int64).reshape(n, -1)
        by_node = {p["ir_node"]: p for p in graph.plan["processes"] if p["kind"] in _SPIKING}
        overflows: list[str] = []
        for node, p in by_node.items():
            proc = graph.processes[p["name"]]
            shape = tuple(p["out_port"])
            size = int(np.prod(shape))
            out.counts[node] = P.unpack_uint(proc.counts_packed.get(), P.count_bits(T), n * size).reshape(n, *shape)
            if p["kind"] == "ternary":  # counts_packed holds the +1 spikes
                neg = P.unpack_uint(proc.neg_counts_packed.get(), P.count_bits(T), n * size).reshape(n, *shape)
                out.counts[node], out.events[node] = out.counts[node] - neg, out.counts[node] + neg
            if graph.keep_trains:
                bits = 2 if p["kind"] == "ternary" else 1  # a ternary train is packed as spike + 1
                trains = P.unpack_uint(proc.trains_packed.get(), bits, n * T * size).reshape(n, T, *shape)
                out.trains[node] = trains - 1 if bits == 2 else trains
            if p["kind"] in ("neuron", "ternary"):
                out.max_abs_v[node] = int(np.asarray(proc.max_abs_v.get()).ravel()[0])
            if p["params"].get("shift"):
                overflow = P.word_overflow_message(p["name"], p["params"]["word_bits"], proc.overflow.get())
                if overflow is not None:
                    overflows.append(overflow)
        for p in graph.plan["processes"]:
            if p["kind"] == "mbe":  # spikes of all bases and steps per element, and the largest |u|
                proc = graph.processes[p["name"]]
                shape = tuple(p["out_port"])
                bits = P.count_bits(int(np.prod(proc.threshold.shape)))
                out.mbe_spikes[p["ir_node"]] = P.unpack_uint(proc.spikes_packed.get(), bits,
                                                            n * int(np.prod(shape))).reshape(n, *shape)
                out.max_abs_v[p["ir_node"]] = int(np.asarray(proc.max_abs_v.get()).ravel()[0])
        t2 = time.perf_counter()
    finally:
        graph.sink.stop()
    if overflows:
        raise OverflowError("; ".join(overflows))
    out.steps = steps
    out.seconds_run, out.seconds_fetch = t1 - t0, t2 - t1
    return out


__all__ = ["GraphOutput", "LavaGraph", "build_graph", "check_plan", "encode_levels", "readout_logits", "run_config", "run_graph"]
