"""Quantization-aware training (LSQ) and ONNX export of the networks csdc compiles.

This subpackage is the only part of csdc that uses PyTorch, an optional dependency:
install it with ``pip install csdc[torch]``.

- :mod:`csdc.training.lsq`: LSQ activation / weight quantizers and their QCDQ export.
- :mod:`csdc.training.cnn`: the digits CNN, its training loop, QCDQ / float export and
  onnxruntime ``quantize_static`` post-training quantization.
"""

from __future__ import annotations

try:
    import torch  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "csdc.training needs PyTorch, an optional dependency of csdc: "
        "install it with `pip install csdc[torch]`"
    ) from exc

from csdc.training.cnn import (
    DigitsCNN,
    TrainHistory,
    evaluate,
    export_float_onnx,
    export_qcdq_onnx,
    onnx_predict,
    quantize_static_model,
    train,
)
from csdc.training.lsq import ActQuantizer, WeightQuantizer, export_mode

__all__ = [
    "ActQuantizer",
    "DigitsCNN",
    "TrainHistory",
    "WeightQuantizer",
    "evaluate",
    "export_float_onnx",
    "export_mode",
    "export_qcdq_onnx",
    "onnx_predict",
    "quantize_static_model",
    "train",
]
