"""Acceptance of the lowering of symmetric quantizers to ternary populations on models trained here on
digits (docs/signed_spikes.md): a QCDQ attention block with signed int8-style Q and K (Clip(-7, 7), zero
point 0), signed V and a signed ``A V`` quantizer, and the A²OS²A recipe (``csdc train --model a2os2a``).
Both compile at default options without the offset form (T = L, every signed quantizer a ternary
population) and agree with onnxruntime on the digits test split (numba, D = T); numba equals the
count-domain reference bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from csdc.backends.numba import NumbaBackend
from csdc.backends.reference import ReferenceBackend
from csdc.compiler.pipeline import compile_onnx
from csdc.ir.ops import TERNARY, Neuron, SpikeMatMul, TernaryNeuron
from csdc.runtime.datasets import load_digits_split
from csdc.runtime.evaluate import compare, run_dataset

torch = pytest.importorskip("torch")

from csdc.training.a2os2a import SignedActQuantizer, build_a2os2a, export_a2os2a_onnx  # noqa: E402
from csdc.training.loop import train  # noqa: E402
from csdc.training.transformer import build_csdformer, export_csdformer_onnx  # noqa: E402

SIGNED = ("q_q", "q_k", "q_v", "q_out")


def _signed_qk_model(levels: int = 7):
    """A CSDformer attention block (depth 1, d = 16, 2 heads) whose Q, K, V and A V quantizers are symmetric
    ``clip(round(x / s), -L, L)`` (QCDQ: QuantizeLinear int8 zero point 0 -> Clip(-L, L)); the attention map
    keeps NReLU, ``q(ReLU(Q K^T / sqrt(dk)) / N)`` in [0, L], trained 3 epochs on digits."""
    model = build_csdformer(0, depth=1, dim=16, heads=2, levels=levels, mlp_ratio=2.0, weight_bits=4)
    for name in SIGNED:
        setattr(model.blocks[0].attn, name, SignedActQuantizer(levels))
    x, y = load_digits_split("train")
    train(model, x, y, epochs=3, lr=5e-3, seed=0, progress=False)
    return model.eval()


def _check(path: str, signed: list[str], L: int, min_agreement: float) -> None:
    net, rep = compile_onnx(path)  # default options: D = T
    assert net.T == L  # the offset form of a symmetric quantizer would count 2L levels
    pops = {n: net.op(n) for n in net.neurons()}
    ternary = sorted(n for n, op in pops.items() if isinstance(op, TernaryNeuron))
    assert ternary == sorted(signed), (ternary, signed)
    assert all(type(op) is Neuron for n, op in pops.items() if n not in ternary)
    products = [n for n, op in net.nodes() if isinstance(op, SpikeMatMul)]
    assert any(net.info(i).kind == TERNARY for p in products for i in net.inputs(p))  # signed operands
    x, y = load_digits_split("test")
    out = run_dataset(net, NumbaBackend(), x, y, batch=150, progress=False)
    cmp = compare(path, out, x)
    assert cmp.agreement >= min_agreement, cmp
    assert out.summary.negative_spikes > 0  # the ternary populations do fire -1 spikes
    ref = ReferenceBackend().run(net, x[:100])
    fast = NumbaBackend().run(net, x[:100])
    assert np.array_equal(fast.readout, ref.readout)
    for name in ref.counts:
        assert np.array_equal(fast.counts[name], ref.counts[name]), name


def test_signed_qk_attention_compiles_to_ternary_populations_and_agrees(tmp_path):
    path = str(tmp_path / "signed_qk.onnx")
    export_csdformer_onnx(_signed_qk_model(), path)
    _check(path, [f"blocks/blocks.0/attn/{q}" for q in SIGNED], 7, 0.995)


def test_a2os2a_model_compiles_and_agrees_exactly(tmp_path):
    """The A²OS²A recipe at a small size (the README row is the default size, same test at 100 %)."""
    model = build_a2os2a(1, depth=1, dim=16, heads=2, levels=3, mlp_ratio=2.0, weight_bits=4)
    x, y = load_digits_split("train")
    train(model, x, y, epochs=3, lr=5e-3, seed=1, progress=False)
    path = str(tmp_path / "a2os2a.onnx")
    export_a2os2a_onnx(model.eval(), path)
    _check(path, ["blocks/blocks.0/attn/q_v", "blocks/blocks.0/attn/q_out"], 3, 1.0)
