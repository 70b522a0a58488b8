"""drop_current_quantizers: a signed quantizer on a current-domain tensor that is requantized before
any synapse reads it is not applied; the error it would add is reported.

onnxruntime's ``quantize_static`` puts a QDQ pair on (almost) every tensor, including the signed
pre-activations between a linear layer, its BatchNorm and the ReLU quantizer
(``MatMul -> Q/DQ -> Transpose -> Q/DQ -> BatchNormalization -> Q/DQ -> Transpose -> [ReLU] -> Q/DQ``).
A spike count cannot be negative, so such a quantizer has no spiking form of its own; but
if every path from it reaches another quantizer (or the output) through current-domain ops only
(routing, BatchNormalization, constant Add/Mul/Div, residual Add, ReLU), the value it rounds is
still an integrate-and-fire neuron's input current: csdc integrates the unrounded current, which
differs from the source by at most ``step / 2`` per element before the next quantizer (the rounding
the source applies twice, csdc once).

- Match: a ``Quant`` with ``lo < zero_point`` (a signed range), not on the model input or output.
- Check: every consumer path reaches a quantizer or the output through the ops above only.
  Otherwise it is left alone and lowering refuses it with its reason (negative levels).
- Rewrite: consumers read the quantizer's input; a warning names it with its step.

Invariant established: no signed ``Quant`` is followed by current-domain ops only.
"""

from __future__ import annotations

from csdc.compiler.qgraph import QGraph, QNode

CURRENT_OPS = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "BatchNormalization", "Add", "Mul", "Div",
               "Relu", "Identity", "Dropout"}


def _requantized(graph: QGraph, tensor: str, cons: dict[str, list[QNode]], seen: set[str]) -> bool:
    if tensor == graph.output:
        return True
    users = cons.get(tensor, [])
    if not users:
        return False
    for u in users:
        if u.op_type == "Quant" and not u.domain:
            continue
        if u.op_type not in CURRENT_OPS or u.name in seen:
            return False
        if u.op_type in ("Mul", "Div") and not all(graph.is_const(i) for i in u.inputs if i != tensor):
            return False
        seen.add(u.name)
        if not _requantized(graph, u.outputs[0], cons, seen):
            return False
    return True


def drop_current_quantizers(graph: QGraph) -> QGraph:
    """Bypass signed quantizers on currents that are requantized anyway (see module docstring)."""
    cons = graph.consumers()
    graph = graph.with_nodes(graph.nodes)
    rename: dict[str, str] = {}
    kept: list[QNode] = []
    for n in graph.nodes:
        n = n.with_(inputs=tuple(rename.get(i, i) for i in n.inputs))
        if (n.op_type == "Quant" and not n.domain and n.attrs["lo"] < n.attrs["zero_point"] and n.inputs[0] != graph.input
                and n.outputs[0] != graph.output and _requantized(graph, n.outputs[0], cons, set())):
            rename[n.outputs[0]] = n.inputs[0]
            step = float(n.attrs["scale"])
            graph.provenance[n.name] = (f"not applied: signed quantizer on a current that is requantized downstream "
                                        f"(error <= step/2 = {step / 2:.3g} per element)")
            graph.warnings.append(f"quantizer '{n.name}' (signed, step {step:.4g}) on a current is not applied: a spike "
                                  f"count cannot be negative; the current it rounds is requantized downstream, so the "
                                  f"unrounded value differs from the source's by at most {step / 2:.3g} per element")
            continue
        kept.append(n)
    graph.nodes = kept
    return graph
