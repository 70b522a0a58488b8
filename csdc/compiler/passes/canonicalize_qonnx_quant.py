"""canonicalize_qonnx_quant: QONNX ``Quant`` nodes (domain ``qonnx.custom_op.general``, as written
by Brevitas ``export_qonnx``) become csdc's internal ``Quant`` op or, on constants, integer weights.

QONNX semantics (qonnx ``quant()``), inputs ``x, scale, zeropt, bitwidth``, attributes
``signed``, ``narrow``, ``rounding_mode``::

    y = scale * (clip(round(x / scale + zeropt), lo, hi) - zeropt)
    lo, hi = (-2^(b-1) + narrow, 2^(b-1) - 1)  if signed  else  (0, 2^b - 1 - narrow)

With an integer ``zeropt`` this is exactly the internal ``Quant`` (``round(x/s + z) = round(x/s) + z``).

- Match: a ``Quant`` node in the QONNX domain (any opset version).
- Check: ``scale``, ``zeropt`` and ``bitwidth`` are constants; ``bitwidth`` and ``zeropt`` are
  integers; ``rounding_mode`` is ``ROUND`` (half to even, like QuantizeLinear; ``ROUND_TO_ZERO``,
  ``CEIL`` and ``FLOOR`` are refused: the spiking neuron rounds to nearest); ``scale > 0``. On an
  activation the scale and zero point must be per tensor. On a constant (a weight) they may be per
  channel along one axis.
- Rewrite: activation -> ``Quant(scale, zero_point, lo, hi)``; constant -> its dequantized value in
  ``graph.constants`` plus the integer view in ``graph.qconstants`` (``ints - zeropt``, scale, axis),
  so weights stay the integers Brevitas trained.

Invariant established: no QONNX-domain node remains. Every refused node is reported at once.
"""

from __future__ import annotations

import numpy as np

from csdc.compiler.qgraph import QGraph, QNode
from csdc.errors import UnsupportedModelError

QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general")


def qonnx_range(bits: int, signed: bool, narrow: bool) -> tuple[int, int]:
    """Integer range of a QONNX quantizer."""
    if signed:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1 - int(narrow)


def channel_axis(scale: np.ndarray, rank: int) -> int | None | str:
    """Axis along which a broadcastable ``scale`` varies: None (per tensor), an axis, or 'bad'."""
    if scale.size == 1:
        return None
    shape = (1,) * (rank - scale.ndim) + scale.shape
    axes = [i for i, s in enumerate(shape) if s != 1]
    return axes[0] if len(axes) == 1 else "bad"


def check_quant(graph: QGraph, n: QNode) -> str | None:
    """Why this QONNX Quant cannot be canonicalized, or None."""
    if len(n.inputs) < 4 or not all(graph.is_const(i) for i in n.inputs[1:4]):
        return "scale, zeropt and bitwidth must be constant initializers"
    mode = str(n.attrs.get("rounding_mode", "ROUND")).upper()
    if mode not in ("ROUND", "HALF_EVEN"):
        return (f"rounding_mode {mode} is not supported: an integrate-and-fire neuron rounds to nearest; "
                "export with rounding_mode ROUND")
    bits = np.asarray(graph.constants[n.inputs[3]], dtype=np.float64)
    if bits.size != 1 or bits.reshape(-1)[0] != np.round(bits.reshape(-1)[0]) or bits.reshape(-1)[0] < 1:
        return f"bitwidth must be one integer >= 1, got {bits.reshape(-1)}"
    zp = np.asarray(graph.constants[n.inputs[2]], dtype=np.float64)
    if not np.all(zp == np.round(zp)):
        return f"zeropt must be integer-valued, got {zp.reshape(-1)[:4]}"
    scale = np.asarray(graph.constants[n.inputs[1]], dtype=np.float64)
    if not np.all(scale > 0):
        return "scale must be positive"
    if not graph.is_const(n.inputs[0]):
        if scale.size != 1 or zp.size != 1:
            return ("per-channel activation quantizers are not supported (one threshold unit per population); "
                    "quantize activations per tensor")
    else:
        rank = np.asarray(graph.constants[n.inputs[0]]).ndim
        if channel_axis(scale, rank) == "bad" or (zp.size > 1 and channel_axis(zp, rank) == "bad"):
            return "weight scale/zero point must vary along at most one axis"
    return None


def canonicalize_qonnx_quant(graph: QGraph) -> QGraph:
    """Rewrite QONNX Quant nodes (see module docstring)."""
    graph = graph.with_nodes(graph.nodes)
    problems: list[tuple[str, str, str]] = []
    out: list[QNode] = []
    for n in graph.nodes:
        if n.domain not in QONNX_DOMAINS:
            out.append(n)
            continue
        if n.op_type != "Quant":
            problems.append((n.name, f"{n.domain}.{n.op_type}", "only the QONNX Quant op is supported; "
                             "export BipolarQuant/Trunc/MultiThreshold models as Quant or QCDQ"))
            continue
        why = check_quant(graph, n)
        if why is not None:
            problems.append((n.name, "Quant", why))
            continue
        scale = np.asarray(graph.constants[n.inputs[1]], dtype=np.float64)
        zp = np.asarray(graph.constants[n.inputs[2]], dtype=np.float64)
        bits = int(np.asarray(graph.constants[n.inputs[3]]).reshape(-1)[0])
        lo, hi = qonnx_range(bits, bool(n.attrs.get("signed", 1)), bool(n.attrs.get("narrow", 0)))
        if graph.is_const(n.inputs[0]):
            x = np.asarray(graph.constants[n.inputs[0]], dtype=np.float64)
            levels = np.clip(np.rint(x / scale + zp), lo, hi)  # np.rint: half to even, as QONNX ROUND
            ints = (levels - zp).astype(np.int64)
            graph.add_dequantized(n.outputs[0], ints, scale, channel_axis(scale, x.ndim))
            graph.provenance[n.name] = f"integer weights {n.outputs[0]} ({bits}-bit)"
            continue
        z = int(zp.reshape(-1)[0])
        out.append(QNode(n.name, "Quant", (n.inputs[0],), n.outputs,
                         {"scale": float(scale.reshape(-1)[0]), "zero_point": z, "lo": lo, "hi": hi}))
        graph.provenance[n.name] = "quantizer"
    if problems:
        raise UnsupportedModelError(graph.path, problems)
    graph.nodes = out
    return graph


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare, no_foreign_domains  # noqa: E402

declare(canonicalize_qonnx_quant, ensures=[no_foreign_domains])
