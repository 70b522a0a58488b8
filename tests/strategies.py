"""Random valid spiking-IR networks for property tests of every backend.

Public API (import with ``from strategies import networks, inputs_for``; ``tests/`` must be
on ``sys.path``, see ``tests/backends/test_numba.py``):

- ``networks(exact=False, max_T=6)``: a hypothesis strategy of verified
  :class:`csdc.ir.graph.Network` objects that use every op kind: ``Encode`` -> a first
  synapse (dense or conv fed by the constant current, or none) -> ``Neuron`` -> blocks of
  conv / dense / diagonal synapses (some as residual ``Add`` of two or three currents,
  one of them possibly the constant encoded input), ``SpikeMaxPool``, ``SumPool`` (whose
  current may feed a synapse or be reshaped), attention-like ``SpikeMatMul`` products
  (``S S^T``, then ``A S``), ``Reshape`` / ``Transpose`` routing ->
  ``DenseSynapse`` (optionally plus a skip from an earlier layer), or a dense synapse per
  position summed by ``ReduceSum`` -> ``Readout``. Synapse weights are int8 mantissas with
  exponents 0..2; neuron parameters and diagonal weights are sometimes per channel, given as
  broadcast views.
  Neurons get thresholds >= 1, random ``v0`` and biases (negative too) and delays in
  ``0..T+2`` (``exact=True``: ``T..T+2``, where the count-domain reference is exact); about a
  third of the populations are ``TernaryNeuron`` (signed spikes), which then feed every synapse
  kind, ``SumPool``, routing and either side of a ``SpikeMatMul`` (``SpikeMaxPool`` only follows
  binary spikes). About a fifth of the populations integrate the output of an ``MBENeuron``
  population (random integer thresholds, resets, output weights and offsets, 1..3 bases,
  1..T encoding steps), which then feeds them its decoded current.
  ``T`` is in ``1..max_T``; tensors have at most a few hundred elements.
- ``inputs_for(net, batch, seed)``: a float32 batch for ``net`` whose encoded levels cover
  ``[lo, hi]`` including clipping, with about a third zeros.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from csdc.ir import (
    SPIKES,
    Add,
    ConvSynapse,
    DenseSynapse,
    DiagonalSynapse,
    Encode,
    MBENeuron,
    Network,
    Neuron,
    Readout,
    ReduceSum,
    Reshape,
    SpikeMatMul,
    SpikeMaxPool,
    SumPool,
    TernaryNeuron,
    Transpose,
)

__all__ = ["inputs_for", "networks"]


class _Builder:
    """Adds nodes with fresh names; parameters come from a seeded numpy generator and
    structural choices from hypothesis's ``draw`` (so failures shrink structurally)."""

    def __init__(self, draw: st.DrawFn, T: int, delays: st.SearchStrategy[int], seed: int):
        self.draw = draw
        self.net = Network(T)
        self.delays = delays
        self.rng = np.random.default_rng(seed)

    def add(self, op: object, inputs: list[str]) -> str:
        return self.net.add(f"n{len(self.net)}_{type(op).__name__.lower()}", op, inputs)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.net.info(name).shape

    def weights(self, shape: tuple[int, ...]) -> np.ndarray:
        return self.rng.integers(-2, 4, size=shape).astype(np.int8)

    def exponent(self) -> int:
        return self.draw(st.sampled_from([0, 0, 1, 2]))

    def per_channel(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The shape of per-channel values (channels of an image, features of tokens), or ``shape``."""
        if len(shape) < 2 or not self.draw(st.booleans()):
            return shape
        return (shape[0], 1, 1) if len(shape) == 3 else (1,) * (len(shape) - 1) + (shape[-1],)

    def neuron(self, cur: str, scale: int = 1) -> str:
        """Neurons on ``cur``; ``scale`` raises thresholds for inputs with a large fan-in. Per-channel
        parameters are broadcast views, as the compiler makes them."""
        shape = self.shape(cur)
        small = self.per_channel(shape)
        threshold = self.rng.integers(1, 7, size=small) * scale
        v0 = self.rng.integers(-2, threshold + 1)
        bias = self.rng.integers(-2, 3, size=small)
        full = [np.broadcast_to(a, shape) for a in (threshold, v0, bias)]
        kind = self.draw(st.sampled_from([Neuron, Neuron, TernaryNeuron]))
        if self.draw(st.integers(0, 4)) == 0:
            cur = self.mbe(cur)
        return self.add(kind(*full, self.draw(self.delays)), [cur])

    def mbe(self, cur: str) -> str:
        """MBE neurons on ``cur``: random integer parameters, or successive-approximation bases
        (thresholds and resets halving every step) with random output weights."""
        shape = self.shape(cur)
        k = self.draw(st.integers(1, 3))
        steps = self.draw(st.integers(1, self.net.T))
        if self.draw(st.booleans()):
            threshold = self.rng.integers(1, 9, size=(k, steps))
            reset = self.rng.integers(0, 9, size=(k, steps))
        else:
            top = self.rng.integers(0, 4, size=(k, 1))
            threshold = np.maximum(2 ** np.maximum(top - np.arange(steps), 0), 1)
            reset = threshold.copy()
        weight = self.rng.integers(-4, 7, size=(k, steps))
        offset = self.rng.integers(-5, 6, size=k)
        v0 = np.broadcast_to(self.rng.integers(-3, 4, size=self.per_channel(shape)), shape)
        return self.add(MBENeuron(threshold, reset, weight, offset, v0), [cur])

    def conv(self, x: str, same: bool = False) -> str:
        """A ConvSynapse; ``same``: output shape equal to the input's (for residual adds)."""
        c, h, w = self.shape(x)
        if same:
            k = self.draw(st.sampled_from([(1, (0, 0, 0, 0)), (2, (0, 0, 1, 1)), (2, (1, 1, 0, 0)), (3, (1, 1, 1, 1))]))
            groups = self.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
            weight = self.weights((c, c // groups, k[0], k[0]))
            return self.add(ConvSynapse(weight, 1, k[1], 1, groups, self.exponent()), [x])
        pad = tuple(self.draw(st.integers(0, 2)) for _ in range(4))
        dil = (self.draw(st.integers(1, 2)), self.draw(st.integers(1, 2)))
        kmax = ((h + pad[0] + pad[2] - 1) // dil[0] + 1, (w + pad[1] + pad[3] - 1) // dil[1] + 1)
        kernel = (self.draw(st.integers(1, min(3, kmax[0]))), self.draw(st.integers(1, min(3, kmax[1]))))
        stride = (self.draw(st.integers(1, 2)), self.draw(st.integers(1, 2)))
        groups = self.draw(st.sampled_from([g for g in range(1, c + 1) if c % g == 0]))
        per_group = self.draw(st.integers(1, 3))
        weight = self.weights((groups * per_group, c // groups, *kernel))
        return self.add(ConvSynapse(weight, stride, pad, dil, groups, self.exponent()), [x])

    def dense(self, x: str, n_out: int | None = None) -> str:
        n_out = self.draw(st.integers(1, 6)) if n_out is None else n_out
        return self.add(DenseSynapse(self.weights((n_out, self.shape(x)[-1])), self.exponent()), [x])

    def diagonal(self, x: str) -> str:
        shape = self.shape(x)
        return self.add(DiagonalSynapse(np.broadcast_to(self.weights(self.per_channel(shape)), shape), self.exponent()), [x])

    def window(self, x: str, op_type: type) -> str:
        _, h, w = self.shape(x)
        pad = tuple(self.draw(st.integers(0, 1)) for _ in range(4))
        kernel = (self.draw(st.integers(1, min(3, h + pad[0] + pad[2]))), self.draw(st.integers(1, min(3, w + pad[1] + pad[3]))))
        stride = (self.draw(st.integers(1, 2)), self.draw(st.integers(1, 2)))
        return self.add(op_type(kernel, stride, pad), [x])

    def synapse_block(self, s: str, encoded: str) -> str:
        """Spikes -> one synapse, or a residual Add of synapses -> Neuron -> spikes."""
        rank = len(self.shape(s))
        kind = self.draw(st.sampled_from(["conv", "conv", "dense", "diagonal", "residual"] if rank == 3 else ["dense", "diagonal", "residual"]))
        if kind == "conv":
            cur = self.conv(s)
        elif kind == "dense":
            cur = self.dense(s)
        elif kind == "diagonal":
            cur = self.diagonal(s)
        else:
            other = self.conv(s, same=True) if rank == 3 else self.dense(s, self.shape(s)[-1])
            terms = [self.diagonal(s), other]
            if self.shape(encoded) == self.shape(s) and self.draw(st.booleans()):
                terms.append(encoded)  # a constant current added to time-varying ones
            cur = self.add(Add(), terms)
        return self.neuron(cur)

    def matmul_block(self, s: str) -> str:
        """Attention-like TDEC products: ``A = N(S S^T)`` (..., M, M), then optionally
        ``N(A S)`` (..., M, K); S^T swaps the last two axes of the spike tensor S."""
        rank = len(self.shape(s))
        s_t = self.add(Transpose((*range(rank - 2), rank - 1, rank - 2)), [s])
        weight = self.draw(st.sampled_from([1, 2, -1, 3]))
        a = self.neuron(self.add(SpikeMatMul(weight), [s, s_t]), scale=self.shape(s)[-1])
        if self.draw(st.booleans()):
            return self.neuron(self.add(SpikeMatMul(self.draw(st.sampled_from([1, -2]))), [a, s]), scale=self.shape(s)[-2])
        return a

    def routing(self, s: str) -> str:
        shape = self.shape(s)
        if len(shape) >= 2 and self.draw(st.booleans()):
            perm = self.draw(st.permutations(range(len(shape))))
            return self.add(Transpose(tuple(perm)), [s])
        n = int(np.prod(shape))
        if len(shape) == 1:
            a = self.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
            return self.add(Reshape((a, n // a)), [s])
        return self.add(Reshape((n,)), [s])


@st.composite
def networks(draw: st.DrawFn, exact: bool = False, max_T: int = 6) -> Network:
    """A random verified network using every op kind (see the module docstring)."""
    T = draw(st.integers(1, max_T))
    delays = st.integers(T, T + 2) if exact else st.integers(0, T + 2)
    b = _Builder(draw, T, delays, draw(st.integers(0, 2**32 - 1)))

    layout = draw(st.sampled_from(["image", "image", "image", "tokens", "flat"]))  # most ops need (C, H, W)
    if layout == "image":
        shape = (draw(st.integers(1, 3)), draw(st.integers(2, 6)), draw(st.integers(2, 6)))
    elif layout == "tokens":
        shape = (draw(st.integers(1, 3)), draw(st.integers(2, 6)))
    else:
        shape = (draw(st.integers(2, 10)),)
    lo, hi = draw(st.integers(-3, 0)), draw(st.integers(1, 6))
    encoded = b.add(Encode(shape, draw(st.sampled_from([0.25, 0.5, 1.0])), lo, hi), [])

    first = draw(st.sampled_from(["neuron", "synapse", "residual"]))
    if first == "neuron":
        s = b.neuron(encoded)
    elif first == "residual":  # constant input current plus a time-varying one
        s = b.neuron(encoded)
        s = b.neuron(b.add(Add(), [b.diagonal(s), encoded]))
    else:  # the encoded (constant) current feeds a synapse: multiply-accumulates
        s = b.neuron(b.conv(encoded) if layout == "image" and draw(st.booleans()) else b.dense(encoded))
    first_spikes = s

    for _ in range(draw(st.integers(0, 4))):
        rank = len(b.shape(s))
        binary = b.net.info(s).kind == SPIKES
        blocks = (["synapse", "routing"] + (["synapse", "sumpool"] if rank == 3 else [])
                  + (["maxpool"] if rank == 3 and binary else []) + (["matmul"] if rank >= 2 else []))
        block = draw(st.sampled_from(blocks))
        if block == "synapse":
            s = b.synapse_block(s, encoded)
        elif block == "maxpool":
            s = b.window(s, SpikeMaxPool)
        elif block == "matmul":
            s = b.matmul_block(s)
        elif block == "sumpool":
            cur = b.window(s, SumPool)
            follow = draw(st.sampled_from(["neuron", "reshape", "synapse", "synapse"]))
            if follow == "reshape":
                cur = b.add(Reshape((int(np.prod(b.shape(cur))),)), [cur])
            elif follow == "synapse":  # a current that is not the encoded input feeds a synapse
                cur = b.conv(cur) if draw(st.booleans()) else b.dense(cur)
            s = b.neuron(cur)
        else:
            s = b.routing(s)

    classes = draw(st.integers(1, 4))
    if len(b.shape(s)) > 1 and draw(st.booleans()):  # one dense synapse per position, summed over positions
        out = b.add(ReduceSum(tuple(range(len(b.shape(s)) - 1))), [b.dense(s, classes)])
    else:
        if len(b.shape(s)) > 1:
            s = b.add(Reshape((int(np.prod(b.shape(s))),)), [s])
        out = b.dense(s, classes)
    if first_spikes != s and draw(st.booleans()):  # skip connection from the first layer
        skip = first_spikes
        if len(b.shape(skip)) > 1:
            skip = b.add(Reshape((int(np.prod(b.shape(skip))),)), [skip])
        out = b.add(Add(), [out, b.dense(skip, classes)])
    scale = b.rng.choice([-1.0, 1.0], size=classes) * b.rng.uniform(0.01, 2.0, size=classes)
    b.add(Readout(scale, b.rng.uniform(-1.0, 1.0, size=classes)), [out])
    b.net.verify()
    return b.net


def inputs_for(net: Network, batch: int, seed: int) -> np.ndarray:
    """A float32 batch (batch, *input_shape) for ``net``: values around the Encode range
    ``[lo, hi]`` (so clipping happens), about a third of them zero."""
    enc = net.op(net.input_name)
    assert isinstance(enc, Encode)
    rng = np.random.default_rng(seed)
    x = rng.uniform((enc.lo - 1.5) * enc.scale, (enc.hi + 1.5) * enc.scale, size=(batch, *enc.shape))
    x[rng.random(x.shape) < 1 / 3] = 0.0
    return x.astype(np.float32)
