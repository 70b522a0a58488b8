"""validate_numbers: every constant a later pass reads is finite and consistent with its node.

Runs first, on the graph as loaded, so that no later pass ever computes with a value it cannot
represent (an infinite step becomes an infinite threshold, a NaN BatchNorm shift a NaN bias, an
axis that does not match its per-channel scale a silent broadcast). Checked, per node:

- every floating constant a node reads is finite (a Clip's bounds may be infinite: ``clip(x, -inf,
  inf)`` is ``x``; they may not be NaN);
- QuantizeLinear / DequantizeLinear: scales positive (QuantizeLinear: an activation step), the axis
  inside the input's rank, a per-channel scale (and zero point) with one entry per index of that axis;
- the Clip between a QuantizeLinear and its DequantizeLinear (a quantizer's integer range): bounds
  ordered (``min < max``) and containing the zero point. A range above the zero point makes the
  quantizer's lowest value non-zero with ``hi - zero_point`` levels but only ``hi - lo`` counts, which
  the spiking neuron does not reproduce; such a model is refused rather than approximated;
- DequantizeLinear of int32 constants (biases): ``x - zero_point`` inside int32, where executors agree
  (onnxruntime computes it in int32 and wraps around, the ONNX definition does not);
- BatchNormalization: ``running_var + epsilon > 0`` and a finite epsilon;
- Conv / Gemm: a bias with one entry per output channel (Gemm: or a single value).

Invariant established: the graph is unchanged; every problem found is reported at once as an
UnsupportedModelError naming the model, each node, its op and the tensor.
"""

from __future__ import annotations

import numpy as np

from csdc.compiler.qgraph import Dequantized, QGraph, QNode
from csdc.errors import UnsupportedModelError

# inputs of these ops that may legitimately be +-inf (never NaN)
_INFINITE_OK = {"Clip": (1, 2)}


def _values(graph: QGraph, name: str) -> np.ndarray | None:
    """The constant ``name`` if it is one; a dequantized constant is checked through its float scale
    (its integers are finite by construction) so that large weights are never expanded to floats."""
    if not name or name not in graph.constants:
        return None
    c = graph.constants[name]
    return c.scale if isinstance(c, Dequantized) else np.asarray(c)


def _shape(graph: QGraph, name: str) -> tuple[int, ...] | None:
    if name in graph.constants:
        return tuple(graph.constants[name].shape)
    s = graph.shapes.get(name)
    return tuple(s) if s is not None and all(isinstance(d, (int, np.integer)) and d > 0 for d in s) else None


def _first_where(bad: np.ndarray, values: np.ndarray) -> tuple[object, list[int]]:
    """The first element of ``values`` where ``bad`` holds, and its index (for the message)."""
    if not values.ndim:
        return values.item(), []
    first = np.argwhere(bad)[0].tolist()
    return values[tuple(first)], first


def _check_finite(graph: QGraph, n: QNode, problems: list) -> None:
    for i, name in enumerate(n.inputs):
        v = _values(graph, name)
        if v is None or v.dtype.kind not in "fc":
            continue
        bad = np.isnan(v) if i in _INFINITE_OK.get(n.op_type, ()) else ~np.isfinite(v)
        if np.any(bad):
            value, first = _first_where(bad, v)
            problems.append((n.name, n.op_type, f"constant '{name}' holds a non-finite value "
                             f"({value} at index {first}); export the model again "
                             "from a trained checkpoint (an infinite step, scale or BatchNorm statistic cannot be compiled)"))


def _check_quantize_axis(graph: QGraph, n: QNode, problems: list) -> None:
    x_shape = _shape(graph, n.inputs[0])
    scale = _values(graph, n.inputs[1]) if len(n.inputs) > 1 else None
    if scale is None:
        return
    if n.op_type == "QuantizeLinear" and scale.size and not np.all(scale > 0):
        problems.append((n.name, n.op_type, f"scale '{n.inputs[1]}' must be positive, got {scale.reshape(-1)[:4]}"))
    elif n.op_type == "DequantizeLinear" and scale.size and np.any(scale == 0) and scale.size == 1:
        problems.append((n.name, n.op_type, f"scale '{n.inputs[1]}' is 0"))
    zp = _values(graph, n.inputs[2]) if len(n.inputs) > 2 else None
    if scale.size <= 1:
        if zp is not None and zp.size > 1:
            problems.append((n.name, n.op_type, f"zero point '{n.inputs[2]}' has {zp.size} entries but the scale "
                             f"'{n.inputs[1]}' has one"))
        return
    if scale.ndim != 1:
        problems.append((n.name, n.op_type, f"per-channel scale '{n.inputs[1]}' must be 1-D, got shape {scale.shape}"))
        return
    if zp is not None and zp.size not in (1, scale.size):
        problems.append((n.name, n.op_type, f"zero point '{n.inputs[2]}' has {zp.size} entries, the scale "
                         f"'{n.inputs[1]}' {scale.size}"))
    if x_shape is None:
        return
    axis = n.attrs.get("axis", 1)
    if not isinstance(axis, (int, np.integer)) or not -len(x_shape) <= int(axis) < len(x_shape):
        problems.append((n.name, n.op_type, f"axis {axis} is outside the rank {len(x_shape)} of '{n.inputs[0]}'"))
        return
    if x_shape[int(axis)] != scale.size:
        problems.append((n.name, n.op_type, f"per-channel scale '{n.inputs[1]}' has {scale.size} entries but axis "
                         f"{axis} of '{n.inputs[0]}' {x_shape} has {x_shape[int(axis)]}; set the axis of the "
                         "channel dimension"))


def _check_quantizer_clip(graph: QGraph, clip: QNode, q: QNode, problems: list) -> None:
    zp_v = _values(graph, q.inputs[2]) if len(q.inputs) > 2 else None
    zp = int(np.asarray(zp_v).reshape(-1)[0]) if zp_v is not None and zp_v.size else 0
    bounds = []
    for i, key in ((1, "min"), (2, "max")):
        name = clip.inputs[i] if len(clip.inputs) > i else ""
        v = _values(graph, name) if name else None
        if v is not None and v.size:
            bounds.append(float(np.asarray(v).reshape(-1)[0]))
        elif not name and key in clip.attrs:
            bounds.append(float(clip.attrs[key]))
        else:
            bounds.append(-np.inf if key == "min" else np.inf)
    lo, hi = bounds
    if np.isnan(lo) or np.isnan(hi):
        return  # reported by _check_finite
    if lo >= hi:
        problems.append((clip.name, "Clip", f"quantizer range [{lo:g}, {hi:g}] (of QuantizeLinear '{q.name}') is empty or a "
                         "single level: min must be below max"))
    elif not lo <= zp <= hi:
        problems.append((clip.name, "Clip", f"quantizer range [{lo:g}, {hi:g}] (of QuantizeLinear '{q.name}') does not contain "
                         f"its zero point {zp}: its lowest value is not zero, which a spiking neuron does not reproduce "
                         "exactly; clip at the zero point (e.g. min = zero point)"))


def _check_batchnorm(graph: QGraph, n: QNode, problems: list) -> None:
    eps = n.attrs.get("epsilon", 1e-5)
    var = _values(graph, n.inputs[4]) if len(n.inputs) > 4 else None
    if not np.isfinite(float(eps)) or float(eps) < 0:
        problems.append((n.name, n.op_type, f"epsilon {eps} must be finite and >= 0"))
        return
    if var is not None and var.size and np.all(np.isfinite(var)) and np.any(var.astype(np.float64) + float(eps) <= 0):
        i = int(np.argmax(var.astype(np.float64).reshape(-1) + float(eps) <= 0))
        problems.append((n.name, n.op_type, f"running variance '{n.inputs[4]}' + epsilon is not positive at channel {i} "
                         f"({var.reshape(-1)[i]})"))
    shapes = [_shape(graph, i) for i in n.inputs[1:5]]
    sizes = {int(np.prod(s)) for s in shapes if s is not None}
    if len(sizes) > 1:
        problems.append((n.name, n.op_type, f"scale, bias, mean and variance have different lengths {shapes}"))


def _check_int32_offset(graph: QGraph, n: QNode, problems: list) -> None:
    if len(n.inputs) < 3 or not n.inputs[2] or n.inputs[0] not in graph.constants or n.inputs[2] not in graph.constants:
        return
    x, zp = graph.constants[n.inputs[0]], graph.constants[n.inputs[2]]
    if isinstance(x, Dequantized) or np.asarray(x).dtype != np.int32:
        return
    x, zp = np.asarray(x, dtype=np.int64), np.asarray(zp, dtype=np.int64)
    if zp.ndim == 1 and x.ndim > 1 and zp.size == x.shape[int(n.attrs.get("axis", 1)) % x.ndim]:
        zp = zp.reshape([zp.size if d == int(n.attrs.get("axis", 1)) % x.ndim else 1 for d in range(x.ndim)])
    try:
        diff = x - zp
    except ValueError:
        return  # a shape mismatch: _check_quantize_axis names it
    bad = (diff < np.iinfo(np.int32).min) | (diff > np.iinfo(np.int32).max)
    if np.any(bad):
        value, first = _first_where(bad, diff)
        problems.append((n.name, n.op_type, f"'{n.inputs[0]}' - zero point '{n.inputs[2]}' leaves int32 "
                         f"({int(value)} at index {first}): executors "
                         "disagree on it (onnxruntime wraps around); export the model again"))


def _check_bias(graph: QGraph, n: QNode, problems: list) -> None:
    if len(n.inputs) < 3 or not n.inputs[2]:
        return
    b_shape = _shape(graph, n.inputs[2])
    out_shape = _shape(graph, n.outputs[0])
    if b_shape is None:
        return
    b_size = int(np.prod(b_shape))
    if n.op_type == "Conv":
        w_shape = _shape(graph, n.inputs[1])
        channels = w_shape[0] if w_shape is not None else (out_shape[1] if out_shape is not None else None)
        if channels is not None and (len(b_shape) != 1 or b_size != channels):
            problems.append((n.name, n.op_type, f"bias '{n.inputs[2]}' has shape {b_shape}, the convolution has "
                             f"{channels} output channels"))
    elif out_shape is not None:  # Gemm: C broadcasts to (M, N); csdc takes one value or one per output
        channels = out_shape[-1]
        if b_size != 1 and b_shape[-1:] != (channels,) or b_size not in (1, channels):
            problems.append((n.name, n.op_type, f"bias '{n.inputs[2]}' has shape {b_shape}, the layer has "
                             f"{channels} outputs"))


def validate_numbers(graph: QGraph) -> QGraph:
    """Refuse non-finite or inconsistent constants (see module docstring); the graph is returned unchanged."""
    prod = graph.producers()
    problems: list[tuple[str, str, str]] = []
    for n in graph.nodes:
        _check_finite(graph, n, problems)
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            _check_quantize_axis(graph, n, problems)
            if n.op_type == "DequantizeLinear":
                _check_int32_offset(graph, n, problems)
        elif n.op_type == "Clip":
            src = prod.get(n.inputs[0])
            if src is not None and src.op_type == "QuantizeLinear":
                _check_quantizer_clip(graph, n, src, problems)
        elif n.op_type == "BatchNormalization":
            _check_batchnorm(graph, n, problems)
        elif n.op_type in ("Conv", "Gemm"):
            _check_bias(graph, n, problems)
    if problems:
        raise UnsupportedModelError(graph.path, problems)
    return graph


# contract (see csdc.compiler.passes)
from csdc.compiler.passes import declare  # noqa: E402


def _constants_finite(graph: QGraph) -> str | None:
    for n in graph.nodes:
        for k, name in enumerate(n.inputs):
            v = _values(graph, name)
            if v is None or v.dtype.kind != "f" or k in _INFINITE_OK.get(n.op_type, ()):
                continue
            if not np.all(np.isfinite(v)):
                return f"node '{n.name}' reads the non-finite constant '{name}'"
    return None


declare(validate_numbers, ensures=[_constants_finite])
