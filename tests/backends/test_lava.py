"""The Lava backend: the Python 3.11 import hook, the global-clock plan, spike-for-spike
equality with ``run_steps`` and the numba backend (hand-built networks covering every IR op,
D = T and D < T, random networks, the digits CNN), and the deployment bundle run in a fresh
Lava environment.

lava-nc must be importable: without it this module fails at collection, loudly. Set
``CSDC_ALLOW_NO_LAVA=1`` to skip it instead (with the reason in the summary).
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.lava

try:
    from csdc.backends.lava.compat import import_lava

    import_lava()
except ImportError as exc:  # LavaUnavailableError is an ImportError
    if os.environ.get("CSDC_ALLOW_NO_LAVA") == "1":
        pytest.skip(f"LAVA BACKEND NOT TESTED: lava-nc is not usable ({exc}); skipped because CSDC_ALLOW_NO_LAVA=1",
                    allow_module_level=True)
    raise ImportError(
        f"the Lava backend tests need lava-nc, which is not usable here: {exc}\n"
        "Install it (see docs/lava.md) or set CSDC_ALLOW_NO_LAVA=1 to skip these tests explicitly.") from exc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csdc.backends.base import get_backend
from csdc.backends.lava import _hook, compat
from csdc.backends.lava.backend import LavaBackend, build_process_graph
from csdc.backends.lava.builder import run_graph
from csdc.backends.lava.export import export_bundle
from csdc.backends.lava.plan import hardware_report, linear_matrix, make_plan
from csdc.backends.lava.processes import pack_uint, unpack_uint
from csdc.backends.numba import NumbaBackend
from csdc.ir import (
    Add,
    ConvSynapse,
    DenseSynapse,
    DiagonalSynapse,
    Encode,
    Network,
    Neuron,
    Readout,
    Reshape,
    SpikeMatMul,
    SpikeMaxPool,
    SumPool,
    TernaryNeuron,
    Transpose,
)
from csdc.ir.semantics import _linear, run_steps

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/ holds the shared strategies
from strategies import inputs_for, networks

REPO = Path(__file__).resolve().parents[2]
BACKEND = LavaBackend()


def assert_same(ref, got, *, trains: bool = True) -> None:
    """Readouts, logits, counts (and spike trains) identical, integers compared with ==."""
    assert got.readout.dtype == np.int64
    assert np.array_equal(got.readout, ref.readout)
    assert np.array_equal(got.logits, ref.logits)
    assert got.counts.keys() == ref.counts.keys()
    for name in ref.counts:
        assert np.array_equal(got.counts[name], ref.counts[name]), name
        if trains:
            assert got.trains[name].shape == ref.trains[name].shape, name
            assert np.array_equal(got.trains[name], ref.trains[name]), name


def neuron(shape: tuple[int, ...], threshold: int, delay: int, v0: int = 0, bias: int = 0, rng=None) -> Neuron:
    if rng is None:
        return Neuron(np.full(shape, threshold), np.full(shape, v0), np.full(shape, bias), delay)
    th = rng.integers(1, threshold + 1, size=shape)
    return Neuron(th, rng.integers(-2, th + 1), rng.integers(-2, 3, size=shape), delay)


def every_op_net(T: int, D: int, seed: int = 0) -> Network:
    """Encode -> conv (current input, asymmetric padding) -> DIF -> max-pool -> conv (groups,
    dilation, symmetric padding) + diagonal residual -> DIF -> sum-pool -> DIF -> transpose ->
    reshape -> dense on tokens (N-D) -> DIF -> flatten -> dense + skip dense -> readout."""
    rng = np.random.default_rng(seed)
    net = Network(T)
    net.add("x", Encode((2, 6, 6), 0.25, -1, 6))
    net.add("c1", ConvSynapse(rng.integers(-3, 5, (4, 2, 3, 3)), (1, 1), (1, 0, 1, 2)), ["x"])
    net.add("n1", neuron((4, 6, 6), 8, D, rng=rng), ["c1"])
    net.add("p1", SpikeMaxPool((2, 2), (2, 2), (0, 0, 0, 0)), ["n1"])
    net.add("c2", ConvSynapse(rng.integers(-3, 5, (4, 2, 3, 3)), (1, 1), (2, 2, 2, 2), (2, 2), 2), ["p1"])
    net.add("r2", DiagonalSynapse(rng.integers(-2, 4, (4, 3, 3))), ["p1"])
    net.add("a2", Add(), ["c2", "r2"])
    net.add("n2", neuron((4, 3, 3), 4, D, rng=rng), ["a2"])
    net.add("s3", SumPool((2, 2), (1, 2), (1, 0, 0, 0)), ["n2"])
    net.add("n3", neuron((4, 3, 1), 3, D, rng=rng), ["s3"])
    net.add("t3", Transpose((1, 2, 0)), ["n3"])
    net.add("tok", Reshape((3, 4)), ["t3"])
    net.add("d4", DenseSynapse(rng.integers(-3, 5, (5, 4))), ["tok"])
    net.add("n4", neuron((3, 5), 4, D, rng=rng), ["d4"])
    net.add("f4", Reshape((15,)), ["n4"])
    net.add("d5", DenseSynapse(rng.integers(-3, 4, (3, 15))), ["f4"])
    net.add("f1", Reshape((144,)), ["n1"])
    net.add("d6", DenseSynapse(rng.integers(-2, 3, (3, 144))), ["f1"])
    net.add("a5", Add(), ["d5", "d6"])
    net.add("out", Readout(np.array([0.5, -1.0, 2.0]), np.array([0.1, 0.0, -0.3])), ["a5"])
    net.verify()
    return net


def batch_for(net: Network, n: int, seed: int) -> np.ndarray:
    return inputs_for(net, n, seed)


# -- the Python 3.11 import hook ------------------------------------------------------------
HOOK_SAMPLE = '''
from dataclasses import dataclass

@dataclass
class Inner:
    a: int = 0

@dataclass(frozen=True)
class Frozen:
    a: int = 0

class Plain:
    pass

@dataclass
class Outer:
    x: Inner = Inner()
    y: Inner = Inner(a=3)
    f: Frozen = Frozen()
    n: int = 4

class NotADataclass:
    z: Inner = Inner()
'''


def test_rewrite_only_mutable_dataclass_defaults() -> None:
    tree, rewritten = compat.rewrite_mutable_defaults(HOOK_SAMPLE, "<sample>")
    assert rewritten == ["Outer.x", "Outer.y"]  # frozen (hashable) defaults, ints and non-dataclasses untouched
    ns: dict = {}
    exec(compile(tree, "<sample>", "exec"), ns)  # noqa: S102  (our own test source)
    a, b = ns["Outer"](), ns["Outer"]()
    assert a.x == ns["Inner"]() and a.x is not b.x and a.y.a == 3 and a.n == 4
    assert isinstance(ns["NotADataclass"].z, ns["Inner"])
    with pytest.raises(ValueError, match="mutable default"):  # what Python 3.11 does without the hook
        exec(compile(HOOK_SAMPLE, "<sample>", "exec"), {})  # noqa: S102
    clean = "from dataclasses import dataclass\n@dataclass\nclass A:\n    a: int = 1\n"
    assert compat.rewrite_mutable_defaults(clean, "<clean>")[1] == []


def test_hook_claims_only_var_model() -> None:
    finder = _hook.LavaCompatFinder()
    for name in ("lava", "lava.magma.compiler.compiler", "lava.proc.dense.models", "json", "numpy"):
        assert finder.find_spec(name, None) is None
    var_model = sys.modules[compat.TARGET_MODULE]
    assert isinstance(var_model.__spec__.loader, _hook._PatchedVarModelLoader)
    assert sorted(_hook._PatchedVarModelLoader.rewritten) == sorted(
        ["CoreEncoder.x", "CoreEncoder.y", "CoreEncoder.p", "ChipEncoder.x", "ChipEncoder.y", "ChipEncoder.z",
         "AxonEncoder.hi", "AxonEncoder.lo"])
    assert var_model.CoreEncoder().x is not var_model.CoreEncoder().x
    for name, mod in list(sys.modules.items()):
        if name.startswith("lava.") and name != compat.TARGET_MODULE and getattr(mod, "__spec__", None):
            assert not isinstance(mod.__spec__.loader, _hook._PatchedVarModelLoader), name
    # the installed file is untouched
    assert "x: ByteEncoder = ByteEncoder()" in Path(var_model.__file__).read_text()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="the dataclass check that breaks lava 0.10 is new in 3.11")
def test_lava_needs_the_hook_and_imports_with_it() -> None:
    bare = subprocess.run([sys.executable, "-c", "import lava.magma.compiler.var_model"], capture_output=True, text=True,
                          check=False)
    assert bare.returncode != 0 and "mutable default" in bare.stderr
    code = ("import csdc.backends.lava as L; L.import_lava(); "
            "from lava.magma.core.run_configs import Loihi2SimCfg; print('ok')")
    ok = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr


def test_every_lava_module_imports() -> None:
    """All of lava-nc 0.10 (not only what csdc uses) imports on this Python / numpy / asteval."""
    code = """
import importlib, pathlib, warnings
warnings.simplefilter("ignore")
import csdc.backends.lava as L
L.import_lava()
import lava
root = pathlib.Path(next(iter(lava.__path__)))  # a namespace package: no __file__
names = sorted(".".join(("lava",) + p.relative_to(root).with_suffix("").parts) for p in root.rglob("*.py"))
names = [n[: -len(".__init__")] if n.endswith(".__init__") else n for n in names]
bad = []
for n in names:
    try:
        importlib.import_module(n)
    except Exception as exc:
        bad.append(f"{n}: {type(exc).__name__}: {exc}")
print(len(names), "modules;", "\\n".join(bad) or "all imported")
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 0 and res.stdout.strip().endswith("all imported"), res.stdout + res.stderr


def test_import_after_multiprocessing_was_used_and_with_another_start_method() -> None:
    """Lava fixes the 'fork' start method at import: that must work after a multiprocessing
    object (a Queue, a tqdm bar) fixed 'fork' already, and fail clearly for 'spawn'."""
    after_queue = ("import multiprocessing as mp; q = mp.Queue(); import csdc.backends.lava as L; L.import_lava(); "
                   "assert mp.set_start_method.__module__ == 'multiprocessing.context'; print('ok')")
    ok = subprocess.run([sys.executable, "-c", after_queue], capture_output=True, text=True, check=False)
    assert ok.returncode == 0 and ok.stdout.strip() == "ok", ok.stderr
    spawn = "import multiprocessing as mp; mp.set_start_method('spawn'); import csdc.backends.lava as L; L.import_lava()"
    bad = subprocess.run([sys.executable, "-c", spawn], capture_output=True, text=True, check=False)
    assert bad.returncode != 0 and "needs the 'fork' multiprocessing start method" in bad.stderr


def test_registry_gives_the_lava_backend() -> None:
    assert get_backend("lava").name == "lava"


# -- plan and schedule ----------------------------------------------------------------------
def test_every_ir_op_is_mapped() -> None:
    from csdc.backends.lava.plan import LOWERINGS
    from csdc.ir.ops import OP_REGISTRY

    assert set(OP_REGISTRY.values()) == set(LOWERINGS)


def test_pack_roundtrip() -> None:
    rng = np.random.default_rng(1)
    for bits in (1, 3, 4, 7):
        v = rng.integers(0, 2**bits, size=1001)
        words = pack_uint(v, bits).astype(np.float64)  # what Var.get() returns
        assert np.array_equal(unpack_uint(words, bits, v.size), v)


@pytest.mark.parametrize("node", ["c1", "c2", "r2", "s3", "d4", "d5"])
def test_linear_matrix_matches_semantics(node: str) -> None:
    net = every_op_net(3, 3)
    src = net.inputs(node)[0]
    x = np.random.default_rng(2).integers(-3, 4, size=(2, *net.info(src).shape))
    m = linear_matrix(net.op(node), net.info(src).shape, net.info(node).shape)
    got = (m @ x.reshape(2, -1).T).T.reshape(2, *net.info(node).shape)
    assert np.array_equal(got, _linear(net.op(node), x))


def test_offsets_delay_balancing_and_latency() -> None:
    T, D = 4, 2
    net = Network(T)
    net.add("x", Encode((3,), 1.0, 0, 3))
    net.add("n1", neuron((3,), 2, D), ["x"])
    net.add("d1", DenseSynapse(np.eye(3, dtype=int)), ["n1"])
    net.add("n2", neuron((3,), 2, D), ["d1"])
    net.add("d2", DenseSynapse(np.eye(3, dtype=int)), ["n2"])
    net.add("skip", DiagonalSynapse(np.ones(3, dtype=int)), ["n1"])
    net.add("a", Add(), ["d2", "skip", "x"])
    net.add("n3", neuron((3,), 2, D), ["a"])
    net.add("d3", DenseSynapse(np.ones((2, 3), dtype=int)), ["n3"])
    net.add("out", Readout(np.ones(2), np.zeros(2)), ["d3"])
    plan = make_plan(net, 1)
    off = plan.meta["offsets"]
    # encode 1; neuron +D; synapse +1 (Lava's t-1 buffer); Add = latest branch
    assert off == {"x": 1, "n1": 3, "d1": 4, "n2": 6, "d2": 7, "skip": 4, "a": 7, "n3": 9, "d3": 10, "out": 10}
    assert plan.meta["latency"] == 10 - 1 + T
    assert plan.meta["period"] == T + D
    delays = {p["name"]: p["params"]["steps"] for p in plan.processes if p["kind"] == "delay"}
    assert delays == {"skip__delay3": 3, "x__delay6": 6}
    assert BACKEND.latency(net) == 13
    x = np.array([[0.0, 1.0, 3.0], [2.0, 2.0, 0.0], [3.0, 0.0, 1.0]], dtype=np.float32)
    assert_same(run_steps(net, x), BACKEND.run(net, x, keep_trains=True))


def test_synapse_mapping_and_fallbacks() -> None:
    """Lava's Dense/Sparse where exact (weights mant * 2**e, mant in [-256, 255]), the exact
    custom synapse otherwise; results identical either way."""
    T = 3
    net = Network(T)
    net.add("x", Encode((4,), 1.0, -2, 5))
    net.add("big", DenseSynapse(np.array([[1000, -3, 0, 7]] * 4)), ["x"])  # not mant * 2**e
    net.add("n1", neuron((4,), 500, T), ["big"])
    net.add("shift", DenseSynapse(np.array([[512, -1024, 256, 0]] * 3)), ["n1"])  # 2**e multiples
    net.add("n2", neuron((3,), 300, 1), ["shift"])
    net.add("d", DenseSynapse(np.array([[1, -1, 255]])), ["n2"])
    net.add("out", Readout(np.ones(1), np.zeros(1)), ["d"])
    plan = make_plan(net)
    impl = {p["name"]: p["impl"] for p in plan.processes if p["kind"] == "synapse"}
    assert impl == {"big": "custom", "shift": "lava.Dense", "d": "lava.Dense"}
    assert plan.process("shift")["params"]["weight_exp"] == 2  # 512 = 128 << 2, -1024 = -256 << 2
    x = np.array([[5, 5, -2, 4], [1, 0, 2, 3]], dtype=np.float32)
    assert_same(run_steps(net, x), BACKEND.run(net, x, keep_trains=True))
    rows = {r["process"]: r for r in hardware_report(net, plan)}
    assert rows["n1"]["loihi2"].startswith("custom neuron microcode")
    assert any("bits" in n for n in rows["big"]["notes"])


# -- spike-for-spike equality ---------------------------------------------------------------
@pytest.mark.parametrize("T,D", [(3, 3), (3, 0), (4, 2), (2, 4)])
def test_every_op_equals_run_steps(T: int, D: int) -> None:
    net = every_op_net(T, D, seed=T * 10 + D)
    x = batch_for(net, 3, seed=D)
    res = BACKEND.run(net, x, keep_trains=True)
    assert_same(run_steps(net, x), res)
    kinds = {p["impl"] for p in BACKEND.last_plan.processes}
    assert {"lava.Dense", "lava.Sparse", "custom"} <= kinds
    assert any(p["kind"] == "delay" for p in BACKEND.last_plan.processes)  # the skip / residual were balanced


def attention_net(T: int, D: int, seed: int = 0) -> Network:
    """Tokens -> DIF S -> dense -> DIF Q; A = DIF(Q S^T) (S delayed to meet Q), O = DIF(A S)
    (TDEC SpikeMatMul, negative weight too) -> flatten -> dense -> readout."""
    rng = np.random.default_rng(seed)
    net = Network(T)
    net.add("x", Encode((4, 3), 0.5, 0, 5))
    net.add("s", neuron((4, 3), 3, D, rng=rng), ["x"])
    net.add("wq", DenseSynapse(rng.integers(-2, 4, (3, 3))), ["s"])
    net.add("q", neuron((4, 3), 3, D, rng=rng), ["wq"])
    net.add("st", Transpose((1, 0)), ["s"])
    net.add("qk", SpikeMatMul(2), ["q", "st"])
    net.add("a", neuron((4, 4), 6, D, rng=rng), ["qk"])
    net.add("av", SpikeMatMul(-1), ["a", "s"])
    net.add("res", DiagonalSynapse(np.full((4, 3), 3)), ["s"])
    net.add("sum", Add(), ["av", "res"])
    net.add("o", neuron((4, 3), 4, D, rng=rng), ["sum"])
    net.add("f", Reshape((12,)), ["o"])
    net.add("head", DenseSynapse(rng.integers(-2, 3, (2, 12))), ["f"])
    net.add("out", Readout(np.array([1.0, 0.5]), np.zeros(2)), ["head"])
    net.verify()
    return net


@pytest.mark.parametrize("T,D", [(3, 3), (4, 1)])
def test_spike_matmul_equals_run_steps(T: int, D: int) -> None:
    net = attention_net(T, D, seed=T + D)
    x = batch_for(net, 3, seed=T)
    res = BACKEND.run(net, x, keep_trains=True)
    assert_same(run_steps(net, x), res)
    off = BACKEND.last_plan.meta["offsets"]
    assert off["qk"] == off["q"] + 1 and off["av"] == off["a"] + 1
    delays = {p["name"] for p in BACKEND.last_plan.processes if p["kind"] == "delay"}
    assert f"s__delay{off['q'] - off['s']}" in delays  # S waits for Q
    assert {p["dst_port"] for p in BACKEND.last_plan.connections if p["dst"] == "qk"} == {"a_in", "b_in"}
    ref = NumbaBackend().run(net, x)
    assert res.stats["qk"].acs == ref.stats["qk"].acs and res.stats["av"].acs == ref.stats["av"].acs


def signed_attention_net(T: int, D: int, seed: int = 0) -> Network:
    """A²OS²A-style attention: binary Q, ternary K and V (signed spikes), ``A = DIF(Q K^T)`` and
    ``O = ternary(A V)`` (TDEC products with signed operands), a ternary residual through a
    diagonal synapse, and a dense head, conv and sum-pool fed by ternary spikes."""
    rng = np.random.default_rng(seed)

    def ternary(shape: tuple[int, ...], threshold: int) -> TernaryNeuron:
        th = rng.integers(1, threshold + 1, size=shape)
        return TernaryNeuron(th, th // 2, rng.integers(-2, 3, size=shape), D)

    net = Network(T)
    net.add("x", Encode((4, 3), 0.5, -4, 5))
    net.add("s", ternary((4, 3), 3), ["x"])
    net.add("wq", DenseSynapse(rng.integers(-2, 4, (3, 3))), ["s"])
    net.add("q", neuron((4, 3), 3, D, rng=rng), ["wq"])
    net.add("wk", DenseSynapse(rng.integers(-3, 3, (3, 3))), ["s"])
    net.add("k", ternary((4, 3), 3), ["wk"])
    net.add("kt", Transpose((1, 0)), ["k"])
    net.add("qk", SpikeMatMul(2), ["q", "kt"])
    net.add("a", neuron((4, 4), 6, D, rng=rng), ["qk"])
    net.add("av", SpikeMatMul(-1), ["a", "s"])
    net.add("res", DiagonalSynapse(np.full((4, 3), 3)), ["s"])
    net.add("sum", Add(), ["av", "res"])
    net.add("o", ternary((4, 3), 4), ["sum"])
    net.add("img", Reshape((1, 4, 3)), ["o"])
    net.add("conv", ConvSynapse(rng.integers(-2, 3, (2, 1, 2, 2)), (1, 1), (1, 0, 0, 1)), ["img"])
    net.add("c", ternary((2, 4, 3), 3), ["conv"])
    net.add("pool", SumPool((2, 2), (2, 1)), ["c"])
    net.add("pf", Reshape((8,)), ["pool"])
    net.add("f", Reshape((12,)), ["o"])
    net.add("head", DenseSynapse(rng.integers(-2, 3, (2, 12))), ["f"])
    net.add("head2", DenseSynapse(rng.integers(-2, 3, (2, 8))), ["pf"])
    net.add("logits", Add(), ["head", "head2"])
    net.add("out", Readout(np.array([1.0, 0.5]), np.zeros(2)), ["logits"])
    net.verify()
    return net


@pytest.mark.parametrize("T,D", [(3, 3), (4, 1), (3, 0)])
def test_ternary_neurons_and_signed_products_equal_run_steps(T: int, D: int) -> None:
    """Signed spikes under Loihi2SimCfg(select_tag="fixed_pt"): trains (-1/0/+1) and signed counts
    equal the semantics, spikes of both signs and the ACs they cause equal numba's."""
    net = signed_attention_net(T, D, seed=T + 7 * D)
    x = batch_for(net, 3, seed=T)
    res = BACKEND.run(net, x, keep_trains=True)
    ref = run_steps(net, x)
    assert_same(ref, res)
    assert any((ref.trains[n] < 0).any() for n in ("s", "k", "o", "c"))  # signed spikes occurred
    kinds = {p["ir_node"]: p["kind"] for p in BACKEND.last_plan.processes}
    assert {kinds[n] for n in ("s", "k", "o", "c")} == {"ternary"} and kinds["q"] == "neuron"
    msg = {p["name"]: p["params"].get("num_message_bits") for p in BACKEND.last_plan.processes if p["kind"] == "synapse"}
    assert msg["wq"] == msg["res"] == msg["head"] == 2  # graded spikes carrying a sign
    fast = NumbaBackend().run(net, x)
    for name, st_ in fast.stats.items():
        assert (res.stats[name].spikes, res.stats[name].acs, res.stats[name].max_abs_v) == (
            st_.spikes, st_.acs, st_.max_abs_v), name
    assert res.stats["s"].spikes == int(np.abs(ref.trains["s"]).sum())
    rows = {r["process"]: r for r in hardware_report(net, BACKEND.last_plan)}
    assert rows["k"]["lava"] == "CsdcTernaryNeuron" and "ternary DIF" in rows["k"]["loihi2"]


def test_lava_conv_process_and_all_custom_give_the_same() -> None:
    net = every_op_net(3, 1, seed=5)
    x = batch_for(net, 2, seed=5)
    ref = run_steps(net, x)
    conv = LavaBackend(conv="lava.Conv")
    assert_same(ref, conv.run(net, x, keep_trains=True))
    # c2 has symmetric padding: Lava's Conv process; c1's asymmetric padding falls back to Sparse
    impl = {p["name"]: p["impl"] for p in conv.last_plan.processes}
    assert impl["c2"] == "lava.Conv" and impl["c1"] == "lava.Sparse"
    assert_same(ref, LavaBackend(use_lava_synapses=False).run(net, x, keep_trains=True))


def test_counts_without_trains_and_empty_batch() -> None:
    net = every_op_net(2, 2, seed=7)
    x = batch_for(net, 2, seed=1)
    res = BACKEND.run(net, x)
    assert res.trains == {}
    assert_same(run_steps(net, x), res, trains=False)
    empty = BACKEND.run(net, x[:0])
    assert empty.readout.shape == (0, 3)


def test_duplicate_route_is_relayed() -> None:
    """x + x through two identical reshapes: one OutPort -> InPort edge twice."""
    net = Network(2)
    net.add("x", Encode((2, 2), 1.0, 0, 3))
    net.add("n", neuron((2, 2), 2, 2), ["x"])
    net.add("d", DiagonalSynapse(np.array([[1, 2], [3, 1]])), ["n"])
    net.add("r1", Reshape((4,)), ["d"])
    net.add("r2", Reshape((4,)), ["d"])
    net.add("a", Add(), ["r1", "r2"])
    net.add("n2", neuron((4,), 2, 1), ["a"])
    net.add("o", DenseSynapse(np.ones((2, 4), dtype=int)), ["n2"])
    net.add("out", Readout(np.ones(2), np.zeros(2)), ["o"])
    x = np.array([[[1, 3], [2, 0]], [[3, 3], [1, 1]]], dtype=np.float32)
    assert_same(run_steps(net, x), BACKEND.run(net, x, keep_trains=True))


def test_build_process_graph_for_embedding() -> None:
    net = every_op_net(2, 1, seed=3)
    x = batch_for(net, 2, seed=3)
    graph = build_process_graph(net, x)
    assert graph.source is graph.processes["x"] and graph.sink is graph.processes["out"]
    assert type(graph.processes["n1"]).__name__ == "CsdcNeuron"
    assert type(graph.processes["d5"]).__name__ == "Dense"
    out = run_graph(graph)
    assert np.array_equal(out.readout, run_steps(net, x).readout)


# -- against the numba backend --------------------------------------------------------------
@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(net=networks(max_T=4), seed=st.integers(0, 2**16), conv=st.sampled_from(["lava.Sparse", "lava.Conv"]))
def test_random_networks_equal_numba(net: Network, seed: int, conv: str) -> None:
    """Random networks (every op kind, delays 0..T+2: D < T and D >= T) on both convolution
    mappings: Lava == numba spike for spike, readouts, logits and activity statistics."""
    x = inputs_for(net, 2, seed)
    ref = NumbaBackend().run(net, x, keep_trains=True)
    got = LavaBackend(conv=conv).run(net, x, keep_trains=True)
    assert_same(ref, got)
    for name, st_ in got.stats.items():
        if name in ref.stats:
            assert (st_.spikes, st_.neurons, st_.max_abs_v, st_.acs) == (
                ref.stats[name].spikes, ref.stats[name].neurons, ref.stats[name].max_abs_v, ref.stats[name].acs), name


def _digits_net(example: str = "digits_cnn"):
    model = REPO / "examples" / example / "model.onnx"
    if not model.exists():
        pytest.skip(f"{model} is not there")
    from csdc.compiler.pipeline import compile_onnx
    from csdc.runtime.datasets import load_digits_split

    net, _ = compile_onnx(model)
    x, y = load_digits_split("test")
    return net, x[:20], y[:20]


@pytest.mark.parametrize("delay", ["T", 3])
def test_digits_cnn_equals_numba(delay) -> None:
    net, x, _ = _digits_net()
    net = net.with_delay(net.T if delay == "T" else delay)
    ref = NumbaBackend().run(net, x, keep_trains=True)
    got = BACKEND.run(net, x, keep_trains=True)
    assert_same(ref, got)
    for name in ("spikes", "acs", "macs", "max_abs_v"):
        assert {k: getattr(s, name) for k, s in got.stats.items()} == {
            k: getattr(ref.stats[k], name) for k in got.stats}, name


@pytest.mark.parametrize("delay", ["T", 1])
def test_digits_csdformer_equals_numba(delay) -> None:
    """The spiking transformer (TDEC SpikeMatMul, residual sums, delay balancing) on Lava."""
    net, x, _ = _digits_net("digits_csdformer")
    net = net.with_delay(net.T if delay == "T" else delay)
    assert_same(NumbaBackend().run(net, x, keep_trains=True), BACKEND.run(net, x, keep_trains=True))


# -- deployment bundle ----------------------------------------------------------------------
def _fresh_lava_env(root: Path) -> Path:
    """A new venv (base interpreter, no csdc) whose site-packages holds only lava-nc and its
    dependency closure, linked from this environment (nothing is downloaded)."""
    env = root / "lava-env"
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(env)], check=True)
    site = Path(subprocess.run([str(env / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    here = Path(sysconfig.get_paths()["purelib"])
    todo, seen = ["lava-nc"], set()
    while todo:
        name = todo.pop()
        dist = importlib.metadata.distribution(name)
        key = dist.metadata["Name"].lower()
        if key in seen:
            continue
        seen.add(key)
        for req in dist.requires or []:
            if "extra ==" not in req:
                todo.append(re.match(r"[A-Za-z0-9_.\-]+", req.strip()).group(0))
        for f in dist.files or []:
            top = Path(str(f)).parts[0]
            src = here / top
            if top != ".." and src.exists() and not (site / top).exists():
                (site / top).symlink_to(src)
    assert "csdc" not in seen
    return env / "bin" / "python"


def test_bundle_runs_in_fresh_lava_env(tmp_path: Path) -> None:
    net, x, _ = _digits_net()
    x = x[:4]
    bundle = export_bundle(net.with_delay(4), tmp_path / "deploy")
    assert {p.name for p in bundle.iterdir()} >= {"plan.json", "arrays.npz", "run_lava.py", "README.md", "manifest.json",
                                                  "csdc_lava_runtime"}
    for src in (bundle / "csdc_lava_runtime").glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+csdc\b", src.read_text(), re.MULTILINE), src  # no csdc import
    np.savez(tmp_path / "input.npz", x=x)
    py = _fresh_lava_env(tmp_path)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    assert subprocess.run([str(py), "-c", "import csdc"], capture_output=True, cwd=tmp_path, env=env,
                          check=False).returncode != 0
    run = subprocess.run([str(py), str(bundle / "run_lava.py"), str(tmp_path / "input.npz"), "-o", str(tmp_path / "out.npz")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    ref = BACKEND.run(net.with_delay(4), x)
    with np.load(tmp_path / "out.npz", allow_pickle=False) as z:
        assert np.array_equal(z["readout"], ref.readout)
        assert np.array_equal(z["logits"], ref.logits)
        for name, c in ref.counts.items():
            assert np.array_equal(z[f"counts/{name}"], c)
    # a tampered bundle is refused
    (bundle / "plan.json").write_text((bundle / "plan.json").read_text().replace('"T"', '"T" ', 1))
    bad = subprocess.run([str(py), str(bundle / "run_lava.py"), str(tmp_path / "input.npz"), "-o", str(tmp_path / "o2.npz")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300, check=False)
    assert bad.returncode != 0 and "SHA-256" in bad.stderr and not (tmp_path / "o2.npz").exists()


def test_bundle_runs_ternary_populations(tmp_path: Path) -> None:
    """A deployment bundle carries the ternary process: signed counts equal numba's."""
    net = signed_attention_net(3, 1, seed=4)
    x = batch_for(net, 3, seed=1)
    bundle = export_bundle(net, tmp_path / "deploy")
    np.savez(tmp_path / "input.npz", x=x)
    run = subprocess.run([sys.executable, str(bundle / "run_lava.py"), str(tmp_path / "input.npz"), "-o",
                          str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    ref = NumbaBackend().run(net, x)
    with np.load(tmp_path / "out.npz", allow_pickle=False) as z:
        assert np.array_equal(z["readout"], ref.readout)
        for name, c in ref.counts.items():
            assert np.array_equal(z[f"counts/{name}"], c), name
        assert (z["counts/o"] < 0).any()


def test_export_refuses_foreign_directory(tmp_path: Path) -> None:
    from csdc.errors import CsdcError

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CsdcError, match="not a csdc Lava bundle"):
        export_bundle(every_op_net(2, 2), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
