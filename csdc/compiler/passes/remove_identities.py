"""remove_identities: drop nodes that do not change values.

Identity, Dropout (inference), float-to-float Cast, and a Relu whose every consumer is a
quantizer with ``lo == zero_point``, directly or through Mul/Div by positive scalar constants:
the quantizer's lower clip already is the ReLU (``clip(round(x/s), 0, L) ==
clip(round(max(x, 0)/s), 0, L)``) and ``max(c x, 0) == c max(x, 0)`` for ``c > 0``. This is how
NReLU attention ``q(ReLU(y) / N)`` loses its ReLU.

Invariant established: none of these nodes remain; consumers read the node's input.
"""

from __future__ import annotations

import numpy as np
import onnx.helper

from csdc.compiler.qgraph import QGraph, QNode


def _positive_scalar(graph: QGraph, name: str) -> bool:
    if not graph.is_const(name):
        return False
    c = np.asarray(graph.constants[name])
    return c.size == 1 and float(c.reshape(-1)[0]) > 0


def _ends_in_unsigned_quant(graph: QGraph, tensor: str, cons: dict[str, list[QNode]]) -> bool:
    """Every use of ``tensor`` reaches a quantizer with lo == zero_point through positive scalings only."""
    users = cons.get(tensor, [])
    if not users or tensor == graph.output:
        return False
    for u in users:
        if u.op_type == "Quant" and not u.domain and u.attrs["lo"] == u.attrs["zero_point"]:
            continue
        if u.op_type == "Relu" and _ends_in_unsigned_quant(graph, u.outputs[0], cons):
            continue  # ReLU(ReLU(x)) == ReLU(x): a quantizer's own ReLU after the model's (NReLU attention)
        scaled_by = [i for i in u.inputs if i != tensor]
        if (u.op_type == "Mul" or (u.op_type == "Div" and u.inputs[0] == tensor)) and len(scaled_by) == 1 \
                and _positive_scalar(graph, scaled_by[0]) and _ends_in_unsigned_quant(graph, u.outputs[0], cons):
            continue
        return False
    return True


def _removable(graph: QGraph, n: QNode, cons: dict[str, list[QNode]]) -> bool:
    if n.op_type in ("Identity", "Dropout"):
        return True
    if n.op_type == "Cast":
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(n.attrs["to"])).kind == "f"
    if n.op_type == "Relu":
        return _ends_in_unsigned_quant(graph, n.outputs[0], cons)
    return False


def remove_identities(graph: QGraph) -> QGraph:
    """Bypass value-preserving nodes (see module docstring)."""
    graph = graph.with_nodes(graph.nodes)
    cons = graph.consumers()
    rename: dict[str, str] = {}
    kept: list[QNode] = []
    for n in graph.nodes:
        src = rename.get(n.inputs[0], n.inputs[0]) if n.inputs else None
        if src is not None and n.outputs[0] != graph.output and _removable(graph, n, cons):
            rename[n.outputs[0]] = src
            graph.provenance[n.name] = "removed (no effect)"
            continue
        kept.append(n.with_(inputs=tuple(rename.get(i, i) for i in n.inputs)))
    return graph.with_nodes(kept)


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, idempotent  # noqa: E402

declare(remove_identities, ensures=[idempotent(remove_identities)])
