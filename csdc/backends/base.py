"""What every backend returns, and the registry that maps a backend name to its runner."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from csdc.errors import CsdcError
from csdc.ir.graph import Network
from csdc.ir.semantics import Result


@dataclass
class NodeStats:
    """Activity of one IR node over a batch (sums over samples)."""

    neurons: int = 0  # output elements of a spiking node
    spikes: int = 0  # spikes emitted (Neuron, SpikeMaxPool), of both signs for a TernaryNeuron
    negative_spikes: int = 0  # the -1 spikes among them (TernaryNeuron)
    acs: int = 0  # accumulates: one per presynaptic spike per fan-out target
    macs: int = 0  # multiply-accumulates: synaptic work driven by the encoded (non-spike) input
    max_abs_v: int = 0  # largest |membrane potential| seen (Neuron)

    def merge(self, other: "NodeStats") -> None:
        self.neurons = max(self.neurons, other.neurons)
        self.spikes += other.spikes
        self.negative_spikes += other.negative_spikes
        self.acs += other.acs
        self.macs += other.macs
        self.max_abs_v = max(self.max_abs_v, other.max_abs_v)


@dataclass
class RunResult(Result):
    """A :class:`csdc.ir.semantics.Result` plus per-node activity statistics."""

    stats: dict[str, NodeStats] = field(default_factory=dict)


class Backend(Protocol):
    name: str

    def run(self, net: Network, x: np.ndarray, *, keep_trains: bool = False) -> RunResult:
        """Run a batch ``x`` (batch, *input_shape) float32; counts are always returned for
        Neuron and SpikeMaxPool nodes, spike trains (batch, T, *shape) only with keep_trains.
        Trains are 0/1 integer arrays whose dtype depends on the backend (numba: uint8)."""
        ...


BACKENDS = {
    "reference": "csdc.backends.reference:ReferenceBackend",
    "numba": "csdc.backends.numba:NumbaBackend",
    "lava": "csdc.backends.lava:LavaBackend",
}


def get_backend(name: str) -> Backend:
    """Instantiate a backend by name; unknown names and missing optional packages raise CsdcError."""
    if name not in BACKENDS:
        raise CsdcError(f"unknown backend '{name}'; choose one of {', '.join(BACKENDS)}")
    module, cls = BACKENDS[name].split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        raise CsdcError(f"backend '{name}' is not available: {exc}") from None
    return getattr(mod, cls)()
