"""Fuzz: random mutations of the shipped example ONNX files (a node deleted, inputs swapped or
rewired, a dtype, an attribute or initializer values changed, shapes / value_info stripped, an
initializer reshaped)
end in a compiled network or a CsdcError, never another exception type."""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from csdc.compiler.pipeline import compile_onnx
from csdc.errors import CsdcError

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*/model*.onnx"))
DTYPES = [onnx.TensorProto.FLOAT, onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT32,
          onnx.TensorProto.INT64, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE, onnx.TensorProto.BOOL]


def _tensor_names(m: onnx.ModelProto) -> list[str]:
    names = [i.name for i in m.graph.input] + [i.name for i in m.graph.initializer]
    return names + [o for n in m.graph.node for o in n.output]


def _delete_node(m, rng) -> str:
    i = int(rng.integers(len(m.graph.node)))
    n = m.graph.node[i]
    if rng.random() < 0.7 and n.input and n.input[0]:  # consumers read the deleted node's first input
        for other in m.graph.node:
            for k, name in enumerate(other.input):
                if name == n.output[0]:
                    other.input[k] = n.input[0]
        for o in m.graph.output:
            if o.name == n.output[0]:
                o.name = n.input[0]
    del m.graph.node[i]
    return f"deleted node {n.name} ({n.op_type})"


def _swap_inputs(m, rng) -> str:
    n = m.graph.node[int(rng.integers(len(m.graph.node)))]
    if len(n.input) >= 2 and rng.random() < 0.5:
        a, b = rng.choice(len(n.input), 2, replace=False)
        n.input[int(a)], n.input[int(b)] = n.input[int(b)], n.input[int(a)]
        return f"swapped inputs {a}, {b} of {n.name} ({n.op_type})"
    if not n.input:
        return "nothing"
    names = _tensor_names(m)
    k = int(rng.integers(len(n.input)))
    n.input[k] = names[int(rng.integers(len(names)))]
    return f"rewired input {k} of {n.name} ({n.op_type}) to {n.input[k]}"


def _change_dtype(m, rng) -> str:
    choice = rng.random()
    if choice < 0.5 and m.graph.initializer:
        init = m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
        arr = numpy_helper.to_array(init)
        dt = DTYPES[int(rng.integers(len(DTYPES)))]
        new = numpy_helper.from_array(arr.astype(onnx.helper.tensor_dtype_to_np_dtype(dt)), init.name)
        init.CopyFrom(new)
        return f"initializer {init.name} cast to {onnx.TensorProto.DataType.Name(dt)}"
    if choice < 0.75:
        vi = m.graph.input[0]
        vi.type.tensor_type.elem_type = DTYPES[int(rng.integers(len(DTYPES)))]
        return "input dtype changed"
    casts = [n for n in m.graph.node if n.op_type == "Cast"] or list(m.graph.node)
    n = casts[int(rng.integers(len(casts)))]
    for a in n.attribute:
        if a.name == "to":
            a.i = DTYPES[int(rng.integers(len(DTYPES)))]
            return f"Cast {n.name} to changed"
    n.attribute.append(onnx.helper.make_attribute("to", int(DTYPES[int(rng.integers(len(DTYPES)))])))
    return f"attribute 'to' added to {n.name} ({n.op_type})"


def _change_attribute(m, rng) -> str:
    nodes = [n for n in m.graph.node if n.attribute]
    if not nodes:
        return "nothing"
    n = nodes[int(rng.integers(len(nodes)))]
    a = n.attribute[int(rng.integers(len(n.attribute)))]
    r = rng.random()
    if r < 0.2:
        n.attribute.remove(a)
        return f"removed attribute {a.name} of {n.name} ({n.op_type})"
    if a.type == onnx.AttributeProto.INT:
        a.i = int(rng.choice([-1, 0, 1, 2, 3, 7, a.i + 1, a.i - 1, -a.i]))
    elif a.type == onnx.AttributeProto.INTS and len(a.ints):
        k = int(rng.integers(len(a.ints)))
        a.ints[k] = int(rng.choice([-1, 0, 1, 2, 5, a.ints[k] + 1]))
        if r > 0.8:
            del a.ints[-1]
    elif a.type == onnx.AttributeProto.FLOAT:
        a.f = float(rng.choice([0.0, -1.0, 1e30, np.nan, a.f * 2]))
    elif a.type == onnx.AttributeProto.STRING:
        a.s = rng.choice([b"SAME_UPPER", b"VALID", b"NOTSET", b"bogus", b""])
    else:
        return "nothing"
    return f"attribute {a.name} of {n.name} ({n.op_type}) changed"


def _strip_shapes(m, rng) -> str:
    del m.graph.value_info[:]
    if rng.random() < 0.5:
        for vi in list(m.graph.input) + list(m.graph.output):
            dims = vi.type.tensor_type.shape.dim
            for d in dims[1:]:
                if rng.random() < 0.5:
                    d.Clear()
                    d.dim_param = "s"
    return "value_info stripped (and some dims made symbolic)"


def _reshape_initializer(m, rng) -> str:
    inits = [i for i in m.graph.initializer if np.prod(i.dims) > 1]
    if not inits:
        return "nothing"
    init = inits[int(rng.integers(len(inits)))]
    arr = numpy_helper.to_array(init)
    r = rng.random()
    if r < 0.4:
        arr = arr.reshape(-1)
    elif r < 0.7:
        arr = arr.reshape(arr.shape[::-1]) if arr.ndim > 1 else arr.reshape(1, -1)
    else:
        arr = arr.reshape(-1)[: max(1, arr.size // 2)]
    init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(arr), init.name))
    return f"initializer {init.name} reshaped to {arr.shape}"


def _change_values(m, rng) -> str:
    """Values the checker cannot see: zeros (a zero scale), negatives, NaN, huge numbers."""
    init = m.graph.initializer[int(rng.integers(len(m.graph.initializer)))]
    arr = numpy_helper.to_array(init).copy()
    if arr.size == 0:
        return "nothing"
    value = rng.choice([0, -1, np.nan, 1e30, -3e38]) if arr.dtype.kind == "f" else rng.choice([0, -1, 127])
    with np.errstate(invalid="ignore", over="ignore"):
        flat = arr.reshape(-1)
        flat[rng.random(flat.size) < 0.5] = np.asarray(value).astype(arr.dtype) if arr.dtype.kind == "f" or np.isfinite(value) else 0
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return f"values of {init.name} set to {value}"


MUTATIONS = [_delete_node, _swap_inputs, _change_dtype, _change_attribute, _strip_shapes, _reshape_initializer, _change_values]


def mutate(model: onnx.ModelProto, seed: int) -> tuple[onnx.ModelProto, str]:
    """One to three random mutations of a copy of ``model``."""
    rng = np.random.default_rng(seed)
    m = onnx.ModelProto()
    m.CopyFrom(model)
    done = []
    for _ in range(int(rng.integers(1, 4))):
        done.append(MUTATIONS[int(rng.integers(len(MUTATIONS)))](m, rng))
    return m, "; ".join(done)


def _fuzz(tmp_path: Path, seeds: range) -> list[str]:
    sources = [onnx.load(p) for p in EXAMPLES]
    failures = []
    for seed in seeds:
        src = sources[seed % len(sources)]
        m, what = mutate(src, seed)
        path = tmp_path / f"m{seed}.onnx"
        try:
            onnx.save(m, path)
        except Exception:  # protobuf refuses to serialize it: nothing for csdc to read
            continue
        try:
            compile_onnx(path)
        except CsdcError:
            pass
        except Exception as exc:  # noqa: BLE001 - this is what the test looks for
            tb = traceback.extract_tb(exc.__traceback__)[-1]
            failures.append(f"seed {seed} ({EXAMPLES[seed % len(sources)].parent.name}/{EXAMPLES[seed % len(sources)].name}: "
                            f"{what}): {type(exc).__name__}: {str(exc)[:200]} at {Path(tb.filename).name}:{tb.lineno}")
        path.unlink()
    return failures


def test_mutated_examples_compile_or_raise_csdc_error(tmp_path):
    assert len(EXAMPLES) >= 3
    failures = _fuzz(tmp_path, range(200))
    assert not failures, f"{len(failures)} of 200 mutations escaped as other exceptions:\n" + "\n".join(failures)


@pytest.mark.slow
def test_mutated_examples_compile_or_raise_csdc_error_many(tmp_path):
    failures = _fuzz(tmp_path, range(200, 1200))
    assert not failures, f"{len(failures)} of 1000 mutations escaped as other exceptions:\n" + "\n".join(failures)
