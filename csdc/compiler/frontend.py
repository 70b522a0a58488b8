"""ONNX frontend: load and check a model file and turn it into a :class:`QGraph`.

Checks: the file exists and parses, the ONNX checker accepts it, opset >= 13, one data input
and one output, shapes inferable (QONNX ``Quant`` nodes, from Brevitas ``export_qonnx``, count as
shape-preserving, and a symbolic batch axis as 1, so dynamic-batch shape arithmetic resolves). Every node whose op csdc cannot make spike-driven is
collected, and all of them are reported at once with the rewrite that would fix each.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np
import onnx
from onnx import numpy_helper

from csdc.compiler.qgraph import QGraph, QNode
from csdc.errors import ModelFileError, UnsupportedModelError

SUPPORTED = {
    "QuantizeLinear", "DequantizeLinear", "Clip", "Conv", "Gemm", "MatMul", "Add", "Mul", "Div",
    "BatchNormalization", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Flatten", "Reshape", "Transpose", "Identity", "Dropout", "Constant", "Squeeze", "Unsqueeze", "Cast",
    "Shape", "Slice", "Concat", "Gather",  # shape arithmetic for Reshape targets (folded to constants)
    "Round",  # only inside an LSQ quantizer written as arithmetic (Div -> Round -> Clip -> Mul)
}

# QONNX quantizers (Brevitas export_qonnx); canonicalize_qonnx_quant turns them into csdc's Quant
QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general")
QONNX_SUPPORTED = {"Quant"}

# op -> why it cannot run spike-driven and what to use instead
REJECTED = {
    "Softmax": "softmax needs exponentials and a division by a data-dependent sum; use NReLU attention "
               "(ReLU(QK^T/sqrt(d)) / N followed by a quantizer), as in CSDformer",
    "LogSoftmax": "needs exponentials and logarithms; remove it (argmax of the logits is unchanged)",
    "LayerNormalization": "normalizes by data-dependent statistics; use BatchNormalization, which folds into weights",
    "Gelu": "not piecewise linear; use ReLU followed by a quantizer",
    "Sigmoid": "not expressible by integrate-and-fire; use ReLU followed by a quantizer",
    "Tanh": "not expressible by integrate-and-fire; use ReLU followed by a quantizer",
    "Erf": "part of GELU; use ReLU followed by a quantizer",
    "Exp": "exponentials are not spike-driven; restructure the model without it",
    "Sqrt": "data-dependent square roots are not spike-driven; use constants",
    "Pow": "data-dependent powers are not spike-driven",
    "ReduceMax": "use MaxPool on a spatial map instead",
    "LeakyRelu": "negative slopes are not expressible by a non-negative spike count; use ReLU",
    "PRelu": "negative slopes are not expressible by a non-negative spike count; use ReLU",
    "HardSigmoid": "use ReLU followed by a quantizer",
    "HardSwish": "use ReLU followed by a quantizer",
    "Sub": "subtraction of tensors is not supported; fold constants into biases",
}


def _shape_of(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    if not vi.type.HasField("tensor_type") or not vi.type.tensor_type.HasField("shape"):
        return None
    dims = []
    for i, d in enumerate(vi.type.tensor_type.shape.dim):
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif i == 0:
            dims.append(1)  # symbolic batch axis
        else:
            return None
    return tuple(dims)


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Read and check an ONNX file; errors name the file and the problem.

    The checker reads the file itself before the model is loaded here, so a large model is never
    held twice (checking a loaded model serializes it again)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file")
    try:
        onnx.checker.check_model(path)
        checked = None
    except Exception as exc:  # a file that does not parse, or a model the checker rejects
        checked = exc
    try:
        model = onnx.load(path)
    except Exception as exc:  # protobuf raises several unrelated types for garbage
        raise ModelFileError(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}); "
                             "re-export it with torch.onnx.export or check the download") from None
    if not model.graph.node:
        raise ModelFileError(f"{path}: not a readable ONNX model (the graph has no nodes)")
    if checked is not None:
        first = str(checked).strip().splitlines()[0] if str(checked).strip() else type(checked).__name__
        raise ModelFileError(f"{path}: the ONNX checker rejects the model: {first}") from None
    return model


SHAPE_DATA_LIMIT = 4096  # initializers up to this many elements keep their values for shape inference


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose large initializers are declared (type and shape) but hold no data:
    shape inference only needs the values of small shape tensors, and copying a large model's
    weights would double the memory it takes."""
    g = model.graph
    graph = onnx.GraphProto(name=g.name)
    graph.node.extend(g.node)
    graph.input.extend(g.input)
    graph.output.extend(g.output)
    graph.value_info.extend(g.value_info)
    declared = {vi.name for vi in g.input}
    for init in g.initializer:
        if int(np.prod(init.dims)) <= SHAPE_DATA_LIMIT:
            graph.initializer.append(init)
        elif init.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    m = onnx.helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m


def _for_shape_inference(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy for shape inference: QONNX Quant nodes (shape-preserving, unknown to ONNX) become
    Identity nodes, and a symbolic batch axis of the input becomes 1, so that shape arithmetic of
    dynamic-batch exports (``Shape -> Slice -> Concat -> Reshape``) propagates to concrete shapes."""
    m = _skeleton(model)
    inits = {i.name for i in m.graph.initializer}
    for vi in m.graph.input:
        if vi.name not in inits and vi.type.tensor_type.shape.dim:
            d0 = vi.type.tensor_type.shape.dim[0]
            if not d0.HasField("dim_value"):
                d0.Clear()
                d0.dim_value = 1
    if not any(n.domain in QONNX_DOMAINS for n in model.graph.node):
        return m
    nodes = []
    for n in m.graph.node:
        if n.domain in QONNX_DOMAINS:
            n = onnx.helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name)
        nodes.append(n)
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    del m.opset_import[:]
    m.opset_import.extend([o for o in model.opset_import if o.domain not in QONNX_DOMAINS])
    return m


def to_qgraph(model: onnx.ModelProto, path: str = "<model>") -> QGraph:
    """Convert a checked ONNX model to a QGraph, rejecting unsupported ops all at once."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise ModelFileError(f"{path}: opset {opset} is too old; export with opset_version >= 13")
    problems: list[tuple[str, str, str]] = []
    for i, node in enumerate(model.graph.node):
        name = node.name or f"{node.op_type}_{i}"
        if node.domain in QONNX_DOMAINS:
            if node.op_type not in QONNX_SUPPORTED:
                problems.append((name, f"{node.domain}.{node.op_type}", "of the QONNX ops only Quant is supported; "
                                 "re-export with Quant nodes (Brevitas export_qonnx) or as QCDQ"))
        elif node.domain not in ("", "ai.onnx"):
            problems.append((name, f"{node.domain}.{node.op_type}", "custom-domain ops are not supported; "
                             "export with standard ONNX ops (QuantizeLinear/DequantizeLinear for quantizers)"))
        elif node.op_type in REJECTED:
            problems.append((name, node.op_type, REJECTED[node.op_type]))
        elif node.op_type not in SUPPORTED:
            problems.append((name, node.op_type, "no spike-driven lowering exists for this op"))
    if problems:
        raise UnsupportedModelError(path, problems)

    try:
        inferred = onnx.shape_inference.infer_shapes(_for_shape_inference(model), strict_mode=True, data_prop=True)
    except Exception as exc:
        raise ModelFileError(f"{path}: ONNX shape inference failed: {exc}") from None
    g = inferred.graph
    constants = {}
    for init in model.graph.initializer:
        arr = numpy_helper.to_array(init)
        arr.flags.writeable = False  # shared, never copied, by the passes and the IR ops
        constants[init.name] = arr
    inputs = [vi for vi in g.input if vi.name not in constants]
    if len(inputs) != 1 or len(g.output) != 1:
        raise ModelFileError(f"{path}: csdc needs exactly one data input and one output, found "
                             f"{len(inputs)} input(s) and {len(g.output)} output(s)")
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shp = _shape_of(vi)
        if shp is not None:
            shapes[vi.name] = shp
    if inputs[0].name not in shapes:
        raise ModelFileError(f"{path}: input '{inputs[0].name}' needs a static shape (batch axis may be symbolic)")
    nodes = []
    for i, node in enumerate(model.graph.node):
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for k, v in list(attrs.items()):
            if isinstance(v, bytes):
                attrs[k] = v.decode()
            elif isinstance(v, onnx.TensorProto):
                attrs[k] = numpy_helper.to_array(v)
        nodes.append(QNode(node.name or f"{node.op_type}_{i}", node.op_type, tuple(node.input),
                           tuple(node.output), attrs, node.domain))
    for const in constants.values():
        if const.dtype == object:
            raise ModelFileError(f"{path}: string tensors are not supported")
    return QGraph(nodes=nodes, constants=constants, shapes=shapes, input=inputs[0].name,
                  output=g.output[0].name, path=path, opset=opset)


def release_freed_memory() -> None:
    """Give memory that was freed but is still held by the C allocator back to the system (glibc's
    ``malloc_trim``; nothing elsewhere). A parsed ONNX model lives in many mid-sized blocks that the
    allocator keeps after the model is dropped; without this a large model costs its size twice."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_qgraph(path: str | os.PathLike) -> QGraph:
    """Load, check and convert an ONNX file (the parsed ONNX model is released before returning)."""
    graph = to_qgraph(load_model(path), os.fspath(path))
    release_freed_memory()
    return graph


__all__ = ["load_model", "to_qgraph", "load_qgraph", "SUPPORTED", "REJECTED"]
