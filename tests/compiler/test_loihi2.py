"""The shipped examples under ``--profile loihi2``: the generic compile's units mapped onto Loihi 2
(8-bit weight mantissas, wider synapses split into groups; 24-bit neuron words and dendritic
accumulators, a membrane taking two words where it needs more), so the loihi2 network is the generic
network with split weights and runs spike for spike like it on every backend. A model whose generic
units do not map falls back to loihi2's own budget, with a warning naming the population."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csdc.backends.numba import NumbaBackend
from csdc.compiler.bitwidth import PROFILES, analyze_bitwidth, current_bounds, membrane_words
from csdc.compiler.integerize import split_for_profile, split_wide_synapses
from csdc.compiler.pipeline import CompileOptions, compile_onnx, unmapped_nodes
from csdc.ir import semantics
from csdc.ir.ops import ops_equal
from csdc.runtime.datasets import load_digits_split

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = ["digits_csdformer", "digits_cnn"]
WORD = PROFILES["loihi2"].word_bits


def _model(example: str) -> Path:
    path = REPO / "examples" / example / "model.onnx"
    if not path.exists():
        pytest.skip(f"{path} is not there")
    return path


@pytest.fixture(scope="module", params=EXAMPLES)
def compiled(request):
    """(generic network, its report, loihi2 network, its report) of one shipped example."""
    path = _model(request.param)
    return (*compile_onnx(path), *compile_onnx(path, CompileOptions(profile="loihi2")))


def _same(ref, got, trains: bool) -> None:
    assert np.array_equal(ref.readout, got.readout)
    assert ref.counts.keys() == got.counts.keys()
    for name in ref.counts:
        assert np.array_equal(ref.counts[name], got.counts[name]), name
        if trains:
            assert np.array_equal(ref.trains[name], got.trains[name]), name


def test_example_fits_loihi2(compiled):
    gen, gen_rep, net, rep = compiled
    bits = analyze_bitwidth(net, "loihi2")
    assert bits.weight_bits <= 8 and rep.bits["weight_bits"] <= 8
    bounds = current_bounds(net)
    two = []
    for name in net.neurons():
        words, entry = membrane_words(net, name, WORD, bounds), bits.per_node[name]
        if words is None:  # one word holds the potential and the threshold
            assert entry["membrane_words"] == 1 and max(entry["membrane_bits"], entry["threshold_bits"]) <= WORD
            continue
        two.append(name)
        assert entry["membrane_words"] == 2 and entry["word_shift"] == words.shift
        assert max(words.hi_bits, words.coarse_bits, words.fine_bits) <= WORD  # every word and compartment accumulator
        assert entry["membrane_bits"] <= 2 * WORD
    assert two and rep.bits["two_words"] == two and rep.bits["membrane_words"] == 2
    assert rep.precision["units"] == "generic" and not any("spike-identical" in w for w in rep.warnings)
    assert rep.error_bound == gen_rep.error_bound and rep.precision["populations"] == gen_rep.precision["populations"]
    if "blocks/blocks.0/attn/q_in" in gen.neurons():  # the CSDformer: residual-branch weights are wider than 8 bits
        assert rep.precision["split_synapses"] and rep.synapses > rep.synapses_before_split == gen_rep.synapses


def test_loihi2_network_is_the_generic_network_with_split_weights(compiled):
    gen, _, net, _ = compiled
    split, groups = split_for_profile(gen, PROFILES["loihi2"])
    assert groups == split_wide_synapses(gen, PROFILES["loihi2"].weight_bits)[1]  # no cut at a shift needed
    assert [n for n, _ in net.nodes()] == [n for n, _ in split.nodes()]
    assert all(ops_equal(net.op(n), split.op(n)) for n, _ in net.nodes())


def test_loihi2_spikes_equal_generic_on_every_digits_test_image(compiled):
    """Every population's spike counts and the readout on all 450 test images (count-domain reference
    and numba), the spike trains on numba (all images) and the time-stepped reference (a subset)."""
    gen, _, net, _ = compiled
    x, _ = load_digits_split("test")
    assert len(x) == 450
    _same(semantics.run_counts(gen, x), semantics.run_counts(net, x), trains=False)
    numba = NumbaBackend()
    for start in range(0, len(x), 150):
        batch = x[start:start + 150]
        _same(numba.run(gen, batch, keep_trains=True), numba.run(net, batch, keep_trains=True), trains=True)
    _same(semantics.run_steps(gen, x[:30]), semantics.run_steps(net, x[:30]), trains=True)


@pytest.fixture(scope="module")
def deep_residual(tmp_path_factory):
    """A random 4-block digits CSDformer (width 64, MLP 256, 8-bit weights): its residual stream
    needs more than two 24-bit words under the generic units (fine compartments of 25+ bits)."""
    torch = pytest.importorskip("torch")
    from csdc.training.transformer import build_csdformer, calibrate, export_csdformer_onnx

    model = build_csdformer(0, img_size=8, dim=64, depth=4, heads=4, mlp_ratio=4, weight_bits=8)
    calibrate(model, torch.rand(16, 1, 8, 8, generator=torch.Generator().manual_seed(0)))
    path = tmp_path_factory.mktemp("deep") / "csdformer_4_64.onnx"
    export_csdformer_onnx(model, path)
    return path


def test_unmapped_generic_units_fall_back_to_the_profile_budget_with_a_warning(deep_residual):
    gen, _ = compile_onnx(deep_residual)
    unmapped = unmapped_nodes(gen, PROFILES["loihi2"])
    assert unmapped and all(n in gen.neurons() for n in unmapped)
    net, rep = compile_onnx(deep_residual, CompileOptions(profile="loihi2"))
    warning = [w for w in rep.warnings if w.startswith("not spike-identical to --profile generic")]
    assert len(warning) == 1 and f"'{unmapped[0]}'" in warning[0] and "does not fit two 24-bit membrane words" in warning[0]
    assert rep.precision["units"] == "loihi2"
    analyze_bitwidth(net, "loihi2")  # fits: weights split, every membrane in one or two words
    assert not unmapped_nodes(net, PROFILES["loihi2"])
    x, _ = load_digits_split("test")
    x = x[:40]
    _same(semantics.run_counts(net, x), NumbaBackend().run(net, x), trains=False)


@pytest.mark.lava
def test_loihi2_compile_on_lava_equals_generic(compiled):
    from csdc.backends.lava.backend import LavaBackend  # runs the bundle in the Lava environment (csdc lava-env)

    gen, _, net, _ = compiled
    x, _ = load_digits_split("test")
    x = x[:6]
    _same(NumbaBackend().run(gen, x, keep_trains=True), LavaBackend().run(net, x, keep_trains=True), trains=True)


def test_a_refusal_after_the_fallback_says_both_reasons(monkeypatch):
    """A profile too small for the generic units and for its own budget: the error names the populations
    the generic units did not map and what its own budget refused."""
    from csdc.compiler.bitwidth import HardwareProfile
    from csdc.errors import BudgetError

    tiny = HardwareProfile("tiny", weight_bits=4, threshold_bits=8, membrane_bits=8, word_bits=4, units="generic")
    monkeypatch.setitem(PROFILES, "tiny", tiny)
    with pytest.raises(BudgetError, match=r"under the units of --profile generic, populations? '[^']+'.* (do|does) not map onto "
                                          r"profile 'tiny' \(.*\); with that profile's own budget: .*"):
        compile_onnx(_model("digits_cnn"), CompileOptions(profile="tiny"))


def test_the_compile_summary_explain_and_json_say_which_populations_take_two_words(tmp_path, capsys):
    import json

    from csdc.cli import main

    model = str(_model("digits_cnn"))
    assert main(["compile", model, "-o", str(tmp_path / "a.sir"), "--profile", "loihi2", "--explain"]) == 0
    out = capsys.readouterr().out
    assert "membrane 31 (2 x 24-bit words)" in out and "two-word membranes    2 of 2 populations" in out
    assert "units of --profile generic" in out
    assert "membrane in 2 x 24-bit words (shift 7; hi 24, coarse 21, fine 9 bits)" in out  # --explain, population q1
    assert main(["compile", model, "-o", str(tmp_path / "b.sir"), "--profile", "loihi2", "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["bits"]["two_words"] == ["q1", "q2"] and rep["precision"]["units"] == "generic"
    assert rep["bits"]["per_node"]["q1"]["membrane_words"] == 2 and rep["bits"]["word_bits"] == 24
    assert main(["compile", model, "-o", str(tmp_path / "c.sir"), "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert "two_words" not in rep["bits"] and "units" not in rep["precision"]  # generic: as before
