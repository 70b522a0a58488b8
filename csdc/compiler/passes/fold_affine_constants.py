"""fold_affine_constants: ``Add``, ``Sub``-free ``Mul`` and ``Div`` by a constant after a Linear fold into it.

``c * (w_scale * Wx + bias) = (c w_scale) Wx + c bias`` and ``y + c`` adds ``c`` to the bias,
for a constant ``c`` that is a scalar or varies only along the Linear's output channel axis.
Condition: the Linear's output feeds only that node. Applied until nothing changes, so a
bias Add after MatMul (a common torch export) and a constant rescale both fold.

Invariant established: no Add/Mul/Div by a per-channel constant directly follows a Linear
with a single consumer.
"""

from __future__ import annotations

import numpy as np

from csdc.compiler.passes.fold_batchnorm import linear_channel_axis
from csdc.compiler.qgraph import QGraph, QNode


def _per_channel(const: np.ndarray, out_rank: int, axis: int, n: int) -> np.ndarray | None:
    c = np.asarray(const, dtype=np.float64)
    if c.size == 1:
        return np.full(n, float(c.reshape(-1)[0]))
    if c.ndim > out_rank:
        return None
    shape = (1,) * (out_rank - c.ndim) + c.shape
    if any(s != 1 for i, s in enumerate(shape) if i != axis) or shape[axis] != n:
        return None
    return c.reshape(-1).copy()


def fold_affine_constants(graph: QGraph) -> QGraph:
    """Fold constant Add/Mul/Div after Linear nodes (see module docstring)."""
    graph = graph.with_nodes(graph.nodes)
    changed = True
    while changed:
        changed = False
        prod, cons = graph.producers(), graph.consumers()
        for n in graph.nodes:
            if n.op_type not in ("Add", "Mul", "Div") or len(n.inputs) != 2:
                continue
            a, b = n.inputs
            data, const = (a, b) if graph.is_const(b) else (b, a) if graph.is_const(a) else (None, None)
            if data is None or (n.op_type == "Div" and data != a):
                continue
            lin = prod.get(data)
            if lin is None or lin.op_type != "Linear" or len(cons.get(data, [])) != 1:
                continue
            axis = linear_channel_axis(graph, lin)
            nout = lin.attrs["w_int"].shape[0]
            c = _per_channel(graph.constants[const], len(graph.shapes[data]), axis, nout)
            if c is None:
                continue
            attrs = dict(lin.attrs)
            if n.op_type == "Add":
                attrs["bias"] = attrs["bias"] + c
            else:
                f = c if n.op_type == "Mul" else 1.0 / c
                attrs["w_scale"], attrs["bias"] = attrs["w_scale"] * f, attrs["bias"] * f
            new_lin: QNode = lin.with_(attrs=attrs, outputs=n.outputs)
            graph.provenance[n.name] = f"folded into {lin.name}"
            graph = graph.with_nodes(new_lin if m.name == lin.name else m for m in graph.nodes if m.name != n.name)
            changed = True
            break
    return graph


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, idempotent, shapes_known  # noqa: E402

declare(fold_affine_constants, requires=[shapes_known], ensures=[idempotent(fold_affine_constants)])
