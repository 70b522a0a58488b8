"""canonicalize_quant: turn every activation quantizer dialect into one ``Quant`` node.

Patterns: ``QuantizeLinear -> DequantizeLinear`` (QDQ) and ``QuantizeLinear -> Clip -> DequantizeLinear``
(QCDQ) on a non-constant tensor, with per-tensor scale and zero point equal on both sides.
The ``Quant`` node computes ``scale * (clip(round(x / scale) + zero_point, lo, hi) - zero_point)``,
``[lo, hi]`` being the storage type's range intersected with the Clip bounds.

A quantizer that re-quantizes the levels of an identical quantizer (same step and zero point, a
range that contains the first one's) reached only through value-preserving routing (MaxPool,
Flatten, Reshape, Transpose, Squeeze, Unsqueeze, Identity, Dropout) computes the identity and is
removed: torch.ao's FX-mode QAT shares one FakeQuantize between an op's input and output (after a
max-pool, a flatten) and applies the output's twice, e.g. ``Gemm -> QDQ -> QDQ``.

Invariant established: no QuantizeLinear, DequantizeLinear or quantizer Clip remains, and no
``Quant`` reads (through routing) the levels of a quantizer with its step, zero point and range. A lone
QuantizeLinear / DequantizeLinear on an activation, a per-channel activation quantizer, or a
quantizer whose intermediate tensor has other consumers is reported (all at once) by name.
"""

from __future__ import annotations

import numpy as np

from csdc.compiler.qgraph import QGraph, QNode
from csdc.errors import UnsupportedModelError


def int_range(dtype: np.dtype) -> tuple[int, int] | None:
    """Range of an integer storage type, including ONNX's 4-bit int4/uint4 (ml_dtypes); None if not integer."""
    dtype = np.dtype(dtype)
    if dtype.kind in "iu":
        info = np.iinfo(dtype)
        return int(info.min), int(info.max)
    if dtype.name in ("int4", "uint4", "int2", "uint2"):
        import ml_dtypes

        info = ml_dtypes.iinfo(dtype)
        return int(info.min), int(info.max)
    return None


def _scalar(graph: QGraph, name: str | None, default: float | int | None) -> np.ndarray | None:
    if not name:
        return None if default is None else np.asarray(default)
    if not graph.is_const(name):
        return None
    return np.asarray(graph.constants[name])


def canonicalize_quant(graph: QGraph) -> QGraph:
    """Fuse Q[->Clip]->DQ chains on activations into Quant nodes (see module docstring)."""
    prod = graph.producers()
    cons = graph.consumers()
    problems: list[tuple[str, str, str]] = []
    fused: dict[str, QNode] = {}  # DQ name -> Quant node
    dropped: set[str] = set()
    for dq in graph.nodes:
        if dq.op_type != "DequantizeLinear":
            continue
        chain = [dq]
        src = prod.get(dq.inputs[0])
        clip = None
        if src is not None and src.op_type == "Clip":
            clip = src
            chain.append(clip)
            src = prod.get(clip.inputs[0])
        if src is None or src.op_type != "QuantizeLinear":
            problems.append((dq.name, "DequantizeLinear", "not preceded by a QuantizeLinear (optionally through Clip); "
                             "export activations as QuantizeLinear -> [Clip] -> DequantizeLinear"))
            continue
        q = src
        chain.append(q)
        for n in chain[1:]:
            if len(cons.get(n.outputs[0], [])) != 1:
                problems.append((n.name, n.op_type, "the quantized integer tensor has several consumers; "
                                 "each quantizer must feed exactly one DequantizeLinear"))
        s_q = _scalar(graph, q.inputs[1], None)
        s_dq = _scalar(graph, dq.inputs[1], None)
        zp_q = _scalar(graph, q.inputs[2] if len(q.inputs) > 2 else None, 0)
        zp_dq = _scalar(graph, dq.inputs[2] if len(dq.inputs) > 2 else None, 0)
        if s_q is None or s_dq is None or zp_q is None or zp_dq is None:
            problems.append((q.name, "QuantizeLinear", "scale and zero point must be constants"))
            continue
        if s_q.size != 1 or zp_q.size != 1:
            problems.append((q.name, "QuantizeLinear", "per-channel activation quantizers are not supported; "
                             "quantize activations per tensor"))
            continue
        if not (np.allclose(s_q.reshape(-1), s_dq.reshape(-1), rtol=1e-6, atol=0) and int(zp_q.reshape(-1).astype(np.int64)[0]) == int(zp_dq.reshape(-1).astype(np.int64)[0])):
            problems.append((dq.name, "DequantizeLinear", f"scale/zero point ({s_dq.reshape(-1)}, {zp_dq.reshape(-1)}) differ from "
                             f"its QuantizeLinear '{q.name}' ({s_q.reshape(-1)}, {zp_q.reshape(-1)})"))
            continue
        scale = float(s_q.reshape(-1)[0])
        if not scale > 0:
            problems.append((q.name, "QuantizeLinear", f"scale must be positive, got {scale}"))
            continue
        zp_arr = graph.constants.get(q.inputs[2]) if len(q.inputs) > 2 and q.inputs[2] else None
        dtype = zp_arr.dtype if zp_arr is not None else np.dtype(np.uint8)
        rng = int_range(dtype)
        if rng is None:
            problems.append((q.name, "QuantizeLinear", f"unsupported storage type {dtype}; use an integer type "
                             "(uint8/int8/uint16/int16/uint4/int4)"))
            continue
        lo, hi = rng
        if clip is not None:
            cmin = clip.inputs[1] if len(clip.inputs) > 1 else ""
            cmax = clip.inputs[2] if len(clip.inputs) > 2 else ""
            if (cmin and not graph.is_const(cmin)) or (cmax and not graph.is_const(cmax)):
                problems.append((clip.name, "Clip", "clip bounds must be constants"))
                continue
            if cmin:
                lo = max(lo, int(np.asarray(graph.constants[cmin]).reshape(-1).astype(np.int64)[0]))
            elif "min" in clip.attrs:
                lo = max(lo, int(clip.attrs["min"]))
            if cmax:
                hi = min(hi, int(np.asarray(graph.constants[cmax]).reshape(-1).astype(np.int64)[0]))
            elif "max" in clip.attrs:
                hi = min(hi, int(clip.attrs["max"]))
        fused[dq.name] = QNode(q.name, "Quant", (q.inputs[0],), dq.outputs,
                               {"scale": scale, "zero_point": int(zp_q.reshape(-1).astype(np.int64)[0]), "lo": lo, "hi": hi})
        dropped.update(n.name for n in chain[1:])
    for n in graph.nodes:
        if n.op_type == "QuantizeLinear" and n.name not in dropped:
            problems.append((n.name, "QuantizeLinear", "not followed by a DequantizeLinear; every activation quantizer "
                             "must be a QuantizeLinear -> [Clip] -> DequantizeLinear chain"))
    if problems:
        raise UnsupportedModelError(graph.path, problems)
    out = []
    for n in graph.nodes:
        if n.name in dropped:
            continue
        out.append(fused.get(n.name, n))
    new = graph.with_nodes(out)
    for qn in fused.values():
        new.provenance[qn.name] = "quantizer"
    for dq_name, qn in fused.items():
        new.provenance[dq_name] = f"part of quantizer {qn.name}"
    for n in graph.nodes:
        if n.name in dropped and n.op_type == "Clip":
            new.provenance[n.name] = "part of a quantizer (its clip range)"
    return _drop_requantizers(new)


# ops whose every output value is one of their input values (a quantizer's levels pass unchanged)
VALUE_PRESERVING = {"MaxPool", "Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Dropout"}


def _levels_source(tensor: str, prod: dict[str, QNode]) -> QNode | None:
    """The ``Quant`` whose output reaches ``tensor`` through value-preserving routing only, if any."""
    p = prod.get(tensor)
    while p is not None and p.op_type in VALUE_PRESERVING:
        p = prod.get(p.inputs[0])
    return p if p is not None and p.op_type == "Quant" and not p.domain else None


def _is_identity_on(q: QNode, src: QNode) -> bool:
    """``q`` maps every level of ``src`` to itself: ``round(s (k - z) / s') + z' == k`` within ``q``'s clip."""
    a, b = src.attrs, q.attrs
    if a["zero_point"] != b["zero_point"] or not (b["lo"] <= a["lo"] and a["hi"] <= b["hi"]):
        return False
    # equal steps (as the Q/DQ pair match: relative 1e-6, float32 storage of one step); the difference
    # moves level k by k * e, which must stay far below half a level for round() to return k
    e = abs(b["scale"] / a["scale"] - 1)
    reach = max(abs(a["lo"] - a["zero_point"]), abs(a["hi"] - a["zero_point"]), 1)
    return e <= 1e-6 and e * reach < 0.25


def _drop_requantizers(graph: QGraph) -> QGraph:
    """Remove quantizers that re-quantize an identical quantizer's levels (see module docstring)."""
    prod = graph.producers()
    rename: dict[str, str] = {}
    kept: list[QNode] = []
    for n in graph.nodes:
        n = n.with_(inputs=tuple(rename.get(i, i) for i in n.inputs))
        src = _levels_source(n.inputs[0], prod) if n.op_type == "Quant" and not n.domain else None
        if src is not None and _is_identity_on(n, src):
            rename[n.outputs[0]] = n.inputs[0]
            graph.provenance[n.name] = f"removed: re-quantizes the levels of quantizer {src.name} (no effect)"
            continue
        kept.append(n)
    out_alias = rename.get(graph.output)
    if out_alias is not None:  # the graph output was a removed re-quantizer: its source now writes the output
        while out_alias in rename:
            out_alias = rename[out_alias]
        kept = [n.with_(inputs=tuple(graph.output if i == out_alias else i for i in n.inputs),
                        outputs=tuple(graph.output if o == out_alias else o for o in n.outputs)) for n in kept]
    return graph.with_nodes(kept)


def _no_requantizers(graph: QGraph) -> str | None:
    """No ``Quant`` re-quantizes, through value-preserving routing, the levels of an identical quantizer."""
    prod = graph.producers()
    for n in graph.nodes:
        src = _levels_source(n.inputs[0], prod) if n.op_type == "Quant" and not n.domain else None
        if src is not None and _is_identity_on(n, src):
            return f"quantizer '{n.name}' re-quantizes the levels of quantizer '{src.name}'"
    return None


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, no_foreign_domains, no_ops  # noqa: E402

declare(canonicalize_quant, requires=[no_foreign_domains],
        ensures=[no_ops("QuantizeLinear", "DequantizeLinear"), _no_requantizers])
