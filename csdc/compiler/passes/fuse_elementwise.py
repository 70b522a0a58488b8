"""fuse_elementwise: an elementwise nonlinear subgraph between quantizers becomes one ``Elementwise`` node
(the opt-in mode ``--nonlinear mbe``, docs/mbe.md).

A region is seeded by a ``Gelu`` or ``Erf`` node. Its input is the output of one quantizer (``Quant``),
reached backwards from the seed through ``Div`` / ``Mul`` / ``Add`` / ``Sub`` by constants. The region
is every node reachable forwards from that input whose op is elementwise (those four, by constants or
between region tensors, ``Erf``, ``Gelu``, ``Relu``, ``Tanh``, ``Sigmoid``, inner ``Quant`` nodes; every
constant a scalar) and whose data inputs all come from the input or the region: e.g. ``0.5 x (1 + Erf(x / sqrt 2))`` as
torch.onnx writes GELU before opset 20, with the quantizers onnxruntime's ``quantize_static`` puts
between its steps. The region must leave through exactly one tensor, the output of a ``Quant`` (the
quantizer reading the function's value). Since the input is one quantizer's level, the region is a
function of that level alone: it is replaced by one ``Elementwise`` node (the region's nodes in its
attributes, evaluated by :func:`evaluate` in float32 as onnxruntime does, quantizers rounding half to
even) followed by the final quantizer, which the lowering turns into an MBE population and a neuron.

Invariant established: no ``Gelu`` or ``Erf`` node that can be fused remains; each fused region is one
``Elementwise`` node whose ``attrs["nodes"]`` evaluate it.
"""

from __future__ import annotations

import math

import numpy as np

from csdc.compiler.qgraph import QGraph, QNode

SEEDS = ("Gelu", "Erf")
_ARITH = ("Div", "Mul", "Add", "Sub")
ELEMENTWISE = (*_ARITH, "Erf", "Gelu", "Relu", "Tanh", "Sigmoid", "Quant")


def _data_inputs(graph: QGraph, n: QNode) -> list[str]:
    return [i for i in n.inputs if i and not graph.is_const(i)]


def _region_input(graph: QGraph, seed: QNode, prod: dict[str, QNode]) -> str | None:
    """The quantizer output the seed reads through arithmetic by constants, or None."""
    t = _data_inputs(graph, seed)
    while len(t) == 1:
        p = prod.get(t[0])
        if p is None:
            return None
        if p.op_type == "Quant":
            return t[0]
        if p.op_type not in _ARITH or len(_data_inputs(graph, p)) != 1:
            return None
        t = _data_inputs(graph, p)
    return None


def _region(graph: QGraph, start: str, cons: dict[str, list[QNode]]) -> tuple[list[QNode], QNode] | None:
    """The nodes of the region read from ``start`` (in graph order) and its final quantizer, or None if it
    does not leave through exactly one quantizer's output."""
    inside: set[str] = set()
    values = {start}
    changed = True
    while changed:
        changed = False
        for n in graph.nodes:
            if n.name in inside or n.op_type not in ELEMENTWISE or n.domain:
                continue
            data = _data_inputs(graph, n)
            if data and all(d in values for d in data):
                inside.add(n.name)
                values.update(n.outputs)
                changed = True
    nodes = [n for n in graph.nodes if n.name in inside]
    leaving = [o for n in nodes for o in n.outputs
               if o == graph.output or any(c.name not in inside for c in cons.get(o, []))]
    if len(leaving) != 1:
        return None
    last = next(n for n in nodes if leaving[0] in n.outputs)
    if last.op_type != "Quant" or not any(n.op_type in SEEDS for n in nodes):
        return None
    return nodes, last


def fuse_elementwise(graph: QGraph) -> QGraph:
    """Replace each fusable region (see module docstring) by ``Elementwise -> Quant``."""
    prod = graph.producers()
    cons = graph.consumers()
    fused: dict[str, tuple[QNode, QNode]] = {}  # name of the region's first node -> (Elementwise, final Quant)
    dropped: set[str] = set()
    for seed in graph.nodes:
        if seed.op_type not in SEEDS or seed.name in dropped:
            continue
        start = _region_input(graph, seed, prod)
        found = _region(graph, start, cons) if start is not None else None
        if found is None:
            continue
        nodes, final = found
        inner = [n for n in nodes if n is not final]
        consts = {i: np.asarray(graph.constants[i]) for n in inner for i in n.inputs if i and graph.is_const(i)}
        if any(c.size != 1 for c in consts.values()):
            continue  # a per-channel constant: a different function per element, not one of the level
        label = "+".join(n.op_type for n in inner if n.op_type in SEEDS)
        node = QNode(f"{seed.name}", "Elementwise", (start,), (final.inputs[0],),
                     {"nodes": tuple(inner), "constants": consts, "function": label.lower(),
                      "sources": tuple(n.name for n in inner)})
        fused[inner[0].name] = (node, final)
        dropped.update(n.name for n in nodes)
    if not fused:
        return graph
    out = graph.with_nodes(graph.nodes)
    kept: list[QNode] = []
    for n in graph.nodes:
        if n.name in fused:
            node, final = fused[n.name]
            kept += [node, final]
            for src in node.attrs["sources"]:
                if src != node.name:
                    out.provenance[src] = f"part of the elementwise function '{node.name}' (MBE neurons)"
        elif n.name not in dropped:
            kept.append(n)
    return out.with_nodes(kept)


def _quant(x: np.ndarray, a: dict) -> np.ndarray:
    """A Quant node in float32 as onnxruntime computes it: round half to even, saturate, dequantize."""
    s = np.float32(a["scale"])
    q = np.clip(np.rint(x / s) + a["zero_point"], a["lo"], a["hi"])
    return ((q - a["zero_point"]) * s).astype(np.float32)


def evaluate(node: QNode, x: np.ndarray) -> np.ndarray:
    """The value of an ``Elementwise`` node at the inputs ``x`` (float32 arithmetic, float64 result)."""
    from scipy.special import erf

    vals = {node.inputs[0]: np.asarray(x, dtype=np.float32)}
    consts = node.attrs["constants"]

    def get(name: str) -> np.ndarray:
        v = vals[name] if name in vals else consts[name]
        return np.asarray(v, dtype=np.float32).reshape(-1)[0] if name in consts else v

    for n in node.attrs["nodes"]:
        ins = [get(i) for i in n.inputs if i]
        if n.op_type == "Div":
            y = ins[0] / ins[1]
        elif n.op_type == "Mul":
            y = ins[0] * ins[1]
        elif n.op_type == "Add":
            y = ins[0] + ins[1]
        elif n.op_type == "Sub":
            y = ins[0] - ins[1]
        elif n.op_type == "Erf":
            y = erf(ins[0].astype(np.float64))
        elif n.op_type == "Gelu":
            if n.attrs.get("approximate", "none") == "tanh":
                z = ins[0].astype(np.float64)
                y = 0.5 * z * (1 + np.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
            else:
                y = 0.5 * ins[0].astype(np.float64) * (1 + erf(ins[0].astype(np.float64) / math.sqrt(2)))
        elif n.op_type == "Relu":
            y = np.maximum(ins[0], 0)
        elif n.op_type == "Tanh":
            y = np.tanh(ins[0])
        elif n.op_type == "Sigmoid":
            y = 1 / (1 + np.exp(-ins[0].astype(np.float64)))
        else:  # Quant
            y = _quant(ins[0], n.attrs)
        vals[n.outputs[0]] = np.asarray(y, dtype=np.float32)
    return vals[node.outputs[0]].astype(np.float64)


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, idempotent  # noqa: E402

declare(fuse_elementwise, ensures=[idempotent(fuse_elementwise)])
