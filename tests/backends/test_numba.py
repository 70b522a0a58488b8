"""The numba backend against the reference semantics: bit-exact spike trains, counts and
readout for any delay (``run_steps``), the count-domain reference for delay >= T
(``run_counts``), hand-computed cases per op, activity statistics, batching and the
on-disk JIT cache."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the shared strategies
from strategies import inputs_for, networks

from csdc.backends.base import get_backend
from csdc.backends.numba import NumbaBackend, kernels_cached
from csdc.backends.numba.backend import plan
from csdc.backends.numba.kernels import KERNELS
from csdc.errors import DataError
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
    Reshape,
    SpikeMatMul,
    SpikeMaxPool,
    SumPool,
    TernaryNeuron,
    Transpose,
)
from csdc.ir.semantics import conv, encode, max_pool, run_counts, run_steps

BACKEND = NumbaBackend()
PROPERTY = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_same_as_steps(net: Network, x: np.ndarray) -> None:
    ref = run_steps(net, x)
    got = BACKEND.run(net, x, keep_trains=True)
    assert np.array_equal(got.readout, ref.readout)
    assert got.readout.dtype == np.int64
    assert np.array_equal(got.logits, ref.logits)
    assert got.counts.keys() == ref.counts.keys() == got.trains.keys()
    for name in ref.counts:
        assert got.counts[name].shape == ref.counts[name].shape
        assert np.array_equal(got.counts[name], ref.counts[name]), name
        assert np.array_equal(got.trains[name], ref.trains[name]), name


def neuron(shape: tuple[int, ...], threshold: int, delay: int, v0: int = 0, bias: int = 0) -> Neuron:
    return Neuron(np.full(shape, threshold), np.full(shape, v0), np.full(shape, bias), delay)


def readout_net(net: Network, src: str, classes: int = 2) -> None:
    """Finish ``net``: flatten ``src`` (spikes), a dense layer and the readout."""
    n = int(np.prod(net.info(src).shape))
    if len(net.info(src).shape) > 1:
        src = net.add(f"{src}_flat", Reshape((n,)), [src])
    w = np.arange(classes * n).reshape(classes, n) % 5 - 2
    net.add("fc_out", DenseSynapse(w), [src])
    net.add("out", Readout(np.linspace(0.5, 1.5, classes), np.zeros(classes)), ["fc_out"])


def spiking_input(shape: tuple[int, ...], T: int, delay: int = 0) -> tuple[Network, str]:
    """Encode -> IF neurons with threshold 2: inputs in [0, 3] give irregular spike trains."""
    net = Network(T)
    net.add("in", Encode(shape, 1.0, 0, 3))
    net.add("s", neuron(shape, 2, delay, v0=1), ["in"])
    return net, "s"


def random_x(shape: tuple[int, ...], batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 3.5, (batch, *shape)).astype(np.float32)


# -- property tests -----------------------------------------------------------------------
@PROPERTY
@given(networks(), st.integers(1, 3), st.integers(0, 2**16))
def test_equals_run_steps_for_any_delay(net: Network, batch: int, seed: int) -> None:
    assert_same_as_steps(net, inputs_for(net, batch, seed))


@PROPERTY
@given(networks(exact=True), st.integers(1, 3), st.integers(0, 2**16))
def test_equals_run_counts_for_delay_at_least_T(net: Network, batch: int, seed: int) -> None:
    x = inputs_for(net, batch, seed)
    ref = run_counts(net, x)
    got = BACKEND.run(net, x)
    assert np.array_equal(got.readout, ref.readout)
    assert np.array_equal(got.logits, ref.logits)
    assert got.counts.keys() == ref.counts.keys()
    for name in ref.counts:
        assert np.array_equal(got.counts[name], ref.counts[name]), name
    assert got.trains == {}


# -- neurons -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("delay", "train", "peak"), [
    (0, [0, 1, 1, 1, 0], 6),  # v: 3, 6->2, 5->1, 4->0, 3
    (2, [1, 1, 1, 0, 0], 9),  # v: 3, 6, 9->5, 8->4, 7->3, then 3 stays below 4
])
def test_dif_neuron_hand_computed(delay: int, train: list[int], peak: int) -> None:
    net = Network(5)
    net.add("in", Encode((1,), 1.0, 0, 10))
    net.add("n", neuron((1,), 4, delay), ["in"])
    readout_net(net, "n", classes=1)
    res = BACKEND.run(net, np.array([[3.0]], dtype=np.float32), keep_trains=True)
    assert res.trains["n"][0, :, 0].tolist() == train
    assert res.stats["n"].max_abs_v == peak
    assert res.stats["n"].spikes == 3 and res.stats["n"].neurons == 1


def test_negative_bias() -> None:
    # current 5 per step, bias -2, threshold 3, v0 = 1: v = 4->1, 4->1, ... one spike per step;
    # a second neuron gets bias -6: v = 0, -1, -2, -3, never fires.
    net = Network(4)
    net.add("in", Encode((2,), 1.0, 0, 10))
    net.add("n", Neuron(np.array([3, 3]), np.array([1, 1]), np.array([-2, -6]), 0), ["in"])
    readout_net(net, "n")
    x = np.array([[5.0, 5.0]], dtype=np.float32)
    res = BACKEND.run(net, x, keep_trains=True)
    assert res.trains["n"][0].tolist() == [[1, 0], [1, 0], [1, 0], [1, 0]]
    assert res.stats["n"].max_abs_v == 4
    assert_same_as_steps(net, x)


@pytest.mark.parametrize(("delay", "train"), [(0, [0, 1, 0, 0]), (4, [0, 0, 0, 0])])
def test_late_negative_input_unevenness(delay: int, train: list[int]) -> None:
    # "early" fires every step (bias 1, threshold 1); "late" only at step 3 (bias 1, threshold 3).
    # The target gets +1 per step and -3 at step 3: v = 1, 2 -> fires at D = 0, then -2, -1;
    # with D >= T it sees the total 4 - 3 = 1 < 2 first and never fires (SPEC 2.2).
    net = Network(4)
    net.add("in", Encode((1,), 1.0, 0, 1))
    net.add("early", neuron((1,), 1, 0, bias=1), ["in"])
    net.add("late", neuron((1,), 3, 0, bias=1), ["in"])
    net.add("w_early", DiagonalSynapse(np.array([1])), ["early"])
    net.add("w_late", DiagonalSynapse(np.array([-3])), ["late"])
    net.add("sum", Add(), ["w_early", "w_late"])
    net.add("n", neuron((1,), 2, delay), ["sum"])
    readout_net(net, "n", classes=1)
    x = np.zeros((1, 1), dtype=np.float32)
    res = BACKEND.run(net, x, keep_trains=True)
    assert res.trains["late"][0, :, 0].tolist() == [0, 0, 1, 0]
    assert res.trains["n"][0, :, 0].tolist() == train
    assert_same_as_steps(net, x)


@pytest.mark.parametrize("delay", [0, 1, 3, 5, 6, 1000])
def test_delay_sweep_against_references(delay: int) -> None:
    T = 5
    net, s = spiking_input((3, 4, 4), T, delay=1)
    net.add("d", DiagonalSynapse(np.arange(48).reshape(3, 4, 4) % 7 - 3), [s])
    net.add("n", neuron((3, 4, 4), 2, delay, v0=1, bias=-1), ["d"])
    readout_net(net, "n")
    x = random_x((3, 4, 4), 4)
    assert_same_as_steps(net, x)
    if delay >= T:
        exact = net.with_delay(delay)
        assert np.array_equal(BACKEND.run(exact, x).readout, run_counts(exact, x).readout)


# -- synapses and pools -------------------------------------------------------------------------
CONV_CASES = {
    "plain": {"out": 3, "cin": 2, "k": (3, 3)},
    "stride2": {"out": 3, "cin": 2, "k": (3, 3), "stride": (2, 2)},
    "asym_pad": {"out": 2, "cin": 2, "k": (3, 2), "stride": (2, 1), "padding": (0, 2, 1, 0)},
    "dilation": {"out": 2, "cin": 2, "k": (2, 3), "dilation": (2, 1), "padding": (1, 1, 1, 1)},
    "groups": {"out": 4, "cin": 4, "k": (3, 3), "groups": 2, "padding": (1, 1, 1, 1)},
    "depthwise": {"out": 4, "cin": 4, "k": (2, 2), "groups": 4, "stride": (2, 2), "padding": (1, 0, 0, 1)},
}


def conv_op(case: dict, seed: int = 1) -> ConvSynapse:
    g = case.get("groups", 1)
    w = np.random.default_rng(seed).integers(-3, 4, (case["out"], case["cin"] // g, *case["k"]))
    return ConvSynapse(w, case.get("stride", 1), case.get("padding", 0), case.get("dilation", 1), g)


@pytest.mark.parametrize("case", list(CONV_CASES), ids=list(CONV_CASES))
def test_conv_on_spikes_and_acs(case: str) -> None:
    c = CONV_CASES[case]
    net, s = spiking_input((c["cin"], 7, 6), 4)
    op = conv_op(c)
    net.add("conv", op, [s])
    net.add("n", neuron(net.info("conv").shape, 3, 2, v0=1), ["conv"])
    readout_net(net, "n")
    x = random_x((c["cin"], 7, 6), 3)
    assert_same_as_steps(net, x)
    # ACs, computed independently: a convolution with all-one weights counts, per output,
    # the (spike, tap) pairs reaching it; summed over outputs = sum over spikes of fan-out.
    res = BACKEND.run(net, x, keep_trains=True)
    spikes = res.trains[s].reshape(-1, c["cin"], 7, 6)
    ones = ConvSynapse(np.ones_like(op.weight), op.stride, op.padding, op.dilation, op.groups)
    assert res.stats["conv"].acs == int(conv(ones, spikes).sum()) > 0
    assert res.stats["conv"].macs == 0


@pytest.mark.parametrize("case", ["stride2", "asym_pad", "groups"])
def test_conv_on_encoded_input_counts_macs_once(case: str) -> None:
    c = CONV_CASES[case]
    T = 3
    net = Network(T)
    net.add("in", Encode((c["cin"], 5, 6), 0.5, -2, 5))
    op = conv_op(c)
    net.add("conv", op, ["in"])
    net.add("n", neuron(net.info("conv").shape, 4, 0), ["conv"])
    readout_net(net, "n")
    x = random_x((c["cin"], 5, 6), 2, seed=3)
    x[:, 0] = 0.0
    assert_same_as_steps(net, x)
    res = BACKEND.run(net, x)
    levels = encode(net.op("in"), x)
    ones = ConvSynapse(np.ones_like(op.weight), op.stride, op.padding, op.dilation, op.groups)
    assert res.stats["conv"].macs == int(conv(ones, (levels != 0).astype(np.int64)).sum())  # once, not T times
    assert res.stats["conv"].acs == 0


def test_dense_acs_and_macs() -> None:
    T = 4
    net = Network(T)
    net.add("in", Encode((2, 6), 1.0, 0, 3))
    net.add("fc1", DenseSynapse(np.arange(30).reshape(5, 6) % 4 - 1), ["in"])  # over the last axis
    net.add("n1", neuron((2, 5), 2, 1), ["fc1"])
    net.add("fc2", DenseSynapse(np.arange(15).reshape(3, 5) % 5 - 2), ["n1"])
    net.add("n2", neuron((2, 3), 1, 0), ["fc2"])
    readout_net(net, "n2")
    x = random_x((2, 6), 3, seed=5)
    assert_same_as_steps(net, x)
    res = BACKEND.run(net, x, keep_trains=True)
    levels = np.clip(np.rint(x), 0, 3)
    assert res.stats["fc1"].macs == int(np.count_nonzero(levels)) * 5
    assert res.stats["fc2"].acs == int(res.trains["n1"].sum()) * 3 > 0
    assert res.stats["fc_out"].acs == int(res.trains["n2"].sum()) * 2
    assert res.stats["n1"].spikes == int(res.counts["n1"].sum()) and res.stats["n1"].neurons == 10
    assert set(res.stats) == {"fc1", "n1", "fc2", "n2", "fc_out"}  # populations and synapses only


def test_ternary_spikes_of_both_signs_count_as_spikes_and_acs() -> None:
    """A ternary population's -1 spikes are spikes (energy) and each reaches its targets (one AC
    per target, a subtraction): conv (one group: conv_spikes_rows; grouped: conv_spikes), dense,
    diagonal and SpikeMatMul."""
    net = Network(4)
    net.add("in", Encode((2, 3, 3), 1.0, -4, 4))
    net.add("c0", ConvSynapse(np.array([[[[1, -1], [2, 1]]], [[[-2, 1], [1, -1]]]]), padding=(1, 1, 0, 0), groups=2),
            ["in"])
    net.add("t", TernaryNeuron(np.full((2, 3, 3), 3), np.full((2, 3, 3), 1), np.zeros((2, 3, 3), int), 1), ["c0"])
    net.add("c1", ConvSynapse(np.arange(16).reshape(2, 2, 2, 2) % 5 - 2), ["t"])  # -> (2, 2, 2)
    net.add("c2", ConvSynapse(np.array([[[[1, 2], [-1, 1]]], [[[2, -2], [1, 1]]]]), groups=2), ["t"])  # -> (2, 2, 2)
    net.add("n3", neuron((2, 2, 2), 2, 0), [net.add("sum", Add(), ["c1", "c2"])])
    net.add("dg", DiagonalSynapse(np.full((2, 3, 3), -3)), ["t"])
    net.add("n1", neuron((2, 3, 3), 2, 1), ["dg"])
    net.add("mm", SpikeMatMul(1), ["t", "n1"])  # (2, 3, 3) x (2, 3, 3)
    net.add("n4", neuron((2, 3, 3), 5, 0), ["mm"])
    heads = []
    for src in ("t", "n3", "n4"):
        flat = net.add(f"{src}_flat", Reshape((int(np.prod(net.info(src).shape)),)), [src])
        heads.append(net.add(f"{src}_fc", DenseSynapse(np.arange(2 * net.info(flat).shape[0]).reshape(2, -1) % 3 - 1),
                             [flat]))
    net.add("out", Readout(np.ones(2), np.zeros(2)), [net.add("logits", Add(), heads)])
    x = random_x((2, 3, 3), 3, seed=2) * 2 - 3
    assert_same_as_steps(net, x)
    res = BACKEND.run(net, x, keep_trains=True)
    train = res.trains["t"]
    assert train.dtype == np.int8 and (train < 0).any() and (train > 0).any()
    spikes = np.abs(train.astype(np.int64)).sum(axis=(0, 1))  # (2, 3, 3): spikes of both signs per element
    assert res.stats["t"].spikes == int(spikes.sum()) and np.array_equal(res.counts["t"], train.sum(axis=1))
    assert res.stats["t_fc"].acs == 2 * int(spikes.sum())
    assert res.stats["dg"].acs == int(spikes.sum())
    assert res.stats["mm"].acs == 3 * int(spikes.sum()) + 3 * int(res.trains["n1"].sum())
    reach = np.outer([1, 2, 1], [1, 2, 1])  # 2 x 2 taps that reach an output from a 3 x 3 input pixel
    assert res.stats["c1"].acs == int((spikes * reach).sum()) * 2  # 2 output channels
    assert res.stats["c2"].acs == int((spikes * reach).sum())  # one output channel per group


@pytest.mark.parametrize("op", [
    SpikeMaxPool((3, 2), (2, 1), (1, 0, 2, 1)),  # general windows
    SpikeMaxPool((2, 2), (2, 2), (0, 0, 1, 1)),  # the unrolled 2 x 2 path
    SpikeMaxPool((2, 2), (1, 2), (1, 1, 0, 0)),  # 2 x 2, overlapping rows, padding on top and left
    SpikeMaxPool((2, 2), (2, 2)),  # 2 x 2 without padding: running counts updated in one flat loop
    SpikeMaxPool((3, 3), (1, 1)),  # general windows without padding
], ids=["3x2", "2x2", "2x2_overlap_pad", "2x2_unpadded", "3x3_unpadded"])
def test_spike_max_pool_with_padding_is_max_of_counts(op: SpikeMaxPool) -> None:
    T = 6
    net, s = spiking_input((2, 5, 5), T)
    net.add("mp", op, [s])
    readout_net(net, "mp")
    x = random_x((2, 5, 5), 3, seed=7)
    assert_same_as_steps(net, x)
    res = BACKEND.run(net, x, keep_trains=True)
    assert np.array_equal(res.counts["mp"], max_pool(op, res.counts[s]))
    assert res.trains["mp"].max() <= 1
    assert res.stats["mp"].acs == 0 and res.stats["mp"].neurons == int(np.prod(net.info("mp").shape))


def test_sum_pool_current_feeds_dense_and_routing() -> None:
    T = 3
    net, s = spiking_input((2, 4, 5), T)
    net.add("sp", SumPool((2, 2), (2, 2), (1, 1, 0, 0)), [s])  # current (2, 2, 3)
    net.add("tr", Transpose((1, 2, 0)), ["sp"])  # current (2, 3, 2)
    net.add("fc", DenseSynapse(np.array([[1, -1], [2, 1]])), ["tr"])  # a non-encoded current: MACs
    net.add("n", neuron((2, 3, 2), 2, 1), ["fc"])
    readout_net(net, "n")
    x = random_x((2, 4, 5), 3, seed=11)
    assert_same_as_steps(net, x)
    res = BACKEND.run(net, x)
    assert "sp" not in res.stats and res.stats["fc"].macs > 0  # pools and routing do no synaptic work


def test_residual_add_of_constant_and_spike_currents() -> None:
    T = 4
    net, s = spiking_input((6,), T)
    net.add("diag", DiagonalSynapse(np.array([1, -2, 3, 1, 1, -1])), [s])
    net.add("res", Add(), ["diag", "in"])  # time-varying + constant current
    net.add("n", neuron((6,), 3, 2), ["res"])
    readout_net(net, "n")
    x = random_x((6,), 4, seed=13)
    assert_same_as_steps(net, x)
    res = BACKEND.run(net, x, keep_trains=True)
    assert res.stats["diag"].acs == int(res.trains[s].sum())


@pytest.mark.parametrize("weight", [1, -3])
def test_spike_matmul_attention_shapes_and_acs(weight: int) -> None:
    T = 5
    net, s = spiking_input((2, 3, 4), T)  # heads, tokens, width
    net.add("kt", Transpose((0, 2, 1)), [s])  # (2, 4, 3)
    net.add("qk", SpikeMatMul(weight), [s, "kt"])  # (2, 3, 3)
    net.add("a", neuron((2, 3, 3), 4, T), ["qk"])
    net.add("av", SpikeMatMul(1), ["a", s])  # (2, 3, 4)
    net.add("o", neuron((2, 3, 4), 3, 1), ["av"])
    readout_net(net, "o")
    x = random_x((2, 3, 4), 3, seed=19)
    assert_same_as_steps(net, x)
    res = BACKEND.run(net, x, keep_trains=True)
    # each left spike adds a row of N counts, each right spike a column of M counts
    spikes = int(res.trains[s].sum())
    assert res.stats["qk"].acs == spikes * 3 + spikes * 3
    assert res.stats["av"].acs == int(res.trains["a"].sum()) * 4 + spikes * 3
    exact = net.with_delay(T)
    assert np.array_equal(BACKEND.run(exact, x).readout, run_counts(exact, x).readout)


@pytest.mark.parametrize("signed", [False, True], ids=["binary", "ternary"])
def test_dense_synapses_on_the_same_spikes_run_as_one_group(signed: bool) -> None:
    """Q, K and V-like projections of the same spikes share one gather and one pass of adds
    (DenseGroupStep); a different width or weight type stays on its own. Outputs, spikes and
    per-node ACs as for separate nodes; ternary spikes (split into +1 and -1 once) too."""
    T = 4
    net, s = spiking_input((3, 6), T)  # tokens x width
    if signed:  # the same, from ternary neurons on inputs in [-3, 3]
        net = Network(T)
        net.add("in", Encode((3, 6), 1.0, -3, 3))
        s = net.add("s", TernaryNeuron(*(np.full((3, 6), v) for v in (2, 1, -1)), 1), ["in"])
    rng = np.random.default_rng(29)
    ws = {"q": rng.integers(-3, 4, (5, 6)), "k": rng.integers(-3, 4, (5, 6)), "v": rng.integers(-3, 4, (5, 6)),
          "wide": rng.integers(-3, 4, (4, 6)), "big": rng.integers(-3, 4, (5, 6)) * 1000 + 1}
    for name, w in ws.items():
        net.add(name, DenseSynapse(w), [s])
        net.add(f"n_{name}", neuron(net.info(name).shape, 3, 2), [name])
    net.add("kt", Transpose((1, 0)), ["n_k"])
    net.add("qk", SpikeMatMul(1), ["n_q", "kt"])  # (3, 3)
    net.add("a", neuron((3, 3), 2, 1), ["qk"])
    net.add("av", SpikeMatMul(1), ["a", "n_v"])  # (3, 5)
    net.add("o", neuron((3, 5), 2, 1), ["av"])
    tails = []
    for src in ("o", "n_wide", "n_big"):
        net.add(f"f_{src}", Reshape((math.prod(net.info(src).shape),)), [src])
        tails.append(net.add(f"d_{src}", DenseSynapse(np.ones((2, math.prod(net.info(src).shape)), dtype=np.int64)),
                             [f"f_{src}"]))
    net.add("sum", Add(), tails)
    net.add("out", Readout(np.ones(2), np.zeros(2)), ["sum"])
    prog = NumbaBackend()._program(net)
    names = [p.name for p in prog.nodes]
    assert [[names[i] for i in g] for g in prog.group.values()] == [["q", "k", "v"]]
    x = random_x((3, 6), 3, seed=31) * (2 if signed else 1) - (3 if signed else 0)
    assert_same_as_steps(net, x)
    res = BACKEND.run(net, x, keep_trains=True)
    assert (res.trains[s] < 0).any() == signed
    for name, w in ws.items():
        assert res.stats[name].acs == int(np.abs(res.trains[s].astype(np.int64)).sum()) * w.shape[0] > 0


def test_conv_kernel_choice() -> None:
    """One group with column stride and dilation 1 scatters whole kernel rows
    (``conv_spikes_rows``, reversed taps); the other cases use ``conv_spikes``. Both are
    checked against the references by test_conv_on_spikes_and_acs."""
    for case, rows in [("plain", True), ("asym_pad", True), ("dilation", True), ("stride2", False),
                       ("groups", False), ("depthwise", False)]:
        c = CONV_CASES[case]
        net, s = spiking_input((c["cin"], 7, 6), 4)
        net.add("conv", conv_op(c), [s])
        net.add("n", neuron(net.info("conv").shape, 3, 2, v0=1), ["conv"])
        readout_net(net, "n")
        step = {p.name: p.step for p in plan(net)}["conv"]
        assert step.rows is rows, case
        if rows:  # w_r[c, ky, (kw - 1 - kx) * O + o] = weight[o, c, ky, kx]
            w = net.op("conv").weight
            o, _, _, kw = w.shape
            expect = w.transpose(1, 2, 3, 0)[:, :, ::-1, :].reshape(w.shape[1], w.shape[2], kw * o)
            assert np.array_equal(step.w_r * step.scale, expect)


def test_spike_matmul_int32_partial_products() -> None:
    """K x T >= 2^15: counts and partial products in int32 (int16 would wrap: every spike
    fires, so the last step's product is 7 K = 70000 per output)."""
    T, K = 4, 10_000
    net = Network(T)
    net.add("in", Encode((1, K), 1.0, 0, 3))
    net.add("s", neuron((1, K), 2, 0, v0=1), ["in"])  # input 3 per step: a spike every step
    net.add("st", Transpose((1, 0)), ["s"])
    net.add("qk", SpikeMatMul(1), ["s", "st"])  # (1, 1)
    net.add("n", neuron((1, 1), 1000, 0), ["qk"])
    readout_net(net, "n", classes=1)
    assert {p.name: p.step for p in plan(net)}["qk"].proto.dtype == np.int32
    x = np.full((2, 1, K), 3.0, dtype=np.float32)
    res = BACKEND.run(net, x, keep_trains=True)
    assert res.trains["s"].all()
    assert_same_as_steps(net, x)
    assert res.counts["n"][0, 0, 0] == min(T, sum(K * (2 * t - 1) for t in range(1, T + 1)) // 1000)


@pytest.mark.parametrize("perm", [(1, 0), (0, 2, 1), (1, 0, 2), (2, 0, 1), (1, 2, 0), (2, 1, 0), (3, 1, 0, 2)])
def test_transpose_of_spikes(perm: tuple[int, ...]) -> None:
    """Transposes up to three element axes are copied by kernels.permute, more by numpy."""
    shape = (2, 3, 4, 5)[:len(perm)]
    net, s = spiking_input(shape, 3)
    net.add("tr", Transpose(perm), [s])
    shape_t = tuple(shape[p] for p in perm)
    net.add("d", DiagonalSynapse(np.ones(shape_t, dtype=np.int64)), ["tr"])
    net.add("n", neuron(shape_t, 1, 0), ["d"])  # fires exactly when its input does
    readout_net(net, "n")
    x = random_x(shape, 3, seed=23)
    assert_same_as_steps(net, x)
    res = BACKEND.run(net, x, keep_trains=True)
    assert np.array_equal(res.trains["n"], res.trains[s].transpose(0, 1, *(p + 2 for p in perm)))


def test_large_weights_use_int64_currents() -> None:
    T = 3
    net, s = spiking_input((4,), T)
    big = 2**40
    net.add("fc", DenseSynapse(np.array([[big, big, -big, 1], [3, 2, 1, 0]])), [s])
    net.add("n", Neuron(np.array([big, 2]), np.array([0, 0]), np.array([0, 0]), 1), ["fc"])
    readout_net(net, "n")
    assert_same_as_steps(net, random_x((4,), 3))


# -- batching, API, cache -----------------------------------------------------------------------
def test_batch_equals_per_sample_and_chunking() -> None:
    net, s = spiking_input((2, 6, 6), 4, delay=2)
    net.add("conv", conv_op(CONV_CASES["groups"] | {"cin": 2, "out": 4}), [s])
    net.add("n", neuron((4, 6, 6), 3, 1), ["conv"])
    readout_net(net, "n", classes=3)
    x = random_x((2, 6, 6), 9, seed=17)
    whole = BACKEND.run(net, x, keep_trains=True)
    chunked = NumbaBackend(memory_budget=1).run(net, x, keep_trains=True)  # one sample per chunk
    singles = [BACKEND.run(net, x[i:i + 1], keep_trains=True) for i in range(len(x))]
    for res in (chunked, *singles):
        assert res.stats["n"].max_abs_v <= whole.stats["n"].max_abs_v
    assert chunked.stats == whole.stats
    assert sum(r.stats["conv"].acs for r in singles) == whole.stats["conv"].acs
    assert np.array_equal(np.concatenate([r.readout for r in singles]), whole.readout)
    assert np.array_equal(chunked.readout, whole.readout)
    for name in whole.trains:
        assert np.array_equal(np.concatenate([r.trains[name] for r in singles]), whole.trains[name])
        assert np.array_equal(chunked.trains[name], whole.trains[name])


def test_registry_and_input_checks() -> None:
    assert isinstance(get_backend("numba"), NumbaBackend)
    net, s = spiking_input((3,), 2)
    readout_net(net, s)
    with pytest.raises(DataError, match="expects"):
        BACKEND.run(net, np.zeros((2, 4), dtype=np.float32))
    empty = BACKEND.run(net, np.zeros((0, 3), dtype=np.float32))
    assert empty.readout.shape == (0, 2) and empty.counts[s].shape == (0, 3)


def all_kernels_net() -> tuple[Network, np.ndarray]:
    """A small network that needs every kernel (each in one dtype specialization)."""
    net = Network(3)
    net.add("in", Encode((2, 5, 5), 1.0, 0, 4))
    net.add("c0", ConvSynapse(np.ones((2, 2, 3, 3), int), 1, 1), ["in"])
    net.add("n0", neuron((2, 5, 5), 5, 1), ["c0"])
    net.add("mp", SpikeMaxPool((2, 2), (1, 1), (0, 0, 1, 1)), ["n0"])
    net.add("sp", SumPool((2, 2), (1, 1)), ["mp"])
    net.add("c1", ConvSynapse(np.ones((2, 2, 2, 2), int)), ["sp"])
    net.add("n1", neuron((2, 3, 3), 3, 0), ["c1"])
    net.add("mm", SpikeMatMul(1), ["mp", "n0"])  # (2, 5, 5) x (2, 5, 5)
    net.add("n3", neuron((2, 5, 5), 4, 0), ["mm"])
    net.add("c2", ConvSynapse(np.ones((2, 2, 4, 4), int)), ["n3"])
    net.add("c3", ConvSynapse(np.ones((2, 1, 2, 2), int), groups=2), ["n1"])  # grouped: conv_spikes
    net.add("sum", Add(), ["c2", "c3"])
    net.add("f", Reshape((2, 4)), ["sum"])
    net.add("n2", neuron((2, 4), 2, 0), ["f"])
    net.add("dg", DiagonalSynapse(np.ones((2, 4), int)), ["n2"])
    net.add("n4", neuron((2, 4), 1, 0), ["dg"])
    net.add("tr", Transpose((1, 0)), ["n4"])
    net.add("f2", Reshape((8,)), ["tr"])
    net.add("d", DenseSynapse(np.ones((3, 8), int)), ["f2"])
    net.add("d1", DenseSynapse(np.ones((3, 3), int)), ["d"])
    net.add("t", TernaryNeuron(*(np.full((2, 4), v) for v in (2, 1, -1)), 0), ["f"])  # signed spikes
    net.add("mt", SpikeMatMul(1), ["t", "tr"])  # (2, 4) x (4, 2): spike_matmul_signed
    net.add("ft", Reshape((4,)), ["mt"])
    net.add("n5", neuron((4,), 2, 0), ["ft"])
    net.add("d2", DenseSynapse(np.ones((3, 4), int)), ["n5"])
    net.add("sum2", Add(), ["d1", "d2"])
    th = np.array([[2, 1]])
    net.add("mbe", MBENeuron(th, th, th, np.zeros(1, np.int64), np.zeros(3, np.int64)), ["sum2"])  # mbe_neurons
    net.add("out", Readout(np.ones(3), np.zeros(3)), ["mbe"])
    return net, random_x((2, 5, 5), 2)


def test_second_process_reuses_the_kernel_cache(tmp_path: Path) -> None:
    """A run (here, in this process) fills numba's cache; a new process with the same
    ``NUMBA_CACHE_DIR`` sees it and compiles nothing, one with an empty cache does not."""
    probe = "from csdc.backends.numba import kernels_cached; print(kernels_cached())"
    fresh = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}, check=True)
    assert fresh.stdout.split() == ["False"]
    BACKEND.run(*all_kernels_net())
    assert kernels_cached()
    child = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})
from test_numba import BACKEND, all_kernels_net
from csdc.backends.numba import kernels_cached
from csdc.backends.numba.kernels import KERNELS
before = kernels_cached()
BACKEND.run(*all_kernels_net())
misses = sum(sum(k.stats.cache_misses.values()) for k in KERNELS)
hits = sum(sum(k.stats.cache_hits.values()) for k in KERNELS)
print(before, misses, hits)
"""
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ), check=True)
    before, misses, hits = out.stdout.split()
    assert before == "True" and misses == "0" and int(hits) == len(KERNELS)


@pytest.mark.slow
def test_first_run_fills_the_cache_for_every_kernel(tmp_path: Path) -> None:
    """A first run that needs only some kernels still leaves every kernel cached, so that
    the next ``csdc run`` does not announce (or do) a compile."""
    child = """
import numpy as np
from csdc.backends.numba import NumbaBackend, kernels_cached
from csdc.backends.numba.backend import plan
from csdc.ir import DenseSynapse, Encode, Network, Neuron, Readout
net = Network(2)
net.add("in", Encode((3,), 1.0, 0, 3))
net.add("n", Neuron(np.full(3, 2), np.ones(3, int), np.zeros(3, int), 1), ["in"])
net.add("d", DenseSynapse(np.ones((2, 3), int)), ["n"])
net.add("out", Readout(np.ones(2), np.zeros(2)), ["d"])
before = kernels_cached()
NumbaBackend().run(net, np.ones((2, 3), np.float32))
print(before, kernels_cached())
"""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=600, env=env, check=True)
    assert out.stdout.split() == ["False", "True"]
