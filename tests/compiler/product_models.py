"""Small token networks with products of two activations, quantized by onnxruntime as a user makes them (shared
by the product tests; not a test module).

``product_qdq_models(folder)``: a patch convolution makes 16 tokens of 8 features from a digits image (as the ViT
does, ``csdc train --model vit``), two linear layers ``q``, ``k`` (and ``v``) read the tokens, and

- ``qk``: ``q @ k^T`` (a 3-D token MatMul, 16 x 16 per image) -> Flatten -> Linear head;
- ``mul``: ``q * k`` elementwise -> Flatten -> Linear head;
- ``pv``: ``p = relu(q @ k^T / 4)``, then ``p @ v`` (16 x 8; ``p`` non-negative: zero point 0) -> Flatten -> Linear head.

Each is trained on scikit-learn's digits (seed 0, 100 full-batch Adam steps, lr 0.003), exported by torch.onnx (TorchScript
exporter, opset 17) and quantized by ``csdc.compiler.calibrate.quantize_static_qdq`` (what ``csdc compile
--calibrate`` runs: onnxruntime's ``quant_pre_process`` and ``quantize_static``, QDQ, uint8 asymmetric activations,
int8 symmetric per-channel weights) on the training split: ``q``, ``k`` and ``v`` get uint8 quantizers with their
zero point mid-range (the offset form). Returns ``{name: path of the QDQ model}``.
"""

from __future__ import annotations

import warnings
from pathlib import Path


def product_qdq_models(folder: Path, names: tuple[str, ...] = ("qk", "mul", "pv")) -> dict[str, Path]:
    import torch

    from csdc.compiler.calibrate import quantize_static_qdq
    from csdc.runtime.datasets import load_digits_split

    x, y = load_digits_split("train")

    class Tokens(torch.nn.Module):
        def __init__(self, kind: str) -> None:
            super().__init__()
            self.kind = kind
            self.patch = torch.nn.Conv2d(1, 8, 2, stride=2)
            self.q, self.k, self.v = torch.nn.Linear(8, 16), torch.nn.Linear(8, 16), torch.nn.Linear(8, 8)
            self.head = torch.nn.Linear(128 if kind == "pv" else 256, 10)

        def forward(self, img: torch.Tensor) -> torch.Tensor:
            t = self.patch(img).flatten(2).transpose(1, 2)  # (n, 16 tokens, 8)
            if self.kind == "mul":
                h = self.q(t) * self.k(t)
            else:
                h = self.q(t) @ self.k(t).transpose(1, 2)
                if self.kind == "pv":  # scaled by 1 / sqrt(16) as attention's scores are
                    h = torch.relu(h * 0.25) @ self.v(t)
            return self.head(h.flatten(1))

    out = {}
    xt, yt = torch.tensor(x), torch.tensor(y)
    for kind in names:
        torch.manual_seed(0)
        model = Tokens(kind)
        opt = torch.optim.Adam(model.parameters(), 3e-3)
        for _ in range(100):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(xt), yt).backward()
            opt.step()
        model.eval()
        fp = folder / f"{kind}_float.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, xt[:1], str(fp), input_names=["input"], output_names=["logits"], opset_version=17,
                              dynamo=False, dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
        out[kind] = folder / f"{kind}_qdq.onnx"
        quantize_static_qdq(fp, x, out[kind])
    return out
