"""Reference semantics of the IR as pure numpy functions: the oracle every backend is tested against.

Two interpreters:

- :func:`run_counts` (the *count-domain reference*): evaluates the network on totals over
  the time window, with no time loop. A spike tensor is represented by its spike counts,
  a current tensor by its total ``sum_t I(t)``. Exact for networks whose neurons all have
  ``delay >= T``.
- :func:`run_steps`: the layer-synchronous time-stepped semantics for any delay (slow,
  vectorised over neurons only). Backends must reproduce its spike trains exactly.

Ternary (signed) spikes are -1, 0 or +1; a ternary tensor's count is the signed sum of its
spikes, and every linear op and the TDEC product take it as they take a binary count.

All integer arithmetic is int64. Arrays carry a leading batch axis; spike trains in the
time domain have shape (batch, T, *shape).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from csdc.errors import IRError
from csdc.ir.graph import Network
from csdc.ir.ops import (
    CURRENT,
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
    SpikeMatMul,
    SpikeMaxPool,
    SumPool,
    TernaryNeuron,
    Transpose,
)


# -- elementwise building blocks ---------------------------------------------------
def encode(op: Encode, x: np.ndarray) -> np.ndarray:
    """Integer input levels ``clip(round_half_even(x / scale), lo, hi)``, computed in float32
    like ONNX QuantizeLinear."""
    x = np.asarray(x, dtype=np.float32)
    q = np.rint(x / np.float32(op.scale))
    return np.clip(q, op.lo, op.hi).astype(np.int64)


def neuron_count(op: Neuron, total: np.ndarray, T: int) -> np.ndarray:
    """Spike count of a DIF population with delay >= T given its total input current."""
    v = total + T * op.bias + op.v0
    return np.clip(np.floor_divide(v, op.threshold), 0, T)


def _delayed_steps(op: Neuron, current: np.ndarray, T: int, fire: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Spike train (batch, T, *shape) of a population with delay (Algorithm 1): integrate steps 1..T, fire
    from step delay + 1 on; ``fire(v)`` gives each step's spikes (-1, 0 or +1) and ``v -= spikes * threshold``."""
    batch = current.shape[0]
    v = np.broadcast_to(op.v0, (batch, *op.v0.shape)).astype(np.int64).copy()
    out = np.zeros_like(current, dtype=np.int64)
    # steps T < u <= delay neither integrate nor fire: skip them
    for u in itertools.chain(range(1, T + 1), range(max(T, op.delay) + 1, T + op.delay + 1)):
        if u <= T:
            v += current[:, u - 1] + op.bias
        if u > op.delay:
            spikes = fire(v)
            out[:, u - op.delay - 1] = spikes
            v -= spikes * op.threshold
    return out


def neuron_steps(op: Neuron, current: np.ndarray, T: int) -> np.ndarray:
    """Spike train (batch, T, *shape) of a DIF population (Algorithm 1, any delay)."""
    return _delayed_steps(op, current, T, lambda v: (v >= op.threshold).astype(np.int64))


def ternary_count(op: TernaryNeuron, total: np.ndarray, T: int) -> np.ndarray:
    """Signed spike count of a ternary population with delay >= T given its total input current:
    ``clip(floor((V + T*bias + v0) / threshold), -T, T)``."""
    v = total + T * op.bias + op.v0
    return np.clip(np.floor_divide(v, op.threshold), -T, T)


def ternary_steps(op: TernaryNeuron, current: np.ndarray, T: int) -> np.ndarray:
    """Signed spike train (batch, T, *shape) of a ternary population (any delay): +1 and
    ``v -= threshold`` where ``v >= threshold``, -1 and ``v += threshold`` where ``v < 0``."""
    return _delayed_steps(op, current, T, lambda v: (v >= op.threshold).astype(np.int64) - (v < 0))


def mbe_spikes(op: MBENeuron, total: np.ndarray) -> np.ndarray:
    """Spikes (batch, S, K, *shape) of every basis of an MBE population given its total input
    current ``V`` (batch, *shape): ``u_n = v0 + V + offset[n]``, then per step t
    ``s_n(t) = [u_n >= threshold[n, t]]`` and ``u_n -= s_n(t) * reset[n, t]``."""
    total = np.asarray(total, dtype=np.int64)
    k, steps = op.threshold.shape
    per_basis = (1, k) + (1,) * (total.ndim - 1)
    u = (total + op.v0)[:, None] + op.offset.reshape(per_basis)
    out = np.zeros((total.shape[0], steps, *u.shape[1:]), dtype=np.int64)
    for t in range(steps):
        fire = u >= op.threshold[:, t].reshape(per_basis)
        out[:, t] = fire
        u = u - np.where(fire, op.reset[:, t].reshape(per_basis), 0)
    return out


def mbe_output_steps(op: MBENeuron, total: np.ndarray, T: int, spikes: np.ndarray | None = None) -> np.ndarray:
    """Output current (batch, T, *shape) of an MBE population: ``sum_n s_n(t) weight[n, t]`` at
    step t <= S, 0 after (``spikes``: its :func:`mbe_spikes`, if already computed)."""
    spikes = mbe_spikes(op, total) if spikes is None else spikes
    k, steps = op.threshold.shape
    w = op.weight.T.reshape(1, steps, k, *(1,) * (spikes.ndim - 3))
    out = np.zeros((spikes.shape[0], T, *spikes.shape[3:]), dtype=np.int64)
    out[:, :steps] = (spikes * w).sum(axis=2)
    return out


def mbe_total(op: MBENeuron, total: np.ndarray) -> np.ndarray:
    """The decoded value ``sum_{n,t} s_n(t) weight[n, t]`` (batch, *shape): an MBE population's
    output summed over the window."""
    return mbe_output_steps(op, total, op.steps).sum(axis=1)


def _windows(x: np.ndarray, kernel: tuple[int, int], stride: tuple[int, int],
             padding: tuple[int, int, int, int], dilation: tuple[int, int] = (1, 1)) -> np.ndarray:
    """View (..., C, OH, OW, kh, kw) of zero-padded windows of x (..., C, H, W)."""
    pad = [(0, 0)] * (x.ndim - 2) + [(padding[0], padding[2]), (padding[1], padding[3])]
    xp = np.pad(x, pad)
    eh = dilation[0] * (kernel[0] - 1) + 1
    ew = dilation[1] * (kernel[1] - 1) + 1
    win = np.lib.stride_tricks.sliding_window_view(xp, (eh, ew), axis=(-2, -1))
    return win[..., :: stride[0], :: stride[1], :: dilation[0], :: dilation[1]]


def dense(op: DenseSynapse, x: np.ndarray) -> np.ndarray:
    return np.matmul(x.astype(np.int64), op.weight.T)


def conv(op: ConvSynapse, x: np.ndarray) -> np.ndarray:
    """Grouped 2-D cross-correlation of x (B, C, H, W) with integer weights."""
    w = op.weight
    kh, kw = w.shape[2:]
    win = _windows(x.astype(np.int64), (kh, kw), op.stride, op.padding, op.dilation)  # B,C,OH,OW,kh,kw
    g = op.groups
    cg, og = w.shape[1], w.shape[0] // g
    outs = []
    for gi in range(g):
        wg = w[gi * og:(gi + 1) * og]  # og, cg, kh, kw
        xg = win[:, gi * cg:(gi + 1) * cg]  # B, cg, OH, OW, kh, kw
        outs.append(np.einsum("bchwij,ocij->bohw", xg, wg, optimize=True))
    return np.concatenate(outs, axis=1)


def max_pool(op: SpikeMaxPool, x: np.ndarray) -> np.ndarray:
    return _windows(x, op.kernel, op.stride, op.padding).max(axis=(-2, -1))


def sum_pool(op: SumPool, x: np.ndarray) -> np.ndarray:
    return _windows(x.astype(np.int64), op.kernel, op.stride, op.padding).sum(axis=(-2, -1))


def spike_matmul_steps(op: SpikeMatMul, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """TDEC VMM over time: a (batch, T, ..., M, K), b (batch, T, ..., K, N) spike trains (binary or
    ternary: a -1 spike subtracts the count it gates)."""
    a = a.astype(np.int64)
    b = b.astype(np.int64)
    ca = np.cumsum(a, axis=1)
    cb = np.cumsum(b, axis=1)
    ca_prev = np.concatenate([np.zeros_like(ca[:, :1]), ca[:, :-1]], axis=1)
    return op.weight * (np.matmul(a, cb) + np.matmul(ca_prev, b))


def readout_logits(op: Readout, total: np.ndarray) -> np.ndarray:
    """Float logits from accumulated readout currents (float64, then float32)."""
    return (total.astype(np.float64) * op.scale + op.offset).astype(np.float32)


def _linear(op: Op, x: np.ndarray) -> np.ndarray:
    """Ops that act identically on counts and on each time step (batch axis leading)."""
    if isinstance(op, DenseSynapse):
        return dense(op, x)
    if isinstance(op, ConvSynapse):
        return conv(op, x)
    if isinstance(op, DiagonalSynapse):
        return x.astype(np.int64) * op.weight
    if isinstance(op, SumPool):
        return sum_pool(op, x)
    if isinstance(op, ReduceSum):
        return x.astype(np.int64).sum(axis=tuple(a + 1 for a in op.axes))
    if isinstance(op, Reshape):
        return x.reshape(x.shape[0], *op.shape)
    if isinstance(op, Transpose):
        return x.transpose(0, *(p + 1 for p in op.perm))
    raise IRError(f"no reference semantics for {type(op).__name__}")


# -- interpreters -----------------------------------------------------------------
@dataclass
class Result:
    """Outcome of running a network on a batch.

    ``readout``: integer accumulated readout currents (batch, classes); ``logits``: float32;
    ``counts``: spike counts (batch, *shape) per neuron/max-pool node (when requested; signed for
    ternary populations);
    ``trains``: spike trains (batch, T, *shape) per spiking node (time-domain runs, when requested;
    -1/0/+1 for ternary populations);
    ``currents``: per-step values (batch, T, *shape) of every current node (``run_steps(currents=True)``);
    ``mbe_spikes``: per MBE node, the spikes of all its bases and steps per element (batch, *shape).
    """

    readout: np.ndarray
    logits: np.ndarray
    counts: dict[str, np.ndarray] = field(default_factory=dict)
    trains: dict[str, np.ndarray] = field(default_factory=dict)
    currents: dict[str, np.ndarray] = field(default_factory=dict)
    mbe_spikes: dict[str, np.ndarray] = field(default_factory=dict)


def require_exact(net: Network) -> None:
    """Raise IRError naming the first neuron whose delay is below T (outside the count-domain regime)."""
    for name in net.neurons():
        if net.op(name).delay < net.T:
            raise IRError(
                f"the count-domain reference is exact only for delay >= T; neuron '{name}' has delay "
                f"{net.op(name).delay} < T={net.T}. Use the numba backend (or run_steps) for D < T."
            )


def run_counts(net: Network, x: np.ndarray, keep: bool = True) -> Result:
    """Count-domain reference. Requires every neuron's delay >= T (the exact regime)."""
    T = net.T
    require_exact(net)
    values: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    mbe: dict[str, np.ndarray] = {}
    readout = None
    for name, op in net.nodes():
        ins = [values[s] for s in net.inputs(name)]
        if isinstance(op, Encode):
            out = T * encode(op, x)
        elif isinstance(op, TernaryNeuron):
            out = ternary_count(op, ins[0], T)
        elif isinstance(op, Neuron):
            out = neuron_count(op, ins[0], T)
        elif isinstance(op, MBENeuron):
            spikes = mbe_spikes(op, ins[0])
            mbe[name] = spikes.sum(axis=(1, 2))
            out = mbe_output_steps(op, ins[0], op.steps, spikes).sum(axis=1)
        elif isinstance(op, SpikeMaxPool):
            out = max_pool(op, ins[0])
        elif isinstance(op, Add):
            out = np.sum(ins, axis=0)
        elif isinstance(op, SpikeMatMul):
            out = op.weight * np.matmul(ins[0].astype(np.int64), ins[1].astype(np.int64))
        elif isinstance(op, Readout):
            out = readout = ins[0]
        else:
            out = _linear(op, ins[0])
        values[name] = out
        if keep and isinstance(op, (Neuron, SpikeMaxPool)):
            counts[name] = out
    assert readout is not None
    return Result(readout=readout, logits=readout_logits(net.op(net.output_name), readout), counts=counts,
                  mbe_spikes=mbe if keep else {})


def run_steps(net: Network, x: np.ndarray, keep: bool = True, currents: bool = False) -> Result:
    """Layer-synchronous time-stepped reference for any delay (spike trains over T steps; with
    ``currents``, also every current node's per-step values)."""
    T = net.T
    trains: dict[str, np.ndarray] = {}
    kept_currents: dict[str, np.ndarray] = {}
    values: dict[str, np.ndarray] = {}
    mbe: dict[str, np.ndarray] = {}
    readout = None
    for name, op in net.nodes():
        ins = [values[s] for s in net.inputs(name)]
        if isinstance(op, Encode):
            q = encode(op, x)
            out = np.repeat(q[:, None], T, axis=1)
        elif isinstance(op, TernaryNeuron):
            out = ternary_steps(op, ins[0], T)
        elif isinstance(op, Neuron):
            out = neuron_steps(op, ins[0], T)
        elif isinstance(op, MBENeuron):
            total = ins[0].sum(axis=1)
            spikes = mbe_spikes(op, total)
            mbe[name] = spikes.sum(axis=(1, 2))
            out = mbe_output_steps(op, total, T, spikes)
        elif isinstance(op, SpikeMaxPool):
            running = np.cumsum(ins[0], axis=1)
            m = np.stack([max_pool(op, running[:, t]) for t in range(T)], axis=1)
            out = np.diff(m, axis=1, prepend=0)
        elif isinstance(op, Add):
            out = np.sum(ins, axis=0)
        elif isinstance(op, SpikeMatMul):
            out = spike_matmul_steps(op, ins[0], ins[1])
        elif isinstance(op, Readout):
            readout = ins[0].sum(axis=1)
            out = ins[0]
        else:
            flat = ins[0].reshape(-1, *ins[0].shape[2:])
            res = _linear(op, flat)
            out = res.reshape(ins[0].shape[0], T, *res.shape[1:])
        values[name] = out
        if keep and isinstance(op, (Neuron, SpikeMaxPool)):
            trains[name] = out
        if currents and net.info(name).kind == CURRENT:
            kept_currents[name] = out
    assert readout is not None
    counts = {k: v.sum(axis=1) for k, v in trains.items()}
    return Result(readout=readout, logits=readout_logits(net.op(net.output_name), readout), counts=counts, trains=trains,
                  currents=kept_currents, mbe_spikes=mbe if keep else {})
