"""Products of two quantized activations (``MatMul`` of two tensors, as attention's ``Q @ K^T`` and ``P @ V``;
``Mul`` of two tensors, as LayerNorm's and softmax's decompositions need): TDEC ``SpikeMatMul`` s, plus synapses
for the operands' offsets (the *offset form* ``x = step * count + offset`` of a quantizer whose zero point lies
inside its levels, as onnxruntime's ``quantize_static`` writes for uint8 Q, K, V), checked against onnxruntime and
against a float64 evaluation of the quantized product."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csdc.backends.numba import NumbaBackend
from csdc.compiler.pipeline import compile_onnx
from csdc.errors import UnsupportedModelError
from csdc.ir import DenseSynapse, DiagonalSynapse, SpikeMatMul
from csdc.ir.semantics import run_counts
from csdc.runtime.evaluate import onnx_logits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lava_check import assert_lava_equals_numba  # noqa: E402
from onnx_build import Builder  # noqa: E402


def gated_cnn(signed_gate: bool = False, seed: int = 0, unquantized_gate: bool = False) -> onnx.ModelProto:
    """x -> q -> [conv -> BN -> q(a)] * [conv -> BN -> q(b)] -> q(product) -> Flatten -> Gemm (QCDQ, 7 levels)."""
    b = Builder((1, 1, 8, 8), seed=seed)
    x = b.quant("x", 1 / 16, 16)
    a = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.25, 7)
    if signed_gate:  # levels 0..7 around zero point 3: a signed quantizer (offset form)
        s, z = b.const(np.float32(0.2), "s"), b.const(np.array(3, dtype=np.uint8), "zp")
        q = b.node("QuantizeLinear", [b.bn(b.conv(x, 1, 4), 4), s, z])
        q = b.node("Clip", [q, b.const(np.array(0, dtype=np.uint8)), b.const(np.array(7, dtype=np.uint8))])
        g = b.node("DequantizeLinear", [q, s, z])
    elif unquantized_gate:
        g = b.bn(b.conv(x, 1, 4), 4)
    else:
        g = b.quant(b.bn(b.conv(x, 1, 4), 4), 0.2, 7)
    p = b.quant(b.node("Mul", [a, g]), 0.15, 7)
    return b.model(b.gemm(b.node("Flatten", [p], axis=1), 256, 10), (1, 10))


def _exact_against_onnxruntime(model: Path, x: np.ndarray) -> None:
    net, _ = compile_onnx(model)
    got = NumbaBackend().run(net, x)
    ref = onnx_logits(model, x)
    assert np.mean(got.logits.argmax(1) == ref.argmax(1)) == 1.0
    assert np.abs(got.logits - ref).max() < 1e-4  # exact: the same levels, float rounding of the logits aside
    assert np.array_equal(run_counts(net, x).readout, got.readout)


def test_product_of_two_activations_equals_onnxruntime(tmp_path: Path) -> None:
    onnx.save(gated_cnn(), tmp_path / "m.onnx")
    net, _ = compile_onnx(tmp_path / "m.onnx")
    products = [n for n, op in net.nodes() if isinstance(op, SpikeMatMul)]
    assert len(products) == 1 and net.info(net.inputs(products[0])[0]).shape == (4, 8, 8, 1, 1)
    x = np.random.default_rng(0).uniform(-0.2, 1.2, size=(64, 1, 8, 8)).astype(np.float32)
    _exact_against_onnxruntime(tmp_path / "m.onnx", x)


def test_product_with_an_offset_operand_equals_onnxruntime(tmp_path: Path) -> None:
    """The gate's levels 0..7 around zero point 3 (offset -3 steps): one SpikeMatMul plus one-to-one synapses from
    the other operand's spikes (weight -3 x the product's unit: exact) and a bias."""
    onnx.save(gated_cnn(signed_gate=True), tmp_path / "s.onnx")
    net, _ = compile_onnx(tmp_path / "s.onnx")
    products = [n for n, op in net.nodes() if isinstance(op, SpikeMatMul)]
    assert len(products) == 1
    a_col = net.inputs(products[0])[0]  # the ungated operand, reshaped to columns
    offset = [op for n, op in net.nodes() if isinstance(op, DiagonalSynapse) and net.inputs(n) == [a_col]]
    assert len(offset) == 1 and np.all(offset[0].weight == -3 * net.op(products[0]).weight)
    x = np.random.default_rng(1).uniform(-0.2, 1.2, size=(64, 1, 8, 8)).astype(np.float32)
    _exact_against_onnxruntime(tmp_path / "s.onnx", x)


def test_an_operand_that_is_not_quantized_is_refused_by_name(tmp_path: Path) -> None:
    onnx.save(gated_cnn(unquantized_gate=True), tmp_path / "u.onnx")
    with pytest.raises(UnsupportedModelError, match=r"'Mul_\d+' \(op Mul\): operand 1 \('[^']+'\) of this product of two "
                                                    r"activations is not a quantizer's output"):
        compile_onnx(tmp_path / "u.onnx")


# -- models made by torch.onnx + quantize_static, as a user makes them -----------------------------------------
@pytest.fixture(scope="module")
def qdq_models(tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("torch")
    from product_models import product_qdq_models

    return product_qdq_models(tmp_path_factory.mktemp("products"))


def _zero_points(model: Path) -> dict[str, int]:
    m = onnx.load(model)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    return {n.input[0]: int(init[n.input[2]]) for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in init}


@pytest.mark.parametrize("name", ["qk", "mul", "pv"])
def test_quantize_static_products_equal_onnxruntime_on_every_digits_image(qdq_models, name: str) -> None:
    """``q @ k^T`` (both operands in the offset form), ``q * k`` and ``relu(q @ k^T / 4) @ v`` (one side offset) at
    default options: the same top-1 class as onnxruntime on all 450 test images, and the same logits (the logits
    quantizer is applied exactly: the levels are equal, so are the logits up to float rounding), as the compile
    report's error bound (integerization error far below half a level) says; numba == the count-domain reference."""
    from csdc.runtime.datasets import load_digits_split

    model = qdq_models[name]
    zps = _zero_points(model)
    mid = [t for t, z in zps.items() if t.startswith(("/q/Add", "/k/Add", "/v/Add"))]
    assert mid and all(0 < zps[t] < 255 for t in mid)  # the offset form: levels on both sides of the zero point
    net, rep = compile_onnx(model)
    assert rep.error_bound < 1e-3 and not rep.warnings
    # one synapse group of equal weights (the other side's offset times the sum over K) per offset operand:
    # q @ k^T: both (16 x 16 each); p @ v: v's offset times the row sums of p (8 outputs x 16), none for p (zero point 0)
    sums = sorted(op.mantissa.shape for _, op in net.nodes() if isinstance(op, DenseSynapse) and np.unique(op.mantissa).size == 1
                  and op.mantissa.shape[1] == 16)
    assert sums == {"qk": [(16, 16), (16, 16)], "mul": [], "pv": [(8, 16), (16, 16), (16, 16)]}[name]
    # one SpikeMatMul per product: its operands keep one population each (the offset form, not the split form)
    assert sum(isinstance(op, SpikeMatMul) for _, op in net.nodes()) == {"qk": 1, "mul": 1, "pv": 2}[name]
    x, _ = load_digits_split("test")
    got = NumbaBackend().run(net, x, keep_trains=False)
    ref = onnx_logits(model, x)
    assert len(x) == 450 and np.sum(got.logits.argmax(1) == ref.argmax(1)) == 450
    assert np.abs(got.logits - ref).max() < 1e-4
    assert np.array_equal(run_counts(net, x).readout, got.readout)


# -- property: random offsets, steps and shapes against a float64 evaluation of the quantized product -----------
def _quantizer(b: Builder, x: str, scale: float, lo: int, hi: int, zp: int) -> str:
    """QuantizeLinear -> Clip(lo, hi) -> DequantizeLinear: levels lo..hi around zero point zp (int8 if signed)."""
    dtype = np.int8 if lo < 0 else np.uint8
    s, z = b.const(np.float32(scale), "s"), b.const(np.array(zp, dtype=dtype), "zp")
    q = b.node("Clip", [b.node("QuantizeLinear", [x, s, z]), b.const(np.array(lo, dtype=dtype)), b.const(np.array(hi, dtype=dtype))])
    return b.node("DequantizeLinear", [q, s, z])


operand = st.one_of(st.tuples(st.just("offset"), st.integers(0, 15), st.floats(0.02, 0.5)),
                    st.tuples(st.just("ternary"), st.just(0), st.floats(0.02, 0.5)))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(L=st.sampled_from([7, 15]), M=st.integers(1, 4), K=st.integers(1, 4), N=st.integers(1, 4),
       elementwise=st.booleans(), a=operand, b=operand, zp_out=st.integers(0, 15), out_scale=st.floats(0.05, 2.0),
       seed=st.integers(0, 2**16))
def test_offset_products_round_the_exact_product(tmp_path_factory, L, M, K, N, elementwise, a, b, zp_out, out_scale,
                                                 seed) -> None:
    """x (M, K) -> MatMul -> q_a (M, K); x -> [Transpose ->] MatMul -> q_b ((K, N), or (M, K) for ``Mul``); q_a @ q_b
    (or q_a * q_b) -> q_p -> Flatten. Operands: uint8 levels 0..L around a random zero point (the offset form; 0: no
    offset, L: levels <= 0), or int8 symmetric -L..L (ternary spikes). From the operands' levels the network carries
    (their spike counts decoded as ``step * count + offset``), the product is evaluated in float64; q_p's count
    must be its rounding wherever the exact value is farther than the population's stated error bound from a
    rounding boundary, else one of the two neighbours."""
    from csdc.compiler.frontend import load_qgraph
    from csdc.compiler.integerize import Precision
    from csdc.compiler.bitwidth import PROFILES
    from csdc.compiler.lower import Lowering, Spikes
    from csdc.compiler.pipeline import CompileOptions, canonicalize

    bld = Builder((1, M, K), seed=seed)
    x = bld.quant("x", 1 / L, L)
    ops = []
    for kind, zp, scale in (a, b):
        zp = min(zp, L)
        if ops and not elementwise:  # (K, N) from the transposed tokens
            h = bld.node("MatMul", [bld.node("Transpose", [x], perm=[0, 2, 1]), bld.qweight((M, N), axis=1)])
        else:
            h = bld.node("MatMul", [x, bld.qweight((K, K), axis=1)])
        ops.append(_quantizer(bld, h, scale, -L, L, 0) if kind == "ternary" else _quantizer(bld, h, scale, 0, L, zp))
    prod = bld.node("Mul" if elementwise else "MatMul", ops)
    reach = (K if not elementwise else 1) * a[2] * b[2] * L * L  # a product's largest magnitude
    p = _quantizer(bld, prod, out_scale * reach / L, 0, L, min(zp_out, L))
    model = bld.model(bld.node("Flatten", [p], axis=1), (1, M * (K if elementwise else N)))
    path = tmp_path_factory.mktemp("prop") / "p.onnx"
    onnx.save(model, path)

    low = Lowering(canonicalize(load_qgraph(path, "refuse"), CompileOptions()), Precision(PROFILES["generic"]), None)
    net, rep = low.run()
    xs = np.random.default_rng(seed).uniform(-0.1, 1.1, size=(32, M, K)).astype(np.float32)
    res = NumbaBackend().run(net, xs)
    assert np.array_equal(run_counts(net, xs).readout, res.readout)

    def real(tensor: str) -> np.ndarray:  # the operand's values as its spike counts encode them
        v = low.vals[tensor]
        assert isinstance(v, Spikes)  # a product's operands keep one population (no split form)
        return v.step * res.counts[v.node].astype(np.float64) + v.offset

    pa, pb = (real(t) for t in ops)
    exact = pa * pb if elementwise else pa @ pb
    out = low.vals[p]
    assert isinstance(out, Spikes)
    step = float(out.step)
    level = exact / step - out.offset / step  # counts are level - lo (lo = 0)
    bound = rep.precision.populations[out.node].bound
    got = res.counts[out.node].astype(np.float64)
    nearest = np.clip(np.floor(level + 0.5), 0, L)
    near_tie = np.abs(level + 0.5 - np.rint(level + 0.5)) <= bound + 1e-9
    assert np.all(got[~near_tie] == nearest[~near_tie])
    lo_n, hi_n = np.clip(np.floor(level + 0.5 - bound - 1e-9), 0, L), np.clip(np.floor(level + 0.5 + bound + 1e-9), 0, L)
    assert np.all((got >= lo_n) & (got <= hi_n))


@pytest.mark.lava
def test_offset_products_run_on_lava_spike_for_spike(tmp_path) -> None:
    """The offset synapses (row sums; column sums read through a Transpose and transposed back) on Lava: every
    population's spike counts and the readout equal numba's (MatMul with offsets on both sides, and the gated CNN)."""
    bld = Builder((1, 3, 4), seed=5)
    x = bld.quant("x", 1 / 7, 7)
    a = _quantizer(bld, bld.node("MatMul", [x, bld.qweight((4, 4), axis=1)]), 0.3, 0, 7, 3)
    b = _quantizer(bld, bld.node("MatMul", [bld.node("Transpose", [x], perm=[0, 2, 1]), bld.qweight((3, 2), axis=1)]), 0.2, 0, 7, 5)
    p = _quantizer(bld, bld.node("MatMul", [a, b]), 0.4, 0, 7, 2)
    onnx.save(bld.model(bld.node("Flatten", [p], axis=1), (1, 6)), tmp_path / "mm.onnx")
    onnx.save(gated_cnn(signed_gate=True), tmp_path / "gate.onnx")
    rng = np.random.default_rng(0)
    for name, shape in (("mm.onnx", (4, 3, 4)), ("gate.onnx", (4, 1, 8, 8))):
        net, _ = compile_onnx(tmp_path / name)
        if name == "mm.onnx":  # row sums (3 x 4 -> 3 x 2) and column sums (read as 2 x 4 -> 2 x 3, transposed back)
            assert sorted(op.mantissa.shape for _, op in net.nodes() if isinstance(op, DenseSynapse)
                          and np.unique(op.mantissa).size == 1) == [(2, 4), (3, 4)]
        assert_lava_equals_numba(net, rng.uniform(0, 1, size=shape).astype(np.float32))
