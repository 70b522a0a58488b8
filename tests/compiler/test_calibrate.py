"""``csdc compile --calibrate``: a float ONNX model is quantized by onnxruntime's quantize_static
(csdc.compiler.calibrate) and compiled; the QDQ model is written next to the network; a float model
without --calibrate, --calibrate with a quantized model, bad calibration data and a model that does
not compile after quantization are errors that leave nothing written."""

from __future__ import annotations

import json
import os

import numpy as np
import onnx
import pytest

from csdc.cli import main
from csdc.compiler.calibrate import is_float_model, qdq_path, quantize_static_qdq
from csdc.runtime.datasets import load_digits_split

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FLOAT_CNN = os.path.join(ROOT, "examples", "digits_cnn", "model_float.onnx")
QCDQ_CNN = os.path.join(ROOT, "examples", "digits_cnn", "model.onnx")
QDQ_CNN = os.path.join(ROOT, "examples", "digits_cnn", "model_qdq_static.onnx")


def test_qdq_path_is_next_to_the_output() -> None:
    assert qdq_path("out/net.sir") == "out/net.qdq.onnx"
    assert qdq_path("net") == "net.qdq.onnx"


def test_float_cnn_is_quantized_then_compiled(tmp_path, capsys) -> None:
    out = tmp_path / "cnn.sir"
    assert main(["compile", FLOAT_CNN, "--calibrate", "digits", "-o", str(out), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    qdq = tmp_path / "cnn.qdq.onnx"
    assert rep["calibration"] == {"qdq_model": str(qdq), "data": "digits", "images": 1347, "method": "MinMax",
                                  "activations": "uint8 asymmetric", "weights": "int8 symmetric per-channel"}
    assert rep["T"] == 255 and out.exists() and rep["source"] == "cnn.qdq.onnx"
    # what was compiled is what csdc.compiler.calibrate makes, i.e. the shipped quantize_static example
    assert qdq.read_bytes() == open(QDQ_CNN, "rb").read()
    assert not is_float_model(onnx.load(qdq))


def test_calibration_from_a_npz(tmp_path, capsys) -> None:
    x, y = load_digits_split("train")
    data = tmp_path / "calib.npz"
    np.savez(data, x=x[:200], y=y[:200])
    out = tmp_path / "cnn.sir"
    assert main(["compile", FLOAT_CNN, "--calibrate", str(data), "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert f"MinMax calibration on 200 images of {data}" in text and (tmp_path / "cnn.qdq.onnx").exists()
    x_te, y_te = load_digits_split("test")
    from csdc.runtime.evaluate import onnx_logits

    acc = np.mean(onnx_logits(str(tmp_path / "cnn.qdq.onnx"), x_te).argmax(1) == y_te)
    assert acc >= 0.95


def test_a_float_model_without_calibrate_names_the_option(tmp_path, capsys) -> None:
    out = tmp_path / "cnn.sir"
    assert main(["compile", FLOAT_CNN, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert "a float model" in err and "pass --calibrate DATA" in err and "quantize_static" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("model", [QCDQ_CNN, QDQ_CNN])
def test_calibrate_with_a_quantized_model_is_refused(tmp_path, capsys, model) -> None:
    out = tmp_path / "cnn.sir"
    assert main(["compile", model, "--calibrate", "digits", "-o", str(out)]) == 2
    assert "already quantized" in capsys.readouterr().err and os.listdir(tmp_path) == []


def test_bad_calibration_data_names_the_file(tmp_path, capsys) -> None:
    data = tmp_path / "calib.npz"
    np.savez(data, x=np.zeros((4, 1, 28, 28), np.float32))
    out = tmp_path / "cnn.sir"
    assert main(["compile", FLOAT_CNN, "--calibrate", str(data), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert str(data) in err and "(1, 28, 28)" in err
    assert main(["compile", FLOAT_CNN, "--calibrate", "mnist5k", "-o", str(out)]) == 2
    assert "--calibrate mnist5k: its images have shape (1, 28, 28)" in capsys.readouterr().err
    assert main(["compile", FLOAT_CNN, "--calibrate", "nosuchset", "-o", str(out)]) == 2
    assert "not a built-in data set" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["calib.npz"]


def test_a_model_that_fails_to_compile_after_quantization_leaves_nothing(tmp_path, capsys) -> None:
    torch = pytest.importorskip("torch")
    from torch import nn

    from csdc.training.export import export_module

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Linear(16, 10), nn.LogSoftmax(dim=1)).eval()
    src = tmp_path / "logsoftmax.onnx"
    export_module(model, torch.zeros(1, 1, 8, 8), src)
    out = tmp_path / "net.sir"
    assert main(["compile", str(src), "--calibrate", "digits", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert f"{src} (quantized by --calibrate)" in err and "LogSoftmax" in err
    assert sorted(os.listdir(tmp_path)) == ["logsoftmax.onnx"]


def test_quantize_static_failure_is_a_csdc_error(tmp_path) -> None:
    from csdc.errors import CsdcError

    with pytest.raises(CsdcError, match="no calibration images"):
        quantize_static_qdq(FLOAT_CNN, np.zeros((0, 1, 8, 8), np.float32))


def test_the_network_equals_the_qdq_model_written_next_to_it(tmp_path, capsys) -> None:
    """The user's check after --calibrate: csdc run --compare net.qdq.onnx (reference backend, exact)."""
    out = tmp_path / "cnn.sir"
    assert main(["compile", FLOAT_CNN, "--calibrate", "digits", "-o", str(out)]) == 0
    capsys.readouterr()
    assert main(["run", str(out), "--backend", "reference", "--data", "digits", "--compare",
                 str(tmp_path / "cnn.qdq.onnx"), "--json"]) == 0
    run = json.loads(capsys.readouterr().out)
    assert run["samples"] == 450 and run["comparison"]["agreement"] == 1.0
    assert run["accuracy"] == run["comparison"]["onnx_accuracy"] >= 0.95


def test_without_the_nonlinear_flag_the_vit_refusal_names_it(tmp_path, capsys) -> None:
    """A standard ViT, quantized by --calibrate, without --nonlinear mbe: every LayerNorm, Softmax and GELU
    node is refused, each naming the flag; nothing is written."""
    vit = os.path.join(ROOT, "examples", "vit", "digits_vit_opset20.onnx")
    out = tmp_path / "vit.sir"
    assert main(["compile", vit, "--calibrate", "digits", "-o", str(out)]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("  - node")]
    ops = sorted(ln.split("(op ")[1].split(")")[0] for ln in lines)
    assert ops == ["Gelu"] * 2 + ["LayerNormalization"] * 5 + ["Softmax"] * 2
    assert all("--nonlinear mbe" in ln for ln in lines)
    assert f"{vit} (quantized by --calibrate)" in err and os.listdir(tmp_path) == []


def test_the_qdq_model_never_overwrites_the_float_model(tmp_path, capsys) -> None:
    src = tmp_path / "cnn.qdq.onnx"  # a float model that happens to carry that name
    src.write_bytes(open(FLOAT_CNN, "rb").read())
    assert main(["compile", str(src), "--calibrate", "digits", "-o", str(tmp_path / "cnn.sir")]) == 2
    assert "over the float model" in capsys.readouterr().err
    assert src.read_bytes() == open(FLOAT_CNN, "rb").read() and sorted(os.listdir(tmp_path)) == ["cnn.qdq.onnx"]
