"""The frontend folds constant subgraphs before judging ops, and gives every tensor a shape.

Models are exported by torch.onnx.export (TorchScript and dynamo) and Brevitas from hand-written
modules, as a user would: the producer corpus's weight fake-quantizers computed inside the graph
(per channel and per tensor; QDQ through ``torch.fake_quantize_per_*_affine`` and arithmetic
``Div -> Round -> Clip -> Mul``; tests/compiler/producers.py), and a Brevitas QCDQ attention block
whose shapes onnx shape inference cannot follow, compiled and run on the digits test split and
compared with onnxruntime.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from torch import nn

import producers as P
from onnx_build import Builder

from csdc.compiler.frontend import load_qgraph
from csdc.compiler.pipeline import CompileOptions, canonicalize, compile_onnx
from csdc.compiler.shapes import inferred_shapes
from csdc.errors import ModelFileError, UnsupportedModelError
from csdc.ir import semantics
from csdc.runtime.datasets import load_digits_split
from csdc.runtime.evaluate import onnx_logits


def _agreement(path: str) -> tuple[float, float, object]:
    """Compile, run the reference semantics on every digits test image, compare with onnxruntime:
    (argmax agreement, median |logit difference|, report). A float32 executor and the exact integer
    network may round a pre-activation lying on a level boundary differently, so single images may differ."""
    x, _ = load_digits_split("test")
    net, rep = compile_onnx(path)
    got = semantics.run_counts(net, x).logits
    ref = onnx_logits(path, x)
    return float(np.mean(got.argmax(1) == ref.argmax(1))), float(np.median(np.abs(got - ref))), rep


# ------------------------------------------------------------------------------ weight fake-quant
@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("corpus"))


@pytest.mark.parametrize("route", [r for r in P.CORPUS if r.startswith("ingraph-")])
def test_weight_quantizer_computed_in_the_graph_keeps_its_integers(corpus_dir, route):
    """The in-graph weight quantizers of the producer corpus (whose agreement with onnxruntime
    tests/compiler/test_producers.py checks on every image): TorchScript leaves the step's
    computation from the float weight in the graph (``Abs -> ReduceMax -> Div``), which is folded
    so that the canonical Linear nodes carry the model's own integers; dynamo folds the quantizer
    into float weights at export, whose integer grid is recovered exactly."""
    path = P.build_corpus_route(route, corpus_dir)
    ops = {n.op_type for n in onnx.load(path).graph.node}
    torchscript = route.endswith("-torchscript")
    if torchscript:
        assert "Abs" in ops and ops & {"ReduceMax", "Max"}
    graph = canonicalize(load_qgraph(path), CompileOptions(), contracts=True)
    linears = [n for n in graph.nodes if n.op_type == "Linear"]
    assert len(linears) == 3
    if torchscript:
        assert not any(n.attrs["weights_quantized_by_csdc"] for n in linears)
    else:
        assert all(n.attrs["weight_error"] < 1e-6 for n in linears)
    assert all(np.abs(n.attrs["w_int"]).max() <= 128 for n in linears)


def test_unsupported_op_on_constants_is_folded_but_on_data_is_refused(tmp_path):
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    # a float weight scaled by exp(0) * sqrt(1): ops with no spike-driven lowering, all on constants
    w = b.node("Mul", [b.const(b.rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32)),
                       b.node("Sqrt", [b.node("Exp", [b.const(np.zeros((4, 1, 1, 1), np.float32))])])])
    h = b.quant(b.node("Conv", [x, w], pads=[1] * 4, kernel_shape=[3, 3]), 0.25, 7)
    onnx.save(b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10)), tmp_path / "ok.onnx")
    net, _ = compile_onnx(tmp_path / "ok.onnx")
    assert net.neurons()
    b2 = Builder((1, 1, 8, 8))
    x = b2.quant("x", 1 / 16, 16)
    h = b2.quant(b2.node("Exp", [b2.conv(x, 1, 4)]), 0.25, 7)
    onnx.save(b2.model(b2.gemm(b2.node("Flatten", [h], axis=1), 256, 10), (1, 10)), tmp_path / "bad.onnx")
    with pytest.raises(UnsupportedModelError, match="op Exp"):
        compile_onnx(tmp_path / "bad.onnx")


# ------------------------------------------------------------------------------ shapes
class BrevitasBlock(nn.Module):
    """A QCDQ attention block as a user writes it with Brevitas: per-tensor int8 weights, float biases,
    3-D token MatMuls, NReLU attention, an MLP Linear(32->64)-ReLU-Linear(64->32) with residuals."""

    def __init__(self) -> None:
        super().__init__()
        import brevitas.nn as qnn
        from brevitas.quant import Int8WeightPerTensorFloat as W

        d = P.DIM

        def lin(i: int, o: int) -> nn.Module:
            return qnn.QuantLinear(i, o, bias=True, weight_quant=W)

        self.inq = qnn.QuantIdentity(bit_width=8)
        self.conv = qnn.QuantConv2d(1, d, 3, padding=1, bias=True, weight_quant=W)
        self.r0 = qnn.QuantReLU(bit_width=4)
        self.pool = nn.MaxPool2d(2)
        self.q, self.k, self.v, self.o = lin(d, d), lin(d, d), lin(d, d), lin(d, d)
        self.rq, self.rk, self.rv, self.ra, self.ro = (qnn.QuantReLU(bit_width=4) for _ in range(5))
        self.fc1, self.fc2 = lin(d, 64), lin(64, d)
        self.r1, self.rh, self.r2 = (qnn.QuantReLU(bit_width=4) for _ in range(3))
        self.head = lin(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.pool(self.r0(self.conv(self.inq(x)))).flatten(2).transpose(1, 2)  # (B, 16, 32) tokens
        q, k, v = self.rq(self.q(z)), self.rk(self.k(z)), self.rv(self.v(z))
        a = self.ra(torch.relu(torch.matmul(q, k.transpose(1, 2))) / 16)
        z = self.r1(z + self.o(self.ro(torch.matmul(a, v))))
        z = self.r2(z + self.fc2(self.rh(self.fc1(z))))
        return self.head(z.mean(1))


def test_brevitas_attention_whose_shapes_inference_cannot_follow(tmp_path):
    """At opset 13 the token flatten's Reshape target is beyond onnx's data propagation, so every
    token tensor after it has no inferred shape (this used to end in a KeyError in
    fold_batchnorm.linear_channel_axis); one onnxruntime run measures them."""
    pytest.importorskip("brevitas")
    torch.manual_seed(0)
    model = BrevitasBlock().eval()
    from csdc.training.loop import train

    x, y = load_digits_split("train")
    train(model, x, y, epochs=2, lr=1e-2, seed=0, progress=False)
    model.eval()
    path = str(tmp_path / "block.onnx")
    from brevitas.export import export_onnx_qcdq

    P._quiet_export(export_onnx_qcdq, model, torch.from_numpy(x[:4]), export_path=path, dynamo=False, input_names=["x"],
                    dynamic_axes={"x": {0: "batch"}}, opset_version=13)
    shapes, _ = inferred_shapes(onnx.load(path))
    assert "/fc1/MatMul_output_0" not in shapes  # inference alone leaves it unknown
    graph = load_qgraph(path)
    assert graph.shapes["/fc1/MatMul_output_0"] == (1, 16, 64)
    agree, _, rep = _agreement(path)
    assert agree >= 0.99, agree


def test_unknown_shape_that_cannot_be_measured_is_a_clear_error(tmp_path):
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.conv(x, 1, 4), 0.25, 7)
    # a Reshape target computed by Div, which onnx's data propagation does not follow, and wrong: 250 elements
    n = b.node("Div", [b.const(np.array([500], np.int64)), b.const(np.array([2], np.int64))])
    f = b.node("Reshape", [h, b.node("Concat", [b.const(np.array([-1], np.int64)), b.node("Mul", [n, b.node("Shape", [x], start=1, end=2)])], axis=0)])
    onnx.save(b.model(b.gemm(f, 256, 10), (1, 10)), tmp_path / "m.onnx")
    with pytest.raises(ModelFileError, match="running the model"):
        compile_onnx(tmp_path / "m.onnx")


@pytest.mark.parametrize("route", ["brevitas-qcdq-dynamo", "brevitas-qonnx", "torch-lsq-dynamo"])
def test_producer_attention_without_value_info_agrees(tmp_path, route):
    """Exporters that write value_info: the same models with it stripped compile to the same networks."""
    pytest.importorskip("brevitas")
    path = P.build_route(route, "attention", str(tmp_path))
    assert len(onnx.load(path).graph.value_info) > 0
    stripped = P.strip_value_info(path, str(tmp_path / "stripped.onnx"))
    x, _ = load_digits_split("test")
    net, _ = compile_onnx(stripped)
    got = semantics.run_counts(net, x).logits
    assert np.mean(got.argmax(1) == P.reference_logits(path, x).argmax(1)) >= 0.99
    reference_net, _ = compile_onnx(path)
    assert np.array_equal(got, semantics.run_counts(reference_net, x).logits)
