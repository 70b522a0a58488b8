"""fold_constants: evaluate every node whose inputs are all constants.

``Shape`` of a tensor with an inferred shape is a constant too, with the (symbolic) batch axis as 0;
its value only feeds Reshape targets (``x.flatten(2)`` under a dynamic batch axis exports as
``Shape -> Slice -> Concat -> Reshape``), where 0 means "copy this axis", and the lowering takes
every per-sample shape from shape inference, not from these values. ``Slice``, ``Concat`` and
``Gather`` of constants are evaluated.

Invariant established: no node has only constant inputs, and no Shape node remains where the shape is known; the outputs of such nodes are in
``graph.constants``. A constant produced by ``DequantizeLinear`` also keeps its integer view
(``graph.qconstants[name] = (ints - zero_point, scale, axis)``) so that quantized weights stay
integers instead of being re-quantized; its float value is not computed unless a pass reads it
(:class:`csdc.compiler.qgraph.Dequantized`).
"""

from __future__ import annotations

import numpy as np

from csdc.compiler.qgraph import Dequantized, QGraph, QNode
from csdc.errors import UnsupportedModelError


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


def _constant_node_value(node: QNode) -> np.ndarray:
    a = node.attrs
    if "value" in a:
        return np.asarray(a["value"])
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64), ("value_ints", np.int64)):
        if key in a:
            return np.asarray(a[key], dtype=dt)
    raise UnsupportedModelError("<model>", [(node.name, "Constant", "unsupported Constant attribute")])


def _evaluate(node: QNode, vals: list[np.ndarray | None], graph: QGraph) -> np.ndarray | None:
    op, a = node.op_type, node.attrs
    x = vals[0] if vals else None
    if op in ("Identity", "Dropout"):
        return x
    if op == "Cast":
        import onnx.helper
        return x.astype(onnx.helper.tensor_dtype_to_np_dtype(a["to"]))
    if op == "QuantizeLinear":
        return quantize_linear(x, vals[1], vals[2] if len(vals) > 2 else None, a.get("axis", 1))
    if op == "DequantizeLinear":
        axis = a.get("axis", 1)
        ints = dequantize_ints(x, vals[2] if len(vals) > 2 else None, axis)
        graph.add_dequantized(node.outputs[0], ints, vals[1], (axis % x.ndim) if x.ndim else None)
        return graph.constants[node.outputs[0]]
    if op == "Clip":
        lo = vals[1] if len(vals) > 1 and vals[1] is not None else a.get("min")
        hi = vals[2] if len(vals) > 2 and vals[2] is not None else a.get("max")
        out = x
        if lo is not None:
            out = np.maximum(out, np.asarray(lo).astype(x.dtype))
        if hi is not None:
            out = np.minimum(out, np.asarray(hi).astype(x.dtype))
        return out
    if op == "Transpose":
        return np.transpose(x, a.get("perm"))
    if op == "Reshape":
        shape = [int(s) for s in vals[1]]
        shape = [x.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return x.reshape(shape)
    if op == "Flatten":
        ax = a.get("axis", 1)
        return x.reshape(int(np.prod(x.shape[:ax])), -1)
    if op in ("Squeeze", "Unsqueeze"):
        axes = a.get("axes") if "axes" in a else (list(vals[1]) if len(vals) > 1 and vals[1] is not None else None)
        if op == "Squeeze":
            return np.squeeze(x, axis=tuple(axes) if axes is not None else None)
        out = x
        for ax in sorted(int(v) % (x.ndim + len(axes)) for v in axes):
            out = np.expand_dims(out, ax)
        return out
    if op in ("Add", "Mul", "Div"):
        y = vals[1]
        res = {"Add": np.add, "Mul": np.multiply, "Div": np.divide}[op](x, y)
        return res.astype(np.result_type(x.dtype, y.dtype)) if op != "Div" or x.dtype.kind == "f" else (x // y)
    if op == "Relu":
        return np.maximum(x, 0)
    if op == "Concat":
        return np.concatenate([np.asarray(v) for v in vals], axis=int(a.get("axis", 0)))
    if op == "Gather":
        return np.take(x, np.asarray(vals[1]).astype(np.int64), axis=int(a.get("axis", 0)))
    if op == "Slice":
        starts, ends = np.asarray(vals[1]).astype(np.int64), np.asarray(vals[2]).astype(np.int64)
        axes = np.asarray(vals[3]).astype(np.int64) if len(vals) > 3 and vals[3] is not None else np.arange(len(starts))
        steps = np.asarray(vals[4]).astype(np.int64) if len(vals) > 4 and vals[4] is not None else np.ones(len(starts), np.int64)
        sl = [slice(None)] * x.ndim
        for st, en, ax, sp in zip(starts, ends, axes, steps):
            big = np.iinfo(np.int64).max // 2
            sl[int(ax)] = slice(int(np.clip(st, -big, big)), int(np.clip(en, -big, big)), int(sp))
        return x[tuple(sl)]
    return None


def _shape_value(node: QNode, graph: QGraph) -> np.ndarray | None:
    """Value of a Shape node (batch axis as 0), or None when the shape is not known."""
    shp = graph.shapes.get(node.inputs[0])
    if shp is None:
        return None
    full = np.array([0, *shp[1:]], dtype=np.int64)
    start, end = node.attrs.get("start", 0), node.attrs.get("end", None)
    return full[start:end]


def fold_constants(graph: QGraph) -> QGraph:
    """Replace all-constant subgraphs by their values (see module docstring)."""
    graph = graph.with_nodes(graph.nodes)
    kept: list[QNode] = []
    for node in graph.nodes:
        if node.op_type == "Constant":
            graph.constants[node.outputs[0]] = _constant_node_value(node)
            graph.provenance[node.name] = "constant"
            continue
        if node.op_type == "Shape":
            value = _shape_value(node, graph)
            if value is not None:
                graph.constants[node.outputs[0]] = value
                graph.provenance[node.name] = "constant (shape)"
                continue
        data_inputs = [i for i in node.inputs if i]
        if data_inputs and all(graph.is_const(i) for i in data_inputs):
            vals = [np.asarray(graph.constants[i]) if i else None for i in node.inputs]
            value = _evaluate(node, vals, graph)
            if value is not None:
                graph.constants[node.outputs[0]] = value if isinstance(value, Dequantized) else np.asarray(value)
                graph.provenance[node.name] = "constant"
                continue
        kept.append(node)
    graph.nodes = kept
    return graph
