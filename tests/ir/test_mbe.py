"""The MBE neuron (docs/mbe.md): the integer successive-approximation encoder's exact
characterisation, the count-domain and time-stepped semantics, the numba kernel against them,
verification, bit widths, latency and the reports."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csdc.backends.numba import NumbaBackend
from csdc.compiler.bitwidth import analyze_bitwidth
from csdc.compiler.pipeline import latency
from csdc.errors import IRError
from csdc.ir import DenseSynapse, Encode, MBENeuron, Network, Neuron, Readout
from csdc.ir.semantics import mbe_output_steps, mbe_spikes, mbe_total, run_counts, run_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from strategies import inputs_for  # noqa: E402

PROPERTY = settings(max_examples=200, deadline=None)


def sar(top: int, steps: int) -> np.ndarray:
    """Thresholds 2^(top-1), 2^(top-2), ... of a successive-approximation basis (halving every step)."""
    return np.array([[2 ** (top - t) for t in range(1, steps + 1)]])


# -- the encoder's exact integer characterisation ------------------------------------------------
@PROPERTY
@given(st.integers(1, 12), st.data())
def test_successive_approximation_basis_is_a_floor_to_its_resolution(steps: int, data) -> None:
    """threshold = reset = weight = 2^(m-t), t = 1..S (m >= S): the spikes are the S leading binary
    digits of clip(u, 0, 2^m - 1) and the decoded value is that number with its m - S trailing
    digits cleared: ``2^(m-S) floor(clip(u, 0, 2^m - 1) / 2^(m-S))``."""
    m = data.draw(st.integers(steps, steps + 6))
    u = np.array(data.draw(st.lists(st.integers(-2**(m + 1), 2**(m + 1)), min_size=1, max_size=20)), dtype=np.int64)
    th = sar(m, steps)
    op = MBENeuron(th, th, th, np.zeros(1, np.int64), np.zeros((), np.int64))
    spikes = mbe_spikes(op, u)[:, :, 0]  # (batch, S)
    clipped = np.clip(u, 0, 2**m - 1)
    digits = (clipped[:, None] >> (m - np.arange(1, steps + 1))) & 1
    assert np.array_equal(spikes, digits)
    assert np.array_equal(mbe_total(op, u), (clipped >> (m - steps)) << (m - steps))


@PROPERTY
@given(st.integers(1, 6), st.integers(1, 8), st.data())
def test_decoded_value_is_the_weighted_spike_count(bases: int, steps: int, data) -> None:
    """Any integer parameters: the window's output is sum_{n,t} s_n(t) weight[n, t], the output
    current of step t carries the step's spikes, and steps after S are silent."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    th = rng.integers(1, 40, size=(bases, steps))
    op = MBENeuron(th, rng.integers(0, 40, size=(bases, steps)), rng.integers(-9, 10, size=(bases, steps)),
                   rng.integers(-20, 20, size=bases), rng.integers(-5, 6, size=(3,)))
    total = rng.integers(-60, 60, size=(4, 3))
    spikes = mbe_spikes(op, total)  # (batch, S, K, 3)
    T = steps + data.draw(st.integers(0, 3))
    cur = mbe_output_steps(op, total, T)
    assert np.array_equal(cur[:, :steps], np.einsum("bskn,ks->bsn", spikes, op.weight))
    assert not cur[:, steps:].any()
    assert np.array_equal(mbe_total(op, total), cur.sum(axis=1))
    # u never rises: a basis that did not fire at step t saw u below threshold[n, t]
    u = (total + op.v0)[:, None] + op.offset[None, :, None]
    for t in range(steps):
        fire = u >= op.threshold[:, t][None, :, None]
        assert np.array_equal(fire, spikes[:, t].astype(bool))
        u = u - fire * op.reset[:, t][None, :, None]


# -- the numba kernel against the semantics --------------------------------------------------------
def mbe_net(T: int, op: MBENeuron, lo: int = -6, hi: int = 6, constant: bool = False) -> Network:
    """Encode -> [dense] -> MBE -> neuron (D = T) -> dense -> readout, on 5 elements."""
    net = Network(T)
    net.add("in", Encode((5,), 1.0, lo, hi))
    src = "in"
    if not constant:
        net.add("fc", DenseSynapse(np.array([[1, 0, 0, 0, 0], [0, 2, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, -3, 1],
                                             [1, -1, 1, -1, 1]], dtype=np.int8)), ["in"])
        net.add("act0", Neuron(np.full(5, 2), np.full(5, 1), np.zeros(5, np.int64), 0), ["fc"])
        net.add("fc1", DenseSynapse(np.eye(5, dtype=np.int8) * 3), ["act0"])
        src = "fc1"
    net.add("mbe", op, [src])
    net.add("act", Neuron(np.full(5, 3), np.full(5, 1), np.zeros(5, np.int64), T), ["mbe"])
    net.add("head", DenseSynapse(np.eye(5, dtype=np.int8)), ["act"])
    net.add("out", Readout(np.ones(5), np.zeros(5)), ["head"])
    net.verify()
    return net


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 6), st.integers(1, 4), st.booleans(), st.data())
def test_numba_kernel_equals_the_semantics(T: int, bases: int, constant: bool, data) -> None:
    """Random MBE populations fed by a time-varying or a constant current: numba's output currents
    (seen through the neuron behind it), spikes, ACs and largest |u| equal the semantics."""
    steps = data.draw(st.integers(1, T))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    op = MBENeuron(rng.integers(1, 12, size=(bases, steps)), rng.integers(0, 12, size=(bases, steps)),
                   rng.integers(-5, 8, size=(bases, steps)), rng.integers(-8, 8, size=bases),
                   rng.integers(-4, 5, size=5))
    net = mbe_net(T, op, constant=constant)
    x = np.random.default_rng(T).uniform(-8, 8, size=(3, 5)).astype(np.float32)
    ref = run_steps(net, x, currents=True)
    got = NumbaBackend().run(net, x, keep_trains=True)
    assert np.array_equal(got.readout, ref.readout)
    for name in ref.trains:
        assert np.array_equal(got.trains[name], ref.trains[name]), name
    st_ = got.stats["mbe"]
    assert st_.spikes == int(ref.mbe_spikes["mbe"].sum()) == st_.acs
    assert st_.neurons == 5 * bases
    # the largest |u|: initial values and every value after a step
    total = ref.currents[net.inputs("mbe")[0]].sum(axis=1)
    u = (total + op.v0)[:, None] + op.offset[None, :, None]
    peak = int(np.abs(u).max())
    for t in range(steps):
        u = u - (u >= op.threshold[:, t][None, :, None]) * op.reset[:, t][None, :, None]
        peak = max(peak, int(np.abs(u).max()))
    assert st_.max_abs_v == peak
    # with every delay >= T the count-domain reference agrees too
    exact = net.with_delay(T)
    assert np.array_equal(run_counts(exact, x).readout, NumbaBackend().run(exact, x).readout)


def test_hand_computed_encoding() -> None:
    """u = 5 + 6 = 11 on a 4-step SAR basis of thresholds 8, 4, 2, 1: spikes 1, 0, 1, 1 (11 = 0b1011)
    at output steps 1, 3, 4; weights 10, 20, 30, 40 give currents 10, 0, 30, 40 and nothing at step 5."""
    th = np.array([[8, 4, 2, 1]])
    op = MBENeuron(th, th, np.array([[10, 20, 30, 40]]), np.array([6]), np.array([5]))
    cur = mbe_output_steps(op, np.array([[0]]), 5)
    assert cur[0, :, 0].tolist() == [10, 0, 30, 40, 0]


# -- verification, bit widths, latency, reports ---------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"threshold": np.array([[2, 0]])}, "thresholds must be >= 1"),
    ({"reset": np.array([[1, -1]])}, "resets must be >= 0"),
    ({"weight": np.array([[1, 2, 3]])}, "shapes differ"),
    ({"offset": np.array([1, 2])}, "one entry per basis"),
    ({"threshold": np.ones((1, 65), np.int64)}, "1..64 steps"),
    ({"weight": np.array([[2**50, 1]])}, r"within \+-2\^47"),
    ({"threshold": np.array([[1.5, 2]])}, "integer array"),
])
def test_bad_parameters_are_refused_by_name(kwargs: dict, message: str) -> None:
    args = {"threshold": np.array([[2, 1]]), "reset": np.array([[2, 1]]), "weight": np.array([[2, 1]]),
            "offset": np.array([0]), "v0": np.zeros(5, np.int64)}
    args.update(kwargs)
    if "threshold" in kwargs and kwargs["threshold"].shape[1] == 65:
        args.update(reset=np.ones((1, 65), np.int64), weight=np.ones((1, 65), np.int64))
    with pytest.raises(IRError, match=message):
        MBENeuron(**args)


def test_more_encoding_steps_than_the_window_and_wrong_shapes_are_refused() -> None:
    th = np.ones((1, 4), np.int64)
    op = MBENeuron(th, th, th, np.zeros(1, np.int64), np.zeros(5, np.int64))
    with pytest.raises(IRError, match=r"4 encoding steps do not fit the network's window T=3"):
        mbe_net(3, op)
    net = Network(4)
    net.add("in", Encode((5,), 1.0, 0, 1))
    with pytest.raises(IRError, match="MBENeuron v0 has shape"):
        net.add("m", MBENeuron(th, th, th, np.zeros(1, np.int64), np.zeros(4, np.int64)), ["in"])


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 5), st.data())
def test_bit_widths_bound_the_measured_potential_and_currents(T: int, data) -> None:
    steps = data.draw(st.integers(1, T))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    op = MBENeuron(rng.integers(1, 30, size=(2, steps)), rng.integers(0, 30, size=(2, steps)),
                   rng.integers(-50, 50, size=(2, steps)), rng.integers(-30, 30, size=2), rng.integers(-9, 9, size=5))
    net = mbe_net(T, op)
    rep = analyze_bitwidth(net, "int64").per_node["mbe"]
    got = NumbaBackend().run(net, inputs_for(net, 4, 1))
    assert got.stats["mbe"].max_abs_v < 2 ** (rep["membrane_bits"] - 1)
    assert rep["threshold_bits"] == int(op.threshold.max()).bit_length()
    net.verify_arithmetic()


def test_latency_counts_T_for_an_mbe_population() -> None:
    th = sar(3, 3)
    net = mbe_net(4, MBENeuron(th, th, th, np.zeros(1, np.int64), np.zeros(5, np.int64)))
    # act0 (D), mbe (T), act (D): T + 2 D + T
    assert latency(net, 2) == 4 + 2 * 2 + 4
    assert latency(net, 0) == 8


def test_inspect_and_run_report_mbe_populations(tmp_path: Path, capsys) -> None:
    from csdc.cli import main
    from csdc.ir.serialize import save

    th = sar(4, 3)
    net = mbe_net(4, MBENeuron(th, th, np.array([[5, -3, 2]]), np.array([2]), np.zeros(5, np.int64)))
    sir = tmp_path / "net.sir"
    save(net, sir)
    assert main(["inspect", str(sir)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("mbe "))
    assert "MBENeuron" in row and "1 basis x 3 steps" in row
    data = tmp_path / "data.npz"
    np.savez(data, x=inputs_for(net, 6, 3))
    assert main(["run", str(sir), "--data", str(data), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["per_population"]["mbe"]["op"] == "MBENeuron"
    assert s["per_population"]["mbe"]["neurons"] == 5
    assert s["latency_steps"] == 4 + 2 * 4 + 4  # T + depth x D (the largest delay, 4) + T for the MBE population


def test_the_verifier_proves_every_running_op_integer() -> None:
    """Only Encode and Readout carry floats; a float table smuggled into an op is named."""
    th = sar(3, 3)
    net = mbe_net(4, MBENeuron(th, th, th, np.zeros(1, np.int64), np.zeros(5, np.int64)))
    net.verify()
    object.__setattr__(net.op("mbe"), "weight", th.astype(np.float64))
    with pytest.raises(IRError, match=r"node 'mbe' \(MBENeuron\): weight not integer"):
        net.verify()
