"""A small softmax network quantized by onnxruntime, as a user makes it (shared by the softmax tests; not a test module).

``softmax_qdq_model(folder, bits=8, rows=8, row=16)``: digits as 64 pixels (input (n, 64): quantize_static puts the input
quantizer after a Flatten of an image input, which csdc refuses) -> Linear(64, rows x row) -> reshape to rows of ``row``
(8 x 16 by default; 4 x 49 is the MNIST ViT's attention row) -> Softmax(-1) -> Flatten -> Linear(rows x row, 10),
trained on scikit-learn's digits (seed 0, 80 full-batch Adam steps), exported by
torch.onnx (TorchScript exporter, opset 17) and quantized by csdc's ``--calibrate`` route (onnxruntime
``quantize_static``, QDQ, uint8 activations, int8 per-channel weights, 256 training images); ``bits=4``: converted to
opset 21 and quantized by ``quantize_static`` with uint4 activations and int4 weights (T = 15). Returns the path.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx

ROWS, ROW = 8, 16


def softmax_qdq_model(folder: Path, bits: int = 8, rows: int = ROWS, row: int = ROW) -> Path:
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from csdc.compiler.calibrate import quantize_static_qdq
    from csdc.runtime.datasets import load_digits_split

    x, y = load_digits_split("train")
    x = x.reshape(len(x), 64)

    class RowSoftmax(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(64, rows * row)
            self.head = torch.nn.Linear(rows * row, 10)

        def forward(self, img: torch.Tensor) -> torch.Tensor:
            scores = self.proj(img).reshape(-1, rows, row)
            return self.head(torch.softmax(scores, dim=-1).flatten(1))

    torch.manual_seed(0)
    model = RowSoftmax()
    opt = torch.optim.Adam(model.parameters(), 2e-2)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(80):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()
    tag = "" if (rows, row) == (ROWS, ROW) else f"_{rows}x{row}"
    fp = folder / f"softmax_float17{tag}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, xt[:1], str(fp), input_names=["input"], output_names=["logits"], opset_version=17,
                          dynamo=False, dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
    if bits == 8:
        out = folder / f"softmax_qdq17{tag}.onnx"
        quantize_static_qdq(fp, x[:256], out)
    else:  # 4-bit types need opset 21
        f21 = folder / f"softmax_float21{tag}.onnx"
        onnx.save(onnx.version_converter.convert_version(onnx.load(fp), 21), f21)

        class Reader(CalibrationDataReader):
            def __init__(self) -> None:
                self.batches = iter([{"input": x[i:i + 32]} for i in range(0, 256, 32)])

            def get_next(self):  # type: ignore[no-untyped-def]
                return next(self.batches, None)

        out = folder / f"softmax_qdq21_uint4{tag}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_static(str(f21), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt4,
                            weight_type=QuantType.QInt4)
    onnx.checker.check_model(str(out))
    return out
