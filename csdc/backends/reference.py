"""The count-domain reference as a backend (SPEC section 3): exact for delay >= T, no time loop."""

from __future__ import annotations

import numpy as np

from csdc.backends.base import NodeStats, RunResult
from csdc.ir.graph import Network
from csdc.ir.semantics import run_counts, run_steps


class ReferenceBackend:
    """Count-domain interpreter; with ``keep_trains`` it runs the time-stepped semantics instead."""

    name = "reference"
    measures = ("spikes",)  # no synaptic events or membrane potentials: the run report says "not measured"

    def run(self, net: Network, x: np.ndarray, *, keep_trains: bool = False) -> RunResult:
        res = run_steps(net, x) if keep_trains else run_counts(net, x)
        stats = {}
        for name, counts in res.counts.items():
            # spikes of either sign: from the trains, or (D >= T: one sign per neuron and window) |count|
            signed = res.trains.get(name, counts)
            st = NodeStats(neurons=int(np.prod(net.info(name).shape)), spikes=int(np.abs(signed).sum()),
                           negative_spikes=int(np.maximum(-signed, 0).sum()))
            stats[name] = st
        for name, spikes in res.mbe_spikes.items():  # one neuron per element and basis
            stats[name] = NodeStats(neurons=int(np.prod(net.info(name).shape)) * net.op(name).bases,
                                    spikes=int(spikes.sum()))
        return RunResult(readout=res.readout, logits=res.logits, counts=res.counts, trains=res.trains, stats=stats)


__all__ = ["ReferenceBackend"]
