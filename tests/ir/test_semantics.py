"""Acceptance tests of the reference semantics (csdc/ir/semantics.py, SPEC 2.1, 2.2, 2.4, 3).

- DIF neuron with D >= T == the quantizer (count formula and the SPEC 2.1 link to
  ``clip(round(x / s), 0, T)``, ties rounded half up);
- D = 0 == the classic IF neuron, 0 < D < T == paper Algorithm 1, both checked against
  independent scalar loops;
- TDEC max-pool (``run_steps``) on arbitrary spike trains: binary output, count == max of counts;
- count-domain ``run_counts`` == time-stepped ``run_steps`` on random exact networks.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from csdc.errors import IRError
from csdc.ir import semantics
from csdc.ir.graph import Network
from csdc.ir.ops import (
    TERNARY,
    DenseSynapse,
    Encode,
    Neuron,
    Readout,
    Reshape,
    SpikeMaxPool,
)

_HERE = Path(__file__).resolve().parent
for _p in (_HERE, _HERE.parent):  # ir_nets.py (this folder) and strategies.py (tests/)
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

from ir_nets import all_ops_input, all_ops_network
from strategies import inputs_for, networks

SETTINGS = {"deadline": None, "max_examples": 100, "suppress_health_check": [HealthCheck.too_slow]}


# ----------------------------------------------------------------------------- helpers
def _neuron(threshold, v0, bias, delay: int) -> Neuron:
    return Neuron(np.asarray(threshold), np.asarray(v0), np.asarray(bias), delay)


def scalar_if(current: list[int], theta: int, v0: int, bias: int) -> list[int]:
    """The classic integrate-and-fire neuron, one step at a time: integrate, fire if v >= theta,
    reset by subtraction."""
    v, out = v0, []
    for i in current:
        v += i + bias
        if v >= theta:
            out.append(1)
            v -= theta
        else:
            out.append(0)
    return out


def scalar_dif(current: list[int], theta: int, v0: int, bias: int, T: int, D: int) -> list[int]:
    """Paper Algorithm 1 (SPEC 2.2), written out independently of csdc."""
    v = v0
    out = [0] * T
    for u in range(1, T + D + 1):
        if u <= T:
            v += current[u - 1] + bias
        if u > D and v >= theta:
            out[u - D - 1] = 1
            v -= theta
    return out


@st.composite
def neuron_case(draw, min_delay_from_T: int | None = 0, max_extra: int = 3, any_delay: bool = False):
    """(op, current (batch, T, n), T): random population, per-step currents of both signs."""
    T = draw(st.integers(1, 16))
    if any_delay:
        D = draw(st.integers(0, T + max_extra))
    else:
        D = draw(st.integers(T + min_delay_from_T, T + max_extra))
    n = draw(st.integers(1, 5))
    batch = draw(st.integers(1, 3))
    threshold = draw(hnp.arrays(np.int64, (n,), elements=st.integers(1, 12)))
    v0 = draw(hnp.arrays(np.int64, (n,), elements=st.integers(-15, 15)))
    bias = draw(hnp.arrays(np.int64, (n,), elements=st.integers(-5, 5)))
    current = draw(hnp.arrays(np.int64, (batch, T, n), elements=st.integers(-20, 20)))
    return _neuron(threshold, v0, bias, D), current, T


# ------------------------------------------------------------------ DIF with D >= T == quantizer
@settings(**SETTINGS)
@given(neuron_case())
def test_dif_with_delay_at_least_T_is_the_quantizer(case) -> None:
    op, current, T = case
    assert op.delay >= T
    spikes = semantics.neuron_steps(op, current, T)
    assert spikes.shape == current.shape
    count = spikes.sum(axis=1)
    V = current.sum(axis=1)
    expected = np.empty_like(count)
    for b in range(V.shape[0]):
        for i in range(V.shape[1]):
            total = int(V[b, i]) + T * int(op.bias[i]) + int(op.v0[i])
            expected[b, i] = min(max(total // int(op.threshold[i]), 0), T)  # Python floor division
    assert np.array_equal(count, expected)
    assert np.array_equal(semantics.neuron_count(op, V, T), expected)
    # all input is integrated before the first firing decision: the spikes come first
    for b in range(V.shape[0]):
        for i in range(V.shape[1]):
            c = int(count[b, i])
            assert spikes[b, :c, i].tolist() == [1] * c
            assert spikes[b, c:, i].tolist() == [0] * (T - c)


@settings(**SETTINGS)
@given(
    T=st.integers(1, 16),
    extra=st.integers(0, 3),
    theta=st.integers(1, 64),
    ratio=st.fractions(min_value=-3, max_value=20, max_denominator=64),
    k=st.integers(0, 12),
    split_seed=st.integers(0, 2**32 - 1),
)
def test_dif_matches_the_lsq_quantizer_round_half_up(T, extra, theta, ratio, k, split_seed) -> None:
    """SPEC 2.1: a quantizer with step s and T levels, ``c = clip(round(x / s), 0, T)``, equals
    a DIF neuron (D >= T) with integer threshold Theta, v0 = floor(Theta / 2) and total input V
    whenever V / Theta = x / s. csdc's tie rule is **round half up** (``floor(x/s + 1/2)``), not
    ONNX QuantizeLinear's half-to-even: at x/s = k + 1/2 the neuron fires k + 1 spikes.

    Construction: V integer, unit = 2**-k, x = V * unit, s = Theta * unit (both exact floats),
    so V / Theta == x / s exactly; V is spread over the T steps at random (the split does not
    matter for D >= T)."""
    V = int(np.floor(ratio * theta))  # any integer in range, often a tie when theta is even
    unit = 2.0 ** -k
    x, s = V * unit, theta * unit
    assert Fraction(x) / Fraction(s) == Fraction(V, theta)
    q = Fraction(x) / Fraction(s) + Fraction(1, 2)
    expected = min(max(q.numerator // q.denominator, 0), T)  # floor(x/s + 1/2), clipped

    rng = np.random.default_rng(split_seed)
    steps = rng.integers(-2 * theta, 2 * theta + 1, size=T)
    steps[-1] += V - int(steps.sum())
    op = _neuron([theta], [theta // 2], [0], T + extra)
    spikes = semantics.neuron_steps(op, steps.reshape(1, T, 1), T)
    assert int(spikes.sum()) == expected
    assert int(semantics.neuron_count(op, np.array([[V]]), T)[0, 0]) == expected


def test_quantizer_ties_round_half_up_by_hand() -> None:
    T, theta = 8, 4
    op = _neuron([theta] * 4, [theta // 2] * 4, [0] * 4, T)
    # x/s = 2.5, 0.5, 3.5, -0.5  -> half up: 3, 1, 4, 0 (ONNX half-to-even would give 2, 0, 4, 0)
    V = np.array([[10, 2, 14, -2]])
    assert semantics.neuron_count(op, V, T).tolist() == [[3, 1, 4, 0]]
    cur = np.zeros((1, T, 4), dtype=np.int64)
    cur[0, 0] = V[0]
    assert semantics.neuron_steps(op, cur, T).sum(axis=1).tolist() == [[3, 1, 4, 0]]


def test_quantizer_clips_at_zero_and_T() -> None:
    T = 3
    op = _neuron([2, 2], [1, 1], [0, 0], T)
    V = np.array([[-100, 100]])
    assert semantics.neuron_count(op, V, T).tolist() == [[0, T]]
    cur = np.repeat(V[:, None, :] // T, T, axis=1)
    assert semantics.neuron_steps(op, cur, T).sum(axis=1).tolist() == [[0, T]]


def test_encode_rounds_half_to_even_like_onnx() -> None:
    op = Encode((6,), 1.0, -5, 5)
    x = np.array([[0.5, 1.5, 2.5, -0.5, -1.5, 7.0]], dtype=np.float32)
    assert semantics.encode(op, x).tolist() == [[0, 2, 2, 0, -2, 5]]


# --------------------------------------------------------------- D = 0 (IF) and 0 < D < T (DIF)
@settings(**SETTINGS)
@given(neuron_case(any_delay=True))
def test_neuron_steps_match_scalar_if_and_algorithm_1(case) -> None:
    op, current, T = case
    spikes = semantics.neuron_steps(op, current, T)
    if_op = op.with_delay(0)
    if_spikes = semantics.neuron_steps(if_op, current, T)
    for b in range(current.shape[0]):
        for i in range(current.shape[2]):
            args = (current[b, :, i].tolist(), int(op.threshold[i]), int(op.v0[i]), int(op.bias[i]))
            assert if_spikes[b, :, i].tolist() == scalar_if(*args)
            assert spikes[b, :, i].tolist() == scalar_dif(*args, T, op.delay)
    # output is binary with at most T spikes, for every delay
    for s in (spikes, if_spikes):
        assert set(np.unique(s).tolist()) <= {0, 1}
        assert s.sum(axis=1).max() <= T


@settings(**SETTINGS)
@given(neuron_case(any_delay=True, max_extra=0))
def test_intermediate_delays_match_algorithm_1(case) -> None:
    """0 < D < T explicitly (the 'unevenness' regime)."""
    op, current, T = case
    for D in range(1, T):
        sp = semantics.neuron_steps(op.with_delay(D), current, T)
        for b in range(current.shape[0]):
            for i in range(current.shape[2]):
                args = (current[b, :, i].tolist(), int(op.threshold[i]), int(op.v0[i]), int(op.bias[i]))
                assert sp[b, :, i].tolist() == scalar_dif(*args, T, D)


def test_unevenness_error_by_hand() -> None:
    """Late negative input after an early spike: IF fires, the quantizer (D >= T) does not."""
    T = 2
    cur = np.array([[[1], [-1]]])
    op = _neuron([1], [0], [0], 0)
    assert semantics.neuron_steps(op, cur, T)[0, :, 0].tolist() == [1, 0]
    assert semantics.neuron_steps(op.with_delay(1), cur, T)[0, :, 0].tolist() == [0, 0]
    assert semantics.neuron_steps(op.with_delay(T), cur, T)[0, :, 0].tolist() == [0, 0]
    assert semantics.neuron_count(op.with_delay(T), cur.sum(axis=1), T).tolist() == [[0]]


def test_delay_shifts_firing_decisions_by_hand() -> None:
    # T=4, theta=2, constant current 1, v0=0: IF fires at steps 2 and 4.
    cur = np.ones((1, 4, 1), dtype=np.int64)
    op = _neuron([2], [0], [0], 0)
    assert semantics.neuron_steps(op, cur, 4)[0, :, 0].tolist() == [0, 1, 0, 1]
    # D=1: decision u=2 (v=2) -> out step 1; u=3 (v=1) no; u=4 (v=2) -> out step 3; u=5 (v=0) no
    assert semantics.neuron_steps(op.with_delay(1), cur, 4)[0, :, 0].tolist() == [1, 0, 1, 0]
    # D>=T: both spikes first
    assert semantics.neuron_steps(op.with_delay(4), cur, 4)[0, :, 0].tolist() == [1, 1, 0, 0]


# ------------------------------------------------------------------------------ TDEC max-pool
def pattern_network(target: np.ndarray, kernel, stride, padding) -> Network:
    """A network whose neuron 'pattern' emits exactly the binary train ``target`` (T, C, H, W),
    followed by SpikeMaxPool 'pool'.

    'clock' is a population of T IF neurons (D = 0); neuron k has threshold T+1, v0 = T+1-k and
    bias 1, so it fires once, at step k. A dense synapse maps clock k to the elements that
    spike at step k, and 'pattern' (threshold 1, v0 0, D = 0) fires exactly when its current is 1.
    """
    T = target.shape[0]
    chw = target.shape[1:]
    n = int(np.prod(chw))
    net = Network(T)
    net.add("input", Encode((T,), 1.0, 0, 1))  # fed zeros: the clock runs on its bias
    k = np.arange(1, T + 1)
    net.add("clock", _neuron(np.full(T, T + 1), T + 1 - k, np.ones(T), 0), ["input"])
    net.add("route", DenseSynapse(target.reshape(T, n).T.astype(np.int64)), ["clock"])
    net.add("pattern_flat", _neuron(np.ones(n), np.zeros(n), np.zeros(n), 0), ["route"])
    net.add("pattern", Reshape(chw), ["pattern_flat"])
    net.add("pool", SpikeMaxPool(kernel, stride, padding), ["pattern"])
    m = int(np.prod(net.info("pool").shape))
    net.add("pool_flat", Reshape((m,)), ["pool"])
    net.add("fc", DenseSynapse(np.ones((1, m), dtype=np.int64)), ["pool_flat"])
    net.add("out", Readout([1.0], [0.0]), ["fc"])
    net.verify()
    return net


def scalar_tdec_maxpool(train: np.ndarray, kernel, stride, padding) -> np.ndarray:
    """Independent TDEC max-pool of one train (T, C, H, W): y(t) = max C(t) - max C(t-1),
    padded positions have count 0."""
    T, C, H, W = train.shape
    kh, kw = kernel
    sh, sw = stride
    top, left, bottom, right = padding
    oh = (H + top + bottom - kh) // sh + 1
    ow = (W + left + right - kw) // sw + 1
    running = np.cumsum(train, axis=0)
    out = np.zeros((T, C, oh, ow), dtype=np.int64)
    for c in range(C):
        for i in range(oh):
            for j in range(ow):
                prev = 0
                for t in range(T):
                    best = 0
                    for a in range(kh):
                        for b in range(kw):
                            y, x = i * sh + a - top, j * sw + b - left
                            if 0 <= y < H and 0 <= x < W:
                                best = max(best, int(running[t, c, y, x]))
                    out[t, c, i, j] = best - prev
                    prev = best
    return out


@st.composite
def pool_case(draw):
    T = draw(st.integers(1, 8))
    C, H, W = draw(st.integers(1, 3)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    padding = tuple(draw(st.integers(0, 2)) for _ in range(4))
    kernel = (draw(st.integers(1, H + padding[0] + padding[2])), draw(st.integers(1, W + padding[1] + padding[3])))
    kernel = (min(kernel[0], 4), min(kernel[1], 4))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    density = draw(st.sampled_from([0.1, 0.5, 0.9]))
    seed = draw(st.integers(0, 2**32 - 1))
    target = (np.random.default_rng(seed).random((T, C, H, W)) < density).astype(np.int64)
    return target, kernel, stride, padding


@settings(**SETTINGS)
@given(pool_case())
def test_tdec_maxpool_on_arbitrary_trains(case) -> None:
    target, kernel, stride, padding = case
    net = pattern_network(target, kernel, stride, padding)
    res = semantics.run_steps(net, np.zeros((1, target.shape[0]), dtype=np.float32))
    assert np.array_equal(res.trains["pattern_flat"][0].reshape(target.shape), target)  # construction
    out = res.trains["pool"]
    assert set(np.unique(out).tolist()) <= {0, 1}, "TDEC max-pool output must be binary at every step"
    pool = net.op("pool")
    counts = target.sum(axis=0)[None]
    assert np.array_equal(out.sum(axis=1), semantics.max_pool(pool, counts))
    assert np.array_equal(res.counts["pool"], semantics.max_pool(pool, counts))
    assert np.array_equal(out[0], scalar_tdec_maxpool(target, kernel, stride, padding))
    assert int(res.readout[0, 0]) == int(out.sum())


def test_tdec_maxpool_by_hand() -> None:
    # one window of two inputs whose leader changes over time
    a = [1, 0, 1, 0, 0]  # running 1 1 2 2 2
    b = [0, 1, 1, 1, 1]  # running 0 1 2 3 4 ; max: 1 1 2 3 4 -> y = 1 0 1 1 1
    target = np.array([a, b]).T.reshape(5, 1, 1, 2)
    net = pattern_network(target, (1, 2), (1, 2), (0, 0, 0, 0))
    res = semantics.run_steps(net, np.zeros((1, 5), dtype=np.float32))
    assert res.trains["pool"][0, :, 0, 0, 0].tolist() == [1, 0, 1, 1, 1]
    assert int(res.counts["pool"][0, 0, 0, 0]) == 4 == max(sum(a), sum(b))


def test_tdec_maxpool_simultaneous_and_padded_by_hand() -> None:
    # 2x2 map, kernel 2, stride 1, padding 1 on all sides -> 3x3 output; corners see one pixel.
    tr = np.zeros((3, 1, 2, 2), dtype=np.int64)
    tr[:, 0, 0, 0] = [1, 1, 0]
    tr[:, 0, 1, 1] = [1, 1, 1]
    net = pattern_network(tr, (2, 2), (1, 1), (1, 1, 1, 1))
    out = semantics.run_steps(net, np.zeros((1, 3), dtype=np.float32)).trains["pool"][0, :, 0]
    assert out[:, 0, 0].tolist() == [1, 1, 0]  # only pixel (0, 0)
    assert out[:, 1, 1].tolist() == [1, 1, 1]  # both spike together: still one spike per step
    assert out[:, 2, 2].tolist() == [1, 1, 1]  # only pixel (1, 1)
    assert out[:, 0, 2].tolist() == [0, 0, 0]  # only pixel (0, 1): silent
    assert np.array_equal(out, scalar_tdec_maxpool(tr, (2, 2), (1, 1), (1, 1, 1, 1))[:, 0])


# ------------------------------------------------------------------- run_counts == run_steps
@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(networks(exact=True, max_T=6), st.integers(1, 3), st.integers(0, 2**16))
def test_run_counts_equals_run_steps_on_random_exact_networks(net, batch, seed) -> None:
    x = inputs_for(net, batch, seed)
    by_counts = semantics.run_counts(net, x)
    by_steps = semantics.run_steps(net, x)
    assert np.array_equal(by_counts.readout, by_steps.readout)
    assert np.array_equal(by_counts.logits, by_steps.logits)
    assert by_counts.counts.keys() == by_steps.counts.keys()
    for name in by_counts.counts:
        assert np.array_equal(by_counts.counts[name], by_steps.counts[name]), name


@settings(deadline=None, max_examples=60, suppress_health_check=[HealthCheck.too_slow])
@given(networks(exact=False, max_T=6), st.integers(0, 2**16))
def test_run_steps_trains_are_binary_for_any_delay(net, seed) -> None:
    res = semantics.run_steps(net, inputs_for(net, 2, seed))
    for name, train in res.trains.items():
        assert train.shape == (2, net.T, *net.info(name).shape)
        values = {-1, 0, 1} if net.info(name).kind == TERNARY else {0, 1}
        assert set(np.unique(train).tolist()) <= values, name
        assert np.array_equal(res.counts[name], train.sum(axis=1))


@pytest.mark.parametrize("T", [1, 4])
def test_run_counts_equals_run_steps_on_the_all_ops_network(T: int) -> None:
    net = all_ops_network(T=T, seed=T)
    x = all_ops_input(4)
    a, b = semantics.run_counts(net, x), semantics.run_steps(net, x)
    assert np.array_equal(a.readout, b.readout) and np.array_equal(a.logits, b.logits)
    for name in a.counts:
        assert np.array_equal(a.counts[name], b.counts[name]), name
    assert a.readout.any(), "test network should produce a non-trivial readout"
    assert set(a.counts) == {n for n, op in net.nodes() if isinstance(op, (Neuron, SpikeMaxPool))}


# ----------------------------------------------------------------------- run_counts refusals
@pytest.mark.parametrize("delay", [0, 1, 3])
def test_run_counts_refuses_delay_below_T_naming_the_neuron(delay: int) -> None:
    net = all_ops_network(T=4)
    net2 = Network(net.T, net.metadata)
    for name, op in net.nodes():
        if name == "act2":
            op = op.with_delay(delay)
        net2.add(name, op, net.inputs(name))
    with pytest.raises(IRError, match=rf"neuron 'act2' has delay {delay} < T=4"):
        semantics.run_counts(net2, all_ops_input(1))
    # run_steps accepts it; with_delay(T) makes it exact again
    semantics.run_steps(net2, all_ops_input(1))
    fixed = net2.with_delay(4)
    assert np.array_equal(semantics.run_counts(fixed, all_ops_input(2)).readout,
                          semantics.run_steps(fixed, all_ops_input(2)).readout)
