"""The spiking IR: ops, the network graph, reference semantics and the .sir format."""

from csdc.ir.graph import Network, TensorInfo
from csdc.ir.ops import (
    CURRENT,
    OP_REGISTRY,
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
    Readout,
    ReduceSum,
    Reshape,
    SpikeMatMul,
    SpikeMaxPool,
    SumPool,
    TernaryNeuron,
    Transpose,
)

__all__ = [
    "CURRENT", "OP_REGISTRY", "SPIKES", "Add", "ConvSynapse", "DenseSynapse", "DiagonalSynapse",
    "Encode", "MBENeuron", "Network", "Neuron", "Op", "Readout", "ReduceSum", "Reshape", "SpikeMatMul", "SpikeMaxPool", "SumPool",
    "TERNARY", "TensorInfo", "TernaryNeuron", "Transpose",
]
