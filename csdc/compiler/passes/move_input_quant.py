"""move_input_quant: ``input -> routing... -> quantizer`` becomes ``input -> quantizer -> routing...``.

Exporters often reshape the model input before its first quantizer: ``nn.Flatten()`` before the first
``nn.Linear`` (onnxruntime's ``quantize_static`` then puts the input's QuantizeLinear after the Flatten;
a Brevitas ``QuantLinear``'s input quantizer sits there too), or a Transpose / Reshape / Squeeze /
Unsqueeze of the image. Routing only moves values, and quantization acts element by element, so
``q(route(x)) == route(q(x))`` exactly: the input's encoder reads the model input itself and the
routing acts on its levels (IR ``Reshape`` / ``Transpose``).

- Match: a chain of routing ops (Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Identity) from the
  model input whose last output feeds a quantizer: csdc's ``Quant`` (QONNX and LSQ arithmetic forms,
  already canonical) or ``QuantizeLinear -> [Clip] -> DequantizeLinear``.
- Check: every link is read by the next one only (another reader would see unquantized values), the
  routing's shape / axes operands are constants, and the quantizer is one chain. A per-tensor
  quantizer always moves. A per-axis one moves when the chain keeps its axis whole: some axis of the
  model input along which every element's index is its index along the quantizer's axis (found by
  routing the input's element positions through the chain); its ``axis`` is remapped to that one.
  Else it is refused (``UnsupportedModelError`` naming the routing node nearest the quantizer that
  loses the axis, its op and the tensor).
- Rewrite: the quantizer's nodes read the model input (their tensors take its shape); the routing
  chain reads the quantizer's output, and its last op writes the tensor the quantizer wrote.

Invariant established: no chain of routing ops from the model input ends in a quantizer that could
read the model input instead. :func:`unmoved_reason` tells the lowering why a chain was left alone.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from csdc.compiler.qgraph import QGraph, QNode
from csdc.errors import UnsupportedModelError

ROUTING = ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity")


def _quantizer(node: QNode, cons: dict[str, list[QNode]]) -> tuple[list[QNode] | None, str | None]:
    """The nodes of the quantizer that starts at ``node`` (first to last), or None and why not."""
    if node.domain:
        return None, f"it leads to '{node.name}' (op {node.domain}.{node.op_type}), not to a quantizer"
    if node.op_type == "Quant":
        return [node], None
    if node.op_type != "QuantizeLinear":
        return None, f"it leads to '{node.name}' (op {node.op_type}), not to a quantizer"
    group = [node]
    while group[-1].op_type != "DequantizeLinear":
        users = cons.get(group[-1].outputs[0], [])
        nxt = users[0] if len(users) == 1 else None
        allowed = ("Clip", "DequantizeLinear") if len(group) == 1 else ("DequantizeLinear",)
        if nxt is None or nxt.domain or nxt.op_type not in allowed:
            return None, (f"its QuantizeLinear '{node.name}' is not a QuantizeLinear -> [Clip] -> DequantizeLinear chain "
                          "with one reader per link")
        group.append(nxt)
    return group, None


def _chain(graph: QGraph, first: QNode, cons: dict[str, list[QNode]]
           ) -> tuple[list[QNode], list[QNode] | None, str | None]:
    """From the routing op ``first`` (reading the model input): the routing chain, the quantizer it
    reaches (None if it cannot move) and the reason it cannot."""
    chain: list[QNode] = []
    node = first
    while True:
        extra = [i for i in node.inputs[1:] if i and not graph.is_const(i)]
        if extra:
            return chain + [node], None, (f"{node.op_type} '{node.name}' takes its operand '{extra[0]}' from the graph, "
                                          "not a constant")
        chain.append(node)
        out = node.outputs[0]
        users = cons.get(out, [])
        if out == graph.output:
            return chain, None, f"its output '{out}' is the model output"
        if len(users) != 1:
            names = ", ".join(f"'{u.name}' ({u.op_type})" for u in users)
            return chain, None, (f"'{out}' (output of {node.op_type} '{node.name}') is read by {len(users)} nodes ({names}); "
                                 "a quantizer can move onto the model input only through routing read by nothing else")
        node = users[0]
        if node.op_type not in ROUTING or node.domain:
            group, why = _quantizer(node, cons)
            return chain, group, why


def unmoved_reason(graph: QGraph, node: QNode) -> str | None:
    """Why the quantizer after the routing op ``node`` (a reader of the model input) does not read the
    model input itself; None if ``node`` is not routing or nothing stands in the way."""
    if node.op_type not in ROUTING or node.domain:
        return None
    return _chain(graph, node, graph.consumers())[2]


def _routed_positions(graph: QGraph, chain: list[QNode]) -> np.ndarray | None:
    """For every element of one sample of the chain's output (in its layout), the flat position in the model input's
    sample it comes from: the routing applied to the positions themselves (every tensor's shape is known, so a
    reshape-like op is a reshape to its output's sample shape, as the lowering makes it). None if a Transpose moves the
    batch axis (which the lowering refuses)."""
    pos = np.arange(math.prod(graph.sample_shape(graph.input)), dtype=np.int64).reshape(graph.sample_shape(graph.input))
    for r in chain:
        if r.op_type == "Transpose":
            perm = list(r.attrs.get("perm", range(pos.ndim + 1)[::-1]))
            if perm[0] != 0:
                return None
            pos = np.transpose(pos, [p - 1 for p in perm[1:]])
        else:
            pos = pos.reshape(graph.sample_shape(r.outputs[0]))
    return pos


def _input_axis_of(graph: QGraph, chain: list[QNode], axis: int) -> int | None:
    """The axis of the model input along which the chain's output ``axis`` (not the batch axis) runs whole: every
    element's index along ``axis`` equals its source's index along that input axis; None if the routing merges or
    splits it."""
    pos = _routed_positions(graph, chain)
    if pos is None or axis == 0:
        return None
    a = axis - 1  # in the sample
    shape = graph.sample_shape(graph.input)
    index = np.broadcast_to(np.arange(pos.shape[a]).reshape([-1 if d == a else 1 for d in range(pos.ndim)]), pos.shape)
    for b, n in enumerate(shape):
        if n == pos.shape[a] and np.array_equal((pos // math.prod(shape[b + 1:])) % n, index):
            return b + 1
    return None


def _input_axis(graph: QGraph, chain: list[QNode], q: QNode) -> int | None:
    """For a per-axis QuantizeLinear ``q`` after ``chain``: its axis on the model input (None: per tensor).
    Raises, naming the routing op nearest the quantizer that loses the axis, when the chain merges or splits it."""
    scale = np.asarray(graph.constants[q.inputs[1]]) if graph.is_const(q.inputs[1]) else np.ones(1)
    if scale.size == 1:
        return None
    rank = len(graph.shapes[q.inputs[0]])
    axis = int(q.attrs.get("axis", 1))
    axis = axis + rank if axis < 0 else axis
    if q.attrs.get("block_size", 0) or scale.ndim != 1:
        raise UnsupportedModelError(graph.path, [(q.name, q.op_type, f"a blocked quantizer of '{q.inputs[0]}' after routing of "
                                                  "the model input cannot be moved onto the model input")])
    found = _input_axis_of(graph, chain, axis)
    if found is not None:
        return found
    culprit = next(r for k, r in reversed(list(enumerate(chain)))
                   if _input_axis_of(replace(graph, input=r.inputs[0]), chain[k:], axis) is None)
    raise UnsupportedModelError(graph.path, [(culprit.name, culprit.op_type, (
        f"merges or splits the axis of '{culprit.outputs[0]}' (shape {graph.shapes.get(culprit.outputs[0])}) that "
        f"'{q.name}' (QuantizeLinear) quantizes per axis (axis {axis} of '{q.inputs[0]}'); the input quantizer cannot be "
        f"moved onto the model input '{graph.input}' in front of it: quantize the model input per tensor, or before the "
        f"{culprit.op_type}"))])


def move_input_quant(graph: QGraph) -> QGraph:
    """Move the model input's quantizer in front of the routing that reads the input (see module docstring)."""
    cons = graph.consumers()
    moves: dict[str, tuple[list[QNode], list[QNode]]] = {}  # first routing op's name -> (chain, new quantizer nodes)
    moved: set[str] = set()
    shapes: dict[str, tuple[int, ...]] = {}
    for first in cons.get(graph.input, []):
        if first.op_type not in ROUTING or first.domain or first.inputs[0] != graph.input:
            continue
        chain, group, _ = _chain(graph, first, cons)
        if group is None or group[0].inputs[0] != chain[-1].outputs[0]:
            continue
        axis = _input_axis(graph, chain, group[0]) if group[0].op_type == "QuantizeLinear" else None
        out = group[-1].outputs[0]
        rename = {n.outputs[0]: f"{n.outputs[0]}__on_input" for n in group}
        new_group = []
        for n in group:
            ins = (graph.input if n is group[0] else rename[n.inputs[0]], *n.inputs[1:])
            attrs = {**n.attrs, "axis": axis} if axis is not None and n.op_type != "Clip" else n.attrs
            new_group.append(n.with_(inputs=ins, outputs=(rename[n.outputs[0]],), attrs=attrs))
            shapes[rename[n.outputs[0]]] = graph.shapes[graph.input]
        routed = [r.with_(inputs=(rename[out] if r is chain[0] else r.inputs[0], *r.inputs[1:]),
                          outputs=(out,) if r is chain[-1] else r.outputs) for r in chain]
        moves[first.name] = (routed, new_group)
        moved.update(n.name for n in chain + group)
    if not moves:
        return graph
    nodes: list[QNode] = []
    for n in graph.nodes:
        if n.name in moves:
            routed, new_group = moves[n.name]
            nodes.extend(new_group + routed)
        elif n.name not in moved:
            nodes.append(n)
    new = graph.with_nodes(nodes)
    new.shapes.update(shapes)  # the last routing op now writes the quantizer's output, whose shape is already known
    return new


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, idempotent, no_foreign_domains, shapes_known  # noqa: E402

declare(move_input_quant, requires=[no_foreign_domains], ensures=[idempotent(move_input_quant), shapes_known])
