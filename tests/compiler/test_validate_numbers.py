"""validate_numbers and compile-error context (issue 13, items 10-14), on the example models as their
tools wrote them (csdc train's QCDQ export, onnxruntime quantize_static's QDQ), with one constant or
attribute changed the way a damaged checkpoint or a hand edit would."""

from __future__ import annotations

import os
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
            net.verify_arithmetic()  # as 'csdc compile' and saving do
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
    # a step of 1e-30 needs a weight exponent of 62 whose product overflows: raised by the IR below the lowering
    p = mutate(QCDQ, tmp_path / "tiny.onnx", {"q1.step": at(0, 1e-30)})
    assert main(["compile", p, "-o", str(tmp_path / "t.sir")]) == 2
    err = capsys.readouterr().err
    assert f"{p}: node '/conv1/Conv'" in err and "2**62 does not fit int64" in err, err
    assert not (tmp_path / "t.sir").exists()
    assert err.count(p) == 1, err  # the model is named once


def test_14_library_compile_names_the_model_and_node_once(tmp_path) -> None:
    """compile_onnx says what 'csdc compile' says: the model and the ONNX node, each once."""
    p = mutate(QCDQ, tmp_path / "tiny.onnx", {"q1.step": at(0, 1e-30)})
    with pytest.raises(CsdcError) as info:
        compile_onnx(p)
    msg = str(info.value)
    assert msg.startswith(f"{p}: node '/conv1/Conv': ") and "2**62 does not fit int64" in msg, msg
    assert msg.count(p) == 1 and msg.count("/conv1/Conv") == 1, msg


def test_int32_bias_offset_outside_int32_is_refused(tmp_path) -> None:
    """A bias zero point whose subtraction leaves int32 (onnxruntime wraps around, the ONNX definition does
    not): refused naming the node and both tensors, instead of a network that disagrees with onnxruntime."""
    p = mutate(QDQ, tmp_path / "zp.onnx", {"conv2.Conv.B_quantized_zero_point": at(0, 2**31 - 1)})
    with pytest.raises(UnsupportedModelError) as info:
        compile_onnx(p)
    msg = str(info.value)
    assert "conv2.Conv.B_quantized_zero_point" in msg and "leaves int32" in msg and "DequantizeLinear" in msg, msg


# ------------------------------------------------------------- seeded mutation fuzz against onnxruntime
def _mutated_example(seed: int, tmp: Path) -> tuple[str, str]:
    """One constant or attribute of one example model changed at random; (path, what was done)."""
    rng = np.random.default_rng(seed)
    src = (QCDQ, QDQ, CSDFORMER)[seed % 3]
    m = onnx.load(str(src))
    if rng.random() < 0.8:
        t = m.graph.initializer[rng.integers(len(m.graph.initializer))]
        a = numpy_helper.to_array(t).copy()
        flat = a.reshape(-1)
        if flat.size:
            i = rng.integers(flat.size)
            if a.dtype.kind == "f":
                flat[i] = [np.nan, np.inf, -np.inf, 0.0, 1e30, -1e30, -flat[i], flat[i] * 1e-20, flat[i] * 1e20,
                           flat[i] * 1.5][rng.integers(10)]
            elif a.dtype.kind in "iu":
                info = np.iinfo(a.dtype)
                flat[i] = [info.min, info.max, 0, 1, int(flat[i]) // 2][rng.integers(5)]
        t.CopyFrom(numpy_helper.from_array(a, t.name))
        what = f"{src.name}: initializer {t.name}"
    else:
        n = m.graph.node[rng.integers(len(m.graph.node))]
        if not n.attribute:
            return _mutated_example(seed + 1_000_003, tmp)
        a = n.attribute[rng.integers(len(n.attribute))]
        value = onnx.helper.get_attribute_value(a)
        if isinstance(value, list) and value and isinstance(value[0], int):
            value = list(value)
            value[rng.integers(len(value))] = int([0, -1, 2, 7, 2**31 - 1][rng.integers(5)])
        elif isinstance(value, int):
            value = int([0, -1, 1, 2, 5, 2**31 - 1][rng.integers(6)])
        elif isinstance(value, float):
            value = float([0.0, -1.0, 1e30, 1e-30][rng.integers(4)])
        else:
            return _mutated_example(seed + 1_000_003, tmp)
        n.attribute.remove(a)
        n.attribute.append(onnx.helper.make_attribute(a.name, value))
        what = f"{src.name}: {n.name}.{a.name} = {value}"
    path = str(tmp / f"m{seed}.onnx")
    onnx.save(m, path)
    return path, what


def fuzz_onnx(cases: int, tmp: Path, first_seed: int = 0) -> tuple[dict, list[str]]:
    from csdc.backends.reference import ReferenceBackend
    from csdc.runtime.datasets import load_digits_split
    from csdc.runtime.evaluate import onnx_logits

    x, _ = load_digits_split("test")
    x = x[:100]
    counts = {"refused": 0, "agree": 0, "onnxruntime refuses too": 0}
    failures = []
    for seed in range(first_seed, first_seed + cases):
        path, what = _mutated_example(seed, tmp)
        try:
            net, _ = compile_onnx(path)
            net.verify_arithmetic()  # as 'csdc compile' and saving do
        except CsdcError as exc:
            msg = str(in_model(exc, path))
            if not msg.startswith(path):
                failures.append(f"seed {seed} ({what}): error does not name the model: {msg[:150]}")
            counts["refused"] += 1
            continue
        except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
            failures.append(f"seed {seed} ({what}): compile raised {type(exc).__name__}: {str(exc)[:150]}")
            continue
        try:
            try:
                ref = onnx_logits(path, x)
            except CsdcError:  # a model valid only one sample at a time (e.g. Flatten over the batch axis)
                ref = onnx_logits(path, x, batch=1)
        except CsdcError:
            counts["onnxruntime refuses too"] += 1  # csdc compiled a model onnxruntime does not run
            failures.append(f"seed {seed} ({what}): compiled, but onnxruntime refuses the model")
            continue
        got = ReferenceBackend().run(net, x).logits
        if not np.all(np.isfinite(ref)):
            failures.append(f"seed {seed} ({what}): compiled although onnxruntime's logits are not finite")
            continue
        agreement = float(np.mean(ref.argmax(1) == got.argmax(1)))
        if agreement < 0.98:
            failures.append(f"seed {seed} ({what}): compiled, top-1 agreement with onnxruntime {agreement:.2f}")
            continue
        counts["agree"] += 1
    return counts, failures


def test_onnx_mutation_fuzz(tmp_path) -> None:
    cases = int(os.environ.get("CSDC_ONNX_FUZZ_CASES", "30"))
    counts, failures = fuzz_onnx(cases, tmp_path)
    print(f"\nONNX fuzz: {cases} cases: {counts}, {len(failures)} failures")
    assert not failures, "\n".join(failures[:20])


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CSDC_FUZZ_SLOW") != "1", reason="opt-in: CSDC_FUZZ_SLOW=1 (1 000 cases)")
def test_onnx_mutation_fuzz_slow(tmp_path) -> None:
    counts, failures = fuzz_onnx(1000, tmp_path, first_seed=100_000)
    print(f"\nONNX slow fuzz: 1000 cases: {counts}, {len(failures)} failures\n" + "\n".join(failures))
    assert not failures, "\n".join(failures[:50])
