"""Structural lowering: typed pending terms, the handlers' refusals, regressions."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx_build import Builder

from csdc.compiler.lower import DenseTerm, DiagTerm, FixedTerm
from csdc.compiler.pipeline import compile_onnx
from csdc.ir import semantics
from csdc.ir.ops import ReduceSum
from csdc.runtime.evaluate import onnx_logits


def _agree(tmp_path, model: onnx.ModelProto, n: int = 200):
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    net, rep = compile_onnx(path)
    rng = np.random.default_rng(5)
    x = (rng.integers(0, 17, (n, *net.input_shape)) / 16).astype(np.float32)
    return net, rep, onnx_logits(path, x), semantics.run_counts(net, x).logits


def _two_heads(op: str, const: float) -> onnx.ModelProto:
    """GlobalAveragePool -> Flatten -> (Gemm + Gemm) -> Mul/Div by a constant: two averaged heads."""
    b = Builder((1, 1, 8, 8), seed=3)
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 8), 8), 0.25, 7)
    f = b.node("Flatten", [b.node("GlobalAveragePool", [h])], axis=1)
    s = b.node("Add", [b.gemm(f, 8, 10), b.gemm(f, 8, 10)])
    return b.model(b.node(op, [s, b.const(np.float32(const))]), (1, 10))


@pytest.mark.parametrize("op,const", [("Mul", 0.5), ("Div", 2.0), ("Mul", 0.37)])
def test_scaled_sum_of_pooled_heads_keeps_the_reduction(tmp_path, op, const):
    """Bug: Mul/Div rebuilt each pending term field by field and dropped ``reduce``, so the readout
    got a (positions, classes) current (IRError: Readout scale/offset must be 1-D)."""
    net, rep, ref, got = _agree(tmp_path, _two_heads(op, const))
    assert sum(isinstance(o, ReduceSum) for _, o in net.nodes()) >= 1
    assert net.info(net.output_name).shape == (10,)
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.99
    assert np.max(np.abs(ref - got)) < 1e-3 * np.abs(ref).max()


def test_terms_are_frozen_and_replace_keeps_every_field():
    t = DenseTerm("src", np.ones((1, 4)), np.ones((4, 3), np.int8), 7.0, origin="fc", reduce=(0,))
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.unit = np.zeros(1)  # type: ignore[misc]
    scaled = dataclasses.replace(t, unit=t.unit * 0.5)
    assert scaled.reduce == (0,) and scaled.origin == "fc" and scaled.count_max == 7.0
    assert scaled.w_int is t.w_int and np.all(scaled.unit == 0.5)
    d = dataclasses.replace(DiagTerm("s", np.ones(1), 3.0, reduce=(1,)), unit=np.full(1, 2.0))
    assert d.reduce == (1,)
    f = FixedTerm("n", np.ones(1), np.zeros(1), "site")
    assert {fl.name for fl in dataclasses.fields(f)} == {"src", "unit", "error", "site"}
