"""The A²OS²A-style transformer (csdc.training.a2os2a): signed LSQ quantizers, attention with
unsigned Q and K, symmetric V and A V, no scaling and no softmax; QCDQ export that onnxruntime
runs; ``csdc train --model a2os2a``."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from csdc.runtime.datasets import load_digits_split

torch = pytest.importorskip("torch")

from csdc.training.a2os2a import A2OS2AFormer, SignedActQuantizer, build_a2os2a, export_a2os2a_onnx  # noqa: E402
from csdc.training.loop import onnx_predict, predict_logits, train  # noqa: E402

TINY = {"depth": 1, "dim": 16, "heads": 2, "levels": 3, "mlp_ratio": 2.0, "weight_bits": 4}
FORBIDDEN = {"Softmax", "LayerNormalization", "Gelu", "Sigmoid", "Erf", "Tanh", "Div", "Sqrt", "Pow", "Mul"}


def _quantizers(proto: onnx.ModelProto) -> dict[str, tuple[int, int, int]]:
    """QuantizeLinear node name -> (zero point dtype is signed, Clip lo, Clip hi)."""
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    consts = {n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in proto.graph.node if n.op_type == "Constant"}
    values = {**inits, **consts}
    clips = {n.input[0]: n for n in proto.graph.node if n.op_type == "Clip"}
    out = {}
    for n in proto.graph.node:
        if n.op_type == "QuantizeLinear" and n.output[0] in clips:
            clip = clips[n.output[0]]
            zp = values[n.input[2]]
            out[n.name] = (int(zp.dtype == np.int8), int(values[clip.input[1]]), int(values[clip.input[2]]))
    return out


def test_signed_quantizer_is_symmetric_and_learns_its_step() -> None:
    q = SignedActQuantizer(3)
    x = torch.linspace(-5, 5, 101, requires_grad=True)
    y = q(x)  # training mode: initialises the step, straight-through rounding
    s = float(q.step.detach())
    assert s > 0 and torch.allclose(y.detach(), torch.round(x.detach() / s).clamp(-3, 3) * s)
    y.sum().backward()
    assert q.step.grad is not None and x.grad is not None
    q.eval()
    assert torch.equal(q(-x.detach()), -q(x.detach()))  # round half to even is odd-symmetric
    with pytest.raises(ValueError, match="1..127"):
        SignedActQuantizer(128)


def test_tiny_model_trains_and_its_qcdq_export_runs_in_onnxruntime() -> None:
    x_tr, y_tr = load_digits_split("train")
    x_te, y_te = load_digits_split("test")
    model = build_a2os2a(1, **TINY)
    assert isinstance(model, A2OS2AFormer)
    train(model, x_tr, y_tr, epochs=2, lr=5e-3, seed=1, progress=False)
    proto = export_a2os2a_onnx(model)
    ops = {n.op_type for n in proto.graph.node}
    assert not ops & FORBIDDEN, ops & FORBIDDEN  # no softmax, no scaling constant
    quant = _quantizers(proto)
    signed = {k for k, v in quant.items() if v[0]}
    assert signed == {"/blocks/blocks.0/attn/q_v/QuantizeLinear", "/blocks/blocks.0/attn/q_out/QuantizeLinear"}
    assert all(quant[k][1:] == (-3, 3) for k in signed)
    assert quant.pop("/inq/QuantizeLinear")[1:] == (0, 16)  # the input: pixels k/16
    assert all(v[1:] == (0, 3) for k, v in quant.items() if k not in signed)
    pt = predict_logits(model, x_te)
    ox = onnx_predict(proto, x_te)
    assert np.mean(pt.argmax(1) == ox.argmax(1)) >= 0.99
    assert np.mean(ox.argmax(1) == y_te) > 0.5  # it learned something in 2 epochs


def test_cli_train_a2os2a(tmp_path, capsys) -> None:
    from csdc.cli import main

    out = tmp_path / "a2os2a.onnx"
    assert main(["train", "--model", "a2os2a", "--depth", "1", "--dim", "16", "--heads", "2", "--levels", "3",
                 "--epochs", "1", "--no-progress", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("training A2OS2A-1-16") and "ONNX accuracy" in text
    x_te, _ = load_digits_split("test")
    assert onnx_predict(str(out), x_te[:10]).shape == (10, 10)
