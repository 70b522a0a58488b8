"""fuse_layernorm: torch.onnx's decomposed LayerNorm (opset < 17) becomes one ``LayerNormalization`` node (the
opt-in mode ``--nonlinear mbe``, docs/mbe.md), as the opset-17 export writes it.

Before opset 17 torch.onnx writes ``nn.LayerNorm`` over the last axis as

    m = ReduceMean(x, axes=[-1], keepdims=1);  d = Sub(x, m);  v = ReduceMean(Pow(d, 2), axes=[-1], keepdims=1)
    y = Div(d, Sqrt(Add(v, eps)));  [y = Mul(y, gamma)];  [y = Add(y, beta)]

and onnxruntime's ``quantize_static`` puts quantizers inside it (after the variance, ``var + eps``, the ``Div``,
the ``Mul`` and the ``Add``; a ``Quant`` after any step is accepted here). A region is matched from its
``ReduceMean``: every step with exactly the consumers above (``x`` may have others), ``eps`` a scalar constant,
``gamma`` / ``beta`` constants varying along the last axis only (a per-channel affine, composed in the order the
ops come), and the region leaving through a ``Quant``: the last one on the chain ``Div -> [Quant] -> [Mul gamma]
-> [Quant] -> [Add beta] -> [Quant]``. It is replaced by ``LayerNormalization(x, gamma, beta; axis=-1, epsilon)``
(gamma / beta: ones / zeros when no constant ``Mul`` / ``Add`` follows inside the region) followed by that
quantizer: the form of the opset-17 export after ``quantize_static``, so one LayerNorm lowering serves both.

**Approximation.** The quantizers inside the region (of the variance, of ``var + eps``, of the normalized value and
of its product by gamma) are dropped: the rewritten region computes LayerNorm in float and rounds once, at the
last quantizer, as the opset-17 model does; the SNN computes the variance without them. Where onnxruntime's
inner quantizers move a value across a rounding boundary of the last quantizer, the two differ by a level
(measured in tests/compiler/test_fuse_layernorm.py and docs/mbe.md). The compile report says which regions were
fused (``graph.warnings``).

Invariant established: no decomposed LayerNorm region that matches the pattern remains; each fused region is
one ``LayerNormalization`` with constant gamma and beta of the last axis's length, whose output only the
region's last quantizer reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from csdc.compiler.qgraph import QGraph, QNode

#: ops of the decomposed LayerNorm that only this pass makes lowerable (the frontend lets them through in
#: the mode --nonlinear mbe; left over outside a matched region, the lowering refuses them by name)
DECOMPOSED_OPS = frozenset({"Sub", "Pow", "Sqrt"})


@dataclass(frozen=True)
class _Match:
    x: str
    nodes: tuple[QNode, ...]  # every node of the region, the last quantizer included
    final: QNode  # the region's last quantizer
    epsilon: float
    gamma: np.ndarray  # (C,) float32
    beta: np.ndarray


def _last_axis(graph: QGraph, n: QNode, rank: int) -> bool:
    """``n`` is a ReduceMean over the last axis only, keeping it."""
    axes = n.attrs.get("axes")
    if axes is None and len(n.inputs) > 1 and n.inputs[1] and graph.is_const(n.inputs[1]):
        axes = np.asarray(graph.constants[n.inputs[1]]).reshape(-1).tolist()
    return (n.op_type == "ReduceMean" and not n.domain and axes is not None and len(axes) == 1
            and int(axes[0]) % rank == rank - 1 and int(n.attrs.get("keepdims", 1)) == 1)


def _scalar(graph: QGraph, name: str) -> float | None:
    if not graph.is_const(name):
        return None
    c = np.asarray(graph.constants[name])
    return float(c.reshape(-1)[0]) if c.size == 1 else None


def _per_channel(graph: QGraph, name: str, C: int) -> np.ndarray | None:
    """A constant that varies along the last axis only, as (C,) float64; None otherwise."""
    if not graph.is_const(name):
        return None
    c = np.asarray(graph.constants[name], dtype=np.float64)
    if c.size == 1:
        return np.full(C, float(c.reshape(-1)[0]))
    if c.shape[-1] != C or c.size != C:
        return None
    return c.reshape(C)


def _match(graph: QGraph, mean: QNode, cons: dict[str, list[QNode]]) -> _Match | None:
    x = mean.inputs[0]
    shape = graph.shapes.get(x)
    if shape is None or not _last_axis(graph, mean, len(shape)):
        return None
    C = int(shape[-1])
    nodes: list[QNode] = [mean]

    def only(t: str, op: str) -> QNode | None:
        """The single consumer of ``t`` if it is an ``op`` (standard domain)."""
        c = cons.get(t, [])
        return c[0] if len(c) == 1 and c[0].op_type == op and not c[0].domain and t != graph.output else None

    def through_quant(t: str) -> str:
        """``t``, or the output of the quantizer that alone reads it (quantize_static's Q/DQ inside the region)."""
        q = only(t, "Quant")
        if q is None:
            return t
        nodes.append(q)
        return q.outputs[0]

    sub = only(mean.outputs[0], "Sub")
    if sub is None or sub.inputs != (x, mean.outputs[0]):
        return None
    nodes.append(sub)
    d = through_quant(sub.outputs[0])
    readers = cons.get(d, [])
    pow_ = next((c for c in readers if c.op_type == "Pow"), None)
    div = next((c for c in readers if c.op_type == "Div"), None)
    if len(readers) != 2 or pow_ is None or div is None or pow_.inputs[0] != d or div.inputs[0] != d:
        return None
    if _scalar(graph, pow_.inputs[1]) != 2.0:
        return None
    nodes.append(pow_)
    var = only(through_quant(pow_.outputs[0]), "ReduceMean")
    if var is None or not _last_axis(graph, var, len(shape)):
        return None
    nodes.append(var)
    v = through_quant(var.outputs[0])
    add = only(v, "Add")
    if add is None:
        return None
    other = [i for i in add.inputs if i != v]
    eps = _scalar(graph, other[0]) if len(other) == 1 else None
    if eps is None or eps < 0:
        return None
    nodes.append(add)
    sqrt = only(through_quant(add.outputs[0]), "Sqrt")
    if sqrt is None:
        return None
    nodes.append(sqrt)
    if div.inputs[1] != through_quant(sqrt.outputs[0]):
        return None
    nodes.append(div)
    # the tail: quantizers, and a constant per-channel Mul / Add, composed as gamma * y + beta
    gamma, beta = np.ones(C), np.zeros(C)
    t, best = div.outputs[0], None
    while True:
        c = cons.get(t, [])
        if len(c) != 1 or t == graph.output or c[0].domain:
            break
        n = c[0]
        if n.op_type == "Quant":
            nodes.append(n)
            t = n.outputs[0]
            best = (len(nodes), n, gamma.copy(), beta.copy())
            continue
        if n.op_type not in ("Mul", "Add") or len(n.inputs) != 2 or t not in n.inputs:
            break
        k = _per_channel(graph, n.inputs[1] if n.inputs[0] == t else n.inputs[0], C)
        if k is None:
            break
        nodes.append(n)
        if n.op_type == "Mul":
            gamma, beta = gamma * k, beta * k
        else:
            beta = beta + k
        t = n.outputs[0]
    if best is None:
        return None
    size, final, gamma, beta = best
    return _Match(x, tuple(nodes[:size]), final, eps, gamma.astype(np.float32), beta.astype(np.float32))


def _unique(taken: set[str], base: str) -> str:
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def fuse_layernorm(graph: QGraph) -> QGraph:
    """Replace each matched decomposed LayerNorm (see module docstring) by ``LayerNormalization -> Quant``."""
    cons = graph.consumers()
    matches: dict[str, _Match] = {}  # name of the region's ReduceMean -> its match
    used: set[str] = set()
    for n in graph.nodes:
        if n.op_type == "ReduceMean" and not n.domain and n.name not in used:
            m = _match(graph, n, cons)
            if m is not None and not any(k.name in used for k in m.nodes):
                matches[n.name] = m
                used.update(k.name for k in m.nodes)
    if not matches:
        return graph
    out = graph.with_nodes(graph.nodes)
    taken = {n.name for n in graph.nodes} | set(graph.constants) | set(graph.shapes)
    kept: list[QNode] = []
    fused: list[str] = []
    dropped = 0
    for n in graph.nodes:
        m = matches.get(n.name)
        if m is None:
            if n.name not in used:
                kept.append(n)
            continue
        prefix = n.name.rsplit("/", 1)[0] + "/" if "/" in n.name else f"{n.name}_"
        name = _unique(taken, f"{prefix}LayerNormalization")
        scale, bias = _unique(taken, f"{name}.scale"), _unique(taken, f"{name}.bias")
        out.constants[scale], out.constants[bias] = m.gamma, m.beta
        node = QNode(name, "LayerNormalization", (m.x, scale, bias), (m.final.inputs[0],),
                     {"axis": -1, "epsilon": m.epsilon, "stash_type": 1})
        kept += [node, m.final]
        fused.append(name)
        inner = [k for k in m.nodes if k is not m.final]
        dropped += sum(k.op_type == "Quant" for k in inner)
        for k in inner:
            out.provenance[k.name] = f"part of the LayerNorm '{name}' (fuse_layernorm; docs/mbe.md)"
    out.warnings.append(
        f"{len(fused)} decomposed LayerNorm(s) fused into LayerNormalization ({', '.join(fused[:3])}"
        f"{', ...' if len(fused) > 3 else ''}): the {dropped} quantizer(s) inside them (variance, var + eps, normalized "
        "value, product by gamma) are dropped, as in the opset-17 export; the last quantizer of each is kept (docs/mbe.md)")
    return out.with_nodes(kept)


def layernorms_well_formed(graph: QGraph) -> str | None:
    """Every LayerNormalization normalizes the last axis with constant gamma and beta of its length."""
    for n in graph.nodes:
        if n.op_type != "LayerNormalization" or n.domain:
            continue
        shape = graph.shapes.get(n.inputs[0])
        axis = int(n.attrs.get("axis", -1))
        if shape is None or axis % len(shape) != len(shape) - 1:
            return f"LayerNormalization '{n.name}' does not normalize the last axis"
        for i in n.inputs[1:3]:
            if not i or not graph.is_const(i) or np.asarray(graph.constants[i]).size != shape[-1]:
                return f"LayerNormalization '{n.name}' has a gamma or beta that is not a constant of {shape[-1]} values"
    return None


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, idempotent  # noqa: E402

declare(fuse_layernorm, ensures=[idempotent(fuse_layernorm), layernorms_well_formed])
