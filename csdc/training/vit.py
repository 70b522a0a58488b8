"""A standard small Vision Transformer, trained in float: the model of training-free conversion.

Unlike the CSDformer (:mod:`csdc.training.transformer`) nothing here is tailored to spikes and
nothing is quantized during training: the network is the usual pre-LN ViT a user already owns,
and ``csdc compile --calibrate data.npz --nonlinear mbe`` quantizes it afterwards with
onnxruntime's ``quantize_static`` (:mod:`csdc.compiler.calibrate`)::

    patch embedding:  Conv2d(C, d, kernel = stride = patch) -> reshape (B, d, N) -> transpose (B, N, d)
    z = tokens + pos                                    learned position embedding (1, N, d)
    block (depth times, pre-LN):
        z = z + Wo(MHSA(LN(z)))
        z = z + W2(GELU(W1(LN(z))))                     hidden width mlp_ratio * d, exact (erf) GELU
    head:  LN(z) -> mean over tokens -> Linear classifier (logits)

Multi-head self-attention with h heads of width ``dk = d / h``: ``Q, K, V = Wq x, Wk x, Wv x``
(separate linear layers with bias), ``A = softmax(Q K^T / sqrt(dk))`` over the keys, ``O = A V``,
heads merged and projected by ``Wo``. Classification reads the mean of the final tokens (global
average pooling, no class token: a class token is a batch-sized ``Expand`` + ``Concat`` in ONNX).

ONNX export (:func:`export_vit_onnx`), as the exporters of torch 2.13 write it (see docs/vit.md):

- ``torchscript`` at opset 17: ``LayerNormalization`` single ops, GELU in its erf form
  (``Div(sqrt 2) -> Erf -> Add(1) -> Mul(x) -> Mul(0.5)``), ``Softmax(axis=-1)``.
- ``torchscript`` at opset 20: as opset 17 but ``Gelu`` single ops.
- ``torchscript`` at opset 16: ``LayerNormalization`` does not exist yet, so LayerNorm is
  decomposed (``ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt, Div, Mul, Add``).
- ``dynamo`` (opset 18 or newer): the torch.export-based exporter (onnxscript).
"""

from __future__ import annotations

import math
import os

import onnx
import torch
from torch import nn

from csdc.training.export import export_module
from csdc.training.loop import build_seeded

__all__ = ["EXPORTERS", "ViT", "build_vit", "default_patch", "export_vit_onnx"]

#: (exporter, opset) pairs :func:`export_vit_onnx` is tested with.
EXPORTERS = (("torchscript", 17), ("torchscript", 20), ("torchscript", 16), ("dynamo", 18), ("dynamo", 20))


def default_patch(img_size: int) -> int:
    """Patch side for an image side: 2 for digits (8x8: 16 tokens), 4 for MNIST (28x28: 49 tokens)."""
    return 2 if img_size <= 16 else 4


class Attention(nn.Module):
    """Softmax multi-head self-attention with the usual 1 / sqrt(dk) scaling."""

    def __init__(self, dim: int, heads: int, tokens: int) -> None:
        super().__init__()
        # the token count is a constant so that the exporters write constant Reshape shapes (no Shape ops)
        self.heads, self.dk, self.tokens = heads, dim // heads, tokens
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.scale = 1.0 / math.sqrt(self.dk)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.tokens

        def split(t: torch.Tensor) -> torch.Tensor:  # (B, N, d) -> (B, h, N, dk); -1 keeps the batch dynamic
            return t.reshape(-1, n, self.heads, self.dk).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        a = torch.softmax((q @ k.transpose(-2, -1)) * self.scale, dim=-1)
        o = (a @ v).transpose(1, 2).reshape(-1, n, self.heads * self.dk)
        return self.proj(o)


class Block(nn.Module):
    """Pre-LN transformer block: attention and a GELU MLP, each on a LayerNorm of a residual branch."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, tokens: int) -> None:
        super().__init__()
        hidden = max(1, int(round(dim * mlp_ratio)))
        self.ln1, self.attn = nn.LayerNorm(dim), Attention(dim, heads, tokens)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + self.attn(self.ln1(z))
        return z + self.fc2(self.act(self.fc1(self.ln2(z))))


class ViT(nn.Module):
    """Standard small ViT (module docstring): patch conv, learned positions, pre-LN blocks, LN, mean, linear."""

    def __init__(self, img_size: int = 8, in_chans: int = 1, num_classes: int = 10, dim: int = 64, depth: int = 2,
                 heads: int = 4, mlp_ratio: float = 2.0, patch: int | None = None) -> None:
        super().__init__()
        patch = default_patch(img_size) if patch is None else patch
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        if img_size % patch:
            raise ValueError(f"the image side {img_size} is not a multiple of the patch side {patch}")
        self.img_size, self.patch, self.dim, self.depth, self.heads, self.mlp_ratio = (
            img_size, patch, dim, depth, heads, mlp_ratio)
        self.tokens = (img_size // patch) ** 2
        self.embed = nn.Conv2d(in_chans, dim, kernel_size=patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, self.tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, mlp_ratio, self.tokens) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.embed(x).reshape(-1, self.dim, self.tokens).transpose(1, 2) + self.pos
        for block in self.blocks:
            z = block(z)
        return self.head(self.norm(z).mean(dim=1))


def build_vit(seed: int, **kwargs: object) -> ViT:
    """A :class:`ViT` whose initial weights depend only on ``seed``."""
    return build_seeded(seed, ViT, **kwargs)


def _doc(model: ViT, exporter: str, opset: int) -> str:
    return (f"csdc ViT-{model.depth}-{model.dim}: float (not quantized), {model.heads} heads, patch {model.patch}, "
            f"{model.tokens} tokens, MLP ratio {model.mlp_ratio:g}; pre-LN, softmax attention, GELU; "
            f"torch.onnx {exporter} exporter, opset {opset}")


def export_vit_onnx(model: ViT, path: str | os.PathLike[str] | None = None, *, opset: int = 17,
                    exporter: str = "torchscript") -> onnx.ModelProto:
    """Float ONNX of ``model`` (eval mode), batch axis dynamic; written atomically to ``path`` if given.

    ``exporter``: ``torchscript`` (``torch.onnx.export(dynamo=False)``) or ``dynamo`` (the torch.export
    based exporter). The ops each writes are listed in the module docstring."""
    if exporter not in ("torchscript", "dynamo"):
        raise ValueError(f"unknown exporter {exporter!r}: torchscript or dynamo")
    model.eval()
    example = torch.zeros(2, model.embed.in_channels, model.img_size, model.img_size)
    return export_module(model, example, path, opset=opset, dynamo=exporter == "dynamo",
                         doc=_doc(model, exporter, opset))
