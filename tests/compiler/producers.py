"""Models exported by real producers, for the producer tests and the README table.

Every model is built and trained here in PyTorch on scikit-learn's digits (nothing downloaded):

- Brevitas (QuantConv2d / QuantLinear / QuantReLU, 4-bit weights and activations), exported as
  QCDQ through the TorchScript exporter (``dynamo=False``) and the dynamo exporter, and as QONNX
  (``export_qonnx``);
- a hand-written LSQ module (``round(x / s).clamp(lo, hi) * s``) exported by ``torch.onnx.export``
  (TorchScript and dynamo): Div -> Round -> Clip -> Mul;
- onnxruntime ``quantize_static`` (QDQ) of the shipped float digits CNN: uint8 / int8 activations,
  per-channel / per-tensor weights, and 4-bit uint4 / int4 at opset 21.

Two architectures: a CNN (conv-BN-quant-maxpool x 2, linear) and an attention block with NReLU
attention (conv tokenizer, Q/K/V with token BatchNorm, ``q(ReLU(QK^T/sqrt(dk))/N)``, ``q(AV)``,
Wo + BN, residual, mean over tokens, linear).

``python tests/compiler/producers.py`` prints the per-route agreement table of the README, ``--corpus [ROUTE...]``
the corpus table (in-graph weight quantizers, Brevitas attention + MLP at Brevitas' defaults, torch.ao
QAT, an MLP that flattens its input before the input quantizer through onnxruntime quantize_static, torch.ao
and Brevitas, each also with ``value_info`` stripped), ``--ties`` the rounding-tie census.
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
import time
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from csdc.runtime.datasets import load_digits_split

LEVELS = 15  # 4-bit activations: T = 15
N_TOK, DIM, HEADS = 16, 32, 2


# ---------------------------------------------------------------------------------------- models
class TokenBN(nn.BatchNorm1d):
    """BatchNorm over the features of (B, N, d) tokens: Transpose -> BatchNormalization -> Transpose."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)


def _brevitas():
    import brevitas.nn as qnn
    from brevitas.quant import Int8WeightPerChannelFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat

    return qnn, Int8WeightPerChannelFloat, Int8WeightPerTensorFloat, Uint8ActPerTensorFloat


class BrevitasCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        qnn, WPC, WPT, _ = _brevitas()
        self.inq = qnn.QuantIdentity(bit_width=8, return_quant_tensor=False)
        self.c1 = qnn.QuantConv2d(1, 16, 3, padding=1, bias=False, weight_quant=WPC, weight_bit_width=4)
        self.bn1 = nn.BatchNorm2d(16)
        self.r1 = qnn.QuantReLU(bit_width=4)
        self.c2 = qnn.QuantConv2d(16, 32, 3, padding=1, bias=False, weight_quant=WPC, weight_bit_width=4)
        self.bn2 = nn.BatchNorm2d(32)
        self.r2 = qnn.QuantReLU(bit_width=4)
        self.fc = qnn.QuantLinear(128, 10, bias=True, weight_quant=WPT, weight_bit_width=4)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inq(x)
        x = self.pool(self.r1(self.bn1(self.c1(x))))
        x = self.pool(self.r2(self.bn2(self.c2(x))))
        return self.fc(torch.flatten(x, 1))


class BrevitasSignedCNN(BrevitasCNN):
    """The Brevitas CNN with a signed 4-bit QuantIdentity ([-8, 7], no ReLU) in the second stage."""

    def __init__(self) -> None:
        super().__init__()
        qnn = _brevitas()[0]
        self.r2 = qnn.QuantIdentity(bit_width=4)


class BrevitasAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        qnn, WPC, WPT, _ = _brevitas()
        d = DIM
        self.inq = qnn.QuantIdentity(bit_width=8)
        self.conv = qnn.QuantConv2d(1, d, 3, padding=1, bias=False, weight_quant=WPC, weight_bit_width=4)
        self.bn = nn.BatchNorm2d(d)
        self.r0 = qnn.QuantReLU(bit_width=4)
        self.pool = nn.MaxPool2d(2)
        lin = lambda: qnn.QuantLinear(d, d, bias=True, weight_quant=WPC, weight_bit_width=4)  # noqa: E731
        self.wq, self.wk, self.wv, self.wo = lin(), lin(), lin(), lin()
        self.bq, self.bk, self.bv, self.bo = TokenBN(d), TokenBN(d), TokenBN(d), TokenBN(d)
        self.rq, self.rk, self.rv = qnn.QuantReLU(bit_width=4), qnn.QuantReLU(bit_width=4), qnn.QuantReLU(bit_width=4)
        self.ra = qnn.QuantReLU(bit_width=4, max_val=0.3)  # attention probabilities are ~1/N
        self.ro, self.rh = qnn.QuantReLU(bit_width=4), qnn.QuantReLU(bit_width=4)
        self.fc = qnn.QuantLinear(d, 10, bias=True, weight_quant=WPT, weight_bit_width=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attention_forward(self, x)


class BrevitasSignedAttention(BrevitasAttention):
    """The Brevitas attention with symmetric Q, K, V and A V: signed 4-bit narrow-range ``QuantIdentity``
    ([-7, 7], zero point 0, no ReLU), and 3-bit ``QuantReLU`` elsewhere ([0, 7]): one window T = 7, the
    signed quantizers ternary populations (docs/signed_spikes.md)."""

    def __init__(self) -> None:
        super().__init__()
        qnn = _brevitas()[0]
        self.rq, self.rk, self.rv, self.ro = (qnn.QuantIdentity(bit_width=4, narrow_range=True) for _ in range(4))
        self.r0, self.rh = qnn.QuantReLU(bit_width=3), qnn.QuantReLU(bit_width=3)
        self.ra = qnn.QuantReLU(bit_width=3, max_val=0.3)


def attention_forward(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    d, h, n = DIM, HEADS, N_TOK
    dk = d // h
    f = m.pool(m.r0(m.bn(m.conv(m.inq(x)))))  # (B, d, 4, 4)
    z0 = f.flatten(2).transpose(1, 2)  # (B, N, d)

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.reshape(-1, n, h, dk).transpose(1, 2)  # (B, h, N, dk)

    q = heads(m.rq(m.bq(m.wq(z0))))
    k = heads(m.rk(m.bk(m.wk(z0))))
    v = heads(m.rv(m.bv(m.wv(z0))))
    s = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(dk))
    a = m.ra(torch.relu(s) / n)  # NReLU attention, then its quantizer
    o = m.ro(torch.matmul(a, v)).transpose(1, 2).reshape(-1, n, d)
    z1 = z0 + m.bo(m.wo(o))
    return m.fc(m.rh(z1).mean(1))


# hand-written LSQ, exported as arithmetic -----------------------------------------------------
class LSQAct(nn.Module):
    """Unsigned LSQ: ``round(x / s).clamp(0, L) * s`` (straight-through gradient in training)."""

    def __init__(self, levels: int = LEVELS, step: float = 0.1, learn: bool = True) -> None:
        super().__init__()
        self.levels = levels
        self.step = nn.Parameter(torch.tensor(float(step)), requires_grad=learn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x / self.step
        r = (torch.round(v) - v).detach() + v if self.training else torch.round(v)
        return r.clamp(0, self.levels) * self.step


class LSQWeight(nn.Module):
    """Signed per-output-channel LSQ weight quantizer, narrow range ``[-Q, Q]``, Q = 7 (4 bits)."""

    def __init__(self, w: torch.Tensor, q: int = 7) -> None:
        super().__init__()
        self.q = q
        shape = (-1,) + (1,) * (w.dim() - 1)
        self.step = nn.Parameter((w.detach().abs().reshape(w.shape[0], -1).mean(1) * 2 / math.sqrt(q)).reshape(shape))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        v = w / self.step
        r = (torch.round(v) - v).detach() + v if self.training else torch.round(v)
        return r.clamp(-self.q, self.q) * self.step


class LSQConv(nn.Conv2d):
    def __init__(self, *a, **k) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **k)
        self.wq = LSQWeight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.wq(self.weight), self.bias)


class LSQLinear(nn.Linear):
    def __init__(self, *a, **k) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **k)
        self.wq = LSQWeight(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.wq(self.weight), self.bias)


class LSQCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inq = LSQAct(16, 1 / 16, learn=False)
        self.c1, self.bn1, self.r1 = LSQConv(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), LSQAct()
        self.c2, self.bn2, self.r2 = LSQConv(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), LSQAct()
        self.fc = LSQLinear(128, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.inq(x)
        x = self.pool(self.r1(self.bn1(self.c1(x))))
        x = self.pool(self.r2(self.bn2(self.c2(x))))
        return self.fc(torch.flatten(x, 1))


class LSQAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        d = DIM
        self.inq = LSQAct(16, 1 / 16, learn=False)
        self.conv, self.bn, self.r0 = LSQConv(1, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), LSQAct()
        self.pool = nn.MaxPool2d(2)
        self.wq, self.wk, self.wv, self.wo = (LSQLinear(d, d) for _ in range(4))
        self.bq, self.bk, self.bv, self.bo = (TokenBN(d) for _ in range(4))
        self.rq, self.rk, self.rv, self.ro, self.rh = (LSQAct() for _ in range(5))
        self.ra = LSQAct(step=0.02)
        self.fc = LSQLinear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attention_forward(self, x)


# in-graph weight quantizer: the scale is computed in the graph from the float weight --------------
class InGraphWeightQuant(nn.Module):
    """Symmetric int8 fake-quant of a weight with ``s = max|w| / 127`` computed in the forward pass
    (per output channel or per tensor), written as ``fake_quantize_per_{channel,tensor}_affine``
    (exports as QuantizeLinear -> DequantizeLinear) or as ``round(w / s).clamp(-127, 127) * s``
    (exports as Div -> Round -> Clip -> Mul). ``form`` may be switched after training: both
    compute the same function."""

    def __init__(self, per_channel: bool, form: str = "qdq") -> None:
        super().__init__()
        self.per_channel, self.form = per_channel, form

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if self.per_channel:
            s = w.abs().amax(dim=tuple(range(1, w.dim())), keepdim=True) / 127
        else:
            s = w.abs().max() / 127
        s = s.detach()  # the step follows the weight; no gradient through it
        if self.form == "qdq":
            if self.per_channel:
                zp = torch.zeros(w.shape[0], dtype=torch.int32)
                return torch.fake_quantize_per_channel_affine(w, s.reshape(-1), zp, 0, -128, 127)
            return torch.fake_quantize_per_tensor_affine(w, s, torch.zeros((), dtype=torch.int32), -128, 127)
        v = w / s
        r = (torch.round(v) - v).detach() + v if self.training else torch.round(v)
        return r.clamp(-127, 127) * s


class InGraphConv(nn.Conv2d):
    def __init__(self, *a, per_channel: bool = True, **k) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **k)
        self.wq = InGraphWeightQuant(per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.wq(self.weight), self.bias)


class InGraphLinear(nn.Linear):
    def __init__(self, *a, per_channel: bool = True, **k) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*a, **k)
        self.wq = InGraphWeightQuant(per_channel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.wq(self.weight), self.bias)


class InGraphCNN(nn.Module):
    """The CNN with in-graph int8 weight quantizers and 4-bit LSQ activations."""

    def __init__(self, per_channel: bool = True) -> None:
        super().__init__()
        self.inq = LSQAct(16, 1 / 16, learn=False)
        self.c1 = InGraphConv(1, 16, 3, padding=1, bias=False, per_channel=per_channel)
        self.bn1, self.r1 = nn.BatchNorm2d(16), LSQAct()
        self.c2 = InGraphConv(16, 32, 3, padding=1, bias=False, per_channel=per_channel)
        self.bn2, self.r2 = nn.BatchNorm2d(32), LSQAct()
        self.fc = InGraphLinear(128, 10, per_channel=per_channel)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return LSQCNN.forward(self, x)  # type: ignore[arg-type]

    def set_form(self, form: str) -> "InGraphCNN":
        for m in self.modules():
            if isinstance(m, InGraphWeightQuant):
                m.form = form
        return self


# Brevitas attention block with an MLP: per-tensor int8 weights, float biases, 3-D token MatMuls ----
class BrevitasAttentionMLP(nn.Module):
    """Attention block + MLP ``Linear(32->64) -> ReLU -> Linear(64->32)`` with a residual, on (B, N, d)
    tokens, written with Brevitas' defaults as a user would: ``QuantLinear`` (per-tensor int8 weights,
    float biases), ``QuantReLU`` (8-bit unsigned, so T = 255), ``QuantIdentity`` (8-bit signed) on the input."""

    def __init__(self) -> None:
        super().__init__()
        qnn = _brevitas()[0]
        d = DIM
        self.inq = qnn.QuantIdentity()
        self.conv = qnn.QuantConv2d(1, d, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(d)
        self.r0 = qnn.QuantReLU()
        self.pool = nn.MaxPool2d(2)
        self.wq, self.wk, self.wv, self.wo = (qnn.QuantLinear(d, d, bias=True) for _ in range(4))
        self.bq, self.bk, self.bv, self.bo = TokenBN(d), TokenBN(d), TokenBN(d), TokenBN(d)
        self.rq, self.rk, self.rv, self.ra, self.ro, self.rh = (qnn.QuantReLU() for _ in range(6))
        self.fc1, self.r1, self.fc2 = qnn.QuantLinear(d, 2 * d, bias=True), qnn.QuantReLU(), qnn.QuantLinear(2 * d, d, bias=True)
        self.rz = qnn.QuantReLU()
        self.fc = qnn.QuantLinear(d, 10, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # written as user code usually is: reshape targets from the tensors' own shapes, which a
        # TorchScript export with a dynamic batch axis turns into Shape -> Gather -> Concat -> Reshape
        f = self.pool(self.r0(self.bn(self.conv(self.inq(x)))))
        z0 = f.flatten(2).transpose(1, 2)
        b, n, d = z0.shape
        h = HEADS

        def heads(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, n, h, d // h).transpose(1, 2)

        q = heads(self.rq(self.bq(self.wq(z0))))
        k = heads(self.rk(self.bk(self.wk(z0))))
        v = heads(self.rv(self.bv(self.wv(z0))))
        a = self.ra(torch.relu(q @ k.transpose(-2, -1) * (1.0 / math.sqrt(d // h))) / n)
        o = self.ro(a @ v).transpose(1, 2).reshape(b, n, d)
        z1 = z0 + self.bo(self.wo(o))
        z2 = z1 + self.fc2(self.r1(self.fc1(self.rh(z1))))
        return self.fc(self.rz(z2).mean(1))


# torch.ao quantization-aware training (FakeQuantize modules) ----------------------------------------
class FloatCNN(nn.Module):
    """The CNN in float, between QuantStub / DeQuantStub, as torch.ao's eager-mode QAT expects it."""

    def __init__(self) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()
        self.c1, self.bn1, self.r1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        self.c2, self.bn2, self.r2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU()
        self.fc = nn.Linear(128, 10)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.quant(x)
        x = self.pool(self.r1(self.bn1(self.c1(x))))
        x = self.pool(self.r2(self.bn2(self.c2(x))))
        return self.dequant(self.fc(torch.flatten(x, 1)))


def torch_ao_eager_qat() -> nn.Module:
    """torch.ao eager-mode QAT as its tutorial does it: fuse conv-BN-ReLU, the default QAT qconfig
    of the x86 backend (per-channel int8 weights, 7-bit unsigned activations), ``prepare_qat``.

    ``version=0``: the ``FakeQuantize`` modules. The default ``version=1`` uses
    ``FusedMovingAvgObsFakeQuantize``, whose op neither ONNX exporter of torch 2.13 converts
    (TorchScript: ``aten::fused_moving_avg_obs_fake_quant`` unsupported; dynamo: no ONNX function
    for ``aten._fused_moving_avg_obs_fq_helper_functional``)."""
    from torch.ao import quantization as tq

    model = FloatCNN().train()
    model.qconfig = tq.get_default_qat_qconfig("x86", version=0)
    tq.fuse_modules_qat(model, [["c1", "bn1", "r1"], ["c2", "bn2", "r2"]], inplace=True)
    return tq.prepare_qat(model, inplace=True)


def torch_ao_eager_qat_unfused() -> nn.Module:
    """Eager-mode QAT without fusing conv-BN-ReLU: every module's output gets its own FakeQuantize, so
    the BatchNorm output is quantized with a zero point and the ReLU comes after that quantizer."""
    from torch.ao import quantization as tq

    model = FloatCNN().train()
    model.qconfig = tq.get_default_qat_qconfig("x86", version=0)
    return tq.prepare_qat(model, inplace=True)


def torch_ao_fx_qat() -> nn.Module:
    """torch.ao FX-graph-mode QAT: ``prepare_qat_fx`` with the default x86 QAT qconfig mapping."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    model = FloatCNN().train()
    model.quant, model.dequant = nn.Identity(), nn.Identity()
    return prepare_qat_fx(model, get_default_qat_qconfig_mapping("x86", version=0), (torch.zeros(1, 1, 8, 8),))


def freeze_qat(model: nn.Module) -> nn.Module:
    """End of QAT as the torch.ao tutorial does it: observers off, BatchNorm statistics frozen, eval."""
    from torch.ao import quantization as tq
    from torch.ao.nn.intrinsic import qat as nniqat

    model.apply(tq.disable_observer)
    model.apply(nniqat.freeze_bn_stats)
    return model.eval()


# an MLP that flattens its input before the first quantizer (issue: compile what real exporters write) ----
class FlattenMLP(nn.Module):
    """``Flatten -> Linear(64, 64) -> ReLU -> Linear(64, 10)`` in float, for onnxruntime's quantize_static, which
    puts the input's QuantizeLinear after the Flatten."""

    def __init__(self) -> None:
        super().__init__()
        self.flatten, self.fc1, self.relu, self.fc2 = nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class StubbedFlattenMLP(FlattenMLP):
    """The MLP for torch.ao eager QAT: ``QuantStub`` before the first quantized layer, i.e. after the Flatten."""

    def __init__(self) -> None:
        super().__init__()
        from torch.ao.quantization import DeQuantStub, QuantStub

        self.quant, self.dequant = QuantStub(), DeQuantStub()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dequant(self.fc2(self.relu(self.fc1(self.quant(self.flatten(x))))))


def torch_ao_eager_qat_mlp() -> nn.Module:
    """torch.ao eager QAT of the MLP: Linear-ReLU fused, the x86 QAT qconfig (``version=0``, see torch_ao_eager_qat)."""
    from torch.ao import quantization as tq

    model = StubbedFlattenMLP().train()
    model.qconfig = tq.get_default_qat_qconfig("x86", version=0)
    tq.fuse_modules_qat(model, [["fc1", "relu"]], inplace=True)
    return tq.prepare_qat(model, inplace=True)


def torch_ao_fx_qat_mlp() -> nn.Module:
    """torch.ao FX QAT of the float MLP: ``prepare_qat_fx`` places the input's FakeQuantize itself (after the Flatten)."""
    from torch.ao.quantization import get_default_qat_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_qat_fx

    return prepare_qat_fx(FlattenMLP().train(), get_default_qat_qconfig_mapping("x86", version=0), (torch.zeros(1, 1, 8, 8),))


class BrevitasFlattenMLP(nn.Module):
    """The MLP in Brevitas as its docs write a first layer: ``QuantLinear(input_quant=Int8ActPerTensorFloat)``, so the
    input quantizer sits inside the layer, after ``nn.Flatten``; ``QuantReLU`` 8 bits (T = 255), int8 weights."""

    def __init__(self) -> None:
        super().__init__()
        import brevitas.nn as qnn
        from brevitas.quant import Int8ActPerTensorFloat

        self.flatten = nn.Flatten()
        self.fc1 = qnn.QuantLinear(64, 64, bias=True, input_quant=Int8ActPerTensorFloat)
        self.relu, self.fc2 = qnn.QuantReLU(), qnn.QuantLinear(64, 10, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


class FloatAttention(nn.Module):
    """The attention model in float (ReLU in place of every quantizer), for onnxruntime's quantize_static."""

    def __init__(self) -> None:
        super().__init__()
        d = DIM
        self.inq = nn.Identity()
        self.conv, self.bn, self.r0 = nn.Conv2d(1, d, 3, padding=1, bias=False), nn.BatchNorm2d(d), nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.wq, self.wk, self.wv, self.wo = (nn.Linear(d, d) for _ in range(4))
        self.bq, self.bk, self.bv, self.bo = (TokenBN(d) for _ in range(4))
        self.rq, self.rk, self.rv, self.ra, self.ro, self.rh = (nn.ReLU() for _ in range(6))
        self.fc = nn.Linear(d, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return attention_forward(self, x)


# ---------------------------------------------------------------------------------------- training
_TRAINED: dict[str, nn.Module] = {}


# kind -> (epochs, learning rate): a few seconds each on 2 cores
RECIPES = {"ingraph_cnn_perchannel": (3, 3e-3), "ingraph_cnn_pertensor": (3, 3e-3), "brevitas_attention_mlp": (4, 1e-2),
           "torchao_eager_cnn": (3, 3e-3), "torchao_eager_unfused_cnn": (3, 3e-3), "torchao_fx_cnn": (3, 3e-3), "brevitas_cnn": (3, 3e-3), "brevitas_signed_cnn": (3, 3e-3), "brevitas_signed_attention": (4, 1e-2), "lsq_cnn": (3, 3e-3), "brevitas_attention": (4, 1e-2), "lsq_attention": (4, 5e-3),
           "float_attention": (4, 5e-3), "float_mlp": (5, 3e-3), "torchao_eager_mlp": (5, 3e-3), "torchao_fx_mlp": (5, 3e-3),
           "brevitas_flatten_mlp": (5, 3e-3)}


def trained(kind: str) -> nn.Module:
    """A trained model of ``kind`` (brevitas_cnn, brevitas_attention, lsq_cnn, lsq_attention), cached."""
    if kind not in _TRAINED:
        epochs, lr = RECIPES[kind]
        from csdc.training.loop import build_seeded, train

        factory = {"ingraph_cnn_perchannel": lambda: InGraphCNN(True), "ingraph_cnn_pertensor": lambda: InGraphCNN(False),
                   "brevitas_attention_mlp": BrevitasAttentionMLP, "torchao_eager_cnn": torch_ao_eager_qat, "torchao_eager_unfused_cnn": torch_ao_eager_qat_unfused,
                   "torchao_fx_cnn": torch_ao_fx_qat, "brevitas_cnn": BrevitasCNN, "brevitas_signed_cnn": BrevitasSignedCNN, "brevitas_signed_attention": BrevitasSignedAttention, "brevitas_attention": BrevitasAttention,
                   "lsq_cnn": LSQCNN, "lsq_attention": LSQAttention, "float_attention": FloatAttention, "float_mlp": FlattenMLP,
                   "torchao_eager_mlp": torch_ao_eager_qat_mlp, "torchao_fx_mlp": torch_ao_fx_qat_mlp,
                   "brevitas_flatten_mlp": BrevitasFlattenMLP}[kind]
        x, y = load_digits_split("train")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_seeded(0, factory)
            train(model, x, y, epochs=epochs, lr=lr, seed=0, progress=False)
        _TRAINED[kind] = freeze_qat(model) if kind.startswith("torchao") else model.eval()
    return _TRAINED[kind]


# ---------------------------------------------------------------------------------------- export
def _quiet_export(fn, *args, **kwargs) -> None:  # type: ignore[no-untyped-def]
    import contextlib
    import io
    import logging

    logging.getLogger("torch").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        fn(*args, **kwargs)


def export(model: nn.Module, route: str, path: str) -> str:
    """Export ``model`` through ``route``; returns ``path``."""
    from torch.export import Dim

    x = torch.from_numpy(load_digits_split("test")[0][:4])
    dyn = {"x": {0: Dim("batch")}}
    if route == "brevitas-qcdq-torchscript":
        from brevitas.export import export_onnx_qcdq

        _quiet_export(export_onnx_qcdq, model, x, export_path=path, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    elif route == "brevitas-qcdq-dynamo":
        from brevitas.export import export_onnx_qcdq

        _quiet_export(export_onnx_qcdq, model, x, export_path=path, dynamo=True, dynamic_shapes=dyn)
    elif route == "brevitas-qonnx":
        from brevitas.export import export_qonnx

        _quiet_export(export_qonnx, model, x, export_path=path, dynamic_shapes=dyn)
    elif route == "brevitas-qonnx-torchscript":
        from brevitas.export import export_qonnx

        _quiet_export(export_qonnx, model, x, export_path=path, dynamo=False, input_names=["x"],
                      dynamic_axes={"x": {0: "batch"}}, opset_version=17)
    elif route.startswith("torch") and route.endswith("-torchscript"):
        _quiet_export(torch.onnx.export, model, (x,), path, dynamo=False, input_names=["x"], output_names=["logits"],
                      dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
    elif route.startswith("torch") and route.endswith("-dynamo"):
        _quiet_export(torch.onnx.export, model, (x,), path, dynamo=True, dynamic_shapes=dyn, input_names=["x"])
    else:
        raise ValueError(route)
    return path


ORT_ROUTES = {
    # name: (activation type, weight type, per_channel, opset)
    "ort-uint8-perchannel": ("QUInt8", "QInt8", True, 17),
    "ort-uint8-pertensor": ("QUInt8", "QInt8", False, 17),
    "ort-int8-activations": ("QInt8", "QInt8", True, 17),
    "ort-uint4-opset21": ("QUInt4", "QInt4", True, 21),
    "ort-int4-opset21": ("QInt4", "QInt4", True, 21),
}


# variants of a route of ORT_ROUTES with quantize_static's extra_options (not in the agreement table)
ORT_VARIANTS = {"ort-int8-symmetric": ("ort-int8-activations", {"ActivationSymmetric": True})}


def ort_quantize(route: str, float_path: str, path: str, calib: np.ndarray, extra_options: dict | None = None) -> str:
    """onnxruntime quantize_static (QDQ, MinMax calibration) of a float model."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    act, wt, per_channel, opset = ORT_ROUTES[route]
    src = onnx.load(float_path)
    name = src.graph.input[0].name
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        if opset != max(o.version for o in src.opset_import if o.domain in ("", "ai.onnx")):
            src = onnx.version_converter.convert_version(src, opset)
            onnx.save(src, os.path.join(tmp, "src.onnx"))
            float_path = os.path.join(tmp, "src.onnx")
        quant_pre_process(float_path, pre)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter(np.array_split(calib, max(1, len(calib) // 128)))

            def get_next(self):  # type: ignore[no-untyped-def]
                b = next(self.batches, None)
                return None if b is None else {name: np.ascontiguousarray(b, dtype=np.float32)}

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(pre, path, Reader(), quant_format=QuantFormat.QDQ, activation_type=getattr(QuantType, act),
                            weight_type=getattr(QuantType, wt), per_channel=per_channel, extra_options=extra_options)
    return path


# ---------------------------------------------------------------------------------------- evaluation
def reference_logits(path: str, x: np.ndarray) -> np.ndarray:
    """The source model run by its own executor: qonnx's for QONNX graphs, onnxruntime otherwise."""
    model = onnx.load(path)
    if any(n.domain.startswith(("qonnx", "finn")) for n in model.graph.node):
        from qonnx.core.modelwrapper import ModelWrapper
        from qonnx.core.onnx_exec import execute_onnx

        # qonnx's executor checks inputs against static shapes: fix the batch axis to len(x)
        d0 = model.graph.input[0].type.tensor_type.shape.dim[0]
        d0.Clear()
        d0.dim_value = len(x)
        model.graph.output[0].type.tensor_type.ClearField("shape")
        del model.graph.value_info[:]
        from qonnx.transformation.infer_shapes import InferShapes

        mw = ModelWrapper(model).transform(InferShapes())
        iname, oname = model.graph.input[0].name, model.graph.output[0].name
        return np.asarray(execute_onnx(mw, {iname: x.astype(np.float32)})[oname]).reshape(len(x), -1)
    from csdc.runtime.evaluate import onnx_logits

    return onnx_logits(path, x)


def evaluate_route(path: str, limit: int | None = None, numba_vs_reference: bool = False) -> dict:
    """Compile ``path`` (default options), run the numba backend on the digits test split, compare with
    the producer's executor (``misses``: images whose top-1 differs); with ``numba_vs_reference`` also
    run the count-domain reference backend and compare readouts bit for bit."""
    from csdc.backends.numba import NumbaBackend
    from csdc.compiler.pipeline import compile_onnx
    from csdc.runtime.evaluate import run_dataset

    x, y = load_digits_split("test")
    if limit:
        x, y = x[:limit], y[:limit]
    net, rep = compile_onnx(path)
    out = run_dataset(net, NumbaBackend(), x, y, batch=150, progress=False)
    ref = reference_logits(path, x)
    r = {"T": net.T, "snn_acc": float(np.mean(out.logits.argmax(1) == y)), "ref_acc": float(np.mean(ref.argmax(1) == y)),
         "agreement": float(np.mean(out.logits.argmax(1) == ref.argmax(1))),
         "max_logit_diff": float(np.max(np.abs(out.logits - ref))), "warnings": rep.warnings,
         "misses": np.flatnonzero(out.logits.argmax(1) != ref.argmax(1)).tolist(),
         "error_bound": float(getattr(rep, "error_bound", float("nan")))}  # worst population, in levels
    if numba_vs_reference:  # the count-domain reference backend on the same images: bit-exact readouts
        from csdc.backends.reference import ReferenceBackend

        counts = run_dataset(net, ReferenceBackend(), x, y, batch=150, progress=False)
        r["numba_equals_reference"] = bool(np.array_equal(out.readout, counts.readout))
    return r


def float_cnn_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return os.path.join(here, "..", "..", "examples", "digits_cnn", "model_float.onnx")


TORCH_ROUTES = ["brevitas-qcdq-torchscript", "brevitas-qcdq-dynamo", "brevitas-qonnx", "torch-lsq-torchscript", "torch-lsq-dynamo"]


def build_route(route: str, arch: str, tmp: str) -> str:
    path = os.path.join(tmp, f"{route}-{arch}.onnx")
    if route.startswith("ort-"):
        src = float_cnn_path()
        if arch == "attention":
            src = os.path.join(tmp, "float-attention.onnx")
            if not os.path.exists(src):
                x = torch.from_numpy(load_digits_split("test")[0][:4])
                _quiet_export(torch.onnx.export, trained("float_attention"), (x,), src, dynamo=False, input_names=["x"],
                              output_names=["logits"], dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17)
        base, extra = ORT_VARIANTS.get(route, (route, None))
        return ort_quantize(base, src, path, load_digits_split("train")[0], extra)
    kind = ("brevitas_" if route.startswith("brevitas") else "lsq_") + arch
    return export(trained(kind), route, path)


# The corpus of export routes (issue: compile what real exporters write): route -> (trained model kind,
# exporter route of ``export``, weight-quantizer form of an in-graph model or None)
CORPUS = {
    "ingraph-qdq-perchannel-torchscript": ("ingraph_cnn_perchannel", "torch-torchscript", "qdq"),
    "ingraph-qdq-perchannel-dynamo": ("ingraph_cnn_perchannel", "torch-dynamo", "qdq"),
    "ingraph-qdq-pertensor-torchscript": ("ingraph_cnn_pertensor", "torch-torchscript", "qdq"),
    "ingraph-qdq-pertensor-dynamo": ("ingraph_cnn_pertensor", "torch-dynamo", "qdq"),
    "ingraph-arith-perchannel-torchscript": ("ingraph_cnn_perchannel", "torch-torchscript", "arith"),
    "ingraph-arith-perchannel-dynamo": ("ingraph_cnn_perchannel", "torch-dynamo", "arith"),
    "ingraph-arith-pertensor-torchscript": ("ingraph_cnn_pertensor", "torch-torchscript", "arith"),
    "ingraph-arith-pertensor-dynamo": ("ingraph_cnn_pertensor", "torch-dynamo", "arith"),
    "brevitas-mlp-qcdq-torchscript": ("brevitas_attention_mlp", "brevitas-qcdq-torchscript", None),
    "brevitas-mlp-qcdq-dynamo": ("brevitas_attention_mlp", "brevitas-qcdq-dynamo", None),
    "brevitas-mlp-qonnx": ("brevitas_attention_mlp", "brevitas-qonnx", None),
    "brevitas-mlp-qonnx-torchscript": ("brevitas_attention_mlp", "brevitas-qonnx-torchscript", None),
    "torchao-eager-torchscript": ("torchao_eager_cnn", "torch-torchscript", None),
    "torchao-fx-torchscript": ("torchao_fx_cnn", "torch-torchscript", None),
    # the model input flattened before its quantizer: onnxruntime quantize_static of the float MLP (exporter +
    # quantize_static route of ORT_ROUTES), torch.ao QAT, Brevitas (input quantizer inside the first QuantLinear)
    "flatten-mlp-ort-torchscript": ("float_mlp", "torch-torchscript+ort-uint8-perchannel", None),
    "flatten-mlp-ort-dynamo": ("float_mlp", "torch-dynamo+ort-uint8-perchannel", None),
    "flatten-mlp-torchao-eager-torchscript": ("torchao_eager_mlp", "torch-torchscript", None),
    "flatten-mlp-torchao-fx-torchscript": ("torchao_fx_mlp", "torch-torchscript", None),
    "flatten-mlp-brevitas-qcdq-torchscript": ("brevitas_flatten_mlp", "brevitas-qcdq-torchscript", None),
    "flatten-mlp-brevitas-qcdq-dynamo": ("brevitas_flatten_mlp", "brevitas-qcdq-dynamo", None),
    "flatten-mlp-brevitas-qonnx": ("brevitas_flatten_mlp", "brevitas-qonnx", None),
}
# not in the corpus, because torch 2.13 cannot export them (README, Producers): torch.ao QAT models through
# the dynamo exporter (eager and FX: torch.export stops at FakeQuantize's data-dependent branch,
# GuardOnDataDependentSymNode "Eq(u0, 1)"); the default QAT qconfig (version 1,
# FusedMovingAvgObsFakeQuantize) through either exporter; pt2e (no longer part of torch.ao in 2.13)
NO_VALUE_INFO = "+no-value-info"  # route suffix: the same file with graph.value_info stripped


def network_fingerprint(net) -> bytes:  # type: ignore[no-untyped-def]
    """The .sir header of ``net`` without its metadata (compile time, file name): node names, ops,
    inputs, attributes and the sha256 of every array, so equal fingerprints mean equal networks."""
    import io
    import zipfile

    from csdc.ir.serialize import to_bytes

    net.metadata.clear()
    with zipfile.ZipFile(io.BytesIO(to_bytes(net))) as zf:
        return zf.read("header.json")


def strip_value_info(src: str, dst: str) -> str:
    """``src`` without any intermediate-tensor shapes (``graph.value_info``); initializers untouched."""
    model = onnx.load(src)
    del model.graph.value_info[:]
    onnx.save(model, dst)
    return dst


def build_corpus_route(route: str, tmp: str) -> str:
    """Export (once per ``tmp``) the corpus model of ``route``; ``route + NO_VALUE_INFO`` strips its shapes."""
    base = route.removesuffix(NO_VALUE_INFO)
    path = os.path.join(tmp, f"{base}.onnx")
    if not os.path.exists(path):
        kind, exporter, form = CORPUS[base]
        model = trained(kind)
        if form is not None:
            model.set_form(form)
        exporter, _, ort_route = exporter.partition("+")
        if ort_route:  # a float model, exported, then quantized by onnxruntime on the digits training split
            float_path = export(model, exporter, os.path.join(tmp, f"{base}-float.onnx"))
            ort_quantize(ort_route, float_path, path, load_digits_split("train")[0])
        else:
            export(model, exporter, path)
    if route.endswith(NO_VALUE_INFO):
        stripped = os.path.join(tmp, f"{base}-no-value-info.onnx")
        return stripped if os.path.exists(stripped) else strip_value_info(path, stripped)
    return path


def build_signed_route(route: str, tmp: str, arch: str = "cnn") -> str:
    """The signed-activation Brevitas CNN (or attention with symmetric Q/K/V/AV) exported through ``route``."""
    return export(trained(f"brevitas_signed_{arch}"), route, os.path.join(tmp, f"{route}-signed-{arch}.onnx"))


def hidden_quantizer_inputs(path: str, x: np.ndarray) -> tuple[list, list, dict, dict]:
    """Every QuantizeLinear on a hidden activation of ``path`` (not the model input, not a weight) and
    its input on ``x`` as onnxruntime computes it (graph optimizations off); also the constants
    (initializers and Constant nodes) and each tensor's consumers."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = onnx.load(path)
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    inits.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in model.graph.node
                  if n.op_type == "Constant" and n.attribute[0].name == "value"})
    for n in model.graph.node:  # torch.ao's zero points reach the quantizers through Identity nodes
        if n.op_type == "Identity" and n.input[0] in inits:
            inits[n.output[0]] = inits[n.input[0]]
    routed_input = {model.graph.input[0].name}  # the model input, and routing of it (the input quantizer may follow a Flatten)
    for n in model.graph.node:
        if n.op_type in ("Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity") and n.input[0] in routed_input:
            routed_input.add(n.output[0])
    qs = [n for n in model.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits and n.input[0] not in routed_input]
    cons: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = []
    for q in qs:
        if q.input[0] not in [o.name for o in probe.graph.output]:
            probe.graph.output.append(helper.make_tensor_value_info(q.input[0], onnx.TensorProto.FLOAT, None))
        names.append(q.input[0])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return qs, sess.run(names, {sess.get_inputs()[0].name: x.astype(np.float32)}), inits, cons


def near_ties_behind_differences(path: str, x: np.ndarray) -> list[dict]:
    """For every image whose compiled logits differ from onnxruntime's by more than 1e-4, the exact
    level that differs first: walking the hidden quantizers in graph order, the first whose levels in
    onnxruntime (``clip(round(v / scale) + zero_point, lo, hi)``, ``v`` as onnxruntime computes it in
    float32) differ from the spike counts of the population csdc made from it (count-domain reference,
    equal to numba's); ``v / scale`` at those positions shows how near a rounding boundary they were
    (``distance``, in levels; upstream levels are all equal there, so a difference at a value far from
    a boundary would be a compiler error). Quantizers whose population has another layout than the
    ONNX tensor (a max-pool moved across it) are skipped."""
    from csdc.compiler.pipeline import compile_onnx
    from csdc.ir import semantics
    from csdc.runtime.evaluate import onnx_logits

    net, rep = compile_onnx(path)
    res = semantics.run_counts(net, x)
    ref = onnx_logits(path, x)
    images = np.flatnonzero(np.abs(res.logits - ref).max(1) > 1e-4)
    qs, outs, inits, cons = hidden_quantizer_inputs(path, x)
    neurons = set(net.neurons())
    levels = []  # (quantizer name, onnx levels - offset, v / scale, counts) in graph order
    for q, v in zip(qs, outs):
        pops = [e.split(" (")[0] for e in rep.explain.get(q.name, [])]
        pops = [p for p in pops if p in neurons]
        if len(pops) != 1:
            continue
        from csdc.compiler.passes.canonicalize_quant import int_range

        scale = np.float32(inits[q.input[1]].reshape(-1)[0])
        zp_arr = inits[q.input[2]] if len(q.input) > 2 and q.input[2] else np.zeros((), np.uint8)
        zp = int(zp_arr.reshape(-1).astype(np.int64)[0])
        lo, hi = int_range(zp_arr.dtype)  # the storage type's range, narrowed by a Clip after the quantizer
        for c in cons.get(q.output[0], []):
            if c.op_type == "Clip":
                lo = max(lo, int(inits[c.input[1]].astype(np.int64))) if c.input[1] else lo
                hi = min(hi, int(inits[c.input[2]].astype(np.int64))) if len(c.input) > 2 and c.input[2] else hi
        r = np.asarray(v, dtype=np.float32) / scale
        counts = np.asarray(res.counts[pops[0]])
        if counts.size != r.size:
            continue
        lvl = np.clip(np.rint(r).astype(np.int64) + zp, lo, hi)
        ternary = type(net.op(pops[0])).__name__ == "TernaryNeuron"  # a symmetric quantizer: signed count level - zp
        lvl = lvl - (lo if lo < zp and not ternary else zp)  # the neuron counts level - lo in the offset form, else level - zp
        if lvl.min() < 0 and not ternary:  # a signed quantizer after a ReLU: canonicalize_zero_point made it unsigned
            lvl = np.clip(lvl - lvl.min(), 0, None)
        levels.append((q.name, lvl.reshape(len(x), -1), r.reshape(len(x), -1), counts.reshape(len(x), -1)))
    rows = []
    for i in images:
        row = {"image": int(i), "logit_diff": float(np.abs(res.logits[i] - ref[i]).max()),
               "top1_same": bool(res.logits[i].argmax() == ref[i].argmax()), "quantizer": None, "values": 0, "distance": None}
        for name, lvl, r, counts in levels:
            diff = np.flatnonzero(lvl[i] != counts[i])
            if diff.size:
                d = np.abs(r[i, diff] - np.floor(r[i, diff]) - 0.5)
                row.update(quantizer=name, values=int(diff.size), distance=float(d.max()),
                           level_diff=int(np.abs(lvl[i, diff] - counts[i, diff]).max()))
                break
        rows.append(row)
    return rows


def tie_census(path: str, x: np.ndarray) -> dict:
    """Exact rounding ties at the hidden activation quantizers of ``path`` on ``x``.

    Runs the model with onnxruntime, reads the input of every QuantizeLinear on an activation (the
    model input's excluded: csdc's input encoder rounds half to even like ONNX) and counts values
    ``v = x / scale`` (float32, as onnxruntime computes it) with fractional part exactly 0.5 inside
    the clip range. ``differ``: ties where half-to-even (ONNX) and half-up (csdc's neurons,
    ``v0 = floor(theta / 2)``) give different levels (floor(v) even). Also compares the compiled
    network's logits (numba) with onnxruntime's."""
    from csdc.backends.numba import NumbaBackend
    from csdc.compiler.pipeline import compile_onnx
    from csdc.runtime.evaluate import onnx_logits, run_dataset

    qs, outs, inits, cons = hidden_quantizer_inputs(path, x)
    values = ties = differ = 0
    for q, v in zip(qs, outs):
        scale = np.float32(inits[q.input[1]].reshape(-1)[0])
        zp = int(inits[q.input[2]].reshape(-1).astype(np.int64)[0]) if len(q.input) > 2 and q.input[2] else 0
        lo, hi = -(2 ** 31), 2 ** 31  # the clip after the quantizer, if any, bounds the levels
        for c in cons.get(q.output[0], []):
            if c.op_type == "Clip":
                lo = int(inits[c.input[1]].astype(np.int64)) if c.input[1] else lo
                hi = int(inits[c.input[2]].astype(np.int64)) if len(c.input) > 2 and c.input[2] else hi
        r = np.asarray(v, dtype=np.float32) / scale
        fl = np.floor(r)
        tie = (r - fl == 0.5) & (fl + zp >= lo) & (fl + 1 + zp <= hi)
        values += r.size
        ties += int(tie.sum())
        differ += int((tie & (fl % 2 == 0)).sum())
    net, _ = compile_onnx(path)
    snn = run_dataset(net, NumbaBackend(), x, None, batch=150, progress=False).logits
    ref = onnx_logits(path, x)
    return {"quantizer_values": values, "ties": ties, "ties_rules_differ": differ,
            "logits_equal": int(np.sum(np.all(np.isclose(snn, ref, rtol=1e-5, atol=1e-5), axis=1))),
            "top1_changed": int(np.sum(snn.argmax(1) != ref.argmax(1))), "images": len(x)}


CORPUS_MODELS = {"ingraph": "cnn, in-graph int8 weight quantizer", "brevitas-mlp": "attention + MLP, Brevitas defaults",
                 "torchao": "cnn, torch.ao QAT", "flatten-mlp": "MLP, input flattened before its quantizer"}


def corpus_row(route: str, tmp: str) -> str:
    """One row of the corpus table: the route, then with value_info stripped (same network or not)."""
    from csdc.compiler.pipeline import compile_onnx

    model = next(v for k, v in CORPUS_MODELS.items() if route.startswith(k))
    try:
        path = build_corpus_route(route, tmp)
    except Exception as exc:  # noqa: BLE001
        return f"| {route} | {model} | - | - | - | export fails: {type(exc).__name__}: {str(exc).splitlines()[0][:100]} | | | | |"
    try:
        r = evaluate_route(path, numba_vs_reference=True)
    except Exception as exc:  # noqa: BLE001
        return f"| {route} | {model} | - | - | - | fails: {type(exc).__name__}: {str(exc).splitlines()[0][:140]} | | | | |"
    stripped = build_corpus_route(route + NO_VALUE_INFO, tmp)
    try:
        nets = [network_fingerprint(compile_onnx(p)[0]) for p in (path, stripped)]
        same = "same network" if nets[0] == nets[1] else "different network"
    except Exception as exc:  # noqa: BLE001
        same = f"fails: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
    return (f"| {route} | {model} | {r['T']} | {100 * r['ref_acc']:.2f} % | {100 * r['snn_acc']:.2f} % | "
            f"{100 * r['agreement']:.2f} % | {r['max_logit_diff']:.2g} | {r['error_bound']:.2g} | "
            f"{'yes' if r['numba_equals_reference'] else 'NO'} | {same} |")


def route_costs(path: str) -> dict:
    """What the compiled network of ``path`` costs (default options, numba, D = T, digits test split):
    populations (ternary ones apart), neurons, T, latency, spikes and -1 spikes per image, energy per
    image, agreement with the producer's executor; and the model's activation quantizers after
    canonicalization by form (symmetric, unsigned, other signed)."""
    from csdc.backends.numba import NumbaBackend
    from csdc.compiler.frontend import load_qgraph
    from csdc.compiler.pipeline import CompileOptions, canonicalize, compile_onnx
    from csdc.ir.ops import TernaryNeuron
    from csdc.runtime.evaluate import run_dataset

    x, y = load_digits_split("test")
    quants = [n.attrs for n in canonicalize(load_qgraph(path), CompileOptions()).nodes if n.op_type == "Quant"]
    forms = {"symmetric": sum(a["zero_point"] == 0 and a["lo"] == -a["hi"] < 0 for a in quants),
             "unsigned": sum(a["lo"] == a["zero_point"] == 0 for a in quants)}
    forms["other signed"] = len(quants) - forms["symmetric"] - forms["unsigned"]
    net, rep = compile_onnx(path)
    out = run_dataset(net, NumbaBackend(), x, y, batch=150, progress=False)
    ref = reference_logits(path, x)
    s, n = out.summary, len(x)
    return {"quantizers": forms, "populations": rep.populations, "neurons": rep.neurons, "T": net.T, "latency": rep.latency,
            "ternary": sum(isinstance(net.op(p), TernaryNeuron) for p in net.neurons()),
            "spikes": s.spikes / n, "negative_spikes": s.negative_spikes / n, "energy_uj": s.energy_uj_per_sample,
            "snn_acc": float(np.mean(out.logits.argmax(1) == y)), "agreement": float(np.mean(out.logits.argmax(1) == ref.argmax(1)))}


def main() -> None:  # pragma: no cover - the README table
    if "--corpus" in sys.argv:
        print("| route | model | T | reference acc. | SNN acc. (numba) | top-1 agreement | max abs logit diff | "
              "error bound (levels) | numba == reference | value_info stripped |")
        print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
        with tempfile.TemporaryDirectory() as tmp:
            for route in [a for a in sys.argv[1:] if not a.startswith("-")] or list(CORPUS):
                t0 = time.perf_counter()
                print(corpus_row(route, tmp), flush=True)
                print(f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        return
    if "--near-ties" in sys.argv:  # the images whose logits differ, and the near-tie behind each
        x, _ = load_digits_split("test")
        with tempfile.TemporaryDirectory() as tmp:
            for route in [a for a in sys.argv[1:] if not a.startswith("-")] or list(CORPUS):
                try:  # a corpus route, or ROUTE:ARCH of the table above (e.g. ort-uint8-pertensor:attention)
                    path = build_route(*route.split(":"), tmp) if ":" in route else build_corpus_route(route, tmp)
                    rows = near_ties_behind_differences(path, x)
                except Exception as exc:  # noqa: BLE001
                    print(f"{route}: fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}")
                    continue
                print(f"{route}: {len(rows)} image(s) with logits differing by more than 1e-4, "
                      f"{sum(not r['top1_same'] for r in rows)} with another top-1")
                worst = max((r["distance"] for r in rows if r["distance"] is not None), default=None)
                if rows:
                    print(f"  first differing level within {worst:.2g} of a rounding boundary in every image" if worst is not None and
                          all(r["distance"] is not None for r in rows) else "  (some images: no differing level found, see -v)")
                for r in rows if "-v" in sys.argv else [r for r in rows if not r["top1_same"]] + rows[:5]:
                    where = (f"first differs at {r['quantizer']}: {r['values']} value(s) by {r['level_diff']} level, v/scale within "
                             f"{r['distance']:.2g} of a .5 boundary") if r["quantizer"] else "no hidden level differs (fixed-point sums)"
                    print(f"  image {r['image']}: max logit diff {r['logit_diff']:.3g}, top-1 {'same' if r['top1_same'] else 'CHANGED'}; {where}")
        return
    if "--costs" in sys.argv:  # e.g. --costs ort-int8-activations:attention ort-int8-symmetric:attention
        with tempfile.TemporaryDirectory() as tmp:
            for route in [a for a in sys.argv[1:] if not a.startswith("-")]:
                r = route_costs(build_route(*route.split(":"), tmp))
                print(f"{route}: quantizers {r['quantizers']}; T = {r['T']}, {r['populations']} populations ({r['ternary']} "
                      f"ternary), {r['neurons']} neurons, latency {r['latency']} steps; {r['spikes']:.0f} spikes per image "
                      f"({r['negative_spikes']:.0f} of them -1), {r['energy_uj']:.3f} uJ per image; SNN {100 * r['snn_acc']:.2f} %, "
                      f"agreement {100 * r['agreement']:.2f} %", flush=True)
        return
    if "--ties" in sys.argv:
        x, _ = load_digits_split("test")
        root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples")
        print("| model | quantizer evaluations | exact ties | ties where half-even != half-up | images with equal logits | top-1 changed |")
        print("| --- | --- | --- | --- | --- | --- |")
        for rel in ("digits_cnn/model.onnx", "digits_cnn/model_qdq_static.onnx", "digits_csdformer/model.onnx"):
            r = tie_census(os.path.join(root, rel), x)
            print(f"| examples/{rel} | {r['quantizer_values']} | {r['ties']} | {r['ties_rules_differ']} | "
                  f"{r['logits_equal']} / {r['images']} | {r['top1_changed']} |")
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("cnn", "attention"):
            for route in TORCH_ROUTES + list(ORT_ROUTES):
                t0 = time.perf_counter()
                try:
                    r = evaluate_route(build_route(route, arch, tmp))
                    rows.append(f"| {route} | {arch} | {r['T']} | {100 * r['ref_acc']:.2f} % | {100 * r['snn_acc']:.2f} % | "
                                f"{100 * r['agreement']:.2f} % | {r['max_logit_diff']:.2g} |")
                except Exception as exc:  # noqa: BLE001
                    rows.append(f"| {route} | {arch} | - | - | - | fails: {type(exc).__name__}: {str(exc).splitlines()[0][:120]} | |")
                print(rows[-1], f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
        for route in ("brevitas-qcdq-torchscript", "brevitas-qonnx"):
            r = evaluate_route(build_signed_route(route, tmp))
            rows.append(f"| {route} | cnn, signed 2nd stage | {r['T']} | {100 * r['ref_acc']:.2f} % | {100 * r['snn_acc']:.2f} % | "
                        f"{100 * r['agreement']:.2f} % | {r['max_logit_diff']:.2g} |")
        for route in ("brevitas-qcdq-torchscript", "brevitas-qonnx"):
            r = evaluate_route(build_signed_route(route, tmp, "attention"))
            rows.append(f"| {route} | attention, symmetric Q/K/V/AV (ternary) | {r['T']} | {100 * r['ref_acc']:.2f} % | "
                        f"{100 * r['snn_acc']:.2f} % | {100 * r['agreement']:.2f} % | {r['max_logit_diff']:.2g} |")
    print("| route | model | T | reference acc. | SNN acc. (numba) | top-1 agreement | max abs logit diff |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))


if __name__ == "__main__":  # pragma: no cover
    main()
