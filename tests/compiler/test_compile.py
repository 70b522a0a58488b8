"""Compiler tests: each canonicalization pass establishes its invariant (checked between passes),
and compiled hand-built models agree with onnxruntime on the source ONNX."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from csdc.compiler.frontend import load_qgraph
from csdc.compiler.pipeline import CompileOptions, canonicalize, compile_onnx
from csdc.compiler.qgraph import QGraph
from csdc.errors import UnsupportedModelError
from csdc.ir import semantics
from csdc.ir.ops import ConvSynapse, Neuron, SpikeMaxPool
from csdc.runtime.evaluate import onnx_logits

from onnx_build import Builder, digits_like_cnn, residual_cnn, token_mlp, with_ops

# op types that must be gone after each pass
GONE_AFTER = {
    "fold_constants": {"Constant"},
    "canonicalize_quant": {"QuantizeLinear", "DequantizeLinear"},
    "move_maxpool": set(),
    "canonicalize_linear": {"Conv", "Gemm"},  # MatMul survives only as activation x activation
    "fold_batchnorm": {"BatchNormalization"},
    "remove_identities": {"Identity", "Dropout"},
}


def verify_qgraph(graph: QGraph, pass_name: str) -> None:
    """The verifier run between passes: invariants of every pass so far, and a well-formed graph."""
    verify_qgraph.seen.append(pass_name)
    banned = set().union(*(GONE_AFTER.get(p, set()) for p in verify_qgraph.seen))
    produced = {graph.input} | set(graph.constants)
    for n in graph.nodes:
        assert n.op_type not in banned, f"{n.op_type} '{n.name}' survived {pass_name}"
        for i in n.inputs:
            assert not i or i in produced, f"'{n.name}' reads '{i}' before it is produced (after {pass_name})"
        produced.update(n.outputs)
        if n.op_type == "MatMul" and "canonicalize_linear" in verify_qgraph.seen:
            assert not any(graph.is_const(i) for i in n.inputs), f"MatMul '{n.name}' with a constant operand survived"
        if n.op_type == "Quant":
            assert n.attrs["lo"] <= n.attrs["hi"] and n.attrs["scale"] > 0
        if n.op_type == "MaxPool" and pass_name == "move_maxpool":
            assert all(c.op_type != "Quant" for c in graph.consumers().get(n.outputs[0], []))
    assert graph.output in produced


def _compile_and_compare(tmp_path, model: onnx.ModelProto, n: int = 300, **opts):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    verify_qgraph.seen = []
    canonicalize(load_qgraph(path), CompileOptions(**opts), check=verify_qgraph)
    net, rep = compile_onnx(path, CompileOptions(**opts))
    rng = np.random.default_rng(3)
    x = (rng.integers(0, 17, (n, 1, 8, 8)) / 16).astype(np.float32)
    ref = onnx_logits(path, x)
    res = semantics.run_counts(net, x)
    return net, rep, ref, res


@pytest.mark.parametrize("variant", [{}, {"pool_before_quant": True}], ids=["qcdq", "maxpool-before-quant"])
def test_qcdq_cnn_matches_onnxruntime(tmp_path, variant):
    net, rep, ref, res = _compile_and_compare(tmp_path, digits_like_cnn(**variant))
    assert np.mean(ref.argmax(1) == res.logits.argmax(1)) >= 0.995
    assert np.median(np.abs(ref - res.logits)) < 1e-5
    kinds = [type(op) for _, op in net.nodes()]
    assert kinds.count(Neuron) == 2 and kinds.count(SpikeMaxPool) == 2
    assert rep.threshold_error < 2 ** -8 and rep.weight_error == 0


def test_negative_bn_scale_flips_weights_keeps_thresholds_positive(tmp_path):
    net, _, ref, res = _compile_and_compare(tmp_path, digits_like_cnn(seed=5))
    for name in net.neurons():
        assert net.op(name).threshold.min() >= 1
    convs = [op for _, op in net.nodes() if isinstance(op, ConvSynapse)]
    assert any((c.weight.reshape(c.weight.shape[0], -1).sum(1) < 0).any() for c in convs)
    assert np.mean(ref.argmax(1) == res.logits.argmax(1)) >= 0.995


def test_residual_avgpool_gap(tmp_path):
    net, rep, ref, res = _compile_and_compare(tmp_path, residual_cnn())
    assert np.mean(ref.argmax(1) == res.logits.argmax(1)) >= 0.99
    assert np.abs(ref - res.logits).mean() < 0.02 * np.abs(ref).mean()
    # the rescaled residual branch is worth less than 2^-8 of a level in every population, worst case
    assert 0 < rep.error_bound < 2 ** -8


def test_tokens_matmul_bias_mul_reducemean(tmp_path):
    net, rep, ref, res = _compile_and_compare(tmp_path, token_mlp())
    assert np.mean(ref.argmax(1) == res.logits.argmax(1)) >= 0.99
    assert np.median(np.abs(ref - res.logits)) < 1e-4


def test_plain_qdq_uint8_gives_T_255(tmp_path):
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 255, 255, clip=False)
    h = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.01, 255, clip=False)
    m = b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10))
    net, rep, ref, res = _compile_and_compare(tmp_path, m)
    assert net.T == 255
    assert np.mean(ref.argmax(1) == res.logits.argmax(1)) >= 0.99


def test_float_weights_are_quantized_and_error_reported(tmp_path):
    net, rep, ref, res = _compile_and_compare(tmp_path, digits_like_cnn(float_weights=True), weight_bits=12)
    assert 0 < rep.float_weight_error < 2 ** -10
    assert np.mean(ref.argmax(1) == res.logits.argmax(1)) >= 0.97


def test_delay_option_sets_every_population(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(digits_like_cnn(), path)
    net, rep = compile_onnx(path, CompileOptions(delay=3))
    assert {net.op(n).delay for n in net.neurons()} == {3}
    assert rep.latency == net.T + 2 * 3


def test_all_unsupported_ops_listed_at_once(tmp_path):
    path = tmp_path / "bad.onnx"
    onnx.save(with_ops(["Softmax", "LayerNormalization", "Gelu"]), path)
    with pytest.raises(UnsupportedModelError) as exc:
        compile_onnx(path)
    msg = str(exc.value)
    assert len(exc.value.problems) == 3
    for op, fix in (("Softmax", "NReLU"), ("LayerNormalization", "BatchNormalization"), ("Gelu", "ReLU")):
        assert op in msg and fix in msg
    assert all("--nonlinear mbe" in reason for _, _, reason in exc.value.problems)  # the opt-in approximate mode
    assert str(path) in msg


def test_float_model_without_quantizers_is_refused(tmp_path):
    b = Builder((1, 1, 8, 8))
    m = b.model(b.gemm(b.node("Flatten", [b.node("Relu", [b.conv("x", 1, 4)])], axis=1), 256, 10), (1, 10))
    onnx.save(m, tmp_path / "f.onnx")
    with pytest.raises(UnsupportedModelError, match="float model"):
        compile_onnx(tmp_path / "f.onnx")


def test_mixed_levels_are_refused(tmp_path):
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.conv(x, 1, 4), 0.2, 7)
    h = b.quant(b.conv(h, 4, 4), 0.2, 15)
    onnx.save(b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10)), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError, match="share one number of levels"):
        compile_onnx(tmp_path / "m.onnx")


def test_missing_input_quantizer_is_refused(tmp_path):
    b = Builder((1, 1, 8, 8))
    h = b.quant(b.conv("x", 1, 4), 0.2, 7)
    onnx.save(b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10)), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError, match="model input"):
        compile_onnx(tmp_path / "m.onnx")


def test_activation_matmul_is_refused(tmp_path):
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    t = b.node("Reshape", [x, b.const(np.array([-1, 8, 8], np.int64))])
    h = b.node("MatMul", [t, b.qweight((8, 8), axis=1)])
    m = b.quant(b.node("MatMul", [h, b.quant(h, 0.2, 7)]), 0.2, 7)  # left operand not quantized
    onnx.save(b.model(b.node("ReduceMean", [m], axes=[1], keepdims=0), (1, 8)), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError, match="quantizer on both inputs"):
        compile_onnx(tmp_path / "m.onnx")


def test_budget_exceeded_names_node(tmp_path, monkeypatch):
    from csdc.compiler.bitwidth import PROFILES, HardwareProfile
    from csdc.errors import BudgetError

    monkeypatch.setitem(PROFILES, "w24", HardwareProfile("w24", weight_bits=8, threshold_bits=24, membrane_bits=24))
    onnx.save(digits_like_cnn(), tmp_path / "m.onnx")
    with pytest.raises(BudgetError, match="node '[^']+' \\(Neuron\\) can reach a \\d+-bit membrane potential, profile 'w24' allows 24"):
        compile_onnx(tmp_path / "m.onnx", CompileOptions(frac_bits=20, profile="w24"))


def test_attention_block_becomes_spike_matmuls(tmp_path):
    from csdc.ir.ops import SpikeMatMul

    from onnx_build import attention_model

    net, rep, ref, res = _compile_and_compare(tmp_path, attention_model())
    matmuls = [op for _, op in net.nodes() if isinstance(op, SpikeMatMul)]
    assert len(matmuls) == 2  # Q K^T and A V
    assert np.mean(ref.argmax(1) == res.logits.argmax(1)) >= 0.99
    assert np.median(np.abs(ref - res.logits)) < 1e-4
    # no float scale survives: 1/sqrt(dk), 1/N and the quantizer steps live in integer thresholds
    for name in net.neurons():
        assert net.op(name).threshold.dtype.kind == "i"


def test_softmax_attention_is_refused_with_fix(tmp_path):
    from onnx_build import attention_model

    onnx.save(attention_model(softmax=True), tmp_path / "sm.onnx")
    with pytest.raises(UnsupportedModelError, match="NReLU"):
        compile_onnx(tmp_path / "sm.onnx")
