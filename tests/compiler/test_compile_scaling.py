"""Compiled networks cost memory in proportion to their parameters, not to their activations:
per-channel values stay per channel, quantized weights keep the source's integers, a global
average pool is a shared synapse summed over positions, and dequantized weights are never
held as floats."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from csdc.compiler.frontend import load_qgraph
from csdc.compiler.passes.fold_constants import fold_constants
from csdc.compiler.lower import lower
from csdc.compiler.pipeline import CompileOptions, canonicalize, compile_onnx
from csdc.compiler.qgraph import Dequantized
from csdc.ir import semantics, serialize
from csdc.ir.ops import ConvSynapse, DenseSynapse, DiagonalSynapse, Neuron, ReduceSum, compact
from csdc.runtime.evaluate import onnx_logits

from onnx_build import Builder, digits_like_cnn


def gap_cnn(size: int, seed: int = 0) -> onnx.ModelProto:
    """Quant -> Conv-BN-Quant -> residual [Conv-BN + skip] -> Quant -> GlobalAveragePool -> Gemm, on size x size."""
    b = Builder((1, 1, size, size), seed=seed)
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 8), 8), 0.25, 7)
    h2 = b.quant(b.node("Add", [b.bn(b.conv(h, 8, 8), 8), h]), 0.3, 7)
    g = b.node("GlobalAveragePool", [h2])
    return b.model(b.gemm(b.node("Flatten", [g], axis=1), 8, 10), (1, 10))


def _compile(tmp_path, model: onnx.ModelProto, name: str):
    path = tmp_path / f"{name}.onnx"
    onnx.save(model, path)
    net, _ = compile_onnx(path)
    return path, net


def _stored_bytes(net) -> int:
    return sum(compact(a).nbytes for _, op in net.nodes() for a in op.arrays().values())


def test_parameters_do_not_grow_with_the_image(tmp_path) -> None:
    _, small = _compile(tmp_path, gap_cnn(8), "small")
    _, large = _compile(tmp_path, gap_cnn(96), "large")
    assert _stored_bytes(small) == _stored_bytes(large)  # same parameters, 144x the neurons
    serialize.save(small, tmp_path / "small.sir")
    serialize.save(large, tmp_path / "large.sir")
    sizes = [(tmp_path / f"{n}.sir").stat().st_size for n in ("small", "large")]
    assert abs(sizes[1] - sizes[0]) < 0.05 * sizes[0]
    for name in large.neurons():
        op, shape = large.op(name), large.info(name).shape
        assert op.threshold.shape == shape and compact(op.threshold).size <= shape[0]  # per channel
    for _, op in large.nodes():
        if isinstance(op, DiagonalSynapse):
            assert compact(op.mantissa).size <= op.mantissa.shape[0]


def test_global_average_pool_is_one_shared_synapse_summed_over_positions(tmp_path) -> None:
    path, net = _compile(tmp_path, gap_cnn(12, seed=1), "gap")
    (reduce_node,) = [n for n, op in net.nodes() if isinstance(op, ReduceSum)]
    head = net.op(net.inputs(reduce_node)[0])
    assert isinstance(head, DenseSynapse) and head.mantissa.shape == (10, 8)  # not repeated per position
    assert net.info(net.inputs(reduce_node)[0]).shape == (144, 10)
    rng = np.random.default_rng(0)
    x = (rng.integers(0, 17, (200, 1, 12, 12)) / 16).astype(np.float32)
    ref = onnx_logits(path, x)
    got = semantics.run_counts(net, x).logits
    assert np.mean(ref.argmax(1) == got.argmax(1)) >= 0.99
    assert np.median(np.abs(ref - got)) < 1e-4


def test_quantized_weights_keep_their_integers(tmp_path) -> None:
    path = tmp_path / "cnn.onnx"
    onnx.save(digits_like_cnn(seed=2), path)
    graph = canonicalize(load_qgraph(path), CompileOptions())
    net, _ = lower(graph)
    model_ints = [n.attrs["w_int"] for n in graph.nodes if n.op_type == "Linear"]
    synapses = [op for _, op in net.nodes() if isinstance(op, (ConvSynapse, DenseSynapse))]
    for op in synapses:
        assert op.mantissa.dtype.itemsize <= 2  # int8 from the model, int16 where BN flipped a sign
        assert np.array_equal(op.weight, op.mantissa.astype(np.int64) << op.exponent)
    shared = [op for op in synapses if any(np.shares_memory(op.mantissa, w) for w in model_ints)]
    assert shared, "no synapse kept the model's own weight array"


@pytest.mark.parametrize("axis", [None, 0, 1])
def test_dequantized_constants_are_lazy_and_exact(tmp_path, axis) -> None:
    b = Builder((1, 1, 8, 8), seed=4)
    x = b.quant("x", 1 / 16, 16)
    if axis is None:
        w = b.node("DequantizeLinear", [b.const(b.rng.integers(-7, 8, (8, 1, 3, 3)).astype(np.int8), "w"),
                                        b.const(np.float32(0.037), "ws")])
    else:
        w = b.qweight((8, 1, 3, 3), axis=axis)
    h = b.quant(b.node("Conv", [x, w], pads=[1] * 4, kernel_shape=[3, 3]), 0.25, 7)
    model = b.model(b.gemm(b.node("Flatten", [h], axis=1), 512, 10), (1, 10))
    onnx.save(model, tmp_path / "m.onnx")
    graph = fold_constants(load_qgraph(tmp_path / "m.onnx"))
    (lazy,) = [v for v in graph.constants.values() if isinstance(v, Dequantized)][:1]
    ints, scale, _ = graph.qconstants[w]
    init = next(v for k, v in load_qgraph(tmp_path / "m.onnx").constants.items() if k.startswith("w_"))
    assert ints.dtype == np.int8 and np.array_equal(ints, init)
    # ONNX DequantizeLinear: (x - zero_point) * scale in float32
    shape = [1] * 4
    if axis is not None:
        shape[axis] = scale.size
    expected = ints.astype(np.float32) * scale.astype(np.float32).reshape(shape if axis is not None else ())
    assert np.asarray(lazy).dtype == np.float32 and np.array_equal(np.asarray(lazy), expected)
