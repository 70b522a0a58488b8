"""fold_constants: evaluate every node whose inputs are all constants, whatever its op.

Constants are initializers, ``Constant`` nodes, ``Shape`` of a tensor with a known shape (the
symbolic batch axis as 0: its value only feeds Reshape targets, where 0 means "copy this axis", and
the lowering takes every per-sample shape from shape inference, not from these values), and
everything computed from those. Values come from onnx's reference evaluator
(:class:`onnx.reference.ReferenceEvaluator`), one node at a time, so any standard op folds: a weight
quantizer written in the graph (``Abs -> ReduceMax -> Div``, then QDQ or ``Div -> Round -> Clip ->
Mul``) becomes constants before the frontend judges which ops are supported.

Integer provenance: quantized weights stay the model's integers with their scale
(:class:`csdc.compiler.qgraph.Dequantized` in ``graph.constants`` and ``(ints, scale, axis)`` in
``graph.qconstants``), never floats to be re-quantized:

- ``DequantizeLinear`` of integers gives ``ints - zero_point`` with its (per-tensor or per-axis) scale;
- ``Round`` of a constant gives integer levels with unit scale, ``Clip`` by integer bounds keeps them
  levels, and ``Mul`` of levels by a constant step that varies along at most one axis gives integers
  with that scale (a negative step is made positive by negating the integers: ``n s == (-n)(-s)``);
- ``Transpose``, ``Reshape``, ``Flatten``, ``Squeeze``, ``Unsqueeze``, ``Identity``, ``Dropout`` and a
  ``Cast`` to float32/float64 move the integers and carry the per-channel axis along (a reshape keeps
  the axis when it stays one axis of the same size at the same offset; otherwise the value is floats).

Nondeterministic ops (``Random*``, ``Bernoulli``, ``Multinomial``), ops with subgraphs and nodes of
other domains are never evaluated. A constant that no remaining node reads is dropped as soon as its
last reader is folded (initializers stay), so a large model's intermediate float weights are not all held at once.

Invariant established: every node left has at least one non-constant input (or is of those kinds),
and no ``Shape`` of a tensor with a known shape remains.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from csdc.compiler.qgraph import Dequantized, QGraph, QNode
from csdc.errors import UnsupportedModelError

NONDETERMINISTIC = {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Bernoulli", "Multinomial"}
# ops that only move (or keep) values: integer weights pass through them as integers
MOVES = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Dropout", "Cast"}
LEVEL_LIMIT = 2.0 ** 31  # Round of larger magnitudes is not a quantizer's levels


def _bcast(param: np.ndarray, x: np.ndarray, axis: int) -> np.ndarray:
    if param.ndim == 0 or param.size == 1:
        return param.reshape(())
    shape = [1] * x.ndim
    shape[axis % x.ndim] = param.size
    return param.reshape(shape)


def quantize_linear(x: np.ndarray, scale: np.ndarray, zp: np.ndarray | None, axis: int = 1) -> np.ndarray:
    """ONNX QuantizeLinear: saturate(round_half_even(x / scale) + zero_point), in float32."""
    dtype = zp.dtype if zp is not None else np.dtype(np.uint8)
    zpv = _bcast(zp.astype(np.int64), x, axis) if zp is not None else 0
    q = np.rint(x.astype(np.float32) / _bcast(scale.astype(np.float32), x, axis)).astype(np.int64) + zpv
    from csdc.compiler.passes.canonicalize_quant import int_range

    lo, hi = int_range(dtype)
    return np.clip(q, lo, hi).astype(dtype)


def dequantize_ints(x: np.ndarray, zp: np.ndarray | None, axis: int = 1) -> np.ndarray:
    """The integers of ONNX DequantizeLinear, ``x - zero_point`` (``x`` itself when there is no offset)."""
    if x.dtype.kind == "i" and (zp is None or not np.any(zp)):
        return x
    return x.astype(np.int64) - (_bcast(zp.astype(np.int64), x, axis) if zp is not None else 0)


def _attribute(key: str, value: object) -> onnx.AttributeProto:
    if isinstance(value, np.ndarray):
        return onnx.helper.make_attribute(key, numpy_helper.from_array(value))
    if isinstance(value, (list, tuple)) and not value:
        return onnx.helper.make_attribute(key, [], attr_type=onnx.AttributeProto.INTS)
    return onnx.helper.make_attribute(key, value)


def node_proto(node: QNode) -> onnx.NodeProto:
    """The ONNX node of a QNode (attributes converted back)."""
    proto = onnx.helper.make_node(node.op_type, list(node.inputs), list(node.outputs), name=node.name,
                                  domain=node.domain or None)
    proto.attribute.extend(_attribute(k, v) for k, v in node.attrs.items())
    return proto


def evaluate_node(node: QNode, values: list[np.ndarray | None], opset: int) -> list[np.ndarray]:
    """Outputs of ``node`` on constant inputs, by onnx's reference evaluator (``None``: an omitted input)."""
    from onnx.reference import ReferenceEvaluator

    names = [i if v is not None else "" for i, v in zip(node.inputs, values)]
    proto = node_proto(node.with_(inputs=tuple(names)))
    graph = onnx.helper.make_graph([proto], "fold", [onnx.helper.make_value_info(i, onnx.TypeProto()) for i in names if i],
                                   [onnx.helper.make_value_info(o, onnx.TypeProto()) for o in node.outputs if o])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    feeds = {i: v for i, v in zip(names, values) if i}
    return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]


def _shape_value(node: QNode, graph: QGraph) -> np.ndarray | None:
    """Value of a Shape node (batch axis as 0), or None when the shape is not known."""
    shp = graph.shapes.get(node.inputs[0]) if node.inputs else None
    if shp is None:
        return None
    full = np.array([0, *shp[1:]], dtype=np.int64)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    return full[start:end]


def _moved_axis(before: tuple[int, ...], after: tuple[int, ...], axis: int) -> int | None:
    """Axis of ``after`` that holds axis ``axis`` of ``before`` under a row-major reshape, or None."""
    prefix = int(np.prod(before[:axis], dtype=np.int64))
    for j in range(len(after)):
        if int(np.prod(after[:j], dtype=np.int64)) == prefix and after[j] == before[axis]:
            return j
    return None


def _integer_view(node: QNode, graph: QGraph, vals: list[np.ndarray | None]) -> tuple[np.ndarray, np.ndarray, int | None] | None:
    """``(ints, scale, axis)`` of ``node``'s output when it keeps its input's integers, else None."""
    op, a = node.op_type, node.attrs
    if op == "Mul" and len(node.inputs) == 2 and node.inputs[0] not in graph.qconstants:
        node, vals = node.with_(inputs=node.inputs[::-1]), vals[::-1]  # the levels first
    q = graph.qconstants.get(node.inputs[0]) if node.inputs else None
    if op == "DequantizeLinear":
        x = vals[0]
        if x.dtype.kind not in "iu" or "block_size" in a and a["block_size"]:
            return None
        axis = int(a.get("axis", 1))
        scale, zp = np.asarray(vals[1]), (np.asarray(vals[2]) if len(vals) > 2 and vals[2] is not None else None)
        for p in (scale, zp):
            if p is not None and p.size != 1 and (p.ndim != 1 or not -x.ndim <= axis < x.ndim or p.size != x.shape[axis]):
                return None  # not a per-axis form: the evaluator checks it (and names the node if it is wrong)
        return dequantize_ints(x, vals[2] if len(vals) > 2 else None, axis), vals[1], (axis % x.ndim) if x.ndim else None
    if op == "Round":
        x = np.asarray(vals[0], dtype=np.float64)
        if not np.all(np.abs(x) < LEVEL_LIMIT):
            return None
        return np.rint(x).astype(np.int64), np.ones(1), None
    if q is None:
        return None
    ints, scale, axis = q
    if op == "Clip" and scale.size == 1 and float(scale[0]) == 1.0:  # levels: integer bounds keep them levels
        bounds = []
        for k, name in ((1, "min"), (2, "max")):
            b = vals[k] if len(vals) > k else a.get(name)
            if b is not None and (np.size(b) != 1 or float(np.asarray(b).reshape(-1)[0]) != round(float(np.asarray(b).reshape(-1)[0]))):
                return None
            bounds.append(None if b is None else int(np.asarray(b).reshape(-1)[0]))
        lo, hi = bounds
        return np.clip(ints.astype(np.int64), lo, hi), scale, axis
    if op == "Mul" and scale.size == 1 and float(scale[0]) == 1.0 and len(node.inputs) == 2:
        step = np.asarray(vals[1], dtype=np.float64)  # levels times a constant step
        if step.ndim > ints.ndim or np.broadcast_shapes(ints.shape, step.shape) != ints.shape or np.any(step == 0) \
                or not np.all(np.isfinite(step)):
            return None
        shape = (1,) * (ints.ndim - step.ndim) + step.shape
        axes = [i for i, s in enumerate(shape) if s != 1]
        if len(axes) > 1:
            return None
        step = step.reshape(shape)
        return ints.astype(np.int64) * np.sign(step).astype(np.int64), np.abs(step).reshape(-1), (axes[0] if axes else None)
    if op not in MOVES or vals[0] is None:
        return None
    if op == "Cast":
        to = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(a["to"]))
        return (ints, scale, axis) if to in (np.float32, np.float64) else None
    if op == "Dropout" and len(vals) > 2 and vals[2] is not None and bool(np.asarray(vals[2]).reshape(-1)[0]):
        return None  # training mode
    if op in ("Identity", "Dropout"):
        return ints, scale, axis
    moved = evaluate_node(node.with_(outputs=node.outputs[:1]), [ints, *vals[1:]], graph.opset)[0]
    if axis is None:
        return moved, scale, None
    if op == "Transpose":
        perm = list(a.get("perm", range(ints.ndim)[::-1]))
        return moved, scale, perm.index(axis)
    new_axis = _moved_axis(ints.shape, moved.shape, axis)
    return (moved, scale, new_axis) if new_axis is not None else None


def _foldable(node: QNode) -> bool:
    return (node.domain in ("", "ai.onnx") and node.op_type not in NONDETERMINISTIC
            and not any(isinstance(v, onnx.GraphProto) or (isinstance(v, list) and v and isinstance(v[0], onnx.GraphProto))
                        for v in node.attrs.values()))


def fold_constants(graph: QGraph) -> QGraph:
    """Replace all-constant subgraphs by their values (see module docstring)."""
    graph = graph.with_nodes(graph.nodes)
    uses: dict[str, int] = {}
    for n in graph.nodes:
        for i in n.inputs:
            if i:
                uses[i] = uses.get(i, 0) + 1
    kept: list[QNode] = []
    folded: set[str] = set()
    for node in graph.nodes:
        data_inputs = [i for i in node.inputs if i]
        value: object = None
        if not _foldable(node):
            pass
        elif node.op_type == "Shape" and data_inputs and not graph.is_const(data_inputs[0]):
            shape = _shape_value(node, graph)
            if shape is not None:
                shape.flags.writeable = False
                graph.constants[node.outputs[0]] = value = shape
        elif all(graph.is_const(i) for i in data_inputs):
            value = _fold(node, graph)
        if value is None:
            kept.append(node)
            continue
        graph.provenance[node.name] = "constant (shape)" if node.op_type == "Shape" else "constant"
        folded.update(node.outputs)
        for i in (data_inputs if node.op_type != "Shape" or graph.is_const(data_inputs[0]) else ()):
            uses[i] -= 1  # free intermediate values that no remaining node reads
            if uses[i] == 0 and i in folded and i != graph.output:
                graph.constants.pop(i, None)
                graph.qconstants.pop(i, None)
    graph.nodes = kept
    return graph


def _fold(node: QNode, graph: QGraph) -> list[np.ndarray] | None:
    """Evaluate ``node`` (all inputs constant) into ``graph.constants``; returns its outputs."""
    vals = [np.asarray(graph.constants[i]) if i and not (isinstance(graph.constants[i], Dequantized) and node.op_type in MOVES)
            else (graph.constants[i].ints if i else None) for i in node.inputs]
    try:
        view = _integer_view(node, graph, vals) if node.outputs and len(node.outputs) >= 1 else None
        if view is not None:
            ints, scale, axis = view
            graph.add_dequantized(node.outputs[0], ints, scale, axis)
            return [graph.constants[node.outputs[0]]]
        if any(isinstance(graph.constants.get(i), Dequantized) for i in node.inputs if i):
            vals = [np.asarray(graph.constants[i]) if i else None for i in node.inputs]
        outs = evaluate_node(node, vals, graph.opset)
    except Exception as exc:  # the reference evaluator raises many types for inputs that do not fit the op
        raise UnsupportedModelError(graph.path, [(node.name, node.op_type, "a constant expression that cannot be evaluated "
                                                  f"({type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}); "
                                                  "check the shapes and types of its inputs")]) from None
    for name, v in zip(node.outputs, outs):
        if name:
            if v.dtype == object:
                raise UnsupportedModelError(graph.path, [(node.name, node.op_type, "string tensors are not supported")])
            v.flags.writeable = False
            graph.constants[name] = v
    return outs


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, idempotent  # noqa: E402

declare(fold_constants, ensures=[idempotent(fold_constants)])
