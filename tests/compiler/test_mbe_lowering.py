"""``--nonlinear mbe``: GELU between quantizers of an onnxruntime ``quantize_static`` QDQ model, made by
the test as a user would (torch.onnx export of a small trained model, then quantize_static), compiled to
an MBE population and checked against onnxruntime level by level; the default refuses and names the flag."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from csdc.backends.numba import NumbaBackend  # noqa: E402
from csdc.compiler.mbe import MBE_TARGET_LEVELS, gelu  # noqa: E402
from csdc.compiler.pipeline import CompileOptions, compile_onnx  # noqa: E402
from csdc.errors import CsdcError, UnsupportedModelError  # noqa: E402
from csdc.ir import MBENeuron  # noqa: E402
from csdc.runtime.datasets import load_digits_split  # noqa: E402
from csdc.runtime.evaluate import onnx_logits  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """quantize_static QDQ models of a small trained GELU network (tests/compiler/gelu_models.py): opset 20
    (one Gelu op) and 17 (Div -> Erf -> Add -> Mul -> Mul), uint8 activations; 21: opset 20's with uint4."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gelu_models import gelu_qdq_models

    made = gelu_qdq_models(tmp_path_factory.mktemp("gelu"))
    out = {17: made["17"], 20: made["20"], 21: made["20-uint4"]}
    ops = [n.op_type for n in onnx.load(out[20]).graph.node]
    assert "Gelu" in ops and ops[ops.index("Gelu") - 1] == "DequantizeLinear" and ops[ops.index("Gelu") + 1] == "QuantizeLinear"
    assert "Erf" in [n.op_type for n in onnx.load(out[17]).graph.node]
    return out


def test_default_refuses_gelu_and_erf_naming_the_flag(models) -> None:
    with pytest.raises(UnsupportedModelError, match=r"Gelu.*--nonlinear mbe"):
        compile_onnx(models[20])
    with pytest.raises(UnsupportedModelError, match=r"Erf.*--nonlinear mbe"):
        compile_onnx(models[17])
    with pytest.raises(CsdcError, match="unknown --nonlinear"):
        CompileOptions(nonlinear="exact")
    with pytest.raises(CsdcError, match="--mbe-bases must be in"):
        CompileOptions(nonlinear="mbe", mbe_bases=0)


def test_the_mode_refuses_what_it_does_not_lower_by_name(tmp_path: Path) -> None:
    """A Gelu on the logits (no quantizer reads it), a Softmax and a LayerNormalization that read no quantizer's
    output are refused by name (tests/compiler/test_softmax_lowering.py and test_layernorm_lowering.py lower
    the ones that do)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from onnx_build import with_ops

    onnx.save(with_ops(["Gelu"]), tmp_path / "g.onnx")
    with pytest.raises(UnsupportedModelError, match=r"Gelu.*only between two quantizers"):
        compile_onnx(tmp_path / "g.onnx", CompileOptions(nonlinear="mbe"))
    onnx.save(with_ops(["Softmax"]), tmp_path / "s.onnx")
    with pytest.raises(UnsupportedModelError, match=r"Softmax"):
        compile_onnx(tmp_path / "s.onnx", CompileOptions(nonlinear="mbe"))
    onnx.save(with_ops(["LayerNormalization"]), tmp_path / "l.onnx")
    with pytest.raises(UnsupportedModelError, match=r"LayerNormalization.*must read a quantizer's output"):
        compile_onnx(tmp_path / "l.onnx", CompileOptions(nonlinear="mbe"))


def _quantizer(model: Path, where: str) -> tuple[float, int]:
    """(scale, zero point) of the QuantizeLinear before the GELU (read by its first op) or after it (the
    last QuantizeLinear before the second Gemm)."""
    m = onnx.load(model)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    qs = [n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in init]
    gemms = [i for i, n in enumerate(m.graph.node) if n.op_type == "Gemm"]
    before = [n for n in qs if list(m.graph.node).index(n) < gemms[1]]
    after = before[-1]
    first = next(n for n in before if n.input[0] == m.graph.node[gemms[0]].output[0])
    q = after if where == "after" else first
    return float(init[q.input[1]]), int(init[q.input[2]])


def _gelu_levels(model: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime's uint8 levels of the quantizer after GELU (graph optimizations off)."""
    import onnxruntime as ort

    m = onnx.load(model)
    s, z = _quantizer(model, "after")
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in init
             and float(init[n.input[1]]) == s and int(init[n.input[2]]) == z)
    m.graph.output.append(onnx.helper.make_tensor_value_info(q.output[0], onnx.TensorProto.UINT8, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([q.output[0]], {"input": x})[0].astype(np.int64)


@pytest.mark.parametrize("opset", [20, 17])
def test_gelu_becomes_an_mbe_population_equal_to_onnxruntime(models, opset: int) -> None:
    """Opset 20: DQ -> Gelu -> Q; opset 17: DQ -> Div -> Erf -> Q/DQ -> Add -> Q/DQ -> Mul -> Q/DQ -> Mul -> Q
    (quantize_static's quantizers inside torch.onnx's Erf form): one MBE population each, fitted to the
    function of the input level the whole region computes."""
    net, rep = compile_onnx(models[opset], CompileOptions(nonlinear="mbe"))
    mbe = [n for n, op in net.nodes() if isinstance(op, MBENeuron)]
    assert len(mbe) == 1 and len(rep.approximations) == 1
    a = rep.approximations[0]
    assert a["mbe_node"] == mbe[0] and a["levels"] == [0, net.T] == [0, 255]
    if opset == 20:
        assert a["op"] == "gelu" and len(a["nodes"]) == 1
    else:
        ops = [n.split("/")[-1].split("_")[0] for n in a["nodes"]]
        assert a["op"] == "erf" and {"Div", "Erf", "Add", "Mul"} <= set(ops)
        assert sum("QuantizeLinear" in n for n in a["nodes"]) == 3  # after Erf, Add and the first Mul
    # the Erf form's inner quantizers make a staircase, harder to fit: the most bases the fit tries, still
    # within half a step
    assert 0 < a["max_abs_error"] <= (MBE_TARGET_LEVELS if opset == 20 else 0.5)
    assert a["mean_abs_error"] < a["max_abs_error"]
    assert a["steps"] <= 16 and a["latency_steps"] == net.T
    # conv, fc1, the quantizer after GELU and the logits quantizer (D = T each), and the MBE population (T)
    assert rep.latency == net.T + 4 * net.T + net.T
    x, _ = load_digits_split("test")
    res = NumbaBackend().run(net, x, keep_trains=False)
    reader = next(c for c in net.consumers(mbe[0]))
    got = res.counts[reader]  # uint8 quantizer with lo = 0: count = level
    if opset == 20:
        # against GELU computed in float64 from the network's own input levels: a level differs only where the
        # exact value lies within the stated worst-case error of a rounding boundary, and then by one
        src = net.inputs(net.inputs(mbe[0])[0])[0]  # the quantizer before GELU (through its unit synapses)
        (s_in, z_in), (s_out, z_out) = _quantizer(models[20], "before"), _quantizer(models[20], "after")
        exact = gelu(s_in * (res.counts[src] - z_in)) / s_out + z_out
        own = np.clip(np.rint(exact), 0, 255)
        moved = got != own
        assert np.abs(got - own).max() <= 1
        assert np.all(np.abs(np.abs(exact[moved] - np.floor(exact[moved])) - 0.5) <= a["max_abs_error"] + 1e-4)  # + float32 evaluation
    # against onnxruntime's levels: the same, plus a rare tie of the quantizer before GELU that onnxruntime's
    # float arithmetic rounds the other way
    want = _gelu_levels(models[opset], x)
    assert np.abs(got - want).max() <= 2 and np.mean(got == want) >= 0.9
    ref = onnx_logits(models[opset], x)
    assert np.mean(res.logits.argmax(1) == ref.argmax(1)) >= 0.99


def test_fewer_bases_cost_accuracy_of_the_fit_and_the_cli_reports_it(models, tmp_path: Path, capsys) -> None:
    from csdc.cli import main

    _, rep2 = compile_onnx(models[20], CompileOptions(nonlinear="mbe", mbe_bases=2, mbe_steps=6))
    _, rep = compile_onnx(models[20], CompileOptions(nonlinear="mbe"))
    a2, a = rep2.approximations[0], rep.approximations[0]
    assert a2["bases"] <= 2 and a2["steps"] <= 6 and a2["max_abs_error"] > a["max_abs_error"]
    sir = tmp_path / "g.sir"
    assert main(["compile", str(models[20]), "-o", str(sir), "--nonlinear", "mbe", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["approximations"][0]["max_abs_error"] == a["max_abs_error"]
    assert main(["compile", str(models[20]), "-o", str(sir), "--nonlinear", "mbe"]) == 0
    text = capsys.readouterr().out
    assert "approximated          gelu" in text and "worst" in text and "MBE population" in text


def _hand_gelu_model(per_channel: bool = False) -> onnx.ModelProto:
    """Hand-built QCDQ: conv -> BN -> q(0.25, 7 levels) -> [Mul by a per-channel constant] -> Gelu -> q(0.1, 7) -> Gemm."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from onnx_build import Builder

    b = Builder((1, 1, 8, 8), seed=0, opset=20)
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.25, 7)
    if per_channel:
        h = b.node("Mul", [h, b.const(np.array([1.0, 0.5, 2.0, 1.5], np.float32).reshape(4, 1, 1))])
    g = b.quant(b.node("Gelu", [h]), 0.1, 7)
    return b.model(b.gemm(b.node("Flatten", [g], axis=1), 256, 10), (1, 10))


def test_fused_gelu_evaluates_gelu_and_per_channel_constants_are_not_fused(tmp_path: Path) -> None:
    from csdc.compiler.frontend import load_qgraph
    from csdc.compiler.passes.fuse_elementwise import evaluate, fuse_elementwise
    from csdc.compiler.pipeline import canonicalize

    onnx.save(_hand_gelu_model(), tmp_path / "g.onnx")
    opts = CompileOptions(nonlinear="mbe")
    graph = fuse_elementwise(canonicalize(load_qgraph(tmp_path / "g.onnx", "mbe"), opts))
    node = next(n for n in graph.nodes if n.op_type == "Elementwise")
    assert not any(n.op_type == "Gelu" for n in graph.nodes) and node.attrs["function"] == "gelu"
    xs = np.linspace(-2, 2, 41, dtype=np.float32)
    assert np.allclose(evaluate(node, xs), gelu(xs.astype(np.float64)), atol=1e-6)
    net, rep = compile_onnx(tmp_path / "g.onnx", opts)
    a = rep.approximations[0]
    assert net.T == 7 and a["levels"] == [0, 7] and a["max_abs_error"] <= MBE_TARGET_LEVELS
    onnx.save(_hand_gelu_model(per_channel=True), tmp_path / "pc.onnx")
    with pytest.raises(UnsupportedModelError, match=r"Gelu.*only between two quantizers"):
        compile_onnx(tmp_path / "pc.onnx", opts)


def test_evaluate_covers_the_tanh_gelu_and_inner_quantizers() -> None:
    """``evaluate`` of a hand-made region: Gelu(approximate="tanh") -> Quant (round half to even, saturate)."""
    from csdc.compiler.passes.fuse_elementwise import evaluate
    from csdc.compiler.qgraph import QNode

    g = QNode("g", "Gelu", ("x",), ("y",), {"approximate": "tanh"})
    q = QNode("q", "Quant", ("y",), ("z",), {"scale": 0.5, "zero_point": 2, "lo": 0, "hi": 6})
    node = QNode("g", "Elementwise", ("x",), ("z",), {"nodes": (g, q), "constants": {}, "function": "gelu", "sources": ("g", "q")})
    x = np.array([-3.0, -0.25, 0.0, 0.75, 1.25, 9.0], dtype=np.float32)
    t = 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))
    want = (np.clip(np.rint(t / 0.5) + 2, 0, 6) - 2) * 0.5
    assert np.array_equal(evaluate(node, x), want)
    assert evaluate(node, np.float32([0.75]))[0] == 0.5  # GELU(0.75) = 0.58 -> level 1 -> 0.5
    alone = QNode("g", "Elementwise", ("x",), ("y",), {"nodes": (g,), "constants": {}, "function": "gelu", "sources": ("g",)})
    x = np.linspace(-4, 4, 81, dtype=np.float32)
    t = 0.5 * x.astype(np.float64) * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x.astype(np.float64) ** 3)))
    got = evaluate(alone, x)
    assert np.abs(got - t).max() < 1e-6 and np.abs(got - gelu(x.astype(np.float64))).max() > 1e-4  # tanh, not erf


def test_the_precision_policy_caps_the_output_unit_within_a_24_bit_budget(models, monkeypatch) -> None:
    """4-bit model (T = 15): at the fit's own unit the neuron reading GELU needs a 25-bit membrane; under
    a profile of 24-bit membranes the policy lowers the unit until it fits, and the error is measured again.
    ``--profile loihi2`` keeps the generic unit: that membrane takes two 24-bit words, the MBE neurons one."""
    from csdc.compiler.bitwidth import PROFILES, HardwareProfile, analyze_bitwidth

    monkeypatch.setitem(PROFILES, "m24", HardwareProfile("m24", weight_bits=8, threshold_bits=24, membrane_bits=24))
    gen, free = compile_onnx(models[21], CompileOptions(nonlinear="mbe"))
    loihi, words = compile_onnx(models[21], CompileOptions(nonlinear="mbe", profile="loihi2"))
    wide = [n for n, e in free.bits["per_node"].items() if e.get("membrane_bits", 0) > 24]  # the GELU reader among them
    assert wide and words.bits["two_words"] == wide and words.precision["units"] == "generic"
    assert all(e["membrane_bits"] <= 24 for n, e in words.bits["per_node"].items() if isinstance(loihi.op(n), MBENeuron))
    net, rep = compile_onnx(models[21], CompileOptions(nonlinear="mbe", profile="m24"))
    assert free.bits["membrane_bits"] > 24 >= rep.bits["membrane_bits"]
    assert analyze_bitwidth(net, "m24").membrane_bits <= 24
    a = rep.approximations[0]
    assert a["max_abs_error"] <= MBE_TARGET_LEVELS and net.T == 15
    x, _ = load_digits_split("test")
    ref = onnx_logits(models[21], x)
    assert np.mean(NumbaBackend().run(net, x).logits.argmax(1) == ref.argmax(1)) >= 0.99
