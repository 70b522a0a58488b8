"""move_input_quant: the model input's quantizer moves in front of the routing that reads the input.

Each rewrite is checked by running the graph before and after the pass with onnxruntime (bit-exact:
routing commutes with elementwise quantization), and end to end by compiling and comparing with
onnxruntime on the source model. Refusals name the node, the op and the tensor."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from csdc.compiler.frontend import load_qgraph
from csdc.compiler.passes import PassManager
from csdc.compiler.passes.move_input_quant import move_input_quant
from csdc.compiler.pipeline import CompileOptions, canonicalize, compile_onnx
from csdc.compiler.qgraph import QGraph
from csdc.errors import UnsupportedModelError
from csdc.ir import semantics
from csdc.runtime.evaluate import onnx_logits

from lava_check import assert_lava_equals_numba
from onnx_build import Builder


def as_onnx(graph: QGraph) -> onnx.ModelProto:
    """A QGraph of standard ONNX ops (before canonicalize_quant) written back as a model, to run it."""
    nodes = [helper.make_node(n.op_type, list(n.inputs), list(n.outputs), name=n.name, **n.attrs) for n in graph.nodes]
    inits = [numpy_helper.from_array(np.asarray(v), k) for k, v in graph.constants.items()]
    io = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", *graph.shapes[name][1:]])  # noqa: E731
    model = helper.make_model(helper.make_graph(nodes, "g", [io(graph.input)], [io(graph.output)], inits),
                              opset_imports=[helper.make_opsetid("", graph.opset)])
    model.ir_version = 8
    return model


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def moved(tmp_path, model: onnx.ModelProto) -> tuple[QGraph, QGraph]:
    """The loaded graph and the graph after the pass (its contract checked)."""
    onnx.save(model, tmp_path / "m.onnx")
    before = load_qgraph(tmp_path / "m.onnx")
    return before, PassManager([move_input_quant], check=True).run(before).graph


def per_axis_qdq(b: Builder, x: str, scales: list[float], axis: int) -> str:
    s, z = b.const(np.array(scales, np.float32)), b.const(np.zeros(len(scales), np.uint8))
    return b.node("DequantizeLinear", [b.node("QuantizeLinear", [x, s, z], axis=axis), s, z], axis=axis)


def routed_mlp(levels: int = 15) -> onnx.ModelProto:
    """x (n, 1, 8, 8) -> Squeeze -> Transpose -> Unsqueeze -> Identity -> Flatten -> QCDQ -> Gemm -> QCDQ -> Gemm."""
    b = Builder((1, 1, 8, 8))
    t = b.node("Squeeze", ["x", b.const(np.array([1], np.int64))])
    t = b.node("Transpose", [t], perm=[0, 2, 1])
    t = b.node("Unsqueeze", [t, b.const(np.array([1], np.int64))])
    t = b.node("Flatten", [b.node("Identity", [t])], axis=1)
    h = b.quant(t, 1 / 16, 16)
    h = b.quant(b.gemm(h, 64, 32), 0.15, levels)
    return b.model(b.gemm(h, 32, 10), (1, 10))


def test_routing_chain_moves_behind_the_quantizer_and_compiles_exactly(tmp_path):
    before, after = moved(tmp_path, routed_mlp())
    ops = [n.op_type for n in after.nodes]
    assert ops[:3] == ["QuantizeLinear", "Clip", "DequantizeLinear"] and after.nodes[0].inputs[0] == "x"
    assert ops[3:7] == ["Squeeze", "Transpose", "Unsqueeze", "Identity"]
    x = (np.random.default_rng(0).integers(0, 17, (300, 1, 8, 8)) / 16 + 0.013).astype(np.float32)
    assert np.array_equal(run(as_onnx(before), x), run(as_onnx(after), x))
    net, _ = compile_onnx(tmp_path / "m.onnx")
    assert net.input_shape == (1, 8, 8)
    assert np.array_equal(semantics.run_counts(net, x).logits.argmax(1), onnx_logits(tmp_path / "m.onnx", x).argmax(1))
    assert np.abs(semantics.run_counts(net, x).logits - onnx_logits(tmp_path / "m.onnx", x)).max() < 1e-4


def test_flattened_input_model_takes_its_own_layout(tmp_path):
    """A model whose input is (n, 64), reshaped to an image inside: Reshape -> QDQ -> Conv; the network's input
    is the model's (64,), the routing an IR Reshape on the encoded levels."""
    b = Builder((1, 64))
    t = b.node("Reshape", ["x", b.const(np.array([-1, 1, 8, 8], np.int64))])
    h = b.quant(b.bn(b.conv(b.quant(t, 1 / 16, 16), 1, 4), 4), 0.25, 15)
    onnx.save(b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10)), tmp_path / "m.onnx")
    net, _ = compile_onnx(tmp_path / "m.onnx")
    assert net.input_shape == (64,)
    assert [type(net.op(s)).__name__ for s in net.consumers(net.input_name)] == ["Reshape"]
    x = (np.random.default_rng(1).integers(0, 17, (200, 64)) / 16).astype(np.float32)
    ref, snn = onnx_logits(tmp_path / "m.onnx", x), semantics.run_counts(net, x).logits
    assert np.mean(ref.argmax(1) == snn.argmax(1)) >= 0.99 and np.median(np.abs(ref - snn)) < 1e-4


def test_per_axis_quantizer_axis_is_remapped_onto_the_input(tmp_path):
    """Transpose (0, 2, 3, 1) then Unsqueeze: a QuantizeLinear along the last axis (the channels) quantizes
    axis 1 of the model input; the moved graph computes the same values."""
    b = Builder((1, 3, 4, 5))
    t = b.node("Unsqueeze", [b.node("Transpose", ["x"], perm=[0, 2, 3, 1]), b.const(np.array([1], np.int64))])
    q = per_axis_qdq(b, t, [0.1, 0.05, 0.02], axis=-1)
    before, after = moved(tmp_path, b.model(b.gemm(b.node("Flatten", [q], axis=1), 60, 10), (1, 10)))
    qdq = [n for n in after.nodes if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert [n.attrs["axis"] for n in qdq] == [1, 1] and qdq[0].inputs[0] == "x"
    x = np.random.default_rng(2).uniform(-0.5, 6, (100, 3, 4, 5)).astype(np.float32)
    assert np.array_equal(run(as_onnx(before), x), run(as_onnx(after), x))


def test_per_axis_quantizer_through_a_reshape_that_keeps_its_axis(tmp_path):
    b = Builder((1, 3, 4, 5))
    t = b.node("Reshape", ["x", b.const(np.array([-1, 3, 20], np.int64))])
    q = per_axis_qdq(b, t, [0.1, 0.05, 0.02], axis=1)
    y = b.node("MatMul", [q, b.qweight((20, 10), axis=1)])
    before, after = moved(tmp_path, b.model(y, (1, 3, 10)))
    assert [n.attrs["axis"] for n in after.nodes if n.op_type == "QuantizeLinear"] == [1]
    x = np.random.default_rng(3).uniform(-0.5, 6, (50, 3, 4, 5)).astype(np.float32)
    assert np.array_equal(run(as_onnx(before), x), run(as_onnx(after), x))


def test_per_axis_quantizer_on_a_merged_axis_is_refused_naming_node_op_tensor(tmp_path):
    b = Builder((1, 3, 4, 5))
    t = b.node("Reshape", ["x", b.const(np.array([-1, 6, 10], np.int64))])
    q = per_axis_qdq(b, t, [0.1] * 6, axis=1)
    model = b.model(b.node("MatMul", [q, b.qweight((10, 10), axis=1)]), (1, 6, 10))
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError) as exc:
        compile_onnx(tmp_path / "m.onnx")
    [(node, op, why)] = exc.value.problems
    assert (node, op) == (model.graph.node[0].name, "Reshape")
    assert f"merges or splits the axis of '{model.graph.node[0].output[0]}' (shape (1, 6, 10))" in why
    assert "(axis 1 of" in why and "'QuantizeLinear_" in why and "per axis" in why


def test_per_axis_quantizer_whose_axis_a_chain_splits_and_restores(tmp_path):
    """(3, 4) -> Reshape (12) -> Reshape (3, 4): neither step alone keeps axis 1, the chain does; the
    refusal names the routing op nearest the quantizer that loses the axis."""
    b = Builder((1, 3, 4))
    t = b.node("Reshape", ["x", b.const(np.array([-1, 12], np.int64))])
    t = b.node("Reshape", [t, b.const(np.array([-1, 3, 4], np.int64))])
    q = per_axis_qdq(b, t, [0.1, 0.05, 0.02], axis=1)
    before, after = moved(tmp_path, b.model(b.node("MatMul", [q, b.qweight((4, 10), axis=1)]), (1, 3, 10)))
    assert [n.attrs["axis"] for n in after.nodes if n.op_type == "QuantizeLinear"] == [1]
    x = np.random.default_rng(4).uniform(-0.5, 6, (50, 3, 4)).astype(np.float32)
    assert np.array_equal(run(as_onnx(before), x), run(as_onnx(after), x))
    b = Builder((1, 3, 4))
    t = b.node("Transpose", ["x"], perm=[0, 2, 1])
    t = b.node("Reshape", [t, b.const(np.array([-1, 2, 6], np.int64))])  # (4, 3) -> (2, 6): axis 2 of length 6 is new
    q = per_axis_qdq(b, t, [0.1] * 6, axis=2)
    model = b.model(b.node("Flatten", [q], axis=1), (1, 12))
    onnx.save(model, tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError) as exc:
        PassManager([move_input_quant]).run(load_qgraph(tmp_path / "m.onnx"))
    assert exc.value.problems[0][:2] == (model.graph.node[1].name, "Reshape")


def test_routing_read_by_another_node_is_refused_saying_why(tmp_path):
    """The Flatten's output feeds the quantizer and, unquantized, an Add: moving the quantizer would change
    what the Add reads; the lowering's refusal says so, once per culprit."""
    b = Builder((1, 1, 8, 8))
    t = b.node("Flatten", ["x"], axis=1)
    h = b.quant(b.gemm(b.quant(t, 1 / 16, 16), 64, 64), 0.15, 16)
    y = b.gemm(b.node("Add", [h, t]), 64, 10)
    onnx.save(b.model(y, (1, 10)), tmp_path / "m.onnx")
    _, after = moved(tmp_path, b.model(y, (1, 10)))
    assert after.nodes[0].op_type == "Flatten"  # not moved
    with pytest.raises(UnsupportedModelError) as exc:
        compile_onnx(tmp_path / "m.onnx")
    flatten = [p for p in exc.value.problems if p[1] == "Flatten"]
    assert len(flatten) == 1
    assert "reads the model input directly" in flatten[0][2]
    assert "could not be moved onto the model input: 'flatten_1' (output of Flatten 'Flatten_2') is read by 2 nodes" in flatten[0][2]


def test_routing_into_a_float_layer_keeps_the_input_error(tmp_path):
    b = Builder((1, 1, 8, 8))
    y = b.gemm(b.quant(b.gemm(b.node("Flatten", ["x"], axis=1), 64, 32), 0.15, 15), 32, 10)
    onnx.save(b.model(y, (1, 10)), tmp_path / "m.onnx")
    with pytest.raises(UnsupportedModelError) as exc:
        compile_onnx(tmp_path / "m.onnx")
    [(node, op, why)] = exc.value.problems
    assert op == "Flatten" and "reads the model input directly" in why and "not to a quantizer" in why


def test_quantizer_already_on_the_input_is_left_alone(tmp_path):
    b = Builder((1, 1, 8, 8))
    t = b.node("Flatten", [b.quant("x", 1 / 16, 16)], axis=1)
    before, after = moved(tmp_path, b.model(b.gemm(t, 64, 10), (1, 10)))
    assert [n.op_type for n in after.nodes] == [n.op_type for n in before.nodes]


def test_canonical_graph_quantizes_the_input_first(tmp_path):
    onnx.save(routed_mlp(), tmp_path / "m.onnx")
    g = canonicalize(load_qgraph(tmp_path / "m.onnx"), CompileOptions(), contracts=True)
    assert [c.op_type for c in g.consumers()[g.input]] == ["Quant"]



def test_routed_and_flattened_inputs_run_on_lava_spike_for_spike(tmp_path):
    """The encoder reading the model input and the IR routing of its levels on every backend: Lava's spike counts and
    readouts equal numba's (the routed MLP above, and the (n, 64) model reshaped to an image)."""
    b = Builder((1, 64))
    t = b.node("Reshape", ["x", b.const(np.array([-1, 1, 8, 8], np.int64))])
    h = b.quant(b.bn(b.conv(b.quant(t, 1 / 16, 16), 1, 4), 4), 0.25, 15)
    flat = b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10))
    rng = np.random.default_rng(6)
    for name, model, shape in (("routed.onnx", routed_mlp(), (4, 1, 8, 8)), ("flat.onnx", flat, (4, 64))):
        onnx.save(model, tmp_path / name)
        net, _ = compile_onnx(tmp_path / name)
        assert_lava_equals_numba(net, (rng.integers(0, 17, shape) / 16).astype(np.float32))

# --- property: any routing chain, per-tensor or per-axis -------------------------------------------
def _routing_chain_model(shape: tuple[int, ...], ops: list[tuple], quant_at_input: bool, scales: list[float],
                         axis: int) -> onnx.ModelProto:
    """x (n, *shape) -> routing ``ops`` -> Flatten, with a QDQ (per tensor when one scale, else along ``axis``) on the
    routing's output, or on the model input (``quant_at_input``)."""
    b = Builder((1, *shape))
    per_axis = len(scales) > 1

    def qdq(t: str) -> str:
        s = b.const(np.array(scales if per_axis else scales[0], np.float32))
        z = b.const(np.zeros(len(scales), np.uint8) if per_axis else np.array(0, np.uint8))
        attrs = {"axis": axis} if per_axis else {}
        return b.node("DequantizeLinear", [b.node("QuantizeLinear", [t, s, z], **attrs), s, z], **attrs)

    t = qdq("x") if quant_at_input else "x"
    for op, arg in ops:
        if op == "Transpose":
            t = b.node("Transpose", [t], perm=[0, *[p + 1 for p in arg]])
        elif op == "Reshape":
            t = b.node("Reshape", [t, b.const(np.array([-1, *arg], np.int64))])
        elif op in ("Squeeze", "Unsqueeze"):
            t = b.node(op, [t, b.const(np.array([arg + 1], np.int64))])
        else:
            t = b.node(op, [t], **({"axis": 1} if op == "Flatten" else {}))
    if not quant_at_input:
        t = qdq(t)
    size = int(np.prod(shape))
    return b.model(b.node("Flatten", [t], axis=1), (1, size))


@st.composite
def routing_chains(draw):
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    cur, ops = list(shape), []
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["Flatten", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity"]))
        if kind == "Flatten":
            cur = [int(np.prod(cur))]
        elif kind == "Reshape":  # a random factorization of the sample
            n, dims = int(np.prod(cur)), []
            while n > 1 and len(dims) < 3:
                f = draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
                dims.append(f)
                n //= f
            cur = dims + [n]
        elif kind == "Transpose":
            perm = draw(st.permutations(range(len(cur))))
            cur = [cur[p] for p in perm]
            ops.append((kind, list(perm)))
            continue
        elif kind == "Squeeze":
            ones = [i for i, d in enumerate(cur) if d == 1]
            if not ones or len(cur) == 1:
                continue
            i = draw(st.sampled_from(ones))
            cur = cur[:i] + cur[i + 1:]
            ops.append((kind, i))
            continue
        elif kind == "Unsqueeze":
            i = draw(st.integers(0, len(cur)))
            cur = cur[:i] + [1] + cur[i:]
            ops.append((kind, i))
            continue
        ops.append((kind, cur if kind == "Reshape" else None))
    ops = ops or [("Identity", None)]
    long_axes = [i for i, d in enumerate(cur) if d > 1]
    if long_axes and draw(st.sampled_from([True, True, False])):  # per axis, mostly
        a = draw(st.sampled_from(long_axes))
        scales = [0.05 + 0.037 * k for k in range(cur[a])]  # distinct: a wrong axis changes the values
        return shape, ops, scales, a + 1
    return shape, ops, [0.0625], 1


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(routing_chains())
def test_any_routing_chain_moves_exactly_or_is_refused_for_a_lost_axis(tmp_path, case):
    """Moved: the graph computes the same values as the source (onnxruntime, bit for bit). Refused (per axis only):
    a quantizer on the model input along any axis of that length computes other values than the source."""
    shape, ops, scales, axis = case
    model = _routing_chain_model(shape, ops, False, scales, axis)
    x = np.random.default_rng(5).uniform(-0.5, 8, (3, *shape)).astype(np.float32)
    ref = run(model, x)
    try:
        before, after = moved(tmp_path, model)
    except UnsupportedModelError:
        assert len(scales) > 1
        for b in range(1, len(shape) + 1):
            if shape[b - 1] == len(scales):
                assert not np.array_equal(run(_routing_chain_model(shape, ops, True, scales, b), x), ref)
        return
    assert [c.op_type for c in after.consumers()[after.input]] == ["QuantizeLinear"]
    assert np.array_equal(run(as_onnx(after), x), ref)
