"""fold_batchnorm: a BatchNormalization after a Linear folds into its scales and bias.

``BN(y) = g (y - mean) / sqrt(var + eps) + b`` with ``y = w_scale * (W x) + bias`` gives
``w_scale' = w_scale * k`` and ``bias' = (bias - mean) * k + b`` with ``k = g / sqrt(var + eps)``
per output channel. ``k`` may be negative (the lowering negates that channel's integer weights,
keeping thresholds positive). Condition: the Linear's output feeds only the BN, and the BN
channel axis (axis 1) is the Linear's output channel axis. A BN on tokens written as
``Transpose(p) -> BatchNormalization -> Transpose(p^-1)`` after a dense layer whose output
channels land on axis 1 under ``p`` folds the same way and both Transposes disappear.

Any other BatchNormalization (after a quantizer: onnxruntime puts a QDQ pair between a linear layer
and its BN) becomes ``Mul(k) -> Add(b - mean k)`` by per-channel constants on axis 1, which the
lowering applies to spikes as one-to-one synapses (or folds into the next layer's scales).

Invariant established: no BatchNormalization remains.
"""

from __future__ import annotations

import numpy as np

from csdc.compiler.qgraph import QGraph, QNode
from csdc.errors import UnsupportedModelError


def linear_channel_axis(graph: QGraph, node: QNode) -> int:
    """Axis of the output channels of a Linear in its ONNX output (with batch axis)."""
    return 1 if node.attrs["kind"] == "conv" else len(graph.shapes[node.outputs[0]]) - 1


def _token_sandwich(graph: QGraph, bn: QNode, t_in: QNode | None, prod: dict[str, QNode],
                    cons: dict[str, list[QNode]]) -> tuple[QNode, QNode, QNode] | None:
    """(linear, transpose before, transpose after) when ``bn`` sits in a foldable Transpose sandwich."""
    if t_in is None or t_in.op_type != "Transpose" or len(cons.get(bn.outputs[0], [])) != 1:
        return None
    t_out = cons[bn.outputs[0]][0]
    lin = prod.get(t_in.inputs[0])
    if t_out.op_type != "Transpose" or lin is None or lin.op_type != "Linear" or lin.attrs["kind"] != "dense":
        return None
    if len(cons.get(t_in.inputs[0], [])) != 1 or len(cons.get(t_in.outputs[0], [])) != 1:
        return None
    p_in, p_out = list(t_in.attrs.get("perm", [])), list(t_out.attrs.get("perm", []))
    rank = len(graph.shapes[t_in.inputs[0]])
    if len(p_in) != rank or [p_in[i] for i in p_out] != list(range(rank)) or p_in[1] != rank - 1 or p_in[0] != 0:
        return None
    return lin, t_in, t_out


def fold_batchnorm(graph: QGraph) -> QGraph:
    """Fold every BatchNormalization into the Linear before it (see module docstring)."""
    graph = graph.with_nodes(graph.nodes)
    prod, cons = graph.producers(), graph.consumers()
    replaced: dict[str, QNode] = {}
    affine: dict[str, list[QNode]] = {}  # BN name -> Mul, Add
    removed: set[str] = set()
    problems = []
    for n in graph.nodes:
        if n.op_type != "BatchNormalization":
            continue
        lin = prod.get(n.inputs[0])
        outputs = n.outputs
        sandwich = _token_sandwich(graph, n, lin, prod, cons)
        if sandwich is not None:
            lin, t_in, t_out = sandwich
            removed.update((t_in.name, t_out.name))
            outputs = t_out.outputs
            graph.provenance[t_in.name] = graph.provenance[t_out.name] = f"folded into {lin.name} with {n.name}"
        lin = replaced.get(lin.name, lin) if lin is not None else None
        if len(n.inputs) < 5 or not all(graph.is_const(i) for i in n.inputs[1:5]):
            problems.append((n.name, "BatchNormalization", "scale, bias, mean and variance must be constants"))
            continue
        gamma, beta, mean, var = (np.asarray(graph.constants[i], dtype=np.float64).reshape(-1) for i in n.inputs[1:5])
        eps = float(n.attrs.get("epsilon", 1e-5))
        sizes = {p.size for p in (gamma, beta, mean, var)}
        if len(sizes) != 1 or not all(np.all(np.isfinite(p)) for p in (gamma, beta, mean, var)) or not np.all(var + eps > 0):
            problems.append((n.name, "BatchNormalization", f"parameters must be finite, of one length per channel (got lengths "
                             f"{sorted(sizes)}), with variance + epsilon > 0"))
            continue
        k = gamma / np.sqrt(var + eps)
        if sandwich is None and (lin is None or lin.op_type != "Linear" or len(cons.get(n.inputs[0], [])) != 1
                                 or linear_channel_axis(graph, lin) != 1):
            rank = len(graph.shapes.get(n.inputs[0], ()))
            if rank < 2:
                problems.append((n.name, "BatchNormalization", "needs a channel axis (rank >= 2); place BN right after "
                                 "the linear layer"))
                continue
            shape = (-1,) + (1,) * (rank - 2)
            kc, bc, mid = f"{n.name}__scale", f"{n.name}__shift", f"{n.outputs[0]}__scaled"
            graph.constants[kc] = k.reshape(shape).astype(np.float32)
            graph.constants[bc] = (beta - mean * k).reshape(shape).astype(np.float32)
            graph.shapes[mid] = graph.shapes[n.inputs[0]]
            affine[n.name] = [QNode(f"{n.name}__mul", "Mul", (n.inputs[0], kc), (mid,)),
                              QNode(f"{n.name}__add", "Add", (mid, bc), n.outputs)]
            graph.provenance[n.name] = "per-channel scale and shift (not after a linear layer)"
            continue
        a = dict(lin.attrs)
        a["w_scale"] = a["w_scale"] * k
        a["bias"] = (a["bias"] - mean) * k + beta
        replaced[lin.name] = lin.with_(attrs=a, outputs=outputs)
        removed.add(n.name)
        graph.provenance[n.name] = f"folded into {lin.name}"
    if problems:
        raise UnsupportedModelError(graph.path, problems)
    out: list[QNode] = []
    for n in graph.nodes:
        if n.name in affine:
            out.extend(affine[n.name])
        elif n.name not in removed:
            out.append(replaced.get(n.name, n))
    return graph.with_nodes(out)


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, no_ops, shapes_known  # noqa: E402

declare(fold_batchnorm, requires=[shapes_known, no_ops("Conv", "Gemm")], ensures=[no_ops("BatchNormalization")])
