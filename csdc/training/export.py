"""ONNX export helpers: run the TorchScript exporter, tidy the graph, check, write atomically.

The legacy TorchScript exporter (``torch.onnx.export(..., dynamo=False)``) is used
because it honours the ``symbolic`` methods of :mod:`csdc.training.lsq` (QCDQ ops
with exactly the L of each quantizer). After export the graph is tidied so it is easy
to read and to compile: ``Constant`` nodes become initializers, ``Identity`` nodes by
which the exporter shares equal-valued initializers become named copies, and initializers the
exporter named ``onnx::...`` (or after a Constant node) get a name from their consumer (``/q1/QuantizeLinear``
-> ``q1.QuantizeLinear.y_zero_point``). The model is then checked with
``onnx.checker`` (full check, with shape inference) and written atomically.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

#: ONNX opset the exporter targets.
OPSET = 17

# Input roles of the ops we export, used to name anonymous initializers.
_ROLES: dict[str, tuple[str, ...]] = {
    "QuantizeLinear": ("x", "y_scale", "y_zero_point"),
    "DequantizeLinear": ("x", "x_scale", "x_zero_point"),
    "Clip": ("input", "min", "max"),
    "Conv": ("X", "W", "B"),
    "Gemm": ("A", "B", "C"),
    "MatMul": ("A", "B"),
    "Add": ("A", "B"),
    "BatchNormalization": ("X", "scale", "B", "input_mean", "input_var"),
}


def _tidy(model: onnx.ModelProto) -> onnx.ModelProto:
    """Move Constant nodes into initializers, undo the exporter's deduplication of equal
    initializers, and give anonymous initializers names."""
    graph = model.graph
    nodes = []
    new_inits = []
    from_constants: set[str] = set()
    by_name = {t.name: t for t in graph.initializer}
    outputs = {v.name for v in graph.output}
    for node in graph.node:
        if (node.op_type == "Identity" and node.input[0] in by_name
                and node.output[0] not in outputs and node.output[0] not in by_name):
            # The exporter shares equal-valued parameters (e.g. the BatchNorm weights of an
            # untrained model) through Identity nodes: give each its own named copy.
            tensor = onnx.TensorProto()
            tensor.CopyFrom(by_name[node.input[0]])
            tensor.name = node.output[0]
            new_inits.append(tensor)
            continue
        if node.op_type == "Constant" and len(node.attribute) == 1 and node.attribute[0].name == "value":
            tensor = onnx.TensorProto()
            tensor.CopyFrom(node.attribute[0].t)
            tensor.name = node.output[0]
            new_inits.append(tensor)
            from_constants.add(tensor.name)
        else:
            nodes.append(node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(new_inits)

    init_names = {t.name for t in graph.initializer}
    rename: dict[str, str] = {}
    taken = set(init_names) | {v.name for v in graph.input} | {v.name for v in graph.output}
    for node in graph.node:
        if not node.name:
            continue
        roles = _ROLES.get(node.op_type, ())
        base = node.name.strip("/").replace("/", ".")
        for i, name in enumerate(node.input):
            anonymous = name in from_constants or name.startswith("onnx::")
            if name in init_names and anonymous and name not in rename:
                role = roles[i] if i < len(roles) else f"in{i}"
                new = f"{base}.{role}"
                k = 1
                while new in taken:
                    k += 1
                    new = f"{base}.{role}_{k}"
                taken.add(new)
                rename[name] = new
    for tensor in graph.initializer:
        tensor.name = rename.get(tensor.name, tensor.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    # Initializers sorted by name: stable, readable files.
    inits = sorted(graph.initializer, key=lambda t: t.name)
    copies = []
    for t in inits:
        c = onnx.TensorProto()
        c.CopyFrom(t)
        copies.append(c)
    del graph.initializer[:]
    graph.initializer.extend(copies)
    return model


def write_onnx_atomic(model: onnx.ModelProto, path: str | os.PathLike[str]) -> None:
    """Write ``model`` to ``path`` via a temporary file and ``os.replace`` (no partial file, usual permissions,
    ``csdc.files.write_atomic``). As a library call it creates a missing folder; ``csdc train`` refuses one
    before training, as every command does."""
    from csdc.files import write_atomic

    os.makedirs(os.path.dirname(os.path.abspath(os.fspath(path))), exist_ok=True)
    write_atomic(path, model.SerializeToString())


def export_module(
    module: nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike[str] | None = None,
    *,
    input_name: str = "input",
    output_name: str = "logits",
    opset: int = OPSET,
    doc: str = "",
    dynamo: bool = False,
) -> onnx.ModelProto:
    """Export ``module`` (already in eval / export mode) to a checked ONNX model.

    The batch dimension is dynamic (``"N"``). Returns the model; writes it to
    ``path`` atomically if given. ``dynamo`` uses the torch.export-based exporter instead of
    the TorchScript one (for float models only: it does not run the quantizers' ``symbolic``).
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            model = _export_dynamo(module, example, opset, input_name, output_name)
        else:
            buf = io.BytesIO()
            torch.onnx.export(
                module,
                (example,),
                buf,
                dynamo=False,
                opset_version=opset,
                input_names=[input_name],
                output_names=[output_name],
                dynamic_axes={input_name: {0: "N"}, output_name: {0: "N"}},
                do_constant_folding=True,
            )
            model = onnx.load_from_string(buf.getvalue())
    model = _tidy(model)
    model.producer_name = "csdc.training"
    model.doc_string = doc
    onnx.checker.check_model(model, full_check=True)
    if path is not None:
        write_onnx_atomic(model, path)
    return model


def _export_dynamo(module: nn.Module, example: torch.Tensor, opset: int, input_name: str,
                   output_name: str) -> onnx.ModelProto:
    """The torch.export-based exporter, quietly (it prints its progress), weights inside the model."""
    import contextlib
    import logging

    from torch.export import Dim

    logging.getLogger("torch").setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        program = torch.onnx.export(module, (example,), dynamo=True, opset_version=opset, input_names=[input_name],
                                    output_names=[output_name], dynamic_shapes=({0: Dim("N")},), optimize=True,
                                    external_data=False)
    return program.model_proto


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All initializers of ``model`` as numpy arrays, by name."""
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file (the example READMEs record it to show byte reproducibility)."""
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()


def describe_io(model: onnx.ModelProto, quote: str = "`") -> str:
    """'input <name> (dims) float32, output <name> (dims) float32' of a one-input, one-output model."""
    def shape(v: onnx.ValueInfoProto) -> str:
        dims = [d.dim_param or str(d.dim_value) for d in v.type.tensor_type.shape.dim]
        return f"{quote}{v.name}{quote} ({', '.join(dims)}) float32"

    return f"input {shape(model.graph.input[0])}, output {shape(model.graph.output[0])}"
