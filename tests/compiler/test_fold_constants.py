"""fold_constants: any op on constants is evaluated (onnx's reference evaluator), the values equal
onnxruntime's, quantized weights keep their integers through routing ops, Round/Clip/Mul and the
per-channel axis follows Transpose/Reshape; nothing else is folded and the input graph is untouched."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnx_build import Builder

from csdc.compiler.frontend import load_qgraph, to_qgraph
from csdc.compiler.passes.fold_constants import fold_constants
from csdc.compiler.pipeline import CompileOptions, canonicalize
from csdc.compiler.qgraph import Dequantized, QGraph, QNode


def _ort_value(model: onnx.ModelProto, name: str) -> np.ndarray:
    """``name`` computed by onnxruntime on a zero input."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    del m.graph.output[:]
    m.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    sess = ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run([name], {"x": np.zeros((1, 1, 8, 8), np.float32)})[0]


def _model_with_weight(b: Builder, w: str, shape_w: tuple[int, ...]) -> onnx.ModelProto:
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.node("Conv", [x, w], pads=[1] * 4, kernel_shape=[3, 3]), 0.25, 7)
    return b.model(b.gemm(b.node("Flatten", [h], axis=1), shape_w[0] * 64, 10), (1, 10))


def test_ops_without_hand_written_code_fold_to_onnxruntime_values(tmp_path):
    b = Builder((1, 1, 8, 8), seed=1)
    w0 = b.const(b.rng.normal(0, 0.3, (4, 1, 3, 3)).astype(np.float32))
    step = b.node("Div", [b.node("ReduceMax", [b.node("Abs", [w0])], axes=[1, 2, 3], keepdims=1), b.const(np.float32(127))])
    w = b.node("Mul", [b.node("Clip", [b.node("Round", [b.node("Div", [w0, step])]), b.const(np.float32(-127)),
                                       b.const(np.float32(127))]), step])
    model = _model_with_weight(b, w, (4,))
    onnx.save(model, tmp_path / "m.onnx")
    graph = load_qgraph(tmp_path / "m.onnx")
    assert all(n.op_type not in ("ReduceMax", "Abs", "Round") for n in graph.nodes)
    np.testing.assert_array_equal(np.asarray(graph.constants[w]), _ort_value(model, w))
    ints, scale, axis = graph.qconstants[w]  # Round -> Clip -> Mul(step per channel): the integers and the step
    assert axis == 0 and ints.dtype == np.int8 and np.abs(ints).max() == 127 and scale.shape == (4,)


@pytest.mark.parametrize("route", ["transpose", "reshape", "unsqueeze-squeeze", "cast"])
def test_integers_survive_routing_and_the_channel_axis_moves(tmp_path, route):
    b = Builder((1, 1, 8, 8), seed=2)
    ints = b.rng.integers(-127, 128, (3, 3, 1, 4)).astype(np.int8)  # stored (kh, kw, cin, cout): channel axis 3
    scale = b.rng.uniform(0.01, 0.05, 4).astype(np.float32)
    dq = b.node("DequantizeLinear", [b.const(ints), b.const(scale), b.const(np.zeros(4, np.int8))], axis=3)
    w = b.node("Transpose", [dq], perm=[3, 2, 0, 1])
    if route == "reshape":
        w = b.node("Reshape", [b.node("Reshape", [w, b.const(np.array([4, 9], np.int64))]), b.const(np.array([4, 1, 3, 3], np.int64))])
    elif route == "unsqueeze-squeeze":
        w = b.node("Squeeze", [b.node("Unsqueeze", [w, b.const(np.array([0], np.int64))]), b.const(np.array([0], np.int64))])
    elif route == "cast":
        w = b.node("Cast", [b.node("Identity", [w])], to=onnx.TensorProto.FLOAT)
    model = _model_with_weight(b, w, (4,))
    onnx.save(model, tmp_path / "m.onnx")
    graph = load_qgraph(tmp_path / "m.onnx")
    assert isinstance(graph.constants[w], Dequantized)  # never held as floats
    got_ints, got_scale, axis = graph.qconstants[w]
    assert axis == 0 and np.array_equal(got_ints, ints.transpose(3, 2, 0, 1)) and np.array_equal(got_scale, scale)
    np.testing.assert_array_equal(np.asarray(graph.constants[w]), _ort_value(model, w))
    (conv,) = [n for n in canonicalize(graph, CompileOptions()).nodes if n.attrs.get("kind") == "conv"]
    assert not conv.attrs["weights_quantized_by_csdc"] and np.array_equal(conv.attrs["w_int"], got_ints)


def test_a_reshape_that_merges_the_channel_axis_gives_floats(tmp_path):
    b = Builder((1, 1, 8, 8), seed=3)
    dq = b.qweight((4, 9), axis=0)
    w = b.node("Reshape", [b.node("Transpose", [dq], perm=[1, 0]), b.const(np.array([4, 1, 3, 3], np.int64))])
    model = _model_with_weight(b, w, (4,))
    onnx.save(model, tmp_path / "m.onnx")
    graph = load_qgraph(tmp_path / "m.onnx")
    assert w not in graph.qconstants  # the per-channel steps no longer lie along one axis
    np.testing.assert_array_equal(np.asarray(graph.constants[w]), _ort_value(model, w))


def test_negative_step_is_made_positive_by_negating_the_integers():
    g = QGraph(nodes=[QNode("r", "Round", ("a",), ("r_out",)), QNode("m", "Mul", ("s", "r_out"), ("w",)),
                      QNode("use", "Add", ("x", "w"), ("y",))],
               constants={"a": np.array([[1.4, -2.6], [3.0, 0.2]], np.float32), "s": np.array([[-0.5], [0.25]], np.float32)},
               shapes={}, input="x", output="y")
    out = fold_constants(g)
    ints, scale, axis = out.qconstants["w"]
    assert np.array_equal(ints, [[-1, 3], [3, 0]]) and np.array_equal(scale, [0.5, 0.25]) and axis == 0
    assert np.array_equal(np.asarray(out.constants["w"]), np.array([[-0.5, 1.5], [0.75, 0.0]], np.float32))
    assert [n.name for n in out.nodes] == ["use"] and [n.name for n in g.nodes] == ["r", "m", "use"]  # input untouched
    assert "w" not in g.constants and "r_out" not in out.constants  # the intermediate levels are freed


def test_shape_of_a_known_tensor_folds_and_random_ops_do_not():
    g = QGraph(nodes=[QNode("sh", "Shape", ("x",), ("s",)), QNode("rand", "RandomNormal", (), ("r",), {"shape": [2]}),
                      QNode("add", "Add", ("x", "r"), ("y",))],
               constants={}, shapes={"x": (1, 3, 5)}, input="x", output="y")
    out = fold_constants(g)
    assert np.array_equal(out.constants["s"], [0, 3, 5])  # the batch axis as 0: "copy this axis" in a Reshape
    assert [n.name for n in out.nodes] == ["rand", "add"]


def torch_style_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` with every ``DequantizeLinear(W) -> MatMul`` weight stored transposed, as torch stores
    linear layers: ``DequantizeLinear(W^T, axis moved) -> Transpose -> MatMul``."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    prod = {o: n for n in m.graph.node for o in n.output}
    nodes = []
    for n in m.graph.node:
        if n.op_type == "MatMul" and n.input[1] in prod and prod[n.input[1]].op_type == "DequantizeLinear" \
                and prod[n.input[1]].input[0] in inits:
            dq = prod[n.input[1]]
            w = numpy_helper.to_array(inits[dq.input[0]])
            inits[dq.input[0]].CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), dq.input[0]))
            for a in dq.attribute:
                if a.name == "axis":
                    a.i = 1 - a.i % 2
            stored = dq.output[0] + "_stored"
            nodes.insert(nodes.index(dq) + 1, onnx.helper.make_node("Transpose", [stored], [dq.output[0]], perm=[1, 0],
                                                                     name=dq.name + "_T"))
            dq.output[0] = stored
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.graph.value_info[:]
    onnx.checker.check_model(m)
    return m


def test_transposed_int8_weights_keep_their_integers():
    """The shipped digits CSDformer with torch-style transposed weights: the same integers and scales,
    none re-quantized (this used to re-quantize them from floats through grid_levels)."""
    path = Path(__file__).resolve().parents[2] / "examples" / "digits_csdformer" / "model.onnx"
    transposed = torch_style_weights(onnx.load(path))
    assert sum(n.op_type == "Transpose" for n in transposed.graph.node) > sum(n.op_type == "Transpose" for n in onnx.load(path).graph.node)
    a = canonicalize(load_qgraph(path), CompileOptions())
    b = canonicalize(to_qgraph(transposed, "transposed"), CompileOptions())
    la = {n.name: n for n in a.nodes if n.op_type == "Linear"}
    lb = {n.name: n for n in b.nodes if n.op_type == "Linear"}
    assert la.keys() == lb.keys() and len(la) > 10
    for name, n in lb.items():
        assert not n.attrs["weights_quantized_by_csdc"], name
        assert np.array_equal(n.attrs["w_int"], la[name].attrs["w_int"]) and np.array_equal(n.attrs["w_scale"], la[name].attrs["w_scale"])
