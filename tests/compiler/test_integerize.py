"""The precision policy, its error bound, weight splitting and refusals (csdc.compiler.integerize)."""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx_build import Builder, residual_cnn

from csdc.compiler.bitwidth import PROFILES, HardwareProfile, analyze_bitwidth, bit_widths
from csdc.compiler.frontend import load_qgraph
from csdc.compiler.integerize import (TARGET_LEVELS, Precision, integerize, mantissa_bits, neuron_parameters,
                                      split_mantissa, split_wide_synapses)
from csdc.compiler.lower import lower
from csdc.compiler.pipeline import CompileOptions, canonicalize, compile_onnx
from csdc.errors import BudgetError
from csdc.ir import semantics
from csdc.ir.graph import Network
from csdc.ir.ops import Add, ConvSynapse, DenseSynapse, Encode, Neuron, Readout, Reshape


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(-(2 ** 40), 2 ** 40), min_size=1, max_size=30), st.integers(0, 5), st.integers(2, 12),
       st.lists(st.integers(0, 48), max_size=3))
def test_split_mantissa_is_exact_and_narrow(values, exponent, bits, cuts):
    w = np.array(values, np.int64)
    parts = split_mantissa(w, exponent, bits, tuple(cuts))
    total = sum((m.astype(np.int64) << e for m, e in parts), np.zeros_like(w))
    assert np.array_equal(total, w << exponent)
    for m, e in parts:
        assert mantissa_bits(m) <= bits
        assert np.all(m.astype(np.int64) * np.sign(w) >= 0)  # every part has the sign of its weight
        top = e + int(np.abs(m.astype(np.int64)).max()).bit_length()
        assert not any(e < c < top for c in cuts)  # no part straddles a cut


def _wide_net(rng) -> Network:
    net = Network(4)
    net.add("in", Encode((2, 6, 6), 1 / 16, 0, 16))
    net.add("conv", ConvSynapse(rng.integers(-3000, 3000, (3, 2, 3, 3)), padding=(1, 1, 1, 1), exponent=2), ["in"])
    net.add("n1", Neuron(np.full((3, 6, 6), 40000), np.full((3, 6, 6), 20000), np.zeros((3, 6, 6), np.int64), 4), ["conv"])
    net.add("flat", Reshape((108,)), ["n1"])
    net.add("fc", DenseSynapse(rng.integers(-70000, 70000, (5, 108))), ["flat"])
    net.add("out", Readout(np.full(5, 0.01), np.zeros(5)), ["fc"])
    return net


def test_split_wide_synapses_keeps_every_current():
    rng = np.random.default_rng(0)
    net = _wide_net(rng)
    split, groups = split_wide_synapses(net, 8)
    assert set(groups) == {"conv", "fc"} and all(g >= 2 for g in groups.values())
    assert isinstance(split.op("conv"), Add) and isinstance(split.op("fc"), Add)
    assert analyze_bitwidth(split, HardwareProfile("w8", 8, 24, 40)).weight_bits <= 8
    x = rng.random((8, 2, 6, 6)).astype(np.float32)
    a, b = semantics.run_steps(net, x), semantics.run_steps(split, x)
    assert np.array_equal(a.readout, b.readout)
    assert np.array_equal(a.trains["n1"], b.trains["n1"])
    # bounds of the parts add up to the original's (parts carry the weight's sign): same membrane
    prof = HardwareProfile("wide", 24, 24, 40)
    assert analyze_bitwidth(net, prof).per_node["n1"] == analyze_bitwidth(split, prof).per_node["n1"]


def test_neuron_bound_covers_the_rounding():
    """The bound in levels dominates the actual deviation of V / Theta from x / s for random currents."""
    rng = np.random.default_rng(1)
    step, U, T = 0.3, np.full(1, 0.3 / 37.4), 7
    bias = np.array([0.11])
    p = neuron_parameters(step, U, bias, np.zeros(1), T)
    for _ in range(200):
        V = rng.integers(0, 7 * 40, 50)  # integer currents (exact weights)
        x_over_s = (V * U + bias) / step
        count = np.clip(np.floor_divide(V + T * p.bias + p.v0, p.threshold), 0, T)
        # a count can differ from round(x/s) only within the bound of a tie
        exact = np.clip(np.floor(x_over_s + 0.5), 0, T)
        near_tie = np.abs(x_over_s - np.floor(x_over_s) - 0.5) <= p.bound
        assert np.all((count == exact) | near_tie)
    assert p.bound == pytest.approx(p.weights + p.bias_part + p.threshold_part, rel=1e-9, abs=1e-12) or p.bound <= (
        p.weights + p.bias_part + p.threshold_part)


def test_chosen_precision_meets_the_target_and_reports_it(tmp_path):
    path = tmp_path / "r.onnx"
    onnx.save(residual_cnn(), path)
    net, rep = compile_onnx(path)
    pops = rep.precision["populations"]
    assert set(net.neurons()) <= set(pops)
    assert all(p["bound"] < TARGET_LEVELS for p in pops.values() if not p["readout"])
    assert rep.error_bound == max(p["bound"] for p in pops.values() if not p["readout"]) and rep.error_population in pops
    # a residual sum reads a rescaled branch: its weights add error, and the bound says how much
    assert any(p["weights"] > 0 for p in pops.values())
    # an explicit --frac-bits is the fixed rule of old: thresholds of at least F significant bits
    net8, rep8 = compile_onnx(path, CompileOptions(frac_bits=8))
    assert min(int(net8.op(n).threshold.min()) for n in net8.neurons()) >= 2 ** 7
    assert rep8.error_bound > rep.error_bound


def test_membrane_budget_lowers_the_exponent(tmp_path):
    path = tmp_path / "r.onnx"
    onnx.save(residual_cnn(), path)
    graph = canonicalize(load_qgraph(path), CompileOptions())
    wide, _ = integerize(lambda p: lower(graph, p), PROFILES["int64"])
    narrow_profile = HardwareProfile("narrow", 24, 24, 18)
    narrow, low = integerize(lambda p: lower(graph, p), narrow_profile)
    assert analyze_bitwidth(narrow, narrow_profile).membrane_bits <= 18
    assert bit_widths(wide, "int64").membrane_bits > 18  # unsplit: weights may exceed the profile before splitting
    assert all(p.bound < 0.5 for p in low.precision.populations.values())


def test_refused_when_half_a_level_does_not_fit(tmp_path):
    path = tmp_path / "r.onnx"
    onnx.save(residual_cnn(), path)
    graph = canonicalize(load_qgraph(path), CompileOptions())
    tiny = HardwareProfile("tiny", 24, 4, 8)
    with pytest.raises(BudgetError, match=r"population '.+' needs \d+-bit thresholds and a \d+-bit membrane .*half"):
        integerize(lambda p: lower(graph, p), tiny)


def test_choose_k_stops_at_the_threshold_budget():
    prec = Precision(HardwareProfile("p", 24, 12, 32))
    k = prec.choose_k("s", (3.0, 5.0), lambda kk: 2.0 ** -kk)
    assert 5 * 2 ** k < 2 ** 12  # the largest threshold keeps within 12 bits
    assert prec.choose_k("s", (3.0, 5.0), lambda kk: 0.0) == 0  # no error: the narrowest unit
    assert Precision(PROFILES["generic"], frac_bits=10).choose_k("s", (4.0, 4.0), lambda kk: 1.0) == math.ceil(10 - 2)


def test_sum_of_two_heads_bound_in_report(tmp_path):
    b = Builder((1, 1, 8, 8), seed=2)
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.25, 7)
    f = b.node("Flatten", [h], axis=1)
    onnx.save(b.model(b.node("Add", [b.gemm(f, 256, 10), b.gemm(f, 256, 10)]), (1, 10)), tmp_path / "m.onnx")
    net, rep = compile_onnx(tmp_path / "m.onnx")
    readout = rep.precision["populations"]["readout"]
    assert readout["readout"] and 0 < readout["bound"] < 1e-3  # absolute logit error of the rescaled head
    assert rep.error_population != "readout" and rep.error_bound < TARGET_LEVELS
    assert not rep.warnings


def test_cifar_structured_csdformer_within_target(tmp_path):
    """A smaller random CSDformer of the CIFAR-size structure (3x32x32, QCDQ, int8 weights behind
    DequantizeLinear -> Transpose -> MatMul, residual streams over 2 blocks): every population's
    worst-case error is below 2^-8 of a level at the defaults, and the count-domain run agrees
    with onnxruntime (misses only where a count sits within float32 noise of a tie)."""
    torch = pytest.importorskip("torch")
    from csdc.runtime.evaluate import onnx_logits
    from csdc.training.transformer import CIFAR_CONFIG, build_csdformer, calibrate, export_csdformer_onnx

    model = build_csdformer(1, **{**CIFAR_CONFIG, "dim": 96, "depth": 2, "heads": 3})
    calibrate(model, torch.round(torch.rand(8, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 255) / 255)
    path = tmp_path / "c.onnx"
    export_csdformer_onnx(model, path)
    net, rep = compile_onnx(path)
    pops = rep.precision["populations"]
    assert all(p["bound"] < TARGET_LEVELS for p in pops.values() if not p["readout"])
    assert any(p["weights"] > 0 for p in pops.values())  # the residual streams' rescaled branches are counted
    x = (np.round(np.random.default_rng(0).random((16, 3, 32, 32)) * 255) / 255).astype(np.float32)
    got = semantics.run_counts(net, x).logits
    assert np.mean(onnx_logits(path, x).argmax(1) == got.argmax(1)) >= 14 / 16


def test_cli_reports_the_bounds(tmp_path, capsys):
    import json

    from csdc.cli import main

    path = tmp_path / "r.onnx"
    onnx.save(residual_cnn(), path)
    assert main(["compile", str(path), "-o", str(tmp_path / "r.sir"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["error_bound"] < TARGET_LEVELS and rep["error_population"] in rep["precision"]["populations"]
    assert main(["compile", str(path), "-o", str(tmp_path / "r.sir"), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "integerization error" in out and "population -> worst-case integerization error" in out


def test_a_coarse_step_gets_a_unit_coarser_than_the_weights(tmp_path, monkeypatch):
    """A quantizer whose step is 2^25 anchor units needs a 26-bit threshold even at k = 0 (this was
    refused against a 24-bit threshold budget): the unit becomes coarser than the anchor's
    own, the anchor's weights are rounded as well, and the bound says what that costs."""
    monkeypatch.setitem(PROFILES, "t24", HardwareProfile("t24", weight_bits=8, threshold_bits=24, membrane_bits=24))
    b = Builder((1, 1, 8, 8), seed=1)
    x = b.quant("x", 1 / 16, 16)
    w = b.node("DequantizeLinear", [b.const(b.rng.integers(-100, 101, (4, 1, 3, 3)).astype(np.int8)),
                                    b.const(np.float32(2.0 ** -16))])
    h = b.quant(b.node("Conv", [x, w], pads=[1, 1, 1, 1], kernel_shape=[3, 3]), 2.0 ** 9 / 240 * 1.1, 15)
    onnx.save(b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10)), tmp_path / "m.onnx")
    net, rep = compile_onnx(tmp_path / "m.onnx", CompileOptions(profile="t24"))
    pop = rep.precision["populations"][net.neurons()[0]]
    assert pop["k"] < 0 and pop["weights"] > 0 and pop["bound"] < TARGET_LEVELS
    assert rep.bits["threshold_bits"] <= 24
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 17, (100, 1, 8, 8)) / 16).astype(np.float32)
    from csdc.runtime.evaluate import onnx_logits

    assert np.mean(onnx_logits(tmp_path / "m.onnx", x).argmax(1) == semantics.run_counts(net, x).logits.argmax(1)) >= 0.97


def test_generic_keeps_int32_lanes_where_exact_enough(tmp_path):
    """The default profile is a 64-bit datapath with int32 lanes: a population stays within a 31-bit
    membrane where its bound there is below LANE_LEVELS, while int64 (no lanes) goes as far as the aim."""
    from csdc.compiler.integerize import LANE_LEVELS

    path = tmp_path / "r.onnx"
    onnx.save(residual_cnn(), path)
    _, gen = compile_onnx(path)
    _, wide = compile_onnx(path, CompileOptions(profile="int64"))
    pops = [n for n, p in gen.precision["populations"].items() if not p["readout"]]
    assert all(gen.bits["per_node"][n]["membrane_bits"] <= 31 for n in pops)
    assert all(gen.precision["populations"][n]["bound"] < LANE_LEVELS for n in pops)
    assert max(wide.bits["per_node"][n]["membrane_bits"] for n in pops) > 31
    assert wide.error_bound < gen.error_bound
