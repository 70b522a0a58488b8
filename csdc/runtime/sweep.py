"""Delay sweep: accuracy and agreement with onnxruntime as a function of the DIF delay D.

For D >= T the network is exactly the quantized model; smaller delays shorten the latency
(T + depth x D steps) at the cost of "unevenness" errors (SPEC 2.2). This runs the same
compiled network once per delay and tabulates the trade-off.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import numpy as np

from csdc.backends.base import Backend
from csdc.errors import CsdcError
from csdc.ir.graph import Network
from csdc.runtime.evaluate import RunOutput, onnx_logits, run_dataset


@dataclass
class SweepRow:
    delay: int
    latency_steps: int
    accuracy: float | None
    agreement: float | None  # top-1 agreement with onnxruntime on the source model
    spike_rate: float
    seconds: float


def parse_delays(spec: str, T: int) -> list[int]:
    """'0..T', '0..4', '0,2,4' or '3' -> sorted unique delays ('T' stands for the window)."""
    text = spec.replace("T", str(T)).replace(" ", "")
    try:
        if ".." in text:
            lo, hi = (int(v) for v in text.split(".."))
            if lo > hi:
                raise CsdcError(f"--delays '{spec}' is an empty range: it starts at {lo}, after its end {hi}; "
                                f"write the smaller delay first ({hi}..{lo})")
            values = list(range(lo, hi + 1))
        else:
            values = [int(v) for v in text.split(",") if v]
    except ValueError:
        raise CsdcError(f"--delays '{spec}' is not a range like 0..T or a list like 0,2,4") from None
    if not values:
        raise CsdcError(f"--delays '{spec}' names no delay; give a range like 0..T or a list like 0,2,4")
    if min(values) < 0:
        raise CsdcError(f"--delays '{spec}' names the negative delay {min(values)}; delays are >= 0 time steps")
    return sorted(set(values))


def sweep_delays(net: Network, backend: Backend, delays: list[int], x: np.ndarray, y: np.ndarray | None,
                 compare: str | os.PathLike | None = None, batch: int = 64, progress: bool | None = None) -> list[SweepRow]:
    """Run ``net`` with every delay in ``delays`` on ``x``; one row per delay."""
    ref = onnx_logits(compare, x).argmax(1) if compare is not None else None
    rows = []
    for D in delays:
        rows.append(sweep_row(D, run_dataset(net.with_delay(D), backend, x, y, batch=batch, progress=progress,
                                             label=f"{backend.name} D={D}"), ref))
    return rows


def sweep_row(delay: int, out: RunOutput, ref: np.ndarray | None) -> SweepRow:
    """The row of delay ``delay`` from its run; ``ref``: onnxruntime's top-1 classes, if compared."""
    s = out.summary
    return SweepRow(delay, s.latency_steps, s.accuracy,
                    float(np.mean(out.logits.argmax(1) == ref)) if ref is not None else None, s.spike_rate, s.seconds)


def rows_to_dicts(rows: list[SweepRow]) -> list[dict]:
    return [asdict(r) for r in rows]


def markdown_table(rows: list[SweepRow], T: int) -> str:
    lines = ["| D | latency (steps) | SNN accuracy | agreement with onnxruntime | spike rate |", "|---|---|---|---|---|"]
    for r in rows:
        acc = f"{100 * r.accuracy:.2f} %" if r.accuracy is not None else "-"
        agr = f"{100 * r.agreement:.2f} %" if r.agreement is not None else "-"
        tag = " (IF)" if r.delay == 0 else (" (exact)" if r.delay >= T else "")
        lines.append(f"| {r.delay}{tag} | {r.latency_steps} | {acc} | {agr} | {r.spike_rate:.4f} |")
    return "\n".join(lines)


def plot(rows: list[SweepRow], T: int, title: str, path: str | os.PathLike) -> None:
    """Accuracy / agreement against D (bottom axis) and latency (top axis), written as PNG."""
    import matplotlib.pyplot as plt

    fig = figure(rows, T, title)
    fig.savefig(path)
    plt.close(fig)


def figure(rows: list[SweepRow], T: int, title: str):
    """The sweep plot as a matplotlib figure (whole-step ticks on the delay axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    d = [r.delay for r in rows]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    if rows[0].accuracy is not None:
        ax.plot(d, [100 * r.accuracy for r in rows], "o-", label="SNN accuracy")
    if rows[0].agreement is not None:
        ax.plot(d, [100 * r.agreement for r in rows], "s--", label="top-1 agreement with onnxruntime")
    ax.axvline(T, color="gray", lw=0.8, ls=":")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # delays are whole time steps
    ax.set_xlabel(f"delay D (time steps; D >= T = {T} is exact)")
    ax.set_ylabel("%")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    top = ax.secondary_xaxis("top", functions=(lambda v: v, lambda v: v))
    top.set_xticks(d)
    top.set_xticklabels([str(r.latency_steps) for r in rows])
    top.set_xlabel("latency (steps)")
    fig.tight_layout()
    return fig
