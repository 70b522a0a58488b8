"""A small GELU network quantized by onnxruntime, as a user makes it (shared by the MBE tests; not a test module).

``gelu_qdq_models(folder)``: Conv -> Flatten -> Linear -> GELU -> Linear trained on scikit-learn's digits
(seed 0, 60 full-batch Adam steps), exported by torch.onnx (TorchScript exporter) at opset 17 (GELU as
``0.5 x (1 + Erf(x / sqrt 2))``) and 20 (one ``Gelu`` op), each quantized by ``quantize_static`` (QDQ,
MinMax calibration on 256 training images): uint8 activations / int8 weights (T = 255) for both, and
uint4 / int4 at opset 21 (T = 15). Returns ``{"17": path, "20": path, "20-uint4": path}``.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import onnx


def gelu_qdq_models(folder: Path) -> dict[str, Path]:
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from csdc.runtime.datasets import load_digits_split

    x, y = load_digits_split("train")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 32),
                                torch.nn.GELU(), torch.nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    xt, yt = torch.tensor(x), torch.tensor(y)
    for _ in range(60):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(xt), yt).backward()
        opt.step()
    model.eval()

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"input": x[i:i + 32]} for i in range(0, 256, 32)])

        def get_next(self):  # type: ignore[no-untyped-def]
            return next(self.batches, None)

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for opset in (17, 20):
            fp = folder / f"float{opset}.onnx"
            torch.onnx.export(model, xt[:1], str(fp), input_names=["input"], output_names=["logits"],
                              opset_version=opset, dynamo=False, dynamic_axes={"input": {0: "n"}, "logits": {0: "n"}})
            quantize_static(str(fp), str(folder / f"qdq{opset}.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                            activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
            out[str(opset)] = folder / f"qdq{opset}.onnx"
        f21 = folder / "float21.onnx"  # 4-bit types need opset 21
        onnx.save(onnx.version_converter.convert_version(onnx.load(folder / "float20.onnx"), 21), f21)
        quantize_static(str(f21), str(folder / "qdq21-uint4.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        activation_type=QuantType.QUInt4, weight_type=QuantType.QInt4)
        out["20-uint4"] = folder / "qdq21-uint4.onnx"
    return out
