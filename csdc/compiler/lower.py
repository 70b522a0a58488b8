"""Lower a canonical quantized graph to the spiking IR, absorbing every real scale into integers.

Each ONNX tensor is tracked as one of:

- :class:`Spikes`: ``real = step * count + offset`` of a spiking IR node (a quantizer's output; the
  offset ``step * (lo - zero_point)`` is non-zero for a signed quantizer in the *offset form*, whose
  lowest level is count 0; a *symmetric* quantizer ``s * clip(round(x/s), -L, L)`` becomes a
  :class:`TernaryNeuron` population whose signed count is the level itself, offset 0);
- :class:`SplitSpikes`: an asymmetric signed quantizer in the *split form*, a ternary population plus clip-correction
  populations whose signed counts add up to the level (offset 0; :meth:`Lowering.split_neurons`);
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
other group (a residual branch of a sum) gets weights ``round(w_int * unit_g / U)``. The exponent
``k`` of each sum is the precision policy's (:mod:`csdc.compiler.integerize`, docs/precision.md),
which also bounds the worst-case error of every population. A quantizer consuming a sum becomes a
:class:`Neuron` with ``threshold = round(step / U)``, bias total ``B = round(bias / U)`` delivered as
``floor(B / T)`` per step with the remainder in ``v0 = floor(threshold / 2) + rem``; a symmetric
quantizer's :class:`TernaryNeuron` gets the same parameters (its signed count is the same
``floor((V + B + floor(threshold/2)) / threshold)``, clipped to ``[-T, T]``). Ties round half up
(ONNX rounds half to even; exact ties are rare once thresholds are not powers of two).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np

from csdc.compiler import broadcast
from csdc.compiler.bitwidth import PROFILES
from csdc.compiler.integerize import (NeuronParameters, PopulationError, Precision, PrecisionReport, neuron_bound_at,
                                      neuron_parameters, rounded_with_residual, scaled_weights, split_power_of_two)
from csdc.compiler.mbe import MBEFit, MBESum, fit_table
from csdc.compiler.mbe_readout import (SOFTMAX_RECIPROCAL_TARGET, Digits, layernorm_rsqrt, mbe_digits, rsqrt_fit,
                                       softmax_error, softmax_exp_fit, softmax_pairs, softmax_radix_bits,
                                       softmax_reciprocal_fit)
from csdc.compiler.passes.fuse_elementwise import evaluate
from csdc.compiler.passes.move_input_quant import unmoved_reason
from csdc.compiler.qgraph import QGraph, QNode
from csdc.errors import UnsupportedModelError
from csdc.ir.graph import Network
from csdc.ir.ops import (TERNARY, Add, ConvSynapse, DenseSynapse, DiagonalSynapse, Encode, Neuron, Readout, ReduceSum,
                         Reshape, SpikeMatMul, SpikeMaxPool, SumPool, TernaryNeuron, Transpose)
from csdc.ir.semantics import conv as conv_counts
from csdc.ir.semantics import sum_pool


def symmetric(attrs: dict) -> bool:
    """A symmetric quantizer ``s * clip(round(x / s), -L, L)``, L >= 1 (canonicalize_zero_point centres its zero point)."""
    return attrs["zero_point"] == 0 and attrs["lo"] == -attrs["hi"] < 0


# ops through which a quantizer's spikes reach a MaxPool unchanged in sign (routing, scaling by a constant)
SPIKE_ROUTES = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Mul", "Div")


@dataclass(frozen=True)
class Spikes:
    node: str
    step: float
    offset: float = 0.0  # real = step * count + offset: a quantizer whose levels start below its zero point


@dataclass(frozen=True)
class SplitSpikes:
    """An asymmetric signed quantizer in the *split form* (docs/signed_spikes.md): ``real = step * sum(sign * count)``
    over a ternary population and its clip-correction populations; offset 0, so a zero level costs no spike."""

    parts: tuple[tuple[str, int], ...]  # (IR node, +1 or -1); the first is the ternary population
    step: float


@dataclass(frozen=True, eq=False)
class Encoded:
    node: str
    unit: float
    count_max: float  # largest |total| of one input element over the window (T * largest |level|)


# -- terms of a pending sum: one frozen record per kind, changed with dataclasses.replace -------
@dataclass(frozen=True, eq=False)
class DenseTerm:
    """A pending dense synapse group: ``unit * (w_int @ counts of src)``; ``reduce``: axes of the
    synapse output summed by a ReduceSum (a classifier on globally pooled spikes)."""

    src: str
    unit: np.ndarray  # real value of one integer unit, per output element (signed; a broadcast array)
    w_int: np.ndarray  # (out, in)
    count_max: float  # largest count one input element delivers in a window
    origin: str = ""  # the source node whose weights these are (for --explain)
    reduce: tuple[int, ...] = ()


@dataclass(frozen=True)
class ConvGeometry:
    stride: tuple[int, int]
    padding: tuple[int, int, int, int]
    dilation: tuple[int, int]
    groups: int

    def synapse(self, mantissa: np.ndarray, exponent: int = 0) -> ConvSynapse:
        return ConvSynapse(mantissa, self.stride, self.padding, self.dilation, self.groups, exponent)


@dataclass(frozen=True, eq=False)
class ConvTerm:
    src: str
    unit: np.ndarray  # (C, 1, 1) broadcast array
    w_int: np.ndarray  # (O, C / groups, kh, kw)
    geometry: ConvGeometry
    count_max: float
    origin: str = ""


@dataclass(frozen=True, eq=False)
class DiagTerm:
    """One-to-one synapses from a spike tensor (a residual branch, a pooled identity)."""

    src: str
    unit: np.ndarray
    count_max: float
    origin: str = ""
    reduce: tuple[int, ...] = ()


@dataclass(frozen=True, eq=False)
class ProductTerm:
    """A pending activation product ``src x src2`` (TDEC SpikeMatMul) with one scalar unit."""

    src: str
    src2: str
    unit: np.ndarray
    count_max: float  # largest product total of one output element: K * T^2
    origin: str = ""


@dataclass(frozen=True, eq=False)
class SpikeSumTerm:
    """A pending sum of spikes over the last axis of ``src`` (..., M, K), repeated ``width`` times:
    ``unit * sum_k src[..., m, k]`` at every (..., m, n < width), one dense synapse group of equal weights (ACs); with
    ``transposed`` the synapse output (..., M, width) is transposed to (..., width, M). The operands' offsets
    in an activation product (:meth:`Lowering.product_value`)."""

    src: str
    unit: np.ndarray  # one scalar unit (a broadcast array)
    width: int
    count_max: float  # largest |sum| of one output element: K * T
    transposed: bool = False
    origin: str = ""


@dataclass(frozen=True, eq=False)
class FixedTerm:
    """An IR current already made: its unit is fixed by the ``site`` that made it, and it carries
    the worst-case integerization error made there (integer units, a broadcast array)."""

    src: str
    unit: np.ndarray
    error: np.ndarray
    site: str


FreeTerm = DenseTerm | ConvTerm | DiagTerm | ProductTerm | SpikeSumTerm
Term = FreeTerm | FixedTerm


def weight_count(t: Term) -> int:
    return int(t.w_int.size) if isinstance(t, (DenseTerm, ConvTerm)) else 0


@dataclass(frozen=True, eq=False)
class Affine:
    terms: tuple[Term, ...]
    bias: np.ndarray  # per element (a broadcast array)


@dataclass(frozen=True)
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
    precision: PrecisionReport = field(default_factory=PrecisionReport)
    warnings: list[str] = field(default_factory=list)
    explain: dict[str, list[str]] = field(default_factory=dict)
    approximations: list[dict] = field(default_factory=list)  # ops approximated by MBE populations (docs/mbe.md)


@dataclass(frozen=True)
class MBEOptions:
    """The opt-in approximate mode ``--nonlinear mbe``: bases (None: the fewest meeting the target) and
    encoding steps of every MBE population."""

    bases: int | None = None
    steps: int = 16


class Lowering:
    """Structural lowering: one handler per op type (``HANDLERS``) turns each source node into IR
    nodes or a pending value; every sum is made integer by :meth:`materialize` under the precision
    policy of :mod:`csdc.compiler.integerize`. A handler that cannot lower its node records why
    (:meth:`fail`); all reasons are raised together."""

    def __init__(self, graph: QGraph, precision: Precision, delay: int | None, mbe: MBEOptions | None = None):
        self.g = graph
        self.mbe = mbe
        self.precision = precision
        self.delay_opt = delay
        self.vals: dict[str, object] = {}
        self.report = LoweringReport()
        self.cons = graph.consumers()
        self.problems: list[tuple[str, str, str]] = []
        self.current_node = ""
        self.split_reach: dict[str, float] = {}  # largest |count| the readers charge to a split quantizer's population
        self.T = self._find_T()
        self.delay = self.T if delay is None else int(delay)
        self.net = Network(self.T)

    # -- helpers ------------------------------------------------------------------------
    def _find_T(self) -> int:
        # quantizers that become neurons: not the input's (Encode) nor the output's (readout)
        hidden = [n for n in self.g.nodes if n.op_type == "Quant" and n.inputs[0] != self.g.input and n.outputs[0] != self.g.output]
        if not hidden:
            raise UnsupportedModelError(self.g.path, [("<graph>", "-", "the model has no activation quantizers between layers "
                                        "(a float model); quantize it first: csdc compile --calibrate data.npz (onnxruntime quantize_static), or QAT with LSQ or Brevitas")])
        # a symmetric quantizer's population counts L levels (ternary) or 2L (offset form, kept where a MaxPool reads it
        # or where the other quantizers need T = 2L); every other quantizer fixes T to its offset form's levels
        offset_form = {self.offset_levels(n) for n in hidden if not symmetric(n.attrs) or self.max_pooled(n)}
        T = next(iter(offset_form)) if len(offset_form) == 1 else max(int(n.attrs["hi"]) for n in hidden)
        levels: dict[int, list[str]] = {}
        for n in hidden:
            if symmetric(n.attrs) and not self.max_pooled(n):
                L = int(n.attrs["hi"])
                levels.setdefault(T if T in (L, 2 * L) else L, []).append(n.name)
            else:
                levels.setdefault(self.offset_levels(n), []).append(n.name)
        if len(levels) > 1:
            desc = "; ".join(f"{L} levels: {', '.join(ns[:3])}{'...' if len(ns) > 3 else ''}" for L, ns in sorted(levels.items()))
            pooled = [f"'{n.name}' feeds MaxPool '{mp}'" for n in hidden if symmetric(n.attrs) and (mp := self.max_pooled(n))]
            why = ("; symmetric quantizers whose output is max-pooled count 2L levels in the offset form (the spiking max-pool "
                   f"needs non-negative counts, not ternary spikes): {', '.join(pooled[:3])}; max-pool an unsigned quantizer's "
                   "output instead") if pooled else ""
            raise UnsupportedModelError(self.g.path, [("<graph>", "Quant", "activation quantizers must share one number of "
                                        f"levels (= time steps T), found {desc}{why}")])
        return T

    def spike_readers(self, q: QNode) -> Iterator[tuple[str, list[QNode]]]:
        """Every tensor that carries quantizer ``q``'s spikes (its output, and the outputs of the routing or
        constant-scaling ops after it, SPIKE_ROUTES) with the nodes that read it."""
        todo, seen = [q.outputs[0]], set()
        while todo:
            t = todo.pop()
            readers = self.cons.get(t, [])
            yield t, readers
            for c in readers:
                if c.op_type in SPIKE_ROUTES and c.name not in seen:
                    seen.add(c.name)
                    todo.append(c.outputs[0])

    def max_pooled(self, q: QNode) -> str:
        """The MaxPool that reads quantizer ``q``'s output through routing or constant scaling, or ''."""
        return next((c.name for _, readers in self.spike_readers(q) for c in readers if c.op_type == "MaxPool"), "")

    def ternary(self, q: QNode) -> bool:
        """Quantizer ``q`` becomes a TernaryNeuron population: it is symmetric with L = T levels either side and no
        MaxPool reads it (the spiking max-pool takes non-negative counts only). Otherwise it keeps the offset form."""
        return symmetric(q.attrs) and int(q.attrs["hi"]) == self.T and not self.max_pooled(q)

    # readers (through routing) that take a split quantizer as a sum of spike tensors
    SPLIT_READERS = ("Linear", "Add", "Mul", "Div", "Quant", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")

    def split(self, q: QNode) -> bool:
        """Quantizer ``q`` becomes a ternary population plus clip corrections (the split form): its levels
        ``[lo, hi]`` (zero point removed) straddle zero asymmetrically within ``[-T, T]``, and every reader reached
        through routing is a synapse, a sum or a re-quantizer (an activation product, a max- or average-pool or
        the network output keep the offset form)."""
        a = q.attrs
        lo, hi = int(a["lo"]) - int(a["zero_point"]), int(a["hi"]) - int(a["zero_point"])
        if symmetric(a) or not lo < 0 < hi or max(-lo, hi) > self.T:
            return False
        # an activation product (Mul of two tensors) takes one population: one SpikeMatMul, not one per pair of parts
        return not any(t == self.g.output or any(c.op_type not in self.SPLIT_READERS or
                                                 (c.op_type == "Mul" and not any(self.g.is_const(i) for i in c.inputs))
                                                 for c in readers)
                       for t, readers in self.spike_readers(q))

    @staticmethod
    def offset_levels(q: QNode) -> int:
        """Largest spike count of ``q``'s population in the offset form (counting ``level - lo``)."""
        a = q.attrs
        return int(a["hi"]) - min(int(a["lo"]), int(a["zero_point"]))

    def name(self, base: str) -> str:
        # '/blocks.0/attn/q_q/QuantizeLinear' -> 'blocks.0/attn/q_q': keep the module path, drop the op suffix
        base = base.strip("/")
        for suffix in ("/QuantizeLinear", "_QuantizeLinear", "QuantizeLinear"):
            if base.endswith(suffix) and len(base) > len(suffix):
                base = base[: -len(suffix)]
        return self.net.free_name(base.strip("/_") or "node")

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
    def _channel_mult(self, term: FreeTerm, mult: np.ndarray) -> np.ndarray:
        """Multiplier of a synapse term's weights: per output channel for dense/conv (1-D), one
        number for an activation product; it must not vary within a channel."""
        m = broadcast.squeeze_constant(mult, rtol=1e-9)
        if isinstance(term, DiagTerm):
            return m
        if isinstance(term, (ProductTerm, SpikeSumTerm)):
            if m.size != 1:
                raise UnsupportedModelError(self.g.path, [(self.current_node, "MatMul", "a per-element scale after an "
                                            "activation product cannot be absorbed; scale by a scalar only")])
            return m.reshape(())
        spread = m.shape[1:] if isinstance(term, ConvTerm) else m.shape[:-1]
        if any(d != 1 for d in spread):
            raise UnsupportedModelError(self.g.path, [(self.current_node, "-", "a per-position scale cannot be "
                                        "absorbed into shared synaptic weights; quantize before this layer")])
        return m.reshape(-1)

    def _positions(self, t: DenseTerm | DiagTerm) -> int:
        """Number of synapse outputs a ReduceSum adds into one element (1 without reduction)."""
        if not t.reduce:
            return 1
        shape = self.net.info(t.src).shape
        if isinstance(t, DenseTerm):
            shape = (*shape[:-1], t.w_int.shape[0])
        return int(np.prod([shape[a] for a in t.reduce]))

    def _term_weights(self, t: FreeTerm, U: np.ndarray) -> tuple[object, np.ndarray]:
        """The integer weights of a free term in unit ``U`` (ScaledWeights, or an int for a product)
        and its worst-case error per output element (integer units, a broadcast array)."""
        mult = self._channel_mult(t, t.unit / U)
        if isinstance(t, (ProductTerm, SpikeSumTerm)):
            w, res = rounded_with_residual(mult)
            return int(w), np.full((1,) * np.ndim(t.unit), float(res) * t.count_max)
        if isinstance(t, DiagTerm):
            w, res = rounded_with_residual(mult)
            self.report.weight_error = max(self.report.weight_error, float(np.max(res / np.maximum(np.abs(mult), 1e-300),
                                                                                  where=mult != 0, initial=0.0)))
            return w, res * t.count_max * self._positions(t)
        if isinstance(t, ConvTerm):
            sw = scaled_weights(t.w_int, mult, t.count_max, (1, 2, 3))
            return sw, broadcast.per_axis(sw.error, 3, 0)
        sw = scaled_weights(t.w_int, mult, t.count_max, (1,))
        ndim = np.ndim(t.unit)
        return sw, broadcast.per_axis(sw.error * self._positions(t), ndim, ndim - 1)

    def _free_error(self, free: list[FreeTerm], U: np.ndarray) -> np.ndarray:
        err: np.ndarray = np.zeros(1)
        for t in free:
            err = err + self._term_weights(t, U)[1]
        return err

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

    def materialize(self, value: Affine, base: str, step: float | None, k: int | None = None) -> tuple[str, FixedTerm]:
        """Create the IR currents of ``value``: ``real = U * I + bias``; returns the node and the
        current as a FixedTerm (unit ``U``, its error, the site that chose ``U``).

        ``step``: the quantization step of the reader (sets the precision target); ``k``: a given
        exponent (a lone synapse group read out exactly)."""
        fixed = [t for t in value.terms if isinstance(t, FixedTerm)]
        free = [t for t in value.terms if not isinstance(t, FixedTerm)]
        if fixed:
            U = np.abs(fixed[0].unit)
            for t in fixed[1:]:
                if not np.allclose(np.abs(t.unit), U, rtol=1e-12, atol=0):
                    raise UnsupportedModelError(self.g.path, [(self.current_node, "Add", "adds two residual streams with "
                                                "different units; csdc supports one stream plus branches")])
            site = fixed[0].site
        else:
            # the anchor keeps exact weights: the group with the most weights, else the finest unit
            anchor = max(free, key=lambda t: (weight_count(t), -float(np.min(np.abs(t.unit)))))
            ubase = np.abs(anchor.unit)
            positive = ubase[ubase > 0]
            ubase = np.where(ubase > 0, ubase, positive.min() if positive.size else 1.0)
            site = base
            if k is None:
                if step is not None:
                    theta = (float(np.min(step / ubase)), float(np.max(step / ubase)))
                    bound_at = neuron_bound_at(step, ubase, value.bias, lambda U: self._free_error(free, U), self.T)
                else:  # no reader: errors in units of the finest group's unit
                    level = min(float(np.min(np.abs(t.unit)[np.abs(t.unit) > 0], initial=np.inf)) for t in free)
                    theta = None

                    def bound_at(kk: int) -> float:
                        U = ubase / float(2 ** kk)
                        return float(np.max(self._free_error(free, U) * U)) / level
                k = self.precision.choose_k(site, theta, bound_at)
            self.report.precision.sites[site] = k
            U = ubase / float(2 ** k)
        currents = []
        error: np.ndarray = sum((t.error for t in fixed), np.zeros(1))
        reader = self.current_node
        for t in value.terms:
            if isinstance(t, FixedTerm):
                currents.append(t.src)
                continue
            self.current_node = t.origin or reader
            w, err = self._term_weights(t, U)
            error = error + err
            if isinstance(t, ProductTerm):
                if w == 0:
                    raise UnsupportedModelError(self.g.path, [(self.current_node, "MatMul", "an activation product "
                                                "vanishes at this precision; raise --frac-bits")])
                node = self.add(f"{base}_matmul", SpikeMatMul(w), [t.src, t.src2])
            elif isinstance(t, SpikeSumTerm):
                if w == 0:  # vanishes at this unit; its error is in the bound
                    continue
                mant, e = split_power_of_two(np.asarray(w, dtype=np.int64))
                node = self.add(f"{base}_offset_syn", DenseSynapse(np.full((t.width, self.net.info(t.src).shape[-1]), mant),
                                                                   exponent=e), [t.src])
                self.report.precision.synapse_sites[node] = site
                if t.transposed:
                    rank = len(self.net.info(node).shape)
                    node = self.add(f"{base}_offset_t", Transpose((*range(rank - 2), rank - 1, rank - 2)), [node])
                currents.append(node)
                continue
            elif isinstance(t, DiagTerm):
                in_shape = self.net.info(t.src).shape
                if t.reduce:  # the multiplier is per element of the summed output: repeat it over the summed axes
                    w = np.expand_dims(w, t.reduce)
                mant, e = split_power_of_two(w)
                node = self.add(f"{base}_syn", DiagonalSynapse(np.broadcast_to(mant, in_shape), exponent=e), [t.src])
            else:
                self.report.weight_error = max(self.report.weight_error, w.relative)
                if isinstance(t, ConvTerm):
                    op = t.geometry.synapse(w.mantissa, w.exponent)
                else:
                    op = DenseSynapse(w.mantissa, exponent=w.exponent)
                node = self.add(f"{base}_syn", op, [t.src])
            self.report.precision.synapse_sites[node] = site
            if not isinstance(t, (ProductTerm, ConvTerm)) and t.reduce:
                node = self.add(f"{base}_sum_over", ReduceSum(t.reduce), [node])
            currents.append(node)
        self.current_node = reader
        node = currents[0] if len(currents) == 1 else self.add(f"{base}_sum", Add(), currents)
        return node, FixedTerm(node, U, broadcast.squeeze_constant(np.asarray(error, dtype=np.float64)), site)

    def quantizer_current(self, value: Affine, q: QNode,
                          step: float) -> tuple[str, FixedTerm, NeuronParameters, PopulationError]:
        """The IR current of ``value`` read by quantizer ``q`` and the integer neuron parameters for it: (node, current,
        parameters, their error record); the threshold and bias rounding errors go into the report."""
        node, cur = self.materialize(value, q.name, step)
        U = cur.unit
        p = neuron_parameters(step, U, value.bias, cur.error, self.T)
        theta_real = step / U
        self.report.threshold_error = max(self.report.threshold_error, float(np.max(np.abs(p.threshold - theta_real) / theta_real)))
        self.report.bias_error = max(self.report.bias_error, float(np.max(np.abs(np.rint(value.bias / U) - value.bias / U) / p.threshold)))
        err = PopulationError(p.bound, cur.site, self.report.precision.sites[cur.site], int(np.max(p.threshold)).bit_length(),
                              p.weights, p.bias_part, p.threshold_part)
        return node, cur, p, err

    def neuron(self, value: Affine, q: QNode) -> Spikes:
        step = float(q.attrs["scale"])
        node, _, p, err = self.quantizer_current(value, q, step)
        shape = self.net.info(node).shape
        full = [np.broadcast_to(broadcast.squeeze_constant(a), shape) for a in (p.threshold, p.v0, p.bias)]
        nm = self.add(q.name, (TernaryNeuron if self.ternary(q) else Neuron)(*full, self.delay), [node])
        self.report.precision.populations[nm] = err
        return Spikes(nm, step)

    def split_neurons(self, value: Affine, q: QNode) -> SplitSpikes | None:
        """The split form of an asymmetric signed quantizer with levels ``[lo, hi]``, ``-T <= lo < 0 < hi <= T``
        (docs/signed_spikes.md, "Asymmetric quantizers"). With ``f = floor((V + C) / theta)`` (``C = T*bias + v0`` of
        the ternary population, as for every quantizer):

            clip(f, lo, hi) = t - sum_k [P(f - hi - kT) - P(f - (k+1)T)] + sum_k [N(lo - f - kT) - N(-f - (k+1)T)]

        with ``t = clip(f, -T, T)`` (the ternary population) and ``P(x) = N(x) = clip(x, 0, T)`` (DIF populations;
        the ``P`` read the same current with their constant lowered by ``c * theta``, the ``N`` the negated current,
        where ``-f = floor((theta - 1 - V - C) / theta)`` in integers). Terms that the integer bounds of the current
        prove zero are left out (at most the first pair of each side for a current within twice the clip range);
        a side needs none when its clip bound is ``±T``. None (offset form) for a shared residual stream (an IR
        current already made, which cannot be negated exactly), or when the lower side needs the negated current of a
        dense, conv or product layer (it would double that layer's synaptic operations)."""
        step = float(q.attrs["scale"])
        lo, hi = int(q.attrs["lo"]) - int(q.attrs["zero_point"]), int(q.attrs["hi"]) - int(q.attrs["zero_point"])
        T = self.T
        if any(isinstance(t, FixedTerm) for t in value.terms):
            return None
        # cost: the negated current repeats every synapse of the input; worth it only for one-to-one synapses (the
        # spikes saved are this population's, the operations added are the input's: a dense or conv layer's fan-in
        # outweighs them); 2 levels of margin for the integerization error (re-checked below)
        if lo > -T and self.real_reach(value) / step + 2.0 > -lo and not all(isinstance(t, DiagTerm) for t in value.terms):
            return None
        node, cur, p, err = self.quantizer_current(value, q, step)
        shape = self.net.info(node).shape
        full = lambda a: np.broadcast_to(broadcast.squeeze_constant(a), shape)  # noqa: E731
        theta = np.asarray(p.threshold, dtype=np.int64)
        C = T * np.asarray(p.bias, dtype=np.int64) + np.asarray(p.v0, dtype=np.int64)
        reach = self.real_reach(value) / step + p.bound + 1.0  # largest |f| in levels, with the integerization error
        f_max, f_min = math.ceil(reach), -math.ceil(reach)
        # (shift c, sign) of the terms P(f - c) and N(-f - c') = N(lo - f - (c' + lo)) that can be non-zero
        upper = [] if hi == T else [(c, sgn) for k in range(max(0, -(-(f_max - hi) // T)))
                                    for c, sgn in ((hi + k * T, -1), ((k + 1) * T, +1)) if f_max > c]
        lower = [] if lo == -T else [(c, sgn) for k in range(max(0, -(-(lo - f_min) // T)))
                                     for c, sgn in ((k * T - lo, +1), ((k + 1) * T, -1)) if -f_min > c]
        neg_node = None
        if lower:
            negated = Affine(tuple(replace(t, unit=-t.unit) for t in value.terms), -value.bias)
            neg_node, _ = self.materialize(negated, f"{q.name}_negated", None, self.report.precision.sites[cur.site])
        main = self.add(q.name, TernaryNeuron(full(p.threshold), full(p.v0), full(p.bias), self.delay), [node])
        self.report.precision.populations[main] = err
        self.split_reach[main] = float(max(-lo, hi))
        parts = [(main, 1)]
        for src, terms, constant in ((node, upper, lambda c: C - c * theta), (neg_node, lower, lambda c: theta - 1 - C - c * theta)):
            for c, sgn in terms:
                total = constant(c)  # the DIF population's v0 + T * bias
                b = np.floor_divide(total, T)
                nm = self.add(f"{q.name}_{'above' if src == node else 'below'}_{c}",
                              Neuron(full(theta), full(total - T * b), full(b), self.delay), [src])
                self.report.precision.populations[nm] = err
                self.split_reach[nm] = 0.0
                parts.append((nm, sgn))
        return SplitSpikes(tuple(parts), step)

    def real_reach(self, value: Affine) -> float:
        """An upper bound of ``|real value|`` of a sum of free terms. The populations of a split quantizer are bounded
        together: each reader weighs them alike (sign apart), so their signed counts add up to a level in ``[lo, hi]``,
        charged to the ternary population (``split_reach``: largest |level|) and none to its corrections."""
        reach = np.abs(value.bias)
        for t in value.terms:
            c = self.split_reach.get(t.src, t.count_max)
            if isinstance(t, (DenseTerm, ConvTerm)):
                axes = (1, 2, 3) if isinstance(t, ConvTerm) else (1,)
                per = np.abs(t.w_int).sum(axis=axes).astype(np.float64) * c
                per = broadcast.per_axis(per, 3, 0) if isinstance(t, ConvTerm) else broadcast.per_axis(per, np.ndim(t.unit), np.ndim(t.unit) - 1)
                reach = reach + np.abs(t.unit) * per * (self._positions(t) if isinstance(t, DenseTerm) else 1)
            elif isinstance(t, DiagTerm):
                reach = reach + np.abs(t.unit) * c * self._positions(t)
            else:  # ProductTerm, SpikeSumTerm: count_max is the largest total
                reach = reach + np.abs(t.unit) * t.count_max
        return float(np.max(reach))

    def as_affine(self, tensor: str, node: QNode) -> Affine | None:
        v = self.vals.get(tensor)
        shape = self.sample_shape(tensor)
        if isinstance(v, Affine):
            return v
        if isinstance(v, SplitSpikes):
            one = (1,) * len(shape)
            return Affine(tuple(DiagTerm(nm, np.full(one, sgn * v.step), float(self.T)) for nm, sgn in v.parts), np.zeros(one))
        if isinstance(v, Spikes):
            one = (1,) * len(shape)
            return Affine((DiagTerm(v.node, np.full(one, v.step), float(self.T)),), np.full(one, v.offset))
        self.fail(node, "its input is not a spike or current tensor csdc can add (quantize it first)")
        return None

    def settle(self, tensor: str, value: object) -> object:
        """A current read by several consumers is made into one IR current, shared by all."""
        if isinstance(value, Affine) and len(self.cons.get(tensor, [])) > 1 and any(not isinstance(t, FixedTerm) for t in value.terms):
            _, cur = self.materialize(value, tensor, self.downstream_step(tensor))
            return Affine((cur,), value.bias)
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
            self.vals[n.outputs[0]] = Encoded(nm, a["scale"] / self.T, float(self.T * max(abs(lo), abs(hi))))
            return
        src = self.vals.get(n.inputs[0])
        if n.outputs[0] == self.g.output and isinstance(src, Affine):
            self.lower_output_quant(n, src)
            return
        # levels below the zero point (offset form): the neuron counts c = level - lo in 0..hi-lo; the input gets
        # +m*step (round(x/s) + z - lo == round(x/s + m), m integer) and the value is step * c - m * step.
        # A symmetric quantizer needs no offset: its ternary population's signed count is the level.
        ternary, split = self.ternary(n), self.split(n)
        m = 0 if ternary or split else int(a["zero_point"]) - int(a["lo"])
        offset = -m * float(a["scale"])
        if isinstance(src, Spikes):
            same_range = ternary or self.net.info(src.node).kind != TERNARY  # signed spikes re-quantized unsigned: clip
            if same_range and math.isclose(src.step, a["scale"], rel_tol=1e-6) and math.isclose(src.offset, offset, rel_tol=1e-9, abs_tol=1e-12):
                self.vals[n.outputs[0]] = src  # requantizing spikes on the same grid changes nothing
                return
            src = self.as_affine(n.inputs[0], n)  # a new grid: one-to-one synapses into a new population
        if isinstance(src, SplitSpikes):
            src = self.as_affine(n.inputs[0], n)
        if isinstance(src, Pooled):
            src = self.pooled_dense(src, None, None, None, n)
            if src is None:
                return
        if not isinstance(src, Affine):
            self.fail(n, "its input is not a current csdc can integrate")
            return
        if split:
            parts = self.split_neurons(src, n)
            if parts is not None:
                self.vals[n.outputs[0]] = parts
                return
            m = int(a["zero_point"]) - int(a["lo"])  # the lower clip needs a shared stream negated: offset form
            offset = -m * float(a["scale"])
        if m:
            src = replace(src, bias=src.bias + m * float(a["scale"]))
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
        if self.ternary(n):  # symmetric with L = T: a ternary population, no offset
            L, m = int(a["hi"]), 0
        shape = self.sample_shape(n.outputs[0])
        if L == self.T:
            spikes = self.neuron(replace(src, bias=src.bias + m * s), n)
            one = (1,) * len(shape)
            self.vals[n.outputs[0]] = Affine((DiagTerm(spikes.node, np.full(one, s), float(self.T)),), np.full(one, -m * s))
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
            return Affine((DiagTerm(src, np.full(1, step), float(self.T), origin=n.name, reduce=(0,)),), np.full(1, offset))
        w_scale = np.asarray(w_scale, dtype=np.float64).reshape(-1)
        term = DenseTerm(src, broadcast.per_axis(step * w_scale, 1, 0), w, float(self.T), origin=n.name, reduce=(0,))
        # the mean of a constant offset is the offset
        return Affine((term,), broadcast.per_axis(bias + offset * w_scale * w.sum(axis=1), 1, 0))

    def linear_term(self, n: QNode, node: str, in_unit: float, count_max: float) -> tuple[FreeTerm, np.ndarray]:
        """The synapse group of linear node ``n`` reading ``node`` (one input unit ``in_unit``) and the layer's bias."""
        a = n.attrs
        w_scale = np.asarray(a["w_scale"], dtype=np.float64).reshape(-1)
        if a["kind"] == "conv":
            geometry = ConvGeometry(tuple(a["strides"]), tuple(a["pads"]), tuple(a["dilations"]), int(a["group"]))
            return (ConvTerm(node, broadcast.per_axis(in_unit * w_scale, 3, 0), a["w_int"], geometry, count_max, origin=n.name),
                    broadcast.per_axis(a["bias"], 3, 0))
        nd = len(self.sample_shape(n.outputs[0]))
        return (DenseTerm(node, broadcast.per_axis(in_unit * w_scale, nd, nd - 1), a["w_int"], count_max, origin=n.name),
                broadcast.per_axis(a["bias"], nd, nd - 1))

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
        if isinstance(src, SplitSpikes):  # one synapse group per population, the corrections with signed units
            terms = [self.linear_term(n, nm, sgn * src.step, float(self.T)) for nm, sgn in src.parts]
            self.vals[n.outputs[0]] = self.settle(n.outputs[0], Affine(tuple(t for t, _ in terms), terms[0][1]))
            return
        if isinstance(src, Spikes):
            node, in_unit, offset, count_max = src.node, src.step, src.offset, float(self.T)
        elif isinstance(src, Encoded):
            node, in_unit, count_max = src.node, src.unit, src.count_max
        else:
            self.fail(n, "consumes a tensor that is not quantized; put an activation quantizer before every linear layer")
            return
        term, bias = self.linear_term(n, node, in_unit, count_max)
        if offset:  # the input's constant offset times the weights that reach each output
            w_scale = np.asarray(a["w_scale"], dtype=np.float64).reshape(-1)
            if isinstance(term, ConvTerm):  # sum of the weights over each window's in-image taps (zero padding adds no offset)
                ones = np.ones((1, *self.sample_shape(n.inputs[0])), dtype=np.int64)
                taps = conv_counts(term.geometry.synapse(a["w_int"]), ones)[0]
                bias = broadcast.squeeze_constant(bias + offset * broadcast.per_axis(w_scale, 3, 0) * taps)
            else:
                bias = bias + broadcast.per_axis(offset * w_scale * a["w_int"].sum(axis=1), len(out_shape), len(out_shape) - 1)
        self.vals[n.outputs[0]] = self.settle(n.outputs[0], Affine((term,), bias))

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
            out = replace(v, bias=v.bias + c)
        else:
            f = c if n.op_type == "Mul" else 1.0 / c
            if any(isinstance(t, FixedTerm) for t in v.terms) and not np.all(f == 1):
                self.fail(n, "scales a shared residual stream; fold the constant into the layers that produce it")
                return
            out = Affine(tuple(replace(t, unit=t.unit * f) for t in v.terms), v.bias * f)
        self.vals[n.outputs[0]] = self.settle(n.outputs[0], out)

    def product_operand(self, n: QNode, i: int) -> Spikes | None:
        """Input ``i`` of an activation product: a quantizer's population, ``x = step * count + offset`` (offset
        ``step * (lo - zero point)``, non-zero in the offset form; ternary counts are signed). None (and recorded,
        naming the operand) for anything else."""
        v = self.vals.get(n.inputs[i])
        if isinstance(v, Spikes):
            return v
        self.fail(n, f"operand {i} ('{n.inputs[i]}') of this product of two activations is not a quantizer's output "
                     f"({type(v).__name__ if v is not None else 'unknown'}); a spike product needs an activation quantizer "
                     "on both inputs (e.g. Q and K after their quantizers): quantize that operand")
        return None

    def spike_sum(self, src: str, unit: float, K: int, width: int, transposed: bool, n: QNode, one: tuple[int, ...]) -> FreeTerm:
        """``unit * sum_k`` of the spikes ``src`` (..., M, K) repeated over ``width`` columns: (..., M, width); with
        ``transposed``, the sums over the second-last axis of ``src`` (..., K, N) repeated over ``width`` rows:
        (..., width, N). K = width = 1 is the identity: one-to-one synapses."""
        if K == 1 and width == 1:
            return DiagTerm(src, np.full(one, unit), float(self.T), origin=n.name)
        if transposed:
            rank = len(self.net.info(src).shape)
            src = self.add(f"{n.name}_colsum_in", Transpose((*range(rank - 2), rank - 1, rank - 2)), [src])
        return SpikeSumTerm(src, np.full(one, unit), width, float(K * self.T), transposed, origin=n.name)

    def product_value(self, n: QNode, a: Spikes, b: Spikes, M: int, K: int, N: int, one: tuple[int, ...]) -> Affine:
        """``x_a @ x_b`` of spike operands (..., M, K) and (..., K, N), ``x = s c + o``, exactly:

            sum_k x_a x_b = sa sb sum_k c_a c_b + sa ob sum_k c_a[m, k] + oa sb sum_k c_b[k, n] + K oa ob

        The product is a SpikeMatMul (ProductTerm, listed first: offsets are ``-m * step`` with m >= 1 an integer, so
        the product's unit is the finest and anchors the sum's unit, and the offset terms' weights ``m * 2^k`` are
        exact); the row and column sums are synapse groups fed by the operands' spikes (SpikeSumTerm, ACs only); the
        last is a bias. Every term is integerized and bounded by the precision policy like any sum."""
        T = float(self.T)
        terms: list[FreeTerm] = [ProductTerm(a.node, b.node, np.full(one, a.step * b.step), float(K) * T * T, origin=n.name)]
        if b.offset:
            terms.append(self.spike_sum(a.node, a.step * b.offset, K, N, False, n, one))
        if a.offset:
            terms.append(self.spike_sum(b.node, b.step * a.offset, K, M, True, n, one))
        return Affine(tuple(terms), np.full(one, K * a.offset * b.offset))

    def lower_matmul(self, n: QNode) -> None:
        """Product of two quantized activations (..., M, K) x (..., K, N): a SpikeMatMul with unit step_a * step_b, plus
        synapses for the operands' offsets (:meth:`product_value`)."""
        a, b = (self.product_operand(n, i) for i in (0, 1))
        if a is None or b is None:
            return
        sa, sb = self.net.info(a.node).shape, self.net.info(b.node).shape
        if len(sa) != len(sb) or len(sa) < 2 or sa[:-2] != sb[:-2] or sa[-1] != sb[-2]:
            self.fail(n, f"operands of shapes {sa} and {sb} need equal leading axes and (M, K) x (K, N); "
                         "reshape/transpose explicitly instead of broadcasting")
            return
        one = (1,) * len(self.sample_shape(n.outputs[0]))
        self.vals[n.outputs[0]] = self.settle(n.outputs[0], self.product_value(n, a, b, sa[-2], sa[-1], sb[-1], one))

    def lower_maxpool(self, n: QNode) -> None:
        src = self.vals.get(n.inputs[0])
        a = n.attrs
        if not isinstance(src, Spikes):
            self.fail(n, "max pooling must act on a quantized tensor: place it directly before or after an activation quantizer")
            return
        if self.net.info(src.node).kind == TERNARY:
            self.fail(n, f"max-pools the signed (ternary) spikes of '{src.node}'; the spiking max-pool needs non-negative "
                         "counts: max-pool an unsigned quantizer's output instead")
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
            geometry = ConvGeometry(tuple(a.get("strides", [1, 1])), pads, (1, 1), C)
            bias = np.zeros((1, 1, 1))
            if src.offset:
                taps = conv_counts(geometry.synapse(ones), np.ones((1, *shape), np.int64))[0]
                bias = broadcast.squeeze_constant(src.offset * taps / div)
            term = ConvTerm(src.node, src.step / div, ones, geometry, float(self.T), origin=n.name)
            self.vals[n.outputs[0]] = Affine((term,), bias)
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
        elif isinstance(src, SplitSpikes):
            routed = tuple((self.add(n.name, op, [nm]), sgn) for nm, sgn in src.parts)
            self.split_reach.update((r, self.split_reach[nm]) for (r, _), (nm, _) in zip(routed, src.parts))
            self.vals[n.outputs[0]] = SplitSpikes(routed, src.step)
        elif isinstance(src, Encoded):
            self.vals[n.outputs[0]] = Encoded(self.add(n.name, op, [src.node]), src.unit, src.count_max)
        elif isinstance(src, Affine):
            node, cur = self.materialize(src, n.name, self.downstream_step(n.outputs[0]))
            routed = self.add(n.name, op, [node])
            in_shape = self.sample_shape(n.inputs[0])
            if isinstance(op, Transpose):
                move = lambda v: np.transpose(np.reshape(v, (1,) * (len(in_shape) - np.ndim(v)) + np.shape(v)), op.perm)  # noqa: E731
            else:
                move = lambda v: broadcast.reshape(np.reshape(v, (1,) * (len(in_shape) - np.ndim(v)) + np.shape(v)),  # noqa: E731
                                                   in_shape, out_shape)
            self.vals[n.outputs[0]] = Affine((FixedTerm(routed, move(cur.unit), move(cur.error), cur.site),), move(src.bias))
        else:
            self.fail(n, "routes a tensor csdc cannot represent")

    def lower_output(self) -> None:
        out = self.g.output
        v = self.vals.get(out)
        self.current_node = "<output>"
        if isinstance(v, Spikes):
            one = (1,) * len(self.net.info(v.node).shape)
            v = Affine((DiagTerm(v.node, np.full(one, v.step), float(self.T)),), np.full(one, v.offset))
        if isinstance(v, Pooled):
            v = self.pooled_dense(v, None, None, None, QNode("<output>", "-", (), ()))
        if not isinstance(v, Affine):
            raise UnsupportedModelError(self.g.path, [(out, "-", "the network output could not be lowered")])
        if len(self.sample_shape(out)) != 1:
            raise UnsupportedModelError(self.g.path, [(out, "-", f"the output must be a vector of class scores per sample, got shape {self.g.shapes[out]}")])
        # a single synapse group is exact with k = 0; a sum of groups gets the precision policy's unit
        k = 0 if len(v.terms) == 1 and not isinstance(v.terms[0], FixedTerm) else None
        node, cur = self.materialize(v, "logits", None, k)
        shape = self.net.info(node).shape
        nm = self.add("readout", Readout(np.broadcast_to(cur.unit, shape), np.broadcast_to(v.bias, shape)), [node])
        bound = float(np.max(cur.error * cur.unit))  # no quantizer: the worst absolute error of a logit
        self.report.precision.populations[nm] = PopulationError(bound, cur.site, self.report.precision.sites[cur.site],
                                                                weights=bound, readout=True)

    def lower_elementwise(self, n: QNode) -> None:
        """An elementwise function between two quantizers (``--nonlinear mbe``, docs/mbe.md; made by
        :mod:`csdc.compiler.passes.fuse_elementwise` from ``Gelu`` or the ``Erf`` form of GELU): the input
        spikes' count c (``x = step * c + offset``, c = 0..T, or -T..T from a ternary population) reaches an
        MBE population (``v0 = -lowest count``) through unit
        synapses; its decoded current approximates the function's value in the reading quantizer's step
        times 2^-F, and the population behind it is that quantizer's neuron. The fit's worst-case and mean
        errors over every count are reported."""
        if self.mbe is None:
            self.fail(n, "elementwise nonlinear functions are approximated only in the opt-in mode: csdc compile "
                         "--nonlinear mbe (docs/mbe.md)")
            return
        src = self.vals.get(n.inputs[0])
        if not isinstance(src, Spikes):
            self.fail(n, "the function must read a quantizer's output: its input levels are what the MBE neurons encode")
            return
        out_step = self.downstream_step(n.outputs[0])
        if out_step is None:
            self.fail(n, "the function must be read by a quantizer: its step is the unit of the approximation")
            return
        # counts 0..T, or -T..T from a ternary population (signed spikes): the MBE input is shifted to start at 0
        lowest = -self.T if self.net.info(src.node).kind == TERNARY else 0
        counts = np.arange(lowest, self.T + 1, dtype=np.float64)
        values = evaluate(n, (src.step * counts + src.offset).astype(np.float32)) / out_step
        f = fit_table(n.attrs["function"], values, bases=self.mbe.bases, steps=self.mbe.steps)
        # the precision policy caps the output unit 2^-F when the reading neuron's membrane exceeds the profile
        cap = self.precision.cap.get(self.name(n.name))
        if cap is not None and f.frac_bits > cap:
            f = fit_table(n.attrs["function"], values, bases=self.mbe.bases, steps=self.mbe.steps, frac_bits=max(cap, 0))
        shape = self.net.info(src.node).shape
        syn = self.add(f"{n.name}_in", DiagonalSynapse(np.ones(shape, dtype=np.int8)), [src.node])
        node = self.add(n.name, f.op(np.full(shape, -lowest, dtype=np.int64)), [syn])
        one = (1,) * len(shape)
        U = out_step / float(2**f.frac_bits)
        self.report.precision.sites[node] = f.frac_bits  # the unit the fit chose: 2^-F of the reader's step
        self.vals[n.outputs[0]] = Affine((FixedTerm(node, np.full(one, U), np.zeros(1), node),), np.full(one, f.constant * U))
        for src_name in n.attrs["sources"]:
            if src_name != n.name:  # the seed's own entries were made by self.add
                self.report.explain.setdefault(src_name, []).append(f"{node} (MBENeuron)")
        self.report.approximations.append({
            "source": n.name, "op": n.attrs["function"], "nodes": list(n.attrs["sources"]), "mbe_node": node,
            "bases": f.bases, "steps": f.steps, "latency_steps": self.T, "levels": [lowest, self.T],
            "max_abs_error": f.max_abs_error, "mean_abs_error": f.mean_abs_error,
            "error_unit": f"steps of the reading quantizer ({out_step:.6g})",
            "max_abs_error_real": f.max_abs_error * out_step})

    #: fewest digit populations that read out 1/sqrt(variance) as spikes (radix 2^8 or 2^floor(log2 T), the last
    #: rounded; mbe_digits): more when the last digit's rounding would exceed half the target
    LAYERNORM_DIGITS = 3
    #: fractional bits of the centred levels (a second ternary population per channel): rounding d to whole levels
    #: would cost up to max|gamma| r / 2, several output steps for a token of small variance
    LAYERNORM_FRACTION_BITS = 6
    #: fractional bits of each token's mean (at most log2 T: its population counts up to 2^B)
    LAYERNORM_MEAN_BITS = 7
    #: fractional bits of the centred levels the variance is made of, at most, while its sum of squares takes at
    #: most LAYERNORM_VARIANCE_LEVELS levels (the 1/sqrt fit is verified on every one of them)
    LAYERNORM_VARIANCE_BITS = 4
    LAYERNORM_VARIANCE_LEVELS = 2**21
    #: the share of an output step the 1/sqrt fit may cost at worst (verified on every level of its input)
    LAYERNORM_RSQRT_TARGET = 0.03

    def lower_layernorm(self, n: QNode) -> None:
        """``LayerNormalization`` over the last axis (C channels) of a quantizer's output (``--nonlinear mbe``,
        docs/mbe.md "Compiling LayerNorm"). With input counts q (``x = step q + offset``) and ``d = q - mean q``:
        ``LN(x) = gamma d r + beta``, ``r = 1/sqrt(sum d^2 / C + eps / step^2)``. Spike-driven, with no integer op
        other than spike accumulations:

        1. the token's mean as spikes (``m0 = floor(sum q / C)`` and its fraction ``m1`` in 2^-B), then the centred
           current ``2^(B+E) sign(gamma_c) (q_c - m0 - m1 2^-B)`` from the input's and the mean's spikes, read by
           ternary populations: ``k = round(sign(gamma) d)``, ``kg = round(gamma d / max|gamma|)`` (per-channel
           threshold; ``kg = k`` when every |gamma| is equal) and the fraction ``kf`` kg leaves, in 2^-F;
        2. ``S = sum_c k_c^2`` exactly by a signed ``SpikeMatMul`` of k with itself (K = C), in ``[0, C (L+1)^2 / 4]``,
           or ``sum_c (2^V k_c + kv_c)^2`` (kv: k's fraction in 2^-V) by three, while that domain stays small;
        3. ``r(S)`` by MBE populations reading S (:func:`csdc.compiler.mbe.fit_geometric`, verified on every level);
        4. r read out as spikes by DIF populations of radix 2^8 (:func:`mbe_digits`; at least
           :data:`LAYERNORM_DIGITS`, more for a small T);
        5. ``y_c = max|gamma| sum_j theta_j (kg_c + kf_c 2^-F) c_j + beta_c``: two signed ``SpikeMatMul`` (K = 1) per
           digit, in the current of the output quantizer's neuron (beta in its bias)."""
        src = self.vals.get(n.inputs[0])
        if not isinstance(src, Spikes):
            self.fail(n, "LayerNormalization must read a quantizer's output: its input levels are what the spikes count")
            return
        shape = self.net.info(src.node).shape
        C = int(shape[-1])
        axis = int(n.attrs.get("axis", -1))
        if axis not in (-1, len(shape)):
            self.fail(n, f"normalizes from axis {axis}; only the last axis (axis = -1, the channels of each token) is lowered")
            return
        out_step = self.downstream_step(n.outputs[0])
        if out_step is None:
            self.fail(n, "LayerNormalization must be read by a quantizer: its step is the unit of the approximation")
            return
        gamma = np.broadcast_to(np.asarray(self.g.constants[n.inputs[1]], dtype=np.float64).reshape(-1), (C,)) \
            if len(n.inputs) > 1 and n.inputs[1] and self.g.is_const(n.inputs[1]) else None
        beta = np.broadcast_to(np.asarray(self.g.constants[n.inputs[2]], dtype=np.float64).reshape(-1), (C,)) \
            if len(n.inputs) > 2 and n.inputs[2] else np.zeros(C)
        if gamma is None or (len(n.inputs) > 2 and n.inputs[2] and not self.g.is_const(n.inputs[2])):
            self.fail(n, "scale and bias must be constants (per channel or one number)")
            return
        g_max = float(np.max(np.abs(gamma)))
        if g_max == 0.0 or C < 2:
            self.fail(n, "a LayerNormalization with all scales 0 or a single channel is a constant; fold it into the next layer")
            return
        T, delay = self.T, self.delay
        lowest = -T if self.net.info(src.node).kind == TERNARY else 0
        span = T - lowest
        full = lambda a: np.ascontiguousarray(np.broadcast_to(np.asarray(a, dtype=np.int64), shape))  # noqa: E731
        # 1a. the token's mean as spikes: m0 = floor(sum q / C), m1 = round(2^B (sum q - C m0) / C) in [0, 2^B]
        # (a C-to-1 synapse per spike and C-fold fan-out per mean spike, instead of C-fold fan-out per input spike)
        B = min(self.LAYERNORM_MEAN_BITS, int(math.log2(T)))
        rows = (*shape[:-1], 1)
        total = self.add(f"{n.name}_token_sum", DenseSynapse(np.ones((1, C), np.int64), exponent=B), [src.node])
        whole = TernaryNeuron if lowest < 0 else Neuron  # the floor of a signed mean is signed
        m0 = self.add(f"{n.name}_mean", whole(np.full(rows, C << B, np.int64), np.zeros(rows, np.int64),
                                              np.zeros(rows, np.int64), delay), [total])
        carry = self.add(f"{n.name}_mean_carry", DiagonalSynapse(np.full(rows, -C, np.int64), exponent=B), [m0])
        rest = self.add(f"{n.name}_mean_rest", Add(), [total, carry])
        m1 = self.add(f"{n.name}_mean_fraction", Neuron(np.full(rows, C, np.int64), np.full(rows, C // 2, np.int64),
                                                        np.zeros(rows, np.int64), delay), [rest])
        # 1b. centred current I_c = 2^(B+E) sign_c (q_c - m0 - m1 2^-B); k rounds I / 2^(B+E), kg rounds
        # gamma_c d_c / g_max (threshold 2^(B+E) g_max / |gamma_c|)
        E = 8
        sign = np.where(gamma < 0, -1, 1).astype(np.int64)
        mant, ex = split_power_of_two(sign << (B + E))
        parts_in = [self.add(f"{n.name}_centre", DiagonalSynapse(full(mant), exponent=ex), [src.node]),
                    self.add(f"{n.name}_centre_mean", DenseSynapse(-sign[:, None], exponent=B + E), [m0]),
                    self.add(f"{n.name}_centre_mean_fraction", DenseSynapse(-sign[:, None], exponent=E), [m1])]
        cur = self.add(f"{n.name}_centre_sum", Add(), parts_in)
        theta_k = 1 << (B + E)
        k = self.add(f"{n.name}_centred", TernaryNeuron(full(theta_k), full(theta_k // 2), full(0), delay), [cur])
        cap = 2 * (span + 1) * theta_k  # a channel scaled by less than g_max / (2 (L + 1)) never fires: its kg is 0
        theta_g = np.minimum(np.rint(theta_k * g_max / np.maximum(np.abs(gamma), 1e-300)), cap).astype(np.int64)
        kg = k if np.all(theta_g == theta_k) else self.add(
            f"{n.name}_scaled", TernaryNeuron(full(theta_g), full(theta_g // 2), full(0), delay), [cur])
        # the fraction kg leaves, in 2^-F of its unit: kf = round((I - theta_g kg) / theta_f), theta_f ~ theta_g / 2^F
        F = self.LAYERNORM_FRACTION_BITS
        theta_f = np.maximum(np.rint(theta_g / 2.0**F), 1).astype(np.int64)
        mant, ex = split_power_of_two(-theta_g.astype(np.int64))
        carry = self.add(f"{n.name}_fraction_carry", DiagonalSynapse(full(mant), exponent=ex), [kg])
        rest = self.add(f"{n.name}_fraction_rest", Add(), [cur, carry])
        kf = self.add(f"{n.name}_fraction", TernaryNeuron(full(theta_f), full(theta_f // 2), full(0), delay), [rest])
        # 2. the sum of squares, exactly: of k, or of k + kv 2^-V (kv: the fraction k leaves, in 2^-V) where the
        # larger domain (4^V times) stays small enough to verify: S = sum (2^V k + kv)^2 by three signed products
        V = next(v for v in range(self.LAYERNORM_VARIANCE_BITS, -1, -1)
                 if C * ((span << v) + 1) ** 2 // 4 <= self.LAYERNORM_VARIANCE_LEVELS or v == 0)
        s_max = C * ((span << V) + 1) ** 2 // 4  # sum of squares of C rounded deviations, levels spanning `span`
        row = lambda nm: self.add(f"{n.name}_row", Reshape((*shape[:-1], 1, C)), [nm])  # noqa: E731
        col = lambda nm: self.add(f"{n.name}_col", Reshape((*shape[:-1], C, 1)), [nm])  # noqa: E731
        products = [self.add(f"{n.name}_squares", SpikeMatMul(1 << (2 * V)), [row(k), col(k)])]
        if V:
            theta_v = theta_k >> V
            k_carry = self.add(f"{n.name}_variance_carry", DiagonalSynapse(np.full(shape, -1, np.int64),
                                                                           exponent=B + E), [k])
            k_rest = self.add(f"{n.name}_variance_rest", Add(), [cur, k_carry])
            kv = self.add(f"{n.name}_variance_fraction",
                          TernaryNeuron(full(theta_v), full(theta_v // 2), full(0), delay), [k_rest])
            products += [self.add(f"{n.name}_squares", SpikeMatMul(1 << (V + 1)), [row(k), col(kv)]),
                         self.add(f"{n.name}_squares", SpikeMatMul(1), [row(kv), col(kv)])]
        squares = products[0] if len(products) == 1 else self.add(f"{n.name}_squares_sum", Add(), products)
        eps_levels = float(n.attrs.get("epsilon", 1e-5)) / src.step**2
        # 3-4. r(S) by MBE populations reading S (fit_geometric: its error weighted by sqrt(S) >= |k_c|, since
        # that bounds |k_c| dr), read out as digit spikes (mbe_digits: radix 2^b, the last digit rounded)
        max_error = self.LAYERNORM_RSQRT_TARGET * out_step / g_max
        values = layernorm_rsqrt(np.arange(s_max + 1), C, eps_levels, V)
        steps = min(self.mbe.steps, T)  # an MBE population encodes in at most T steps
        # digits: the last one's rounding (half of max r / (T radix^(D-1)), times sqrt(S_max)) within half the target
        radix_bits = min(8, T.bit_length() - 1)
        need = float(values.max()) * math.sqrt(s_max) / 2**V / (T * max_error)
        digits = max(self.LAYERNORM_DIGITS, 1 + math.ceil(math.log2(max(need, 1.0)) / radix_bits))
        r = self.mbe_digits(f"{n.name}_rsqrt", squares, 0, values, digits=digits, radix_bits=radix_bits,
                            fitter=lambda v: rsqrt_fit(C, s_max, eps_levels, max_error, steps,
                                                       float(v[0] / values[0]), V))
        f = r.fit
        parts = [nm for nm in self.net.inputs(r.mbe_node)] if len(f.parts) > 1 else [r.mbe_node]
        weighted = np.sqrt(np.arange(s_max + 1)) / 2**V * np.abs(r.unit * r.readout - values)  # fit, digits: every S
        relative = float(np.max(np.abs(r.unit * r.readout[1:] / values[1:] - 1.0)))
        # 5. y = g_max (kg + kf 2^-F) r + beta: two signed products per digit
        kcol = self.add(f"{n.name}_scaled_col", Reshape((*shape[:-1], C, 1)), [kg])
        fcol = self.add(f"{n.name}_fraction_col", Reshape((*shape[:-1], C, 1)), [kf])
        ones = (1,) * (len(shape) + 1)
        # a product whose largest contribution (|kf| <= 2^(F-1), a lower digit < radix) is below 1/1000 of an output
        # step is left out, and counted in the error: it would only widen the integer range of the sum
        radix = 1 << radix_bits
        terms, dropped = [], 0.0
        for col, scale, reach in ((kcol, 1.0, float(T)), (fcol, 2.0**-F, float(2 ** (F - 1)))):
            for j, (d, place) in enumerate(zip(r.nodes, r.places)):
                unit_j = g_max * r.unit * place * scale
                largest = unit_j * reach * (T if j == 0 else radix)
                if j and largest < 1e-3 * out_step:
                    dropped += largest / out_step
                    continue
                terms.append(ProductTerm(col, d, np.full(ones, unit_j), float(T * T), origin=n.name))
        terms = tuple(terms)
        self.vals[n.outputs[0]] = self.materialize_reshaped(Affine(terms, np.zeros(ones)), n.name, out_step, shape,
                                                            beta.reshape((1,) * (len(shape) - 1) + (C,)))
        # errors in output steps: the 1/sqrt read-out (fit and digits, on every S) times the largest |kg| a token with
        # that S can have (<= sqrt(S)) and g_max; the centring's roundings (times r)
        rsqrt_steps = float(weighted.max()) * g_max / out_step + dropped
        centring = g_max * (2.0 ** -(F + 1) + 2.0 ** -(B + 1)) / out_step  # kf's rounding and the mean's, times r
        self.report.approximations.append({
            "source": n.name, "op": "layernorm", "nodes": [n.name], "mbe_node": parts[0], "mbe_nodes": parts,
            "bases": f.bases, "steps": f.steps, "latency_steps": self.T, "levels": [0, s_max],
            "max_abs_error": rsqrt_steps, "mean_abs_error": float(weighted.mean()) * g_max / out_step,
            "error_unit": f"steps of the reading quantizer ({out_step:.6g})",
            "max_abs_error_real": rsqrt_steps * out_step, "rsqrt_max_rel_error": relative,
            "digits": len(r.nodes), "fraction_bits": F, "mean_bits": B, "variance_bits": V, "centring_error": centring,
            "detail": f"1/sqrt(variance) of each token by {len(parts)} MBE population(s) on its sum of squares, errors "
                      "above over all its levels, weighted by the largest |centred level| of a token with that S; read "
                      f"out by {len(r.nodes)} digit populations (relative error of r <= {relative:.2g} for S >= 1); "
                      f"centring (mean to 2^-{B + 1}, centred levels to 2^-{F + 1}): at most {centring:.3g} x r more per "
                      f"element, r = 1/std of the token's levels; variance of {f'centred levels to 2^-{V}' if V else 'whole centred levels'}, "
                      "Sheppard-corrected"})

    def mbe_digits(self, base: str, current: str, lo: int, values: np.ndarray, *, digits: int = 2,
                   radix_bits: int | None = None, bases: int | None = None, max_bases: int = 64,
                   refine: bool = False, fitter: Callable[[np.ndarray], MBEFit | MBESum] | None = None) -> Digits:
        """:func:`mbe_digits` in this lowering (its names, explain entries, delay, ``--mbe-bases`` and ``--mbe-steps``)."""
        return mbe_digits(self.net, base, current, lo, values, delay=self.delay, digits=digits, radix_bits=radix_bits,
                          bases=bases if bases is not None else self.mbe.bases if self.mbe else None,
                          steps=self.mbe.steps if self.mbe else 16, max_bases=max_bases, refine=refine, add=self.add,
                          fitter=fitter)

    def lower_softmax(self, n: QNode) -> None:
        """``Softmax`` over the last axis of a quantizer's output (``--nonlinear mbe``, docs/mbe.md, "Compiling
        Softmax"): with input counts ``c_j`` (``x_j = step c_j + offset``) of a row of N,

        1. the row max ``M = max_j c_j``: a SpikeMaxPool over the row;
        2. ``d_j = M - c_j`` in ``[0, T]``: M's spikes broadcast to the row (synapses of weight 1) minus ``c_j``'s;
        3. ``e_j = exp(-step d_j)`` in ``(0, 1]``: MBE populations (:func:`softmax_exp_fit`: secant pieces within a
           tenth of the readout's unit) read out as two digit populations of radix ``2^b <= T + 1``
           (:func:`mbe_digits`), in units ``1 / (T 2^b)``: each element's error enters the row sum;
        4. the row sum of e's digit counts times their places (synapses fed by spikes) is an integer ``q`` and
           ``1/S = 1 / (unit_e q)`` another MBE digit readout over every q the ranges allow
           (:func:`softmax_reciprocal_fit`, verified on every level);
        5. ``y_j = e_j / S``: one SpikeMatMul (K = 1) per pair of digits (:func:`softmax_pairs`: all but the two
           last digits'), weighted by their places, into the output quantizer's neuron.

        Every error is measured on every level of each stage and composed into a worst case over every input
        row; integer ops that are not spike accumulations: none."""
        if self.mbe is None:
            self.fail(n, "Softmax is approximated only in the opt-in mode: csdc compile --nonlinear mbe (docs/mbe.md)")
            return
        src = self.vals.get(n.inputs[0])
        if not isinstance(src, Spikes) or self.net.info(src.node).kind == TERNARY:
            self.fail(n, "Softmax must read an unsigned or offset-form quantizer's output (its counts are what the "
                         "spiking row max and the MBE neurons take); quantize its input first")
            return
        shape = self.net.info(src.node).shape
        rank = len(self.g.shapes[n.inputs[0]])
        if int(n.attrs.get("axis", -1)) % rank != rank - 1:
            self.fail(n, f"Softmax over axis {n.attrs.get('axis')} of a rank-{rank} tensor: only the last axis "
                         "(a row) is lowered; transpose the axis last")
            return
        out_step = self.downstream_step(n.outputs[0])
        if out_step is None:
            self.fail(n, "Softmax must be read by a quantizer: its step is the unit of the approximation")
            return
        T, N = self.T, int(shape[-1])
        R = int(np.prod(shape[:-1], dtype=np.int64))
        # 1. the row max, 2. d = M - c
        rows = self.add(f"{n.name}_rows", Reshape((R, 1, N)), [src.node])
        peak = self.add(f"{n.name}_row_max", SpikeMaxPool((1, N), (1, N)), [rows])
        peak = self.add(f"{n.name}_row_max_col", Reshape((R, 1)), [peak])
        spread = self.add(f"{n.name}_max_to_row", DenseSynapse(np.ones((N, 1), dtype=np.int8)), [peak])
        flat = self.add(f"{n.name}_flat", Reshape((R, N)), [src.node])
        minus = self.add(f"{n.name}_minus_x", DiagonalSynapse(np.broadcast_to(np.int8(-1), (R, N))), [flat])
        gap = self.add(f"{n.name}_gap", Add(), [spread, minus])
        # 3. e(d) = exp(-step d), d = 0..T, in units of 1 / (T 2^b): secant pieces within a tenth of a unit
        exact_e = np.exp(-src.step * np.arange(T + 1, dtype=np.float64))
        radix = softmax_radix_bits(T, N)  # the finest radix whose row sums stay enumerable
        if radix is None:
            self.fail(n, f"a row of {N} elements is too long for the reciprocal of its sum to be fitted on every level")
            return
        steps = min(self.mbe.steps, T)  # an MBE population encodes in at most T steps
        e = self.mbe_digits(f"{n.name}_exp", gap, 0, exact_e, radix_bits=radix,
                            fitter=lambda v: softmax_exp_fit(src.step, T, 1 << radix, steps))
        # 4. q = sum_j readout_e(d_j) (an integer: digit counts times places), then 1/S = 1 / (unit_e q)
        sums = [self.add(f"{n.name}_row_sum{k}", DenseSynapse(np.ones((1, N), dtype=np.int8), exponent=p.bit_length() - 1), [d])
                for k, (d, p) in enumerate(zip(e.nodes, e.places))]
        total = sums[0] if len(sums) == 1 else self.add(f"{n.name}_row_sum", Add(), sums)
        q_lo = int(e.readout[0] + (N - 1) * e.readout.min())  # one element is the max (d = 0)
        q_hi = int(e.readout[0] + (N - 1) * e.readout.max())
        if q_lo < 1:
            self.fail(n, "the exponential's readout of the row max is zero; the MBE fit is too coarse")
            return
        levels = np.arange(q_lo, q_hi + 1, dtype=np.float64)
        # its error reaches an output times e <= 1: SOFTMAX_RECIPROCAL_TARGET output steps, in the readout's unit
        r_unit = 1.0 / (e.unit * q_lo * T * (1 << radix))
        r_target = SOFTMAX_RECIPROCAL_TARGET * out_step / r_unit
        r = self.mbe_digits(f"{n.name}_reciprocal", total, q_lo, 1.0 / (e.unit * levels), radix_bits=radix,
                            fitter=lambda v: softmax_reciprocal_fit(q_lo, q_hi, T, 1 << radix, r_target, steps))
        # 5. y_j = e_j r: one product per pair of digits, in the output quantizer's neuron
        e_col = [self.add(f"{n.name}_exp_col", Reshape((R, N, 1)), [d]) for d in e.nodes]
        r_col = [self.add(f"{n.name}_reciprocal_col", Reshape((R, 1, 1)), [d]) for d in r.nodes]
        one = (1, 1, 1)
        pairs = softmax_pairs(e, r)
        terms = tuple(ProductTerm(e_col[k], r_col[m], np.full(one, e.unit * r.unit * e.places[k] * r.places[m]), float(T * T),
                                  origin=n.name) for k, m in pairs)
        self.vals[n.outputs[0]] = self.materialize_reshaped(Affine(terms, np.zeros(one)), n.name, out_step, shape,
                                                            np.zeros((1,) * len(shape)))
        worst, mean = softmax_error(e, r, N, src.step)
        self.report.approximations.append({
            "source": n.name, "op": "softmax", "nodes": [n.name], "mbe_node": f"{e.mbe_node}, {r.mbe_node}",
            "mbe_nodes": [*e.populations, *r.populations],
            "bases": max(e.bases, r.bases), "steps": max(e.fit.steps, r.fit.steps), "latency_steps": 2 * T + (len(e.nodes) + len(r.nodes)) * self.delay,
            "levels": [0, T], "row": N, "max_abs_error": worst / out_step, "mean_abs_error": mean / out_step,
            "error_unit": f"steps of the reading quantizer ({out_step:.6g})", "max_abs_error_real": worst,
            "stages": {"exp": {**e.report(), "function": f"exp(-{src.step:.6g} d), d = M - c"},
                       "reciprocal": {**r.report(), "function": f"1 / ({e.unit:.6g} q), q = row sum of exp's readout"}}})

    def lower_mul(self, n: QNode) -> None:
        """``Mul``: by a constant (:meth:`lower_add_mul`), or the elementwise product of two quantized
        activations of one shape (:meth:`lower_product`)."""
        if any(self.g.is_const(i) for i in n.inputs):
            self.lower_add_mul(n)
        else:
            self.lower_product(n)

    def lower_product(self, n: QNode) -> None:
        """Elementwise product of two quantized activations: :meth:`product_value` with K = 1 over the element axes
        (each operand's population reshaped to (*shape, 1, 1): a SpikeMatMul, one-to-one synapses for the offsets, a
        bias); its current is reshaped back."""
        a, b = (self.product_operand(n, i) for i in (0, 1))
        if a is None or b is None:
            return
        shape = self.sample_shape(n.outputs[0])
        got = [self.net.info(v.node).shape for v in (a, b)]
        if any(s != shape for s in got):
            self.fail(n, f"operands of shapes {got[0]} and {got[1]} must both have the output's shape {shape} (no "
                         "broadcasting)")
            return
        column = (*shape, 1, 1)
        a, b = (replace(v, node=self.add(f"{n.name}_{side}", Reshape(column), [v.node])) for side, v in (("a", a), ("b", b)))
        value = self.product_value(n, a, b, 1, 1, 1, (1,) * len(column))
        self.vals[n.outputs[0]] = self.materialize_reshaped(value, n.name, self.downstream_step(n.outputs[0]), shape,
                                                            value.bias.reshape((1,) * len(shape)))

    def materialize_reshaped(self, value: Affine, base: str, step: float | None, shape: tuple[int, ...],
                             bias: np.ndarray) -> Affine:
        """:meth:`materialize` a sum laid out for spike products (e.g. (*shape, 1, 1) or (R, N, 1)) and reshape its
        current back to ``shape``: the value ``current + bias`` (``bias`` broadcast to ``shape``)."""
        node, cur = self.materialize(value, base, step)
        flat = self.add(f"{base}_out", Reshape(shape), [node])
        one = (1,) * len(shape)
        error = np.asarray(cur.error, dtype=np.float64)
        error = error.reshape(one) if error.size == 1 else error.reshape(shape)
        return Affine((FixedTerm(flat, np.asarray(cur.unit).reshape(one), error, cur.site),), bias)

    def lower_unfused(self, n: QNode) -> None:
        where = "--nonlinear mbe approximates" if self.mbe is not None else "csdc compile --nonlinear mbe approximates"
        self.fail(n, f"{where} {n.op_type} only between two quantizers (DequantizeLinear -> {n.op_type} ... -> "
                     "QuantizeLinear, every step elementwise on one quantized input; docs/mbe.md)")

    HANDLERS = {"Elementwise": "lower_elementwise", "LayerNormalization": "lower_layernorm", "Softmax": "lower_softmax", "Gelu": "lower_unfused", "Erf": "lower_unfused", "Quant": "lower_quant", "Linear": "lower_linear", "MatMul": "lower_matmul", "Add": "lower_add_mul",
                "Mul": "lower_mul", "Div": "lower_add_mul", "MaxPool": "lower_maxpool", "AveragePool": "lower_avgpool",
                "GlobalAveragePool": "lower_avgpool", "ReduceMean": "lower_avgpool", "Flatten": "lower_route",
                "Reshape": "lower_route", "Transpose": "lower_route", "Squeeze": "lower_route", "Unsqueeze": "lower_route"}

    def run(self) -> tuple[Network, LoweringReport]:
        unquantized = set()
        for c in self.cons.get(self.g.input, []):
            if c.op_type != "Quant":
                # routing before the quantizer is moved behind it (move_input_quant); say why it was not
                why = unmoved_reason(self.g, c)
                moved = f"; the quantizer after this {c.op_type} could not be moved onto the model input: {why}" if why else ""
                self.fail(c, "reads the model input directly; the input must go through a quantizer "
                             "(QuantizeLinear -> DequantizeLinear) that defines the integer pixel levels" + moved)
                unquantized.add(c.name)
        for n in self.g.nodes:
            self.current_node = n.name
            if n.name in unquantized:
                continue  # reported above
            h = self.HANDLERS.get(n.op_type)
            if h is None:
                hint = ("ReLU is only supported right before an activation quantizer" if n.op_type == "Relu"
                        else "no spike-driven lowering in this position")
                self.fail(n, hint)
                continue
            if any(i and i not in self.vals and not self.g.is_const(i) and i != self.g.input for i in n.inputs):
                continue  # an upstream problem was already reported
            getattr(self, h)(n)
        if self.problems:
            raise UnsupportedModelError(self.g.path, self.problems)
        self.lower_output()
        self.report.T = self.T
        return self.net, self.report


def lower(graph: QGraph, precision: Precision | None = None, delay: int | None = None,
          mbe: MBEOptions | None = None) -> tuple[Network, LoweringReport]:
    """Lower a canonical QGraph (after the canonicalization passes) to a spiking Network under one
    precision policy (default: the generic profile's budget and the error target); ``mbe``: the opt-in
    approximate mode for GELU (docs/mbe.md), None refuses it."""
    return Lowering(graph, precision or Precision(PROFILES["generic"]), delay, mbe).run()
