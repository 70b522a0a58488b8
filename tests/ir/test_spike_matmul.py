"""TDEC vector-matrix multiplication of two spike tensors (SPEC 2.4)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from csdc.ir import DenseSynapse, Encode, Network, Neuron, Readout, Reshape, SpikeMatMul
from csdc.ir import semantics


def elementwise_tdec(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, int, int]:
    """Scalar implementation: for every step, every spike of A adds an accumulated count of B
    and every spike of B adds an accumulated count of A (no multiplication); returns the
    accumulated output and the numbers of gated adds and of multiplications performed."""
    T, M, K = a.shape
    N = b.shape[2]
    out = np.zeros((M, N), np.int64)
    ca = np.zeros((M, K), np.int64)
    cb = np.zeros((K, N), np.int64)
    adds = 0
    for t in range(T):
        cb += b[t]
        for m in range(M):
            for k in range(K):
                if a[t, m, k]:  # spike of A gates the running count of B (including step t)
                    for n in range(N):
                        out[m, n] += cb[k, n]
                        adds += 1
        for k in range(K):
            for n in range(N):
                if b[t, k, n]:  # spike of B gates the running count of A up to t-1
                    for m in range(M):
                        out[m, n] += ca[m, k]
                        adds += 1
        ca += a[t]
    return out, adds, 0


@st.composite
def spike_pairs(draw):
    T = draw(st.integers(1, 6))
    M, K, N = (draw(st.integers(1, 4)) for _ in range(3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    p = draw(st.floats(0.0, 1.0))
    a = (rng.random((T, M, K)) < p).astype(np.int64)
    b = (rng.random((T, K, N)) < p).astype(np.int64)
    return a, b


@settings(max_examples=150, deadline=None)
@given(spike_pairs(), st.integers(-3, 3).filter(lambda w: w != 0))
def test_accumulated_output_equals_count_product(pair, weight):
    a, b = pair
    op = SpikeMatMul(weight)
    out = semantics.spike_matmul_steps(op, a[None], b[None])[0]  # (T, M, N)
    assert np.array_equal(out.sum(axis=0), weight * a.sum(0) @ b.sum(0))
    scalar, adds, mults = elementwise_tdec(a, b)
    assert np.array_equal(out.sum(axis=0), weight * scalar)
    assert mults == 0 and adds == a.sum() * b.shape[2] + b.sum() * a.shape[1]


def _attention_like_net(T: int, delay: int, seed: int) -> Network:
    rng = np.random.default_rng(seed)
    net = Network(T)
    net.add("in", Encode((2, 4, 4), 0.1, 0, 10))
    def neuron(name, src, shape):
        th = rng.integers(5, 40, shape)
        net.add(name, Neuron(th, th // 2, rng.integers(-1, 3, shape), delay), [src])
    net.add("wq", DenseSynapse(rng.integers(-3, 5, (4, 4))), ["in"])
    neuron("q", "wq", (2, 4, 4))
    net.add("wk", DenseSynapse(rng.integers(-3, 5, (3, 4))), ["in"])
    neuron("k", "wk", (2, 4, 3))
    net.add("qk", SpikeMatMul(2), ["q", "k"])  # (2, 4, 4) x (2, 4, 3) -> (2, 4, 3)
    neuron("a", "qk", (2, 4, 3))
    net.add("flat", Reshape((24,)), ["a"])
    net.add("cls", DenseSynapse(rng.integers(-3, 4, (5, 24))), ["flat"])
    net.add("out", Readout(np.full(5, 0.5), np.zeros(5)), ["cls"])
    net.verify()
    return net


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 6), st.integers(0, 2**31 - 1))
def test_count_domain_equals_time_steps(T, seed):
    net = _attention_like_net(T, T, seed)
    x = np.random.default_rng(seed).random((3, 2, 4, 4)).astype(np.float32)
    c = semantics.run_counts(net, x)
    s = semantics.run_steps(net, x)
    assert np.array_equal(c.readout, s.readout)
    for name in c.counts:
        assert np.array_equal(c.counts[name], s.counts[name])
