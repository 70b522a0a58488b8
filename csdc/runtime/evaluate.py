"""Run a compiled network over a dataset in batches and summarize what happened.

Energy uses the 45 nm figures common in SNN papers (Horowitz, ISSCC 2014): 0.9 pJ per
accumulate (AC) and 4.6 pJ per multiply-accumulate (MAC).
"""

from __future__ import annotations

import os
import sys
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
    """Agreement of the spiking network with onnxruntime on the source ONNX model.

    ``explainable_logit_diff``: the largest logit difference the quantization can explain,
    T spikes on the readout's strongest synapse (:func:`explainable_logit_diff`); ``warning``
    is set when the measured difference exceeds it (most likely the wrong model)."""

    model: str
    onnx_accuracy: float | None
    agreement: float  # top-1 agreement of SNN and ONNX
    max_abs_logit_diff: float
    seconds: float
    explainable_logit_diff: float | None = None
    warning: str | None = None


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
    acs: int | None  # None: not measured by this backend (reference counts spikes only)
    macs: int | None
    energy_uj_per_sample: float | None
    seconds: float  # the timed run, after the warm-up (kernel compilation is not in it)
    per_population: dict[str, dict] = field(default_factory=dict)
    comparison: Comparison | None = None
    clock_latency_steps: int | None = None  # on the backend's global clock (Lava: +1 step per synapse layer)
    warmup_seconds: float | None = None  # one-sample warm-up before the timed run (JIT compile or cache load)
    compile_seconds: float | None = None  # kernel compilation within the warm-up (0: all from the cache)
    kernel_cache: str | None = None  # where the compiled kernels are cached
    negative_spikes: int = 0  # the -1 spikes of ternary populations, included in ``spikes`` (one AC per target each)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunOutput:
    summary: RunSummary
    logits: np.ndarray
    readout: np.ndarray
    labels: np.ndarray | None


def _latency(net: Network) -> tuple[int, int]:
    from csdc.compiler.pipeline import latency  # the compiler owns the latency definition

    delays = [net.op(n).delay for n in net.neurons()]
    D = max(delays) if delays else 0
    return D, latency(net, D)


ALL_MEASURES = ("spikes", "synaptic_ops", "max_abs_v")


def run_dataset(net: Network, backend: Backend, x: np.ndarray, y: np.ndarray | None, batch: int = 64,
                progress: bool | None = None, label: str | None = None) -> RunOutput:
    """Run ``net`` on every sample of ``x`` (streamed in batches) and aggregate statistics.

    ``progress``: True/False shows/hides the progress bar; None (default) shows it only when
    stderr is a terminal and otherwise writes one summary line to stderr at the end (no
    carriage-return debris in logs); ``label`` names the run there (default: the backend).
    A backend with ``warm_up(net, x)`` runs one sample first (JIT compilation; it returns the
    seconds spent compiling), outside the timed run. A backend's ``measures`` names what it
    measures (default ``ALL_MEASURES``); what it does not is None in the summary, not 0."""
    if tuple(x.shape[1:]) != tuple(net.input_shape):
        raise DataError(f"data samples have shape {tuple(x.shape[1:])} but the network expects {tuple(net.input_shape)}")
    if len(x) == 0:
        raise DataError("the dataset is empty")
    warm = None
    if hasattr(backend, "warm_up"):
        tw = time.perf_counter()
        compiled = backend.warm_up(net, np.ascontiguousarray(x[:1], dtype=np.float32))
        warm = (time.perf_counter() - tw, float(compiled))
    logits, readout = [], []
    stats: dict[str, NodeStats] = {}
    t0 = time.perf_counter()
    bar = None
    if progress is not False and len(x) > batch:
        from tqdm import tqdm

        bar = tqdm(total=len(x), unit="img", desc=label or backend.name, leave=False, disable=None if progress is None else False)
    for xb, _ in iter_batches(x, None, batch):
        res = backend.run(net, np.ascontiguousarray(xb, dtype=np.float32))
        logits.append(res.logits)
        readout.append(res.readout)
        for name, st in res.stats.items():
            stats.setdefault(name, NodeStats()).merge(st)
        if bar is not None:
            bar.update(len(xb))
    seconds = time.perf_counter() - t0
    if bar is not None:
        if bar.disable:  # auto mode, not a terminal: one line for the log instead of the bar
            print(f"{label or backend.name}: {len(x)} images in {seconds:.2f} s", file=sys.stderr, flush=True)
        bar.close()
    lg = np.concatenate(logits)
    return RunOutput(summarize(net, backend, stats, lg, y, seconds, warm), lg, np.concatenate(readout), y)


def summarize(net: Network, backend: Backend, stats: dict[str, NodeStats], logits: np.ndarray, y: np.ndarray | None,
              seconds: float, warm: tuple[float, float] | None = None) -> RunSummary:
    """The summary of a run from its merged statistics and logits (also used by the cluster runner); ``warm``:
    (warm-up seconds, kernel compile seconds) when the backend warmed up before the timed run."""
    n = len(logits)
    T = net.T
    D, latency = _latency(net)
    neurons = sum(s.neurons for s in stats.values() if s.neurons)
    spikes = sum(s.spikes for s in stats.values())
    acs = sum(s.acs for s in stats.values())
    macs = sum(s.macs for s in stats.values())
    measures = set(getattr(backend, "measures", ALL_MEASURES))
    ops, volts = "synaptic_ops" in measures, "max_abs_v" in measures
    per_pop = {}
    for name, s in stats.items():
        rate = s.spikes / (s.neurons * n * T) if s.neurons else 0.0
        per_pop[name] = {"op": type(net.op(name)).__name__, "neurons": s.neurons, "spikes": s.spikes, "rate": rate,
                         "acs": s.acs if ops else None, "macs": s.macs if ops else None,
                         "max_abs_v": s.max_abs_v if volts else None,
                         "negative_spikes": s.negative_spikes}
    return RunSummary(
        backend=backend.name, samples=n, T=T, delay=D, latency_steps=latency,
        accuracy=float(np.mean(logits.argmax(1) == y)) if y is not None else None,
        spikes=int(spikes), spike_rate=spikes / (neurons * n * T) if neurons else 0.0,
        acs=int(acs) if ops else None, macs=int(macs) if ops else None,
        energy_uj_per_sample=(acs * PJ_PER_AC + macs * PJ_PER_MAC) / n * 1e-6 if ops else None, seconds=seconds,
        per_population=per_pop, clock_latency_steps=int(backend.latency(net)) if hasattr(backend, "latency") else None,
        warmup_seconds=warm[0] if warm else None, compile_seconds=warm[1] if warm else None,
        kernel_cache=getattr(backend, "kernel_cache", None),
        negative_spikes=int(sum(s.negative_spikes for s in stats.values())))


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


#: --compare warns when more than this fraction of the samples differ beyond explainable_logit_diff
SUSPECT_FRACTION = 0.01


def explainable_logit_diff(net: Network) -> float | None:
    """The largest logit difference that quantization can explain in an exact network (every
    delay D >= T): T spikes through the strongest synapse into the readout,
    ``T * max|w| * max(readout scale)`` (a SpikeMatMul counts ``T * weight`` per spike), i.e.
    one readout input moved over its whole range of T levels. The network of the model it was
    compiled from stays far below it (threshold rounding only; measured: digits CNN 6.7e-06
    against 4.73, digits CSDformer 0.081 against 0.252); another model exceeds it (the digits
    CNN against onnxruntime's quantize_static model: 8.65). None for D < T: unevenness errors
    have no such bound (digits CSDformer at D = 0: 10.4)."""
    from csdc.ir.ops import ConvSynapse, DenseSynapse, DiagonalSynapse, SpikeMatMul

    if any(net.op(n).delay < net.T for n in net.neurons()):
        return None

    strongest = 0
    todo = list(net.inputs(net.output_name))
    while todo:  # back through current routing (Add, ReduceSum, Reshape, Transpose) to the synapses
        name = todo.pop()
        op = net.op(name)
        if isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)):
            strongest = max(strongest, int(np.abs(op.weight).max()) if op.mantissa.size else 0)
        elif isinstance(op, SpikeMatMul):
            strongest = max(strongest, abs(op.weight) * net.T)
        else:
            todo += net.inputs(name)
    return float(net.T * strongest * np.abs(net.op(net.output_name).scale).max())


def compare(model_path: str | os.PathLike, out: RunOutput, x: np.ndarray, net: Network | None = None) -> Comparison:
    """Top-1 agreement and logit difference of the SNN run ``out`` with onnxruntime on ``x``; with
    ``net``, a warning when more than :data:`SUSPECT_FRACTION` of the samples differ by more than
    :func:`explainable_logit_diff`."""
    t0 = time.perf_counter()
    ref = onnx_logits(model_path, x)
    if ref.shape != out.logits.shape:
        raise DataError(f"{model_path}: produces outputs of shape {ref.shape[1:]}, the network {out.logits.shape[1:]}; "
                        "compare a network with the model it was compiled from")
    acc = float(np.mean(ref.argmax(1) == out.labels)) if out.labels is not None else None
    per_sample = np.abs(ref - out.logits).max(axis=1)
    diff = float(per_sample.max())
    bound = explainable_logit_diff(net) if net is not None else None
    warning = None
    # a near-tie flip early in a deep network can cascade on a rare sample (Fashion-MNIST CSDformer: 1 of
    # 10,000 above the bound, top-1 unchanged); another model differs on many (digits CNN against the
    # quantize_static model: 16 % of the samples)
    beyond = float(np.mean(per_sample > bound)) if bound is not None else 0.0
    if beyond > SUSPECT_FRACTION:
        comp = net.metadata.get("compile")
        source = comp.get("source") if isinstance(comp, dict) else None
        warning = (f"the logits of {100 * beyond:.1f} % of the samples differ by more than quantization explains "
                   f"({bound:.3g}: T spikes on the readout's strongest synapse; up to {diff:.3g}); is "
                   f"{os.path.basename(os.fspath(model_path))} the model this network was compiled from"
                   f"{f' ({source})' if source else ''}?")
    return Comparison(model=os.path.basename(os.fspath(model_path)), onnx_accuracy=acc,
                      agreement=float(np.mean(ref.argmax(1) == out.logits.argmax(1))),
                      max_abs_logit_diff=diff, seconds=time.perf_counter() - t0, explainable_logit_diff=bound,
                      warning=warning)
