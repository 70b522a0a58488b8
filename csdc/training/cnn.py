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

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from csdc.runtime.datasets import iter_batches
from csdc.training.export import export_module, write_onnx_atomic
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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsCNN(**kwargs)  # type: ignore[arg-type]


@dataclass
class TrainHistory:
    """Per-epoch training record (accuracies are fractions in [0, 1])."""

    loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, epoch: int) -> str:
        """One line for epoch ``epoch`` (0-based)."""
        line = (
            f"epoch {epoch + 1:3d}: loss {self.loss[epoch]:.4f}  "
            f"train acc {100 * self.train_acc[epoch]:6.2f}%"
        )
        if epoch < len(self.test_acc):
            line += f"  test acc {100 * self.test_acc[epoch]:6.2f}%"
        return line


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count, restored on exit."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits of ``model`` in eval mode on ``x`` (float32 N x C x H x W)."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for xb, _ in iter_batches(x, None, batch_size):
            out.append(model(torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32))).numpy())
    model.train(was_training)
    return np.concatenate(out, axis=0)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode."""
    return float(np.mean(predict_logits(model, x).argmax(axis=1) == y))


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float,
    seed: int,
    progress: bool = True,
    *,
    eval_data: tuple[np.ndarray, np.ndarray] | None = None,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    threads: int = 1,
    summaries: bool | None = None,
) -> TrainHistory:
    """Train ``model`` with Adam and a cosine learning-rate schedule; return the history.

    Deterministic for a fixed ``seed`` (and a model built with :func:`build_cnn`):
    the shuffling uses its own generator, deterministic algorithms are enabled and
    torch runs ``threads`` threads (1 by default, so results do not depend on the
    machine's core count). With ``progress`` a tqdm bar runs over the batches; with
    ``summaries`` (default: same as ``progress``) one line per epoch is printed (loss,
    train accuracy and, when ``eval_data`` is given, test accuracy). The model is
    left in eval mode.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if summaries is None:
        summaries = progress
    n = len(x)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    history = TrainHistory()
    start = time.perf_counter()
    with _deterministic(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = (n + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="batch", leave=False)
        try:
            for epoch in range(epochs):
                model.train()
                perm = torch.randperm(n, generator=gen)
                total_loss = 0.0
                correct = 0
                for i in range(0, n, batch_size):
                    idx = perm[i : i + batch_size]
                    xb, yb = xt[idx], yt[idx]
                    logits = model(xb)
                    loss = F.cross_entropy(logits, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total_loss += float(loss.detach()) * len(idx)
                    correct += int((logits.detach().argmax(dim=1) == yb).sum())
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}", refresh=False)
                history.loss.append(total_loss / n)
                history.train_acc.append(correct / n)
                if eval_data is not None:
                    history.test_acc.append(evaluate(model, *eval_data))
                if summaries:
                    bar.write(history.summary(epoch))
        finally:
            bar.close()
    model.eval()
    history.seconds = time.perf_counter() - start
    return history


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


def onnx_predict(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto, x: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """Run an ONNX model with onnxruntime (CPU, one thread) and return its first output."""
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        source: str | bytes = model.SerializeToString()
    elif isinstance(model, bytes):
        source = model
    else:
        source = os.fspath(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [
        sess.run(None, {name: np.ascontiguousarray(xb, dtype=np.float32)})[0]
        for xb, _ in iter_batches(x, None, batch_size)
    ]
    return np.concatenate(outs, axis=0)


def quantize_static_model(
    float_onnx_path: str | os.PathLike[str],
    calib_x: np.ndarray,
    out_path: str | os.PathLike[str],
    *,
    batch_size: int = 64,
) -> onnx.ModelProto:
    """Post-training static quantization with onnxruntime (QDQ format).

    The float model first goes through onnxruntime's recommended
    ``quant_pre_process`` (shape inference, basic graph optimisation), then
    ``onnxruntime.quantization.quantize_static`` with ``QuantFormat.QDQ``, uint8
    activations, int8 weights, ``per_channel=True`` and MinMax calibration over
    ``calib_x`` (training images, fed in batches of ``batch_size``). The result is
    checked, written atomically to ``out_path`` and returned.
    """
    import tempfile

    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class _Reader(CalibrationDataReader):
        def __init__(self, x: np.ndarray, input_name: str) -> None:
            self._batches = iter_batches(x, None, batch_size)
            self._name = input_name

        def get_next(self) -> dict[str, np.ndarray] | None:
            batch = next(self._batches, None)
            if batch is None:
                return None
            return {self._name: np.ascontiguousarray(batch[0], dtype=np.float32)}

    from onnxruntime.quantization.shape_inference import quant_pre_process

    float_model = onnx.load(os.fspath(float_onnx_path))
    input_name = float_model.graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "model_pre.onnx")
        tmp_out = os.path.join(tmp, "model_qdq.onnx")
        quant_pre_process(os.fspath(float_onnx_path), pre)
        quantize_static(
            pre,
            tmp_out,
            _Reader(calib_x, input_name),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
        )
        model = onnx.load(tmp_out)
    onnx.checker.check_model(model, full_check=True)
    write_onnx_atomic(model, out_path)
    return model
