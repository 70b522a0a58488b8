"""Elementwise products of two quantized activations (``Mul`` of two tensors, as LayerNorm's and softmax's
decompositions need): a TDEC ``SpikeMatMul`` with K = 1 per element, checked against onnxruntime."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from csdc.backends.numba import NumbaBackend
from csdc.compiler.pipeline import compile_onnx
from csdc.errors import UnsupportedModelError
from csdc.ir import SpikeMatMul
from csdc.runtime.evaluate import onnx_logits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from onnx_build import Builder  # noqa: E402


def gated_cnn(signed_gate: bool = False, seed: int = 0) -> onnx.ModelProto:
    """x -> q -> [conv -> BN -> q(a)] * [conv -> BN -> q(b)] -> q(product) -> Flatten -> Gemm (QCDQ, 7 levels)."""
    b = Builder((1, 1, 8, 8), seed=seed)
    x = b.quant("x", 1 / 16, 16)
    a = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.25, 7)
    if signed_gate:  # levels 0..7 around zero point 3: a signed quantizer (offset form)
        s, z = b.const(np.float32(0.2), "s"), b.const(np.array(3, dtype=np.uint8), "zp")
        q = b.node("QuantizeLinear", [b.bn(b.conv(x, 1, 4), 4), s, z])
        q = b.node("Clip", [q, b.const(np.array(0, dtype=np.uint8)), b.const(np.array(7, dtype=np.uint8))])
        g = b.node("DequantizeLinear", [q, s, z])
    else:
        g = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.2, 7)
    p = b.quant(b.node("Mul", [a, g]), 0.15, 7)
    return b.model(b.gemm(b.node("Flatten", [p], axis=1), 256, 10), (1, 10))


def test_product_of_two_activations_equals_onnxruntime(tmp_path: Path) -> None:
    onnx.save(gated_cnn(), tmp_path / "m.onnx")
    net, _ = compile_onnx(tmp_path / "m.onnx")
    products = [n for n, op in net.nodes() if isinstance(op, SpikeMatMul)]
    assert len(products) == 1 and net.info(net.inputs(products[0])[0]).shape == (4, 8, 8, 1, 1)
    x = np.random.default_rng(0).uniform(-0.2, 1.2, size=(64, 1, 8, 8)).astype(np.float32)
    got = NumbaBackend().run(net, x)
    ref = onnx_logits(tmp_path / "m.onnx", x)
    assert np.mean(got.logits.argmax(1) == ref.argmax(1)) == 1.0
    assert np.abs(got.logits - ref).max() < 1e-4  # exact: the same levels, float rounding of the logits aside


def test_product_with_a_signed_operand_is_refused_by_name(tmp_path: Path) -> None:
    onnx.save(gated_cnn(signed_gate=True), tmp_path / "s.onnx")
    with pytest.raises(UnsupportedModelError, match=r"Mul.*signed quantizer.*non-negative counts"):
        compile_onnx(tmp_path / "s.onnx")
