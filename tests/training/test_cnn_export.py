"""Tests of csdc.training: LSQ quantizers, the digits CNN, its QCDQ / float export,
onnxruntime quantize_static, and the shipped example models."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from csdc.runtime.datasets import load_digits_split

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE = os.path.join(ROOT, "examples", "digits_cnn")


# ----------------------------------------------------------------------------- helpers


def _ort_logits(model: onnx.ModelProto | str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    src = model.SerializeToString() if isinstance(model, onnx.ModelProto) else model
    sess = ort.InferenceSession(src, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _consumers(model: onnx.ModelProto) -> dict[str, list[onnx.NodeProto]]:
    out: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            out.setdefault(i, []).append(n)
    return out


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def _qcdq_chains(model: onnx.ModelProto) -> list[tuple[float, int]]:
    """(scale, L) of every QuantizeLinear -> Clip -> DequantizeLinear activation chain."""
    inits = _inits(model)
    cons = _consumers(model)
    chains = []
    for q in model.graph.node:
        if q.op_type != "QuantizeLinear":
            continue
        (clip,) = cons[q.output[0]]
        assert clip.op_type == "Clip"
        (dq,) = cons[clip.output[0]]
        assert dq.op_type == "DequantizeLinear"
        scale, zp = inits[q.input[1]], inits[q.input[2]]
        assert scale.shape == () and scale > 0
        assert zp.dtype == np.uint8 and zp.shape == () and zp == 0
        lo, hi = inits[clip.input[1]], inits[clip.input[2]]
        assert lo.dtype == hi.dtype == np.uint8 and lo == 0
        assert dq.input[1] == q.input[1] and dq.input[2] == q.input[2]
        chains.append((float(scale), int(hi)))
    return chains


def _check_weight_dq(model: onnx.ModelProto, bits: int) -> int:
    """Every weight DequantizeLinear: int8 initializer, per-channel scale, axis 0."""
    inits = _inits(model)
    count = 0
    qmax = 2 ** (bits - 1) - 1
    for n in model.graph.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            w = inits[n.input[0]]
            s = inits[n.input[1]]
            assert w.dtype == np.int8 and np.abs(w).max() <= qmax
            assert s.shape == (w.shape[0],) and np.all(s > 0)
            assert np.all(inits[n.input[2]] == 0)
            axis = {a.name: a.i for a in n.attribute}.get("axis", 1)
            assert axis == 0
            count += 1
    return count


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    x_tr, y_tr = load_digits_split("train")
    x_te, y_te = load_digits_split("test")
    return x_tr, y_tr, x_te, y_te


@pytest.fixture(scope="module")
def tiny_qat(digits):
    """A QAT CNN trained for 3 epochs (about a second)."""
    pytest.importorskip("torch")
    from csdc.training.cnn import build_cnn, train

    x_tr, y_tr, x_te, y_te = digits
    model = build_cnn(0, levels=15)
    hist = train(model, x_tr, y_tr, epochs=3, lr=1e-2, seed=0, progress=False, eval_data=(x_te, y_te))
    return model, hist


# ----------------------------------------------------------------------------- LSQ


def test_act_quantizer_eval_is_lsq_with_half_to_even() -> None:
    torch = pytest.importorskip("torch")
    from csdc.training.lsq import ActQuantizer

    q = ActQuantizer(15, step=0.5, learn=False).eval()
    x = torch.tensor([-1.0, 0.24, 0.25, 0.75, 1.25, 3.3, 7.25, 7.75, 100.0])
    # x / s = -2, .48, .5, 1.5, 2.5, 6.6, 14.5, 15.5, 200 -> half to even, clip to 0..15
    expected = torch.tensor([0, 0, 0, 2, 2, 7, 14, 15, 15], dtype=torch.float32) * 0.5
    assert torch.equal(q(x), expected)


def test_act_quantizer_init_grad_and_ste() -> None:
    torch = pytest.importorskip("torch")
    from csdc.training.lsq import ActQuantizer

    q = ActQuantizer(15).train()
    x = (torch.arange(2 * 3 * 4, dtype=torch.float32).reshape(2, 3, 4) - 5.0).requires_grad_(True)
    y = q(x)
    s0 = 2 * x.detach().abs().mean() / 15**0.5
    assert torch.allclose(q.step.detach(), s0) and bool(q.initialized)
    y.sum().backward()
    v = x.detach() / q.step.detach()
    inside = (v >= 0) & (v <= 15)
    assert torch.equal(x.grad, inside.float())  # straight-through inside the range only
    # LSQ step gradient: sum over elements of d q/d s, times g = 1/sqrt(numel_per_sample * L)
    g = 1 / (12 * 15) ** 0.5
    dq_ds = torch.where(v < 0, torch.zeros_like(v), torch.where(v > 15, torch.full_like(v, 15.0),
                                                                  torch.round(v) - v))
    assert torch.allclose(q.step.grad, dq_ds.sum() * g, atol=1e-5)
    # a second training batch does not re-initialise the step
    q(x * 10)
    assert torch.allclose(q.step.detach(), s0)


def test_weight_quantizer_per_channel() -> None:
    torch = pytest.importorskip("torch")
    from csdc.training.lsq import WeightQuantizer

    torch.manual_seed(0)
    w = torch.randn(4, 3, 3, 3) * torch.tensor([0.1, 1.0, 10.0, 0.01]).reshape(4, 1, 1, 1)
    q = WeightQuantizer(4, bits=4).eval()
    wq = q(w)
    s = q.step.detach()
    assert torch.allclose(s, 2 * w.abs().reshape(4, -1).mean(1) / 7**0.5)
    ints = q.integer_weight(w)
    assert ints.dtype == torch.int8 and int(ints.abs().max()) <= 7
    assert torch.equal(wq, ints.float() * s.reshape(4, 1, 1, 1))
    with pytest.raises(ValueError):
        WeightQuantizer(4, bits=9)


# ----------------------------------------------------------------------------- QCDQ export


def test_qcdq_node_pattern(tiny_qat) -> None:
    from csdc.training.cnn import export_qcdq_onnx

    model, _ = tiny_qat
    m = export_qcdq_onnx(model)
    onnx.checker.check_model(m, full_check=True)
    assert max(o.version for o in m.opset_import if o.domain in ("", "ai.onnx")) >= 13
    ops = [n.op_type for n in m.graph.node]
    assert ops == [
        "QuantizeLinear", "Clip", "DequantizeLinear",
        "DequantizeLinear", "Conv", "BatchNormalization",
        "QuantizeLinear", "Clip", "DequantizeLinear", "MaxPool",
        "DequantizeLinear", "Conv", "BatchNormalization",
        "QuantizeLinear", "Clip", "DequantizeLinear", "MaxPool",
        "Flatten", "DequantizeLinear", "Gemm",
    ]
    chains = _qcdq_chains(m)
    assert chains[0] == (1 / 16, 16)  # the exact input quantizer
    assert [c[1] for c in chains[1:]] == [15, 15]
    assert _check_weight_dq(m, 4) == 3
    assert [i.name for i in m.graph.input] == ["input"]
    assert [o.name for o in m.graph.output] == ["logits"]
    dims = [d.dim_param or d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["N", 1, 8, 8]
    assert not any(n.op_type == "Constant" for n in m.graph.node)


def test_onnxruntime_agrees_with_torch_eval(tiny_qat, digits) -> None:
    from csdc.training.cnn import export_qcdq_onnx, predict_logits

    model, hist = tiny_qat
    _, _, x_te, _ = digits
    m = export_qcdq_onnx(model)
    pt = predict_logits(model, x_te)
    ox = _ort_logits(m, x_te)
    agreement = np.mean(pt.argmax(1) == ox.argmax(1))
    assert agreement >= 0.999
    assert np.abs(pt - ox).max() < 1e-3
    assert hist.test_acc[-1] > 0.8  # the tiny model did learn something


def test_export_leaves_model_usable(tiny_qat, digits, tmp_path) -> None:
    from csdc.training.cnn import evaluate, export_qcdq_onnx

    model, _ = tiny_qat
    _, _, x_te, y_te = digits
    before = evaluate(model, x_te, y_te)
    path = tmp_path / "sub" / "m.onnx"
    export_qcdq_onnx(model, path)
    assert path.exists() and not [p for p in os.listdir(path.parent) if p.startswith(".tmp")]
    buffers = "".join(dict(model.named_buffers()).keys())
    assert "int_weight" not in buffers and "export_scale" not in buffers
    assert not any(getattr(mod, "_export", False) for mod in model.modules())
    assert evaluate(model, x_te, y_te) == before


def test_same_seed_same_onnx_bytes(digits) -> None:
    pytest.importorskip("torch")
    from csdc.training.cnn import build_cnn, export_qcdq_onnx, train

    x_tr, y_tr, _, _ = digits
    x_tr, y_tr = x_tr[:400], y_tr[:400]
    blobs = []
    for seed in (3, 3, 4):
        m = build_cnn(seed, levels=7)
        train(m, x_tr, y_tr, epochs=1, lr=1e-2, seed=seed, progress=False)
        blobs.append(export_qcdq_onnx(m).SerializeToString())
    assert blobs[0] == blobs[1]
    assert blobs[0] != blobs[2]


def test_pool_before_quant_variant_exports(digits) -> None:
    pytest.importorskip("torch")
    from csdc.training.cnn import build_cnn, export_qcdq_onnx, predict_logits, train

    x_tr, y_tr, x_te, _ = digits
    model = build_cnn(1, levels=15, pool_before_quant=True)
    train(model, x_tr, y_tr, epochs=1, lr=1e-2, seed=1, progress=False)
    m = export_qcdq_onnx(model)
    ops = [n.op_type for n in m.graph.node]
    assert ops == [
        "QuantizeLinear", "Clip", "DequantizeLinear",
        "DequantizeLinear", "Conv", "BatchNormalization", "Relu", "MaxPool",
        "QuantizeLinear", "Clip", "DequantizeLinear",
        "DequantizeLinear", "Conv", "BatchNormalization", "Relu", "MaxPool",
        "QuantizeLinear", "Clip", "DequantizeLinear",
        "Flatten", "DequantizeLinear", "Gemm",
    ]
    assert [c[1] for c in _qcdq_chains(m)] == [16, 15, 15]
    pt = predict_logits(model, x_te)
    assert np.mean(pt.argmax(1) == _ort_logits(m, x_te).argmax(1)) >= 0.999


def test_export_rejects_non_positive_activation_step() -> None:
    torch = pytest.importorskip("torch")
    from csdc.training.cnn import build_cnn, export_qcdq_onnx

    model = build_cnn(0)
    with torch.no_grad():
        model.q2.step.fill_(-0.5)
    with pytest.raises(ValueError, match="q2"):
        export_qcdq_onnx(model)
    assert not any(getattr(mod, "_export", False) for mod in model.modules())


def test_negative_weight_step_exports_positive_scale(digits) -> None:
    torch = pytest.importorskip("torch")
    from csdc.training.cnn import build_cnn, export_qcdq_onnx, predict_logits

    _, _, x_te, _ = digits
    model = build_cnn(0).eval()
    model.conv2.wq(model.conv2.weight)  # initialise
    with torch.no_grad():
        model.conv2.wq.step[::2] *= -1
    m = export_qcdq_onnx(model)
    _check_weight_dq(m, 4)  # scales > 0
    assert np.allclose(predict_logits(model, x_te[:40]), _ort_logits(m, x_te[:40]), atol=1e-4)


def test_float_export_and_guards(digits) -> None:
    pytest.importorskip("torch")
    from csdc.training.cnn import (
        build_cnn,
        export_float_onnx,
        export_qcdq_onnx,
        predict_logits,
    )

    _, _, x_te, _ = digits
    flt = build_cnn(0, quantize=False).eval()
    m = export_float_onnx(flt)
    assert [n.op_type for n in m.graph.node] == [
        "Conv", "Relu", "MaxPool", "Conv", "Relu", "MaxPool", "Flatten", "Gemm"]
    assert np.allclose(predict_logits(flt, x_te[:50]), _ort_logits(m, x_te[:50]), atol=1e-4)
    with pytest.raises(ValueError):
        export_qcdq_onnx(flt)
    with pytest.raises(ValueError):
        export_float_onnx(build_cnn(0))


# ----------------------------------------------------------------------------- quantize_static


def test_quantize_static_of_shipped_float_model(digits, tmp_path) -> None:
    pytest.importorskip("torch")
    from csdc.training.cnn import quantize_static_model

    x_tr, _, x_te, y_te = digits
    out = tmp_path / "qdq.onnx"
    m = quantize_static_model(os.path.join(EXAMPLE, "model_float.onnx"), x_tr, out)
    assert out.exists()
    ops = [n.op_type for n in m.graph.node]
    assert "Relu" not in ops and ops.count("Conv") == 2 and ops.count("QuantizeLinear") >= 5
    inits = _inits(m)
    for n in m.graph.node:  # weights: int8 per channel; activations: uint8
        if n.op_type == "Conv":
            (dq,) = [d for d in m.graph.node if n.input[1] in d.output]
            assert inits[dq.input[0]].dtype == np.int8 and inits[dq.input[1]].ndim == 1
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[2]].dtype == np.uint8
    acc = np.mean(_ort_logits(m, x_te).argmax(1) == y_te)
    assert acc >= 0.95


# ----------------------------------------------------------------------------- shipped models


@pytest.mark.parametrize("name", ["model.onnx", "model_float.onnx", "model_qdq_static.onnx"])
def test_shipped_models_accuracy(name: str, digits) -> None:
    _, _, x_te, y_te = digits
    path = os.path.join(EXAMPLE, name)
    m = onnx.load(path)
    onnx.checker.check_model(m, full_check=True)
    acc = np.mean(_ort_logits(path, x_te).argmax(1) == y_te)
    assert acc >= 0.95, f"{name}: {acc:.4f}"


def test_shipped_qcdq_pattern() -> None:
    m = onnx.load(os.path.join(EXAMPLE, "model.onnx"))
    chains = _qcdq_chains(m)
    assert chains[0] == (1 / 16, 16) and [c[1] for c in chains[1:]] == [15, 15]
    assert _check_weight_dq(m, 4) == 3
    assert [n.op_type for n in m.graph.node].count("BatchNormalization") == 2


def test_shipped_readme_matches_files() -> None:
    import hashlib

    text = Path(EXAMPLE, "README.md").read_text(encoding="utf-8")
    assert "python examples/digits_cnn/train.py" in text
    for name in ("model.onnx", "model_float.onnx", "model_qdq_static.onnx"):
        digest = hashlib.sha256(Path(EXAMPLE, name).read_bytes()).hexdigest()
        assert f"{digest}  {name}" in text
