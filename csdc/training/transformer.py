"""CSDformer: the tailored, conversion-oriented quantized transformer (SPEC section 1).

Every activation is an LSQ quantizer (:class:`~csdc.training.lsq.ActQuantizer`, the
ReLU of the ANN, L levels = T time steps after conversion); every weight is an LSQ
per-channel integer (:class:`~csdc.training.lsq.WeightQuantizer`). There is no
LayerNorm, no GELU and no softmax, so each op maps to spikes (see SPEC section 2)::

    input quantizer (fixed step, e.g. 1/16 with 16 levels for digits pixels k/16)
    tokenizer, stage by stage:  QConv2d 3x3 (no bias) -> BN2d -> q [-> MaxPool 2]
    tokens:  z = x.flatten(2).transpose(1, 2)           (B, d, H, W) -> (B, N = H*W, d)
    block (depth times):
        z = z + BN(Wo(TSA(q(z))))
        z = z + BN(W2(q(BN(W1(q(z))))))                  (hidden width mlp_ratio * d)
    head:  q(z) -> mean over tokens -> QLinear classifier (logits; no quantizer after it)

Tailored self-attention (TSA), ``x = q(z)`` shared by the three projections, h heads
of width ``dk = d / h``::

    Q, K, V = q(BN(Wq x)), q(BN(Wk x)), q(BN(Wv x))     (B, N, d), then split into heads
    split:  reshape(-1, N, h, dk).transpose(1, 2)        -> (B, h, N, dk), on quantized tensors
    A = q(ReLU(Q @ K^T * (1 / sqrt(dk))) * (1 / N))      NReLU: ReLU, then divide by N tokens
    O = q(A @ V)
    merge:  O.transpose(1, 2).reshape(-1, N, d)

Linear layers on tokens have no bias (a BatchNorm follows each of them) and act on
``(B, N, d)``; the BatchNorm over the feature axis is ``BatchNorm1d`` applied as
``bn(x.transpose(1, 2)).transpose(1, 2)``. All hidden activation quantizers share the
same ``levels``.

ONNX (QCDQ, opset 17, :func:`export_csdformer_onnx`): a quantizer is
``QuantizeLinear -> Clip(0, L) -> DequantizeLinear``; a token linear layer is
``DequantizeLinear(int8 (in, out), axis=1) -> MatMul`` then
``Transpose(perm 0,2,1) -> BatchNormalization -> Transpose(perm 0,2,1)``; the attention
products are MatMuls of two quantized activations (the TDEC ``SpikeMatMul``), scaled by
``Mul(1/sqrt(dk)) -> Relu -> Mul(1/N)``; the token mean is ``ReduceMean(axes=[1])``
and the classifier a ``Gemm``. Reshapes use constant shapes with ``-1`` for the batch.
The exporter merges K's head split ``transpose(1, 2)`` and ``K^T`` into one
``Transpose(perm 0,2,3,1)``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import onnx
import torch
from onnx import numpy_helper
from torch import nn
from torch.nn import functional as F

from csdc.training.export import export_module
from csdc.training.loop import build_seeded
from csdc.training.lsq import (
    ActQuantizer,
    QConv2d,
    QLinear,
    WeightQuantizer,
    export_mode,
)

__all__ = [
    "CSDformer",
    "Stage",
    "TailoredSelfAttention",
    "TokenBatchNorm",
    "build_csdformer",
    "calibrate",
    "count_parameters",
    "csdformer_cifar",
    "default_tokenizer",
    "export_csdformer_cifar",
    "export_csdformer_onnx",
    "load_exported_weights",
]

#: A tokenizer stage: (output channels, 2x2 max-pool after the quantizer?).
Stage = tuple[int, bool]

#: Input quantizer of the digits set: pixels are k/16, k = 0..16, so this is exact.
DIGITS_INPUT_STEP = 1.0 / 16.0
DIGITS_INPUT_LEVELS = 16


def default_tokenizer(img_size: int, dim: int) -> tuple[Stage, ...]:
    """The default tokenizer stages for square ``img_size`` inputs and token width ``dim``.

    Up to 16 pixels (e.g. 8x8 digits): ``(dim/2, no pool), (dim, pool)`` -> ``img/2``
    square grid (digits: 4x4 = 16 tokens). Larger (e.g. 32x32 CIFAR): the Spikformer
    tokenizer, ``dim/8, dim/4, dim/2 (pool), dim (pool), dim`` -> ``img/4`` grid
    (CIFAR: 8x8 = 64 tokens); max-pooling only in the later stages, as in the paper's
    CIFAR setup.
    """
    if img_size <= 16:
        return ((max(1, dim // 2), False), (dim, True))
    return (
        (max(1, dim // 8), False),
        (max(1, dim // 4), False),
        (max(1, dim // 2), True),
        (dim, True),
        (dim, False),
    )


class TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over the feature axis of tokens ``(B, N, d)``.

    Computed as ``BatchNorm1d(x.transpose(1, 2)).transpose(1, 2)``, exported as
    ``Transpose(0,2,1) -> BatchNormalization -> Transpose(0,2,1)``.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3:
            raise ValueError(f"TokenBatchNorm expects tokens (B, N, d), got shape {tuple(x.shape)}")
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


class LinearBN(nn.Module):
    """A bias-free :class:`QLinear` on tokens followed by :class:`TokenBatchNorm`."""

    def __init__(self, in_features: int, out_features: int, weight_bits: int) -> None:
        super().__init__()
        self.linear = QLinear(in_features, out_features, bias=False, weight_bits=weight_bits)
        self.bn = TokenBatchNorm(out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.linear(x))


class TailoredSelfAttention(nn.Module):
    """Tailored multi-head self-attention (TSA) with NReLU instead of softmax.

    Input: the residual stream ``z`` (B, N, dim); output ``BN(Wo(O))`` (B, N, dim), to
    be added to ``z`` by the caller. See the module docstring for the formula.
    """

    def __init__(self, dim: int, heads: int, tokens: int, levels: int, weight_bits: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.dim = int(dim)
        self.heads = int(heads)
        self.tokens = int(tokens)
        self.head_dim = self.dim // self.heads
        #: 1/sqrt(dk) and 1/N, the constants of the two Mul nodes.
        self.scale = 1.0 / math.sqrt(self.head_dim)
        self.inv_tokens = 1.0 / self.tokens
        self.q_in = ActQuantizer(levels)
        self.wq = LinearBN(dim, dim, weight_bits)
        self.wk = LinearBN(dim, dim, weight_bits)
        self.wv = LinearBN(dim, dim, weight_bits)
        self.q_q = ActQuantizer(levels)
        self.q_k = ActQuantizer(levels)
        self.q_v = ActQuantizer(levels)
        self.q_attn = ActQuantizer(levels)
        self.q_out = ActQuantizer(levels)
        self.proj = LinearBN(dim, dim, weight_bits)

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, d) -> (B, h, N, dk)."""
        return x.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.q_in(z)
        q = self._split(self.q_q(self.wq(x)))
        k = self._split(self.q_k(self.wk(x)))
        v = self._split(self.q_v(self.wv(x)))
        scores = torch.matmul(q, k.transpose(-2, -1)) * self.scale
        attn = self.q_attn(F.relu(scores) * self.inv_tokens)
        out = self.q_out(torch.matmul(attn, v))
        out = out.transpose(1, 2).reshape(-1, self.tokens, self.dim)
        return self.proj(out)


class TailoredMLP(nn.Module):
    """``BN(W2(q(BN(W1(q(z))))))`` on tokens, hidden width ``hidden``."""

    def __init__(self, dim: int, hidden: int, levels: int, weight_bits: int) -> None:
        super().__init__()
        self.q_in = ActQuantizer(levels)
        self.fc1 = LinearBN(dim, hidden, weight_bits)
        self.q_hidden = ActQuantizer(levels)
        self.fc2 = LinearBN(hidden, dim, weight_bits)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.q_hidden(self.fc1(self.q_in(z))))


class Block(nn.Module):
    """One transformer block: ``z + TSA(z)``, then ``z + MLP(z)``."""

    def __init__(self, dim: int, heads: int, tokens: int, levels: int, mlp_ratio: float,
                 weight_bits: int) -> None:
        super().__init__()
        hidden = round(dim * mlp_ratio)
        if hidden < 1:
            raise ValueError(f"mlp_ratio {mlp_ratio} gives an empty hidden layer for dim {dim}")
        self.attn = TailoredSelfAttention(dim, heads, tokens, levels, weight_bits)
        self.mlp = TailoredMLP(dim, hidden, levels, weight_bits)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + self.attn(z)
        return z + self.mlp(z)


class ConvStage(nn.Module):
    """Tokenizer stage ``QConv2d 3x3 (pad 1, no bias) -> BN2d -> q [-> MaxPool 2]``."""

    def __init__(self, in_chans: int, out_chans: int, pool: bool, levels: int, weight_bits: int) -> None:
        super().__init__()
        self.conv = QConv2d(in_chans, out_chans, 3, padding=1, bias=False, weight_bits=weight_bits)
        self.bn = nn.BatchNorm2d(out_chans)
        self.q = ActQuantizer(levels)
        self.pool = bool(pool)

    def extra_repr(self) -> str:
        return f"pool={self.pool}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.q(self.bn(self.conv(x)))
        return F.max_pool2d(x, 2) if self.pool else x


class CSDformer(nn.Module):
    """The tailored quantized transformer of SPEC section 1 (see the module docstring).

    Parameters
    ----------
    img_size, in_chans:
        Square input ``(B, in_chans, img_size, img_size)``.
    num_classes:
        Number of logits.
    dim, depth, heads:
        Token width d, number of blocks, attention heads (``dim % heads == 0``).
    levels:
        L of every hidden activation quantizer (= time steps T after conversion).
    mlp_ratio:
        MLP hidden width / dim (2 for digits, 4 for CIFAR).
    weight_bits:
        Bits of the signed per-channel weight quantizers (2..8).
    tokenizer:
        Conv stages as ``(out_channels, pool)`` pairs; the last stage's channels must
        equal ``dim``. Default: :func:`default_tokenizer`.
    input_step, input_levels:
        The fixed input quantizer (default: digits pixels, step 1/16 and 16 levels;
        8-bit images in [0, 1] use 1/255 and 255).
    """

    def __init__(
        self,
        img_size: int = 8,
        in_chans: int = 1,
        num_classes: int = 10,
        dim: int = 64,
        depth: int = 2,
        heads: int = 4,
        levels: int = 4,
        mlp_ratio: float = 2.0,
        weight_bits: int = 4,
        tokenizer: Sequence[Stage] | None = None,
        *,
        input_step: float = DIGITS_INPUT_STEP,
        input_levels: int = DIGITS_INPUT_LEVELS,
    ) -> None:
        super().__init__()
        for name, value in (("img_size", img_size), ("in_chans", in_chans), ("num_classes", num_classes),
                            ("dim", dim), ("depth", depth), ("heads", heads)):
            if int(value) < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if not mlp_ratio > 0:
            raise ValueError(f"mlp_ratio must be > 0, got {mlp_ratio}")
        stages = tuple((int(c), bool(p)) for c, p in (tokenizer if tokenizer is not None
                                                       else default_tokenizer(img_size, dim)))
        if not stages:
            raise ValueError("the tokenizer needs at least one conv stage")
        if stages[-1][0] != dim:
            raise ValueError(f"the last tokenizer stage must output dim = {dim} channels, got {stages[-1][0]}")
        pools = sum(p for _, p in stages)
        if img_size % (2**pools):
            raise ValueError(f"img_size {img_size} is not divisible by 2^{pools} (the tokenizer's max-pools)")
        self.img_size = int(img_size)
        self.in_chans = int(in_chans)
        self.num_classes = int(num_classes)
        self.dim = int(dim)
        self.depth = int(depth)
        self.heads = int(heads)
        self.levels = int(levels)
        self.mlp_ratio = float(mlp_ratio)
        self.weight_bits = int(weight_bits)
        self.stages = stages
        self.grid = self.img_size // 2**pools
        #: Number of tokens N.
        self.tokens = self.grid * self.grid

        self.inq = ActQuantizer(input_levels, step=input_step, learn=False)
        chans = [self.in_chans] + [c for c, _ in stages]
        self.tokenizer = nn.Sequential(*(
            ConvStage(chans[i], c, p, levels, weight_bits) for i, (c, p) in enumerate(stages)))
        self.blocks = nn.Sequential(*(
            Block(dim, heads, self.tokens, levels, mlp_ratio, weight_bits) for _ in range(depth)))
        self.q_head = ActQuantizer(levels)
        self.head = QLinear(dim, num_classes, weight_bits=weight_bits)

    def config(self) -> dict[str, object]:
        """The constructor arguments (JSON-friendly), e.g. for a README or a report."""
        return {
            "img_size": self.img_size, "in_chans": self.in_chans, "num_classes": self.num_classes,
            "dim": self.dim, "depth": self.depth, "heads": self.heads, "levels": self.levels,
            "mlp_ratio": self.mlp_ratio, "weight_bits": self.weight_bits,
            "tokenizer": [list(s) for s in self.stages],
            "input_step": float(self.inq.step), "input_levels": self.inq.levels,
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.tokenizer(self.inq(x))                 # (B, d, H, W) spikes
        # x.flatten(2).transpose(1, 2), with a constant shape so that the ONNX has a
        # plain Reshape (no Shape/Slice/Concat): (B, N, d), the residual stream.
        z = x.reshape(-1, self.dim, self.tokens).transpose(1, 2)
        z = self.blocks(z)
        return self.head(self.q_head(z).mean(dim=1))    # (B, num_classes)


def build_csdformer(seed: int, **kwargs: object) -> CSDformer:
    """A :class:`CSDformer` whose initial weights depend only on ``seed``.

    The global torch RNG state is left as it was; ``kwargs`` go to :class:`CSDformer`.
    """
    return build_seeded(seed, CSDformer, **kwargs)


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (weights, biases, BN affine, LSQ steps)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@torch.no_grad()
def calibrate(model: nn.Module, x: torch.Tensor) -> None:
    """Initialise an untrained model from one batch ``x`` without training it.

    Runs one training-mode forward pass: every LSQ step not yet initialised gets its
    statistical initial value (``2 mean|x| / sqrt(L)``), and every BatchNorm takes the
    batch's statistics as running statistics (momentum 1 for this pass). The model is
    left in eval mode; its weights are unchanged.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [m.momentum for m in bns]
    try:
        for m in bns:
            m.momentum = 1.0
        model.train()
        model(x)
    finally:
        for m, mom in zip(bns, saved):
            m.momentum = mom
        model.eval()


def _doc(model: CSDformer) -> str:
    c = model.config()
    return (
        f"csdc CSDformer-{model.depth}-{model.dim} (heads {model.heads}, mlp_ratio {model.mlp_ratio:g}, "
        f"L = {model.levels} levels, {model.weight_bits}-bit weights, {model.tokens} tokens), LSQ "
        "quantization-aware, QCDQ export: activation quantizers are QuantizeLinear(uint8, zp 0) -> "
        "Clip(0, L) -> DequantizeLinear; weights are int8 per-channel initializers behind "
        "DequantizeLinear (axis 0 for Conv/Gemm, axis 1 for the (in, out) MatMul weights); "
        f"input 'input' (N,{model.in_chans},{model.img_size},{model.img_size}) quantized with step "
        f"{c['input_step']:g} and {c['input_levels']} levels; output 'logits' (N,{model.num_classes})."
    )


def export_csdformer_onnx(model: CSDformer, path: str | os.PathLike[str] | None = None) -> onnx.ModelProto:
    """Export a :class:`CSDformer` in QCDQ form (opset 17); write it atomically to ``path`` if given.

    Input ``input`` (N, in_chans, img_size, img_size) float32, output ``logits``
    (N, num_classes) float32, N dynamic. The model's train/eval state is restored.
    """
    with export_mode(model):
        example = torch.zeros(1, model.in_chans, model.img_size, model.img_size)
        return export_module(model, example, path, doc=_doc(model))


@torch.no_grad()
def load_exported_weights(model: nn.Module, onnx_model: onnx.ModelProto) -> nn.Module:
    """Load the state of a QCDQ ONNX file that csdc exported back into ``model``.

    ``model`` must have the architecture of the exported one (e.g. a :class:`CSDformer`
    with the same options). Weights become ``int8 * scale`` with the weight quantizer's
    step set to the exported scale (so re-quantization gives back the same integers);
    activation steps, BatchNorm parameters and statistics and biases are copied by
    name. Used to check a shipped ONNX file against PyTorch eval. Raises ``ValueError``
    naming the first missing or mis-shaped tensor. Returns ``model`` in eval mode.
    """
    inits = {t.name: t for t in onnx_model.graph.initializer}

    def get(name: str, shape: torch.Size) -> torch.Tensor:
        if name not in inits:
            raise ValueError(f"tensor '{name}' is not in the ONNX model: not a csdc export of this architecture")
        value = torch.from_numpy(numpy_helper.to_array(inits[name]).copy())
        if value.shape != shape:
            raise ValueError(f"tensor '{name}' has shape {tuple(value.shape)} in the ONNX model, "
                             f"expected {tuple(shape)}")
        return value

    linear_of = {id(m.wq): m for m in model.modules() if isinstance(m, (QConv2d, QLinear))}
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        if isinstance(module, WeightQuantizer):
            layer = linear_of[id(module)]
            scale = get(f"{prefix}export_scale", module.step.shape)
            if f"{prefix}int_weight" in inits:
                ints = get(f"{prefix}int_weight", layer.weight.shape)
            else:
                ints = get(f"{prefix}int_weight_t", layer.weight.t().shape).t()
            shape = (-1,) + (1,) * (ints.dim() - 1)
            layer.weight.copy_(ints.to(torch.float32) * scale.reshape(shape))
            module.step.copy_(scale)
            module.initialized.fill_(True)
        elif isinstance(module, ActQuantizer):
            module.step.copy_(get(f"{prefix}step", module.step.shape))
            module.initialized.fill_(True)
        elif isinstance(module, nn.modules.batchnorm._BatchNorm):
            for name in ("weight", "bias", "running_mean", "running_var"):
                t = getattr(module, name)
                t.copy_(get(f"{prefix}{name}", t.shape))
        elif isinstance(module, QLinear) and module.bias is not None:
            module.bias.copy_(get(f"{prefix}bias", module.bias.shape))
    return model.eval()


# --------------------------------------------------------------------------- CIFAR size

#: The CIFAR-10 configuration CSDformer-4-384 (about 9.3 M parameters, 64 tokens).
CIFAR_CONFIG: dict[str, object] = {
    "img_size": 32, "in_chans": 3, "num_classes": 10, "dim": 384, "depth": 4, "heads": 12,
    "levels": 4, "mlp_ratio": 4.0, "weight_bits": 8,
    "input_step": 1.0 / 255.0, "input_levels": 255,
}


def csdformer_cifar(seed: int = 0, calibration_batch: int = 16) -> CSDformer:
    """A randomly initialised CSDformer-4-384 for 32x32x3 images in [0, 1] (pixel / 255).

    Tokenizer ``3 -> 48 -> 96 -> 192 (pool) -> 384 (pool) -> 384`` (8x8 = 64 tokens of
    width 384), 4 blocks, 12 heads (dk = 32), mlp_ratio 4, L = 4, 8-bit weights, 10
    classes, input quantizer step 1/255 with 255 levels (exact for 8-bit pixels).
    Untrained: LSQ steps and BatchNorm statistics come from :func:`calibrate` on one
    batch of ``calibration_batch`` uniform random images drawn from ``seed``, so it
    exports to sensible QCDQ ONNX. Deterministic for a seed. Returned in eval mode.
    """
    model = build_csdformer(seed, **CIFAR_CONFIG)
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(calibration_batch, 3, 32, 32, generator=gen)
    x = torch.round(x * 255.0) / 255.0  # like 8-bit images
    calibrate(model, x)
    return model


def export_csdformer_cifar(path: str | os.PathLike[str] | None = None, seed: int = 0) -> onnx.ModelProto:
    """Build :func:`csdformer_cifar` for ``seed`` and export it (QCDQ ONNX, written
    atomically to ``path`` if given); about 9 MB of int8 weights."""
    return export_csdformer_onnx(csdformer_cifar(seed), path)

