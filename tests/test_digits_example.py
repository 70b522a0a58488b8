"""Acceptance on real data: the shipped digits CNN (QCDQ) and its onnxruntime quantize_static
twin compile, agree with onnxruntime on the digits test split, and the numba backend equals
the count-domain reference bit for bit."""

from __future__ import annotations

import os

import numpy as np
import pytest

from csdc.backends.numba import NumbaBackend
from csdc.backends.reference import ReferenceBackend
from csdc.compiler.pipeline import compile_onnx
from csdc.runtime.datasets import load_digits_split
from csdc.runtime.evaluate import compare, run_dataset

EXAMPLES = os.path.join(os.path.dirname(__file__), "..", "examples", "digits_cnn")


@pytest.fixture(scope="module")
def digits():
    return load_digits_split("test")


@pytest.mark.parametrize("model", ["model.onnx", "model_qdq_static.onnx"])
def test_agreement_with_onnxruntime(model, digits):
    x, y = digits
    path = os.path.join(EXAMPLES, model)
    net, rep = compile_onnx(path)
    out = run_dataset(net, NumbaBackend(), x, y, batch=128, progress=False)
    cmp = compare(path, out, x)
    assert cmp.agreement >= 0.995, cmp
    assert abs(out.summary.accuracy - cmp.onnx_accuracy) <= 0.005
    assert cmp.onnx_accuracy >= 0.95
    assert out.summary.acs > 0 and out.summary.macs > 0


def test_numba_equals_reference_bit_exact(digits):
    x, _ = digits
    net, _ = compile_onnx(os.path.join(EXAMPLES, "model.onnx"))
    a = NumbaBackend().run(net, x)
    b = ReferenceBackend().run(net, x)
    assert np.array_equal(a.readout, b.readout)
    assert np.array_equal(a.logits, b.logits)
    assert a.counts.keys() == b.counts.keys()
    for name in a.counts:
        assert np.array_equal(a.counts[name], b.counts[name]), name


def test_smaller_delay_runs_and_is_reported(digits):
    x, y = digits
    net, _ = compile_onnx(os.path.join(EXAMPLES, "model.onnx"))
    out = run_dataset(net.with_delay(0), NumbaBackend(), x[:100], y[:100], progress=False)
    assert out.summary.delay == 0 and out.summary.latency_steps == net.T
    assert out.summary.accuracy > 0.5  # plain IF still classifies; the exact figure is what `csdc run --delay` reports
