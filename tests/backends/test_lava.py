"""The Lava backend: the global-clock plan, spike-for-spike equality with ``run_steps`` and
the numba backend (hand-built networks covering every IR op, D = T and D < T, random
networks, both digits models), all run in the Lava environment through the deployment
bundle in a subprocess; the bundle run by hand there; the environment itself (no csdc in it,
lava-nc's own pins) and the Python 3.11 import hook.

The Lava environment must be usable (``csdc lava-env``): without it this module fails at
collection, loudly. Set ``CSDC_ALLOW_NO_LAVA=1`` to skip it instead (with the reason in the
summary).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.lava

from csdc.backends.lava import env as lava_env
from csdc.backends.lava.compat import LavaUnavailableError

try:
    LAVA = lava_env.require()
except LavaUnavailableError as exc:
    if os.environ.get("CSDC_ALLOW_NO_LAVA") == "1":
        pytest.skip(f"LAVA BACKEND NOT TESTED: {exc}; skipped because CSDC_ALLOW_NO_LAVA=1", allow_module_level=True)
    raise ImportError(f"the Lava backend tests need the Lava environment, which is not usable here: {exc}\n"
                      "Create it (`csdc lava-env`, see docs/lava.md) or set CSDC_ALLOW_NO_LAVA=1 to skip these tests "
                      "explicitly.") from exc

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from csdc.backends.base import get_backend
from csdc.backends.lava import compat
from csdc.backends.lava.backend import LavaBackend
from csdc.backends.lava.export import export_bundle
from csdc.backends.lava.plan import hardware_report, linear_matrix, make_plan
from csdc.backends.numba import NumbaBackend
from csdc.ir import (
    Add,
    ConvSynapse,
    DenseSynapse,
    DiagonalSynapse,
    Encode,
    MBENeuron,
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
from csdc.ir.semantics import _linear, encode, run_steps

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


def in_lava_env(code: str, *, bundle: Path | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``code`` with the Lava environment's Python (a bundle's folder first on sys.path)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    if bundle is not None:
        code = f"import sys; sys.path.insert(0, {str(bundle)!r})\n" + code
    return subprocess.run([LAVA.python, "-c", code], capture_output=True, text=True, check=False, timeout=timeout,
                          cwd=str(bundle) if bundle else tempfile.gettempdir(), env=env)


@pytest.fixture(scope="module")
def small_bundle(tmp_path_factory) -> Path:
    return export_bundle(every_op_net(2, 1, seed=3), tmp_path_factory.mktemp("bundle") / "deploy")


VAR_MODEL_FIELDS = ["CoreEncoder.x", "CoreEncoder.y", "CoreEncoder.p", "ChipEncoder.x", "ChipEncoder.y", "ChipEncoder.z",
                    "AxonEncoder.hi", "AxonEncoder.lo"]


def test_rewrite_of_lavas_own_var_model() -> None:
    """The rewrite finds exactly the 8 fields of the installed lava-nc 0.10.0 that 3.11 rejects."""
    res = in_lava_env("import lava; print(next(iter(lava.__path__)))")  # a namespace package: no code runs
    assert res.returncode == 0, res.stderr
    path = Path(res.stdout.strip()) / "magma" / "compiler" / "var_model.py"
    _, rewritten = compat.rewrite_mutable_defaults(path.read_text(), str(path))
    assert sorted(rewritten) == sorted(VAR_MODEL_FIELDS)


def test_lava_env_python_and_the_hook(small_bundle: Path) -> None:
    """On Python 3.10 lava imports as is and the bundle runtime installs no hook; on 3.11 (no
    3.10 found) the bare import fails and the runtime's hook claims only var_model, rewrites
    exactly its 8 fields and leaves the installed file untouched."""
    py311 = tuple(int(p) for p in LAVA.versions["python"].split(".")[:2]) >= (3, 11)
    assert LAVA.hook == py311
    bare = in_lava_env("import lava.magma.compiler.var_model; print('ok')")
    if py311:
        assert bare.returncode != 0 and "mutable default" in bare.stderr
    else:
        assert bare.returncode == 0 and bare.stdout.strip() == "ok", bare.stderr
    code = """
import json, sys
from pathlib import Path
from csdc_lava_runtime import _hook, builder
vm = sys.modules[_hook.TARGET_MODULE]
finder = _hook.LavaCompatFinder()
print(json.dumps({
    "finder_installed": any(isinstance(f, _hook.LavaCompatFinder) for f in sys.meta_path),
    "patched": isinstance(vm.__spec__.loader, _hook._PatchedVarModelLoader),
    "rewritten": _hook._PatchedVarModelLoader.rewritten,
    "others_patched": [n for n, m in sys.modules.items() if n.startswith("lava.") and n != _hook.TARGET_MODULE
                       and isinstance(getattr(getattr(m, "__spec__", None), "loader", None), _hook._PatchedVarModelLoader)],
    "claims": [n for n in ("lava", "lava.magma.compiler.compiler", "lava.proc.dense.models", "json", "numpy")
               if finder.find_spec(n, None) is not None],
    "fresh_defaults": vm.CoreEncoder().x is not vm.CoreEncoder().x,
    "file_untouched": "x: ByteEncoder = ByteEncoder()" in Path(vm.__file__).read_text(),
}))
"""
    res = in_lava_env(code, bundle=small_bundle)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["finder_installed"] == got["patched"] == py311
    assert sorted(got["rewritten"]) == (sorted(VAR_MODEL_FIELDS) if py311 else [])
    assert got["others_patched"] == [] and got["claims"] == []
    assert got["fresh_defaults"] == py311  # 3.10 shares the one default instance, as lava was written for
    assert got["file_untouched"]


def test_every_lava_module_imports(small_bundle: Path) -> None:
    """All of lava-nc 0.10 (not only what csdc uses) imports in the Lava environment, except
    lava.utils.plots, which needs matplotlib, a package lava-nc does not declare."""
    code = """
import importlib, pathlib, warnings
warnings.simplefilter("ignore")
from csdc_lava_runtime import _hook
_hook.prepare_lava()
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
    res = in_lava_env(code, bundle=small_bundle)
    assert res.returncode == 0 and res.stdout.strip().endswith(
        "lava.utils.plots: ModuleNotFoundError: No module named 'matplotlib'"), res.stdout + res.stderr


def test_runtime_imports_after_multiprocessing_was_used(small_bundle: Path) -> None:
    """Lava fixes the 'fork' start method at import: the bundle runtime must import after a
    multiprocessing object (a Queue, a progress bar) fixed 'fork' already."""
    code = ("import multiprocessing as mp; q = mp.Queue()\nfrom csdc_lava_runtime import builder\n"
            "assert mp.set_start_method.__module__ == 'multiprocessing.context'; print('ok')")
    res = in_lava_env(code, bundle=small_bundle)
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr


def test_registry_gives_the_lava_backend() -> None:
    assert get_backend("lava").name == "lava"


# -- plan and schedule ----------------------------------------------------------------------
def test_every_ir_op_is_mapped() -> None:
    from csdc.backends.lava.plan import LOWERINGS
    from csdc.ir.ops import OP_REGISTRY

    assert set(OP_REGISTRY.values()) == set(LOWERINGS)


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


@pytest.mark.parametrize(("T", "D"), [(4, 4), (3, 0)])
def test_mbe_populations_equal_run_steps_and_numba(T: int, D: int) -> None:
    """MBE populations (a successive-approximation basis and a random one; fed by spikes through a
    synapse and by the constant encoded input) under Loihi2SimCfg(select_tag="fixed_pt"): the
    neurons behind them fire the trains of the semantics; spikes, ACs and the largest |u| equal numba's."""
    rng = np.random.default_rng(T + D)
    net = Network(T)
    net.add("in", Encode((6,), 0.5, -4, 6))
    net.add("fc", DenseSynapse(rng.integers(-2, 4, size=(6, 6)).astype(np.int8)), ["in"])
    net.add("a", Neuron(np.full(6, 3), np.full(6, 1), np.zeros(6, np.int64), D), ["fc"])
    net.add("fc2", DenseSynapse(rng.integers(-2, 4, size=(6, 6)).astype(np.int8)), ["a"])
    steps = T
    sar = np.array([[8 >> t for t in range(steps)], list(rng.integers(1, 6, size=steps))])
    net.add("m", MBENeuron(sar, np.array([[8 >> t for t in range(steps)], list(rng.integers(0, 6, size=steps))]),
                           rng.integers(-3, 6, size=(2, steps)), np.array([4, -1]), rng.integers(-2, 3, size=6)),
            ["fc2"])
    net.add("b", Neuron(np.full(6, 4), np.full(6, 2), np.zeros(6, np.int64), D), ["m"])
    th = np.array([[4 >> t for t in range(min(steps, 3))]])
    net.add("m_in", MBENeuron(th, th, np.array([[3, -2, 1][:th.shape[1]]]), np.array([2]), np.zeros(6, np.int64)),
            ["in"])
    net.add("c", Neuron(np.full(6, 2), np.full(6, 1), np.zeros(6, np.int64), D), ["m_in"])
    net.add("hb", DenseSynapse(rng.integers(-2, 4, size=(3, 6)).astype(np.int8)), ["b"])
    net.add("hc", DenseSynapse(rng.integers(-2, 4, size=(3, 6)).astype(np.int8)), ["c"])
    net.add("sum", Add(), ["hb", "hc"])
    net.add("out", Readout(np.ones(3), np.zeros(3)), ["sum"])
    net.verify()
    x = batch_for(net, 4, seed=T)
    res = BACKEND.run(net, x, keep_trains=True)
    ref = run_steps(net, x)
    assert_same(ref, res)
    assert ref.mbe_spikes["m"].sum() > 0 and ref.mbe_spikes["m_in"].sum() > 0
    fast = NumbaBackend().run(net, x)
    for name in ("m", "m_in"):
        got, want = res.stats[name], fast.stats[name]
        assert (got.spikes, got.acs, got.neurons, got.max_abs_v) == (want.spikes, want.acs, want.neurons, want.max_abs_v)
        assert got.spikes == int(ref.mbe_spikes[name].sum())
    kinds = {p["ir_node"]: p["kind"] for p in BACKEND.last_plan.processes}
    assert kinds["m"] == kinds["m_in"] == "mbe"
    offsets = BACKEND.last_plan.meta["offsets"]
    assert offsets["m"] == offsets["fc2"] + T  # the whole window is integrated before the first encoding step
    rows = {r["process"]: r for r in hardware_report(net, BACKEND.last_plan)}
    assert rows["m"]["lava"] == "CsdcMBENeuron"


def test_compiled_gelu_network_equals_numba(tmp_path: Path) -> None:
    """A quantize_static model with GELU (4-bit activations, T = 15; tests/compiler/gelu_models.py) compiled
    with --nonlinear mbe: Lava == numba spike for spike, MBE statistics included."""
    sys.path.insert(0, str(REPO / "tests" / "compiler"))
    from gelu_models import gelu_qdq_models

    from csdc.compiler.pipeline import CompileOptions, compile_onnx
    from csdc.runtime.datasets import load_digits_split

    net, rep = compile_onnx(gelu_qdq_models(tmp_path)["20-uint4"], CompileOptions(nonlinear="mbe"))
    assert net.T == 15 and len(rep.approximations) == 1
    x = load_digits_split("test")[0][:6]
    ref = NumbaBackend().run(net, x, keep_trains=True)
    got = BACKEND.run(net, x, keep_trains=True)
    assert_same(ref, got)
    node = rep.approximations[0]["mbe_node"]
    assert got.stats[node].spikes == ref.stats[node].spikes > 0
    assert got.stats[node].max_abs_v == ref.stats[node].max_abs_v


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


def test_bundle_processes_for_embedding(small_bundle: Path) -> None:
    """A Lava application builds the bundle's process graph itself (source, every process,
    sink), runs it and gets run_steps' readout; the 48-bit packing of results round-trips."""
    net = every_op_net(2, 1, seed=3)
    x = batch_for(net, 2, seed=3)
    levels = encode(net.op(net.input_name), x).astype(np.int64)
    code = f"""
import json
import numpy as np
import run_lava
from csdc_lava_runtime import builder, processes
plan, arrays = run_lava.load_bundle()
graph = builder.build_graph(plan, arrays, np.array({levels.tolist()}, dtype=np.int64))
assert graph.source is graph.processes["x"] and graph.sink is graph.processes["out"]
kinds = {{n: type(p).__name__ for n, p in graph.processes.items()}}
out = builder.run_graph(graph)
rng = np.random.default_rng(1)
packing = True
for bits in (1, 3, 4, 7):
    v = rng.integers(0, 2**bits, size=1001)
    packing &= bool(np.array_equal(processes.unpack_uint(processes.pack_uint(v, bits).astype(np.float64), bits, v.size), v))
print(json.dumps({{"kinds": kinds, "readout": out.readout.tolist(), "packing": packing}}))
"""
    res = in_lava_env(code, bundle=small_bundle)
    assert res.returncode == 0, res.stderr
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["kinds"]["n1"] == "CsdcNeuron" and got["kinds"]["d5"] == "Dense"
    assert np.array_equal(np.array(got["readout"]), run_steps(net, x).readout)
    assert got["packing"]


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


@pytest.mark.parametrize("delay", ["T", 1])
def test_ternary_lowered_attention_equals_numba(tmp_path: Path, delay) -> None:
    """A QCDQ attention whose symmetric Q, K, V and A V quantizers the compiler lowers to ternary
    populations (signed SpikeMatMul operands on both sides): Lava == numba spike for spike."""
    import onnx

    from csdc.compiler.pipeline import compile_onnx
    from csdc.ir.ops import TernaryNeuron
    from tests.compiler.onnx_build import signed_attention_model

    onnx.save(signed_attention_model(L=3), tmp_path / "m.onnx")
    net, _ = compile_onnx(tmp_path / "m.onnx")
    assert sum(isinstance(net.op(n), TernaryNeuron) for n in net.neurons()) == 4
    net = net.with_delay(net.T if delay == "T" else delay)
    x = (np.random.default_rng(5).integers(0, 17, (6, 1, 8, 8)) / 16).astype(np.float32)
    ref = NumbaBackend().run(net, x, keep_trains=True)
    assert_same(ref, BACKEND.run(net, x, keep_trains=True))
    assert sum(s.negative_spikes for s in ref.stats.values()) > 0


@pytest.mark.parametrize("delay", ["T", 1])
def test_split_lowered_asymmetric_quantizer_equals_numba(tmp_path: Path, delay) -> None:
    """An asymmetric signed quantizer in the split form (a ternary population and its clip corrections, read by
    synapses with weights w, -w, +w): Lava == numba spike for spike."""
    from csdc.compiler.pipeline import compile_onnx
    from csdc.ir.ops import TernaryNeuron
    from tests.compiler.test_ternary_lowering import small_split_model

    small_split_model(tmp_path / "m.onnx")
    net, _ = compile_onnx(tmp_path / "m.onnx")
    assert sum(isinstance(net.op(n), TernaryNeuron) for n in net.neurons()) == 1
    assert any("above" in n for n in net.neurons()) and any("below" in n for n in net.neurons())
    net = net.with_delay(net.T if delay == "T" else delay)
    x = (np.random.default_rng(5).integers(0, 17, (6, 8)) / 16).astype(np.float32)
    ref = NumbaBackend().run(net, x, keep_trains=True)
    assert_same(ref, BACKEND.run(net, x, keep_trains=True))


def test_softmax_lowered_by_mbe_populations_equals_numba(tmp_path: Path) -> None:
    """Softmax compiled with --nonlinear mbe (row max, MBE digit readouts of exp and of the reciprocal of the row
    sum, digit products) from a uint4 quantize_static model (T = 15): Lava == numba spike for spike."""
    pytest.importorskip("torch")
    from csdc.compiler.pipeline import CompileOptions, compile_onnx
    from csdc.runtime.datasets import load_digits_split
    from tests.compiler.softmax_models import softmax_qdq_model

    net, rep = compile_onnx(softmax_qdq_model(tmp_path, bits=4), CompileOptions(nonlinear="mbe"))
    assert net.T == 15 and rep.approximations[0]["op"] == "softmax"
    x = load_digits_split("test")[0][:4].reshape(4, 64)
    ref = NumbaBackend().run(net, x, keep_trains=True)
    assert_same(ref, BACKEND.run(net, x, keep_trains=True))


# -- deployment bundle ----------------------------------------------------------------------
def test_bundle_runs_by_hand_in_the_lava_env(tmp_path: Path) -> None:
    """The exported bundle runs with the Lava environment's Python (lava-nc's own pins, no csdc
    there) on float input, as a user would run it, and gives the backend's results."""
    assert LAVA.versions["lava-nc"] == "0.10.0"
    assert int(LAVA.versions["numpy"].split(".")[0]) < 2 and LAVA.versions["networkx"] == "2.8.7"
    assert in_lava_env("import csdc").returncode != 0  # the bundle is self-contained
    net, x, _ = _digits_net()
    x = x[:4]
    bundle = export_bundle(net.with_delay(4), tmp_path / "deploy")
    assert {p.name for p in bundle.iterdir()} >= {"plan.json", "arrays.npz", "run_lava.py", "README.md", "manifest.json",
                                                  "csdc_lava_runtime", "requirements.txt", "hardware.json"}
    assert (bundle / "requirements.txt").read_text() == lava_env.REQUIREMENTS.read_text()
    for src in (bundle / "csdc_lava_runtime").glob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+csdc\b", src.read_text(), re.MULTILINE), src  # no csdc import
    np.savez(tmp_path / "input.npz", x=x)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    run = subprocess.run([LAVA.python, str(bundle / "run_lava.py"), str(tmp_path / "input.npz"), "-o",
                          str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
                         check=False)
    assert run.returncode == 0, run.stderr
    ref = BACKEND.run(net.with_delay(4), x)
    with np.load(tmp_path / "out.npz", allow_pickle=False) as z:
        assert np.array_equal(z["readout"], ref.readout)
        assert np.array_equal(z["logits"], ref.logits)
        assert np.array_equal(z["predictions"], ref.logits.argmax(1))
        for name, c in ref.counts.items():
            assert np.array_equal(z[f"counts/{name}"], c)
        neurons = [k for k in z.files if k.startswith("max_abs_v/")]
        assert neurons and all(int(z[k]) == ref.stats[k.split("/", 1)[1]].max_abs_v for k in neurons)
    # a tampered bundle is refused
    (bundle / "plan.json").write_text((bundle / "plan.json").read_text().replace('"T"', '"T" ', 1))
    bad = subprocess.run([LAVA.python, str(bundle / "run_lava.py"), str(tmp_path / "input.npz"), "-o",
                          str(tmp_path / "o2.npz")], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300,
                         check=False)
    assert bad.returncode != 0 and "SHA-256" in bad.stderr and not (tmp_path / "o2.npz").exists()


def test_bundle_runs_ternary_populations(tmp_path: Path) -> None:
    """A deployment bundle carries the ternary process: signed counts equal numba's."""
    net = signed_attention_net(3, 1, seed=4)
    x = batch_for(net, 3, seed=1)
    bundle = export_bundle(net, tmp_path / "deploy")
    np.savez(tmp_path / "input.npz", x=x)
    run = subprocess.run([LAVA.python, str(bundle / "run_lava.py"), str(tmp_path / "input.npz"), "-o",
                          str(tmp_path / "out.npz")], capture_output=True, text=True, cwd=tmp_path, timeout=300, check=False)
    assert run.returncode == 0, run.stderr
    ref = NumbaBackend().run(net, x)
    with np.load(tmp_path / "out.npz", allow_pickle=False) as z:
        assert np.array_equal(z["readout"], ref.readout)
        for name, c in ref.counts.items():
            assert np.array_equal(z[f"counts/{name}"], c), name
        assert (z["counts/o"] < 0).any()
        assert (z["events/o"] >= np.abs(z["counts/o"])).all()


def test_lava_run_failure_is_reported(tmp_path: Path) -> None:
    """A Lava environment that cannot run the bundle gives a CsdcError with its stderr, not a hang
    or a half-read result."""
    from csdc.errors import CsdcError

    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'lava exploded' >&2\nexit 3\n")
    broken.chmod(0o755)
    net = every_op_net(2, 1)
    with pytest.raises(CsdcError, match="exit code 3.*\n.*lava exploded"):
        LavaBackend(python=str(broken)).run(net, batch_for(net, 1, seed=0))


def test_export_refuses_foreign_directory(tmp_path: Path) -> None:
    from csdc.errors import CsdcError

    (tmp_path / "keep.txt").write_text("mine")
    with pytest.raises(CsdcError, match="not a csdc Lava bundle"):
        export_bundle(every_op_net(2, 2), tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
