"""move_maxpool: ``[Relu ->] MaxPool -> Quant`` becomes ``Quant -> MaxPool``.

A quantizer is monotone non-decreasing, so ``q(max_i x_i) = max_i q(x_i)``; a ReLU before the
pool is absorbed by the quantizer's lower clip when ``lo == zero_point``. After the move the
pool acts on spike counts and lowers to the TDEC ``SpikeMaxPool``. Conditions: the MaxPool
output feeds only the quantizer, the quantizer has ``lo == zero_point``, no ceil_mode.

Invariant established: no MaxPool feeds a Quant directly.
"""

from __future__ import annotations

from csdc.compiler.qgraph import QGraph, QNode


def move_maxpool(graph: QGraph) -> QGraph:
    """Move max-pools after their quantizers (see module docstring)."""
    graph = graph.with_nodes(graph.nodes)
    prod, cons = graph.producers(), graph.consumers()
    swaps: dict[str, tuple[QNode, QNode]] = {}  # maxpool name -> (new quant, new pool)
    drop: set[str] = set()
    for q in graph.nodes:
        if q.op_type != "Quant" or q.attrs["lo"] != q.attrs["zero_point"]:
            continue
        mp = prod.get(q.inputs[0])
        if mp is None or mp.op_type != "MaxPool" or len(cons.get(mp.outputs[0], [])) != 1 or mp.attrs.get("ceil_mode", 0):
            continue
        src = mp.inputs[0]
        relu = prod.get(src)
        if relu is not None and relu.op_type == "Relu" and len(cons.get(src, [])) == 1:
            src = relu.inputs[0]
            drop.add(relu.name)
            graph.provenance[relu.name] = f"absorbed by quantizer {q.name}"
        mid = f"{q.outputs[0]}__prepool"
        graph.shapes[mid] = graph.shapes[src]
        swaps[mp.name] = (q.with_(inputs=(src,), outputs=(mid,)), mp.with_(inputs=(mid,), outputs=q.outputs))
        drop.add(q.name)
    out: list[QNode] = []
    for n in graph.nodes:
        if n.name in drop:
            continue
        if n.name in swaps:
            out.extend(swaps[n.name])
        else:
            out.append(n)
    return graph.with_nodes(out)


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, idempotent  # noqa: E402

declare(move_maxpool, ensures=[idempotent(move_maxpool)])
