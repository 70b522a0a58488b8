"""``--nonlinear mbe``: GELU between quantizers of an onnxruntime ``quantize_static`` QDQ model, made by
the test as a user would (torch.onnx export of a small trained model, then quantize_static), compiled to
an MBE population and checked against onnxruntime level by level; the default refuses and names the flag."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from csdc.backends.numba import NumbaBackend  # noqa: E402
from csdc.compiler.mbe import MBE_TARGET_LEVELS, gelu  # noqa: E402
from csdc.compiler.pipeline import CompileOptions, compile_onnx  # noqa: E402
from csdc.errors import CsdcError, UnsupportedModelError  # noqa: E402
from csdc.ir import MBENeuron  # noqa: E402
from csdc.runtime.datasets import load_digits_split  # noqa: E402
from csdc.runtime.evaluate import onnx_logits  # noqa: E402


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[int, Path]:
    """Conv -> Flatten -> Linear -> GELU -> Linear trained on digits (seed 0), exported by torch.onnx at
    opset 20 (one Gelu op) and 17 (Div -> Erf -> Add -> Mul -> Mul), each quantized by onnxruntime's
    quantize_static (QDQ, uint8 activations, int8 weights, MinMax calibration on 256 training images)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    x, y = load_digits_split("train")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 32),
                                torch.nn.GELU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x[i:i + 32]} for i in range(0, 256, 32)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    tmp = tmp_path_factory.mktemp("gelu")
    out = {}
    for opset in (17, 20):
        fp = tmp / f"float{opset}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, xt[:1], str(fp), input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamo=False, dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
            quantize_static(str(fp), str(tmp / f"qdq{opset}.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
        out[opset] = tmp / f"qdq{opset}.onnx"
    ops = [n.op_type for n in onnx.load(out[20]).graph.node]
    assert "Gelu" in ops and ops[ops.index("Gelu") - 1] == "DequantizeLinear" and ops[ops.index("Gelu") + 1] == "QuantizeLinear"
    assert "Erf" in [n.op_type for n in onnx.load(out[17]).graph.node]
    return out


def test_default_refuses_gelu_and_erf_naming_the_flag(models) -> None:
    with pytest.raises(UnsupportedModelError, match=r"Gelu.*--nonlinear mbe"):
        compile_onnx(models[20])
    with pytest.raises(UnsupportedModelError, match=r"Erf.*--nonlinear mbe.*lowers only Gelu"):
        compile_onnx(models[17])
    # the mode itself still refuses what it does not lower, by name
    with pytest.raises(UnsupportedModelError, match=r"Erf.*--nonlinear mbe lowers only Gelu.*opset >= 20"):
        compile_onnx(models[17], CompileOptions(nonlinear="mbe"))
    with pytest.raises(CsdcError, match="unknown --nonlinear"):
        CompileOptions(nonlinear="exact")
    with pytest.raises(CsdcError, match="--mbe-bases must be in"):
        CompileOptions(nonlinear="mbe", mbe_bases=0)


def _quantizer(model: Path, where: str) -> tuple[float, int]:
    """(scale, zero point) of the QuantizeLinear before or after the Gelu."""
    m = onnx.load(model)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    gelu_node = next(n for n in m.graph.node if n.op_type == "Gelu")
    if where == "after":
        q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == gelu_node.output[0])
    else:
        dq = next(n for n in m.graph.node if n.output[0] == gelu_node.input[0])
        q = next(n for n in m.graph.node if n.output[0] == dq.input[0])
    return float(init[q.input[1]]), int(init[q.input[2]])


def _gelu_levels(model: Path, x: np.ndarray) -> np.ndarray:
    """onnxruntime's uint8 levels of the quantizer after Gelu (graph optimizations off)."""
    import onnxruntime as ort

    m = onnx.load(model)
    gelu = next(n for n in m.graph.node if n.op_type == "Gelu")
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == gelu.output[0])
    m.graph.output.append(onnx.helper.make_tensor_value_info(q.output[0], onnx.TensorProto.UINT8, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([q.output[0]], {"input": x})[0].astype(np.int64)


def test_gelu_becomes_an_mbe_population_equal_to_onnxruntime(models) -> None:
    net, rep = compile_onnx(models[20], CompileOptions(nonlinear="mbe"))
    mbe = [n for n, op in net.nodes() if isinstance(op, MBENeuron)]
    assert len(mbe) == 1 and len(rep.approximations) == 1
    a = rep.approximations[0]
    assert a["op"] == "Gelu" and a["mbe_node"] == mbe[0] and a["levels"] == [0, net.T] == [0, 255]
    assert 0 < a["max_abs_error"] <= MBE_TARGET_LEVELS and a["mean_abs_error"] < a["max_abs_error"]
    assert a["steps"] <= 16 and a["latency_steps"] == net.T
    # conv, fc1, the quantizer after GELU and the logits quantizer (D = T each), and the MBE population (T)
    assert rep.latency == net.T + 4 * net.T + net.T
    x, _ = load_digits_split("test")
    res = NumbaBackend().run(net, x, keep_trains=False)
    # the quantizer after GELU, level by level, against GELU computed in float64 from the network's own input
    # levels: equal except where the approximation (worst case a["max_abs_error"] < 1/2 step) moves a value
    # across a rounding boundary, and then by one level
    reader = next(c for c in net.consumers(mbe[0]))
    got = res.counts[reader]  # uint8 quantizer with lo = 0: count = level
    src = net.inputs(net.inputs(mbe[0])[0])[0]  # the quantizer before GELU (through its unit synapses)
    (s_in, z_in), (s_out, z_out) = _quantizer(models[20], "before"), _quantizer(models[20], "after")
    own = np.clip(np.rint(gelu(s_in * (res.counts[src] - z_in)) / s_out) + z_out, 0, 255)
    diff = np.abs(got - own)
    assert diff.max() <= 1 and np.mean(diff == 0) >= 0.999
    # against onnxruntime's levels (whose float arithmetic rounds a rare tie of the quantizer before GELU the
    # other way; GELU's slope then makes that up to two levels after it)
    assert np.mean(got == _gelu_levels(models[20], x)) >= 0.999
    ref = onnx_logits(models[20], x)
    assert np.mean(res.logits.argmax(1) == ref.argmax(1)) >= 0.99


def test_fewer_bases_cost_accuracy_of_the_fit_and_the_cli_reports_it(models, tmp_path: Path, capsys) -> None:
    from csdc.cli import main

    _, rep2 = compile_onnx(models[20], CompileOptions(nonlinear="mbe", mbe_bases=2, mbe_steps=6))
    _, rep = compile_onnx(models[20], CompileOptions(nonlinear="mbe"))
    a2, a = rep2.approximations[0], rep.approximations[0]
    assert a2["bases"] <= 2 and a2["steps"] <= 6 and a2["max_abs_error"] > a["max_abs_error"]
    sir = tmp_path / "g.sir"
    assert main(["compile", str(models[20]), "-o", str(sir), "--nonlinear", "mbe", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["approximations"][0]["max_abs_error"] == a["max_abs_error"]
    assert main(["compile", str(models[20]), "-o", str(sir), "--nonlinear", "mbe"]) == 0
    text = capsys.readouterr().out
    assert "approximated          Gelu" in text and "worst" in text and "MBE population" in text
