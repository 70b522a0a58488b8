"""Symmetric signed quantizers lower to ternary populations (docs/signed_spikes.md): every dialect
(QCDQ with a Clip, QDQ of a narrowed range, QONNX signed narrow, a zero point in the middle of the
clip range), one window T = L shared with unsigned [0, L] quantizers, the offset form kept where the
quantizer is not symmetric (int8's full range) or is max-pooled, and equality with onnxruntime's
QuantizeLinear except exact rounding ties (hypothesis)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csdc.compiler.pipeline import compile_onnx
from csdc.errors import UnsupportedModelError
from csdc.ir import semantics
from csdc.ir.ops import Neuron, TernaryNeuron
from csdc.runtime.evaluate import onnx_logits
from tests.compiler.onnx_build import Builder, signed_attention_model


def _signed(b: Builder, x: str, scale: float, lo: int | None, hi: int | None, zp: int = 0, dtype=np.int8) -> str:
    """QuantizeLinear(zp of ``dtype``) [-> Clip(lo, hi)] -> DequantizeLinear; no Clip when lo is None."""
    s, z = b.const(np.float32(scale)), b.const(np.array(zp, dtype))
    q = b.node("QuantizeLinear", [x, s, z])
    if lo is not None:
        q = b.node("Clip", [q, b.const(np.array(lo, dtype)), b.const(np.array(hi, dtype))])
    return b.node("DequantizeLinear", [q, s, z])


def _inputs(n: int = 200, seed: int = 3) -> np.ndarray:
    return (np.random.default_rng(seed).integers(0, 17, (n, 1, 8, 8)) / 16).astype(np.float32)


def _populations(net) -> dict[str, type]:
    return {n: type(net.op(n)) for n in net.neurons()}


def test_symmetric_and_unsigned_quantizers_share_one_window(tmp_path):
    """The model of the issue: unsigned 0..7 tokenizer, signed -7..7 Q/K/V/AV (was refused: '7 levels ...;
    14 levels ...'). T = 7, the four signed quantizers are ternary populations, signed products on both
    sides, and the logits equal onnxruntime's."""
    path = tmp_path / "m.onnx"
    onnx.save(signed_attention_model(), path)
    net, rep = compile_onnx(path)
    assert net.T == 7
    pops = _populations(net)
    assert sum(t is TernaryNeuron for t in pops.values()) == 4, pops
    assert sum(t is Neuron for t in pops.values()) == 3, pops  # tokenizer, attention map, head
    x = _inputs()
    ref, snn = onnx_logits(path, x), semantics.run_counts(net, x).logits
    assert np.mean(ref.argmax(1) == snn.argmax(1)) >= 0.99
    assert np.median(np.abs(ref - snn)) < 1e-4


@pytest.mark.parametrize("form", ["qcdq-narrow-int8", "zero-point-in-the-middle", "qonnx-signed-narrow"])
def test_symmetric_dialects_become_ternary(tmp_path, form):
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    pre = b.bn(b.conv(x, 1, 4), 4)
    if form == "qcdq-narrow-int8":  # Brevitas signed narrow range, 8 bits
        h, L = _signed(b, pre, 0.01, -127, 127), 127
    elif form == "zero-point-in-the-middle":  # uint8 zero point 8, Clip(1, 15): symmetric around 8
        h, L = _signed(b, pre, 0.2, 1, 15, zp=8, dtype=np.uint8), 7
    else:
        h, L = b.qonnx_quant(pre, 0.2, 0, 4, signed=1, narrow=1), 7
    h = b.quant(b.conv(h, 4, 4), 0.2, L)  # an unsigned [0, L] quantizer in the same window
    path = tmp_path / "m.onnx"
    onnx.save(b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10)), path)
    net, _ = compile_onnx(path)
    assert net.T == L
    assert sorted(t.__name__ for t in _populations(net).values()) == ["Neuron", "TernaryNeuron"]
    x = _inputs()
    if form.startswith("qonnx"):
        from tests.compiler.producers import reference_logits  # qonnx's executor

        ref = reference_logits(str(path), x)
    else:
        ref = onnx_logits(path, x)
    snn = semantics.run_counts(net, x).logits
    assert np.mean(ref.argmax(1) == snn.argmax(1)) >= 0.99
    assert np.median(np.abs(ref - snn)) < 1e-4


def test_int8_full_range_keeps_the_offset_form(tmp_path):
    """int8 with zero point 0 and no Clip saturates at [-128, 127]: not symmetric (a ternary population
    would reach +128), so it stays in the offset form with 255 levels."""
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = _signed(b, b.bn(b.conv(x, 1, 4), 4), 0.01, None, None)
    path = tmp_path / "m.onnx"
    onnx.save(b.model(b.gemm(b.node("Flatten", [h], axis=1), 256, 10), (1, 10)), path)
    net, _ = compile_onnx(path)
    assert net.T == 255 and set(_populations(net).values()) == {Neuron}


def test_max_pooled_symmetric_quantizer_keeps_the_offset_form_or_is_named(tmp_path):
    """The spiking max-pool takes non-negative counts: a symmetric quantizer read by a MaxPool keeps the
    offset form (2L levels); where its window conflicts with the others', the refusal names the MaxPool."""
    def model(unsigned_levels):
        b = Builder((1, 1, 8, 8))
        x = b.quant("x", 1 / 16, 16)
        h = _signed(b, b.bn(b.conv(x, 1, 4), 4), 0.2, -7, 7)
        h = b.node("MaxPool", [h], kernel_shape=[2, 2], strides=[2, 2])
        h = b.quant(b.conv(h, 4, 4), 0.2, unsigned_levels)
        return b.model(b.gemm(b.node("Flatten", [h], axis=1), 64, 10), (1, 10))

    onnx.save(model(14), tmp_path / "ok.onnx")
    net, _ = compile_onnx(tmp_path / "ok.onnx")
    assert net.T == 14 and set(_populations(net).values()) == {Neuron}
    onnx.save(model(7), tmp_path / "bad.onnx")
    with pytest.raises(UnsupportedModelError, match="feeds MaxPool 'MaxPool_") as exc:
        compile_onnx(tmp_path / "bad.onnx")
    assert "share one number of levels" in str(exc.value)


def test_symmetric_logits_quantizer_is_a_ternary_population(tmp_path):
    """A symmetric quantizer on the logits with L = T is applied exactly by a ternary population (the
    offset form would need 2T levels and leave the logits unquantized)."""
    b = Builder((1, 1, 8, 8))
    x = b.quant("x", 1 / 16, 16)
    h = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.25, 15)
    y = _signed(b, b.gemm(b.node("Flatten", [h], axis=1), 256, 10), 0.3, -15, 15)
    path = tmp_path / "m.onnx"
    onnx.save(b.model(y, (1, 10)), path)
    net, rep = compile_onnx(path)
    assert not rep.warnings
    assert sorted(t.__name__ for t in _populations(net).values()) == ["Neuron", "TernaryNeuron"]
    x = _inputs()
    ref, snn = onnx_logits(path, x), semantics.run_counts(net, x).logits
    assert np.mean(np.all(np.isclose(ref, snn, atol=1e-5), axis=1)) >= 0.99


# -- property: a compiled symmetric quantizer equals onnxruntime's QuantizeLinear except exact ties ------
def _layer(scale: float, L: int, zp: int, w: np.ndarray, w_scale: float, bias: np.ndarray):
    """x (n, 8) -> input quantizer -> Gemm -> symmetric QCDQ quantizer (int8, zero point ``zp``, Clip(zp - L,
    zp + L), hidden) -> Gemm: the model, and a copy whose outputs are the quantizer's levels and its float input."""
    b = Builder((1, 8))
    x = b.quant("x", 1 / 16, 16)
    wq = b.node("DequantizeLinear", [b.const(w.astype(np.int8), "w"), b.const(np.float32(w_scale)), b.const(np.int8(0))])
    pre = b.node("Gemm", [x, wq, b.const(bias.astype(np.float32), "b")], transB=1)
    s, z = b.const(np.float32(scale)), b.const(np.array(zp, np.int8))
    q = b.node("QuantizeLinear", [pre, s, z])
    q = b.node("Clip", [q, b.const(np.array(zp - L, np.int8)), b.const(np.array(zp + L, np.int8))])
    h = b.node("DequantizeLinear", [q, s, z])
    full = b.model(b.gemm(h, w.shape[0], 3), (1, 3))
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(list(full.graph.node[:-2]), "probe", list(full.graph.input),
                               [onnx.helper.make_tensor_value_info(q, onnx.TensorProto.INT8, ["n", w.shape[0]]),
                                onnx.helper.make_tensor_value_info(pre, onnx.TensorProto.FLOAT, ["n", w.shape[0]])],
                               [i for i in full.graph.initializer if any(i.name in n.input for n in full.graph.node[:-2])]),
        opset_imports=full.opset_import)
    probe.ir_version = full.ir_version
    return full, probe


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scale=st.floats(0.01, 2.0), L=st.integers(1, 60), zp=st.integers(-60, 60), seed=st.integers(0, 2**31 - 1),
       w_scale=st.floats(0.01, 0.5))
def test_ternary_population_equals_quantizelinear_except_exact_ties(tmp_path, scale, L, zp, seed, w_scale):
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    F = int(rng.integers(1, 7))
    w = rng.integers(-7, 8, (F, 8))
    bias = rng.normal(0, 1.0, F)
    full, probe = _layer(scale, L, zp, w, w_scale, bias)
    path = tmp_path / "m.onnx"
    onnx.save(full, path)
    net, rep = compile_onnx(path)
    pop = next(iter(net.neurons()))
    assert isinstance(net.op(pop), TernaryNeuron) and net.T == L
    x = (rng.integers(0, 17, (64, 8)) / 16).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # run the graph as written (onnx_logits)
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    levels, pre = sess.run(None, {"x": x})
    expect = levels.astype(np.int64) - zp  # onnxruntime: clip(round_half_even(x / s) + zp, zp - L, zp + L) - zp
    counts = semantics.run_counts(net, x).counts[pop].astype(np.int64)
    r = pre.astype(np.float32) / np.float32(scale)  # as onnxruntime divides, in float32
    distance = np.abs(np.abs(r - np.floor(r)) - 0.5)  # to the nearest rounding tie, in levels
    # away from ties the counts are onnxruntime's; within the compile's error bound of a tie they may round
    # the other way (half up at exact ties: +k.5 -> k+1 where ONNX takes the even neighbour)
    # onnxruntime's float32 Gemm is off the real value by a few ulps of the magnitudes it adds up
    magnitude = (np.abs(x) @ np.abs(w * w_scale).T + np.abs(bias)) / scale + np.abs(r)
    near = (distance <= rep.error_bound + 1e-6 * magnitude) & (np.abs(r) < L + 0.5)
    differ = counts != expect
    assert not np.any(differ & ~near), (counts[differ & ~near], expect[differ & ~near], r[differ & ~near])
    assert np.all(np.abs(counts - expect) <= 1)


# -- asymmetric signed quantizers: the split form (a ternary population and clip corrections) ---------------------
def _asymmetric_chain(s1: float, c: float, bias: np.ndarray, s2: float, z2: int, dtype, w: np.ndarray,
                      clip: tuple[int, int] | None = None):
    """x (n, 8) -> input quantizer -> Gemm -> unsigned uint8 quantizer Q1 (step ``s1``; ``Clip(0, hi - lo)`` with
    ``clip``) -> Mul(c) -> Add(bias) -> asymmetric quantizer Q2 (``dtype``'s full range or ``Clip(*clip)``, zero point
    ``z2``) -> identity Gemm (the logits are Q2's values): the model, and a probe whose outputs are Q1's and Q2's levels
    and Q2's float input."""
    b = Builder((1, 8))
    x = b.quant("x", 1 / 16, 16)
    F = w.shape[0]
    wq = b.node("DequantizeLinear", [b.const(w.astype(np.int8), "w"), b.const(np.float32(0.05)), b.const(np.int8(0))])
    pre1 = b.node("Gemm", [x, wq, b.const(np.zeros(F, np.float32), "b")], transB=1)
    sc1, z1 = b.const(np.float32(s1)), b.const(np.uint8(0))
    q1 = b.node("QuantizeLinear", [pre1, sc1, z1])
    if clip is not None:
        q1 = b.node("Clip", [q1, b.const(np.uint8(0)), b.const(np.uint8(clip[1] - clip[0]))])
    h1 = b.node("DequantizeLinear", [q1, sc1, z1])
    pre2 = b.node("Add", [b.node("Mul", [h1, b.const(np.float32(c))]), b.const(bias.astype(np.float32), "bias")])
    sc2, zz2 = b.const(np.float32(s2)), b.const(np.array(z2, dtype))
    q2 = b.node("QuantizeLinear", [pre2, sc2, zz2])
    if clip is not None:
        q2 = b.node("Clip", [q2, b.const(np.array(clip[0], dtype)), b.const(np.array(clip[1], dtype))])
    h2 = b.node("DequantizeLinear", [q2, sc2, zz2])
    eye = b.node("DequantizeLinear", [b.const(np.eye(F, dtype=np.int8), "eye"), b.const(np.float32(1.0)), b.const(np.int8(0))])
    full = b.model(b.node("Gemm", [h2, eye, b.const(np.zeros(F, np.float32), "b0")], transB=1), (1, F))
    keep = list(full.graph.node[:-2])
    probe = onnx.helper.make_model(
        onnx.helper.make_graph(keep, "probe", list(full.graph.input),
                               [onnx.helper.make_tensor_value_info(q1, onnx.TensorProto.UINT8, ["n", F]),
                                onnx.helper.make_tensor_value_info(q2, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), ["n", F]),
                                onnx.helper.make_tensor_value_info(pre2, onnx.TensorProto.FLOAT, ["n", F])],
                               [i for i in full.graph.initializer if any(i.name in n.input for n in keep)]),
        opset_imports=full.opset_import)
    probe.ir_version = full.ir_version
    return full, probe


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(signed=st.booleans(), z=st.integers(1, 254), spread=st.floats(0.2, 3.0), c=st.floats(-2.0, 2.0).filter(lambda v: abs(v) > 0.05),
       shift=st.floats(-1.0, 1.0), seed=st.integers(0, 2**31 - 1))
def test_split_population_equals_quantizelinear_except_exact_ties(tmp_path, signed, z, spread, c, shift, seed):
    """An asymmetric int8 / uint8 quantizer (full range, zero point anywhere but at the ends) reading a one-to-one
    current becomes a ternary population plus clip corrections whose signed counts add up to onnxruntime's
    ``QuantizeLinear`` level minus the zero point, except within the integerization bound of a rounding tie (the
    tie rule of the symmetric lowering). ``spread`` scales the input's reach to up to three times the clip range,
    so both clip corrections (and their second terms) fire."""
    import onnxruntime as ort

    rng = np.random.default_rng(seed)
    dtype, z2 = (np.int8, z - 128) if signed else (np.uint8, z)
    F = int(rng.integers(1, 6))
    w = rng.integers(-7, 8, (F, 8))
    s1 = 0.01
    reach = abs(c) * s1 * 255
    s2 = reach / (255 * spread)
    bias = rng.uniform(-1, 1, F) * reach * abs(shift)
    full, probe = _asymmetric_chain(s1, c, bias, s2, z2, dtype, w)
    path = tmp_path / "m.onnx"
    onnx.save(full, path)
    net, rep = compile_onnx(path)
    assert net.T == 255
    ternary = [n for n in net.neurons() if isinstance(net.op(n), TernaryNeuron)]
    assert len(ternary) == 1, _populations(net)  # Q2 in the split form; Q1 unsigned
    x = (rng.integers(0, 17, (64, 8)) / 16).astype(np.float32)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    q1, q2, pre = sess.run(None, {"x": x})
    run = semantics.run_counts(net, x)
    q1_pop = next(n for n in net.neurons() if type(net.op(n)) is Neuron and not any(p in n for p in ("above", "below")))
    same_q1 = np.all(run.counts[q1_pop].astype(np.int64) == q1.astype(np.int64), axis=1)  # Q1's own ties propagate
    values = np.rint(run.logits / s2).astype(np.int64)
    expect = q2.astype(np.int64) - z2
    r = pre.astype(np.float32) / np.float32(s2)
    distance = np.abs(np.abs(r - np.floor(r)) - 0.5)
    near = distance <= rep.error_bound + 1e-6 * (np.abs(r) + abs(c) * s1 * 255 / s2)
    differ = (values != expect) & same_q1[:, None]
    assert not np.any(differ & ~near), (values[differ & ~near], expect[differ & ~near], r[differ & ~near])
    assert np.all(np.abs(values - expect)[same_q1] <= 1)


def small_split_model(path, seed: int = 0) -> None:
    """The chain above at T = 7: Q1 unsigned [0, 7], Q2 int8 zero point 1 with ``Clip(-2, 5)`` (levels [-3, 4]) reading
    ``1.2 - 0.3 * level of Q1``, levels 8 down to -6, so it passes both clip bounds (corrections of both sides fire)."""
    rng = np.random.default_rng(seed)
    w = rng.integers(-7, 8, (4, 8))
    full, _ = _asymmetric_chain(0.1, -3.0, np.full(4, 1.2), 0.15, 1, np.int8, w, clip=(-2, 5))
    onnx.save(full, path)


def test_split_form_numba_equals_reference(tmp_path):
    """numba == count-domain reference bit for bit (every population's counts and the readout) on the split form."""
    from csdc.backends.numba import NumbaBackend

    small_split_model(tmp_path / "m.onnx")
    net, _ = compile_onnx(tmp_path / "m.onnx")
    names = sorted(net.neurons())
    assert net.T == 7 and sum(isinstance(net.op(n), TernaryNeuron) for n in names) == 1
    assert sum("above" in n for n in names) >= 2 and sum("below" in n for n in names) >= 2, names
    x = (np.random.default_rng(1).integers(0, 17, (200, 8)) / 16).astype(np.float32)
    ref, got = semantics.run_counts(net, x), NumbaBackend().run(net, x)
    for n in names:
        assert np.array_equal(ref.counts[n], got.counts[n]), n
    assert np.array_equal(ref.readout, got.readout)
    for side in ("above", "below"):  # corrections of both clip bounds fire on some inputs
        assert any(np.any(ref.counts[n]) for n in names if side in n), side
