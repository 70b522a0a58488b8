"""LSQ quantizers (Esser et al., "Learned Step Size Quantization", ICLR 2020) and
their QCDQ export.

Activation quantizer (unsigned, per tensor, L levels)::

    q(x) = s * clip(round(x / s), 0, L)

Weight quantizer (signed, symmetric, narrow range, per output channel, b bits)::

    q(w)[c] = s[c] * clip(round(w[c] / s[c]), -Q, Q),   Q = 2^(b-1) - 1

Training: rounding passes the gradient straight through (STE); the learned step gets
the LSQ gradient scale ``g = 1 / sqrt(n * Q)`` (n = elements per sample for
activations, per output channel for weights) and the LSQ initialisation
``s = 2 mean|x| / sqrt(Q)`` (activations: on the first training batch; weights: on
the first forward). ``torch.round`` rounds half to even, exactly as ONNX
QuantizeLinear does, so the eval forward and the exported ONNX agree.

Export (inside :func:`export_mode`): an activation quantizer becomes
``QuantizeLinear(s, zero_point uint8 0) -> Clip(0, L) -> DequantizeLinear(s, 0)``
(no Clip when L = 255); a weight quantizer becomes an int8 initializer behind
``DequantizeLinear(scale per channel, zero_point int8 0, axis=0)`` (``axis=1`` for the
transposed ``(in, out)`` weight of a :class:`QLinear` applied to tokens, a MatMul).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "ActQuantizer",
    "QConv2d",
    "QLinear",
    "WeightQuantizer",
    "export_mode",
]


def _grad_scale(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Identity in the forward pass; multiplies the gradient by ``scale``."""
    y = x * scale
    return (x - y).detach() + y


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass; straight-through gradient."""
    return (torch.round(x) - x).detach() + x


class _ActQuantQCDQ(torch.autograd.Function):
    """Export-only: the activation quantizer as QuantizeLinear -> Clip -> DequantizeLinear."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, step: torch.Tensor, levels: int) -> torch.Tensor:  # type: ignore[override]
        return torch.round(x / step).clamp(0, levels) * step

    @staticmethod
    def symbolic(g, x, step, levels: int):  # type: ignore[no-untyped-def]
        zero = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
        q = g.op("QuantizeLinear", x, step, zero)
        if levels != 255:
            lo = g.op("Constant", value_t=torch.tensor(0, dtype=torch.uint8))
            hi = g.op("Constant", value_t=torch.tensor(levels, dtype=torch.uint8))
            q = g.op("Clip", q, lo, hi)
        return g.op("DequantizeLinear", q, step, zero)


class _WeightDequant(torch.autograd.Function):
    """Export-only: int8 weights behind a per-channel DequantizeLinear along ``axis``
    (the output-channel axis: 0 for Conv / Gemm weights, 1 for a MatMul's (in, out))."""

    @staticmethod
    def forward(ctx, w_int: torch.Tensor, step: torch.Tensor, axis: int = 0) -> torch.Tensor:  # type: ignore[override]
        shape = [1] * w_int.dim()
        shape[axis] = -1
        return w_int.to(step.dtype) * step.reshape(shape)

    @staticmethod
    def symbolic(g, w_int, step, axis: int = 0):  # type: ignore[no-untyped-def]
        channels = w_int.type().sizes()[axis]
        zero = g.op("Constant", value_t=torch.zeros(channels, dtype=torch.int8))
        return g.op("DequantizeLinear", w_int, step, zero, axis_i=axis)


class ActQuantizer(nn.Module):
    """Unsigned LSQ activation quantizer ``s * clip(round(x / s), 0, L)``.

    ``levels`` is L (1..255; L = 15 is 4 bits and becomes T = 15 time steps).
    With ``step`` given and ``learn=False`` the step is fixed (e.g. the input
    quantizer, step 1/16); otherwise it is learned and initialised on the first
    training batch as ``2 mean|x| / sqrt(L)``.
    """

    def __init__(self, levels: int, step: float | None = None, learn: bool = True) -> None:
        super().__init__()
        if not 1 <= int(levels) <= 255:
            raise ValueError(f"levels must be in 1..255 (uint8 QuantizeLinear), got {levels}")
        if not learn and step is None:
            raise ValueError("a fixed (learn=False) activation quantizer needs a step")
        if step is not None and not step > 0:
            raise ValueError(f"step must be > 0, got {step}")
        self.levels = int(levels)
        self.learn = bool(learn)
        init = torch.tensor(1.0 if step is None else float(step), dtype=torch.float32)
        if self.learn:
            self.step = nn.Parameter(init)
        else:
            self.register_buffer("step", init)
        self.register_buffer("initialized", torch.tensor(step is not None))
        self._export = False

    def extra_repr(self) -> str:
        return f"levels={self.levels}, learn={self.learn}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._export:
            return _ActQuantQCDQ.apply(x, self.step, self.levels)
        if not self.training:
            return torch.round(x / self.step).clamp(0, self.levels) * self.step
        if self.learn and not bool(self.initialized):
            with torch.no_grad():
                s = 2.0 * x.detach().abs().mean() / math.sqrt(self.levels)
                self.step.copy_(s.clamp_min(1e-6))
                self.initialized.fill_(True)
        step = self.step
        if self.learn:
            step = _grad_scale(step, 1.0 / math.sqrt(x[0].numel() * self.levels))
        return _round_ste((x / step).clamp(0, self.levels)) * step


class WeightQuantizer(nn.Module):
    """Signed symmetric narrow-range LSQ weight quantizer, one step per output channel.

    Integer levels are ``-Q..Q`` with ``Q = 2^(bits-1) - 1`` (bits=4: -7..7). The
    learned parameter ``step`` may drift below zero during training; the quantizer
    uses ``|step|`` (the symmetric quantizer is the same function of ``s`` and ``-s``),
    so exported scales are always positive.
    """

    def __init__(self, channels: int, bits: int = 4) -> None:
        super().__init__()
        if not 2 <= int(bits) <= 8:
            raise ValueError(f"weight bits must be in 2..8 (int8 initializers), got {bits}")
        self.bits = int(bits)
        self.qmax = 2 ** (self.bits - 1) - 1
        self.step = nn.Parameter(torch.ones(int(channels), dtype=torch.float32))
        self.register_buffer("initialized", torch.tensor(False))
        self._export = False

    def extra_repr(self) -> str:
        return f"channels={self.step.numel()}, bits={self.bits}"

    def _shape(self, w: torch.Tensor) -> tuple[int, ...]:
        return (-1,) + (1,) * (w.dim() - 1)

    def scale(self) -> torch.Tensor:
        """The per-channel step actually used, ``|step|`` (detached)."""
        return self.step.detach().abs()

    def integer_weight(self, w: torch.Tensor) -> torch.Tensor:
        """The int8 weights ``clip(round(w / |s|), -Q, Q)`` that the export writes."""
        with torch.no_grad():
            q = torch.round(w / self.scale().reshape(self._shape(w))).clamp(-self.qmax, self.qmax)
        return q.to(torch.int8)

    def export_weight(self, transposed: bool = False) -> torch.Tensor:
        """Export mode only: the dequantized weight as an ONNX ``DequantizeLinear``.

        ``transposed=False``: int8 ``(out, in, ...)`` with per-channel scales on axis 0.
        ``transposed=True`` (2-D weights): int8 ``(in, out)``, scales on axis 1, i.e. the
        right-hand operand of a MatMul ``x @ W^T`` with no Transpose node in the graph.
        """
        if not self._export:
            raise RuntimeError("export_weight() is only available inside export_mode()")
        if transposed:
            return _WeightDequant.apply(self.int_weight_t, self.export_scale, 1)
        return _WeightDequant.apply(self.int_weight, self.export_scale, 0)

    def forward(self, w: torch.Tensor, transposed: bool = False) -> torch.Tensor:
        """The fake-quantized weight; in export mode ``export_weight(transposed)``
        (``transposed`` matters only there)."""
        if self._export:
            return self.export_weight(transposed)
        if not bool(self.initialized):
            with torch.no_grad():
                per_channel = w.detach().abs().reshape(w.shape[0], -1).mean(dim=1)
                self.step.copy_((2.0 * per_channel / math.sqrt(self.qmax)).clamp_min(1e-8))
                self.initialized.fill_(True)
        shape = self._shape(w)
        if not self.training:
            scale = self.step.abs().reshape(shape)
            return torch.round(w / scale).clamp(-self.qmax, self.qmax) * scale
        per_channel_numel = w[0].numel()
        g = 1.0 / math.sqrt(per_channel_numel * self.qmax)
        step = _grad_scale(self.step, g).abs().reshape(shape)
        return _round_ste((w / step).clamp(-self.qmax, self.qmax)) * step


class QConv2d(nn.Conv2d):
    """``nn.Conv2d`` whose weight passes through a :class:`WeightQuantizer`."""

    def __init__(self, *args, weight_bits: int = 4, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.wq = WeightQuantizer(self.out_channels, weight_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.wq(self.weight), self.bias)


class QLinear(nn.Linear):
    """``nn.Linear`` whose weight passes through a :class:`WeightQuantizer`.

    ONNX export: on a 2-D input ``(B, in)`` a ``Gemm(transB=1)`` whose weight is int8
    ``(out, in)`` behind ``DequantizeLinear(axis=0)``; on a higher-rank input such as
    tokens ``(B, N, in)`` a ``MatMul`` whose weight is stored transposed, int8
    ``(in, out)`` behind ``DequantizeLinear(axis=1)`` (still one scale per output
    channel), followed by ``Add`` of the bias if the layer has one.
    """

    def __init__(self, *args, weight_bits: int = 4, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(*args, **kwargs)
        self.wq = WeightQuantizer(self.out_features, weight_bits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.wq._export and x.dim() > 2:
            y = torch.matmul(x, self.wq(self.weight, transposed=True))
            return y if self.bias is None else y + self.bias
        return F.linear(x, self.wq(self.weight), self.bias)


@contextlib.contextmanager
def export_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with its quantizers emitting QCDQ ONNX ops.

    Each :class:`WeightQuantizer` gets temporary buffers ``int_weight`` (int8) and
    ``export_scale`` (``|step|``), which the exporter writes as initializers
    ``<layer>.wq.int_weight`` and ``<layer>.wq.export_scale``; a :class:`QLinear`'s
    also gets ``int_weight_t`` (its transpose, written when the layer is exported as a
    MatMul on tokens). On exit the buffers are removed and the previous train/eval
    state is restored.
    """
    for qname, module in model.named_modules():
        if isinstance(module, ActQuantizer) and not float(module.step.detach()) > 0:
            raise ValueError(
                f"activation quantizer '{qname}' has a non-positive step "
                f"{float(module.step.detach())}; it cannot be exported as QuantizeLinear"
            )
    was_training = model.training
    model.eval()
    touched: list[nn.Module] = []
    try:
        for module in model.modules():
            if isinstance(module, (QConv2d, QLinear)):
                if not bool(module.wq.initialized):
                    module.wq(module.weight)  # initialise the step from the weights
                module.wq.register_buffer("int_weight", module.wq.integer_weight(module.weight))
                module.wq.register_buffer("export_scale", module.wq.scale())
                if isinstance(module, QLinear):
                    module.wq.register_buffer("int_weight_t", module.wq.int_weight.t().contiguous())
            if isinstance(module, (ActQuantizer, WeightQuantizer)):
                module._export = True
                touched.append(module)
        yield model
    finally:
        for module in touched:
            module._export = False
            if isinstance(module, WeightQuantizer):
                for name in ("int_weight", "int_weight_t", "export_scale"):
                    module._buffers.pop(name, None)
        model.train(was_training)
