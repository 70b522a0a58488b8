"""Lower a canonical quantized graph to the spiking IR, absorbing every real scale into integers.

Each ONNX tensor is tracked as one of:

- :class:`Spikes`: ``real = step * count + offset`` of a spiking IR node (a quantizer's output; the
  offset ``step * (lo - zero_point)`` is non-zero for a signed quantizer, whose lowest level is count 0);
- :class:`Encoded`: the input levels ``q`` delivered every step; ``real = unit * total`` with
  ``total = T * q`` and ``unit = scale / T``;
- :class:`Affine`: ``real = sum_t unit_t * I_t + bias`` (per element), a sum of *terms*: pending
  synapses (integer weights still free to be rescaled) or *fixed* IR currents;
- :class:`Pooled`: a global average over some axes of a spike tensor, applied by the next layer
  (one synapse per pooled position with shared weights, then a :class:`ReduceSum`).

Units, biases and thresholds are *broadcast arrays* (:mod:`csdc.compiler.broadcast`): per
element in meaning, stored at the size of what varies (per channel), so lowering costs time and
memory in proportion to the parameters, not to the activation sizes.

Materializing an :class:`Affine` into integer currents picks one unit ``U`` per element
(SPEC 2.3) from the *anchor* group, the one with the most weights: ``U = |unit| / 2^k``, so its
weights are ``w_int * sign`` with exponent ``k`` (exact, and as narrow as the source's). Every
other group (a residual branch of a sum) gets weights ``round(w_int * unit_g / U)``. ``k`` is
chosen so that the reader's threshold ``step / U`` has at least ``frac_bits`` significant bits,
so each rounding is worth at most ``2^-(frac_bits + 1)`` of a quantization level (reported).
A quantizer consuming it becomes a
:class:`Neuron` with ``threshold = round(step / U)`` (``k`` chosen so that every threshold has at
least ``frac_bits`` significant bits), bias total ``B = round(bias / U)`` delivered as
``floor(B / T)`` per step with the remainder in ``v0 = floor(threshold / 2) + rem``. Ties round
half up (ONNX rounds half to even; exact ties are rare once thresholds are not powers of two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from csdc.compiler import broadcast
from csdc.compiler.qgraph import QGraph, QNode
from csdc.errors import UnsupportedModelError
from csdc.ir.graph import Network
from csdc.ir.ops import (Add, ConvSynapse, DenseSynapse, DiagonalSynapse, Encode, Neuron, Readout, ReduceSum, Reshape,
                         SpikeMatMul, SpikeMaxPool, SumPool, Transpose, narrowest,
                         power_of_two_exponent)
from csdc.ir.semantics import conv as conv_counts
from csdc.ir.semantics import sum_pool


@dataclass
class Spikes:
    node: str
    step: float
    offset: float = 0.0  # real = step * count + offset: a quantizer whose levels start below its zero point


@dataclass
class Encoded:
    node: str
    unit: float


@dataclass
class Term:
    """A current: a pending synapse from ``src`` (kind dense/conv/diag), a pending spike product
    ``src x src2`` (kind matmul), or a ``fixed`` IR current."""

    kind: str
    src: str
    unit: np.ndarray  # real value of one integer unit, per output element (signed; a broadcast array)
    w_int: np.ndarray | None = None
    conv: dict = field(default_factory=dict)
    src2: str = ""
    origin: str = ""  # the source node whose weights these are (for --explain)
    reduce: tuple[int, ...] = ()  # axes of the synapse's output summed by a ReduceSum (global pooling)

    def weight_count(self) -> int:
        return int(self.w_int.size) if self.w_int is not None else 0


@dataclass
class Affine:
    terms: list[Term]
    bias: np.ndarray  # per element (a broadcast array)


@dataclass
class Pooled:
    spikes: Spikes
    axes: tuple[int, ...]  # axes of the spike tensor that are averaged
    shape: tuple[int, ...]  # the pooled tensor's shape as the source model sees it


@dataclass
class LoweringReport:
    T: int = 0
    threshold_error: float = 0.0  # worst |theta - theta_real| / theta_real
    weight_error: float = 0.0  # worst relative rounding of a rescaled integer weight
    bias_error: float = 0.0  # worst |B - B_real| / theta (in units of one spike)
    float_weight_error: float = 0.0  # worst relative error of weights quantized by csdc
    warnings: list[str] = field(default_factory=list)
    explain: dict[str, list[str]] = field(default_factory=dict)


class Lowering:
    def __init__(self, graph: QGraph, frac_bits: int, delay: int | None):
        self.g = graph
        self.frac_bits = int(frac_bits)
        self.delay_opt = delay
        self.vals: dict[str, object] = {}
        self.report = LoweringReport()
        self.cons = graph.consumers()
        self.problems: list[tuple[str, str, str]] = []
        self.current_node = ""
        self.T = self._find_T()
        self.delay = self.T if delay is None else int(delay)
        self.net = Network(self.T)

    # -- helpers ------------------------------------------------------------------------
    def _find_T(self) -> int:
        # quantizers that become neurons: not the input's (Encode) nor the output's (readout)
        hidden = [n for n in self.g.nodes if n.op_type == "Quant" and n.inputs[0] != self.g.input and n.outputs[0] != self.g.output]
        if not hidden:
            raise UnsupportedModelError(self.g.path, [("<graph>", "-", "the model has no activation quantizers between layers "
                                        "(a float model); quantize it first (QAT with LSQ, Brevitas, or onnxruntime quantize_static)")])
        levels: dict[int, list[str]] = {}
        for n in hidden:
            levels.setdefault(n.attrs["hi"] - min(n.attrs["lo"], n.attrs["zero_point"]), []).append(n.name)
        if len(levels) > 1:
            desc = "; ".join(f"{L} levels: {', '.join(ns[:3])}{'...' if len(ns) > 3 else ''}" for L, ns in sorted(levels.items()))
            raise UnsupportedModelError(self.g.path, [("<graph>", "Quant", "activation quantizers must share one number of "
                                        f"levels (= time steps T), found {desc}")])
        return next(iter(levels))

    def name(self, base: str) -> str:
        # '/blocks.0/attn/q_q/QuantizeLinear' -> 'blocks.0/attn/q_q': keep the module path, drop the op suffix
        base = base.strip("/")
        for suffix in ("/QuantizeLinear", "_QuantizeLinear", "QuantizeLinear"):
            if base.endswith(suffix) and len(base) > len(suffix):
                base = base[: -len(suffix)]
        base = base.strip("/_") or "node"
        cand, i = base, 1
        while cand in self.net:
            i += 1
            cand = f"{base}_{i}"
        return cand

    def add(self, base: str, op, inputs: list[str]) -> str:
        nm = self.net.add(self.name(base), op, inputs)
        self.report.explain.setdefault(self.current_node, []).append(f"{nm} ({type(op).__name__})")
        return nm

    def fail(self, node: QNode, reason: str) -> None:
        self.problems.append((node.name, node.op_type, reason))

    def sample_shape(self, tensor: str) -> tuple[int, ...]:
        return self.g.sample_shape(tensor)

    def const_per_element(self, const: np.ndarray, tensor: str) -> np.ndarray | None:
        """A constant as a broadcast array over the per-sample shape of ``tensor`` (None if it varies
        over the batch axis or does not broadcast)."""
        full = self.g.shapes[tensor]
        c = np.asarray(const, dtype=np.float64)
        if c.ndim > len(full):
            return None
        c = c.reshape((1,) * (len(full) - c.ndim) + c.shape)
        if c.shape[0] != 1:
            return None
        try:
            if np.broadcast_shapes(c.shape[1:], tuple(full[1:])) != tuple(full[1:]):
                return None
        except ValueError:
            return None
        return c[0]

    # -- materialization ------------------------------------------------------------------
    def _channel_mult(self, term: Term, mult: np.ndarray) -> np.ndarray:
        """Multiplier of a synapse term's weights: per output channel for dense/conv (1-D), one
        number for an activation product; it must not vary within a channel."""
        m = broadcast.squeeze_constant(mult, rtol=1e-9)
        if term.kind == "diag":
            return m
        if term.kind == "matmul":
            if m.size != 1:
                raise UnsupportedModelError(self.g.path, [(self.current_node, "MatMul", "a per-element scale after an "
                                            "activation product cannot be absorbed; scale by a scalar only")])
            return m.reshape(())
        spread = m.shape[1:] if term.kind == "conv" else m.shape[:-1]
        if any(d != 1 for d in spread):
            raise UnsupportedModelError(self.g.path, [(self.current_node, "-", "a per-position scale cannot be "
                                        "absorbed into shared synaptic weights; quantize before this layer")])
        return m.reshape(-1)

    def _rounded(self, exact: np.ndarray) -> np.ndarray:
        """Integers nearest ``exact`` (int64); the worst relative rounding goes into the report."""
        w = np.rint(exact)
        nz = exact != 0
        if np.any(nz):
            err = float(np.max(np.abs(w[nz] - exact[nz]) / np.abs(exact[nz])))
            self.report.weight_error = max(self.report.weight_error, err)
        return w.astype(np.int64)

    ROUNDING_CHUNK = 1 << 16  # weights rounded at a time: float temporaries stay small for any layer size

    def scaled_weights(self, w_int: np.ndarray, mult: np.ndarray) -> tuple[np.ndarray, int]:
        """(mantissa, exponent) of ``w_int`` times a per-output-channel multiplier ``mult``.

        The anchor group's multiplier is ``+-2^k`` on every channel: its mantissa is ``w_int`` itself
        (times the channel signs), with no copy when all signs are positive. Other groups are rounded,
        a block of output channels at a time."""
        shape = (-1,) + (1,) * (w_int.ndim - 1)
        a = np.abs(mult)
        k = math.log2(a.flat[0]) if a.size and a.flat[0] > 0 else -1.0
        if a.size and np.all(a == a.flat[0]) and k >= 0 and k == int(k):
            if np.all(mult > 0):
                return w_int, int(k)
            signed = w_int.astype(np.int64) * np.sign(mult).astype(np.int64).reshape(shape)
            return narrowest(signed), int(k)
        mult = np.broadcast_to(mult, (w_int.shape[0],)).reshape(shape)
        rows = max(1, self.ROUNDING_CHUNK // max(1, int(np.prod(w_int.shape[1:]))))
        w = np.empty(w_int.shape, dtype=np.int64)
        for r in range(0, w_int.shape[0], rows):
            w[r:r + rows] = self._rounded(w_int[r:r + rows] * mult[r:r + rows])
        return split_power_of_two(w)

    def downstream_step(self, tensor: str) -> float | None:
        """Smallest step of the quantizers that read ``tensor`` through residual Adds and routing."""
        steps, todo, seen = [], [tensor], set()
        while todo:
            t = todo.pop()
            for c in self.cons.get(t, []):
                if c.name in seen:
                    continue
                seen.add(c.name)
                if c.op_type == "Quant" and c.outputs[0] != self.g.output:
                    steps.append(float(c.attrs["scale"]))
                elif c.op_type in ("Add", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze"):
                    todo.append(c.outputs[0])
        return min(steps) if steps else None

    def materialize(self, value: Affine, base: str, k: int | None, step: float | None) -> tuple[str, np.ndarray]:
        """Create the IR currents of ``value``; returns (node, U) with ``real = U * I + bias``.

        ``step``: the quantization step of the reader (sets ``k``)."""
        fixed = [t for t in value.terms if t.kind == "fixed"]
        free = [t for t in value.terms if t.kind != "fixed"]
        if fixed:
            U = np.abs(fixed[0].unit)
            for t in fixed[1:]:
                if not np.allclose(np.abs(t.unit), U, rtol=1e-12, atol=0):
                    raise UnsupportedModelError(self.g.path, [(self.current_node, "Add", "adds two residual streams with "
                                                "different units; csdc supports one stream plus branches")])
        else:
            # the anchor keeps exact weights: the group with the most weights, else the finest unit
            anchor = max(free, key=lambda t: (t.weight_count(), -float(np.min(np.abs(t.unit)))))
            ubase = np.abs(anchor.unit)
            positive = ubase[ubase > 0]
            ubase = np.where(ubase > 0, ubase, positive.min() if positive.size else 1.0)
            if k is None:
                if step is None:
                    k = self.frac_bits
                else:
                    theta0 = float(np.min(step / ubase))
                    k = max(0, math.ceil(self.frac_bits - math.log2(theta0)))
            U = ubase / float(2 ** k)
        currents = []
        reader = self.current_node
        for t in value.terms:
            if t.kind == "fixed":
                currents.append(t.src)
                continue
            self.current_node = t.origin or reader
            mult = self._channel_mult(t, t.unit / U)
            if t.kind == "matmul":
                w = int(self._rounded(mult))
                if w == 0:
                    raise UnsupportedModelError(self.g.path, [(self.current_node, "MatMul", "an activation product "
                                                "vanishes at this precision; raise --frac-bits")])
                node = self.add(f"{base}_matmul", SpikeMatMul(w), [t.src, t.src2])
            elif t.kind == "diag":
                in_shape = self.net.info(t.src).shape
                w = self._rounded(mult)
                if t.reduce:  # the multiplier is per element of the summed output: repeat it over the summed axes
                    w = np.expand_dims(w, t.reduce)
                mant, e = split_power_of_two(w)
                node = self.add(f"{base}_syn", DiagonalSynapse(np.broadcast_to(mant, in_shape), exponent=e), [t.src])
            else:
                mant, e = self.scaled_weights(t.w_int, mult)
                op = ConvSynapse(mant, exponent=e, **t.conv) if t.kind == "conv" else DenseSynapse(mant, exponent=e)
                node = self.add(f"{base}_syn", op, [t.src])
            if t.reduce:
                node = self.add(f"{base}_sum_over", ReduceSum(t.reduce), [node])
            currents.append(node)
        self.current_node = reader
        node = currents[0] if len(currents) == 1 else self.add(f"{base}_sum", Add(), currents)
        return node, U

    def neuron(self, value: Affine, q: QNode) -> Spikes:
        step = float(q.attrs["scale"])
        node, U = self.materialize(value, q.name, None, step)
        theta_real = step / U
        theta = np.maximum(np.rint(theta_real), 1).astype(np.int64)
        self.report.threshold_error = max(self.report.threshold_error, float(np.max(np.abs(theta - theta_real) / theta_real)))
        b_real = value.bias / U
        B = np.rint(b_real).astype(np.int64)
        self.report.bias_error = max(self.report.bias_error, float(np.max(np.abs(B - b_real) / theta)))
        T = self.T
        b = np.floor_divide(B, T)
        v0 = theta // 2 + (B - T * b)
        shape = self.net.info(node).shape
        full = [np.broadcast_to(broadcast.squeeze_constant(a), shape) for a in (theta, v0, b)]
        nm = self.add(q.name, Neuron(*full, self.delay), [node])
        return Spikes(nm, step)

    def as_affine(self, tensor: str, node: QNode) -> Affine | None:
        v = self.vals.get(tensor)
        shape = self.sample_shape(tensor)
        if isinstance(v, Affine):
            return v
        if isinstance(v, Spikes):
            return Affine([Term("diag", v.node, np.full((1,) * len(shape), v.step))], np.full((1,) * len(shape), v.offset))
        self.fail(node, "its input is not a spike or current tensor csdc can add (quantize it first)")
        return None

    def settle(self, tensor: str, value: object) -> object:
        """A current read by several consumers is made into one IR current, shared by all."""
        if isinstance(value, Affine) and len(self.cons.get(tensor, [])) > 1 and any(t.kind != "fixed" for t in value.terms):
            node, U = self.materialize(value, tensor, None, self.downstream_step(tensor) if len(value.terms) > 1 else None)
            return Affine([Term("fixed", node, U)], value.bias)
        return value

    # -- ops ------------------------------------------------------------------------------
    def lower_quant(self, n: QNode) -> None:
        a = n.attrs
        if n.inputs[0] == self.g.input:
            if n.inputs[0] in self.vals:
                self.fail(n, "the model input is quantized twice")
                return
            lo, hi = a["lo"] - a["zero_point"], a["hi"] - a["zero_point"]
            nm = self.add("input", Encode(self.sample_shape(n.inputs[0]), a["scale"], lo, hi), [])
            self.vals[n.outputs[0]] = Encoded(nm, a["scale"] / self.T)
            return
        src = self.vals.get(n.inputs[0])
        if n.outputs[0] == self.g.output and isinstance(src, Affine):
            self.lower_output_quant(n, src)
            return
        # levels below the zero point: the neuron counts c = level - lo in 0..hi-lo; the input gets +m*step
        # (round(x/s) + z - lo == round(x/s + m), m integer) and the value is step * c - m * step
        m = int(a["zero_point"]) - int(a["lo"])
        offset = -m * float(a["scale"])
        if isinstance(src, Spikes):
            if math.isclose(src.step, a["scale"], rel_tol=1e-6) and math.isclose(src.offset, offset, rel_tol=1e-9, abs_tol=1e-12):
                self.vals[n.outputs[0]] = src  # requantizing spikes on the same grid changes nothing
                return
            src = self.as_affine(n.inputs[0], n)  # a new grid: one-to-one synapses into a new population
        if isinstance(src, Pooled):
            src = self.pooled_dense(src, None, None, None, n)
            if src is None:
                return
        if not isinstance(src, Affine):
            self.fail(n, "its input is not a current csdc can integrate")
            return
        if m:
            src = Affine(list(src.terms), src.bias + m * float(a["scale"]))
        sp = self.neuron(src, n)
        self.vals[n.outputs[0]] = Spikes(sp.node, sp.step, offset)

    def lower_output_quant(self, n: QNode, src: Affine) -> None:
        """A quantizer on the logits (onnxruntime adds one). With as many levels as time steps it is
        applied exactly: the offset ``m = zero_point - lo`` moves into the neuron's bias
        (``clip(round(x/s) + z, lo, hi) - lo = clip(round(x/s + m), 0, hi - lo)``) and back out of the
        readout (``y = s * count - s * m``), so a signed or zero-point range needs no negative spikes.
        Otherwise the logits are read out unquantized and the error is reported."""
        a = n.attrs
        s, L, m = float(a["scale"]), int(a["hi"]) - int(a["lo"]), int(a["zero_point"]) - int(a["lo"])
        shape = self.sample_shape(n.outputs[0])
        if L == self.T:
            spikes = self.neuron(Affine(list(src.terms), src.bias + m * s), n)
            one = (1,) * len(shape)
            self.vals[n.outputs[0]] = Affine([Term("diag", spikes.node, np.full(one, s))], np.full(one, -m * s))
            return
        self.report.warnings.append(
            f"quantizer '{n.name}' on the network output has {L} levels but the network runs T = {self.T} steps: it "
            f"is not applied, logits are reported unquantized (they differ from the source's by at most {s / 2:.3g} = "
            f"step/2 inside [{s * (a['lo'] - a['zero_point']):.3g}, {s * (a['hi'] - a['zero_point']):.3g}], more outside; "
            "argmax can differ only where the source's quantized logits tie)")
        self.vals[n.outputs[0]] = src

    def pooled_dense(self, p: Pooled, w: np.ndarray | None, w_scale: np.ndarray | None, bias: np.ndarray | None,
                     n: QNode) -> Affine | None:
        """A dense layer (``w``: (out, features); None: the identity) on a global average of spikes.

        The averaged axes move first and the kept ones are flattened last, so the spikes are
        (positions, features); a synapse with the layer's weights, shared by every position, feeds
        a ReduceSum over the positions, and ``1/positions`` goes into the unit. Same events and
        currents as one synapse with the weights repeated per position, at the weights' size."""
        src = p.spikes.node
        shape = self.net.info(src).shape
        kept = tuple(d for d in range(len(shape)) if d not in p.axes)
        positions = int(np.prod([shape[d] for d in p.axes]))
        features = int(np.prod([shape[d] for d in kept]))
        if w is not None and w.shape[1] != features:
            self.fail(n, f"pooled input has {features} features but the weights expect {w.shape[1]}")
            return None
        perm = tuple(p.axes) + kept
        if perm != tuple(range(len(shape))):
            src = self.add(f"{n.name}_positions_first", Transpose(perm), [src])
        if self.net.info(src).shape != (positions, features):
            src = self.add(f"{n.name}_positions", Reshape((positions, features)), [src])
        step, offset = p.spikes.step / positions, p.spikes.offset
        if w is None:
            return Affine([Term("diag", src, np.full(1, step), origin=n.name, reduce=(0,))], np.full(1, offset))
        w_scale = np.asarray(w_scale, dtype=np.float64).reshape(-1)
        term = Term("dense", src, broadcast.per_axis(step * w_scale, 1, 0), w, origin=n.name, reduce=(0,))
        # the mean of a constant offset is the offset
        return Affine([term], broadcast.per_axis(bias + offset * w_scale * w.sum(axis=1), 1, 0))

    def lower_linear(self, n: QNode) -> None:
        a = n.attrs
        src = self.vals.get(n.inputs[0])
        out_shape = self.sample_shape(n.outputs[0])
        self.report.float_weight_error = max(self.report.float_weight_error, float(a.get("weight_error", 0.0)))
        if isinstance(src, Pooled):
            if a["kind"] != "dense" or len(out_shape) != 1:
                self.fail(n, "only a dense layer producing a vector may follow a global average pool")
                return
            val = self.pooled_dense(src, a["w_int"], a["w_scale"], a["bias"], n)
            if val is not None:
                self.vals[n.outputs[0]] = val
            return
        offset = 0.0
        if isinstance(src, Spikes):
            node, in_unit, offset = src.node, src.step, src.offset
        elif isinstance(src, Encoded):
            node, in_unit = src.node, src.unit
        else:
            self.fail(n, "consumes a tensor that is not quantized; put an activation quantizer before every linear layer")
            return
        w_scale = np.asarray(a["w_scale"], dtype=np.float64).reshape(-1)
        if a["kind"] == "conv":
            per = lambda v: broadcast.per_axis(v, 3, 0)  # noqa: E731
            conv = {"stride": a["strides"], "padding": a["pads"], "dilation": a["dilations"], "groups": a["group"]}
            term = Term("conv", node, per(in_unit * w_scale), a["w_int"], conv, origin=n.name)
            bias = per(a["bias"])
            if offset:  # sum of the weights over each window's in-image taps (zero padding adds no offset)
                ones = np.ones((1, *self.sample_shape(n.inputs[0])), dtype=np.int64)
                taps = conv_counts(ConvSynapse(a["w_int"], **conv), ones)[0]
                bias = broadcast.squeeze_constant(bias + offset * per(w_scale) * taps)
        else:
            per = lambda v: broadcast.per_axis(v, len(out_shape), len(out_shape) - 1)  # noqa: E731
            term = Term("dense", node, per(in_unit * w_scale), a["w_int"], origin=n.name)
            bias = per(a["bias"] + offset * w_scale * a["w_int"].sum(axis=1))
        self.vals[n.outputs[0]] = self.settle(n.outputs[0], Affine([term], bias))

    def lower_add_mul(self, n: QNode) -> None:
        a, b = n.inputs
        const = b if self.g.is_const(b) else a if self.g.is_const(a) else None
        data = a if const == b else b
        if n.op_type == "Add" and const is None:
            va, vb = self.as_affine(a, n), self.as_affine(b, n)
            if va is None or vb is None:
                return
            out = Affine(va.terms + vb.terms, va.bias + vb.bias)
            self.vals[n.outputs[0]] = self.settle(n.outputs[0], out)
            return
        if const is None or (n.op_type == "Div" and const != b):
            self.fail(n, f"{n.op_type} of two tensors is not spike-driven; only constants may scale or shift a tensor")
            return
        c = self.const_per_element(self.g.constants[const], n.outputs[0])
        if c is None:
            self.fail(n, "the constant must not vary along the batch axis")
            return
        src = self.vals.get(data)
        if n.op_type != "Add" and isinstance(src, Spikes) and np.all(c == c.flat[0]) and c.flat[0] > 0:
            f = c.flat[0] if n.op_type == "Mul" else 1.0 / c.flat[0]
            self.vals[n.outputs[0]] = Spikes(src.node, src.step * f, src.offset * f)
            return
        v = self.as_affine(data, n)
        if v is None:
            return
        if n.op_type == "Add":
            out = Affine(list(v.terms), v.bias + c)
        else:
            f = c if n.op_type == "Mul" else 1.0 / c
            if any(t.kind == "fixed" for t in v.terms) and not np.all(f == 1):
                self.fail(n, "scales a shared residual stream; fold the constant into the layers that produce it")
                return
            out = Affine([Term(t.kind, t.src, t.unit * f, t.w_int, t.conv, t.src2, t.origin) for t in v.terms], v.bias * f)
        self.vals[n.outputs[0]] = self.settle(n.outputs[0], out)

    def lower_matmul(self, n: QNode) -> None:
        """Product of two quantized activations: a TDEC SpikeMatMul with unit step_a * step_b."""
        a, b = (self.vals.get(i) for i in n.inputs)
        if not (isinstance(a, Spikes) and isinstance(b, Spikes)):
            self.fail(n, "a MatMul of two activations needs an activation quantizer on both inputs "
                         "(e.g. Q and K after their quantizers); quantize the operand(s) first")
            return
        if a.offset or b.offset:
            self.fail(n, "an operand of this activation product comes from a signed quantizer (levels below its zero "
                         "point); the spike product needs non-negative counts: put a ReLU before that quantizer or make "
                         "it unsigned")
            return
        sa, sb = self.net.info(a.node).shape, self.net.info(b.node).shape
        if len(sa) != len(sb) or len(sa) < 2 or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
            self.fail(n, f"operands of shapes {sa} and {sb} need equal leading axes and (M, K) x (K, N); "
                         "reshape/transpose explicitly instead of broadcasting")
            return
        out_shape = self.sample_shape(n.outputs[0])
        one = (1,) * len(out_shape)
        term = Term("matmul", a.node, np.full(one, a.step * b.step), src2=b.node, origin=n.name)
        self.vals[n.outputs[0]] = self.settle(n.outputs[0], Affine([term], np.zeros(one)))

    def lower_maxpool(self, n: QNode) -> None:
        src = self.vals.get(n.inputs[0])
        a = n.attrs
        if not isinstance(src, Spikes):
            self.fail(n, "max pooling must act on a quantized tensor: place it directly before or after an activation quantizer")
            return
        if a.get("ceil_mode", 0) or any(d != 1 for d in a.get("dilations", [1, 1])) or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
            self.fail(n, "MaxPool with ceil_mode, dilation or auto_pad SAME is not supported")
            return
        k = a["kernel_shape"]
        op = SpikeMaxPool(tuple(k), tuple(a.get("strides", [1, 1])), tuple(a.get("pads", [0, 0, 0, 0])))
        self.vals[n.outputs[0]] = Spikes(self.add(n.name, op, [src.node]), src.step, src.offset)

    def lower_avgpool(self, n: QNode) -> None:
        src = self.vals.get(n.inputs[0])
        if not isinstance(src, Spikes):
            self.fail(n, "average pooling must act on a quantized tensor")
            return
        shape = self.net.info(src.node).shape
        if n.op_type == "GlobalAveragePool":
            axes = tuple(range(1, len(shape)))
        elif n.op_type == "ReduceMean":
            ax = n.attrs.get("axes")
            if ax is None and len(n.inputs) > 1 and n.inputs[1]:
                ax = list(self.g.constants[n.inputs[1]])
            if ax is None or any(int(x) % (len(shape) + 1) == 0 for x in ax):
                self.fail(n, "ReduceMean must reduce over non-batch axes given as constants")
                return
            axes = tuple(sorted(int(x) % (len(shape) + 1) - 1 for x in ax))
        else:  # AveragePool: a depthwise convolution with unit weights
            a = n.attrs
            if a.get("ceil_mode", 0) or a.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
                self.fail(n, "AveragePool with ceil_mode or auto_pad SAME is not supported")
                return
            kh, kw = a["kernel_shape"]
            pads = tuple(a.get("pads", [0, 0, 0, 0]))
            C = shape[0]
            ones = np.ones((C, 1, kh, kw), dtype=np.int8)
            div = np.full((1, 1, 1), float(kh * kw))
            if any(pads) and not a.get("count_include_pad", 0):
                cnt = sum_pool(SumPool((kh, kw), tuple(a.get("strides", [1, 1])), pads), np.ones((1, *shape), np.int64))[0]
                div = broadcast.squeeze_constant(cnt.astype(np.float64))
            conv = {"stride": tuple(a.get("strides", [1, 1])), "padding": pads, "dilation": (1, 1), "groups": C}
            bias = np.zeros((1, 1, 1))
            if src.offset:
                taps = conv_counts(ConvSynapse(ones, **conv), np.ones((1, *shape), np.int64))[0]
                bias = broadcast.squeeze_constant(src.offset * taps / div)
            self.vals[n.outputs[0]] = Affine([Term("conv", src.node, src.step / div, ones, conv, origin=n.name)], bias)
            return
        if len(axes) == len(shape):
            self.fail(n, "averages every axis of a sample into one number; keep the channel or feature axis")
            return
        self.vals[n.outputs[0]] = Pooled(src, axes, self.sample_shape(n.outputs[0]))

    def lower_route(self, n: QNode) -> None:
        src = self.vals.get(n.inputs[0])
        out_shape = self.sample_shape(n.outputs[0])
        if isinstance(src, Pooled):
            self.vals[n.outputs[0]] = Pooled(src.spikes, src.axes, out_shape)
            return
        if n.op_type == "Transpose":
            perm = list(n.attrs.get("perm", range(len(self.g.shapes[n.inputs[0]]))[::-1]))
            if perm[0] != 0:
                self.fail(n, "a transpose may not move the batch axis")
                return
            op = Transpose(tuple(p - 1 for p in perm[1:]))
        else:
            op = Reshape(out_shape)
        if isinstance(src, Spikes):
            self.vals[n.outputs[0]] = Spikes(self.add(n.name, op, [src.node]), src.step, src.offset)
        elif isinstance(src, Encoded):
            self.vals[n.outputs[0]] = Encoded(self.add(n.name, op, [src.node]), src.unit)
        elif isinstance(src, Affine):
            node, U = self.materialize(src, n.name, None, None)
            routed = self.add(n.name, op, [node])
            if isinstance(op, Transpose):
                U, bias = np.transpose(U, op.perm), np.transpose(src.bias, op.perm)
            else:
                in_shape = self.sample_shape(n.inputs[0])
                U, bias = broadcast.reshape(U, in_shape, out_shape), broadcast.reshape(src.bias, in_shape, out_shape)
            self.vals[n.outputs[0]] = Affine([Term("fixed", routed, U)], bias)
        else:
            self.fail(n, "routes a tensor csdc cannot represent")

    def lower_output(self) -> None:
        out = self.g.output
        v = self.vals.get(out)
        self.current_node = "<output>"
        if isinstance(v, Spikes):
            one = (1,) * len(self.net.info(v.node).shape)
            v = Affine([Term("diag", v.node, np.full(one, v.step))], np.full(one, v.offset))
        if isinstance(v, Pooled):
            v = self.pooled_dense(v, None, None, None, QNode("<output>", "-", (), ()))
        if not isinstance(v, Affine):
            raise UnsupportedModelError(self.g.path, [(out, "-", "the network output could not be lowered")])
        if len(self.sample_shape(out)) != 1:
            raise UnsupportedModelError(self.g.path, [(out, "-", f"the output must be a vector of class scores per sample, got shape {self.g.shapes[out]}")])
        # a single synapse group is exact with k = 0; sums of groups get frac_bits of headroom
        k = 0 if len(v.terms) == 1 and v.terms[0].kind != "fixed" else None
        node, U = self.materialize(v, "logits", k, None)
        shape = self.net.info(node).shape
        self.add("readout", Readout(np.broadcast_to(U, shape), np.broadcast_to(v.bias, shape)), [node])

    def run(self) -> tuple[Network, LoweringReport]:
        handlers = {"Quant": self.lower_quant, "Linear": self.lower_linear, "MatMul": self.lower_matmul, "Add": self.lower_add_mul, "Mul": self.lower_add_mul,
                    "Div": self.lower_add_mul, "MaxPool": self.lower_maxpool, "AveragePool": self.lower_avgpool,
                    "GlobalAveragePool": self.lower_avgpool, "ReduceMean": self.lower_avgpool, "Flatten": self.lower_route,
                    "Reshape": self.lower_route, "Transpose": self.lower_route, "Squeeze": self.lower_route, "Unsqueeze": self.lower_route}
        for c in self.cons.get(self.g.input, []):
            if c.op_type != "Quant":
                self.fail(c, "reads the model input directly; the input must go through a quantizer "
                             "(QuantizeLinear -> DequantizeLinear) that defines the integer pixel levels")
        for n in self.g.nodes:
            self.current_node = n.name
            h = handlers.get(n.op_type)
            if h is None:
                hint = ("ReLU is only supported right before an activation quantizer" if n.op_type == "Relu"
                        else "no spike-driven lowering in this position")
                self.fail(n, hint)
                continue
            if any(i and i not in self.vals and not self.g.is_const(i) and i != self.g.input for i in n.inputs):
                continue  # an upstream problem was already reported
            h(n)
        if self.problems:
            raise UnsupportedModelError(self.g.path, self.problems)
        self.lower_output()
        self.report.T = self.T
        return self.net, self.report


def split_power_of_two(w: np.ndarray) -> tuple[np.ndarray, int]:
    """(mantissa in the narrowest integer dtype, exponent) with ``w == mantissa * 2**exponent`` and the
    exponent as large as possible (the weights' common power of two)."""
    e = power_of_two_exponent(w)
    return narrowest(w >> e if e else w), e


def lower(graph: QGraph, frac_bits: int = 8, delay: int | None = None) -> tuple[Network, LoweringReport]:
    """Lower a canonical QGraph (after the canonicalization passes) to a spiking Network."""
    return Lowering(graph, frac_bits, delay).run()
