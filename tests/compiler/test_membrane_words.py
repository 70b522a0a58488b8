"""Two-word membranes (``bitwidth.membrane_words``): the microcode of docs/precision.md, run here in
plain Python integers on the per-step currents of the reference semantics, keeps ``V = hi * 2^s + lo``
equal to the single-word membrane at every step (so the spike trains are identical) and every word
within the widths ``membrane_words`` states, which fit the word."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from csdc.compiler.bitwidth import MembraneWords, current_bounds, current_summands, membrane_words, signed_bits
from csdc.errors import BudgetError
from csdc.ir import Add, DenseSynapse, DiagonalSynapse, Encode, Network, Neuron, Readout, ReduceSum, TernaryNeuron
from csdc.ir.ops import SpikeMatMul
from csdc.ir.semantics import run_steps


def _two_word_trains(net: Network, node: str, words: MembraneWords, currents: dict[str, np.ndarray]) -> np.ndarray:
    """The spike train of ``node`` run by the two-word microcode, element by element in Python ints;
    asserts at every step that ``hi * 2^s + lo`` is the single-word membrane and that every word stays
    within the widths of ``words``."""
    op = net.op(node)
    ternary = isinstance(op, TernaryNeuron)
    T, s = net.T, words.shift
    unit = 1 << s
    first = currents[(words.coarse + words.fine)[0]]
    batch, shape = first.shape[0], first.shape[2:]
    out = np.zeros((batch, T, *shape), np.int64)

    def fits(value: int, bits: int) -> None:
        assert signed_bits(value, value) <= bits, (value, bits)

    for b, idx in itertools.product(range(batch), np.ndindex(*shape)):
        th, v0, bias = (int(np.broadcast_to(a, shape)[idx]) for a in (op.threshold, op.v0, op.bias))
        th_hi, th_lo, b_hi, b_lo = th >> s, th & (unit - 1), bias >> s, bias & (unit - 1)
        hi, lo, v = v0 >> s, v0 & (unit - 1), v0
        fits(th_hi, words.hi_bits)
        fits(hi, words.hi_bits)
        for u in itertools.chain(range(1, T + 1), range(max(T, op.delay) + 1, T + op.delay + 1)):
            if u <= T:
                coarse = [int(currents[n][(b, u - 1, *idx)]) for n in words.coarse]
                fine = [int(currents[n][(b, u - 1, *idx)]) for n in words.fine]
                assert all(c % unit == 0 for c in coarse)
                for part in itertools.accumulate(c >> s for c in coarse):
                    fits(part, words.coarse_bits)
                for part in itertools.accumulate(fine):
                    fits(part, words.fine_bits)
                v += sum(coarse) + sum(fine) + bias
                lo += sum(fine) + b_lo
                fits(lo, words.fine_bits)
                c = lo >> s
                lo -= c << s
                acc = sum(x >> s for x in coarse) + b_hi + c
                fits(acc, words.coarse_bits)
                hi += acc
                fits(hi, words.hi_bits)
            if u > op.delay:
                spike = 0
                if hi > th_hi or (hi == th_hi and lo >= th_lo):
                    spike, v = 1, v - th
                    lo -= th_lo
                    fits(lo, words.fine_bits)
                    if lo < 0:
                        lo, hi = lo + unit, hi - 1
                    hi -= th_hi
                elif ternary and hi < 0:
                    spike, v = -1, v + th
                    lo += th_lo
                    fits(lo, words.fine_bits)
                    if lo >= unit:
                        lo, hi = lo - unit, hi + 1
                    hi += th_hi
                fits(hi, words.hi_bits)
                out[(b, u - op.delay - 1, *idx)] = spike
            assert 0 <= lo < unit and hi * unit + lo == v
    return out


@st.composite
def wide_neurons(draw: st.DrawFn) -> tuple[Network, str, int]:
    """A population reading an Add of dense synapses with different exponents (on graded input levels
    and on ternary spikes), possibly the input levels themselves and a spike product, whose membrane
    is wider than a small word."""
    T = draw(st.integers(1, 5))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    n_in, n = draw(st.integers(1, 4)), draw(st.integers(1, 3))
    net = Network(T)
    net.add("x", Encode((n, n_in), 1.0, -7, 7))
    pre = np.full((n, n_in), 3)
    net.add("spikes", TernaryNeuron(pre, rng.integers(-3, 4, (n, n_in)), np.zeros((n, n_in)), draw(st.integers(0, 1))), ["x"])
    leaves = []
    for i in range(draw(st.integers(1, 4))):
        source = draw(st.sampled_from(["x", "spikes"])) if i else "spikes"
        w = rng.integers(-9, 10, (n_in, n_in)).astype(np.int8)
        leaves.append(net.add(f"syn{i}", DenseSynapse(w, exponent=draw(st.integers(0, 12))), [source]))
    if n == n_in and draw(st.booleans()):  # an attention-like product with a power-of-two weight
        net.add("spikes2", Neuron(pre, rng.integers(-3, 4, (n, n_in)), np.zeros((n, n_in)), 0), ["x"])
        leaves.append(net.add("product", SpikeMatMul(draw(st.sampled_from([1, -8, 64, 1024]))), ["spikes", "spikes2"]))
    if draw(st.booleans()):
        leaves.append("x")
    current = net.add("sum", Add(), leaves) if len(leaves) > 1 else leaves[0]
    big = 2 ** draw(st.integers(0, 16))
    th = rng.integers(1, big + 1, (n, n_in))
    v0 = rng.integers(-big, big + 1, (n, n_in))
    bias = rng.integers(-big, big + 1, (n, n_in)) // 8
    kind = TernaryNeuron if draw(st.booleans()) else Neuron
    net.add("target", kind(th, v0, bias, draw(st.integers(0, T + 2))), [current])
    net.add("out", DiagonalSynapse(np.ones((n, n_in), np.int8)), ["target"])
    net.add("readout", Readout(np.ones(n_in), np.zeros(n_in)), [net.add("pool", ReduceSum((0,)), ["out"])])
    net.verify()
    return net, "target", draw(st.integers(6, 14))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(case=wide_neurons(), seed=st.integers(0, 2**16))
def test_two_word_microcode_equals_the_single_word_neuron(case, seed) -> None:
    net, node, word_bits = case
    try:
        words = membrane_words(net, node, word_bits)
    except BudgetError as exc:  # a refusal names the node and its widths
        assert f"'{node}'" in str(exc) and f"{word_bits}-bit" in str(exc)
        assume(False)
    assume(words is not None)
    event(f"coarse {len(words.coarse) > 0}, fine {len(words.fine) > 0}")
    assert max(words.hi_bits, words.coarse_bits, words.fine_bits) <= word_bits
    assert sorted(words.coarse + words.fine) == sorted(current_summands(net, net.inputs(node)[0]))
    x = np.random.default_rng(seed).integers(-9, 10, (3, *net.input_shape)).astype(np.float32)
    res = run_steps(net, x, currents=True)
    assert np.array_equal(_two_word_trains(net, node, words, res.currents), res.trains[node])


def _population(weights: list[tuple[int, int]], threshold: int, T: int = 4) -> Network:
    """Binary spikes -> one dense synapse per (mantissa, exponent) -> Add -> a DIF population."""
    net = Network(T)
    net.add("x", Encode((2,), 1.0, 0, 1))
    net.add("s", Neuron(np.ones(2), np.zeros(2), np.zeros(2), 0), ["x"])
    leaves = [net.add(f"w{i}", DenseSynapse(np.full((1, 2), m, np.int64), exponent=e), ["s"]) for i, (m, e) in enumerate(weights)]
    net.add("inner", Add(), leaves[1:]) if len(leaves) > 2 else None
    summed = net.add("sum", Add(), [leaves[0], "inner" if len(leaves) > 2 else leaves[1]])
    net.add("p", Neuron(np.full(1, threshold), np.full(1, threshold // 2), np.zeros(1), T), [summed])
    net.add("r", Readout(np.ones(1), np.zeros(1)), [net.add("d", DiagonalSynapse(np.ones(1, np.int8)), ["p"])])
    return net


def test_summands_are_the_leaves_of_the_add_tree() -> None:
    net = _population([(3, 0), (5, 10), (-7, 12)], 2**20)
    assert current_summands(net, "sum") == ["w0", "w1", "w2"]
    assert current_summands(net, "w1") == ["w1"]


def test_one_word_when_it_fits_else_coarse_and_fine_summands() -> None:
    net = _population([(3, 0), (5, 10), (-7, 12)], 2**10)
    assert membrane_words(net, "p", 24) is None  # 2 * 4 * 7 * 2^12 < 2^18
    words = membrane_words(net, "p", 12, current_bounds(net))
    assert words is not None and words.shift >= 1
    # the weights 5 * 2^10 and -7 * 2^12 are multiples of 2^shift exactly when their exponent is >= shift
    assert set(words.coarse) == {n for n, e in (("w1", 10), ("w2", 12)) if e >= words.shift}
    assert "w0" in words.fine
    assert max(words.hi_bits, words.coarse_bits, words.fine_bits) <= 12


def test_two_words_that_cannot_hold_the_membrane_are_refused_by_name() -> None:
    net = _population([(100, 0), (5, 20)], 2**26)  # 100 * 2 per step in the fine word, 30-bit membrane
    with pytest.raises(BudgetError, match=r"node 'p' \(Neuron\) does not fit two 8-bit membrane words: at shift \d+"):
        membrane_words(net, "p", 8)
    assert membrane_words(net, "p", 24) is not None


def test_a_word_profile_checks_every_word_and_refuses_by_name() -> None:
    """``analyze_bitwidth`` on a profile with words: a membrane wider than a word takes two (reported
    per node), and is refused, naming the node and its widths, when two do not hold it."""
    from csdc.compiler.bitwidth import HardwareProfile, analyze_bitwidth

    net = _population([(3, 0), (5, 10), (-7, 12)], 2**10)
    rep = analyze_bitwidth(net, HardwareProfile("w12", weight_bits=8, threshold_bits=48, membrane_bits=48, word_bits=12))
    words = membrane_words(net, "p", 12)
    assert rep.two_words == ["p"] and rep.membrane_words == 2
    assert {k: rep.per_node["p"][k] for k in ("word_shift", "hi_bits", "coarse_bits", "fine_bits")} == {
        "word_shift": words.shift, "hi_bits": words.hi_bits, "coarse_bits": words.coarse_bits, "fine_bits": words.fine_bits}
    assert "two_words" in rep.to_dict() and "two_words" not in analyze_bitwidth(net, "int64").to_dict()
    with pytest.raises(BudgetError, match=r"node 'p' \(Neuron\) does not fit two 8-bit membrane words: at shift \d+ .*'w8'"):
        analyze_bitwidth(_population([(100, 0), (5, 20)], 2**26), HardwareProfile("w8", 8, 48, 48, word_bits=8))


def test_splitting_at_the_shift_shrinks_the_fine_word() -> None:
    """A 15-bit weight split into 8-bit digits (exponents 0, 7) straddles a shift of 11: both digits feed
    the fine compartment, which then needs 17 bits; :func:`split_for_profile` also cuts it at 2^11, the
    part above feeds the coarse compartment and the fine word fits 16 bits: same currents, same spikes."""
    from csdc.compiler.bitwidth import HardwareProfile, two_word_layout
    from csdc.compiler.integerize import split_for_profile, split_wide_synapses

    net = _population([(2**14 - 1, 0), (1, 22)], 2**18)
    prof = HardwareProfile("w16", weight_bits=8, threshold_bits=48, membrane_bits=48, word_bits=16)
    plain, _ = split_wide_synapses(net, prof.weight_bits)
    before = two_word_layout(plain, "p", 16, current_bounds(plain))
    assert before.shift == 11 and before.fine_bits > 16
    cut, groups = split_for_profile(net, prof)
    words = membrane_words(cut, "p", 16)
    assert groups == {"w0": 3} and words.shift == 11 and len(words.coarse) == 2 and words.widest <= 16
    x = np.random.default_rng(0).integers(0, 2, (8, 2)).astype(np.float32)
    a, b = run_steps(net, x, currents=True), run_steps(cut, x, currents=True)
    assert np.array_equal(a.currents["sum"], b.currents["sum"]) and np.array_equal(a.trains["p"], b.trains["p"])
    assert np.array_equal(_two_word_trains(cut, "p", words, b.currents), a.trains["p"])
