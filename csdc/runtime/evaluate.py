"""Run a compiled network over a dataset in batches and summarize what happened.

Energy uses the 45 nm figures common in SNN papers (Horowitz, ISSCC 2014): 0.9 pJ per
accumulate (AC) and 4.6 pJ per multiply-accumulate (MAC).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np

from csdc.backends.base import Backend, NodeStats
from csdc.errors import DataError, ModelFileError
from csdc.ir.graph import Network
from csdc.runtime.datasets import iter_batches

PJ_PER_AC = 0.9
PJ_PER_MAC = 4.6


@dataclass
class Comparison:
    """Agreement of the spiking network with onnxruntime on the source ONNX model."""

    model: str
    onnx_accuracy: float | None
    agreement: float  # top-1 agreement of SNN and ONNX
    max_abs_logit_diff: float
    seconds: float


@dataclass
class RunSummary:
    backend: str
    samples: int
    T: int
    delay: int
    latency_steps: int
    accuracy: float | None
    spikes: int
    spike_rate: float  # spikes per neuron per time step
    acs: int
    macs: int
    energy_uj_per_sample: float
    seconds: float
    per_population: dict[str, dict] = field(default_factory=dict)
    comparison: Comparison | None = None
    clock_latency_steps: int | None = None  # on the backend's global clock (Lava: +1 step per synapse layer)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunOutput:
    summary: RunSummary
    logits: np.ndarray
    readout: np.ndarray
    labels: np.ndarray | None


def _latency(net: Network) -> tuple[int, int]:
    from csdc.compiler.pipeline import depth  # the compiler owns the depth definition

    delays = [net.op(n).delay for n in net.neurons()]
    D = max(delays) if delays else 0
    return D, net.T + depth(net) * D


def run_dataset(net: Network, backend: Backend, x: np.ndarray, y: np.ndarray | None, batch: int = 64,
                progress: bool = True) -> RunOutput:
    """Run ``net`` on every sample of ``x`` (streamed in batches) and aggregate statistics."""
    if tuple(x.shape[1:]) != tuple(net.input_shape):
        raise DataError(f"data samples have shape {tuple(x.shape[1:])} but the network expects {tuple(net.input_shape)}")
    if len(x) == 0:
        raise DataError("the dataset is empty")
    logits, readout = [], []
    stats: dict[str, NodeStats] = {}
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(x), unit="img", desc=f"{backend.name}", leave=False, disable=len(x) <= batch)
    for xb, _ in iter_batches(x, None, batch):
        res = backend.run(net, np.ascontiguousarray(xb, dtype=np.float32))
        logits.append(res.logits)
        readout.append(res.readout)
        for name, st in res.stats.items():
            stats.setdefault(name, NodeStats()).merge(st)
        if bar is not None:
            bar.update(len(xb))
    if bar is not None:
        bar.close()
    seconds = time.perf_counter() - t0
    lg = np.concatenate(logits)
    return RunOutput(summarize(net, backend, stats, lg, y, seconds), lg, np.concatenate(readout), y)


def summarize(net: Network, backend: Backend, stats: dict[str, NodeStats], logits: np.ndarray, y: np.ndarray | None,
              seconds: float) -> RunSummary:
    """The summary of a run from its merged statistics and logits (also used by the cluster runner)."""
    n = len(logits)
    T = net.T
    D, latency = _latency(net)
    neurons = sum(s.neurons for s in stats.values() if s.neurons)
    spikes = sum(s.spikes for s in stats.values())
    acs = sum(s.acs for s in stats.values())
    macs = sum(s.macs for s in stats.values())
    per_pop = {}
    for name, s in stats.items():
        rate = s.spikes / (s.neurons * n * T) if s.neurons else 0.0
        per_pop[name] = {"op": type(net.op(name)).__name__, "neurons": s.neurons, "spikes": s.spikes, "rate": rate,
                         "acs": s.acs, "macs": s.macs, "max_abs_v": s.max_abs_v}
    return RunSummary(
        backend=backend.name, samples=n, T=T, delay=D, latency_steps=latency,
        accuracy=float(np.mean(logits.argmax(1) == y)) if y is not None else None,
        spikes=int(spikes), spike_rate=spikes / (neurons * n * T) if neurons else 0.0, acs=int(acs), macs=int(macs),
        energy_uj_per_sample=(acs * PJ_PER_AC + macs * PJ_PER_MAC) / n * 1e-6, seconds=seconds, per_population=per_pop,
        clock_latency_steps=int(backend.latency(net)) if hasattr(backend, "latency") else None)


def onnx_logits(model_path: str | os.PathLike, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """Run the source model with onnxruntime (the reference executor) on ``x``.

    Graph optimizations are disabled so that the model runs exactly as written: onnxruntime's
    optimizers rewrite quantized patterns (constant folding through quantizers, fusing a
    DequantizeLinear weight with MatMul/Gemm into dynamically re-quantized kernels), which
    changes the model's own outputs (measured: up to 0.8 on logits of a float-weight CNN)."""
    import onnxruntime as ort

    path = os.fspath(model_path)
    if not os.path.exists(path):
        raise ModelFileError(f"{path}: no such file (given to --compare)")
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ModelFileError(f"{path}: onnxruntime cannot load it ({exc})") from None
    inp = sess.get_inputs()[0]
    outs = []
    for xb, _ in iter_batches(x, None, batch):
        try:
            outs.append(sess.run(None, {inp.name: np.ascontiguousarray(xb, dtype=np.float32)})[0])
        except Exception as exc:
            raise DataError(f"{path}: onnxruntime rejects data of shape {tuple(xb.shape)} ({exc})") from None
    out = np.concatenate(outs)
    return out.reshape(len(x), -1)


def compare(model_path: str | os.PathLike, out: RunOutput, x: np.ndarray) -> Comparison:
    """Top-1 agreement and logit difference of the SNN run ``out`` with onnxruntime on ``x``."""
    t0 = time.perf_counter()
    ref = onnx_logits(model_path, x)
    if ref.shape != out.logits.shape:
        raise DataError(f"{model_path}: produces outputs of shape {ref.shape[1:]}, the network {out.logits.shape[1:]}; "
                        "compare a network with the model it was compiled from")
    acc = float(np.mean(ref.argmax(1) == out.labels)) if out.labels is not None else None
    return Comparison(model=os.path.basename(os.fspath(model_path)), onnx_accuracy=acc,
                      agreement=float(np.mean(ref.argmax(1) == out.logits.argmax(1))),
                      max_abs_logit_diff=float(np.max(np.abs(ref - out.logits))), seconds=time.perf_counter() - t0)
