"""Two-word membranes on Lava: a DIF or ternary population whose membrane does not fit one 24-bit
Loihi 2 word runs as custom neuron microcode with two compartments (``V = hi * 2^s + lo``,
docs/lava.md), spike for spike like numba: the microcode itself against one-word processes (carries,
borrows, D = T, D < T, D = 0, ternary), the plan (which populations take two words, the coarse
copies of their synapses), random networks widened past 24 bits, the shipped digits models under
--profile generic and loihi2, and a word leaving its range reported by the process's name.

Needs the Lava environment like tests/backends/test_lava.py (``CSDC_ALLOW_NO_LAVA=1`` skips)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.lava

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the shared helpers of test_lava
from test_lava import BACKEND, REPO, assert_same, batch_for, every_op_net, in_lava_env, signed_attention_net

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from csdc.backends.lava import env as lava_env
from csdc.backends.lava.export import export_bundle
from csdc.backends.lava.plan import hardware_report, lava_network, linear_matrix, make_plan, membrane_layouts
from csdc.backends.numba import NumbaBackend
from csdc.compiler.bitwidth import current_bounds, membrane_words
from csdc.errors import CsdcError
from csdc.ir import ConvSynapse, DenseSynapse, DiagonalSynapse, Network, Neuron, SpikeMatMul
from csdc.ir.semantics import encode, run_steps

sys.path.insert(0, str(REPO / "tests"))
from strategies import inputs_for, networks

WORD = 24
WIDEN = 22  # bits added to every synapse exponent and neuron parameter by widened()


def widened(net: Network, shift: int = WIDEN, seed: int = 0) -> Network:
    """``net`` with every synapse's weight exponent and every SpikeMatMul weight raised by ``shift``
    bits, and every neuron's threshold, v0 and bias times ``2**shift`` plus random low bits: membranes
    far wider than 24 bits whose synaptic summands are multiples of ``2**shift`` (coarse), while the
    encoded input, sum-pools and MBE outputs (and the parameters' low bits) stay fine."""
    rng = np.random.default_rng(seed)
    out = Network(net.T, net.metadata)
    for name, op in net.nodes():
        if isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)):
            op = dataclasses.replace(op, exponent=op.exponent + shift)
        elif isinstance(op, SpikeMatMul):
            op = SpikeMatMul(op.weight << shift)
        elif isinstance(op, Neuron):
            wide = [(np.asarray(a, np.int64) << shift) + rng.integers(0, 1 << shift, size=a.shape)
                    for a in (op.threshold, op.v0, op.bias)]
            op = type(op)(*wide, op.delay)
        out.add(name, op, net.inputs(name))
    out.verify()
    return out


def two_word_procs(plan) -> dict[str, dict]:
    return {p["name"]: p for p in plan.processes if p["kind"] in ("neuron", "ternary") and p["params"].get("shift")}


def assert_planned_as_the_layouts_say(net: Network, plan) -> set[str]:
    """On the network the plan maps (``lava_network``: synapses cut at a shift where that makes two words
    fit), every population whose membrane_words is not None runs as a two-word process with that shift and
    those coarse summands (each from a copy of its process with weights divided by 2^shift); every other
    one as a one-word process. Returns the two-word populations."""
    net, words, refused = lava_network(net, WORD)
    bounds = current_bounds(net)
    procs = two_word_procs(plan)
    for name in net.neurons():
        if name in refused:
            assert name not in procs and plan.process(name)["params"]["two_words_refused"] == refused[name]
            continue
        layout = membrane_words(net, name, WORD, bounds)
        assert (layout is None) == (name not in procs), name
        if layout is None:
            assert "threshold" in plan.process(name)["arrays"]
            continue
        prm = procs[name]["params"]
        assert prm["shift"] == layout.shift and prm["coarse"] == list(layout.coarse)
        assert max(prm["widths"].values()) <= WORD == prm["word_bits"]
        feeding = {c["src"].split("__delay")[0] for c in plan.connections
                   if c["dst"] == name and c.get("dst_port") == "c_in"}
        assert feeding == {f"{leaf}__coarse{layout.shift}" for leaf in layout.coarse}
        for leaf in layout.coarse:
            copy = plan.process(f"{leaf}__coarse{layout.shift}")
            op = net.op(leaf)
            if copy["kind"] == "matmul":
                assert copy["params"]["weight"] << layout.shift == op.weight
            elif copy["impl"] == "custom":
                data = plan.arrays[copy["arrays"]["data"]]
                full = linear_matrix(op, net.info(net.inputs(leaf)[0]).shape, net.info(leaf).shape)
                assert np.array_equal(data << layout.shift, full.data)
    assert set(procs) == set(words)
    return set(procs)


# -- the microcode ----------------------------------------------------------------------------
MICROCODE = """
import json
import numpy as np
import scipy.sparse as sp
from csdc_lava_runtime import processes as P
from lava.magma.core.run_conditions import RunSteps
from lava.magma.core.run_configs import Loihi2SimCfg


def run(T, D, ternary, shift, seed):
    '''A one-word and a two-word population on the same currents: fine weights up to 2**(shift-2), coarse
    ones (in units of 2**shift) and thresholds, v0 and biases with random low words.'''
    rng = np.random.default_rng(seed)
    n, k, m = 3, 4, 6
    levels = rng.integers(-3, 4, size=(n, k))
    fine = rng.integers(-2**(shift - 2), 2**(shift - 2), size=(m, k))
    coarse = rng.integers(-40, 41, size=(m, k))
    theta = rng.integers(2**(shift + 4), 2**(shift + 6), size=m)
    v0 = rng.integers(-2**(shift + 2), 2**(shift + 3), size=m)
    bias = rng.integers(-2**(shift + 1), 2**(shift + 1), size=m)
    period = T + D
    common = dict(T=T, delay=D, start=2, period=period, n_samples=n, keep_trains=True)
    split = lambda a: (a >> shift, a & ((1 << shift) - 1))
    enc = P.CsdcEncode(levels=levels, T=T, period=period)
    one = (P.CsdcTernaryNeuron if ternary else P.CsdcNeuron)(threshold=theta, v0=v0, bias=bias, name="one", **common)
    two = (P.CsdcTwoWordTernaryNeuron if ternary else P.CsdcTwoWordNeuron)(
        threshold=split(theta), v0=split(v0), bias=split(bias), shift=shift, word_bits=24, name="two", **common)
    syn = [P.CsdcSynapse(matrix=sp.csr_matrix(w), in_shape=(k,), out_shape=(m,))
           for w in (fine + (coarse << shift), fine, coarse)]
    for s in syn:
        enc.a_out.connect(s.s_in)
    syn[0].a_out.connect(one.a_in)
    syn[1].a_out.connect(two.a_in)
    syn[2].a_out.connect(two.c_in)
    models = {**P.PROCESS_MODELS, **{p: P.PROCESS_MODELS[type(p)] for p in (enc, one, two, *syn)}}
    try:
        enc.run(condition=RunSteps(num_steps=(n - 1) * period + 1 + T + D), run_cfg=Loihi2SimCfg(
            select_tag="fixed_pt", exception_proc_model_map=models))
        bits = 2 if ternary else 1
        out = {name: (P.unpack_uint(p.trains_packed.get(), bits, n * T * m).tolist(), int(p.max_abs_v.get()[0]))
               for name, p in (("one", one), ("two", two))}
        out["overflow"] = P.word_overflow_message("two", 24, two.overflow.get())
    finally:
        enc.stop()
    return out


print(json.dumps([run(*case) for case in CASES]))
"""


def test_two_word_microcode_equals_the_one_word_neuron(small_bundle: Path) -> None:
    """The two-word DIF and ternary processes fire the one-word processes' trains on the same currents
    (fine currents of up to 2^(s-2) per input: carries and borrows every step), with the same largest
    |V|, and no word leaves 24 bits."""
    cases = [(4, 4, False, 20, 1), (4, 1, False, 20, 2), (3, 3, True, 18, 3), (4, 0, True, 21, 4), (2, 3, False, 12, 5)]
    res = in_lava_env(MICROCODE.replace("CASES", repr(cases)), bundle=small_bundle)
    assert res.returncode == 0, res.stderr
    for case, out in zip(cases, json.loads(res.stdout.strip().splitlines()[-1])):
        assert out["overflow"] is None, case
        assert out["one"] == out["two"], case
        trains = np.array(out["one"][0]) - (1 if case[2] else 0)
        assert (trains > 0).any() and (not case[2] or (trains < 0).any()), case  # spikes (of both signs) occurred


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    return export_bundle(every_op_net(2, 1, seed=3), tmp_path_factory.mktemp("bundle") / "deploy")


# -- the plan ---------------------------------------------------------------------------------
def test_wide_membranes_are_planned_in_two_words() -> None:
    """Widened past 24 bits, every population of the every-op network takes two words; a synapse read
    only by coarse compartments keeps no full-weight process; the hardware report names the microcode."""
    net = widened(every_op_net(3, 3))
    plan = make_plan(net, 2)
    two = assert_planned_as_the_layouts_say(net, plan)
    assert two == set(net.neurons())
    names = {p["name"] for p in plan.processes}
    assert "c2" not in names and f"c2__coarse{plan.process('n2')['params']['shift']}" in names
    rows = {r["process"]: r for r in hardware_report(net, plan)}
    assert rows["n2"]["lava"] == "CsdcTwoWordNeuron" and not any("membrane" in n for n in rows["n2"]["notes"])
    w = plan.process("n2")["params"]["widths"]
    shift = plan.process("n2")["params"]["shift"]
    assert (f"two-word membrane microcode (shift {shift}, coarse/fine compartments: high word {w['hi']} bits, "
            f"coarse accumulator {w['coarse']} bits, fine word {w['fine']} bits") in rows["n2"]["loihi2"]
    assert "feeding a coarse compartment" in rows[f"c2__coarse{shift}"]["loihi2"]
    one = make_plan(every_op_net(3, 3), 2)  # narrow membranes: one word, as before
    assert not two_word_procs(one) and {p["name"] for p in one.processes} >= set(every_op_net(3, 3).neurons())


# -- spike for spike ----------------------------------------------------------------------------
@pytest.mark.parametrize("T,D", [(3, 3), (4, 2), (3, 0)])
def test_widened_every_op_network_equals_run_steps(T: int, D: int) -> None:
    net = widened(every_op_net(T, D, seed=T * 10 + D), seed=D)
    x = batch_for(net, 3, seed=D)
    got = BACKEND.run(net, x, keep_trains=True)
    assert_same(run_steps(net, x), got)
    assert set(two_word_procs(BACKEND.last_plan)) == set(net.neurons())


@pytest.mark.parametrize("T,D", [(3, 3), (4, 1)])
def test_widened_signed_attention_equals_numba(T: int, D: int) -> None:
    """Ternary two-word populations, spike products feeding coarse compartments (weights divided by
    2^s), the encoded input and sum-pools feeding fine ones."""
    net = widened(signed_attention_net(T, D, seed=T + 7 * D), seed=T)
    x = batch_for(net, 3, seed=T)
    ref = NumbaBackend().run(net, x, keep_trains=True)
    got = BACKEND.run(net, x, keep_trains=True)
    assert_same(ref, got)
    two = assert_planned_as_the_layouts_say(net, BACKEND.last_plan)
    assert {"s", "k", "o", "c", "a"} <= two
    plan = BACKEND.last_plan
    assert plan.process(f"qk__coarse{plan.process('a')['params']['shift']}")["kind"] == "matmul"
    assert any((ref.trains[n] < 0).any() for n in ("s", "k", "o", "c"))
    assert {k: s.max_abs_v for k, s in got.stats.items()} == {k: ref.stats[k].max_abs_v for k in got.stats}


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=networks(max_T=4), seed=st.integers(0, 2**16))
def test_widened_random_networks_equal_numba(net: Network, seed: int) -> None:
    """Random networks (every op kind, D < T and D >= T) widened past 24 bits: Lava == numba spike for
    spike, with the populations two words hold in two-word processes."""
    wide = widened(net, seed=seed)
    plan = make_plan(wide, 2)
    assume(two_word_procs(plan))
    assert_planned_as_the_layouts_say(wide, plan)
    x = inputs_for(wide, 2, seed)
    assert_same(NumbaBackend().run(wide, x, keep_trains=True), BACKEND.run(wide, x, keep_trains=True))


def _compiled(example: str, profile: str) -> Network:
    model = REPO / "examples" / example / "model.onnx"
    if not model.exists():
        pytest.skip(f"{model} is not there")
    from csdc.compiler.pipeline import CompileOptions, compile_onnx

    return compile_onnx(model, CompileOptions(profile=profile))[0]


@pytest.mark.parametrize("profile", ["generic", "loihi2"])
@pytest.mark.parametrize("delay", ["T", 1])
def test_digits_csdformer_in_two_words_equals_numba(profile: str, delay) -> None:
    """The shipped digits CSDformer on Lava, 4 test images: spike trains identical to numba's on the
    generic compile, for both compiles, every population in two words (the residual stream's 31-38-bit
    membranes included). The generic compile's unsplit stream synapses, too wide for a 24-bit fine word,
    are cut at the shift by the plan (the loihi2 compile comes cut)."""
    from csdc.runtime.datasets import load_digits_split

    gen = _compiled("digits_csdformer", "generic")
    net = gen if profile == "generic" else _compiled("digits_csdformer", profile)
    D = net.T if delay == "T" else delay
    net, gen = net.with_delay(D), gen.with_delay(D)
    x = load_digits_split("test")[0][:4]
    ref = NumbaBackend().run(gen, x, keep_trains=True)
    assert_same(ref, BACKEND.run(net, x, keep_trains=True))
    two = assert_planned_as_the_layouts_say(net, BACKEND.last_plan)
    assert two == set(net.neurons())
    refused = membrane_layouts(net, WORD)[1]
    if profile == "loihi2":
        assert not refused and lava_network(net, WORD)[0] is net
    else:  # the stream populations: two words hold them only once their synapses are cut at the shift
        assert {"blocks/blocks.1/attn/q_in", "q_head"} <= set(refused)
        assert "q_head/QuantizeLinear_syn_part0" in {p["ir_node"] for p in BACKEND.last_plan.processes}
        rows = {r["process"]: r for r in hardware_report(net, BACKEND.last_plan)}
        assert rows["q_head"]["lava"] == "CsdcTwoWordNeuron" and not rows["q_head"]["notes"]


@pytest.mark.parametrize("delay", ["T", 1])
def test_compiled_signed_attention_under_loihi2_equals_generic_on_numba(tmp_path: Path, delay) -> None:
    """A QCDQ attention whose Q, K, V and A V quantizers become ternary populations: under --profile loihi2
    every population (the four ternary ones included) takes two words, and Lava's spike trains equal
    numba's on the generic compile."""
    import onnx

    from csdc.compiler.pipeline import CompileOptions, compile_onnx
    from csdc.ir.ops import TernaryNeuron
    from tests.compiler.onnx_build import signed_attention_model

    onnx.save(signed_attention_model(L=3), tmp_path / "m.onnx")
    gen, _ = compile_onnx(tmp_path / "m.onnx")
    net, _ = compile_onnx(tmp_path / "m.onnx", CompileOptions(profile="loihi2"))
    D = net.T if delay == "T" else delay
    gen, net = gen.with_delay(D), net.with_delay(D)
    x = (np.random.default_rng(5).integers(0, 17, (4, 1, 8, 8)) / 16).astype(np.float32)
    ref = NumbaBackend().run(gen, x, keep_trains=True)
    assert_same(ref, BACKEND.run(net, x, keep_trains=True))
    two = assert_planned_as_the_layouts_say(net, BACKEND.last_plan)
    ternary = {n for n in net.neurons() if isinstance(net.op(n), TernaryNeuron)}
    assert two == set(net.neurons()) and len(ternary) == 4
    assert {BACKEND.last_plan.process(n)["kind"] for n in ternary} == {"ternary"}
    assert sum(s.negative_spikes for s in ref.stats.values()) > 0


def test_digits_cnn_in_two_words_runs_the_two_word_processes(tmp_path: Path) -> None:
    """The digits CNN (31-bit membranes): its bundle builds CsdcTwoWordNeuron processes in the Lava
    environment and reproduces numba's counts."""
    from csdc.runtime.datasets import load_digits_split

    net = _compiled("digits_cnn", "loihi2")
    x = load_digits_split("test")[0][:3]
    bundle = export_bundle(net, tmp_path / "cnn")
    levels = encode(net.op(net.input_name), x).astype(np.int64)
    code = f"""
import json
import numpy as np
import run_lava
from csdc_lava_runtime import builder
plan, arrays = run_lava.load_bundle()
graph = builder.build_graph(plan, arrays, np.array({levels.tolist()}, dtype=np.int64))
out = builder.run_graph(graph)
print(json.dumps({{"kinds": {{n: type(p).__name__ for n, p in graph.processes.items()}},
                  "counts": {{k: v.tolist() for k, v in out.counts.items()}}}}))
"""
    res = in_lava_env(code, bundle=bundle)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert {got["kinds"][n] for n in net.neurons()} == {"CsdcTwoWordNeuron"}
    ref = NumbaBackend().run(net, x)
    for name, counts in ref.counts.items():
        assert np.array_equal(np.array(got["counts"][name]), counts), name


def test_a_word_leaving_its_range_stops_the_run_naming_the_process(tmp_path: Path) -> None:
    """A plan whose two-word layout is wrong (a bias high word that overflows hi within two steps) fails
    with the process's name and the word, not with wrong spikes."""
    net = widened(every_op_net(3, 3))
    plan = make_plan(net, 1)
    prm = plan.process("n2")
    plan.arrays[prm["arrays"]["bias_hi"]] = np.full_like(plan.arrays[prm["arrays"]["bias_hi"]], 2**22)
    bundle = export_bundle(net, tmp_path / "bad", plan, with_hardware_report=False)
    levels = encode(net.op(net.input_name), batch_for(net, 1, seed=0)).astype(np.int64)
    np.savez(tmp_path / "in.npz", levels=levels)
    with pytest.raises(CsdcError, match=r"process 'n2': the (high word hi|coarse accumulator .*) reached \d+ at global "
                                        r"step \d+, outside its 24-bit signed word"):
        lava_env.run_bundle(BACKEND.python, bundle, [str(tmp_path / "in.npz"), "-o", str(tmp_path / "out.npz")],
                            timeout=600)
