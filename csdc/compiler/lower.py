"""Lower a canonical quantized graph to the spiking IR, absorbing every real scale into integers.

Each ONNX tensor is tracked as one of:

- :class:`Spikes`: ``real = step * count + offset`` of a spiking IR node (a quantizer's output; the
  offset ``step * (lo - zero_point)`` is non-zero for a signed quantizer, whose lowest level is count 0);
- :class:`Encoded`: the input levels ``q`` delivered every step; ``real = unit * total`` with
  ``total = T * q`` and ``unit = scale / T``;
- :class:`Affine`: ``real = sum_t unit_t * I_t + bias`` (per element), a sum of *terms*: pending
  synapses (integer weights still free to be rescaled) or *fixed* IR currents;
- :class:`Pooled`: an average over some axes of a spike tensor, folded into the next layer.

Materializing an :class:`Affine` into integer currents picks one unit ``U`` per element
(SPEC 2.3): with a single group ``U = |unit| / 2^k`` and weights ``w_int * sign * 2^k`` (exact);
with several groups (residual sums) the unit is set by the resolution that matters, the step
``s`` of the quantizer that reads the sum: ``U = s / 2^frac_bits`` (so that threshold is an
exact power of two) and weights ``round(w_int * unit_g / U)``, each rounding worth at most
``2^-(frac_bits + 1)`` of a quantization level (reported). A quantizer consuming it becomes a
:class:`Neuron` with ``threshold = round(step / U)`` (``k`` chosen so that every threshold has at
least ``frac_bits`` significant bits), bias total ``B = round(bias / U)`` delivered as
``floor(B / T)`` per step with the remainder in ``v0 = floor(threshold / 2) + rem``. Ties round
half up (ONNX rounds half to even; exact ties are rare once thresholds are not powers of two).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from csdc.compiler.qgraph import QGraph, QNode
from csdc.errors import UnsupportedModelError
from csdc.ir.graph import Network
from csdc.ir.ops import (Add, ConvSynapse, DenseSynapse, DiagonalSynapse, Encode, Neuron, Readout, Reshape,
                         SpikeMatMul, SpikeMaxPool, SumPool, Transpose)
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
    unit: np.ndarray  # real value of one integer unit, per output element (signed)
    w_int: np.ndarray | None = None
    conv: dict = field(default_factory=dict)
    src2: str = ""
    origin: str = ""  # the source node whose weights these are (for --explain)


@dataclass
class Affine:
    terms: list[Term]
    bias: np.ndarray  # per element


@dataclass
class Pooled:
    spikes: Spikes
    index: np.ndarray  # for every element of the spike tensor (C order), its flat pooled position
    divisor: np.ndarray  # elements averaged into each pooled position
    shape: tuple[int, ...]


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
        """A constant broadcast to the per-sample shape of ``tensor`` (None if it varies over the batch axis)."""
        full = self.g.shapes[tensor]
        c = np.asarray(const, dtype=np.float64)
        if c.ndim > len(full):
            return None
        c = c.reshape((1,) * (len(full) - c.ndim) + c.shape)
        if c.shape[0] != 1:
            return None
        try:
            return np.broadcast_to(c[0], full[1:]).copy()
        except ValueError:
            return None

    # -- materialization ------------------------------------------------------------------
    def _channel_mult(self, term: Term, mult: np.ndarray) -> np.ndarray:
        """Per-output-channel multiplier of a synapse term; it must not vary within a channel."""
        if term.kind == "diag":
            return mult
        if term.kind == "matmul":
            if not np.allclose(mult, mult.flat[0], rtol=1e-9, atol=0):
                raise UnsupportedModelError(self.g.path, [(self.current_node, "MatMul", "a per-element scale after an "
                                            "activation product cannot be absorbed; scale by a scalar only")])
            return np.asarray(mult.flat[0])
        per = mult.reshape(mult.shape[0], -1) if term.kind == "conv" else mult.reshape(-1, mult.shape[-1]).T
        ref = per[:, :1]
        if not np.allclose(per, ref, rtol=1e-9, atol=0):
            raise UnsupportedModelError(self.g.path, [(self.current_node, "-", "a per-position scale cannot be "
                                        "absorbed into shared synaptic weights; quantize before this layer")])
        return ref[:, 0]

    SUM_GUARD_BITS = 0  # extra bits of a residual sum's unit below its reader's step (frac_bits already suffices)

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

        ``step``: the quantization step of the reader (sets the unit of multi-group sums)."""
        fixed = [t for t in value.terms if t.kind == "fixed"]
        free = [t for t in value.terms if t.kind != "fixed"]
        absu = [np.abs(t.unit) for t in value.terms]
        if fixed:
            U = np.abs(fixed[0].unit).copy()
            for t in fixed[1:]:
                if not np.allclose(np.abs(t.unit), U, rtol=1e-12, atol=0):
                    raise UnsupportedModelError(self.g.path, [(self.current_node, "Add", "adds two residual streams with "
                                                "different units; csdc supports one stream plus branches")])
        elif len(free) > 1 and step is not None:
            U = np.full(absu[0].shape, step / float(2 ** (self.frac_bits + self.SUM_GUARD_BITS)))
        else:
            ubase = np.min(np.stack(absu), axis=0)
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
            if t.kind in ("diag", "matmul"):
                exact = mult
                w = np.rint(exact).astype(np.int64)
            else:
                shape = (-1,) + (1,) * (t.w_int.ndim - 1)
                exact = t.w_int * mult.reshape(shape)
                w = np.rint(exact).astype(np.int64)
            nz = exact != 0
            if np.any(nz):
                err = float(np.max(np.abs(w[nz] - exact[nz]) / np.abs(exact[nz])))
                self.report.weight_error = max(self.report.weight_error, err)
            if t.kind == "dense":
                src = t.src
                currents.append(self.add(f"{base}_syn", DenseSynapse(w), [src]))
            elif t.kind == "conv":
                currents.append(self.add(f"{base}_syn", ConvSynapse(w, **t.conv), [t.src]))
            elif t.kind == "matmul":
                if int(w) == 0:
                    raise UnsupportedModelError(self.g.path, [(self.current_node, "MatMul", "an activation product "
                                                "vanishes at this precision; raise --frac-bits")])
                currents.append(self.add(f"{base}_matmul", SpikeMatMul(int(w)), [t.src, t.src2]))
            else:
                currents.append(self.add(f"{base}_syn", DiagonalSynapse(w), [t.src]))
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
        nm = self.add(q.name, Neuron(theta, v0, b, self.delay), [node])
        return Spikes(nm, step)

    def as_affine(self, tensor: str, node: QNode) -> Affine | None:
        v = self.vals.get(tensor)
        shape = self.sample_shape(tensor)
        if isinstance(v, Affine):
            return v
        if isinstance(v, Spikes):
            return Affine([Term("diag", v.node, np.full(shape, v.step))], np.full(shape, v.offset))
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
            src = self.pooled_dense(src, np.eye(int(np.prod(src.shape))), np.ones(int(np.prod(src.shape))),
                                    np.zeros(int(np.prod(src.shape))), n)
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
            self.vals[n.outputs[0]] = Affine([Term("diag", spikes.node, np.full(shape, s))], np.full(shape, -m * s))
            return
        self.report.warnings.append(
            f"quantizer '{n.name}' on the network output has {L} levels but the network runs T = {self.T} steps: it "
            f"is not applied, logits are reported unquantized (they differ from the source's by at most {s / 2:.3g} = "
            f"step/2 inside [{s * (a['lo'] - a['zero_point']):.3g}, {s * (a['hi'] - a['zero_point']):.3g}], more outside; "
            "argmax can differ only where the source's quantized logits tie)")
        self.vals[n.outputs[0]] = src

    def pooled_dense(self, p: Pooled, w: np.ndarray, w_scale: np.ndarray, bias: np.ndarray, n: QNode) -> Affine:
        """Dense layer applied to an average-pooled spike tensor, folded into one synapse on the spikes."""
        n_in = int(np.prod(p.shape))
        if w.shape[1] != n_in:
            self.fail(n, f"pooled input has {n_in} features but the weights expect {w.shape[1]}")
        src = p.spikes.node
        total = int(np.prod(self.net.info(src).shape))
        if len(self.net.info(src).shape) != 1:
            src = self.add(f"{n.name}_flatten", Reshape((total,)), [src])
        if not np.allclose(p.divisor, p.divisor.flat[0]):
            self.fail(n, "average pooling with unequal window sizes before a linear layer is not supported")
        folded = w[:, p.index]  # (out, total)
        unit = p.spikes.step / float(p.divisor.flat[0]) * w_scale
        bias = bias + p.spikes.offset * w_scale * w.sum(axis=1)  # the mean of a constant offset is the offset
        return Affine([Term("dense", src, unit.copy(), folded.astype(np.int64), origin=n.name)], bias.copy())

    def lower_linear(self, n: QNode) -> None:
        a = n.attrs
        src = self.vals.get(n.inputs[0])
        out_shape = self.sample_shape(n.outputs[0])
        self.report.float_weight_error = max(self.report.float_weight_error, float(a.get("weight_error", 0.0)))
        if isinstance(src, Pooled):
            if a["kind"] != "dense" or any(d != 1 for d in out_shape[:-1]):
                self.fail(n, "only a dense layer may follow a global average pool")
                return
            val = self.pooled_dense(src, a["w_int"], a["w_scale"], a["bias"], n)
            val.terms[0].unit = np.broadcast_to(val.terms[0].unit, out_shape).copy()
            val.bias = np.broadcast_to(val.bias, out_shape).copy()
            if len(out_shape) != 1:
                self.fail(n, "the pooled dense layer must produce a vector")
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
        if a["kind"] == "conv":
            per = lambda v: np.broadcast_to(np.asarray(v)[:, None, None], out_shape)  # noqa: E731
            conv = {"stride": a["strides"], "padding": a["pads"], "dilation": a["dilations"], "groups": a["group"]}
            term = Term("conv", node, per(in_unit * a["w_scale"]).copy(), a["w_int"], conv, origin=n.name)
            bias = per(a["bias"]).copy()
            if offset:  # sum of the weights over each window's in-image taps (zero padding adds no offset)
                from csdc.ir.ops import ConvSynapse as _Conv
                from csdc.ir.semantics import conv as _conv
                ones = np.ones((1, *self.sample_shape(n.inputs[0])), dtype=np.int64)
                taps = _conv(_Conv(a["w_int"], **conv), ones)[0]
                bias = bias + offset * per(a["w_scale"]) * taps
        else:
            per = lambda v: np.broadcast_to(np.asarray(v), out_shape)  # noqa: E731
            term = Term("dense", node, per(in_unit * a["w_scale"]).copy(), a["w_int"], origin=n.name)
            bias = per(a["bias"] + offset * a["w_scale"] * a["w_int"].sum(axis=1)).copy()
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
        term = Term("matmul", a.node, np.full(out_shape, a.step * b.step), src2=b.node, origin=n.name)
        self.vals[n.outputs[0]] = self.settle(n.outputs[0], Affine([term], np.zeros(out_shape)))

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
            ones = np.ones((C, 1, kh, kw), dtype=np.int64)
            out_shape = self.sample_shape(n.outputs[0])
            div = np.full(out_shape, float(kh * kw))
            if any(pads) and not a.get("count_include_pad", 0):
                cnt = sum_pool(SumPool((kh, kw), tuple(a.get("strides", [1, 1])), pads), np.ones((1, *shape), np.int64))[0]
                div = cnt.astype(np.float64)
            conv = {"stride": tuple(a.get("strides", [1, 1])), "padding": pads, "dilation": (1, 1), "groups": C}
            bias = np.zeros(out_shape)
            if src.offset:
                from csdc.ir.ops import ConvSynapse as _Conv
                from csdc.ir.semantics import conv as _conv
                bias = src.offset * _conv(_Conv(ones, **conv), np.ones((1, *shape), np.int64))[0] / div
            self.vals[n.outputs[0]] = Affine([Term("conv", src.node, src.step / div, ones, conv, origin=n.name)], bias)
            return
        kept = [d for d in range(len(shape)) if d not in axes]
        coords = np.indices(shape).reshape(len(shape), -1)
        kept_shape = tuple(shape[d] for d in kept)
        index = np.ravel_multi_index(tuple(coords[d] for d in kept), kept_shape) if kept else np.zeros(coords.shape[1], np.int64)
        div = np.full(int(np.prod(kept_shape)) if kept else 1, float(np.prod([shape[d] for d in axes])))
        out_shape = self.sample_shape(n.outputs[0])
        self.vals[n.outputs[0]] = Pooled(src, index, div, out_shape)

    def lower_route(self, n: QNode) -> None:
        src = self.vals.get(n.inputs[0])
        out_shape = self.sample_shape(n.outputs[0])
        if isinstance(src, Pooled):
            self.vals[n.outputs[0]] = Pooled(src.spikes, src.index, src.divisor, out_shape)
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
                U, bias = U.reshape(out_shape), src.bias.reshape(out_shape)
            self.vals[n.outputs[0]] = Affine([Term("fixed", routed, U)], bias)
        else:
            self.fail(n, "routes a tensor csdc cannot represent")

    def lower_output(self) -> None:
        out = self.g.output
        v = self.vals.get(out)
        self.current_node = "<output>"
        if isinstance(v, Spikes):
            v = Affine([Term("diag", v.node, np.full(self.net.info(v.node).shape, v.step))], np.full(self.net.info(v.node).shape, v.offset))
        if isinstance(v, Pooled):
            m = int(np.prod(v.shape))
            v = self.pooled_dense(v, np.eye(m, dtype=np.int64), np.ones(m), np.zeros(m), QNode("<output>", "-", (), ()))
        if not isinstance(v, Affine):
            raise UnsupportedModelError(self.g.path, [(out, "-", "the network output could not be lowered")])
        if len(self.sample_shape(out)) != 1:
            raise UnsupportedModelError(self.g.path, [(out, "-", f"the output must be a vector of class scores per sample, got shape {self.g.shapes[out]}")])
        # a single synapse group is exact with k = 0; sums of groups get frac_bits of headroom
        k = 0 if len(v.terms) == 1 and v.terms[0].kind != "fixed" else None
        node, U = self.materialize(v, "logits", k, None)
        self.add("readout", Readout(U, v.bias), [node])

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


def lower(graph: QGraph, frac_bits: int = 8, delay: int | None = None) -> tuple[Network, LoweringReport]:
    """Lower a canonical QGraph (after the canonicalization passes) to a spiking Network."""
    return Lowering(graph, frac_bits, delay).run()
