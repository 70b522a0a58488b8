"""The bit-width analysis: per-channel bounds that every per-step current respects, computed in
O(parameters) (random networks and hand-checked cases)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from strategies import inputs_for, networks  # noqa: E402

from csdc.compiler.bitwidth import analyze_bitwidth, current_bounds, weight_mantissa_exponent  # noqa: E402
from csdc.errors import BudgetError  # noqa: E402
from csdc.ir import ConvSynapse, DenseSynapse, Encode, Network, Neuron, Readout, ReduceSum  # noqa: E402
from csdc.ir.semantics import run_steps  # noqa: E402


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=networks(), seed=st.integers(0, 2**16))
def test_every_current_lies_within_its_bounds(net: Network, seed: int) -> None:
    bounds = current_bounds(net)
    res = run_steps(net, inputs_for(net, 4, seed), keep=False, currents=True)
    assert res.currents
    for name, values in res.currents.items():
        lo, hi = bounds[name]
        shape = net.info(name).shape
        assert lo.ndim == hi.ndim == len(shape), name  # broadcast arrays of the tensor's rank
        assert np.all(values >= np.broadcast_to(lo, shape)), name
        assert np.all(values <= np.broadcast_to(hi, shape)), name


def test_conv_bounds_are_per_channel_and_tight_on_spikes() -> None:
    """Spikes are in [0, 1]: a channel's current ranges over the sums of its negative and positive weights."""
    w = np.array([[[[1, -2], [3, 0]], [[-1, 4], [0, 0]]], [[[0, 0], [0, -5]], [[2, 2], [2, 2]]]], dtype=np.int8)
    net = Network(3)
    net.add("in", Encode((2, 5, 5), 1.0, 0, 3))
    net.add("n0", Neuron(np.full((2, 5, 5), 2), np.zeros((2, 5, 5)), np.zeros((2, 5, 5)), 3), ["in"])
    net.add("conv", ConvSynapse(w, padding=(1, 1, 0, 0), exponent=1), ["n0"])
    lo, hi = current_bounds(net)["conv"]
    assert lo.shape == hi.shape == (2, 1, 1)
    assert lo.ravel().tolist() == [(-2 - 1) * 2, -5 * 2]
    assert hi.ravel().tolist() == [(1 + 3 + 4) * 2, 8 * 2]


def test_reduce_sum_bounds_scale_with_the_summed_axes() -> None:
    net = Network(2)
    net.add("in", Encode((6, 4), 1.0, 0, 1))
    net.add("n0", Neuron(np.ones((6, 4)), np.zeros((6, 4)), np.zeros((6, 4)), 2), ["in"])
    net.add("d", DenseSynapse(np.array([[1, -1, 2, 0], [3, 3, -3, 0]], np.int8), exponent=2), ["n0"])  # (6, 2)
    net.add("sum", ReduceSum((0,)), ["d"])
    net.add("out", Readout(np.ones(2), np.zeros(2)), ["sum"])
    lo, hi = current_bounds(net)["sum"]
    assert lo.tolist() == [-1 * 4 * 6, -3 * 4 * 6]
    assert hi.tolist() == [3 * 4 * 6, 6 * 4 * 6]
    assert analyze_bitwidth(net).accumulator_bits == 10  # T * 144 = 288 < 2^9, plus the sign


def test_weight_bits_count_the_mantissa_and_shared_power_of_two() -> None:
    op = DenseSynapse(np.array([[4, -8], [12, 0]], np.int8), exponent=3)
    assert weight_mantissa_exponent(op) == (3, 5)  # mantissas 1, -2, 3 (3 bits) times 2^(3 + 2)
    assert weight_mantissa_exponent(DenseSynapse(np.zeros((2, 2), np.int8))) == (1, 0)


def test_budget_error_names_the_node() -> None:
    net = Network(2)
    net.add("in", Encode((3,), 1.0, 0, 1))
    net.add("n0", Neuron(np.ones(3), np.zeros(3), np.zeros(3), 2), ["in"])
    net.add("wide", DenseSynapse(np.full((2, 3), 301, np.int16)), ["n0"])
    net.add("out", Readout(np.ones(2), np.zeros(2)), ["wide"])
    with pytest.raises(BudgetError, match="node 'wide' \\(DenseSynapse\\) needs 10-bit weights, profile 'loihi2' allows 8"):
        analyze_bitwidth(net, "loihi2")
