"""The Lava backend: run a spiking IR network as Lava processes under
``Loihi2SimCfg(select_tag="fixed_pt")``, spike-for-spike identical to ``run_steps``."""

from __future__ import annotations

import time

import numpy as np

from csdc.backends.base import NodeStats, RunResult
from csdc.backends.lava import builder
from csdc.backends.lava.plan import Plan, linear_matrix, make_plan
from csdc.ir.graph import Network
from csdc.ir.ops import SPIKES, ConvSynapse, DenseSynapse, DiagonalSynapse, Neuron, Reshape, SpikeMaxPool, SumPool, Transpose
from csdc.ir.semantics import encode, readout_logits


def build_process_graph(net: Network, x: np.ndarray | None = None, *, n_samples: int | None = None,
                        keep_trains: bool = False, use_lava_synapses: bool = True) -> builder.LavaGraph:
    """The Lava process graph of ``net`` for embedding in a Lava application.

    Returns a :class:`csdc.backends.lava.builder.LavaGraph` with ``source`` (the
    ``CsdcEncode`` input process), ``processes`` (every Lava process by name: Lava's own
    ``Dense`` / ``Sparse`` / ``Conv`` and csdc's custom ones) and ``sink`` (the
    ``CsdcReadout``). ``x`` (n, *input_shape) float data is encoded into the source; without it
    the source holds ``n_samples`` all-zero inputs, to be replaced with
    ``graph.source.levels.set(levels)`` before running. Run it with
    ``graph.sink.run(condition=RunSteps(num_steps=graph.total_steps), run_cfg=builder.run_config(graph))``
    and read ``graph.sink.readout.get()``, or call :func:`csdc.backends.lava.builder.run_graph`.
    """
    if x is not None:
        levels = encode(net.op(net.input_name), np.asarray(x))
    else:
        levels = np.zeros((int(n_samples or 1), *net.input_shape), dtype=np.int64)
    plan = make_plan(net, levels.shape[0], keep_trains=keep_trains, use_lava_synapses=use_lava_synapses)
    return builder.build_graph(plan.to_json(), plan.arrays, levels, keep_trains=keep_trains)


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


def node_stats(net: Network, counts: dict[str, np.ndarray], max_abs_v: dict[str, int], levels: np.ndarray) -> dict[str, NodeStats]:
    """Activity per node from spike counts: spikes of spiking nodes, ACs of synapses driven by
    spikes (one per presynaptic spike per non-zero fan-out weight) and MACs of synapses driven
    by currents (one per non-zero input element per non-zero fan-out weight per step)."""
    stats: dict[str, NodeStats] = {}
    T = net.T
    for name, op in net.nodes():
        size = int(np.prod(net.info(name).shape))
        if isinstance(op, (Neuron, SpikeMaxPool)):
            stats[name] = NodeStats(neurons=size, spikes=int(counts[name].sum()), max_abs_v=int(max_abs_v.get(name, 0)))
        elif isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse, SumPool)):
            src = net.inputs(name)[0]
            m = linear_matrix(op, net.info(src).shape, net.info(name).shape)
            fanout = np.diff(m.tocsc().indptr)
            if net.info(src).kind == SPIKES:
                c = _spike_counts_of(net, src, counts)
                acs = int((c.reshape(c.shape[0], -1) * fanout).sum()) if c is not None else 0
                stats[name] = NodeStats(neurons=size, acs=acs)
            elif src == net.input_name:
                nz = (levels.reshape(levels.shape[0], -1) != 0)
                stats[name] = NodeStats(neurons=size, macs=int(T * (nz * fanout).sum()))
    return stats


class LavaBackend:
    """Runs a network as Lava processes (see :mod:`csdc.backends.lava.plan` for the mapping and
    the global-clock schedule). A batch runs as one pipelined Lava run: sample k enters at global
    step ``1 + k * period``, so one compiled process graph serves the whole batch."""

    name = "lava"

    def __init__(self, *, use_lava_synapses: bool = True):
        self.use_lava_synapses = use_lava_synapses
        self.last_plan: Plan | None = None
        self.last_timing: dict[str, float] = {}

    def plan(self, net: Network, n_samples: int = 1, *, keep_trains: bool = False) -> Plan:
        """The deployment plan (processes, wiring, offsets, latency) for ``n_samples`` samples."""
        return make_plan(net, n_samples, keep_trains=keep_trains, use_lava_synapses=self.use_lava_synapses)

    def latency(self, net: Network) -> int:
        """End-to-end latency of one sample in global time steps (deepest offset + T)."""
        return int(self.plan(net).meta["latency"])

    def run(self, net: Network, x: np.ndarray, *, keep_trains: bool = False) -> RunResult:
        t0 = time.perf_counter()
        x = np.asarray(x)
        if tuple(x.shape[1:]) != tuple(net.input_shape):
            from csdc.errors import DataError
            raise DataError(f"input batch has sample shape {tuple(x.shape[1:])}, the network expects {net.input_shape}")
        levels = encode(net.op(net.input_name), x)
        plan = self.plan(net, levels.shape[0], keep_trains=keep_trains)
        self.last_plan = plan
        graph = builder.build_graph(plan.to_json(), plan.arrays, levels, keep_trains=keep_trains)
        t1 = time.perf_counter()
        out = builder.run_graph(graph)
        readout = out.readout
        logits = readout_logits(net.op(net.output_name), readout)
        stats = node_stats(net, out.counts, out.max_abs_v, levels)
        self.last_timing = {"build": t1 - t0, "run": out.seconds_run, "fetch": out.seconds_fetch,
                            "steps": float(out.steps), "latency_steps": float(plan.meta["latency"])}
        return RunResult(readout=readout, logits=logits, counts=out.counts,
                         trains=out.trains if keep_trains else {}, stats=stats)


__all__ = ["LavaBackend", "build_process_graph", "node_stats"]
