"""ONNX frontend: load and check a model file and turn it into a :class:`QGraph`.

Checks: the file exists and parses, the ONNX checker accepts it, opset >= 13, no custom-domain ops
(QONNX ``Quant`` aside), one data input and one output. Then every tensor gets a shape
(:mod:`csdc.compiler.shapes`: onnx shape inference, else one onnxruntime run), every node whose
inputs are all constants is evaluated (:mod:`csdc.compiler.passes.fold_constants`, whatever its op:
fold before you judge), and only the data-dependent nodes left are judged: every one whose op csdc
cannot make spike-driven is collected, and all of them are reported at once with the rewrite that
would fix each.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

import numpy as np
import onnx
from onnx import numpy_helper

from csdc.compiler.passes.fold_constants import fold_constants
from csdc.compiler.passes.fuse_layernorm import DECOMPOSED_OPS
from csdc.compiler.passes.validate_numbers import validate_numbers
from csdc.compiler.qgraph import QGraph, QNode
from csdc.compiler.shapes import QONNX_DOMAINS, inferred_shapes, measured_shapes
from csdc.errors import ModelFileError, UnsupportedModelError

SUPPORTED = {
    "QuantizeLinear", "DequantizeLinear", "Clip", "Conv", "Gemm", "MatMul", "Add", "Mul", "Div",
    "BatchNormalization", "Relu", "MaxPool", "AveragePool", "GlobalAveragePool", "ReduceMean",
    "Flatten", "Reshape", "Transpose", "Identity", "Dropout", "Constant", "Squeeze", "Unsqueeze", "Cast",
    "Shape", "Slice", "Concat", "Gather",  # shape arithmetic for Reshape targets (folded to constants)
    "Round",  # only inside an LSQ quantizer written as arithmetic (Div -> Round -> Clip -> Mul)
}

# QONNX quantizers (Brevitas export_qonnx); canonicalize_qonnx_quant turns them into csdc's Quant
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


#: ops the opt-in approximate mode ``--nonlinear mbe`` lowers to MBE populations (docs/mbe.md)
MBE_LOWERED = {"Gelu", "Erf", "LayerNormalization", "Softmax"}
#: ops a standard transformer needs that ``--nonlinear mbe`` is meant to approximate
NONLINEAR = {"Softmax", "LayerNormalization", "Gelu", "Erf"}
NONLINEAR_MODES = ("refuse", "mbe")


def _nonlinear_reason(op: str, nonlinear: str) -> str:
    """Why ``op`` is refused, naming the opt-in approximate mode where it applies."""
    if nonlinear == "refuse":
        if op in MBE_LOWERED:
            return f"{REJECTED[op]}; or approximate it with MBE neurons: csdc compile --nonlinear mbe (docs/mbe.md)"
        return (f"{REJECTED[op]}; the approximate mode --nonlinear mbe (docs/mbe.md) lowers only "
                f"{', '.join(sorted(MBE_LOWERED))} between quantizers so far, not {op}")
    return f"--nonlinear mbe lowers only {', '.join(sorted(MBE_LOWERED))} between quantizers so far, not {op} (docs/mbe.md)"


def _rejected_reason(op: str, nonlinear: str) -> str:
    """Why ``op`` is refused; the ops of a LayerNorm exported in decomposed form (opset < 17) also name
    the mode that fuses and approximates that form."""
    if op in DECOMPOSED_OPS and nonlinear == "refuse":
        return (f"{REJECTED[op]}; if it is part of a LayerNorm exported in decomposed form (ReduceMean, Sub, Pow, "
                "Sqrt, Div), csdc compile --nonlinear mbe fuses and approximates it (docs/mbe.md)")
    return REJECTED[op]


def _judge(nodes: list[QNode], path: str, custom_only: bool = False, nonlinear: str = "refuse") -> None:
    """Raise one UnsupportedModelError listing every node whose op csdc cannot make spike-driven
    (``nonlinear="mbe"``: the ops of :data:`MBE_LOWERED` are let through to the lowering)."""
    problems: list[tuple[str, str, str]] = []
    for node in nodes:
        if node.domain in QONNX_DOMAINS:
            if node.op_type not in QONNX_SUPPORTED:
                problems.append((node.name, f"{node.domain}.{node.op_type}", "of the QONNX ops only Quant is supported; "
                                 "re-export with Quant nodes (Brevitas export_qonnx) or as QCDQ"))
        elif node.domain not in ("", "ai.onnx"):
            problems.append((node.name, f"{node.domain}.{node.op_type}", "custom-domain ops are not supported; "
                             "export with standard ONNX ops (QuantizeLinear/DequantizeLinear for quantizers)"))
        elif custom_only:
            continue
        elif nonlinear == "mbe" and (node.op_type in MBE_LOWERED or node.op_type in DECOMPOSED_OPS):
            continue  # DECOMPOSED_OPS: a decomposed LayerNorm, which fuse_layernorm rewrites (left over: the lowering refuses)
        elif node.op_type in NONLINEAR:
            problems.append((node.name, node.op_type, _nonlinear_reason(node.op_type, nonlinear)))
        elif node.op_type in REJECTED:
            problems.append((node.name, node.op_type, _rejected_reason(node.op_type, nonlinear)))
        elif node.op_type not in SUPPORTED:
            problems.append((node.name, node.op_type, "no spike-driven lowering exists for this op"))
    if problems:
        raise UnsupportedModelError(path, problems)


def _qnodes(model: onnx.ModelProto, path: str) -> list[QNode]:
    nodes = []
    for i, node in enumerate(model.graph.node):
        try:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        except Exception as exc:  # an attribute whose declared type does not match its content
            raise ModelFileError(f"{path}: node '{node.name or i}' (op {node.op_type}) has an unreadable attribute: {exc}") from None
        for k, v in list(attrs.items()):
            if isinstance(v, bytes):
                attrs[k] = v.decode(errors="replace")
            elif isinstance(v, onnx.TensorProto):
                attrs[k] = numpy_helper.to_array(v)
        nodes.append(QNode(node.name or f"{node.op_type}_{i}", node.op_type, tuple(node.input),
                           tuple(node.output), attrs, node.domain))
    return nodes


def to_qgraph(model: onnx.ModelProto, path: str = "<model>", nonlinear: str = "refuse") -> QGraph:
    """Convert a checked ONNX model to a QGraph: shapes of every tensor, constant subgraphs folded
    (whatever their ops), then the remaining, data-dependent, nodes judged: unsupported ops are
    rejected all at once (``nonlinear="mbe"``: GELU is let through, docs/mbe.md)."""
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset < 13:
        raise ModelFileError(f"{path}: opset {opset} is too old; export with opset_version >= 13")
    nodes = _qnodes(model, path)
    _judge(nodes, path, custom_only=True)  # never evaluated, never inferred: refuse them first
    constants = {}
    for init in model.graph.initializer:
        try:
            arr = numpy_helper.to_array(init)
        except Exception as exc:  # data that does not match its declared dims or type
            raise ModelFileError(f"{path}: initializer '{init.name}' cannot be read: {exc}") from None
        if arr.dtype == object:
            raise ModelFileError(f"{path}: initializer '{init.name}' is a string tensor; string tensors are not supported")
        arr.flags.writeable = False  # shared, never copied, by the passes and the IR ops
        constants[init.name] = arr
    inputs = [vi for vi in model.graph.input if vi.name not in constants]
    if len(inputs) != 1 or len(model.graph.output) != 1:
        raise ModelFileError(f"{path}: csdc needs exactly one data input and one output, found "
                             f"{len(inputs)} input(s) and {len(model.graph.output)} output(s)")
    shapes, failure = inferred_shapes(model)
    if inputs[0].name not in shapes:
        raise ModelFileError(f"{path}: input '{inputs[0].name}' needs a static shape (batch axis may be symbolic)")
    graph = QGraph(nodes=nodes, constants=constants, shapes=shapes, input=inputs[0].name,
                   output=model.graph.output[0].name, path=path, opset=opset, source_nodes=tuple(n.name for n in nodes))
    # the numbers are checked before anything computes with them: folding an infinite scale or a
    # mismatched per-channel axis would otherwise fail inside the evaluator, naming the wrong cause
    graph = validate_numbers(graph)
    graph = fold_constants(graph)
    unknown = [o for n in graph.nodes for o in n.outputs if o and o not in graph.shapes and o not in graph.constants]
    if unknown:
        graph.shapes.update(measured_shapes(model, unknown, path, failure))
        graph = fold_constants(graph)  # Shape nodes of the tensors just measured
    _judge(graph.nodes, path, nonlinear=nonlinear)
    produced = {graph.input, *graph.constants, *(o for n in graph.nodes for o in n.outputs)}
    if graph.output not in produced:
        raise ModelFileError(f"{path}: the output '{graph.output}' is produced by no node")
    if graph.output in graph.constants:
        raise ModelFileError(f"{path}: the output '{graph.output}' does not depend on the input '{graph.input}'")
    return graph


def release_freed_memory() -> None:
    """Give memory that was freed but is still held by the C allocator back to the system (glibc's
    ``malloc_trim``; nothing elsewhere). A parsed ONNX model lives in many mid-sized blocks that the
    allocator keeps after the model is dropped; without this a large model costs its size twice."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_qgraph(path: str | os.PathLike, nonlinear: str = "refuse") -> QGraph:
    """Load, check and convert an ONNX file (the parsed ONNX model is released before returning)."""
    graph = to_qgraph(load_model(path), os.fspath(path), nonlinear)
    release_freed_memory()
    return graph


__all__ = ["load_model", "to_qgraph", "load_qgraph", "MBE_LOWERED", "NONLINEAR", "NONLINEAR_MODES", "SUPPORTED", "REJECTED"]
