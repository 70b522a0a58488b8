"""End to end through the command line: models that flatten or reshape their input before its quantizer
(compiled by move_input_quant) and models that take the digits flattened, (N, 64), compile, run on the
built-in digits set and agree with onnxruntime on the model they were compiled from."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import onnx
import pytest

from csdc.cli import main

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "compiler"))
from onnx_build import Builder  # noqa: E402


def _compile_run_compare(capsys, argv_compile: list[str], sir: str, reference: str, backend: str = "numba") -> dict:
    assert main(argv_compile) == 0, capsys.readouterr().err
    capsys.readouterr()
    assert main(["run", sir, "--backend", backend, "--data", "digits", "--compare", reference, "--json"]) == 0, \
        capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def test_torch_flatten_mlp_calibrated_compiles_runs_and_agrees(tmp_path, capsys):
    """The user's path: a float torch MLP (``nn.Flatten()`` first), ``csdc compile --calibrate digits`` (onnxruntime
    quantize_static puts the input's QuantizeLinear after the Flatten), ``csdc run --data digits --compare``."""
    pytest.importorskip("torch")
    import producers as P

    float_path = str(tmp_path / "mlp.onnx")
    P.export(P.trained("float_mlp"), "torch-torchscript", float_path)
    sir = str(tmp_path / "mlp.sir")
    s = _compile_run_compare(capsys, ["compile", float_path, "--calibrate", "digits", "-o", sir], sir,
                             str(tmp_path / "mlp.qdq.onnx"))
    qdq = onnx.load(tmp_path / "mlp.qdq.onnx").graph
    assert [n.op_type for n in qdq.node if qdq.input[0].name in n.input] == ["Flatten"]  # the quantizer follows it
    assert s["samples"] == 450 and s["comparison"]["agreement"] == 1.0
    assert s["accuracy"] >= 0.9 and s["comparison"]["max_abs_logit_diff"] < 1e-4



def test_torch_channels_last_cnn_calibrated_compiles_runs_and_agrees(tmp_path, capsys):
    """A CNN that takes its images channels-last, (N, 8, 8, 1), and permutes them to NCHW first: quantize_static puts
    the input's QuantizeLinear after the Transpose; ``--data digits`` is laid out as (8, 8, 1). Random weights (seed
    0): the agreement is the point."""
    torch = pytest.importorskip("torch")
    from torch import nn

    import producers as P

    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.relu, self.fc = nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Linear(8 * 64, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(self.relu(self.conv(x.permute(0, 3, 1, 2))).flatten(1))

    from csdc.training.loop import build_seeded

    path = str(tmp_path / "nhwc.onnx")
    P._quiet_export(torch.onnx.export, build_seeded(0, ChannelsLast).eval(), (torch.zeros(2, 8, 8, 1),), path, dynamo=False,
                    input_names=["x"], dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    sir = str(tmp_path / "nhwc.sir")
    s = _compile_run_compare(capsys, ["compile", path, "--calibrate", "digits", "-o", sir], sir, str(tmp_path / "nhwc.qdq.onnx"),
                             "reference")
    qdq = onnx.load(tmp_path / "nhwc.qdq.onnx").graph
    assert [n.op_type for n in qdq.node if qdq.input[0].name in n.input] == ["Transpose"]
    assert s["samples"] == 450 and s["comparison"]["agreement"] == 1.0

def _flat_input_qdq_mlp() -> onnx.ModelProto:
    """A QDQ MLP whose input is the digits flattened: (n, 64) -> QDQ -> Gemm -> QDQ -> Gemm."""
    b = Builder((1, 64))
    h = b.quant(b.gemm(b.quant("x", 1 / 16, 16), 64, 32), 0.15, 16)
    return b.model(b.gemm(h, 32, 10), (1, 10))


@pytest.mark.parametrize("backend", ["numba", "reference"])
def test_flattened_input_model_runs_on_the_digits_set(tmp_path, capsys, backend):
    """``--data digits`` lays the 8x8 images out as the network's (64,) input (row-major, as nn.Flatten does)."""
    path = str(tmp_path / "flat.onnx")
    onnx.save(_flat_input_qdq_mlp(), path)
    sir = str(tmp_path / "flat.sir")
    s = _compile_run_compare(capsys, ["compile", path, "-o", sir], sir, path, backend)
    assert s["samples"] == 450 and s["comparison"]["agreement"] == 1.0


def test_flattened_input_float_model_calibrates_on_the_digits_set(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from torch import nn

    import producers as P

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    path = str(tmp_path / "flat.onnx")
    P._quiet_export(torch.onnx.export, model, (torch.zeros(2, 64),), path, dynamo=False, input_names=["x"],
                    dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    sir = str(tmp_path / "flat.sir")
    s = _compile_run_compare(capsys, ["compile", path, "--calibrate", "digits", "-o", sir], sir, str(tmp_path / "flat.qdq.onnx"))
    assert s["comparison"]["agreement"] == 1.0


def test_data_of_another_layout_is_still_refused(tmp_path, capsys):
    """A .npz is taken exactly as given; a built-in set only in a layout of the same pixel order."""
    b = Builder((1, 32))
    h = b.quant(b.gemm(b.quant("x", 1 / 16, 16), 32, 16), 0.15, 16)
    onnx.save(b.model(b.gemm(h, 16, 10), (1, 10)), tmp_path / "m.onnx")
    sir = str(tmp_path / "m.sir")
    assert main(["compile", str(tmp_path / "m.onnx"), "-o", sir]) == 0
    capsys.readouterr()
    assert main(["run", sir, "--data", "digits"]) == 2
    assert "the digits set has samples of shape (1, 8, 8) but the network expects (32,)" in capsys.readouterr().err
    np.savez(tmp_path / "d.npz", x=np.zeros((4, 64), np.float32))
    assert main(["run", sir, "--data", str(tmp_path / "d.npz")]) == 2
    assert "d.npz" in capsys.readouterr().err
