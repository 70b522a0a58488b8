"""scripts/fashion_studies.py: the raster and the per-population rate plot, on the shipped digits
CSDformer (the Fashion-MNIST models themselves are too large to train in the suite)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np

from csdc.compiler.pipeline import compile_onnx, depth
from csdc.runtime.datasets import load_digits_split

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _studies():
    spec = importlib.util.spec_from_file_location("fashion_studies", os.path.join(ROOT, "scripts", "fashion_studies.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_raster_and_rates(tmp_path):
    fs = _studies()
    net, _ = compile_onnx(os.path.join(ROOT, "examples", "digits_csdformer", "model.onnx"))
    depths = fs.node_depths(net)
    assert depths[net.output_name] == depth(net)
    assert min(depths[n] for n in net.neurons()) == 1
    x, _ = load_digits_split("test")
    fs.raster(net, x[:1], str(tmp_path / "raster.png"))
    fs.rate_plot({"a": {"neurons": 4, "rate": 0.25}, "b": {"neurons": 0, "rate": 0.0}}, str(tmp_path / "rates.png"))
    fs.levels_plot([(2, 0.9, 1.0, 5.8, 38), (4, 0.92, 1.0, 10.1, 76)], str(tmp_path / "levels.png"))
    for png in ("raster.png", "rates.png", "levels.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_paths():
    fs = _studies()
    assert fs.model_path(4).endswith(os.path.join("fashion_csdformer", "model.onnx"))
    assert fs.model_path(2).endswith("model_L2.onnx")
    assert np.isscalar(fs.EPOCHS)
