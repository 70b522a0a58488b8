"""Shapes of every tensor of an ONNX model: onnx shape inference first, then, for whatever it
leaves unknown (value_info stripped, ops it cannot follow, symbolic dimensions), one run of the model
by onnxruntime on a zero input with exactly those tensors exposed as outputs, which cannot miss.

Shapes carry the batch axis; a symbolic batch axis counts as 1 (so the shape arithmetic of
dynamic-batch exports, ``Shape -> Slice -> Concat -> Reshape``, resolves to concrete shapes). QONNX
``Quant`` nodes are shape-preserving and unknown to onnx and onnxruntime: both see them as Identity.
"""

from __future__ import annotations

import numpy as np
import onnx

from csdc.errors import ModelFileError

QONNX_DOMAINS = ("qonnx.custom_op.general", "finn.custom_op.general")
SHAPE_DATA_LIMIT = 4096  # initializers up to this many elements keep their values for shape inference


def shape_of(vi: onnx.ValueInfoProto) -> tuple[int, ...] | None:
    """Static shape of a value info (symbolic batch axis as 1), or None."""
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


def _copy(model: onnx.ModelProto, keep_data: bool) -> onnx.ModelProto:
    """A copy of ``model`` with QONNX Quant nodes as Identity and a batch axis of 1 on the data input.
    Without ``keep_data`` large initializers are declared (type and shape) but hold no data: shape
    inference only needs the values of small shape tensors, and copying a large model's weights would
    double the memory it takes."""
    g = model.graph
    graph = onnx.GraphProto(name=g.name)
    for n in g.node:
        if n.domain in QONNX_DOMAINS and n.input and n.output:
            n = onnx.helper.make_node("Identity", [n.input[0]], [n.output[0]], name=n.name)
        graph.node.append(n)
    graph.input.extend(g.input)
    graph.output.extend(g.output)
    graph.value_info.extend(g.value_info)
    declared = {vi.name for vi in g.input}
    for init in g.initializer:
        if keep_data or int(np.prod(init.dims)) <= SHAPE_DATA_LIMIT:
            graph.initializer.append(init)
        elif init.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    inits = {i.name for i in g.initializer}
    for vi in graph.input:
        if vi.name not in inits and vi.type.tensor_type.shape.dim:
            d0 = vi.type.tensor_type.shape.dim[0]
            if not d0.HasField("dim_value"):
                d0.Clear()
                d0.dim_value = 1
    opsets = [o for o in model.opset_import if o.domain not in QONNX_DOMAINS]
    m = onnx.helper.make_model(graph, opset_imports=opsets, ir_version=model.ir_version)
    m.functions.extend(model.functions)
    return m


def inferred_shapes(model: onnx.ModelProto) -> tuple[dict[str, tuple[int, ...]], str | None]:
    """Shapes onnx shape inference finds (strict, else lenient), and why strict inference failed (or None)."""
    skeleton = _copy(model, keep_data=False)
    failure = None
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=True, data_prop=True)
    except Exception as exc:  # onnx raises InferenceError, ValidationError, RuntimeError...
        failure = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        try:
            inferred = onnx.shape_inference.infer_shapes(skeleton, strict_mode=False, data_prop=True)
        except Exception:
            inferred = skeleton
    g = inferred.graph
    shapes: dict[str, tuple[int, ...]] = {}
    for vi in list(g.input) + list(g.value_info) + list(g.output):
        shp = shape_of(vi)
        if shp is not None:
            shapes[vi.name] = shp
    return shapes, failure


def measured_shapes(model: onnx.ModelProto, names: list[str], path: str, why: str | None = None) -> dict[str, tuple[int, ...]]:
    """Shapes of ``names`` from one onnxruntime run of ``model`` on a zero input (batch 1), exposing only
    those tensors as outputs (the others are freed as the run goes). Raises ModelFileError if it cannot run."""
    import onnxruntime as ort

    m = _copy(model, keep_data=True)
    inits = {i.name for i in m.graph.initializer}
    data = [vi for vi in m.graph.input if vi.name not in inits]
    del m.graph.output[:]
    del m.graph.value_info[:]  # a stale or wrong declaration must not override what the run finds
    m.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    feeds = {}
    try:
        for vi in data:
            shp = shape_of(vi)
            if shp is None:
                raise ModelFileError(f"{path}: input '{vi.name}' needs a static shape (batch axis may be symbolic)")
            dtype = onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            feeds[vi.name] = np.zeros(shp, dtype=dtype)
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep every named tensor
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        del m
        outs = sess.run(names, feeds)
    except ModelFileError:
        raise
    except Exception as exc:  # onnxruntime raises its own exception types for models it cannot run
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        reason = f" (shape inference: {why})" if why else ""
        raise ModelFileError(f"{path}: the shapes of {len(names)} tensor(s) ({', '.join(names[:3])}"
                             f"{', ...' if len(names) > 3 else ''}) are unknown{reason}, and running the model "
                             f"once to measure them failed: {first}") from None
    return {n: tuple(int(d) for d in np.shape(v)) for n, v in zip(names, outs)}


__all__ = ["shape_of", "inferred_shapes", "measured_shapes", "SHAPE_DATA_LIMIT"]
