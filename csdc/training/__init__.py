"""Quantization-aware training (LSQ) and ONNX export of the networks csdc compiles.

This subpackage is the only part of csdc that uses PyTorch, an optional dependency:
install it with ``pip install csdc[torch]``.

- :mod:`csdc.training.lsq`: LSQ activation / weight quantizers and their QCDQ export.
- :mod:`csdc.training.loop`: the shared training loop (Adam, cosine schedule,
  deterministic), PyTorch / onnxruntime prediction.
- :mod:`csdc.training.cnn`: the digits CNN, its QCDQ / float export and onnxruntime
  ``quantize_static`` post-training quantization.
- :mod:`csdc.training.transformer`: CSDformer, the tailored quantized transformer
  (conv tokenizer, NReLU attention, BatchNorm; no softmax / LayerNorm / GELU), its QCDQ
  export and the randomly initialised CIFAR-size CSDformer-4-384.
- :mod:`csdc.training.recipe`: train + export + check, what ``csdc train`` runs.
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
from csdc.training.transformer import (
    CSDformer,
    build_csdformer,
    csdformer_cifar,
    export_csdformer_cifar,
    export_csdformer_onnx,
)

__all__ = [
    "ActQuantizer",
    "CSDformer",
    "DigitsCNN",
    "TrainHistory",
    "WeightQuantizer",
    "build_csdformer",
    "csdformer_cifar",
    "evaluate",
    "export_csdformer_cifar",
    "export_csdformer_onnx",
    "export_float_onnx",
    "export_mode",
    "export_qcdq_onnx",
    "onnx_predict",
    "quantize_static_model",
    "train",
]
