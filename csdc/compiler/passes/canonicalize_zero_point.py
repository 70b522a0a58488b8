"""canonicalize_zero_point: a quantizer whose lower clip equals its zero point is an unsigned
quantizer with zero point 0; one whose zero point is the middle of its clip range is a symmetric
quantizer with zero point 0.

``Quant`` computes ``s * (clip(round(x/s) + z, lo, hi) - z)``. Two exact rewrites:

1. ReLU semantics: if ``x >= 0`` is guaranteed (``x`` is produced by a ``Relu``, directly or through
   a ``MaxPool`` of a ``Relu``), then ``round(x/s) + z >= z`` and a lower clip ``lo < z`` is never
   reached: set ``lo = z``. (onnxruntime's ``quantize_static`` with signed int8 activations and
   symmetric ranges, or a signed Brevitas quantizer after a ReLU, give this form.)
2. Offset removal: with ``lo == z`` (and integer ``z``) the quantizer equals
   ``s * clip(round(x/s), 0, hi - z)``: set ``zero_point = 0, lo = 0, hi = hi - z``. This is how
   an int8 quantizer with zero point -128 (onnxruntime, asymmetric int8 activations after a ReLU
   it removed) becomes the 255-level unsigned quantizer that a spiking neuron computes.
3. Centring: with ``z - lo == hi - z = L > 0`` the quantizer equals ``s * clip(round(x/s), -L, L)``:
   set ``zero_point = 0, lo = -L, hi = L``. Lowering makes such a *symmetric* quantizer a ternary
   population (docs/signed_spikes.md). int8's full range ``[-128, 127]`` is not symmetric (it
   keeps its form) unless a Clip narrows it, e.g. QCDQ ``Clip(-127, 127)`` or Brevitas / QONNX
   signed narrow-range quantizers.

Any other quantizer with ``lo < z`` on a tensor that may be negative keeps its form: lowering gives it the
split form (a ternary population plus clip corrections, docs/signed_spikes.md) where that costs fewer operations,
else the offset form (the neuron counts ``level - lo``, the offset moves into its bias and into the biases of its
readers), or refuses it where neither applies (an operand of an activation product).

Invariant established: every ``Quant`` with ``lo == zero_point`` or ``zero_point - lo == hi - zero_point``
has ``zero_point == 0``.
"""

from __future__ import annotations

from csdc.compiler.qgraph import QGraph, QNode


def _non_negative(tensor: str, prod: dict[str, QNode]) -> bool:
    p = prod.get(tensor)
    if p is not None and p.op_type == "MaxPool":
        p = prod.get(p.inputs[0])
    return p is not None and p.op_type == "Relu"


def canonicalize_zero_point(graph: QGraph) -> QGraph:
    """Normalize quantizer zero points (see module docstring)."""
    prod = graph.producers()
    out: list[QNode] = []
    for n in graph.nodes:
        if n.op_type != "Quant":
            out.append(n)
            continue
        a = dict(n.attrs)
        z = int(a["zero_point"])
        if a["lo"] < z <= a["hi"] and _non_negative(n.inputs[0], prod):
            a["lo"] = z
        if a["lo"] == z and z != 0:
            a.update(zero_point=0, lo=0, hi=int(a["hi"]) - z)
        elif z - a["lo"] == a["hi"] - z > 0 and z != 0:
            a.update(zero_point=0, lo=int(a["lo"]) - z, hi=int(a["hi"]) - z)
        out.append(n.with_(attrs=a) if a != n.attrs else n)
    return graph.with_nodes(out)


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare  # noqa: E402


def _offsets_normalized(graph: QGraph) -> str | None:
    bad = [n for n in graph.nodes if n.op_type == "Quant" and n.attrs["zero_point"] != 0
           and (n.attrs["lo"] == n.attrs["zero_point"] or n.attrs["zero_point"] - n.attrs["lo"] == n.attrs["hi"] - n.attrs["zero_point"])]
    return f"quantizer '{bad[0].name}' keeps zero point {bad[0].attrs['zero_point']} == lo" if bad else None


declare(canonicalize_zero_point, ensures=[_offsets_normalized])
