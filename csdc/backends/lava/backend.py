"""The Lava backend: run a spiking IR network as Lava processes under
``Loihi2SimCfg(select_tag="fixed_pt")``, spike-for-spike identical to ``run_steps``.

lava-nc is never imported here. Each batch is written as a deployment bundle
(:func:`csdc.backends.lava.export.export_bundle`) whose ``run_lava.py`` runs with the Lava
environment's Python (:mod:`csdc.backends.lava.env`) in a subprocess; readouts, spike counts,
spike trains and max |v| come back in an ``.npz``. Activity statistics are computed here, with
the numba backend's definitions."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from csdc.backends.base import NodeStats, RunResult
from csdc.backends.lava import env as lava_env
from csdc.backends.lava.export import export_bundle
from csdc.backends.lava.plan import Plan, linear_matrix, make_plan
from csdc.errors import DataError
from csdc.ir.graph import Network
from csdc.ir.ops import (
    SPIKES,
    TERNARY,
    Add,
    ConvSynapse,
    DenseSynapse,
    DiagonalSynapse,
    Encode,
    MBENeuron,
    Neuron,
    Op,
    ReduceSum,
    Reshape,
    SpikeMatMul,
    SpikeMaxPool,
    Transpose,
)
from csdc.ir.semantics import _linear, encode, readout_logits


def _spike_counts_of(net: Network, name: str, counts: dict[str, np.ndarray]) -> np.ndarray | None:
    """Counts of a spike tensor (through routing ops), or None for currents."""
    op = net.op(name)
    if name in counts:
        return counts[name]
    if isinstance(op, (Reshape, Transpose)):
        c = _spike_counts_of(net, net.inputs(name)[0], counts)
        if c is None:
            return None
        return c.reshape(c.shape[0], *op.shape) if isinstance(op, Reshape) else c.transpose(0, *(p + 1 for p in op.perm))
    return None


def _structural_fanout(net: Network, name: str) -> np.ndarray:
    """Targets each input element of a synapse reaches, whatever the weight values (the numba
    backend's definition): n_out for dense, in-bounds taps times the group's output channels
    for conv, 1 for diagonal."""
    op = net.op(name)
    src = net.inputs(name)[0]
    if isinstance(op, DiagonalSynapse):
        return np.ones(int(np.prod(net.info(src).shape)), dtype=np.int64)
    if isinstance(op, DenseSynapse):
        ones: Op = DenseSynapse(np.ones_like(op.weight))
    else:
        ones = ConvSynapse(np.ones_like(op.weight), op.stride, op.padding, op.dilation, op.groups)
    m = linear_matrix(ones, net.info(src).shape, net.info(name).shape)
    return np.diff(m.tocsc().indptr).astype(np.int64)


def node_stats(net: Network, counts: dict[str, np.ndarray], max_abs_v: dict[str, int],
               levels: np.ndarray, events: dict[str, np.ndarray] | None = None,
               mbe_spikes: dict[str, np.ndarray] | None = None) -> dict[str, NodeStats]:
    """Activity per node, with the numba backend's definitions: ``neurons`` / ``spikes`` of
    spiking nodes, ``max_abs_v`` of neurons (measured inside the Lava processes), ``acs`` of
    synapses fed by spikes (per presynaptic spike, the targets it reaches) and ``macs`` of
    synapses fed by the constant encoded current (per nonzero input value, once per sample); a
    SpikeMatMul (M, K) x (K, N) counts N ACs per spike of A and M per spike of B.
    Synapses fed by a time-varying current (e.g. a SumPool output) get no MAC count here:
    their per-step values never leave the Lava processes. ``events``: spikes of both signs per
    element of the ternary neuron nodes (their ``counts`` are signed), which the spikes and ACs
    count."""
    negative = {k: (e - counts[k]) // 2 for k, e in (events or {}).items()}  # events = pos + neg, counts = pos - neg
    counts = {**counts, **(events or {})}  # spikes per element, whatever their sign
    stats: dict[str, NodeStats] = {}
    const: dict[str, np.ndarray] = {}  # values of currents that are constant over time
    for name, op in net.nodes():
        ins = net.inputs(name)
        size = int(np.prod(net.info(name).shape))
        if isinstance(op, Encode):
            const[name] = levels
        elif isinstance(op, (Neuron, SpikeMaxPool)):
            stats[name] = NodeStats(neurons=size, spikes=int(counts[name].sum()), max_abs_v=int(max_abs_v.get(name, 0)),
                                    negative_spikes=int(negative[name].sum()) if name in negative else 0)
        elif isinstance(op, MBENeuron):
            spikes = int((mbe_spikes or {})[name].sum())  # each adds its step's output weight to its target: one AC
            stats[name] = NodeStats(neurons=size * op.bases, spikes=spikes, acs=spikes, max_abs_v=int(max_abs_v.get(name, 0)))
        elif isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)):
            src = ins[0]
            fan = _structural_fanout(net, name)
            if net.info(src).kind in (SPIKES, TERNARY):
                c = _spike_counts_of(net, src, counts)
                stats[name] = NodeStats(acs=int((c.reshape(c.shape[0], fan.size) * fan).sum()) if c is not None else 0)
            else:
                st = NodeStats()
                if src in const:
                    nz = const[src].reshape(const[src].shape[0], int(np.prod(const[src].shape[1:]))) != 0
                    st.macs = int((nz * fan).sum())
                    const[name] = _linear(op, const[src])
                stats[name] = st
        elif isinstance(op, SpikeMatMul):
            m, n = net.info(ins[0]).shape[-2], net.info(ins[1]).shape[-1]
            ca, cb = _spike_counts_of(net, ins[0], counts), _spike_counts_of(net, ins[1], counts)
            stats[name] = NodeStats(acs=int(n * ca.sum() + m * cb.sum()))
        elif isinstance(op, (Add, ReduceSum, Reshape, Transpose)) and ins and all(s in const for s in ins):
            const[name] = np.sum([const[s] for s in ins], axis=0) if isinstance(op, Add) else _linear(op, const[ins[0]])
    return stats


class LavaBackend:
    """Runs a network as Lava processes in the Lava environment (see :mod:`csdc.backends.lava.plan`
    for the mapping and the global-clock schedule). A batch runs as one pipelined Lava run:
    sample k enters at global step ``1 + k * period``, so one compiled process graph serves the
    whole batch. ``python`` names the Lava environment's interpreter (default: the environment
    :func:`csdc.backends.lava.env.require` finds); a missing or broken environment raises
    :class:`csdc.backends.lava.LavaUnavailableError` naming the fix."""

    name = "lava"

    def __init__(self, *, use_lava_synapses: bool = True, conv: str = "lava.Sparse", python: str | None = None,
                 timeout: float | None = None):
        self.use_lava_synapses = use_lava_synapses
        self.conv = conv
        self.python = python or lava_env.require().python
        self.timeout = timeout
        self.last_plan: Plan | None = None
        self.last_timing: dict[str, float] = {}

    def plan(self, net: Network, n_samples: int = 1, *, keep_trains: bool = False) -> Plan:
        """The deployment plan (processes, wiring, offsets, latency) for ``n_samples`` samples."""
        return make_plan(net, n_samples, keep_trains=keep_trains, use_lava_synapses=self.use_lava_synapses,
                         conv=self.conv)

    def latency(self, net: Network) -> int:
        """End-to-end latency of one sample in global time steps (deepest offset + T)."""
        return int(self.plan(net).meta["latency"])

    def run(self, net: Network, x: np.ndarray, *, keep_trains: bool = False) -> RunResult:
        t0 = time.perf_counter()
        x = np.asarray(x)
        if tuple(x.shape[1:]) != tuple(net.input_shape):
            raise DataError(f"input batch has sample shape {tuple(x.shape[1:])}, the network expects {net.input_shape}")
        levels = encode(net.op(net.input_name), x).astype(np.int64)
        plan = self.plan(net, levels.shape[0], keep_trains=keep_trains)
        self.last_plan = plan
        with tempfile.TemporaryDirectory(prefix="csdc-lava-") as tmp:
            bundle = export_bundle(net, Path(tmp) / "bundle", plan, with_hardware_report=False)
            np.savez(Path(tmp) / "input.npz", levels=levels)
            t1 = time.perf_counter()
            lava_env.run_bundle(self.python, bundle, [str(Path(tmp) / "input.npz"), "-o", str(Path(tmp) / "out.npz")]
                                + (["--trains"] if keep_trains else []), timeout=self.timeout)
            t2 = time.perf_counter()
            with np.load(Path(tmp) / "out.npz", allow_pickle=False) as z:
                out = {k: z[k] for k in z.files}
        readout = out["readout"].astype(np.int64)
        counts = {k[len("counts/"):]: v for k, v in out.items() if k.startswith("counts/")}
        trains = {k[len("trains/"):]: v for k, v in out.items() if k.startswith("trains/")}
        max_abs_v = {k[len("max_abs_v/"):]: int(v) for k, v in out.items() if k.startswith("max_abs_v/")}
        events = {k[len("events/"):]: v for k, v in out.items() if k.startswith("events/")}
        mbe_spikes = {k[len("mbe_spikes/"):]: v for k, v in out.items() if k.startswith("mbe_spikes/")}
        logits = readout_logits(net.op(net.output_name), readout)
        stats = node_stats(net, counts, max_abs_v, levels, events, mbe_spikes)
        self.last_timing = {"bundle": t1 - t0, "subprocess": t2 - t1, "build": float(out["seconds_build"]),
                            "run": float(out["seconds_run"]), "fetch": float(out["seconds_fetch"]),
                            "steps": float(out["steps"]), "latency_steps": float(plan.meta["latency"])}
        return RunResult(readout=readout, logits=logits, counts=counts, trains=trains if keep_trains else {}, stats=stats)


__all__ = ["LavaBackend", "node_stats"]
