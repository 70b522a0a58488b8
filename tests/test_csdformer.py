"""Acceptance of the spiking transformer: the shipped digits CSDformer agrees with onnxruntime
and numba equals the count-domain reference bit for bit; a CIFAR-size CSDformer-4-384 compiles,
runs one image bit-exactly and agrees with onnxruntime on 64 random images at default options."""

from __future__ import annotations

import os
import resource
import time

import numpy as np
import pytest

from csdc.backends.numba import NumbaBackend
from csdc.backends.reference import ReferenceBackend
from csdc.compiler.pipeline import compile_onnx
from csdc.ir.ops import SpikeMatMul
from csdc.runtime.datasets import load_digits_split
from csdc.runtime.evaluate import compare, run_dataset

MODEL = os.path.join(os.path.dirname(__file__), "..", "examples", "digits_csdformer", "model.onnx")


@pytest.fixture(scope="module")
def compiled():
    return compile_onnx(MODEL)


def test_digits_csdformer_agrees_with_onnxruntime(compiled):
    net, rep = compiled
    x, y = load_digits_split("test")
    out = run_dataset(net, NumbaBackend(), x, y, batch=128, progress=False)
    cmp = compare(MODEL, out, x)
    assert cmp.onnx_accuracy >= 0.95
    assert cmp.agreement >= 0.995, cmp
    assert abs(out.summary.accuracy - cmp.onnx_accuracy) <= 0.005
    assert sum(isinstance(op, SpikeMatMul) for _, op in net.nodes()) == 4  # Q K^T and A V in 2 blocks
    assert out.summary.latency_steps == net.T + 15 * net.T


def test_digits_csdformer_numba_equals_reference(compiled):
    net, _ = compiled
    x, _ = load_digits_split("test")
    a = NumbaBackend().run(net, x[:150])
    b = ReferenceBackend().run(net, x[:150])
    assert np.array_equal(a.readout, b.readout)
    for name in b.counts:
        assert np.array_equal(a.counts[name], b.counts[name]), name


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """The random CSDformer-4-384 of benchmarks/ (seed 0): QCDQ, int8 weights behind
    DequantizeLinear -> Transpose -> MatMul, residual streams over 4 blocks."""
    pytest.importorskip("torch")
    from csdc.training.transformer import export_csdformer_cifar

    path = tmp_path_factory.mktemp("cifar") / "cifar.onnx"
    export_csdformer_cifar(str(path), seed=0)
    return path


def test_cifar_size_csdformer_compiles_and_runs_bit_exact(cifar):
    path = cifar
    t0 = time.perf_counter()
    net, rep = compile_onnx(path)
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"CSDformer-4-384: compile {seconds:.1f} s, process peak RSS {peak_mib:.0f} MiB, "
          f"{rep.populations} populations, {rep.neurons} neurons, {rep.synapses} synapses")
    assert net.input_shape == (3, 32, 32) and rep.populations >= 4 * 9
    x = np.random.default_rng(0).random((1, 3, 32, 32)).astype(np.float32)
    a = NumbaBackend().run(net, x)
    b = ReferenceBackend().run(net, x)
    assert np.array_equal(a.readout, b.readout)
    for name in b.counts:
        assert np.array_equal(a.counts[name], b.counts[name]), name


def test_cifar_size_csdformer_exact_at_defaults(cifar):
    """Issue 10: at default options every population's worst-case integerization error is below
    2^-8 of a level, and the network agrees with onnxruntime on 64 of 64 random images. Before the
    residual stream got wide membranes (bound 2.5e-3 of a level there) images 0, 5, 7 and 57 were
    missed, each at one neuron reading the stream whose exact x/s lies 5.8e-7..6.9e-6 above a rounding
    tie (docs/precision.md); the stream now gets int64 membranes and bounds of 9.8e-07..2.4e-06."""
    from csdc.compiler.integerize import LANE_LEVELS, TARGET_LEVELS
    from csdc.runtime.evaluate import onnx_logits

    net, rep = compile_onnx(cifar)
    pops = rep.precision["populations"]
    assert all(p["bound"] < TARGET_LEVELS for p in pops.values() if not p["readout"])
    assert rep.error_bound < LANE_LEVELS
    assert not rep.warnings
    x = (np.round(np.random.default_rng(0).random((64, 3, 32, 32)) * 255) / 255).astype(np.float32)
    got = NumbaBackend().run(net, x).logits
    assert np.array_equal(onnx_logits(cifar, x).argmax(1), got.argmax(1))
