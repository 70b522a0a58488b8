"""remove_identities: drop nodes that do not change values.

Identity, Dropout (inference), float-to-float Cast, and a Relu whose every consumer is a
quantizer with ``lo == zero_point`` (the quantizer's lower clip already is the ReLU:
``clip(round(x/s), 0, L) == clip(round(max(x, 0)/s), 0, L)``).

Invariant established: none of these nodes remain; consumers read the node's input.
"""

from __future__ import annotations

from csdc.compiler.qgraph import QGraph, QNode


def _removable(graph: QGraph, n: QNode, cons: dict[str, list[QNode]]) -> bool:
    if n.op_type in ("Identity", "Dropout"):
        return True
    if n.op_type == "Cast":
        import numpy as np
        import onnx.helper
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(n.attrs["to"])).kind == "f"
    if n.op_type == "Relu":
        users = cons.get(n.outputs[0], [])
        return bool(users) and n.outputs[0] != graph.output and all(
            u.op_type == "Quant" and u.attrs["lo"] == u.attrs["zero_point"] for u in users)
    return False


def remove_identities(graph: QGraph) -> QGraph:
    """Bypass value-preserving nodes (see module docstring)."""
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
