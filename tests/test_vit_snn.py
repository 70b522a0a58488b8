"""A standard ViT converted without retraining (docs/vit.md, docs/mbe.md): the shipped float digits ViT
(pre-LN blocks with LayerNormalization, softmax attention, erf GELU; examples/vit) quantized by
``csdc compile --calibrate digits`` (onnxruntime quantize_static) and compiled with ``--nonlinear mbe``,
as a user runs it. On the full digits test split its SNN accuracy is within 1.0 point of onnxruntime's
on the QDQ model, top-1 agreement at least 99 %; every nonlinear op is approximated by MBE populations
with its error stated, and numba equals the count-domain reference on the compiled network."""

from __future__ import annotations

import collections
import contextlib
import io
import json
import os

import numpy as np
import pytest

from csdc.cli import main
from csdc.ir import MBENeuron
from csdc.ir.serialize import load
from csdc.ir.semantics import run_counts
from csdc.runtime.datasets import load_builtin

HERE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "vit")


def _cli_json(argv: list[str]) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    assert code == 0, argv
    return json.loads(out.getvalue())


@pytest.fixture(scope="module")
def digits_vit(tmp_path_factory) -> tuple[str, str, dict]:
    tmp = tmp_path_factory.mktemp("vit")
    sir = str(tmp / "vit.sir")
    rep = _cli_json(["compile", os.path.join(HERE, "digits_vit_opset17.onnx"), "--calibrate", "digits",
                     "--nonlinear", "mbe", "-o", sir, "--json"])
    return sir, str(tmp / "vit.qdq.onnx"), rep


def test_every_nonlinear_op_is_approximated_with_a_stated_error(digits_vit) -> None:
    _, qdq, rep = digits_vit
    assert os.path.exists(qdq)  # --calibrate writes the QDQ model it compiled next to the network
    ops = collections.Counter(a["op"] for a in rep["approximations"])
    assert ops == {"layernorm": 5, "softmax": 2, "erf": 2}, ops  # opset 17: GELU in its Erf form
    for a in rep["approximations"]:
        assert np.isfinite(a["max_abs_error"]) and 0 <= a["mean_abs_error"] <= a["max_abs_error"], a
        assert a["latency_steps"] >= rep["T"], a  # an MBE population integrates its input's whole window


def test_digits_vit_snn_within_one_point_of_its_qdq_model(digits_vit) -> None:
    sir, qdq, _ = digits_vit
    run = _cli_json(["run", sir, "--data", "digits", "--compare", qdq, "--json"])
    assert run["samples"] == 450
    cmp = run["comparison"]
    assert abs(run["accuracy"] - cmp["onnx_accuracy"]) <= 0.01, (run["accuracy"], cmp["onnx_accuracy"])
    assert cmp["agreement"] >= 0.99, cmp


def test_numba_equals_the_count_domain_reference_on_the_vit(digits_vit) -> None:
    from csdc.backends.numba import NumbaBackend

    sir, _, _ = digits_vit
    net = load(sir)
    assert sum(isinstance(op, MBENeuron) for _, op in net.nodes()) > 9  # 2 GELU, softmax and LayerNorm stages
    x = load_builtin("digits", "test")[0][:3]
    nb, ref = NumbaBackend().run(net, x), run_counts(net, x)
    assert np.array_equal(nb.readout, ref.readout)
    for k, v in ref.counts.items():
        assert np.array_equal(nb.counts[k], v), k
