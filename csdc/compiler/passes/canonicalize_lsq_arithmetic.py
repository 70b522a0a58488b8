"""canonicalize_lsq_arithmetic: a quantizer written as arithmetic becomes csdc's ``Quant`` op (or,
on a constant, integer weights).

``torch.onnx.export`` of a hand-written LSQ / fake-quant module ``round(x / s).clamp(lo, hi) * s``
gives ``Div(x, s) -> Round -> Clip(lo, hi) -> Mul(s)``. Accepted variants: ``Mul(x, 1/s)`` in place
of the Div, Clip before Round (equal for integer bounds: ``round(clip(v, lo, hi)) ==
clip(round(v), lo, hi)``), the operands of the final Mul in either order, Clip bounds as inputs or
(old opsets) attributes, and, after constant folding, ``Round(w / s)`` already evaluated to a constant
(a weight). ``Round`` is ONNX's half-to-even, the same as QuantizeLinear and ``torch.round``.

- Match: a ``Round`` node; look back one node for the ``Div``/``Mul`` by a constant (or a constant
  input), forward for an optional ``Clip`` and the ``Mul`` by a constant step.
- Check: constant step(s), positive on activations (a weight step that training drove negative is
  made positive by negating its integers: ``n * s == (-n) * (-s)``); integer clip bounds; on an activation: scalar steps and both
  clip bounds present (an unbounded quantizer has no number of levels = time steps); the
  intermediate tensors have no other consumers.
- Rewrite: activation -> ``Quant(scale=s_in, zero_point=0, lo, hi)``; if the output step
  ``s_out`` differs from ``s_in`` (relative 1e-6) a ``Mul`` by the positive constant ``s_out / s_in``
  follows (absorbed later into thresholds). Constant -> ``ints * s_out`` in ``graph.constants`` and
  the integer view in ``graph.qconstants`` (per-channel steps along one axis allowed).

Invariant established: no ``Round`` remains. A Round outside this pattern is reported (all at once)
with the form to export instead.
"""

from __future__ import annotations

import numpy as np

from csdc.compiler.passes.canonicalize_qonnx_quant import channel_axis
from csdc.compiler.qgraph import QGraph, QNode
from csdc.errors import UnsupportedModelError

HINT = ("export a quantizer as Div(x, s) -> Round -> Clip(lo, hi) -> Mul(s) with constant s, or as "
        "QuantizeLinear -> [Clip] -> DequantizeLinear")


def _const(graph: QGraph, name: str) -> np.ndarray | None:
    return np.asarray(graph.constants[name], dtype=np.float64) if name and graph.is_const(name) else None


def _clip_bounds(graph: QGraph, clip: QNode) -> tuple[float | None, float | None] | str:
    lo = hi = None
    if len(clip.inputs) > 1 and clip.inputs[1]:
        c = _const(graph, clip.inputs[1])
        if c is None:
            return "clip bounds must be constants"
        lo = float(c.reshape(-1)[0])
    elif "min" in clip.attrs:
        lo = float(clip.attrs["min"])
    if len(clip.inputs) > 2 and clip.inputs[2]:
        c = _const(graph, clip.inputs[2])
        if c is None:
            return "clip bounds must be constants"
        hi = float(c.reshape(-1)[0])
    elif "max" in clip.attrs:
        hi = float(clip.attrs["max"])
    for v in (lo, hi):
        if v is not None and v != round(v):
            return f"clip bounds must be integers (levels), got [{lo}, {hi}]"
    return lo, hi


def _other(node: QNode, tensor: str) -> str:
    rest = [i for i in node.inputs if i != tensor]
    return rest[0] if len(rest) == 1 else ""


def canonicalize_lsq_arithmetic(graph: QGraph) -> QGraph:
    """Rewrite Div -> Round -> Clip -> Mul quantizers (see module docstring)."""
    graph = graph.with_nodes(graph.nodes)
    prod, cons = graph.producers(), graph.consumers()
    problems: list[tuple[str, str, str]] = []
    replace: dict[str, list[QNode]] = {}  # name of the chain's last node -> new nodes
    drop: set[str] = set()
    for rnd in graph.nodes:
        if rnd.op_type != "Round":
            continue
        chain = [rnd]
        # input side: Div(x, s) / Mul(x, 1/s), a Clip before the Round, or a constant (folded w / s)
        clip_before = None
        src_t = rnd.inputs[0]
        p = prod.get(src_t)
        if p is not None and p.op_type == "Clip":
            clip_before, src_t = p, p.inputs[0]
            chain.insert(0, p)
            p = prod.get(src_t)
        s_in: np.ndarray | None = None
        x = src_t
        if p is not None and p.op_type in ("Div", "Mul") and len(p.inputs) == 2:
            c = _const(graph, p.inputs[1]) if p.op_type == "Div" else _const(graph, _other(p, p.inputs[0]) or p.inputs[1])
            if c is not None:
                data = p.inputs[0] if p.op_type == "Div" or not graph.is_const(p.inputs[0]) else p.inputs[1]
                s_in = c if p.op_type == "Div" else 1.0 / c
                x = data
                chain.insert(0, p)
        if s_in is None and not graph.is_const(src_t):
            problems.append((rnd.name, "Round", f"not part of a quantizer: no Div/Mul by a constant step before it; {HINT}"))
            continue
        # output side: optional Clip, then Mul by the step
        nxt = cons.get(rnd.outputs[0], [])
        clip_after = None
        if clip_before is None and len(nxt) == 1 and nxt[0].op_type == "Clip":
            clip_after = nxt[0]
            chain.append(clip_after)
            nxt = cons.get(clip_after.outputs[0], [])
        mul = nxt[0] if len(nxt) == 1 and nxt[0].op_type == "Mul" else None
        if mul is None or _const(graph, _other(mul, chain[-1].outputs[0])) is None:
            problems.append((rnd.name, "Round", f"not followed by [Clip ->] Mul by a constant step; {HINT}"))
            continue
        chain.append(mul)
        s_out = _const(graph, _other(mul, chain[-2].outputs[0]))
        clip = clip_before or clip_after
        bounds = _clip_bounds(graph, clip) if clip is not None else (None, None)
        if isinstance(bounds, str):
            problems.append((clip.name, "Clip", bounds))
            continue
        lo, hi = bounds
        for n in chain[:-1]:
            if len(cons.get(n.outputs[0], [])) != 1:
                problems.append((n.name, n.op_type, "an intermediate tensor of the quantizer has other consumers"))
                break
        else:
            if graph.is_const(x):  # a weight: evaluate it, keep the integers
                if np.any(s_out == 0) or (s_in is not None and np.any(s_in == 0)):
                    problems.append((mul.name, "Mul", "a weight quantizer step is zero"))
                    continue
                v = np.asarray(graph.constants[x], dtype=np.float64)
                lv = np.rint(v / s_in) if s_in is not None else np.rint(v)
                ints = np.clip(lv, -np.inf if lo is None else lo, np.inf if hi is None else hi).astype(np.int64)
                # a learned step may have crossed zero: ints * s == (-ints) * (-s), keep the scale positive
                sign = np.sign(s_out.reshape((1,) * (ints.ndim - s_out.ndim) + s_out.shape)) if s_out.ndim else np.sign(s_out)
                ints = (ints * sign).astype(np.int64)
                s_out = np.abs(s_out)
                axis = channel_axis(s_out, ints.ndim)
                if axis == "bad":
                    problems.append((mul.name, "Mul", "weight steps must vary along at most one axis"))
                    continue
                out_name = mul.outputs[0]
                graph.add_dequantized(out_name, ints, s_out, axis)
                for n in chain:
                    drop.add(n.name)
                    graph.provenance[n.name] = f"integer weights {out_name}"
                continue
            if np.any(s_out <= 0) or (s_in is not None and np.any(s_in <= 0)):
                problems.append((mul.name, "Mul", f"activation quantizer steps must be positive; {HINT}"))
                continue
            if s_in is None or s_in.size != 1 or s_out.size != 1:
                problems.append((rnd.name, "Round", "per-channel activation quantizers are not supported (one threshold unit "
                                 "per population); quantize activations per tensor"))
                continue
            if lo is None or hi is None:
                problems.append((rnd.name, "Round", "an activation quantizer needs both clip bounds (its number of levels is "
                                 f"the number of time steps); {HINT}"))
                continue
            si, so = float(s_in.reshape(-1)[0]), float(s_out.reshape(-1)[0])
            q = QNode(rnd.name, "Quant", (x,), mul.outputs, {"scale": si, "zero_point": 0, "lo": int(lo), "hi": int(hi)})
            new = [q]
            if abs(so / si - 1) > 1e-6:
                mid, f = f"{mul.outputs[0]}__levels", f"{mul.outputs[0]}__rescale"
                graph.constants[f] = np.asarray(so / si, dtype=np.float32)
                graph.shapes[mid] = graph.shapes.get(mul.outputs[0], graph.shapes.get(x, ()))
                new = [q.with_(outputs=(mid,)), QNode(f"{mul.name}__rescale", "Mul", (mid, f), mul.outputs)]
            replace[mul.name] = new
            for n in chain:
                drop.add(n.name)
                graph.provenance[n.name] = f"quantizer {rnd.name}"
    if problems:
        raise UnsupportedModelError(graph.path, problems)
    out: list[QNode] = []
    for n in graph.nodes:
        if n.name in replace:
            out.extend(replace[n.name])
        elif n.name not in drop:
            out.append(n)
    graph.nodes = out
    return graph


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, no_ops  # noqa: E402

declare(canonicalize_lsq_arithmetic, ensures=[no_ops("Round")])
