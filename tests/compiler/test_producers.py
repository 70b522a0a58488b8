"""Models from real producers compile and agree with their own executors on the digits test split.

Routes (see producers.py): Brevitas QCDQ (TorchScript and dynamo exporters) and QONNX, a
hand-written LSQ exported by torch.onnx (Div -> Round -> Clip -> Mul, TorchScript and dynamo),
onnxruntime quantize_static (uint8 / int8 activations, per-channel / per-tensor weights, uint4 / int4
at opset 21). Each compiled network runs on the numba backend; the reference is onnxruntime, or
qonnx's executor for QONNX graphs. Between passes a verifier checks every pass's invariant, in
particular that no source quantizer form survives canonicalization.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

pytest.importorskip("brevitas")
pytest.importorskip("qonnx")

import producers as P  # noqa: E402
from onnx_build import Builder  # noqa: E402

from csdc.compiler.frontend import load_qgraph  # noqa: E402
from csdc.compiler.pipeline import CompileOptions, canonicalize, compile_onnx  # noqa: E402
from csdc.compiler.qgraph import QGraph  # noqa: E402
from csdc.errors import UnsupportedModelError  # noqa: E402
from csdc.ir import semantics  # noqa: E402
from csdc.runtime.evaluate import onnx_logits  # noqa: E402

SOURCE_FORMS = {"QuantizeLinear", "DequantizeLinear", "Round"}


def verify_canonical(graph: QGraph, pass_name: str) -> None:
    """Between-pass verifier for producer graphs: well-formed, and each quantizer pass's invariant."""
    verify_canonical.seen.append(pass_name)
    seen = verify_canonical.seen
    produced = {graph.input} | set(graph.constants)
    for n in graph.nodes:
        for i in n.inputs:
            assert not i or i in produced, f"'{n.name}' reads '{i}' before it is produced (after {pass_name})"
        produced.update(n.outputs)
        if "canonicalize_qonnx_quant" in seen:
            assert not n.domain, f"QONNX node '{n.name}' survived {pass_name}"
        if "canonicalize_lsq_arithmetic" in seen:
            assert n.op_type != "Round", f"Round '{n.name}' survived {pass_name}"
        if "canonicalize_quant" in seen:
            assert n.op_type not in SOURCE_FORMS, f"{n.op_type} '{n.name}' survived {pass_name}"
        if n.op_type == "Quant" and not n.domain:
            assert n.attrs["lo"] <= n.attrs["hi"] and n.attrs["scale"] > 0
            if "canonicalize_zero_point" in seen and n.attrs["lo"] == n.attrs["zero_point"]:
                assert n.attrs["zero_point"] == 0
        if n.op_type in ("Conv", "Gemm", "BatchNormalization") and "fold_batchnorm" in seen:
            raise AssertionError(f"{n.op_type} '{n.name}' survived {pass_name}")
    assert graph.output in produced


def _canonicalize_verified(path) -> QGraph:
    verify_canonical.seen = []
    return canonicalize(load_qgraph(path), CompileOptions(), check=verify_canonical, contracts=True)


CNN_ROUTES = P.TORCH_ROUTES + list(P.ORT_ROUTES)


@pytest.mark.parametrize("route", CNN_ROUTES)
def test_cnn_route_agrees(tmp_path, route):
    path = P.build_route(route, "cnn", str(tmp_path))
    g = _canonicalize_verified(path)
    assert not any(n.op_type in SOURCE_FORMS or n.domain for n in g.nodes)
    r = P.evaluate_route(path)
    assert r["T"] == (255 if "8" in route and route.startswith("ort") else 15)
    assert r["agreement"] >= 0.99, r
    assert r["snn_acc"] >= 0.9, r


@pytest.mark.parametrize("route", P.TORCH_ROUTES)
def test_attention_route_agrees(tmp_path, route):
    path = P.build_route(route, "attention", str(tmp_path))
    _canonicalize_verified(path)
    r = P.evaluate_route(path, numba_vs_reference=True)
    assert r["T"] == 15 and r["numba_equals_reference"]
    assert r["agreement"] >= 0.99, r
    assert r["snn_acc"] >= 0.9, r


@pytest.mark.parametrize("route", ["ort-uint8-perchannel", "ort-uint4-opset21"])
def test_onnxruntime_attention_applies_signed_current_quantizers(tmp_path, route):
    """onnxruntime quantizes the signed pre-activations before and after each token BatchNorm: each
    becomes a neuron population in the offset form and the BN a per-channel scale; exact."""
    path = P.build_route(route, "attention", str(tmp_path))
    _canonicalize_verified(path)
    r = P.evaluate_route(path, numba_vs_reference=True)
    assert r["T"] == (255 if "8" in route else 15) and r["numba_equals_reference"]
    assert not r["warnings"]
    assert r["agreement"] >= 0.99, r


def test_onnxruntime_int8_attention_takes_the_split_form(tmp_path):
    """onnxruntime's asymmetric int8 activations: the quantizers read through one-to-one synapses (around the token
    BatchNorms) become ternary populations with clip corrections, the ones after a projection keep the offset form
    (docs/signed_spikes.md); same window, exact: numba == reference, agreement with onnxruntime."""
    from csdc.ir.ops import TernaryNeuron

    path = P.build_route("ort-int8-activations", "attention", str(tmp_path))
    net, rep = compile_onnx(path)
    ternary = [n for n in net.neurons() if isinstance(net.op(n), TernaryNeuron)]
    assert net.T == 255 and len(ternary) == 8, ternary
    assert all(any(c.startswith(t + "_") and ("above" in c or "below" in c) for c in net.neurons()) for t in ternary)
    r = P.evaluate_route(path, numba_vs_reference=True)
    assert r["numba_equals_reference"] and not r["warnings"]
    assert r["agreement"] >= 0.99, r


@pytest.mark.parametrize("route", ["brevitas-qcdq-torchscript", "brevitas-qonnx"])
def test_brevitas_signed_activations_offset_form(tmp_path, route):
    """A signed 4-bit Brevitas QuantIdentity ([-8, 7], no ReLU) before a max-pool and the classifier."""
    path = P.build_signed_route(route, str(tmp_path))
    g = _canonicalize_verified(path)
    assert any(n.op_type == "Quant" and n.attrs["lo"] < n.attrs["zero_point"] for n in g.nodes)
    r = P.evaluate_route(path)
    assert r["T"] == 15 and r["agreement"] >= 0.99, r


@pytest.mark.parametrize("route", ["brevitas-qcdq-torchscript", "brevitas-qonnx"])
def test_brevitas_signed_narrow_range_attention_is_ternary(tmp_path, route):
    """Brevitas signed narrow-range QuantIdentity ([-7, 7]) on Q, K, V and A V with 3-bit QuantReLUs ([0, 7])
    elsewhere, exported as QCDQ (Clip(-7, 7)) and QONNX (signed, narrow): one window T = 7, the four signed
    quantizers ternary populations, agreement with the producer's executor, numba == reference."""
    from csdc.compiler.pipeline import compile_onnx
    from csdc.ir.ops import TernaryNeuron

    path = P.build_signed_route(route, str(tmp_path), "attention")
    _canonicalize_verified(path)
    net, _ = compile_onnx(path)
    assert sum(isinstance(net.op(n), TernaryNeuron) for n in net.neurons()) == 4
    r = P.evaluate_route(path, numba_vs_reference=True)
    assert r["T"] == 7 and r["numba_equals_reference"] and not r["warnings"]
    assert r["agreement"] >= 0.99, r


def test_lsq_arithmetic_keeps_trained_integer_weights(tmp_path):
    """The folded Round(w/s) -> Clip -> Mul(s) weights stay the 4-bit integers LSQ trained."""
    path = P.build_route("torch-lsq-torchscript", "cnn", str(tmp_path))
    net, rep = compile_onnx(path)
    assert rep.float_weight_error < 1e-6
    from csdc.ir.ops import ConvSynapse

    for _, op in net.nodes():
        if isinstance(op, ConvSynapse):
            w = op.weight.reshape(op.weight.shape[0], -1)
            per_ch = np.array([np.gcd.reduce(np.abs(r[r != 0])) if np.any(r) else 1 for r in w])
            assert np.all(np.abs(w // per_ch[:, None]).max(1) <= 7)  # integers of at most 4 bits, times a power of two


# --- hand-built graphs: each canonicalization pass on its own --------------------------------------
def _compare(tmp_path, model: onnx.ModelProto, n: int = 200):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    _canonicalize_verified(path)
    net, rep = compile_onnx(path)
    rng = np.random.default_rng(3)
    x = (rng.integers(0, 17, (n, 1, 8, 8)) / 16).astype(np.float32)
    return net, rep, onnx_logits(path, x), semantics.run_counts(net, x).logits


def test_qonnx_quant_refusals_listed_at_once(tmp_path):
    b = Builder((1, 1, 8, 8))
    x = b.qonnx_quant("x", 1 / 16, 0, 8, signed=0)
    h = b.qonnx_quant(b.conv(x, 1, 4), 0.2, 0, 3, rounding_mode="FLOOR")
    h = b.qonnx_quant(b.conv(h, 4, 4), 0.2, 0.5, 3)
    m = b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10))
    onnx.save(m, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError) as exc:
        compile_onnx(tmp_path / "m.onnx")
    assert len(exc.value.problems) == 2
    assert "rounding_mode FLOOR" in str(exc.value) and "zeropt must be integer" in str(exc.value)


def test_int8_zero_point_minus_128_is_an_unsigned_255_level_quantizer(tmp_path):
    """onnxruntime's asymmetric int8 activations after a removed ReLU: lo == zero_point == -128."""
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.01, 255, clip=False, zp=-128, dtype=np.int8)
    net, rep, ref, snn = _compare(tmp_path, b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10)))
    assert net.T == 255
    assert np.mean(ref.argmax(1) == snn.argmax(1)) >= 0.99


def test_relu_then_signed_quantizer_uses_relu_semantics(tmp_path):
    """Relu -> int8 quantizer with zero point 0: the negative levels are never reached."""
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = b.node("Relu", [b.bn(b.conv(x, 1, 4), 4)])
    h = b.quant(h, 0.05, 7, zp=0, dtype=np.int8, clip=False)
    m = b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10))
    net, rep, ref, snn = _compare(tmp_path, m)
    assert net.T == 127
    assert np.mean(ref.argmax(1) == snn.argmax(1)) >= 0.99


def _signed_quant(b: Builder, x: str, scale: float, lo: int, hi: int, zp: int = 0) -> str:
    s, z = b.const(np.float32(scale)), b.const(np.array(zp, np.int8))
    q = b.node("Clip", [b.node("QuantizeLinear", [x, s, z]), b.const(np.array(lo, np.int8)), b.const(np.array(hi, np.int8))])
    return b.node("DequantizeLinear", [q, s, z])


@pytest.mark.parametrize("zp", [0, 3])
def test_signed_quantizers_use_the_offset_form(tmp_path, zp):
    """Signed 4-bit quantizers [-8, 7] (no ReLU) feeding padded convs, max-pool, average pool and a
    linear layer: the neuron counts level - lo, its bias gets the offset, the next layers' biases
    take it back out (per position at padded borders). Exact, so logits match onnxruntime's."""
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = _signed_quant(b, b.bn(b.conv(x, 1, 4), 4), 0.2, -8 + zp, 7 + zp, zp)
    h = b.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
    h = _signed_quant(b, b.bn(b.conv(h, 4, 6), 6), 0.3137, -8 + zp, 7 + zp, zp)
    h = b.node("AveragePool", [h], kernel_shape=[3, 3], strides=[1, 1], pads=[1, 1, 1, 1])
    # steps not commensurate with the pool's divisors: no exact rounding ties (see test_average_pool_ties)
    h = _signed_quant(b, h, 0.2437, -8 + zp, 7 + zp, zp)
    m = b.model(b.gemm(b.node("Flatten", [h], axis=1), 96, 10), (1, 10))
    net, rep, ref, snn = _compare(tmp_path, m)
    assert net.T == 15
    assert np.mean(ref.argmax(1) == snn.argmax(1)) >= 0.99
    assert np.median(np.abs(ref - snn)) < 1e-4


def test_average_pool_ties_round_up(tmp_path):
    """Documented limit: a mean of 4 counts read by a quantizer of the same step lands exactly on
    .5 for a quarter of the corner values; ONNX rounds those half to even, csdc's neurons half up,
    so those levels differ by one (never more)."""
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.25, 15)
    h = b.quant(b.node("AveragePool", [h], kernel_shape=[2, 2], strides=[2, 2]), 0.25, 15)
    path = tmp_path / "m.onnx"
    onnx.save(b.model(b.gemm(b.node("Flatten", [h], axis=1), 64, 10), (1, 10)), path)
    net, _ = compile_onnx(path)
    rng = np.random.default_rng(3)
    xs = (rng.integers(0, 17, (100, 1, 8, 8)) / 16).astype(np.float32)
    pop = [n for n in net.neurons()][-1]
    counts = semantics.run_counts(net, xs).counts[pop]
    pre = semantics.run_counts(net, xs).counts[[n for n in net.neurons()][0]]
    window_sum = pre.reshape(100, 4, 4, 2, 4, 2).sum(axis=(3, 5))
    tie = window_sum % 4 == 2  # mean = k + 1/2 exactly
    assert tie.any()
    expect_up = np.minimum(np.floor(window_sum / 4 + 0.5), 15)
    assert np.array_equal(counts, expect_up)  # half up everywhere, ties included
    assert not np.array_equal(counts, np.minimum(np.rint(window_sum / 4), 15))  # differs from half to even


def test_signed_operand_of_activation_product_is_lowered_exactly(tmp_path):
    """A symmetric -7..7 operand among 14-level quantizers keeps the offset form (counts 0..14, offset -7 steps): the
    product gets synapses for the offset (tests/compiler/test_products.py) and equals onnxruntime's."""
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    t = b.node("Reshape", [x, b.const(np.array([-1, 8, 8], np.int64))])
    h = b.node("MatMul", [t, b.qweight((8, 8), axis=1)])
    a = _signed_quant(b, h, 0.2, -7, 7)
    c = b.quant(b.node("MatMul", [t, b.qweight((8, 8), axis=1)]), 0.2, 14)
    m = b.quant(b.node("MatMul", [a, c]), 0.2, 14)
    net, rep, ref, snn = _compare(tmp_path, b.model(b.node("ReduceMean", [m], axes=[1], keepdims=0), (1, 8)))
    assert net.T == 14 and rep.error_bound < 0.5
    assert np.mean(ref.argmax(1) == snn.argmax(1)) == 1.0 and np.abs(ref - snn).max() < 1e-4


def test_logits_quantizer_applied_exactly(tmp_path):
    """A quantizer on the output with L == T levels becomes a neuron population; the offset of its
    signed range goes into the bias and back out at the readout: logits equal onnxruntime's."""
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.25, 15)
    y = b.gemm(b.node("Flatten", [h], axis=1), 256, 10)
    s, z = b.const(np.float32(0.4)), b.const(np.array(7, np.uint8))
    q = b.node("Clip", [b.node("QuantizeLinear", [y, s, z]), b.const(np.array(0, np.uint8)), b.const(np.array(15, np.uint8))])
    y = b.node("DequantizeLinear", [q, s, z])  # levels 0..15 around zero point 7: logits in [-2.8, 3.2]
    net, rep, ref, snn = _compare(tmp_path, b.model(y, (1, 10)))
    assert not rep.warnings
    assert np.mean(np.all(np.isclose(ref, snn, atol=1e-5), axis=1)) >= 0.99


def test_lsq_arithmetic_refusals(tmp_path):
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = b.conv(x, 1, 4)
    r = b.node("Round", [h])  # no Div by a step before it
    h2 = b.node("Mul", [b.node("Round", [b.node("Div", [b.conv(x, 1, 4), b.const(np.float32(0.2))])]),
                        b.const(np.float32(0.2))])  # no Clip: unbounded activation quantizer
    y = b.node("Add", [r, h2])
    onnx.save(b.model(b.gemm(b.node("Flatten", [y], axis=1), 256, 10), (1, 10)), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError) as exc:
        compile_onnx(tmp_path / "m.onnx")
    msg = str(exc.value)
    assert len(exc.value.problems) == 2
    assert "Div(x, s) -> Round -> Clip(lo, hi) -> Mul(s)" in msg and "both clip bounds" in msg


def test_torch_model_with_three_unsupported_ops_lists_all_with_fixes(tmp_path):
    import torch
    from torch import nn

    class Bad(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = P.LSQAct(16, 1 / 16, learn=False)
            self.fc = nn.Linear(64, 10)
            self.ln = nn.LayerNorm(10)

        def forward(self, x):  # type: ignore[no-untyped-def]
            y = self.ln(self.fc(torch.sigmoid(self.q(x).flatten(1))))
            return torch.softmax(y, -1)

    path = str(tmp_path / "bad.onnx")
    P._quiet_export(torch.onnx.export, Bad().eval(), (torch.zeros(1, 1, 8, 8),), path, dynamo=False, opset_version=17)
    with pytest.raises(UnsupportedModelError) as exc:
        compile_onnx(path)
    ops = sorted(p[1] for p in exc.value.problems)
    assert ops == ["LayerNormalization", "Sigmoid", "Softmax"]
    for fix in ("NReLU", "BatchNormalization", "ReLU followed by a quantizer"):
        assert fix in str(exc.value)


def test_explain_covers_every_source_node(tmp_path):
    path = P.build_route("brevitas-qcdq-torchscript", "attention", str(tmp_path))
    _, rep = compile_onnx(path)
    names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(onnx.load(path).graph.node)]
    assert set(names) <= set(rep.explain)
    assert all(rep.explain[n] for n in names)


# --- the corpus of export routes: compiled at default options, agreeing on every digits test image ----
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> str:
    """One export per route for the whole module (models are trained once per process, see producers.trained)."""
    return str(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("route", list(P.CORPUS))
def test_corpus_route_compiles_at_defaults_and_agrees_on_every_image(corpus_dir, route):
    """In-graph weight quantizers (QDQ and arithmetic, per channel and per tensor), Brevitas attention
    with an MLP at Brevitas' defaults (QCDQ TorchScript / dynamo, QONNX), torch.ao QAT (eager and FX), an MLP
    that flattens its input before the input quantizer (onnxruntime quantize_static, torch.ao, Brevitas)."""
    path = P.build_corpus_route(route, corpus_dir)
    _canonicalize_verified(path)
    r = P.evaluate_route(path, numba_vs_reference=True)
    assert r["numba_equals_reference"], route
    assert r["misses"] == [], r
    assert r["snn_acc"] >= 0.9, r


def _assert_same_network_without_value_info(full: str, stripped: str) -> None:
    """Shapes stripped from the file (``graph.value_info``; initializers untouched): the compiler finds
    them itself and builds the identical network, so agreement is the full file's."""
    assert not onnx.load(stripped).graph.value_info  # (torch.ao's TorchScript exports have none to begin with)
    nets = []
    for path in (stripped, full):
        net, _ = compile_onnx(path)
        nets.append(P.network_fingerprint(net))
    assert nets[0] == nets[1]
    x = P.load_digits_split("test")[0][:50]
    assert np.array_equal(P.reference_logits(stripped, x), P.reference_logits(full, x))


@pytest.mark.parametrize("route", [r + P.NO_VALUE_INFO for r in P.CORPUS])
def test_corpus_route_without_value_info_compiles_to_the_same_network(corpus_dir, route):
    _assert_same_network_without_value_info(P.build_corpus_route(route.removesuffix(P.NO_VALUE_INFO), corpus_dir),
                                            P.build_corpus_route(route, corpus_dir))


@pytest.mark.parametrize("route", ["brevitas-qcdq-dynamo", "brevitas-qonnx", "ort-uint8-perchannel"])
def test_attention_route_without_value_info_compiles_to_the_same_network(corpus_dir, route):
    """The attention routes above: Brevitas dynamo QCDQ and QONNX, onnxruntime quantize_static."""
    import os

    full = os.path.join(corpus_dir, f"{route}-attention.onnx")
    if not os.path.exists(full):
        P.build_route(route, "attention", corpus_dir)
    _assert_same_network_without_value_info(full, P.strip_value_info(full, full.replace(".onnx", "-no-value-info.onnx")))


@pytest.mark.parametrize("route", ["torchao-eager-torchscript", "brevitas-mlp-qcdq-dynamo"])
def test_corpus_logit_differences_trace_to_near_ties(corpus_dir, route):
    """Where logits differ from onnxruntime's at all, the first hidden level that differs (all levels
    before it equal) is one value, one level off, whose ``v / scale`` lies within 2^-8 of a level of
    a rounding boundary: rounding of a near-tie, not a wrong level."""
    rows = P.near_ties_behind_differences(P.build_corpus_route(route, corpus_dir), P.load_digits_split("test")[0])
    for r in rows:
        assert r["top1_same"] and r["quantizer"] is not None, r
        assert r["level_diff"] == 1 and r["distance"] < 2 ** -8, r


@pytest.mark.parametrize("route", [r for r in P.CORPUS if r.startswith("flatten-mlp")])
def test_flatten_mlp_routes_quantize_after_routing_and_encode_the_model_input(corpus_dir, route):
    """Every producer writes the MLP's input quantizer after the Flatten (TorchScript) or Reshape (dynamo): the
    network's encoder reads the model input (1, 8, 8) itself and the routing is an IR Reshape of its levels."""
    from csdc.ir.ops import Encode, Reshape

    path = P.build_corpus_route(route, corpus_dir)
    g = onnx.load(path).graph
    first = [n.op_type for n in g.node if g.input[0].name in n.input]
    assert first in (["Flatten"], ["Reshape"]), first
    canonical = _canonicalize_verified(path)
    assert [n.op_type for n in canonical.consumers()[canonical.input]] == ["Quant"]
    net, _ = compile_onnx(path)
    assert isinstance(net.op(net.input_name), Encode) and net.input_shape == (1, 8, 8)
    assert [type(net.op(c)) for c in net.consumers(net.input_name)] == [Reshape]


def test_torch_ao_unfused_qat_is_refused_naming_the_relus(corpus_dir):
    """Without conv-BN-ReLU fusion torch.ao quantizes the BatchNorm output with a zero point and applies
    the ReLU after it (``BN -> QDQ -> Relu -> MaxPool -> Conv``): a quantizer with fewer levels than T
    in effect, which one time window cannot hold. Refused, naming every such ReLU (fuse conv-BN-ReLU
    before prepare_qat, as torch.ao's tutorial does, and it compiles: torchao-eager-torchscript)."""
    import os

    path = os.path.join(corpus_dir, "torchao-eager-unfused-torchscript.onnx")
    P.export(P.trained("torchao_eager_unfused_cnn"), "torch-torchscript", path)
    with pytest.raises(UnsupportedModelError) as exc:
        compile_onnx(path)
    assert sorted(p[0] for p in exc.value.problems) == ["/r1/Relu", "/r2/Relu"]
    assert "right before an activation quantizer" in str(exc.value)


def test_torch_ao_fx_requantizers_are_removed(corpus_dir):
    """torch.ao FX QAT re-applies a shared FakeQuantize after MaxPool and Flatten and twice on the
    logits: those quantizers are identities and leave no population (one per ReLU, input, logits)."""
    g = _canonicalize_verified(P.build_corpus_route("torchao-fx-torchscript", corpus_dir))
    assert sum(n.op_type == "Quant" for n in g.nodes) == 4


def _requantized_model(narrow: bool) -> onnx.ModelProto:
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.25, 15)
    h = b.quant(b.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2]), 0.25, 15)  # identity: removed
    h = b.node("Flatten", [h], axis=1)
    if narrow:
        h = b.quant(h, 0.25, 7)  # a narrower range clips: kept
    h = b.quant(h, 0.2437, 15)  # another step (not commensurate: no rounding ties): kept
    y = b.gemm(h, 64, 10)
    return b.model(b.quant(b.quant(y, 0.4123, 15), 0.4123, 15), (1, 10))  # twice on the logits: the second removed


def test_requantizer_removed_only_when_it_is_an_identity(tmp_path):
    """Q -> MaxPool -> Flatten -> Q (same step and zero point, containing range) is removed, also on the
    graph output; a different step or a narrower range is a real quantizer and stays."""
    onnx.save(_requantized_model(narrow=True), tmp_path / "narrow.onnx")
    g = _canonicalize_verified(tmp_path / "narrow.onnx")
    quants = [(n.attrs["scale"], n.attrs["hi"]) for n in g.nodes if n.op_type == "Quant"]
    assert quants == [(1 / 16, 16), (0.25, 15), (0.25, 7), (pytest.approx(0.2437), 15), (pytest.approx(0.4123), 15)]
    model = _requantized_model(narrow=False)
    onnx.save(model, tmp_path / "m.onnx")
    g = _canonicalize_verified(tmp_path / "m.onnx")
    assert sum(n.op_type == "Quant" for n in g.nodes) == 4 and g.output == model.graph.output[0].name
    net, rep, ref, snn = _compare(tmp_path, model)
    assert np.all(np.isclose(ref, snn, atol=1e-5).all(1).mean() >= 0.99)
