"""``--nonlinear mbe``: Softmax over the last axis (docs/mbe.md, "Compiling Softmax") and the digit readout block
(:func:`csdc.compiler.mbe_readout.mbe_digits`) it is made of. The model is made by the test as a user would (torch
module trained on digits, torch.onnx at opset 17, quantize_static by csdc's calibrate route), its softmax levels
are checked against the exact softmax of the network's own input levels and against onnxruntime's."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, Phase, example, given, settings
from hypothesis import strategies as st

torch = pytest.importorskip("torch")

from csdc.backends.numba import NumbaBackend  # noqa: E402
from csdc.compiler.mbe import MBE_TARGET_LEVELS, sum_ranges  # noqa: E402
from csdc.compiler.mbe_readout import (SOFTMAX_RECIPROCAL_TARGET, mbe_digits, softmax_error, softmax_exp_fit,  # noqa: E402
                                       softmax_pairs, softmax_product, softmax_radix_bits, softmax_reciprocal_fit)
from csdc.compiler.pipeline import CompileOptions, compile_onnx  # noqa: E402
from csdc.errors import BudgetError, UnsupportedModelError  # noqa: E402
from csdc.ir import MBENeuron  # noqa: E402
from csdc.ir.graph import Network  # noqa: E402
from csdc.ir.ops import (Add, DenseSynapse, DiagonalSynapse, Encode, Neuron, Readout, Reshape, SpikeMatMul,  # noqa: E402
                         SpikeMaxPool)
from csdc.ir.semantics import run_counts, run_steps  # noqa: E402
from csdc.runtime.datasets import load_digits_split  # noqa: E402
from csdc.runtime.evaluate import onnx_logits  # noqa: E402


@pytest.fixture(scope="module", params=[(8, 16), (4, 49)], ids=["rows_of_16", "rows_of_49"])
def shape(request) -> tuple[int, int]:
    """(rows, row length): the test model's 8 rows of 16, and 4 rows of 49 (the MNIST ViT's attention rows)."""
    return request.param


@pytest.fixture(scope="module")
def model(tmp_path_factory, shape) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from softmax_models import softmax_qdq_model

    return softmax_qdq_model(tmp_path_factory.mktemp("softmax"), rows=shape[0], row=shape[1])


@pytest.fixture(scope="module")
def compiled(model):
    return compile_onnx(model, CompileOptions(nonlinear="mbe"))


def _digits_x() -> np.ndarray:
    x, _ = load_digits_split("test")
    return x.reshape(len(x), 64)


def _softmax_quantizers(model: Path) -> tuple[str, float, str]:
    """(the QuantizeLinear output after the Softmax, the step of the Softmax's input, the Softmax's name)."""
    m = onnx.load(model)
    init = {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer}
    sm = next(n for n in m.graph.node if n.op_type == "Softmax")
    dq = next(n for n in m.graph.node if sm.input[0] in n.output)
    q = next(n for n in m.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == sm.output[0])
    return q.output[0], float(init[dq.input[1]]), sm.name


def _onnxruntime_levels(model: Path, tensor: str, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    m = onnx.load(model)
    m.graph.output.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.UINT8, None))
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return sess.run([tensor], {"input": x})[0].astype(np.int64)


def test_default_refuses_softmax_naming_the_flag(model) -> None:
    with pytest.raises(UnsupportedModelError, match=r"Softmax.*--nonlinear mbe"):
        compile_onnx(model)


def test_loihi2_refuses_the_softmax_naming_its_populations(model) -> None:
    """Under the generic units the digit populations need fine words wider than two 24-bit words hold, and
    loihi2's own budget does not fit them either: refused, naming both reasons (docs/mbe.md)."""
    with pytest.raises(BudgetError, match=r"Softmax_exp_digit0.*do not map onto profile 'loihi2'.*own budget"):
        compile_onnx(model, CompileOptions(nonlinear="mbe", profile="loihi2"))


def test_softmax_not_read_from_a_quantizer_is_refused_by_name(tmp_path: Path) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from onnx_build import with_ops

    onnx.save(with_ops(["Softmax"]), tmp_path / "s.onnx")  # Softmax of the logits: no quantizer before or after it
    with pytest.raises(UnsupportedModelError, match=r"Softmax.*must read an unsigned or offset-form quantizer"):
        compile_onnx(tmp_path / "s.onnx", CompileOptions(nonlinear="mbe"))


def test_softmax_is_spike_driven_and_reports_its_error(compiled, shape) -> None:
    net, rep = compiled
    ops = [type(op).__name__ for _, op in net.nodes()]
    (a,) = rep.approximations
    exp, rec = a["stages"]["exp"], a["stages"]["reciprocal"]
    # the exp's and the reciprocal's MBE populations (secant pieces, at most 64 bases each); 2 x 2 digit products but
    # the two last digits' (softmax_pairs)
    assert ops.count("MBENeuron") == len(a["mbe_nodes"]) == len(exp["mbe_nodes"]) + len(rec["mbe_nodes"])
    assert all(net.op(m).threshold.shape[0] <= 64 for m in a["mbe_nodes"])
    assert ops.count("SpikeMaxPool") == 1 and ops.count("SpikeMatMul") == 3
    # every synapse of the softmax is fed by spikes (accumulates): no current reaches a dense synapse
    for name, op in net.nodes():
        if name.startswith("Softmax") and isinstance(op, (DenseSynapse, DiagonalSynapse, SpikeMatMul)):
            assert all(net.info(i).kind != "current" for i in net.inputs(name)), name
    assert a["op"] == "softmax" and a["row"] == shape[1]
    assert a["latency_steps"] == 2 * net.T + 4 * net.T  # two MBE stages and their 2 + 2 digits (D = T)
    # the exact worst case over every row, in steps of the output quantizer (1/255): within a quarter step
    assert 0 < a["mean_abs_error"] < a["max_abs_error"] <= MBE_TARGET_LEVELS < 0.5
    assert exp["places"] == rec["places"] == [256, 1]  # radix T + 1: the exponential in units of 1 / (255 x 256)
    assert rec["levels"][1] - rec["levels"][0] + 1 > (shape[1] - 1) * 255 * 255  # every row sum, each verified
    # T (input) + the projection's quantizer + the softmax's + the logits' (D = T each) + the softmax's stages
    assert rep.latency == net.T * (1 + 3) + a["latency_steps"]


def test_softmax_levels_match_the_exact_softmax_and_onnxruntime(model, compiled) -> None:
    net, rep = compiled
    (a,) = rep.approximations
    tensor, step, name = _softmax_quantizers(model)
    x = _digits_x()
    res = NumbaBackend().run(net, x, keep_trains=False)
    src = net.inputs(f"{name.strip('/')}_rows")[0]
    while src not in res.counts:  # through routing to the population before the softmax
        src = net.inputs(src)[0]
    reader = next(c for c in net.consumers(f"{name.strip('/')}_out"))
    got = res.counts[reader]
    c = res.counts[src].reshape(got.shape)
    exact = np.exp(step * (c - c.max(axis=-1, keepdims=True)))
    exact = 255 * exact / exact.sum(axis=-1, keepdims=True)
    own = np.rint(exact)
    moved = got != own
    # a level differs from the exact softmax of the network's own input levels only where the exact value lies within
    # the stated worst-case error (plus the output neuron's integerization bound) of a rounding boundary, by one
    assert np.abs(got - own).max() <= 1
    slack = a["max_abs_error"] + rep.precision["populations"][reader]["bound"] + 1e-6
    assert np.all(np.abs(np.abs(exact[moved] - np.floor(exact[moved])) - 0.5) <= slack)
    want = _onnxruntime_levels(model, tensor, x)
    assert np.abs(got - want).max() <= 1 and np.mean(got == want) >= 0.99
    ref = onnx_logits(model, x)
    assert np.mean(res.logits.argmax(1) == ref.argmax(1)) >= 0.99


def test_numba_equals_the_references(compiled) -> None:
    net, _ = compiled
    x = _digits_x()[:6]
    nb = NumbaBackend().run(net, x, keep_trains=True)
    counts, steps = run_counts(net, x), run_steps(net, x)
    assert np.array_equal(nb.readout, counts.readout) and np.array_equal(nb.readout, steps.readout)
    for k, v in counts.counts.items():
        assert np.array_equal(nb.counts[k], v) and np.array_equal(steps.counts[k], v), k


def _current_of_levels(T: int, width: int) -> tuple[Network, str]:
    """A network whose current 'levels' carries the input levels 0..T as its window total (one per element)."""
    net = Network(T)
    net.add("input", Encode((width,), 1.0, 0, T), [])
    zero = np.zeros(width, dtype=np.int64)
    net.add("spikes", Neuron(np.full(width, T), zero, zero, T), ["input"])
    net.add("levels", DiagonalSynapse(np.ones(width, dtype=np.int8)), ["spikes"])
    return net, "levels"


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.sampled_from([15, 63, 255]), lo=st.integers(0, 40), function=st.sampled_from(["exp", "reciprocal", "rsqrt"]),
       scale=st.floats(0.005, 0.3), digits=st.integers(1, 3), refine=st.booleans(), seed=st.integers(0, 2**16))
def test_digit_readout_within_its_stated_error(T, lo, function, scale, digits, refine, seed) -> None:
    """The digit populations count what ``Digits.readout`` says (numba == run_counts == run_steps) and
    ``unit * readout`` is within the stated worst-case error of the float64 function on every level."""
    net, cur = _current_of_levels(T, 8)
    lo = min(lo, T // 2)
    q = np.arange(lo, T + 1, dtype=np.float64)
    f = {"exp": lambda v: np.exp(-scale * v), "reciprocal": lambda v: 1.0 / (1.0 + scale * v),
         "rsqrt": lambda v: 1.0 / np.sqrt(1.0 + scale * v)}[function]
    d = mbe_digits(net, "f", cur, lo, f(q), delay=T, digits=digits, bases=16, refine=refine)
    assert (d.refinement is not None) == refine
    B = d.places[-2] if digits > 1 else 1
    assert all(p == B ** (digits - 1 - k) for k, p in enumerate(d.places))
    # the precision the block states: the fit's error plus half a unit of the last digit
    assert d.max_abs_error <= (d.refinement or d.fit).max_abs_error * d.unit + d.unit / 2 + 1e-12
    assert d.mean_abs_error <= d.max_abs_error
    terms = [net.add(f"place{k}", DiagonalSynapse(np.full(8, p, dtype=np.int64)), [n]) for k, (n, p) in
             enumerate(zip(d.nodes, d.places))]
    total = terms[0] if len(terms) == 1 else net.add("sum", Add(), terms)
    net.add("readout", Readout(np.full(8, d.unit), np.zeros(8)), [total])
    x = np.random.default_rng(seed).integers(lo, T + 1, (5, 8)).astype(np.float32)
    nb = NumbaBackend().run(net, x, keep_trains=False)
    assert np.array_equal(nb.readout, d.readout[x.astype(np.int64) - lo])
    assert np.array_equal(run_counts(net, x).readout, nb.readout) and np.array_equal(run_steps(net, x).readout, nb.readout)
    assert np.all(np.abs(nb.readout * d.unit - f(x.astype(np.float64))) <= d.max_abs_error + 1e-12)


def _softmax_stages(net: Network, T: int, N: int, step: float, gap: str) -> tuple:
    """The exponential of the gaps' current ``gap`` (N per row), the row sum of its digits and the reciprocal, fitted as
    the lowering fits them (output step 1/255): (e, r)."""
    b, steps = softmax_radix_bits(T, N), min(16, T)
    e = mbe_digits(net, "exp", gap, 0, np.exp(-step * np.arange(T + 1)), delay=T, radix_bits=b,
                   fitter=lambda v: softmax_exp_fit(step, T, 1 << b, steps))
    sums = [net.add(f"s{k}", DenseSynapse(np.full((1, N), p, dtype=np.int64)), [d]) for k, (d, p) in
            enumerate(zip(e.nodes, e.places))]
    net.add("sum", Add(), sums)
    lo, hi = int(e.readout[0] + (N - 1) * e.readout.min()), int(e.readout[0] + (N - 1) * e.readout.max())
    r_unit = 1.0 / (e.unit * lo * T * (1 << b))
    r = mbe_digits(net, "rec", "sum", lo, 1.0 / (e.unit * np.arange(lo, hi + 1)), delay=T, radix_bits=b,
                   fitter=lambda v: softmax_reciprocal_fit(lo, hi, T, 1 << b, SOFTMAX_RECIPROCAL_TARGET / 255 / r_unit,
                                                           steps))
    return e, r


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.too_slow],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])  # a fit takes seconds: report the failure unshrunk
@given(step=st.floats(0.01, 0.3), N=st.integers(2, 24), seed=st.integers(0, 2**16))
@example(step=0.05, N=64, seed=1)  # the longest row whose exponential keeps the unit 1 / (255 x 256)
def test_softmax_fit_within_its_stated_worst_case(step, N, seed) -> None:
    """The softmax stages fitted as the lowering fits them (exp of d = 0..T, reciprocal of every row sum): the exact
    worst case is within a quarter of an output step (1/255); on random rows (some with every element at the max,
    some with one far ahead), ``e^ r^`` is within it of the float64 softmax, the stated mean is what the rows show,
    and the row max / gap / row sum synapses compute the levels the fits assume (run on the IR by numba)."""
    T = 255
    net = Network(T)
    net.add("input", Encode((1, 1, N), 1.0, 0, T), [])
    zero = np.zeros((1, 1, N), dtype=np.int64)
    net.add("c", Neuron(np.full((1, 1, N), T), zero, zero, T), ["input"])
    net.add("max", SpikeMaxPool((1, N), (1, N)), ["c"])
    net.add("max_col", Reshape((1, 1)), ["max"])
    net.add("spread", DenseSynapse(np.ones((N, 1), dtype=np.int8)), ["max_col"])
    net.add("flat", Reshape((1, N)), ["c"])
    net.add("minus", DiagonalSynapse(np.full((1, N), -1, dtype=np.int8)), ["flat"])
    net.add("gap", Add(), ["spread", "minus"])
    e, r = _softmax_stages(net, T, N, step, "gap")
    worst, mean = softmax_error(e, r, N, step)
    assert 0 < mean <= worst <= MBE_TARGET_LEVELS / 255
    rng = np.random.default_rng(seed)
    c = rng.integers(0, T + 1, (64, N))
    c[:8] = c[:8, :1]  # ties: every element at the row max
    c[8:16, 1:] = rng.integers(0, 8, (8, N - 1))  # one element far ahead of the others
    c[8:16, 0] = T
    readouts = [net.add(f"read{k}", DiagonalSynapse(np.ones((1, N), dtype=np.int8)), [d]) for k, d in enumerate(e.nodes)]
    readouts += [net.add(f"read_r{k}", DenseSynapse(np.ones((N, 1), dtype=np.int8)), [d]) for k, d in enumerate(r.nodes)]
    net.add("all", Add(), readouts)
    net.add("all_flat", Reshape((N,)), ["all"])
    net.add("readout", Readout(np.ones(N), np.zeros(N)), ["all_flat"])
    nb = NumbaBackend().run(net, c.reshape(64, 1, 1, N).astype(np.float32), keep_trains=False)
    d_levels = c.max(axis=1, keepdims=True) - c
    digits = [nb.counts[k].reshape(64, N) for k in e.nodes]
    assert np.array_equal(sum(p * k for p, k in zip(e.places, digits)), e.readout[d_levels])
    q = e.readout[d_levels].sum(axis=1)
    rec = sum(p * nb.counts[k].reshape(64) for p, k in zip(r.places, r.nodes))
    assert np.array_equal(rec, r.readout[q - r.lo])
    r_digits = [nb.counts[k].reshape(64, 1) for k in r.nodes]
    product = sum(e.places[k] * r.places[m] * digits[k] * r_digits[m] for k, m in softmax_pairs(e, r))
    assert np.array_equal(product, softmax_product(e, r, d_levels, q[:, None]))
    exact = np.exp(-step * d_levels)
    exact /= exact.sum(axis=1, keepdims=True)
    assert np.abs(e.unit * r.unit * product - exact).max() <= worst


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(T=st.sampled_from([7, 15]), step=st.floats(0.02, 1.0), N=st.integers(2, 5), start=st.sampled_from([0.0, 1.0]))
@example(T=15, step=0.3, N=5, start=0.0)
def test_softmax_worst_case_is_the_largest_error_of_any_row(T, step, N, start) -> None:
    """Exactness of the stated worst case (the dynamic program up to a limit, bounded above it and the limit doubled
    while the bound may exceed what it found; ``start`` 0: from a limit of 1, so that the bound decides): on a small
    window it equals the largest error over **every** row of N counts in 0..T, enumerated."""
    import csdc.compiler.mbe_readout as readout

    net = Network(T)
    net.add("input", Encode((N,), 1.0, 0, T), [])
    e, r = _softmax_stages(net, T, N, step, "input")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(readout, "SOFTMAX_DP_START", start)
        worst, _ = readout._softmax_error(e, r, N, step)  # uncached: the analysis with this start
    c = np.stack(np.meshgrid(*[np.arange(T + 1)] * N, indexing="ij"), axis=-1).reshape(-1, N)
    d = c.max(axis=1, keepdims=True) - c
    exact = np.exp(-step * d)
    exact /= exact.sum(axis=1, keepdims=True)
    q = e.readout[d].sum(axis=1, keepdims=True)
    every_row = np.abs(e.unit * r.unit * softmax_product(e, r, d, q) - exact).max()
    assert worst == pytest.approx(every_row, rel=1e-9, abs=1e-15)


def test_sum_ranges_up_to_a_limit_is_the_full_table_there() -> None:
    rng = np.random.default_rng(3)
    readout = np.sort(rng.integers(0, 40, 12))
    values = rng.random(12)
    full = sum_ranges(readout, values, 5)
    for limit in (0, 17, 90, 5 * readout.max(), 10**6):
        part = sum_ranges(readout, values, 5, limit)
        assert len(part[0]) == min(limit, 5 * readout.max()) + 1
        assert np.array_equal(part[0], full[0][:len(part[0])]) and np.array_equal(part[1], full[1][:len(part[1])])


def test_uint4_model_uses_a_radix_that_fits_its_window(tmp_path: Path) -> None:
    """uint4 activations (T = 15): digits of radix 16 (a lower digit counts at most 15 = T), still top-1 equal to
    onnxruntime."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from softmax_models import softmax_qdq_model

    path = softmax_qdq_model(tmp_path, bits=4)
    net, rep = compile_onnx(path, CompileOptions(nonlinear="mbe"))
    (a,) = rep.approximations
    assert net.T == 15 and a["stages"]["exp"]["places"] == [16, 1] and a["stages"]["reciprocal"]["places"] == [16, 1]
    x = _digits_x()
    res = NumbaBackend().run(net, x, keep_trains=False)
    assert np.mean(res.logits.argmax(1) == onnx_logits(path, x).argmax(1)) >= 0.99
