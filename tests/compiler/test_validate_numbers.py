"""validate_numbers and compile-error context (issue 13, items 10-14), on the example models as their
tools wrote them (csdc train's QCDQ export, onnxruntime quantize_static's QDQ), with one constant or
attribute changed the way a damaged checkpoint or a hand edit would."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from csdc.cli import main
from csdc.compiler.frontend import load_qgraph
from csdc.compiler.passes.validate_numbers import validate_numbers
from csdc.compiler.pipeline import compile_onnx
from csdc.errors import CsdcError, UnsupportedModelError, in_model

ROOT = Path(__file__).resolve().parents[2]
QCDQ = ROOT / "examples" / "digits_cnn" / "model.onnx"
QDQ = ROOT / "examples" / "digits_cnn" / "model_qdq_static.onnx"
CSDFORMER = ROOT / "examples" / "digits_csdformer" / "model.onnx"


def mutate(src: Path, dst: Path, inits: dict | None = None, attrs: dict | None = None) -> str:
    """Copy ``src`` to ``dst`` with initializers replaced (name -> function of the array) and node
    attributes set (node name -> {attribute: value})."""
    m = onnx.load(str(src))
    for t in m.graph.initializer:
        if inits and t.name in inits:
            t.CopyFrom(numpy_helper.from_array(np.asarray(inits[t.name](numpy_helper.to_array(t).copy())), t.name))
    for n in m.graph.node:
        for key, value in (attrs or {}).get(n.name, {}).items():
            for a in list(n.attribute):
                if a.name == key:
                    n.attribute.remove(a)
            n.attribute.append(onnx.helper.make_attribute(key, value))
    onnx.save(m, str(dst))
    return str(dst)


def at(index: int, value: float):
    def f(a: np.ndarray) -> np.ndarray:
        if a.ndim == 0:
            return np.array(value, dtype=a.dtype)
        a.reshape(-1)[index] = value
        return a
    return f


def refused(path: str, node: str, *words: str) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        compile_onnx(path)
    msg = str(info.value)
    assert msg.startswith(path) and f"node '{node}'" in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


# ---------------------------------------------------------------- 10: infinite steps and scales
@pytest.mark.parametrize("tensor,node", [
    ("q1.step", "/q1/QuantizeLinear"),
    ("conv1.wq.export_scale", "/conv1/wq/DequantizeLinear"),
    ("bn1.weight", "/bn1/BatchNormalization"),
])
def test_10_infinite_step_scale_or_bn_weight(tmp_path, tensor, node) -> None:
    refused(mutate(QCDQ, tmp_path / "m.onnx", {tensor: at(0, np.inf)}), node, tensor, "non-finite")


# ------------------------------------------------------- 11: axis and bias length inconsistencies
def test_11_dequantize_axis_that_does_not_match_the_per_channel_scale(tmp_path) -> None:
    p = mutate(QCDQ, tmp_path / "m.onnx", attrs={"/conv1/wq/DequantizeLinear": {"axis": 1}})
    refused(p, "/conv1/wq/DequantizeLinear", "conv1.wq.export_scale", "16 entries", "axis 1")


def test_11_dequantize_axis_outside_the_rank(tmp_path) -> None:
    p = mutate(QCDQ, tmp_path / "m.onnx", attrs={"/conv1/wq/DequantizeLinear": {"axis": 7}})
    refused(p, "/conv1/wq/DequantizeLinear", "axis 7")


def test_11_conv_and_gemm_bias_of_the_wrong_length(tmp_path) -> None:
    cut = {k: (lambda a: a[:-1]) for k in ("conv1.Conv.B_quantized", "conv1.Conv.B_quantized_scale",
                                            "conv1.Conv.B_quantized_zero_point")}
    refused(mutate(QDQ, tmp_path / "c.onnx", cut), "/conv1/Conv", "bias", "16 output channels")
    grow = {k: (lambda a: np.concatenate([a, a[:2]])) for k in ("fc.bias_quantized", "fc.bias_quantized_scale",
                                                                 "fc.bias_quantized_zero_point")}
    refused(mutate(QDQ, tmp_path / "g.onnx", grow), "/fc/Gemm", "bias", "10 outputs")


# ---------------------------------------------------------- 12: NaN / inf BatchNorm parameters
@pytest.mark.parametrize("tensor,value", [("bn1.bias", np.nan), ("bn1.bias", np.inf), ("bn1.running_mean", np.nan),
                                          ("bn2.running_mean", -np.inf), ("bn1.weight", np.nan)])
def test_12_non_finite_batchnorm_parameters(tmp_path, tensor, value) -> None:
    refused(mutate(QCDQ, tmp_path / "m.onnx", {tensor: at(3, value)}), tensor.replace("bn", "/bn").split(".")[0]
            + "/BatchNormalization", tensor)


def test_12_negative_running_variance(tmp_path) -> None:
    refused(mutate(QCDQ, tmp_path / "m.onnx", {"bn1.running_var": at(2, -1.0)}), "/bn1/BatchNormalization",
            "variance", "channel 2")


# --------------------------------------------------------------------- 13: quantizer Clip bounds
def test_13_clip_min_above_max(tmp_path) -> None:
    refused(mutate(QCDQ, tmp_path / "m.onnx", {"q1.Clip.min": at(0, 255)}), "/q1/Clip", "[255, 15]", "min must be below max")


def test_13_clip_min_above_the_zero_point(tmp_path) -> None:
    refused(mutate(QCDQ, tmp_path / "m.onnx", {"q1.Clip.min": at(0, 1)}), "/q1/Clip", "zero point 0")


def test_13_clip_range_containing_the_zero_point_compiles(tmp_path) -> None:
    # a narrower range that still contains the zero point is reproduced exactly (fewer levels)
    p = mutate(QCDQ, tmp_path / "m.onnx", {"q1.Clip.max": at(0, 15), "q2.Clip.max": at(0, 15)})
    net, _ = compile_onnx(p)
    assert net.T == 15


# -------------------------------------------------- every constant a pass reads: finite and used
def test_untouched_examples_pass_unchanged() -> None:
    for path in (QCDQ, QDQ, CSDFORMER):
        g = load_qgraph(path)
        assert validate_numbers(g) is g


def test_seeded_constant_mutations_end_in_a_csdc_error_or_a_finite_network(tmp_path) -> None:
    """Any float constant of the transformer set to NaN, +-inf, 0, a huge or a negative value: a CsdcError
    naming the model, or a network whose logits are finite on real inputs."""
    from csdc.backends.reference import ReferenceBackend
    from csdc.runtime.datasets import load_digits_split

    model = onnx.load(str(CSDFORMER))
    floats = [t.name for t in model.graph.initializer if numpy_helper.to_array(t).dtype.kind == "f"]
    x, _ = load_digits_split("test")
    rng = np.random.default_rng(13)
    outcomes = {"refused": 0, "compiled": 0}
    for case in range(24):
        name = floats[rng.integers(len(floats))]
        value = [np.nan, np.inf, -np.inf, 0.0, 1e30, -1.0][case % 6]
        p = mutate(CSDFORMER, tmp_path / f"m{case}.onnx", {name: at(0, value)})
        try:
            net, _ = compile_onnx(p)
        except CsdcError as exc:
            msg = str(in_model(exc, p))  # as the CLI reports it
            assert msg.startswith(p) and "node '" in msg, msg
            outcomes["refused"] += 1
            continue
        logits = ReferenceBackend().run(net, x[:16]).logits
        assert np.all(np.isfinite(logits)), f"{name} = {value}: non-finite logits"
        outcomes["compiled"] += 1
    assert outcomes["refused"] >= 8


# -------------------------------------------------------------- 14: errors name model and node
def test_14_lowering_errors_name_the_model_and_the_onnx_node(tmp_path, capsys) -> None:
    # a step of 1e-30 needs a weight exponent beyond 62: raised by the IR below the lowering
    p = mutate(QCDQ, tmp_path / "tiny.onnx", {"q1.step": at(0, 1e-30)})
    assert main(["compile", p, "-o", str(tmp_path / "t.sir")]) == 2
    err = capsys.readouterr().err
    assert f"{p}: node '/conv1/Conv'" in err and "exponent" in err, err
    assert not (tmp_path / "t.sir").exists()
