"""Hand-built IR networks shared by the tests in ``tests/ir`` (not a test module).

``all_ops_network()`` uses every op class the IR defines (SPEC section 3), with awkward
parameters on purpose: grouped and padded convolutions, asymmetric pool padding, a
synapse fed by a current that is not the encoded input, a residual ``Add``, ``Transpose``
and ``Reshape`` on spikes and on currents, an attention-like
``SpikeMatMul`` pair (Q K^T, then A V with ternary V, which also feeds a dense synapse),
per-class readout scales of both signs, an ``MBENeuron`` population (two successive-approximation
bases) between a dense synapse and a neuron.
"""

from __future__ import annotations

import numpy as np

from csdc.ir import (
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


def _neuron(rng: np.random.Generator, shape: tuple[int, ...], delay: int, kind: type[Neuron] = Neuron) -> Neuron:
    threshold = rng.integers(1, 9, size=shape)
    v0 = rng.integers(-3, 9, size=shape)
    bias = rng.integers(-2, 3, size=shape)
    return kind(threshold, v0, bias, delay)


def all_ops_network(T: int = 4, seed: int = 0, extra_delay: int = 0) -> Network:
    """A verified network that contains every op of ``csdc.ir.ops`` at least once.

    Every neuron has delay ``T + extra_delay`` (the exact regime) unless ``extra_delay`` is
    negative, so ``run_counts`` applies by default."""
    rng = np.random.default_rng(seed)
    D = T + extra_delay
    net = Network(T, metadata={"source": "tests/ir/ir_nets.py", "nested": {"levels": [1, 2, 3], "ok": True},
                               "eps": 0.1, "note": "ünïcode"})
    w = lambda *shape: rng.integers(-3, 4, size=shape)
    net.add("input", Encode((2, 5, 5), 0.25, -2, 6))
    net.add("conv1", ConvSynapse(w(4, 1, 3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 2), ["input"])
    per_channel = lambda lo, hi: np.broadcast_to(rng.integers(lo, hi, size=(4, 1, 1)), (4, 5, 5))  # noqa: E731
    net.add("act1", Neuron(per_channel(4, 12), per_channel(-3, 9), per_channel(-2, 3), D), ["conv1"])
    net.add("pool1", SpikeMaxPool((2, 2), (2, 2), (0, 0, 1, 1)), ["act1"])  # -> (4, 3, 3)
    net.add("conv2", ConvSynapse(w(4, 4, 2, 2), (1, 1), (1, 1, 0, 0), (1, 1), 1), ["pool1"])  # -> (4, 3, 3)
    net.add("skip2", DiagonalSynapse(np.broadcast_to(w(4, 1, 1), (4, 3, 3)), exponent=1), ["pool1"])
    net.add("sum2", Add(), ["conv2", "skip2"])
    net.add("act2", _neuron(rng, (4, 3, 3), D + 1), ["sum2"])
    # branch A: sum pool -> current reshape -> dense on a current -> neuron
    net.add("avg", SumPool((2, 2), (1, 1)), ["act2"])  # -> (4, 2, 2) current
    net.add("avg_flat", Reshape((16,)), ["avg"])
    net.add("fc_a", DenseSynapse(w(6, 16)), ["avg_flat"])
    steps = min(T, 3)
    sar = np.array([[16 >> t for t in range(steps)], [4 >> t for t in range(steps)]])  # thresholds halve each step
    net.add("mbe_a", MBENeuron(sar, sar, w(2, steps), np.array([20, -3]), rng.integers(-2, 3, size=6)), ["fc_a"])
    net.add("act_a", _neuron(rng, (6,), D), ["mbe_a"])
    net.add("head_a", DenseSynapse(w(3, 6)), ["act_a"])
    # branch B: tokens (transpose + reshape of spikes) -> dense per token -> neuron
    net.add("tokens_t", Transpose((1, 2, 0)), ["act2"])  # -> (3, 3, 4)
    net.add("tokens", Reshape((9, 4)), ["tokens_t"])
    net.add("mix", DenseSynapse(w(5, 4).astype(np.int8), exponent=2), ["tokens"])  # -> (9, 5)
    net.add("act_b", _neuron(rng, (9, 5), D + 2, TernaryNeuron), ["mix"])  # signed "values"
    net.add("keys", Transpose((1, 0)), ["tokens"])  # -> (4, 9)
    net.add("scores", SpikeMatMul(2), ["tokens", "keys"])  # -> (9, 9) current, Q K^T
    net.add("attn", Neuron(rng.integers(4, 20, size=(9, 9)), rng.integers(0, 10, size=(9, 9)),
                           rng.integers(-3, 1, size=(9, 9)), D), ["scores"])
    net.add("av", SpikeMatMul(-1), ["attn", "act_b"])  # -> (9, 5) current, A V
    net.add("act_av", Neuron(np.full((9, 5), 3), np.full((9, 5), -1), np.full((9, 5), 2), D + 1), ["av"])
    net.add("act_b_t", Transpose((1, 0)), ["act_av"])  # -> (5, 9)
    net.add("flat_b", Reshape((45,)), ["act_b_t"])
    net.add("head_b", DenseSynapse(w(3, 45)), ["flat_b"])
    net.add("head_tok", DenseSynapse(w(3, 5)), ["act_b"])  # -> (9, 3): one head per token
    net.add("head_c", ReduceSum((0,)), ["head_tok"])  # -> (3,): summed over tokens
    net.add("logits", Add(), ["head_a", "head_b", "head_c"])
    net.add("out", Readout([0.5, -0.125, 3.0e-3], [0.25, -1.5, 0.0]), ["logits"])
    net.verify()
    return net


def all_ops_input(batch: int = 3, seed: int = 1) -> np.ndarray:
    """A float32 batch for :func:`all_ops_network` covering the Encode range and clipping."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.0, 2.0, size=(batch, 2, 5, 5))
    x[rng.random(x.shape) < 0.25] = 0.0
    return x.astype(np.float32)
