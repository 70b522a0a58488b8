"""The shipped examples under ``--profile loihi2`` (8-bit weight mantissas, 24-bit thresholds and
membrane): wide synapses are split into several groups (exact), the membrane budget lowers the
precision, and every backend runs the result spike for spike alike."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csdc.backends.numba import NumbaBackend
from csdc.compiler.bitwidth import PROFILES, analyze_bitwidth
from csdc.compiler.frontend import load_qgraph
from csdc.compiler.integerize import integerize, split_wide_synapses
from csdc.compiler.lower import lower
from csdc.compiler.passes.cleanup_routing import cleanup_routing
from csdc.compiler.pipeline import CompileOptions, canonicalize, compile_onnx
from csdc.ir import semantics
from csdc.ir.ops import ops_equal
from csdc.runtime.datasets import load_digits_split

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = ["digits_csdformer", "digits_cnn"]


def _model(example: str) -> Path:
    path = REPO / "examples" / example / "model.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not there")
    return path


def _unsplit(path: Path):
    """The loihi2 compile before weight splitting (same precision; fits the generic profile)."""
    graph = canonicalize(load_qgraph(path), CompileOptions(profile="loihi2"))

    def lower_round(precision):
        net, low = lower(graph, precision)
        return cleanup_routing(net), low

    net, _ = integerize(lower_round, PROFILES["loihi2"])
    return net


def _same_trains(ref, got) -> None:
    assert np.array_equal(ref.readout, got.readout)
    assert ref.counts.keys() == got.counts.keys()
    for name in ref.counts:
        assert np.array_equal(ref.counts[name], got.counts[name]), name
        assert np.array_equal(ref.trains[name], got.trains[name]), name


@pytest.mark.parametrize("example", EXAMPLES)
def test_example_fits_loihi2(example):
    net, rep = compile_onnx(_model(example), CompileOptions(profile="loihi2"))
    bits = analyze_bitwidth(net, "loihi2")
    assert bits.weight_bits <= 8 and bits.threshold_bits <= 24 and bits.membrane_bits <= 24
    assert rep.bits["membrane_bits"] <= 24
    if example == "digits_csdformer":  # residual-branch weights are wider than 8 bits: split
        assert rep.precision["split_synapses"] and rep.synapses > rep.synapses_before_split
    assert rep.error_bound < 2 ** -6  # within 2^-8 of a level wherever the 24-bit membrane allows it


@pytest.mark.parametrize("example", EXAMPLES)
def test_weight_splitting_is_exact_spike_for_spike(example):
    """The split network and the same precision unsplit give identical spike trains in every
    population (reference semantics and numba)."""
    path = _model(example)
    unsplit = _unsplit(path)
    split, groups = split_wide_synapses(unsplit, PROFILES["loihi2"].weight_bits)
    net, _ = compile_onnx(path, CompileOptions(profile="loihi2"))
    assert [n for n, _ in net.nodes()] == [n for n, _ in split.nodes()]
    assert all(ops_equal(net.op(n), split.op(n)) for n, _ in net.nodes())
    x, _ = load_digits_split("test")
    x = x[:40]
    ref = semantics.run_steps(unsplit, x)
    _same_trains(ref, semantics.run_steps(net, x))
    _same_trains(ref, NumbaBackend().run(net, x, keep_trains=True))


@pytest.mark.parametrize("example", EXAMPLES)
def test_loihi2_compile_agrees_with_generic(example):
    """Different budgets give different precisions (the 24-bit membrane lowers k); both stay within
    their error bounds, so the networks differ only on pre-activations that close to a rounding tie."""
    path = _model(example)
    gen, _ = compile_onnx(path)
    loihi, _ = compile_onnx(path, CompileOptions(profile="loihi2"))
    x, _ = load_digits_split("test")
    a, b = semantics.run_counts(gen, x), semantics.run_counts(loihi, x)
    assert np.mean(a.logits.argmax(1) == b.logits.argmax(1)) >= 0.99
    total = sum(a.counts[n].size for n in gen.neurons())
    differ = sum(int((a.counts[n] != b.counts[n]).sum()) for n in gen.neurons())
    assert differ <= 1e-3 * total


@pytest.mark.lava
@pytest.mark.parametrize("example", EXAMPLES)
def test_loihi2_compile_on_lava_equals_numba(example):
    from csdc.backends.lava.backend import LavaBackend  # runs the bundle in the Lava environment (csdc lava-env)

    net, _ = compile_onnx(_model(example), CompileOptions(profile="loihi2"))
    x, _ = load_digits_split("test")
    x = x[:6]
    ref = NumbaBackend().run(net, x, keep_trains=True)
    _same_trains(ref, LavaBackend().run(net, x, keep_trains=True))
    _same_trains(ref, semantics.run_steps(_unsplit(_model(example)), x))
