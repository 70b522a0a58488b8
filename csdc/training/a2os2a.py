"""A²OS²A-style transformer: the tailored transformer with an addition-only spiking
self-attention that mixes binary, ReLU (multi-level) and ternary spiking neurons and has no
softmax and no scaling (Guo et al., "Spiking Transformer: Introducing Accurate Addition-Only
Spiking Self-Attention for Transformer", CVPR 2025, arXiv 2503.00226; docs/signed_spikes.md).

Same tokenizer, MLP, head, LSQ quantizers and QCDQ export as :class:`~csdc.training.transformer.CSDformer`;
only the attention differs. Per head, with ``x = q(z)`` the block input::

    Q = q(BN(Wq x))         unsigned, L levels: a population of binary-spike (DIF) neurons
    K = q(BN(Wk x))         unsigned, L levels: the ReLU spiking neuron (non-negative, multi-level)
    V = q±(BN(Wv x))        symmetric, -L..L:   ternary spiking neurons (signed spikes)
    A = q(Q @ K^T)          no scaling, no softmax (Q, K >= 0, so A >= 0 needs no ReLU)
    O = q±(A @ V)           symmetric: ternary spiking neurons

``q±`` is :class:`SignedActQuantizer`, ``s * clip(round(x / s), -L, L)`` with a learned step
(LSQ), exported as ``QuantizeLinear(s, int8 zero point 0) -> Clip(-L, L) -> DequantizeLinear``:
the symmetric quantizer a ternary population equals for delay >= T. ``A`` keeps a quantizer
(absent in the paper, which multiplies spike tensors step by step) because csdc's TDEC product
takes spike trains on both sides; its learned step absorbs the scale that 1/sqrt(d_k) and softmax
provided. Every quantizer has the same L (= T time steps after conversion).
"""

from __future__ import annotations

import math
import os

import onnx
import torch

from csdc.training.export import export_module
from csdc.training.loop import build_seeded
from csdc.training.lsq import ActQuantizer, _grad_scale, _round_ste, export_mode
from csdc.training.transformer import CSDformer, TailoredSelfAttention

__all__ = ["A2OS2AFormer", "A2OS2ASelfAttention", "SignedActQuantizer", "build_a2os2a", "export_a2os2a_onnx"]


class _SignedQCDQ(torch.autograd.Function):
    """Export-only: the symmetric quantizer as QuantizeLinear(int8) -> Clip(-L, L) -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x / step).clamp(-levels, levels) * step

    @staticmethod
    def symbolic(g, x, step, levels: int):  # type: ignore[no-untyped-def]
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.int8))
        q = g.op("QuantizeLinear", x, step, zero)
        lo = g.op("Constant", value_t=torch.tensor(-levels, dtype=torch.int8))
        hi = g.op("Constant", value_t=torch.tensor(levels, dtype=torch.int8))
        return g.op("DequantizeLinear", g.op("Clip", q, lo, hi), step, zero)


class SignedActQuantizer(ActQuantizer):
    """Symmetric LSQ activation quantizer ``s * clip(round(x / s), -L, L)`` (zero point 0).

    ``levels`` is L (1..127, int8); initial step ``2 mean|x| / sqrt(L)`` on the first training
    batch and the LSQ gradient scale, as :class:`~csdc.training.lsq.ActQuantizer`."""

    def __init__(self, levels: int, step: float | None = None, learn: bool = True) -> None:
        if not 1 <= int(levels) <= 127:
            raise ValueError(f"signed levels must be in 1..127 (int8 QuantizeLinear), got {levels}")
        super().__init__(levels, step, learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        L = self.levels
        if self._export:
            return _SignedQCDQ.apply(x, self.step, L)
        if not self.training:
            return torch.round(x / self.step).clamp(-L, L) * self.step
        if self.learn and not bool(self.initialized):
            with torch.no_grad():
                self.step.copy_((2.0 * x.detach().abs().mean() / math.sqrt(L)).clamp_min(1e-6))
                self.initialized.fill_(True)
        step = _grad_scale(self.step, 1.0 / math.sqrt(x[0].numel() * L)) if self.learn else self.step
        return _round_ste((x / step).clamp(-L, L)) * step


class A2OS2ASelfAttention(TailoredSelfAttention):
    """Multi-head A²OS²A attention (module docstring): unsigned Q and K, signed V and output,
    ``q(Q K^T)`` without scaling or softmax. Same projections and output BN as the tailored
    self-attention it extends."""

    def __init__(self, dim: int, heads: int, tokens: int, levels: int, weight_bits: int) -> None:
        super().__init__(dim, heads, tokens, levels, weight_bits)
        self.q_v = SignedActQuantizer(levels)
        self.q_out = SignedActQuantizer(levels)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.q_in(z)
        q = self._split(self.q_q(self.wq(x)))
        k = self._split(self.q_k(self.wk(x)))
        v = self._split(self.q_v(self.wv(x)))
        attn = self.q_attn(torch.matmul(q, k.transpose(-2, -1)))
        out = self.q_out(torch.matmul(attn, v))
        return self.proj(out.transpose(1, 2).reshape(-1, self.tokens, self.dim))


class A2OS2AFormer(CSDformer):
    """:class:`~csdc.training.transformer.CSDformer` (same arguments) whose blocks use
    :class:`A2OS2ASelfAttention`."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        for block in self.blocks:
            block.attn = A2OS2ASelfAttention(self.dim, self.heads, self.tokens, self.levels, self.weight_bits)


def build_a2os2a(seed: int, **kwargs: object) -> A2OS2AFormer:
    """An :class:`A2OS2AFormer` whose initial weights depend only on ``seed`` (kwargs as CSDformer)."""
    return build_seeded(seed, A2OS2AFormer, **kwargs)


def export_a2os2a_onnx(model: A2OS2AFormer, path: str | os.PathLike[str] | None = None) -> onnx.ModelProto:
    """Export in QCDQ form (opset 17) like :func:`~csdc.training.transformer.export_csdformer_onnx`;
    the signed quantizers have int8 zero points and ``Clip(-L, L)``."""
    with export_mode(model):
        example = torch.zeros(1, model.in_chans, model.img_size, model.img_size)
        doc = (f"csdc A2OS2A-{model.depth}-{model.dim} (heads {model.heads}, L = {model.levels} levels, "
               f"{model.weight_bits}-bit weights, {model.tokens} tokens): attention with unsigned Q and K, symmetric "
               "V and A V (QuantizeLinear(int8, zp 0) -> Clip(-L, L) -> DequantizeLinear), no scaling, no softmax")
        return export_module(model, example, path, doc=doc)
