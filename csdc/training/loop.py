"""The model-independent training loop shared by csdc's networks (digits CNN, CSDformer).

- :func:`train`: Adam + cosine schedule, deterministic for a seed, tqdm bar and one
  summary line per epoch; returns a :class:`TrainHistory`.
- :func:`build_seeded`: construct a model whose initial weights depend only on a seed.
- :func:`predict_logits` / :func:`evaluate`: PyTorch eval-mode logits and accuracy.
- :func:`onnx_predict`: logits of an exported ONNX model under onnxruntime.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import numpy as np
import onnx
import torch
from torch import nn
from torch.nn import functional as F
from tqdm import tqdm

from csdc.runtime.datasets import iter_batches

__all__ = [
    "TrainHistory",
    "build_seeded",
    "evaluate",
    "onnx_predict",
    "predict_logits",
    "train",
]

M = TypeVar("M", bound=nn.Module)


def build_seeded(seed: int, factory: Callable[..., M], /, **kwargs: object) -> M:
    """``factory(**kwargs)`` with the torch RNG seeded by ``seed``: initial weights depend
    only on ``seed``. The global torch RNG state is left as it was."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory(**kwargs)


@dataclass
class TrainHistory:
    """Per-epoch training record (accuracies are fractions in [0, 1])."""

    loss: list[float] = field(default_factory=list)
    train_acc: list[float] = field(default_factory=list)
    test_acc: list[float] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, epoch: int) -> str:
        """One line for epoch ``epoch`` (0-based)."""
        line = (
            f"epoch {epoch + 1:3d}: loss {self.loss[epoch]:.4f}  "
            f"train acc {100 * self.train_acc[epoch]:6.2f}%"
        )
        if epoch < len(self.test_acc):
            line += f"  test acc {100 * self.test_acc[epoch]:6.2f}%"
        return line


@contextlib.contextmanager
def _deterministic(threads: int) -> Iterator[None]:
    """Deterministic algorithms and a fixed thread count, restored on exit."""
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def predict_logits(model: nn.Module, x: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Logits of ``model`` in eval mode on ``x`` (float32 N x C x H x W)."""
    was_training = model.training
    model.eval()
    out = []
    with torch.no_grad():
        for xb, _ in iter_batches(x, None, batch_size):
            out.append(model(torch.from_numpy(np.ascontiguousarray(xb, dtype=np.float32))).numpy())
    model.train(was_training)
    return np.concatenate(out, axis=0)


def evaluate(model: nn.Module, x: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy (fraction) of ``model`` in eval mode."""
    return float(np.mean(predict_logits(model, x).argmax(axis=1) == y))


def train(
    model: nn.Module,
    x: np.ndarray,
    y: np.ndarray,
    epochs: int,
    lr: float,
    seed: int,
    progress: bool = True,
    *,
    eval_data: tuple[np.ndarray, np.ndarray] | None = None,
    batch_size: int = 32,
    weight_decay: float = 0.0,
    threads: int = 1,
    summaries: bool | None = None,
) -> TrainHistory:
    """Train ``model`` with Adam and a cosine learning-rate schedule; return the history.

    Deterministic for a fixed ``seed`` (and a model built with :func:`build_seeded`):
    the shuffling uses its own generator, deterministic algorithms are enabled and
    torch runs ``threads`` threads (1 by default, so results do not depend on the
    machine's core count). With ``progress`` a tqdm bar runs over the batches; with
    ``summaries`` (default: same as ``progress``) one line per epoch is printed (loss,
    train accuracy and, when ``eval_data`` is given, test accuracy). The model is
    left in eval mode.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if summaries is None:
        summaries = progress
    n = len(x)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))
    history = TrainHistory()
    start = time.perf_counter()
    with _deterministic(threads), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)
        steps_per_epoch = (n + batch_size - 1) // batch_size
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
        bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="batch", leave=False)
        try:
            for epoch in range(epochs):
                model.train()
                perm = torch.randperm(n, generator=gen)
                total_loss = 0.0
                correct = 0
                for i in range(0, n, batch_size):
                    idx = perm[i : i + batch_size]
                    xb, yb = xt[idx], yt[idx]
                    logits = model(xb)
                    loss = F.cross_entropy(logits, yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    total_loss += float(loss.detach()) * len(idx)
                    correct += int((logits.detach().argmax(dim=1) == yb).sum())
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{float(loss.detach()):.3f}", refresh=False)
                history.loss.append(total_loss / n)
                history.train_acc.append(correct / n)
                if eval_data is not None:
                    history.test_acc.append(evaluate(model, *eval_data))
                if summaries:
                    bar.write(history.summary(epoch))
        finally:
            bar.close()
    model.eval()
    history.seconds = time.perf_counter() - start
    return history



def onnx_predict(
    model: str | os.PathLike[str] | bytes | onnx.ModelProto, x: np.ndarray, batch_size: int = 512
) -> np.ndarray:
    """Run an ONNX model with onnxruntime (CPU, one thread) and return its first output."""
    import onnxruntime as ort

    if isinstance(model, onnx.ModelProto):
        source: str | bytes = model.SerializeToString()
    elif isinstance(model, bytes):
        source = model
    else:
        source = os.fspath(model)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    outs = [
        sess.run(None, {name: np.ascontiguousarray(xb, dtype=np.float32)})[0]
        for xb, _ in iter_batches(x, None, batch_size)
    ]
    return np.concatenate(outs, axis=0)


