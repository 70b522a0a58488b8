"""Write a spiking network as a NIR graph (Neuromorphic Intermediate Representation, nir 1.0.x).

One converter per IR op (``CONVERTERS``) adds NIR nodes and edges and returns the NIR nodes
whose outputs, summed, are the op's value (NIR sums every edge into a node's input). An op
without a converter, or one a converter cannot express, raises :class:`CsdcError` naming it.

The encoding (docs/nir.md) is exact for the integer semantics of csdc's D = 0 networks when
a consumer evaluates the graph in discrete steps (dt = 1) and takes a recurrent edge's value
from the previous step, as nirtorch's graph executor does:

- csdc's IF neuron resets by subtraction (``v -= threshold``), NIR's ``IF`` resets to a
  value (the residual ``v - threshold`` would be lost). A population is exported as an
  integrator ``I`` (no reset), a ``Threshold`` and a ``Scale(-threshold)`` fed back into the
  integrator: subtraction one step later, as csdc does it. csdc fires at ``v >= threshold``
  from ``v = v0``; NIR fires at ``u > level`` from ``u = 0``: ``level = threshold - v0 - 1/2``
  (integer potentials, so this is the same comparison). The per-step bias goes into the
  bias of the synapse that feeds the population.
- The temporal-decomposition max-pool (output count = running max of the window's counts)
  is a recurrent subgraph: a depthwise one-hot ``Conv2d`` picks each window element, an
  integrator holds ``count(element) - count(output)``, and the output spikes when any
  element is ahead (two ``Threshold`` s and a 1x1 sum ``Conv2d``), fed back through ``-1``.
- The readout is an integrator: its output at step T is csdc's integer readout ``V``;
  ``logits = V * readout_scale + readout_offset`` (graph metadata).
- The input node takes the encoded integer levels ``clip(round(x / input_scale), lo, hi)``
  at each of the T steps (graph metadata); NIR has no quantizer node.

Parameters are float32 where every value is exactly a float32, otherwise float64.
"""

from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from csdc.errors import CsdcError
from csdc.ir.graph import Network
from csdc.ir.ops import (
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
    compact,
)

try:
    import nir
except ImportError as exc:  # optional dependency
    raise ImportError(f"NIR export needs the nir package: pip install csdc[nir] ({exc})") from None


class NirExportError(CsdcError):
    """A node of the network has no exact NIR equivalent."""


@dataclass
class _Context:
    """The NIR graph under construction and where each IR node's value lives in it."""

    net: Network
    nodes: dict[str, "nir.NIRNode"] = field(default_factory=dict)
    edges: list[tuple[str, str]] = field(default_factory=list)
    sources: dict[str, list[str]] = field(default_factory=dict)  # IR node -> NIR nodes whose sum is its value
    biased: dict[str, str] = field(default_factory=dict)  # NIR node -> IR neuron whose bias it carries
    taken: set[str] = field(default_factory=set)

    def name(self, ir_name: str, suffix: str = "") -> str:
        """A NIR node name (letters, digits, '_': safe for HDF5 groups and torch module names)."""
        base = re.sub(r"[^A-Za-z0-9_]", "_", ir_name) + (f"_{suffix}" if suffix else "")
        out, k = base, 1
        while out in self.taken:
            out, k = f"{base}_{k}", k + 1
        self.taken.add(out)
        return out

    def add(self, name: str, node: "nir.NIRNode", ir_name: str) -> str:
        node.metadata = {"csdc_node": ir_name}
        self.nodes[name] = node
        return name

    def connect(self, ir_input: str, target: str) -> None:
        for src in self.sources[ir_input]:
            self.edges.append((src, target))


Converter = Callable[[str, Op, _Context], list[str]]
CONVERTERS: dict[type[Op], Converter] = {}

# Ops with no NIR equivalent: what is missing, and what to do.
NOT_EXPRESSIBLE: dict[type[Op], str] = {
    SpikeMatMul: "NIR has no product of two spike tensors (attention's Q K^T, A V); only networks without "
                 "activation products (CNNs) can be exported",
    Transpose: "NIR has no axis permutation node",
    TernaryNeuron: "NIR's neurons emit binary spikes; a ternary population's -1 spikes (signed quantizers) have no "
                   "NIR equivalent",
    MBENeuron: "NIR has no neuron with per-step threshold, reset and output-weight tables (an MBE population, "
               "docs/mbe.md); only networks compiled without --nonlinear mbe can be exported",
    ReduceSum: "NIR has no sum over axes (a global average pool before a linear layer); use Flatten + Linear "
               "in the model instead",
}


def _converts(op_type: type[Op]) -> Callable[[Converter], Converter]:
    def register(fn: Converter) -> Converter:
        CONVERTERS[op_type] = fn
        return fn
    return register


def _refuse(name: str, op: Op, reason: str) -> NirExportError:
    return NirExportError(f"node '{name}' ({type(op).__name__}) cannot be expressed in NIR: {reason}")


def _real(arr: np.ndarray) -> np.ndarray:
    """Integer-valued (or half-integer) parameters as float32 when exact, else float64."""
    a64 = np.asarray(arr, dtype=np.float64)
    a32 = a64.astype(np.float32)
    return a32 if np.array_equal(a32.astype(np.float64), a64) else a64


def _ungrouped(weight: np.ndarray, groups: int) -> np.ndarray:
    """A grouped convolution weight (O, C/groups, kh, kw) as the equal dense weight (O, C, kh, kw):
    nir 1.0.8 infers a Conv2d's input channels as weight.shape[1], ignoring groups."""
    if groups == 1:
        return weight
    o, cg, kh, kw = weight.shape
    og = o // groups
    dense = np.zeros((o, cg * groups, kh, kw), dtype=weight.dtype)
    for g in range(groups):
        dense[g * og:(g + 1) * og, g * cg:(g + 1) * cg] = weight[g * og:(g + 1) * og]
    return dense


def _square(name: str, op: Op, kernel: tuple[int, int]) -> None:
    if kernel[0] != kernel[1]:
        raise _refuse(name, op, f"its kernel {tuple(kernel)} is not square; nir 1.0.8 infers a Conv2d's output size from "
                                "the kernel height alone, so readers reject the file")


def _symmetric(name: str, op: Op, padding: tuple[int, int, int, int]) -> tuple[int, int]:
    top, left, bottom, right = padding
    if (top, left) != (bottom, right):
        raise _refuse(name, op, f"padding (top, left, bottom, right) = {padding} is asymmetric; NIR pads both sides equally")
    return top, left


# -- converters, one per op --------------------------------------------------------------
@_converts(Encode)
def _encode(name: str, op: Encode, ctx: _Context) -> list[str]:
    return [ctx.add(ctx.name(name), nir.Input(input_type={"input": np.array(op.shape)}), name)]


@_converts(DenseSynapse)
def _dense(name: str, op: DenseSynapse, ctx: _Context) -> list[str]:
    shape = ctx.net.info(ctx.net.inputs(name)[0]).shape
    if len(shape) != 1:
        raise _refuse(name, op, f"its input has shape {shape}; NIR's Affine takes a vector (flatten first)")
    w = op.weight
    node = ctx.add(ctx.name(name), nir.Affine(weight=_real(w), bias=np.zeros(w.shape[0], dtype=np.float32)), name)
    ctx.connect(ctx.net.inputs(name)[0], node)
    return [node]


@_converts(ConvSynapse)
def _conv(name: str, op: ConvSynapse, ctx: _Context) -> list[str]:
    hw = ctx.net.info(ctx.net.inputs(name)[0]).shape[1:]
    _square(name, op, op.mantissa.shape[2:])
    node = ctx.add(ctx.name(name), nir.Conv2d(
        input_shape=tuple(hw), weight=_real(_ungrouped(op.weight, op.groups)), stride=op.stride,
        padding=_symmetric(name, op, op.padding), dilation=op.dilation, groups=1, bias=np.zeros(op.mantissa.shape[0], dtype=np.float32)), name)
    ctx.connect(ctx.net.inputs(name)[0], node)
    return [node]


@_converts(DiagonalSynapse)
def _diagonal(name: str, op: DiagonalSynapse, ctx: _Context) -> list[str]:
    node = ctx.add(ctx.name(name), nir.Scale(scale=_real(op.weight)), name)
    ctx.connect(ctx.net.inputs(name)[0], node)
    return [node]


@_converts(Add)
def _add(name: str, op: Add, ctx: _Context) -> list[str]:
    # NIR sums all edges into a node: the sum is made where the value is read
    return [src for i in ctx.net.inputs(name) for src in ctx.sources[i]]


@_converts(SumPool)
def _sum_pool(name: str, op: SumPool, ctx: _Context) -> list[str]:
    pad = _symmetric(name, op, op.padding)
    node = ctx.add(ctx.name(name), nir.SumPool2d(kernel_size=np.array(op.kernel), stride=np.array(op.stride),
                                                padding=np.array(pad)), name)
    ctx.connect(ctx.net.inputs(name)[0], node)
    return [node]


@_converts(Reshape)
def _reshape(name: str, op: Reshape, ctx: _Context) -> list[str]:
    src = ctx.net.inputs(name)[0]
    shape = ctx.net.info(src).shape
    if tuple(op.shape) == tuple(shape):
        return list(ctx.sources[src])
    if len(op.shape) != 1:
        raise _refuse(name, op, f"reshape {shape} -> {op.shape}: NIR has Flatten only (to a vector)")
    node = ctx.add(ctx.name(name), nir.Flatten(input_type={"input": np.array(shape)}, start_dim=0, end_dim=-1), name)
    ctx.connect(src, node)
    return [node]


def _fold_bias(name: str, op: Neuron, ctx: _Context) -> None:
    """Put the neuron's per-step bias into the bias of a synapse that feeds only this neuron."""
    bias = compact(op.bias)
    if not np.any(bias):
        return
    src = ctx.net.inputs(name)[0]
    candidates = [src] if not isinstance(ctx.net.op(src), Add) else ctx.net.inputs(src)
    for syn in candidates:
        nodes = ctx.sources.get(syn, [])
        feeds_only_this = ctx.net.consumers(src) == [name] and (syn == src or ctx.net.consumers(syn) == [src])
        if len(nodes) != 1 or not feeds_only_this or nodes[0] in ctx.biased:
            continue
        target = ctx.nodes[nodes[0]]
        if isinstance(target, nir.Affine):
            target.bias = _real(np.asarray(op.bias, dtype=np.int64))
        elif isinstance(target, nir.Conv2d):
            full = np.asarray(op.bias, dtype=np.int64)
            if np.any(full != full[:, :1, :1]):  # varies within a channel (signed quantizers at padded borders)
                raise _refuse(name, op, "its bias varies within a channel; NIR's Conv2d has one bias per channel")
            target.bias = _real(full[:, 0, 0])
        else:
            continue
        ctx.biased[nodes[0]] = name
        return
    raise _refuse(name, op, "its bias has no synapse (Affine or Conv2d feeding only this population) to go into")


@_converts(Neuron)
def _neuron(name: str, op: Neuron, ctx: _Context) -> list[str]:
    if op.delay > 0:
        raise _refuse(name, op, f"delay D = {op.delay} > 0: the delayed IF neuron integrates T steps before it may fire "
                                "all its spikes, which no NIR neuron does; compile with --delay 0 (plain IF neurons, "
                                "exported exactly)")
    _fold_bias(name, op, ctx)
    shape = op.threshold.shape
    theta = np.asarray(op.threshold, dtype=np.int64)
    v = ctx.add(ctx.name(name, "v"), nir.I(r=np.ones(shape, dtype=np.float32)), name)
    spikes = ctx.add(ctx.name(name), nir.Threshold(threshold=_real(theta - np.asarray(op.v0, dtype=np.int64) - 0.5)), name)
    reset = ctx.add(ctx.name(name, "reset"), nir.Scale(scale=_real(-theta)), name)
    ctx.connect(ctx.net.inputs(name)[0], v)
    ctx.edges += [(v, spikes), (spikes, reset), (reset, v)]
    return [spikes]


@_converts(SpikeMaxPool)
def _spike_max_pool(name: str, op: SpikeMaxPool, ctx: _Context) -> list[str]:
    src = ctx.net.inputs(name)[0]
    c, h, w = ctx.net.info(src).shape
    oh, ow = ctx.net.info(name).shape[1:]
    kh, kw = op.kernel
    _square(name, op, op.kernel)
    k = kh * kw
    # channel c*k + j picks window element j of channel c (depthwise convolutions written as dense
    # ones: nir 1.0.8's Conv2d type inference ignores groups)
    pick = np.zeros((c * k, c, kh, kw), dtype=np.float32)
    block = np.zeros((c * k, c, 1, 1), dtype=np.float32)
    for j in range(k):
        pick[np.arange(c) * k + j, np.arange(c), j // kw, j % kw] = 1.0
        block[np.arange(c) * k + j, np.arange(c), 0, 0] = 1.0
    elements = ctx.add(ctx.name(name, "elements"), nir.Conv2d(
        input_shape=(h, w), weight=pick, stride=op.stride, padding=_symmetric(name, op, op.padding), dilation=1,
        groups=1, bias=np.zeros(c * k, dtype=np.float32)), name)
    lead = ctx.add(ctx.name(name, "lead"), nir.I(r=np.ones((c * k, oh, ow), dtype=np.float32)), name)
    ahead = ctx.add(ctx.name(name, "ahead"), nir.Threshold(threshold=np.full((c * k, oh, ow), 0.5, dtype=np.float32)), name)
    anyahead = ctx.add(ctx.name(name, "any"), nir.Conv2d(
        input_shape=(oh, ow), weight=np.ascontiguousarray(block.transpose(1, 0, 2, 3)), stride=1, padding=0, dilation=1,
        groups=1, bias=np.zeros(c, dtype=np.float32)), name)
    spikes = ctx.add(ctx.name(name), nir.Threshold(threshold=np.full((c, oh, ow), 0.5, dtype=np.float32)), name)
    back = ctx.add(ctx.name(name, "feedback"), nir.Conv2d(
        input_shape=(oh, ow), weight=-block, stride=1, padding=0, dilation=1, groups=1,
        bias=np.zeros(c * k, dtype=np.float32)), name)
    ctx.connect(src, elements)
    ctx.edges += [(elements, lead), (lead, ahead), (ahead, anyahead), (anyahead, spikes), (spikes, back), (back, lead)]
    return [spikes]


@_converts(Readout)
def _readout(name: str, op: Readout, ctx: _Context) -> list[str]:
    n = op.scale.shape[0]
    total = ctx.add(ctx.name(name), nir.I(r=np.ones(n, dtype=np.float32)), name)
    out = ctx.add(ctx.name(name, "output"), nir.Output(output_type={"output": np.array([n])}), name)
    ctx.connect(ctx.net.inputs(name)[0], total)
    ctx.edges.append((total, out))
    return [total]


# -- graph ---------------------------------------------------------------------------------
def to_nir(net: Network) -> "nir.NIRGraph":
    """The NIR graph of ``net``; raises NirExportError naming the first node NIR cannot express."""
    net.verify()
    ctx = _Context(net)
    for name, op in net.nodes():
        convert = CONVERTERS.get(type(op))
        if convert is None:
            reason = NOT_EXPRESSIBLE.get(type(op), "NIR has no equivalent node")
            raise _refuse(name, op, reason)
        ctx.sources[name] = convert(name, op, ctx)
    for key, node in list(ctx.nodes.items()):  # an Affine without bias is a Linear
        if isinstance(node, nir.Affine) and key not in ctx.biased:
            ctx.nodes[key] = nir.Linear(weight=node.weight, metadata=node.metadata)
    enc: Encode = net.op(net.input_name)
    ro: Readout = net.op(net.output_name)
    metadata = {
        "producer": "csdc",
        "time_steps": np.int64(net.T),
        "input_scale": np.float64(enc.scale), "input_lo": np.int64(enc.lo), "input_hi": np.int64(enc.hi),
        "readout_scale": np.asarray(ro.scale, dtype=np.float64), "readout_offset": np.asarray(ro.offset, dtype=np.float64),
        "contract": "feed clip(round(x / input_scale), input_lo, input_hi) at each of time_steps steps (dt = 1, "
                    "recurrent edges read the previous step); logits = output at the last step * readout_scale "
                    "+ readout_offset",
    }
    return nir.NIRGraph(nodes=ctx.nodes, edges=ctx.edges, metadata=metadata)


def export_nir(net: Network, path: str | os.PathLike) -> "nir.NIRGraph":
    """Write ``net`` as a NIR (HDF5) file, atomically; returns the graph written."""
    from csdc.ir.serialize import write_atomic

    if os.path.isdir(path):
        raise CsdcError(f"-o {os.fspath(path)} is a folder; give the .nir file to write")
    graph = to_nir(net)
    buf = io.BytesIO()
    nir.write(buf, graph)
    write_atomic(path, buf.getvalue())
    return graph
