"""A tiny builder of quantized ONNX graphs for compiler tests (QDQ / QCDQ patterns by hand)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class Builder:
    def __init__(self, input_shape: tuple[int, ...], opset: int = 17, seed: int = 0):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.input_shape = input_shape
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.n = 0
        self.domains: dict[str, int] = {}  # custom-domain opsets used by the nodes (e.g. QONNX)

    def _name(self, base: str) -> str:
        self.n += 1
        return f"{base}_{self.n}"

    def const(self, arr: np.ndarray, base: str = "c") -> str:
        name = self._name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self._name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self._name(op), **attrs))
        return out

    def quant(self, x: str, scale: float, levels: int, clip: bool = True, zp: int = 0, dtype=np.uint8) -> str:
        s, z = self.const(np.float32(scale), "s"), self.const(np.array(zp, dtype=dtype), "zp")
        q = self.node("QuantizeLinear", [x, s, z])
        if clip:
            q = self.node("Clip", [q, self.const(np.array(zp, dtype=dtype)), self.const(np.array(zp + levels, dtype=dtype))])
        return self.node("DequantizeLinear", [q, s, z])

    def qweight(self, shape: tuple[int, ...], bits: int = 4, axis: int = 0) -> str:
        qmax = 2 ** (bits - 1) - 1
        w = self.rng.integers(-qmax, qmax + 1, size=shape).astype(np.int8)
        scale = self.rng.uniform(0.02, 0.1, size=shape[axis]).astype(np.float32)
        return self.node("DequantizeLinear", [self.const(w, "w"), self.const(scale, "ws"), self.const(np.zeros(shape[axis], np.int8), "wz")], axis=axis)

    def conv(self, x: str, cin: int, cout: int, k: int = 3, pad: int = 1, stride: int = 1, bias: bool = True, float_w: bool = False) -> str:
        w = self.const(self.rng.normal(0, 0.3, (cout, cin, k, k)).astype(np.float32)) if float_w else self.qweight((cout, cin, k, k))
        ins = [x, w] + ([self.const(self.rng.normal(0, 0.1, cout).astype(np.float32), "b")] if bias else [])
        return self.node("Conv", ins, pads=[pad] * 4, strides=[stride] * 2, kernel_shape=[k, k])

    def bn(self, x: str, c: int, negative: bool = True) -> str:
        g = self.rng.uniform(0.5, 1.5, c) * (np.where(self.rng.random(c) < 0.2, -1, 1) if negative else 1)
        return self.node("BatchNormalization", [x, self.const(g.astype(np.float32)), self.const(self.rng.normal(0, 0.2, c).astype(np.float32)),
                                                self.const(self.rng.normal(0, 0.2, c).astype(np.float32)), self.const(self.rng.uniform(0.5, 2, c).astype(np.float32))])

    def qonnx_quant(self, x: str, scale, zeropt, bits, signed: int = 0, narrow: int = 0, rounding_mode: str = "ROUND") -> str:
        """A QONNX ``Quant`` node (domain qonnx.custom_op.general), as Brevitas export_qonnx writes it."""
        self.domains["qonnx.custom_op.general"] = 1
        out = self._name("quant")
        ins = [x, self.const(np.float32(scale)), self.const(np.float32(zeropt)), self.const(np.float32(bits))]
        self.nodes.append(helper.make_node("Quant", ins, [out], name=self._name("Quant"), domain="qonnx.custom_op.general",
                                           signed=signed, narrow=narrow, rounding_mode=rounding_mode))
        return out

    def gemm(self, x: str, nin: int, nout: int) -> str:
        return self.node("Gemm", [x, self.qweight((nout, nin)), self.const(self.rng.normal(0, 0.1, nout).astype(np.float32))], transB=1)

    def model(self, out: str, out_shape: tuple[int, ...]) -> onnx.ModelProto:
        g = helper.make_graph(self.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", *self.input_shape[1:]])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, ["n", *out_shape[1:]])], self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", self.opset)]
                              + [helper.make_opsetid(d, v) for d, v in self.domains.items()])
        m.ir_version = 8
        onnx.checker.check_model(m)
        return m


def digits_like_cnn(levels: int = 15, seed: int = 0, pool_before_quant: bool = False, float_weights: bool = False) -> onnx.ModelProto:
    """Input quantizer -> [Conv -> BN -> Quant -> MaxPool] x 2 -> Flatten -> Gemm, for (n, 1, 8, 8) input."""
    b = Builder((1, 1, 8, 8), seed=seed)
    x = b.quant("x", 1 / 16, 16)
    for cin, cout, step in ((1, 8, 0.25), (8, 16, 0.3)):
        y = b.bn(b.conv(x, cin, cout, float_w=float_weights), cout)
        if pool_before_quant:
            x = b.quant(b.node("MaxPool", [b.node("Relu", [y])], kernel_shape=[2, 2], strides=[2, 2]), step, levels)
        else:
            x = b.node("MaxPool", [b.quant(y, step, levels)], kernel_shape=[2, 2], strides=[2, 2])
    return b.model(b.gemm(b.node("Flatten", [x], axis=1), 64, 10), (1, 10))


def residual_cnn(levels: int = 7, seed: int = 0) -> onnx.ModelProto:
    """Quant -> Conv-BN-Quant -> [Conv-BN + skip] residual Add -> Quant -> AvgPool -> Quant -> GAP -> Gemm."""
    b = Builder((1, 1, 8, 8), seed=seed)
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 8), 8), 0.25, levels)
    r = b.node("Add", [b.bn(b.conv(h, 8, 8), 8), h])
    h2 = b.quant(r, 0.3, levels)
    p = b.quant(b.node("AveragePool", [h2], kernel_shape=[2, 2], strides=[2, 2]), 0.2, levels)
    g = b.node("GlobalAveragePool", [p])
    return b.model(b.gemm(b.node("Flatten", [g], axis=1), 8, 10), (1, 10))


def token_mlp(levels: int = 7, seed: int = 0) -> onnx.ModelProto:
    """Image -> Reshape to tokens -> MatMul + bias Add -> Mul const -> Quant -> Transpose/Reshape -> ReduceMean -> Gemm(transB=0)."""
    b = Builder((1, 1, 8, 8), seed=seed)
    x = b.quant("x", 1 / 16, 16)
    t = b.node("Reshape", [x, b.const(np.array([-1, 8, 8], np.int64))])  # (n, 8 tokens, 8 features)
    w = b.qweight((8, 12), axis=1)
    h = b.node("MatMul", [t, w])
    h = b.node("Add", [h, b.const(b.rng.normal(0, 0.1, 12).astype(np.float32))])
    h = b.node("Mul", [h, b.const(np.float32(1.5))])
    q = b.quant(h, 0.2, levels)  # (n, 8, 12)
    q = b.node("Transpose", [q], perm=[0, 2, 1])  # (n, 12, 8)
    q = b.node("Transpose", [q], perm=[0, 2, 1])  # (n, 8, 12)
    m = b.node("ReduceMean", [q], axes=[1], keepdims=0)  # opset 17: axes attribute
    w2 = b.qweight((12, 10), axis=1)
    out = b.node("Gemm", [m, w2, b.const(b.rng.normal(0, 0.1, 10).astype(np.float32))])
    return b.model(out, (1, 10))


def with_ops(ops: list[str], opset: int = 20) -> onnx.ModelProto:
    """A quantized CNN with extra unconvertible ops appended to the classifier output."""
    b = Builder((1, 1, 8, 8), seed=0, opset=opset)
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.25, 7)
    y = b.gemm(b.node("Flatten", [h], axis=1), 256, 10)
    for op in ops:
        if op == "LayerNormalization":
            y = b.node(op, [y, b.const(np.ones(10, np.float32)), b.const(np.zeros(10, np.float32))], axis=-1)
        elif op == "Softmax":
            y = b.node(op, [y], axis=-1)
        else:
            y = b.node(op, [y])
    return b.model(y, (1, 10))


def attention_model(levels: int = 4, seed: int = 0, heads: int = 2, softmax: bool = False) -> onnx.ModelProto:
    """Conv tokenizer -> one tailored self-attention block (NReLU) with residual -> mean over tokens -> Gemm.

    Tokens: (n, 16, 8) from an (8, 4, 4) map; Q/K/V projections with token BN written as
    Transpose -> BatchNormalization -> Transpose; heads split after the quantizers."""
    b = Builder((1, 1, 8, 8), seed=seed)
    d, N = 8, 16
    dk = d // heads
    x = b.quant("x", 1 / 16, 16)
    f = b.quant(b.bn(b.conv(x, 1, d), d, negative=False), 0.3, levels)
    f = b.node("MaxPool", [f], kernel_shape=[2, 2], strides=[2, 2])  # (n, 8, 4, 4)
    z0 = b.node("Transpose", [b.node("Reshape", [f, b.const(np.array([0, d, N], np.int64))])], perm=[0, 2, 1])  # (n, N, d)
    xq = b.quant(z0, 0.45, levels)  # requantize the token spikes on a new grid

    def proj(inp, step):
        h = b.node("Add", [b.node("MatMul", [inp, b.qweight((d, d), axis=1)]), b.const(b.rng.normal(0, 0.1, d).astype(np.float32))])
        h = b.node("Transpose", [b.bn(b.node("Transpose", [h], perm=[0, 2, 1]), d)], perm=[0, 2, 1])
        return h if step is None else b.quant(h, step, levels)

    def heads_of(t, perm):
        return b.node("Transpose", [b.node("Reshape", [t, b.const(np.array([0, N, heads, dk], np.int64))])], perm=perm)

    q = heads_of(proj(xq, 0.3), [0, 2, 1, 3])  # (n, h, N, dk)
    kt = heads_of(proj(xq, 0.3), [0, 2, 3, 1])  # (n, h, dk, N)
    v = heads_of(proj(xq, 0.3), [0, 2, 1, 3])
    s = b.node("Mul", [b.node("MatMul", [q, kt]), b.const(np.float32(1 / np.sqrt(dk)))])
    if softmax:
        a = b.quant(b.node("Softmax", [s], axis=-1), 0.25, levels)
    else:
        a = b.quant(b.node("Div", [b.node("Relu", [s]), b.const(np.float32(N))]), 0.02, levels)
    o = b.quant(b.node("MatMul", [a, v]), 0.05, levels)  # (n, h, N, dk)
    o = b.node("Reshape", [b.node("Transpose", [o], perm=[0, 2, 1, 3]), b.const(np.array([0, N, d], np.int64))])
    z1 = b.node("Add", [z0, proj(o, None)])
    hq = b.quant(z1, 0.4, levels)
    m = b.node("ReduceMean", [hq], axes=[1], keepdims=0)
    return b.model(b.gemm(m, d, 10), (1, 10))


def signed_quant(b: Builder, x: str, scale: float, lo: int, hi: int, zp: int = 0, dtype=np.int8) -> str:
    """QuantizeLinear(zero point ``zp`` of ``dtype``) -> Clip(lo, hi) -> DequantizeLinear."""
    s, z = b.const(np.float32(scale)), b.const(np.array(zp, dtype))
    q = b.node("Clip", [b.node("QuantizeLinear", [x, s, z]), b.const(np.array(lo, dtype)), b.const(np.array(hi, dtype))])
    return b.node("DequantizeLinear", [q, s, z])


def signed_attention_model(L: int = 7, seed: int = 0) -> onnx.ModelProto:
    """Unsigned [0, L] tokenizer, symmetric [-L, L] Q, K and V (int8, zero point 0, Clip), NReLU
    attention map q(ReLU(Q K^T / sqrt(dk)) / N) in [0, L], symmetric A V, residual, mean, linear."""
    b = Builder((1, 1, 8, 8), seed=seed)
    d, N, heads = 8, 16, 2
    dk = d // heads
    x = b.quant("x", 1 / 16, 16)
    f = b.quant(b.bn(b.conv(x, 1, d), d, negative=False), 0.3, L)
    f = b.node("MaxPool", [f], kernel_shape=[2, 2], strides=[2, 2])
    z0 = b.node("Transpose", [b.node("Reshape", [f, b.const(np.array([0, d, N], np.int64))])], perm=[0, 2, 1])

    def proj(inp):
        h = b.node("MatMul", [inp, b.qweight((d, d), axis=1)])
        return b.node("Transpose", [b.bn(b.node("Transpose", [h], perm=[0, 2, 1]), d)], perm=[0, 2, 1])

    def heads_of(t, perm):
        return b.node("Transpose", [b.node("Reshape", [t, b.const(np.array([0, N, heads, dk], np.int64))])], perm=perm)

    q = heads_of(signed_quant(b, proj(z0), 0.31, -L, L), [0, 2, 1, 3])
    kt = heads_of(signed_quant(b, proj(z0), 0.29, -L, L), [0, 2, 3, 1])
    v = heads_of(signed_quant(b, proj(z0), 0.33, -L, L), [0, 2, 1, 3])
    s = b.node("Mul", [b.node("MatMul", [q, kt]), b.const(np.float32(1 / np.sqrt(dk)))])
    a = b.quant(b.node("Div", [b.node("Relu", [s]), b.const(np.float32(N))]), 0.021, L)
    o = signed_quant(b, b.node("MatMul", [a, v]), 0.047, -L, L)
    o = b.node("Reshape", [b.node("Transpose", [o], perm=[0, 2, 1, 3]), b.const(np.array([0, N, d], np.int64))])
    z1 = b.node("Add", [z0, proj(o)])
    m = b.node("ReduceMean", [b.quant(z1, 0.4, L)], axes=[1], keepdims=0)
    return b.model(b.gemm(m, d, 10), (1, 10))
