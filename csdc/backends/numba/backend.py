"""The numba backend: an event-driven, integer-only simulator of the spiking IR.

It reproduces the layer-synchronous semantics of :func:`csdc.ir.semantics.run_steps`
exactly: each node runs over all T steps before its consumers (the IR's semantics), in
topological order. The network is first turned into a *plan*: one typed step per node,
chosen through the registry ``STEP_BUILDERS`` (op type -> builder), holding the node's
parameters prepared for its kernel (transposed / narrowed weights, integer dtypes).

Tensors are numpy arrays of shape (batch, Tc, *shape): spikes are ``uint8`` with Tc = T,
ternary (signed) spikes ``int8`` -1/0/+1 (a dense or conv synapse fed by them runs the binary
kernel on the +1 and -1 spikes side by side, with the weights and their negatives);
currents are ``int32`` when a static bound on ``|I|`` per step allows it, else ``int64``.
A current that does not vary in time (the encoded input, and synapses / adds / routing
fed only by it) keeps Tc = 1, so a synapse reading it multiplies once per sample instead
of once per step.

Statistics (:class:`csdc.backends.base.NodeStats`, summed over the batch):

- ``acs`` (synapse nodes): for every presynaptic spike, the number of targets it reaches:
  ``n_out`` for a dense synapse, the in-bounds kernel taps times the group's output
  channels for a convolution, 1 for a diagonal synapse; for a SpikeMatMul (M, K) x (K, N),
  N per spike of the left input and M per spike of the right one (each adds a running count).
- ``macs`` (synapse nodes fed by a current): the same count for each nonzero input
  value, once per distinct time step (once in total for a constant current).
- SumPool and SpikeMaxPool only route and compare spikes: no ACs.
- ``neurons``, ``spikes`` (Neuron, SpikeMaxPool; spikes of both signs for a TernaryNeuron,
  each one AC per target downstream); ``max_abs_v`` (Neuron): the largest |membrane
  potential| reached, for bit-width checks.
- ``stats`` has an entry for each Neuron, SpikeMaxPool and synapse node (incl. SpikeMatMul).

The batch is cut into chunks (one per worker thread for small models, two for large ones,
and small enough that the live tensors of all workers stay within a memory budget);
worker threads (the calling thread and a persistent pool) take whole chunks through the
network (the kernels release the GIL), so parallelism is per chunk of samples, never
inside a kernel. The plan is laid out once per network as a :class:`_Program` (input and
free lists by node index, verified once) so that the per-node Python work, which holds
the GIL, stays small: on the small models a node's kernel runs for tens of microseconds.
"""

from __future__ import annotations

import math
import threading
import time
import weakref
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numba
import numpy as np

from csdc.backends.base import NodeStats, RunResult
from csdc.backends.numba import kernels as K
from csdc.errors import DataError, IRError
from csdc.ir.graph import Network
from csdc.ir.ops import (
    SPIKES,
    TERNARY,
    Add,
    ConvSynapse,
    DenseSynapse,
    DiagonalSynapse,
    Encode,
    MBENeuron,
    Neuron,
    Op,
    Readout,
    ReduceSum,
    Reshape,
    Shape,
    SpikeMatMul,
    SpikeMaxPool,
    SumPool,
    TernaryNeuron,
    Transpose,
    narrowest,
    power_of_two_exponent,
)
from csdc.ir.semantics import encode, readout_logits

_INT32_MAX = 2**31 - 1
_LARGE_CHUNK = 32 * 2**20  # bytes of tensors per chunk above which chunks are split further
# Nodes whose activity is reported: spiking populations and synapses (the others only route).
_REPORTED = (Neuron, MBENeuron, SpikeMaxPool, DenseSynapse, ConvSynapse, DiagonalSynapse, SpikeMatMul)


# -- integer types ------------------------------------------------------------------
def _current_dtype(bound: int) -> type[np.signedinteger]:
    """int32 when every per-step value (and partial sum) is bounded by ``bound`` < 2^31."""
    return np.int32 if bound <= _INT32_MAX else np.int64


def _narrow(w: np.ndarray) -> np.ndarray:
    """``w`` C-contiguous in the narrowest signed integer type holding it (less memory traffic per AC)."""
    return np.ascontiguousarray(narrowest(w))


def _narrow_scaled(w: np.ndarray) -> tuple[np.ndarray, int]:
    """``(w / scale, scale)`` with ``scale`` the largest power of two dividing every weight,
    when dividing lets ``w`` fit a narrower type (e.g. 8-bit weights times 2^F rescaled to a
    residual sum's unit); else ``(w, 1)``. Kernels accumulate ``w / scale`` and multiply the
    sum by ``scale``: the same integers, with less memory traffic per AC."""
    plain = _narrow(w)
    scale = 1 << power_of_two_exponent(w)
    if scale == 1:
        return plain, 1
    scaled = _narrow(w // scale)
    if scaled.dtype.itemsize < plain.dtype.itemsize:
        return scaled, scale
    return plain, 1


def _acc_dtype(bound: int, scale: int) -> type[np.signedinteger]:
    """Accumulator of a spike-driven synapse whose outputs are bounded by ``bound`` and whose
    weights are stored divided by ``scale``: int16 when the scaled sums fit, else the
    current's own type."""
    return np.int16 if bound // scale <= np.iinfo(np.int16).max else _current_dtype(bound)


def _max_abs_row_sum(w: np.ndarray) -> int:
    """max over rows (axis 0) of sum |w| over the other axes. Summed in float64, which is
    exact below 2^53; larger sums select int64 whatever their exact value."""
    if w.size == 0:
        return 0
    return int(np.abs(w.reshape(w.shape[0], -1).astype(np.float64)).sum(axis=1).max())


# -- plan -----------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class NodeContext:
    """What a step builder knows about a node's surroundings."""

    T: int
    in_shapes: list[Shape]
    in_kinds: list[str]
    in_bounds: list[int]  # bound on |value| per element and step of each input (1 for spikes)
    out_shape: Shape


class Step(Protocol):
    """A node prepared for execution: maps input tensors to the output tensor."""

    bound: int  # bound on |output value| per element and step

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        ...


StepBuilder = Callable[[Op, NodeContext], Step]
STEP_BUILDERS: dict[type[Op], StepBuilder] = {}


def _builds(op_type: type[Op]) -> Callable[[StepBuilder], StepBuilder]:
    def register(fn: StepBuilder) -> StepBuilder:
        STEP_BUILDERS[op_type] = fn
        return fn

    return register


def _aligned_empty(shape: int | Shape, dtype: type, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary
    (whole-vector loads and stores of its rows do not straddle cache lines)."""
    n = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    itemsize = np.dtype(dtype).itemsize
    buf = np.empty(n * itemsize + align, dtype=np.uint8)
    off = -buf.ctypes.data % align
    return buf[off:off + n * itemsize].view(dtype).reshape(shape)


def _aligned(a: np.ndarray) -> np.ndarray:
    """A 64-byte aligned C-contiguous copy of ``a`` (read-only)."""
    out = _aligned_empty(a.shape, a.dtype)
    out[...] = a
    out.flags.writeable = False
    return out


def _batch_zeros(x: np.ndarray, m: int, shape: Shape, dtype: type) -> np.ndarray:
    return np.zeros((x.shape[0], m, *shape), dtype=dtype)


@dataclass(frozen=True, slots=True)
class EncodeStep:
    """Direct encoding: the integer levels of the data as a constant current (Tc = 1)."""

    op: Encode
    bound: int

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        q = encode(self.op, ins[0])
        return q.astype(_current_dtype(self.bound))[:, None]


@_builds(Encode)
def _encode(op: Encode, ctx: NodeContext) -> Step:
    return EncodeStep(op, max(abs(op.lo), abs(op.hi)))


@dataclass(frozen=True, slots=True)
class DenseStep:
    """Dense synapses over the last axis; ``w_t`` is (in, out) so a spike adds one row
    (the weights divided by ``scale``, a power of two, see :func:`_narrow_scaled`)."""

    w_t: np.ndarray
    scale: int
    from_spikes: bool
    acc: np.ndarray  # empty array of a spike-driven row's accumulator type (int16 when its sums fit)
    bound: int
    signed: bool = False  # ternary input: w_t is (2 in, out), the weights then their negatives

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        x = _split_signs(ins[0], -1) if self.signed else ins[0]
        n_in, n_out = self.w_t.shape
        lead = x.shape[1:-1]  # (Tc, *leading axes)
        flat = x.reshape(x.shape[0], math.prod(lead), n_in)
        dt = _current_dtype(self.bound)
        if self.from_spikes:
            out = np.empty((x.shape[0], flat.shape[1], n_out), dtype=dt)  # every row is written
            stats.acs += K.dense_spikes(flat, self.w_t, self.scale, out.reshape(1, *out.shape), self.acc)
        else:
            out = np.zeros((x.shape[0], flat.shape[1], n_out), dtype=dt)
            stats.macs += K.dense_currents(flat, self.w_t, self.scale, out)
        return out.reshape(x.shape[0], *lead, n_out)


@dataclass(frozen=True, slots=True)
class DenseGroupStep:
    """G spike-driven DenseSynapse nodes fed by the same spikes with weights of one type,
    scale and accumulator, each with ``n`` outputs, run as one: ``w_t`` is their weights side
    by side (in, G x n), so the spikes are gathered once and each spike adds one row of
    G x n weights (a presynaptic event reaching the targets of all G nodes). Run at the
    first member's place in the plan; :meth:`run` returns the G outputs."""

    w_t: np.ndarray
    scale: int
    acc: np.ndarray
    n: int
    dtype: type  # of the outputs
    bound: int
    signed: bool = False  # ternary input, split once for all members (see DenseStep)

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        raise IRError("a grouped dense synapse runs through DenseGroupStep.run")

    def run(self, ins: list[np.ndarray], stats: list[NodeStats]) -> list[np.ndarray]:
        x = _split_signs(ins[0], -1) if self.signed else ins[0]
        n_in, n_total = self.w_t.shape
        g = n_total // self.n
        lead = x.shape[1:-1]
        flat = x.reshape(x.shape[0], math.prod(lead), n_in)
        out = np.empty((g, x.shape[0], flat.shape[1], self.n), dtype=self.dtype)  # every row is written
        acs = K.dense_spikes(flat, self.w_t, self.scale, out, self.acc) // g  # the same spikes reach each node's n
        for st in stats:
            st.acs += acs
        return [o.reshape(x.shape[0], *lead, self.n) for o in out]


def _dense_groups(nodes: list[PlannedNode], inputs: list[tuple[int, ...]]) -> list[list[int]]:
    """Spike-driven dense nodes that can run as one :class:`DenseGroupStep` (same input, same
    weight type, scale, accumulator, output type and width; binary or ternary input), two or
    more per group."""
    by_key: dict[tuple, list[int]] = {}
    for i, p in enumerate(nodes):
        st = p.step
        if isinstance(st, DenseStep) and st.from_spikes:
            key = (inputs[i], st.w_t.shape, st.w_t.dtype, st.scale, st.acc.dtype, _current_dtype(st.bound), st.signed)
            by_key.setdefault(key, []).append(i)
    return [g for g in by_key.values() if len(g) > 1]


def _split_signs(s: np.ndarray, axis: int) -> np.ndarray:
    """Ternary spikes (int8) as binary spikes (uint8) twice as long along ``axis``: the +1 spikes,
    then the -1 spikes. A synapse with weights ``[w, -w]`` along that axis then computes ``w s``
    with the binary kernel (one AC per spike of either sign)."""
    return np.concatenate([s > 0, s < 0], axis=axis).view(np.uint8)


@_builds(DenseSynapse)
def _dense(op: DenseSynapse, ctx: NodeContext) -> Step:
    signed = ctx.in_kinds[0] == TERNARY
    w = op.weight
    w_t, scale = _narrow_scaled(np.concatenate([w.T, -w.T]) if signed else w.T)
    w_t = _aligned(w_t)
    bound = ctx.in_bounds[0] * _max_abs_row_sum(w)
    return DenseStep(w_t, scale, ctx.in_kinds[0] in (SPIKES, TERNARY), np.empty(0, dtype=_acc_dtype(bound, scale)),
                     bound, signed)


@dataclass(frozen=True, slots=True)
class ConvStep:
    """Convolution synapses; ``w_r`` is (C, kh, kw, O/groups) so a tap adds contiguous weights,
    or (C, kh, kw x O) with each kernel row's taps reversed when ``rows`` (one group, column
    stride and dilation 1: :func:`kernels.conv_spikes_rows`); divided by ``scale``, a power
    of two, see :func:`_narrow_scaled`."""

    w_r: np.ndarray
    scale: int
    acc: np.ndarray  # empty array of the channels-last accumulator's type (int16 when the sums fit)
    rows: bool
    stride: np.ndarray
    pad: np.ndarray  # (top, left); bottom/right padding only shapes the output size
    dilation: np.ndarray
    kw: int
    out_shape: Shape
    from_spikes: bool
    bound: int
    groups: int = 0  # > 0: ternary input, split into +1 and -1 spikes per group (see _conv)

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        x = ins[0]
        if self.groups:
            b, t, c, h, w = x.shape
            x = _split_signs(x.reshape(b, t, self.groups, c // self.groups, h, w), 3).reshape(b, t, 2 * c, h, w)
        out = np.empty((x.shape[0], x.shape[1], *self.out_shape), dtype=_current_dtype(self.bound))  # all written
        if self.rows:
            stats.acs += K.conv_spikes_rows(x, self.w_r, self.scale, self.stride, self.pad, self.dilation,
                                            self.kw, out, self.acc)
        elif self.from_spikes:
            stats.acs += K.conv_spikes(x, self.w_r, self.scale, self.stride, self.pad, self.dilation, out, self.acc)
        else:
            stats.macs += K.conv_currents(x, self.w_r, self.scale, self.stride, self.pad, self.dilation, out)
        return out


@_builds(ConvSynapse)
def _conv(op: ConvSynapse, ctx: NodeContext) -> Step:
    signed = ctx.in_kinds[0] == TERNARY
    # ternary input: each group reads its +1 spikes, then its -1 spikes (2 cg channels) through the
    # weights, then their negatives
    w = np.concatenate([op.weight, -op.weight], axis=1) if signed else op.weight  # (O, cg, kh, kw)
    o, cg, kh, kw = w.shape
    g = op.groups
    og = o // g
    # w_r[c, ky, kx, j] = w[(c // cg) * og + j, c % cg, ky, kx]
    w_r = w.reshape(g, og, cg, kh, kw).transpose(0, 2, 3, 4, 1).reshape(g * cg, kh, kw, og)
    w_r, scale = _narrow_scaled(w_r)
    from_spikes = ctx.in_kinds[0] in (SPIKES, TERNARY)
    rows = from_spikes and g == 1 and op.stride[1] == 1 and op.dilation[1] == 1
    if rows:
        w_r = w_r[:, :, ::-1, :].reshape(cg, kh, kw * og)
    bound = ctx.in_bounds[0] * _max_abs_row_sum(op.weight)
    return ConvStep(
        w_r=_aligned(w_r),
        scale=scale,
        acc=np.empty(0, dtype=_acc_dtype(bound, scale)),
        rows=rows,
        stride=np.array(op.stride, dtype=np.int64),
        pad=np.array(op.padding[:2], dtype=np.int64),
        dilation=np.array(op.dilation, dtype=np.int64),
        kw=kw,
        out_shape=ctx.out_shape,
        from_spikes=from_spikes,
        bound=bound,
        groups=g if signed else 0,
    )


@dataclass(frozen=True, slots=True)
class DiagonalStep:
    """One-to-one synapses: each spike adds its own weight (1 AC)."""

    weight: np.ndarray  # flattened, narrowest type
    from_spikes: bool
    bound: int

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        s = ins[0]
        if not self.from_spikes:  # a current (from the encoded input): numpy, one AC per nonzero value
            stats.acs += int(np.count_nonzero(s))
            return np.multiply(s, self.weight.reshape(s.shape[2:]), dtype=_current_dtype(self.bound))
        b, t = s.shape[:2]
        out = np.empty(s.shape, dtype=_current_dtype(self.bound))
        n = self.weight.size
        stats.acs += K.diagonal_spikes(s.reshape(b, t, n), self.weight, out.reshape(b, t, n))
        return out


@_builds(DiagonalSynapse)
def _diagonal(op: DiagonalSynapse, ctx: NodeContext) -> Step:
    return DiagonalStep(_aligned(_narrow(op.weight.ravel())), ctx.in_kinds[0] in (SPIKES, TERNARY),
                        int(np.abs(op.weight.astype(np.float64)).max(initial=0)))


@dataclass(frozen=True, slots=True)
class AddStep:
    """Sum of currents; a constant input (Tc = 1) broadcasts over the others' time axis."""

    bound: int

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        if len(ins) == 1:
            return ins[0]
        b = ins[0].shape[0]
        t = max(a.shape[1] for a in ins)
        shape = ins[0].shape[2:]
        n = math.prod(shape)
        out = np.empty((b, t, *shape), dtype=_current_dtype(self.bound))
        flat = out.reshape(b, t, n)
        # int32 + int32 sums fit int32 when the output is int32 (the bound says so); wider
        # inputs only occur with an int64 output
        K.add_currents(ins[0].reshape(b, ins[0].shape[1], n), ins[1].reshape(b, ins[1].shape[1], n), flat)
        for a in ins[2:]:
            K.add_currents(flat, a.reshape(b, a.shape[1], n), flat)
        return out


@_builds(Add)
def _add(op: Add, ctx: NodeContext) -> Step:
    return AddStep(sum(ctx.in_bounds))


@dataclass(frozen=True, slots=True)
class ReduceSumStep:
    """Sum of a current over element axes (adds only; no synaptic events)."""

    axes: tuple[int, ...]  # element axes (batch and time axes excluded)
    bound: int

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        return ins[0].sum(axis=tuple(a + 2 for a in self.axes), dtype=_current_dtype(self.bound))


@_builds(ReduceSum)
def _reduce_sum(op: ReduceSum, ctx: NodeContext) -> Step:
    return ReduceSumStep(op.axes, ctx.in_bounds[0] * int(np.prod([ctx.in_shapes[0][a] for a in op.axes])))


@dataclass(frozen=True, slots=True)
class NeuronStep:
    """DIF neurons, or ternary neurons (``signed``: int8 trains of -1/0/+1 and signed counts);
    ``threshold``, ``v0``, ``bias`` flattened to (N,), int32 when the membrane potential provably
    stays below 2^31 in magnitude, else int64."""

    threshold: np.ndarray
    v0: np.ndarray
    bias: np.ndarray
    delay: int
    T: int
    signed: bool = False
    bound: int = 1

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        return self.fire(ins, stats)[0]

    def fire(self, ins: list[np.ndarray], stats: NodeStats,
             counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The spike trains (batch, T, *shape) and their counts (batch, *shape) int64, written
        into ``counts`` (C-contiguous) if given; adds the spikes (of both signs), the -1 spikes
        and the peak |v| to ``stats``."""
        cur = ins[0]
        b, tc = cur.shape[:2]
        n = self.threshold.size
        out = np.empty((b, self.T, n), dtype=np.int8 if self.signed else np.uint8)  # every step and count is written
        counts = np.empty((b, n), dtype=np.int64) if counts is None else counts.reshape(b, n)
        kernel = K.ternary_neurons if self.signed else K.dif_neurons
        spikes, negative, peak = kernel(cur.reshape(b, tc, n), self.threshold, self.v0, self.bias, self.delay, out,
                                        counts)
        stats.spikes += spikes
        stats.negative_spikes += negative
        stats.max_abs_v = max(stats.max_abs_v, peak)
        return out.reshape(b, self.T, *cur.shape[2:]), counts.reshape(b, *cur.shape[2:])


@_builds(TernaryNeuron)
@_builds(Neuron)
def _neuron(op: Neuron, ctx: NodeContext) -> Step:
    # |v| <= |v0| + T (|I| + |bias|) before a reset (which moves v towards 0); the
    # comparison with and subtraction of the threshold stay within |v| + |threshold|.
    peak = lambda a: int(np.abs(a.astype(np.float64)).max(initial=0))
    v_bound = peak(op.v0) + ctx.T * (ctx.in_bounds[0] + peak(op.bias)) + peak(op.threshold)
    dt = _current_dtype(v_bound)
    return NeuronStep(*(np.ascontiguousarray(a.ravel(), dtype=dt) for a in (op.threshold, op.v0, op.bias)), op.delay,
                      ctx.T, isinstance(op, TernaryNeuron))


@dataclass(frozen=True, slots=True)
class MBEStep:
    """MBE neurons (docs/mbe.md): integrate the window, encode with K bases over S steps, emit the
    decoded current; ``v0`` flattened to (N,), the (K, S) parameters as the op holds them."""

    v0: np.ndarray
    offset: np.ndarray
    threshold: np.ndarray
    reset: np.ndarray
    weight: np.ndarray
    T: int
    bound: int  # largest |output| of one step: sum over bases of |weight|

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        cur = ins[0]
        b, tc = cur.shape[:2]
        n = self.v0.size
        out = np.empty((b, self.T, n), dtype=_current_dtype(self.bound))  # every element is written
        spikes, peak = K.mbe_neurons(cur.reshape(b, tc, n), self.v0, self.offset, self.threshold, self.reset,
                                     self.weight, out)
        stats.spikes += spikes
        stats.acs += spikes  # a spike adds its step's output weight to its target
        stats.neurons = n * self.threshold.shape[0]  # one neuron per element and basis
        stats.max_abs_v = max(stats.max_abs_v, int(peak))
        return out.reshape(b, self.T, *cur.shape[2:])


@_builds(MBENeuron)
def _mbe(op: MBENeuron, ctx: NodeContext) -> Step:
    contiguous = lambda a: np.ascontiguousarray(a, dtype=np.int64)
    return MBEStep(contiguous(op.v0.ravel()), contiguous(op.offset), contiguous(op.threshold), contiguous(op.reset),
                   contiguous(op.weight), ctx.T, int(np.abs(op.weight).sum(axis=0).max()))


@dataclass(frozen=True, slots=True)
class WindowStep:
    """SpikeMaxPool (TDEC, spikes out) or SumPool (current out) over (C, H, W) spikes."""

    kernel: np.ndarray
    stride: np.ndarray
    pad: np.ndarray  # (top, left)
    out_shape: Shape
    is_max: bool
    bound: int

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        if self.is_max:
            return self.fire(ins, stats)[0]
        s = ins[0]
        out = _batch_zeros(s, s.shape[1], self.out_shape, _current_dtype(self.bound))
        K.sum_pool(s, self.kernel, self.stride, self.pad, out)
        return out

    def fire(self, ins: list[np.ndarray], stats: NodeStats,
             counts: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """SpikeMaxPool: the spike trains and their counts (written into ``counts`` if given),
        as :meth:`NeuronStep.fire`."""
        s = ins[0]
        out = np.empty((s.shape[0], s.shape[1], *self.out_shape), dtype=np.uint8)  # all written
        counts = np.empty((s.shape[0], *self.out_shape), dtype=np.int64) if counts is None else counts
        stats.spikes += K.spike_max_pool(s, self.kernel, self.stride, self.pad, out, counts)
        return out, counts


@_builds(SumPool)
@_builds(SpikeMaxPool)
def _window(op: SpikeMaxPool | SumPool, ctx: NodeContext) -> Step:
    is_max = isinstance(op, SpikeMaxPool)
    return WindowStep(
        kernel=np.array(op.kernel, dtype=np.int64),
        stride=np.array(op.stride, dtype=np.int64),
        pad=np.array(op.padding[:2], dtype=np.int64),
        out_shape=ctx.out_shape,
        is_max=is_max,
        bound=1 if is_max else op.kernel[0] * op.kernel[1],
    )


@dataclass(frozen=True, slots=True)
class SpikeMatMulStep:
    """TDEC product of two spike tensors (..., M, K) x (..., K, N) -> current (..., M, N)."""

    weight: int
    out_shape: Shape
    proto: np.ndarray  # empty array of the counts' and partial products' type
    bound: int
    signed: bool = False  # an operand is ternary: kernels.spike_matmul_signed

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        a, b = ins
        bsz, T = a.shape[:2]
        m, k = a.shape[-2:]
        n = b.shape[-1]
        lead = math.prod(a.shape[2:-2])
        out = np.empty((bsz, T, lead, m, n), dtype=_current_dtype(self.bound))  # all written
        kernel = K.spike_matmul_signed if self.signed else K.spike_matmul
        stats.acs += kernel(a.reshape(bsz, T, lead, m, k), b.reshape(bsz, T, lead, k, n), self.weight, out, self.proto)
        return out.reshape(bsz, T, *self.out_shape)


@_builds(SpikeMatMul)
def _spike_matmul(op: SpikeMatMul, ctx: NodeContext) -> Step:
    # Per step: A(t) C_B(t) <= K * T and C_A(t-1) B(t) <= K * (T - 1).
    # The partial products are bounded by K * T before ``weight`` multiplies their sum.
    k = ctx.in_shapes[0][-1]
    partial_bound = k * ctx.T
    proto_dt = np.int16 if partial_bound <= np.iinfo(np.int16).max else _current_dtype(partial_bound)
    return SpikeMatMulStep(op.weight, ctx.out_shape, np.empty(0, dtype=proto_dt), abs(op.weight) * k * (2 * ctx.T - 1),
                           TERNARY in ctx.in_kinds)


@dataclass(frozen=True, slots=True)
class ReshapeStep:
    """Routing: C-order reshape of the element axes (no data movement)."""

    shape: Shape
    bound: int

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        x = ins[0]
        return x.reshape(x.shape[0], x.shape[1], *self.shape)


@_builds(Reshape)
def _reshape(op: Reshape, ctx: NodeContext) -> Step:
    return ReshapeStep(op.shape, ctx.in_bounds[0])


@dataclass(frozen=True, slots=True)
class TransposeStep:
    """Routing: permute the element axes (copied so kernels see contiguous arrays; by
    :func:`kernels.permute` for up to three element axes, else by numpy)."""

    perm: tuple[int, ...]
    bound: int

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        x = ins[0]
        view = x.transpose(0, 1, *(p + 2 for p in self.perm))
        if view.flags.c_contiguous:
            return view
        if len(self.perm) > 3 or view.flags.f_contiguous:
            return np.ascontiguousarray(view)
        # batch and time merged, unit axes after them up to 4-D: a strided ('A' layout) view
        src = x.reshape(x.shape[0] * x.shape[1], *x.shape[2:]).transpose(0, *(p + 1 for p in self.perm))
        src = src.reshape(src.shape[0], *(1,) * (3 - len(self.perm)), *src.shape[1:]) if len(self.perm) < 3 else src
        out = np.empty(src.shape, dtype=x.dtype)
        K.permute(src, out)
        return out.reshape(view.shape)


@_builds(Transpose)
def _transpose(op: Transpose, ctx: NodeContext) -> Step:
    return TransposeStep(op.perm, ctx.in_bounds[0])


@dataclass(frozen=True, slots=True)
class ReadoutStep:
    """Accumulated readout currents ``V = sum_t I(t)`` (batch, classes) in int64."""

    T: int
    bound: int = 0

    def __call__(self, ins: list[np.ndarray], stats: NodeStats) -> np.ndarray:
        x = ins[0]
        total = x.sum(axis=1, dtype=np.int64)
        return total * self.T if x.shape[1] == 1 else total


@_builds(Readout)
def _readout(op: Readout, ctx: NodeContext) -> Step:
    return ReadoutStep(ctx.T)


@dataclass(frozen=True, slots=True)
class PlannedNode:
    name: str
    op: Op
    step: Step
    inputs: list[str]
    bytes_per_sample: int  # size of the node's output tensor for one sample


def plan(net: Network) -> list[PlannedNode]:
    """Prepare every node of a verified network for execution, in topological order."""
    bounds: dict[str, int] = {}
    nodes = []
    for name, op in net.nodes():
        builder = STEP_BUILDERS.get(type(op))
        if builder is None:
            raise IRError(f"node '{name}': the numba backend has no kernel for op {type(op).__name__}")
        ins = net.inputs(name)
        info = net.info(name)
        ctx = NodeContext(
            T=net.T,
            in_shapes=[net.info(s).shape for s in ins],
            in_kinds=[net.info(s).kind for s in ins],
            in_bounds=[bounds[s] for s in ins],
            out_shape=info.shape,
        )
        step = builder(op, ctx)
        bounds[name] = step.bound
        itemsize = 1 if info.kind in (SPIKES, TERNARY) else np.dtype(_current_dtype(step.bound)).itemsize
        nodes.append(PlannedNode(name, op, step, ins, net.T * int(np.prod(info.shape)) * itemsize))
    return nodes


# -- allocator ------------------------------------------------------------------------------
_MALLOC_TUNED = False


def _tune_malloc() -> None:
    """Keep glibc from returning freed tensor memory to the OS (once per process).

    Every node allocates its output (MBs per chunk) and frees its inputs. With glibc's
    defaults, large blocks are mmap-ed and unmapped each time, so every tensor is
    page-faulted in again, and with two worker threads each munmap also shoots down the
    other core's TLB: measured on the CIFAR-size CSDformer (2 cores), 2.9 s per batch of 32
    with two threads vs 2.3 s with one. Serving blocks up to 32 MiB from the heap and not
    trimming it (M_MMAP_THRESHOLD, M_TRIM_THRESHOLD) reuses the pages: 1.1 s. The process
    then keeps its peak heap (bounded by the chunk's live tensors) instead of returning it.
    No-op where the C library is not glibc.
    """
    global _MALLOC_TUNED
    if _MALLOC_TUNED:
        return
    _MALLOC_TUNED = True
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3  # from <malloc.h>
    libc.mallopt(m_trim_threshold, ctypes.c_int(1 << 30))
    libc.mallopt(m_mmap_threshold, ctypes.c_int(32 << 20))


# -- kernel cache -------------------------------------------------------------------------
_kernel_cache_checked = False


def _fill_kernel_cache() -> None:
    """Compile (and cache on disk) every kernel that the first run of this process did not
    need, by running a tiny network that uses them all, so that ``kernels_cached()`` is true
    from the next process on (``csdc run`` then loads instead of announcing a compile)."""
    if K.kernels_cached():
        return
    from csdc.ir.graph import Network

    net = Network(2)
    one = lambda shape: np.ones(shape, dtype=np.int64)
    net.add("in", Encode((1, 3, 3), 1.0, 0, 1))
    net.add("c0", ConvSynapse(one((1, 1, 2, 2)), padding=(1, 1, 0, 0)), ["in"])
    net.add("d0", DenseSynapse(one((3, 3))), ["in"])
    net.add("n0", Neuron(one((1, 3, 3)), one((1, 3, 3)), one((1, 3, 3)) * 0, 0), ["c0"])
    net.add("n1", Neuron(one((1, 3, 3)), one((1, 3, 3)), one((1, 3, 3)) * 0, 0), ["d0"])
    net.add("mp", SpikeMaxPool((2, 2), (1, 1), (0, 0, 1, 1)), ["n0"])
    net.add("sp", SumPool((1, 1), (1, 1)), ["mp"])
    net.add("c1", ConvSynapse(one((1, 1, 1, 1))), ["n1"])
    net.add("mm", SpikeMatMul(1), ["mp", "n1"])
    net.add("tn", TernaryNeuron(one((1, 3, 3)), one((1, 3, 3)), one((1, 3, 3)) * 0, 0), ["c1"])
    net.add("mt", SpikeMatMul(1), ["tn", "n1"])
    net.add("sum", Add(), ["sp", "c1", "mm", "mt"])
    net.add("n2", Neuron(one((1, 3, 3)), one((1, 3, 3)), one((1, 3, 3)) * 0, 0), ["sum"])
    net.add("dg", DiagonalSynapse(one((1, 3, 3))), ["n2"])
    net.add("n4", Neuron(one((1, 3, 3)), one((1, 3, 3)), one((1, 3, 3)) * 0, 0), ["dg"])
    net.add("tr", Transpose((0, 2, 1)), ["n4"])
    net.add("f", Reshape((9,)), ["tr"])
    net.add("d1", DenseSynapse(one((2, 9))), ["f"])
    net.add("c2", ConvSynapse(one((1, 1, 1, 1)), stride=(1, 2)), ["n1"])  # column stride 2: conv_spikes
    net.add("n3", Neuron(one((1, 3, 2)), one((1, 3, 2)), one((1, 3, 2)) * 0, 0), ["c2"])
    net.add("f3", Reshape((6,)), ["n3"])
    net.add("d3", DenseSynapse(one((2, 6))), ["f3"])
    net.add("sum2", Add(), ["d1", "d3"])
    net.add("mbe", MBENeuron(one((1, 2)), one((1, 2)), one((1, 2)), np.zeros(1, np.int64), np.zeros(2, np.int64)),
            ["sum2"])
    net.add("out", Readout(np.ones(2), np.zeros(2)), ["mbe"])
    NumbaBackend().run(net, np.ones((1, 1, 3, 3), dtype=np.float32))


# -- backend ----------------------------------------------------------------------------
_PLAIN, _ENCODE, _FIRES, _READOUT, _GROUP, _GROUPED = range(6)  # roles of a node in the chunk loop


@dataclass(frozen=True, slots=True)
class _Program:
    """A verified network's plan laid out for the chunk loop: values are held in a list
    indexed like ``nodes``; node ``i`` reads ``inputs[i]`` and, once it ran, drops the values
    ``frees[i]`` (whose last consumer it is). ``role[i]``: _FIRES for Neuron and SpikeMaxPool
    (spike trains and counts), _ENCODE, _READOUT, _PLAIN, or _GROUP for the first node of a
    dense group (``group[i]``: the members, whose outputs it computes) and _GROUPED for the
    other members (nothing left to do at their place)."""

    nodes: list[PlannedNode]
    inputs: list[tuple[int, ...]]
    frees: list[tuple[int, ...]]
    role: list[int]
    shapes: list[Shape]
    reported: list[int]  # nodes whose activity is reported (populations and synapses)
    input_shape: Shape
    readout: Readout
    group: dict[int, tuple[int, ...]]
    group_step: dict[int, DenseGroupStep]


def _program(net: Network) -> _Program:
    nodes = plan(net)
    index = {p.name: i for i, p in enumerate(nodes)}
    inputs = [tuple(index[s] for s in p.inputs) for p in nodes]
    last = {}
    for i, ins in enumerate(inputs):
        for j in ins:
            last[j] = i
    role = [_ENCODE if isinstance(p.op, Encode) else _FIRES if isinstance(p.op, (Neuron, SpikeMaxPool))
            else _READOUT if isinstance(p.op, Readout) else _PLAIN for p in nodes]
    group: dict[int, tuple[int, ...]] = {}
    group_step: dict[int, DenseGroupStep] = {}
    for members in _dense_groups(nodes, inputs):
        steps = [nodes[i].step for i in members]
        first = steps[0]
        group[members[0]] = tuple(members)
        group_step[members[0]] = DenseGroupStep(
            _aligned(np.concatenate([st.w_t for st in steps], axis=1)), first.scale, first.acc, first.w_t.shape[1],
            _current_dtype(first.bound), max(st.bound for st in steps), first.signed)
        role[members[0]] = _GROUP
        for i in members[1:]:
            role[i] = _GROUPED
    return _Program(nodes, inputs, [tuple(j for j in ins if last[j] == i) for i, ins in enumerate(inputs)], role,
                    [net.info(p.name).shape for p in nodes], [i for i, p in enumerate(nodes) if isinstance(p.op, _REPORTED)],
                    net.input_shape, net.op(net.output_name), group, group_step)


_POOL: ThreadPoolExecutor | None = None


def _pool(workers: int) -> ThreadPoolExecutor:
    """A process-wide pool of ``workers`` helper threads (kept between runs: no thread start-up
    per batch), replaced when the number of numba threads changes."""
    global _POOL
    if _POOL is None or _POOL._max_workers != workers:
        if _POOL is not None:
            _POOL.shutdown(wait=False)
        _POOL = ThreadPoolExecutor(workers, thread_name_prefix="csdc-numba")
    return _POOL


@dataclass
class _ChunkResult:
    stats: list[NodeStats]
    readout: np.ndarray
    trains: dict[int, np.ndarray]
    seconds: list[float] | None


class NumbaBackend:
    """Event-driven integer simulator (SPEC section 4), bit-exact with ``run_steps``.

    ``memory_budget``: bytes of live tensors per chunk of the batch (an upper bound, since
    tensors are freed once their last consumer ran); the batch is split accordingly.
    ``profile``: accumulate the wall time of every node in ``node_seconds`` (name -> s),
    summed over runs (for benchmarks; off by default).
    """

    name = "numba"

    def __init__(self, memory_budget: int = 512 * 2**20, profile: bool = False):
        self.memory_budget = int(memory_budget)
        self.node_seconds: dict[str, float] | None = {} if profile else None
        # Programs per network, reused (without verifying again) while the network has the
        # same T, nodes, ops (frozen: a changed node means a new op object), tensor infos and
        # edges: repeated batches skip verification and weight preparation.
        self._plans: weakref.WeakKeyDictionary[Network, tuple[tuple, _Program]] = weakref.WeakKeyDictionary()

    def warm_up(self, net: Network, x: np.ndarray) -> float:
        """Run ``x`` (one sample) so that numba compiles, or loads from its on-disk cache, every
        kernel ``net`` needs before a timed run. Returns the seconds numba spent compiling (its
        "numba:compile" events: cache misses only, e.g. the first run after install), 0.0 when
        everything came from the cache."""
        from numba.core import event

        spent: list[float] = []
        with event.install_timer("numba:compile", spent.append):
            self.run(net, x)
        return spent[0] if spent else 0.0

    @property
    def kernel_cache(self) -> str:
        """The folder of numba's on-disk cache of the kernels (NUMBA_CACHE_DIR or __pycache__)."""
        return K.KERNELS[0]._cache._cache_path  # numba internals, as kernels_cached()

    def run(self, net: Network, x: np.ndarray, *, keep_trains: bool = False) -> RunResult:
        """Run the batch ``x`` (batch, *input_shape); see :class:`csdc.backends.base.Backend`.

        Spike trains (``keep_trains``) are returned as ``uint8`` 0/1 arrays (batch, T, *shape);
        counts and readout as ``int64``.
        """
        prog = self._program(net)
        x = np.asarray(x)
        if x.ndim < 1 or tuple(x.shape[1:]) != prog.input_shape:
            raise DataError(f"input batch has shape {x.shape}, the network expects (batch, {', '.join(map(str, prog.input_shape))})")
        global _kernel_cache_checked
        _tune_malloc()
        fill_cache = False
        if not _kernel_cache_checked:
            _kernel_cache_checked = True
            fill_cache = not K.kernels_cached()
        nodes = prog.nodes
        n = x.shape[0]
        chunk = self._chunk_size(nodes, n)
        starts = list(range(0, max(n, 1), chunk))
        profile = self.node_seconds is not None
        fires = [i for i, r in enumerate(prog.role) if r == _FIRES]
        counts = {i: np.empty((n, *prog.shapes[i]), dtype=np.int64) for i in fires}  # every count is written

        def run_chunk(start: int) -> _ChunkResult:
            return self._run_chunk(prog, x[start:start + chunk], keep_trains, profile,
                                   {i: c[start:start + chunk] for i, c in counts.items()})

        workers = min(numba.get_num_threads(), len(starts))
        if workers > 1:
            # Coarse-grained parallelism: whole chunks run through the network in threads
            # (the kernels release the GIL); this thread is one of the workers, and a worker
            # that finishes early takes the next chunk.
            parts: list[_ChunkResult | None] = [None] * len(starts)
            todo = iter(range(len(starts)))
            lock = threading.Lock()

            def work() -> None:
                while True:
                    with lock:
                        k = next(todo, None)
                    if k is None:
                        return
                    parts[k] = run_chunk(starts[k])

            helpers = [_pool(workers - 1).submit(work) for _ in range(workers - 1)]
            work()
            for h in helpers:
                h.result()
        else:
            parts = [run_chunk(s) for s in starts]
        stats = parts[0].stats
        for part in parts[1:]:  # in batch order
            for i in prog.reported:
                stats[i].merge(part.stats[i])
        if profile:
            for part in parts:
                for p, sec in zip(nodes, part.seconds):
                    self.node_seconds[p.name] = self.node_seconds.get(p.name, 0.0) + sec
        for i in fires:
            stats[i].neurons = math.prod(prog.shapes[i])
        readout = parts[0].readout if len(parts) == 1 else np.concatenate([p.readout for p in parts])
        trains = {nodes[i].name: np.concatenate([p.trains[i] for p in parts]) for i in parts[0].trains}
        if fill_cache:
            _fill_kernel_cache()
        return RunResult(
            readout=readout,
            logits=readout_logits(prog.readout, readout),
            counts={nodes[i].name: c for i, c in counts.items()},
            trains=trains,
            stats={nodes[i].name: stats[i] for i in prog.reported},
        )

    def _program(self, net: Network) -> _Program:
        key = (net.T, tuple(net.order()),  # ops compare by identity
               tuple((name, d["op"], d["info"]) for name, d in net.graph.nodes(data=True)),
               tuple(net.graph.edges(data="port")))
        cached = self._plans.get(net)
        if cached is None or cached[0] != key:
            net.verify()
            cached = (key, _program(net))
            self._plans[net] = cached
        return cached[1]

    def _chunk_size(self, nodes: list[PlannedNode], batch: int) -> int:
        """Samples per chunk: two chunks per worker thread when chunks are large (so that a
        worker slowed by another process leaves work to the others), one per worker when
        they are small (per-node call overhead would dominate), always within the memory
        budget for all workers' live tensors."""
        threads = max(1, numba.get_num_threads())
        per_sample = max(1, sum(n.bytes_per_sample for n in nodes))
        by_memory = max(1, self.memory_budget // (per_sample * threads))
        split = 2 * threads if per_sample * batch >= 2 * threads * _LARGE_CHUNK else threads
        return min(by_memory, max(1, -(-batch // split)))

    @staticmethod
    def _run_chunk(prog: _Program, x: np.ndarray, keep_trains: bool, profile: bool,
                   counts: dict[int, np.ndarray]) -> _ChunkResult:
        """Run one chunk of samples through every node; spike counts go straight into
        ``counts`` (node index -> this chunk's rows of the run's result array)."""
        values: list[np.ndarray | None] = [None] * len(prog.nodes)
        stats = [NodeStats() for _ in prog.nodes]
        seconds = [0.0] * len(prog.nodes) if profile else None
        trains: dict[int, np.ndarray] = {}
        readout = None
        clock = time.perf_counter
        for i, (node, ins_i, frees, role) in enumerate(zip(prog.nodes, prog.inputs, prog.frees, prog.role)):
            ins = [x] if role == _ENCODE else [values[j] for j in ins_i]
            t0 = clock() if profile else 0.0
            if role == _FIRES:
                out, _ = node.step.fire(ins, stats[i], counts[i])
                if keep_trains:
                    trains[i] = out
            elif role == _GROUP:
                members = prog.group[i]
                for j, o in zip(members, prog.group_step[i].run(ins, [stats[j] for j in members])):
                    values[j] = o
                out = values[i]
            elif role == _GROUPED:
                out = values[i]  # computed with its group
            else:
                out = node.step(ins, stats[i])
            if profile:
                seconds[i] = clock() - t0
            for j in frees:
                values[j] = None  # free tensors as soon as their last consumer ran
            if role == _READOUT:
                readout = out
            else:
                values[i] = out
        return _ChunkResult(stats, readout, trains, seconds)
