"""The digits CNN: LSQ quantization-aware training, QCDQ / float ONNX export and
onnxruntime post-training static quantization (QDQ).

Quantized network (``quantize=True``, the default)::

    input quantizer (step 1/16, L=16: exact for digits pixels k/16, k = 0..16)
    -> Conv(1, 16, 3, pad 1) -> BN -> act quantizer (L levels) -> MaxPool 2
    -> Conv(16, 32, 3, pad 1) -> BN -> act quantizer (L levels) -> MaxPool 2
    -> Flatten -> Linear(128, 10)                       (no quantizer after it)

Convolution and linear weights are LSQ-quantized (signed, per output channel, 4 bits
by default); convolutions have no bias (BN follows them). ``pool_before_quant=True``
builds ``Conv -> BN -> ReLU -> MaxPool -> quantizer`` instead (the compiler moves the
MaxPool across the quantizer). ``quantize=False`` is the float network: no input
quantizer, ReLU in place of the activation quantizers, float weights.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F

from csdc.runtime.datasets import iter_batches
from csdc.training.export import export_module, write_onnx_atomic
from csdc.training.loop import (
    TrainHistory,
    build_seeded,
    evaluate,
    onnx_predict,
    predict_logits,
    train,
)
from csdc.training.lsq import ActQuantizer, QConv2d, QLinear, export_mode

__all__ = [
    "DigitsCNN",
    "TrainHistory",
    "build_cnn",
    "evaluate",
    "export_float_onnx",
    "export_qcdq_onnx",
    "onnx_predict",
    "predict_logits",
    "quantize_static_model",
    "train",
]

#: Step and levels of the input quantizer: digits pixels are k/16, k = 0..16.
INPUT_STEP = 1.0 / 16.0
INPUT_LEVELS = 16


class DigitsCNN(nn.Module):
    """The 8x8 digits CNN (see the module docstring for the layer list).

    ``levels``: L of the hidden activation quantizers (default 15 = 4 bits, i.e.
    T = 15 time steps after conversion). ``weight_bits``: bits of the per-channel
    weight quantizers. ``quantize=False`` builds the float network.
    """

    def __init__(
        self,
        levels: int = 15,
        weight_bits: int = 4,
        *,
        quantize: bool = True,
        pool_before_quant: bool = False,
        channels: tuple[int, int] = (16, 32),
        num_classes: int = 10,
    ) -> None:
        super().__init__()
        self.levels = int(levels)
        self.weight_bits = int(weight_bits)
        self.quantize = bool(quantize)
        self.pool_before_quant = bool(pool_before_quant)
        c1, c2 = channels
        if self.quantize:
            self.inq: nn.Module = ActQuantizer(INPUT_LEVELS, step=INPUT_STEP, learn=False)
            self.conv1: nn.Module = QConv2d(1, c1, 3, padding=1, bias=False, weight_bits=weight_bits)
            self.conv2: nn.Module = QConv2d(c1, c2, 3, padding=1, bias=False, weight_bits=weight_bits)
            self.fc: nn.Module = QLinear(c2 * 2 * 2, num_classes, weight_bits=weight_bits)
            self.q1: nn.Module = ActQuantizer(levels)
            self.q2: nn.Module = ActQuantizer(levels)
        else:
            self.inq = nn.Identity()
            self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
            self.fc = nn.Linear(c2 * 2 * 2, num_classes)
            self.q1 = nn.ReLU()
            self.q2 = nn.ReLU()
        self.bn1 = nn.BatchNorm2d(c1)
        self.bn2 = nn.BatchNorm2d(c2)

    def _stage(self, x: torch.Tensor, conv: nn.Module, bn: nn.Module, q: nn.Module) -> torch.Tensor:
        x = bn(conv(x))
        if self.pool_before_quant and self.quantize:
            return q(F.max_pool2d(F.relu(x), 2))
        return F.max_pool2d(q(x), 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inq(x)
        x = self._stage(x, self.conv1, self.bn1, self.q1)
        x = self._stage(x, self.conv2, self.bn2, self.q2)
        return self.fc(torch.flatten(x, 1))


def build_cnn(seed: int, **kwargs: object) -> DigitsCNN:
    """Build a :class:`DigitsCNN` whose initial weights depend only on ``seed``.

    The global torch RNG state is left as it was. ``kwargs`` go to ``DigitsCNN``.
    """
    return build_seeded(seed, DigitsCNN, **kwargs)


_QCDQ_DOC = (
    "csdc digits CNN, LSQ quantization-aware trained, QCDQ export: activation quantizers "
    "are QuantizeLinear(uint8, zp 0) -> Clip(0, L) -> DequantizeLinear; weights are int8 "
    "per-channel (axis 0) initializers behind DequantizeLinear; input 'input' (N,1,8,8) "
    "= pixel/16, output 'logits' (N,10)."
)
_FLOAT_DOC = (
    "csdc digits CNN, float (no quantizers, ReLU activations); input 'input' (N,1,8,8) "
    "= pixel/16, output 'logits' (N,10)."
)


def export_qcdq_onnx(model: DigitsCNN, path: str | os.PathLike[str] | None = None) -> onnx.ModelProto:
    """Export a quantized :class:`DigitsCNN` in QCDQ form (opset 17); write to ``path`` if given.

    Input ``input`` (N, 1, 8, 8) float32, output ``logits`` (N, 10) float32, N dynamic.
    BatchNormalization stays a node after each Conv (the weights come out of a
    DequantizeLinear, so the exporter does not fold it).
    """
    if not model.quantize:
        raise ValueError("export_qcdq_onnx needs a quantized DigitsCNN (quantize=True)")
    with export_mode(model):
        return export_module(model, torch.zeros(1, 1, 8, 8), path, doc=_QCDQ_DOC)


def export_float_onnx(model: DigitsCNN, path: str | os.PathLike[str] | None = None) -> onnx.ModelProto:
    """Export a float :class:`DigitsCNN` (``quantize=False``) to ONNX (opset 17).

    The TorchScript exporter folds each eval-mode BatchNormalization into the
    preceding Conv (which then has a bias). Input ``input`` (N, 1, 8, 8), output
    ``logits`` (N, 10).
    """
    if model.quantize:
        raise ValueError("export_float_onnx needs a float DigitsCNN (quantize=False)")
    was_training = model.training
    model.eval()
    try:
        return export_module(model, torch.zeros(1, 1, 8, 8), path, doc=_FLOAT_DOC)
    finally:
        model.train(was_training)


def quantize_static_model(
    float_onnx_path: str | os.PathLike[str],
    calib_x: np.ndarray,
    out_path: str | os.PathLike[str],
    *,
    batch_size: int = 64,
) -> onnx.ModelProto:
    """Post-training static quantization with onnxruntime (QDQ format), as ``csdc compile --calibrate``
    does it (:func:`csdc.compiler.calibrate.quantize_static_qdq`): ``quant_pre_process``, then
    ``quantize_static`` with uint8 activations, int8 symmetric per-channel weights and MinMax
    calibration over ``calib_x`` (training images, fed in batches of ``batch_size``). The result is
    checked, written atomically to ``out_path`` and returned.
    """
    from csdc.compiler.calibrate import quantize_static_qdq

    return quantize_static_qdq(float_onnx_path, calib_x, out_path, batch=batch_size)
