"""canonicalize_linear: Conv, Gemm and MatMul with constant weights become ``Linear`` nodes.

``Linear`` computes ``y[o] = w_scale[o] * (w_int (*) x)[o] + bias[o]`` with integer ``w_int``
and per-output-channel float ``w_scale`` and ``bias`` (attrs). Integer weights behind a
DequantizeLinear (per tensor, or per channel along the output axis) are kept as they are;
float weights are quantized per output channel, symmetric, to ``weight_bits`` and the
relative error is recorded in ``attrs['weight_error']``.

Invariant established: no Conv or Gemm remains, and a MatMul remains only as a product of two
activations (lowered to a TDEC ``SpikeMatMul`` when both are quantized); an unsupported form
(transA, a non-constant weight of Conv/Gemm, a constant first operand) is reported by name.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import numpy as np

from csdc.compiler.qgraph import QGraph, QNode
from csdc.ir.ops import narrowest
from csdc.errors import UnsupportedModelError


def grid_levels(flat: np.ndarray, qmax: int, tol: float = 1e-4) -> np.ndarray:
    """Per row, the smallest ``k <= qmax`` such that the row lies on the grid ``max|w| / k`` (0 if none).

    Float weights exported after fake quantization (``round(w / s).clamp(-Q, Q) * s`` folded into a
    constant by the exporter) are such a grid: recovering it keeps the trained integers exactly.
    Vectorised over rows: each ``k`` is screened on a few entries per row (the largest, where a miss
    is likeliest to show), and only the rows that pass are checked in full."""
    rows = flat.shape[0]
    out = np.zeros(rows, dtype=np.int64)
    if flat.size == 0:
        return out
    amax = np.abs(flat).max(axis=1)
    ratio = flat / np.where(amax > 0, amax, 1.0)[:, None]  # in [-1, 1]: on the grid iff ratio * k is integral
    screen = np.take_along_axis(ratio, np.argsort(-np.abs(ratio), axis=1)[:, :min(8, ratio.shape[1])], axis=1)
    open_rows = np.flatnonzero(amax > 0)
    for k in range(1, qmax + 1):
        if open_rows.size == 0:
            break
        v = screen[open_rows] * k
        passed = open_rows[np.all(np.abs(v - np.rint(v)) < tol, axis=1)]
        if passed.size:
            full = ratio[passed] * k
            on_grid = passed[np.all(np.abs(full - np.rint(full)) < tol, axis=1)]
            out[on_grid] = k
            open_rows = np.setdiff1d(open_rows, on_grid, assume_unique=True)
    return out


def quantize_weight(w: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Symmetric per-output-channel (axis 0) quantization: (ints, scales, max relative error).

    A channel whose weights already lie on a grid of at most ``2^(bits-1) - 1`` positive levels
    keeps that grid (see :func:`grid_levels`); the others get ``scale = max|w| / qmax``."""
    qmax = 2 ** (bits - 1) - 1
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    amax = np.abs(flat).max(axis=1)
    k = grid_levels(flat, qmax)
    scale = np.where(amax > 0, amax / np.where(k > 0, k, qmax), 1.0)
    ints = np.clip(np.rint(flat / scale[:, None]), -qmax, qmax).astype(np.int64)
    err = np.abs(ints * scale[:, None] - flat).max(axis=1) / np.where(amax > 0, amax, 1.0)
    return ints.reshape(w.shape), scale, float(err.max()) if err.size else 0.0


def _weight(graph: QGraph, name: str, out_axis: int, bits: int) -> tuple[np.ndarray, np.ndarray, float, bool]:
    """Integer weights with the output axis first, their per-output scale, error, and whether quantized here."""
    w = graph.constants[name]  # np.asarray only when it has to be quantized here
    if name in graph.qconstants:
        ints, scale, axis = graph.qconstants[name]
        if axis is None or axis == out_axis:
            ints = np.moveaxis(ints, out_axis, 0)
            sc = np.broadcast_to(scale.reshape(-1), (ints.shape[0],)).astype(np.float64) if scale.size > 1 else np.full(ints.shape[0], float(scale.reshape(-1)[0]))
            return ints, sc, 0.0, False  # as narrow as the model stored them
    ints, sc, err = quantize_weight(np.moveaxis(np.asarray(w, dtype=np.float64), out_axis, 0), bits)
    return narrowest(ints), sc, err, True


def _bias(graph: QGraph, name: str | None, n_out: int, node: QNode | None = None) -> np.ndarray:
    if not name:
        return np.zeros(n_out)
    where = (node.name, node.op_type) if node is not None else (name, "?")
    if not graph.is_const(name):
        raise UnsupportedModelError(graph.path, [(*where, f"the bias '{name}' must be a constant")])
    b = np.asarray(graph.constants[name], dtype=np.float64).reshape(-1)
    if b.size not in (1, n_out):
        raise UnsupportedModelError(graph.path, [(*where, f"the bias '{name}' has {b.size} values for {n_out} output channels")])
    return np.broadcast_to(b, (n_out,)).copy()


def canonicalize_linear(graph: QGraph, weight_bits: int = 8) -> QGraph:
    """Rewrite Conv/Gemm/MatMul with constant weights into Linear nodes (see module docstring)."""
    problems: list[tuple[str, str, str]] = []
    out: list[QNode] = []
    for n in graph.nodes:
        if n.op_type not in ("Conv", "Gemm", "MatMul"):
            out.append(n)
            continue
        x, w = n.inputs[0], n.inputs[1]
        if n.op_type == "MatMul" and not graph.is_const(x) and not graph.is_const(w):
            out.append(n)  # activation x activation: the lowering checks both sides are quantized
            continue
        if graph.is_const(x) or not graph.is_const(w):
            what = "two activations" if not graph.is_const(w) and not graph.is_const(x) else "a constant data input"
            problems.append((n.name, n.op_type, f"a {n.op_type} of {what} is not supported here; the second input must "
                             "be constant weights (activation x activation products need quantizers on both inputs)"))
            continue
        if n.op_type == "Conv":
            wt = graph.constants[w]
            if wt.ndim != 4:
                problems.append((n.name, "Conv", f"only 2-D convolutions are supported (weight rank {wt.ndim})"))
                continue
            ints, sc, err, q = _weight(graph, w, 0, weight_bits)
            pads = list(n.attrs.get("pads", [0, 0, 0, 0]))
            auto = n.attrs.get("auto_pad", "NOTSET")
            strides = list(n.attrs.get("strides", [1, 1]))
            dil = list(n.attrs.get("dilations", [1, 1]))
            if auto not in ("NOTSET", "VALID"):
                in_hw = graph.shapes[x][2:]
                pads = []
                for d in range(2):
                    out_sz = -(-in_hw[d] // strides[d])
                    total = max(0, (out_sz - 1) * strides[d] + dil[d] * (ints.shape[2 + d] - 1) + 1 - in_hw[d])
                    first = total // 2 if auto == "SAME_UPPER" else total - total // 2
                    pads.append((first, total - first))
                pads = [pads[0][0], pads[1][0], pads[0][1], pads[1][1]]
            attrs = {"kind": "conv", "w_int": ints, "w_scale": sc, "bias": _bias(graph, n.inputs[2] if len(n.inputs) > 2 else None, ints.shape[0], n),
                     "strides": tuple(strides), "pads": tuple(pads), "dilations": tuple(dil), "group": int(n.attrs.get("group", 1))}
        else:
            if n.op_type == "Gemm":
                if n.attrs.get("transA", 0):
                    problems.append((n.name, "Gemm", "transA=1 is not supported; transpose the activation instead"))
                    continue
                out_axis = 0 if n.attrs.get("transB", 0) else 1
                alpha, beta = float(n.attrs.get("alpha", 1.0)), float(n.attrs.get("beta", 1.0))
                bias_name = n.inputs[2] if len(n.inputs) > 2 else None
            else:
                out_axis, alpha, beta, bias_name = 1, 1.0, 1.0, None
            if graph.constants[w].ndim != 2:
                problems.append((n.name, n.op_type, f"weights must be 2-D, got shape {graph.constants[w].shape}"))
                continue
            ints, sc, err, q = _weight(graph, w, out_axis, weight_bits)
            attrs = {"kind": "dense", "w_int": ints, "w_scale": sc * alpha, "bias": beta * _bias(graph, bias_name, ints.shape[0], n)}
        if not (np.all(np.isfinite(attrs["w_scale"])) and np.all(np.isfinite(attrs["bias"]))):
            problems.append((n.name, n.op_type, "weights, scales and bias must be finite numbers (found inf or NaN)"))
            continue
        attrs["weight_error"] = err
        attrs["weights_quantized_by_csdc"] = q
        out.append(QNode(n.name, "Linear", (x,), n.outputs, attrs))
    if problems:
        raise UnsupportedModelError(graph.path, problems)
    return graph.with_nodes(out)


def make_canonicalize_linear(weight_bits: int) -> Callable[[QGraph], QGraph]:
    p = partial(canonicalize_linear, weight_bits=weight_bits)
    p.__name__ = "canonicalize_linear"  # type: ignore[attr-defined]
    return p


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, no_ops  # noqa: E402


def _matmuls_of_activations(graph: QGraph) -> str | None:
    bad = [n for n in graph.nodes if n.op_type == "MatMul" and any(graph.is_const(i) for i in n.inputs)]
    return f"MatMul '{bad[0].name}' with a constant operand remains" if bad else None


declare(canonicalize_linear, requires=[no_ops("QuantizeLinear", "DequantizeLinear")],
        ensures=[no_ops("Conv", "Gemm"), _matmuls_of_activations])
