"""Ternary (signed) spiking neurons and signed TDEC products (docs/signed_spikes.md).

Properties: with delay D >= T a ternary population's signed spike count is the symmetric
quantizer ``clip(round(V / threshold), -T, T)`` (ties half up, zero point 0) in the time-stepped
semantics, the count-domain reference and the numba kernel; zero costs zero spikes; a signed
``SpikeMatMul`` sums to the product of the signed counts. Plus the verifier's treatment of
signed spikes, the delay-below-T behaviour and the bit-width bounds.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csdc.backends.numba import kernels as K
from csdc.compiler.bitwidth import analyze_bitwidth, current_bounds
from csdc.errors import IRError
from csdc.ir import semantics, serialize
from csdc.ir.graph import Network
from csdc.ir.ops import (
    CURRENT,
    SPIKES,
    TERNARY,
    Add,
    ConvSynapse,
    DenseSynapse,
    DiagonalSynapse,
    Encode,
    Neuron,
    Readout,
    Reshape,
    SpikeMatMul,
    SpikeMaxPool,
    SumPool,
    TernaryNeuron,
    Transpose,
)

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))
from ir_nets import all_ops_network  # noqa: E402

PROPERTY = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _population(threshold: np.ndarray, bias: np.ndarray, delay: int, v0: np.ndarray | None = None) -> TernaryNeuron:
    v0 = threshold // 2 if v0 is None else v0  # the compiler's v0: rounding to nearest
    return TernaryNeuron(threshold, v0, bias, delay)


def _kernel_run(op: TernaryNeuron, current: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray, int]:
    """The numba kernel on (batch, T, N) int64 currents: (train, counts, spikes)."""
    b, _, n = current.shape
    out = np.empty((b, T, n), dtype=np.int8)
    counts = np.empty((b, n), dtype=np.int64)
    spikes, _, _ = K.ternary_neurons(current, op.threshold.ravel().copy(), op.v0.ravel().copy(), op.bias.ravel().copy(),
                                  op.delay, out, counts)
    return out, counts, spikes


def _round_half_up(v: int, theta: int) -> int:
    return int(np.floor(Fraction(v, theta) + Fraction(1, 2)))


@st.composite
def _ternary_case(draw: st.DrawFn, exact: bool = True) -> tuple[TernaryNeuron, np.ndarray, int]:
    T = draw(st.integers(1, 12))
    n = draw(st.integers(1, 6))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    threshold = rng.integers(1, draw(st.sampled_from([2, 9, 1000])), size=n)
    reach = draw(st.sampled_from([1, 2, 3]))  # per-step currents up to reach x threshold (clipping included)
    current = rng.integers(-reach * threshold, reach * threshold + 1, size=(2, T, n))
    bias = rng.integers(-2, 3, size=n)
    delay = draw(st.integers(T, T + 3)) if exact else draw(st.integers(0, T - 1 if T > 1 else 0))
    return _population(threshold, bias, delay), current.astype(np.int64), T


@PROPERTY
@given(_ternary_case())
def test_delay_at_least_T_is_the_symmetric_quantizer(case) -> None:
    """D >= T: signed count = clip(round_half_up(V / threshold), -T, T) with V the total input
    (bias included), in run_steps, the count-domain reference and the numba kernel; every spike
    has the count's sign, so |count| spikes are emitted (zero costs none)."""
    op, current, T = case
    total = current.sum(axis=1)
    V = total + T * op.bias
    expected = np.array([[min(max(_round_half_up(int(v), int(th)), -T), T) for v, th in zip(row, op.threshold)]
                         for row in V])
    train = semantics.ternary_steps(op, current, T)
    assert set(np.unique(train).tolist()) <= {-1, 0, 1}
    assert np.array_equal(train.sum(axis=1), expected)
    assert np.array_equal(semantics.ternary_count(op, total, T), expected)
    assert np.array_equal(np.abs(train).sum(axis=1), np.abs(expected))  # one sign per neuron and window
    k_train, k_counts, k_spikes = _kernel_run(op, current, T)
    assert np.array_equal(k_train, train) and np.array_equal(k_counts, expected)
    assert k_spikes == int(np.abs(expected).sum())
    # away from ties (V = (k + 1/2) threshold) this is also ONNX's round half to even
    no_tie = (2 * V) % (2 * op.threshold) != op.threshold
    onnx = np.clip(np.rint(V / op.threshold), -T, T)
    assert np.array_equal(expected[no_tie], onnx[no_tie])


@PROPERTY
@given(st.integers(1, 10), st.integers(0, 500), st.integers(-4000, 4000))
def test_odd_thresholds_round_symmetrically_around_zero(T: int, k: int, V: int) -> None:
    """An odd threshold has no ties in its integer unit: count(-V) = -count(V) exactly."""
    theta = 2 * k + 1
    op = _population(np.array([theta]), np.array([0]), T)
    c = lambda v: semantics.ternary_count(op, np.array([v]), T)[0]  # noqa: E731
    assert c(-V) == -c(V)


@PROPERTY
@given(_ternary_case(exact=False))
def test_below_T_numba_equals_run_steps_and_count_is_charge_over_threshold(case) -> None:
    """D < T: the kernel equals the time-stepped semantics, and the signed count always is the
    charge that left the membrane: count * threshold = V + v0 - v_end with v_end in the window
    [0, threshold) exactly when the count equals the quantizer (or the count is saturated)."""
    op, current, T = case
    train = semantics.ternary_steps(op, current, T)
    k_train, k_counts, k_spikes = _kernel_run(op, current, T)
    assert np.array_equal(k_train, train) and np.array_equal(k_counts, train.sum(axis=1))
    assert k_spikes == int(np.abs(train).sum())
    count = train.sum(axis=1)
    v_end = current.sum(axis=1) + T * op.bias + op.v0 - count * op.threshold
    quantizer = semantics.ternary_count(op, current.sum(axis=1), T)
    settled = (v_end >= 0) & (v_end < op.threshold)
    assert np.array_equal(count[settled], quantizer[settled])
    saturated = np.abs(count) == T
    assert np.all(settled | saturated | (count != quantizer))


@PROPERTY
@given(st.integers(1, 10), st.integers(1, 50), st.integers(0, 2**32 - 1))
def test_plain_if_is_exact_when_input_moves_by_at_most_one_threshold_per_step(T: int, theta: int, seed: int) -> None:
    """D = 0 (plain IF): with |I(u) + bias| <= threshold each step and v0 in [0, threshold), the
    membrane is back in [0, threshold) after every step, so the count is exact: a ternary
    neuron corrects an early +1 with a later -1 (the binary DIF neuron cannot)."""
    rng = np.random.default_rng(seed)
    bias = rng.integers(-theta // 2, theta // 2 + 1, size=4)
    current = rng.integers(-theta, theta + 1, size=(3, T, 4)) - bias
    current = np.clip(current, -theta - bias, theta - bias)
    op = TernaryNeuron(np.full(4, theta), rng.integers(0, theta, size=4), bias, 0)
    train = semantics.ternary_steps(op, current, T)
    assert np.array_equal(train.sum(axis=1), semantics.ternary_count(op, current.sum(axis=1), T))


@pytest.mark.parametrize("kind, train", [(Neuron, [1, 0, 0, 0]), (TernaryNeuron, [1, 0, -1, -1])])
def test_late_negative_input_is_taken_back_by_negative_spikes(kind, train) -> None:
    """T = 4, D = 0, threshold 4, v0 = 2, input +3, 0, -6, 0: total -3, so the quantizer gives
    floor(-1 / 4) = -1 (clipped to 0 for the binary neuron). The binary neuron keeps its early
    spike (count 1: the unevenness error); the ternary one fires +1 (v = 1), nothing, -1 (v = -5
    -> -1) and -1 (v = -1 -> 3): count -1, exact, at the price of three spikes. Hand-computed."""
    op = kind(np.array([4]), np.array([2]), np.array([0]), 0)
    current = np.array([[[3], [0], [-6], [0]]])
    got = (semantics.ternary_steps if kind is TernaryNeuron else semantics.neuron_steps)(op, current, 4)
    assert got[0, :, 0].tolist() == train


def test_a_lagging_neuron_misses_what_arrives_too_late() -> None:
    """T = 2, D = 0, threshold 4, v0 = 2, input 0 then 12: one spike per step cannot carry the
    late charge (count 1, quantizer clip(round(12 / 4), -2, 2) = 2); with D = T it is exact."""
    current = np.array([[[0], [12]]])
    late = TernaryNeuron(np.array([4]), np.array([2]), np.array([0]), 0)
    assert semantics.ternary_steps(late, current, 2).sum() == 1
    assert semantics.ternary_steps(late.with_delay(2), current, 2).sum() == 2
    assert isinstance(late.with_delay(2), TernaryNeuron)


@st.composite
def _signed_trains(draw: st.DrawFn) -> tuple[np.ndarray, np.ndarray, int]:
    T, M, Kd, N = (draw(st.integers(1, 6)) for _ in range(4))
    lead = draw(st.sampled_from([(), (2,)]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    lo_a, lo_b = draw(st.sampled_from([(-1, -1), (-1, 0), (0, -1)]))  # ternary on either or both sides
    a = rng.integers(lo_a, 2, size=(2, T, *lead, M, Kd))
    b = rng.integers(lo_b, 2, size=(2, T, *lead, Kd, N))
    return a, b, draw(st.sampled_from([1, -1, 3]))


@PROPERTY
@given(_signed_trains())
def test_signed_spike_matmul_sums_to_the_product_of_signed_counts(case) -> None:
    """(C_A C_B)(t) = A(t) C_B(t) + C_A(t-1) B(t) with A, B in {-1, 0, 1}: the window sums to
    C_A(T) C_B(T), and the numba kernel (additions and subtractions only) gives every step."""
    a, b, w = case
    op = SpikeMatMul(w)
    steps = semantics.spike_matmul_steps(op, a, b)
    assert np.array_equal(steps.sum(axis=1), w * np.matmul(a.sum(axis=1), b.sum(axis=1)))
    bsz, T = a.shape[:2]
    m, k, n = a.shape[-2], a.shape[-1], b.shape[-1]
    lead = int(np.prod(a.shape[2:-2]))
    out = np.empty((bsz, T, lead, m, n), dtype=np.int64)
    dt = lambda x: np.int8 if x.min(initial=0) < 0 else np.uint8  # noqa: E731
    acs = K.spike_matmul_signed(a.reshape(bsz, T, lead, m, k).astype(dt(a)), b.reshape(bsz, T, lead, k, n).astype(dt(b)),
                                w, out, np.empty(0, dtype=np.int16))
    assert np.array_equal(out.reshape(steps.shape), steps)
    assert acs == n * int(np.abs(a).sum()) + m * int(np.abs(b).sum())


def _ternary_source(shape: tuple[int, ...]) -> Network:
    net = Network(3)
    net.add("in", Encode(shape, 1.0, -3, 3))
    ones = np.ones(shape, dtype=np.int64)
    net.add("t", TernaryNeuron(2 * ones, ones, 0 * ones, 3), ["in"])
    return net


@pytest.mark.parametrize("op, shape", [
    (DenseSynapse(np.ones((2, 4), np.int64)), (4,)),
    (ConvSynapse(np.ones((1, 2, 2, 2), np.int64)), (2, 3, 3)),
    (DiagonalSynapse(np.ones((2, 3, 3), np.int64)), (2, 3, 3)),
    (SumPool((2, 2), (1, 1)), (2, 3, 3)),
    (Reshape((18,)), (2, 3, 3)),
    (Transpose((2, 1, 0)), (2, 3, 3)),
])
def test_signed_spikes_feed_linear_and_routing_ops(op, shape) -> None:
    net = _ternary_source(shape)
    net.add("x", op, ["t"])
    assert net.info("t").kind == TERNARY
    assert net.info("x").kind == (TERNARY if isinstance(op, (Reshape, Transpose)) else CURRENT)


def test_verifier_refuses_max_pool_and_add_of_signed_spikes() -> None:
    net = _ternary_source((1, 4, 4))
    with pytest.raises(IRError, match=r"node 'mp' \(SpikeMaxPool\): SpikeMaxPool takes binary spikes, got ternary"):
        net.add("mp", SpikeMaxPool((2, 2), (2, 2)), ["t"])
    with pytest.raises(IRError, match=r"Add input 0 must carry current, got ternary"):
        net.add("sum", Add(), ["t", "in"])
    assert "mp" not in net and "sum" not in net


def test_matmul_takes_signed_spikes_on_either_side() -> None:
    net = _ternary_source((3, 3))
    net.add("b", Neuron(np.ones((3, 3), np.int64), np.zeros((3, 3), np.int64), np.zeros((3, 3), np.int64), 3), ["in"])
    net.add("t_t", Transpose((1, 0)), ["t"])
    for i, ins in enumerate((["t", "b"], ["b", "t"], ["t", "t_t"])):
        net.add(f"mm{i}", SpikeMatMul(), ins)
        assert net.info(f"mm{i}").kind == CURRENT
    assert net.info("b").kind == SPIKES


def test_ternary_population_round_trips_and_keeps_its_class() -> None:
    net = all_ops_network(T=3, seed=5)
    assert any(isinstance(op, TernaryNeuron) for _, op in net.nodes())
    back = serialize.from_bytes(serialize.to_bytes(net))
    assert [type(op) for _, op in back.nodes()] == [type(op) for _, op in net.nodes()]
    assert [back.info(n).kind for n in back.order()] == [net.info(n).kind for n in net.order()]
    delayed = net.with_delay(1)
    assert all(type(delayed.op(n)) is type(net.op(n)) and delayed.op(n).delay == 1 for n in net.neurons())


def test_bit_widths_of_signed_spikes() -> None:
    """A synapse fed by signed spikes spans -sum|w| .. sum|w| (binary: sum w- .. sum w+); a ternary
    membrane may climb from threshold - 1 after a -1 reset."""
    net = _ternary_source((2,))
    net.add("b", Neuron(np.ones(2, np.int64), np.zeros(2, np.int64), np.zeros(2, np.int64), 3), ["in"])
    w = np.array([[2, -3]])
    net.add("from_t", DenseSynapse(w), ["t"])
    net.add("from_b", DenseSynapse(w), ["b"])
    net.add("sum", Add(), ["from_t", "from_b"])
    net.add("t2", TernaryNeuron(np.array([40]), np.array([0]), np.array([0]), 3), ["sum"])
    net.add("out", Readout(np.ones(1), np.zeros(1)), [net.add("d", DenseSynapse(np.ones((1, 1), np.int64)), ["t2"])])
    b = current_bounds(net)
    assert [int(v.min()) for v in b["from_t"]] == [-5, 5] and [int(v.min()) for v in b["from_b"]] == [-3, 2]
    assert [int(v.min()) for v in b["t"]] == [-1, 1]
    rep = analyze_bitwidth(net, "loihi2")
    # v in [T * -8, 39 + T * 7] = [-24, 60]: 7 bits
    assert rep.per_node["t2"]["membrane_bits"] == 7


def test_inspect_and_run_report_ternary_populations_and_signed_spikes(tmp_path, capsys) -> None:
    """`csdc inspect` names the ternary populations (op and kind); `csdc run` counts their spikes of
    both signs, reports the -1 spikes, and numba and the reference agree on both (D >= T)."""
    import json

    from csdc.cli import main
    from ir_nets import all_ops_input

    net = all_ops_network(T=3, seed=2)
    sir, data = tmp_path / "net.sir", tmp_path / "data.npz"
    serialize.save(net, sir)
    x = all_ops_input(12, seed=3)
    np.savez(data, x=x, y=np.zeros(len(x), dtype=np.int64))
    assert main(["inspect", str(sir)]) == 0
    text = capsys.readouterr().out
    assert "6 neuron populations (1 ternary: signed spikes)" in text
    row = next(line for line in text.splitlines() if line.startswith("act_b "))
    assert "TernaryNeuron" in row and " ternary " in row
    summaries = {}
    for backend in ("numba", "reference"):
        assert main(["run", str(sir), "--backend", backend, "--data", str(data), "--json"]) == 0
        summaries[backend] = json.loads(capsys.readouterr().out)
    s = summaries["numba"]
    assert s["spikes"] == summaries["reference"]["spikes"]
    assert s["negative_spikes"] == summaries["reference"]["negative_spikes"] > 0
    counts = semantics.run_counts(net, x).counts["act_b"]
    assert s["per_population"]["act_b"]["spikes"] == int(np.abs(counts).sum())
    assert s["per_population"]["act_b"]["negative_spikes"] == int(np.maximum(-counts, 0).sum())
    assert main(["run", str(sir), "--data", str(data)]) == 0
    assert "signed spikes" in capsys.readouterr().out
