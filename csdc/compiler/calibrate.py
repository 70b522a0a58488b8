"""Post-training quantization of a float ONNX model: what ``csdc compile --calibrate DATA`` runs first.

csdc compiles quantized models only; a float model (no quantizer anywhere, e.g. a ViT trained in
float) is first quantized by onnxruntime's ``quantize_static`` (a well-kept library, not a
calibrator of csdc's own) and the resulting QDQ model is compiled like any other:

- ``quant_pre_process`` (onnxruntime's recommended preparation: symbolic shape inference, basic
  graph optimisation; no op fusion), then
- ``quantize_static`` in the **QDQ format** with **MinMax** calibration over the calibration
  images (fed in batches of :data:`BATCH`; at most :data:`CALIBRATION_LIMIT` of them, the first ones),
- **activations uint8, asymmetric** (``QuantType.QUInt8``, ``ActivationSymmetric=False``): a tensor
  calibrated to [min, max] gets 255 levels; for a non-negative tensor (ReLU, Softmax: onnxruntime
  fixes the Softmax output range to [0, 1]: scale 1/255) the zero point is 0. csdc counts
  ``level - lo`` spikes, so every hidden quantizer means T = 255 time steps of its population;
- **weights int8, symmetric, per output channel** (``QuantType.QInt8``, ``WeightSymmetric=True``,
  ``per_channel=True``): zero point 0, levels -127..127 (``reduce_range`` off), so a weight is an
  exact integer times a per-channel scale that folds into the integer thresholds;
- biases int32 with scale ``input scale x weight scale`` (onnxruntime's rule).

These are the choices csdc compiles exactly (the digits CNN's ``model_qdq_static.onnx`` is made
the same way). The QDQ model is written next to the compiled network (:func:`qdq_path`), so the
user can run exactly what was compiled with onnxruntime (``csdc run --compare``).

Calibration data: a built-in set's **training** split (``digits``, ``mnist5k``, ...; never the
test split the accuracy is measured on) or a ``.npz`` with ``x`` laid out as the model's input.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings

import numpy as np
import onnx

from csdc.errors import CsdcError, DataError

__all__ = ["BATCH", "CALIBRATION_LIMIT", "QUANTIZER_OPS", "calibration_images", "is_float_model", "qdq_path",
           "quantize_static_qdq"]

#: Images per calibration batch, and the most images used (the first ones of the set).
BATCH = 64
CALIBRATION_LIMIT = 2000

#: Ops that make a model quantized (ONNX QDQ / QCDQ and QONNX quantizers).
QUANTIZER_OPS = frozenset({"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "Quant", "BipolarQuant",
                           "Trunc", "QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"})


def is_float_model(model: onnx.ModelProto) -> bool:
    """True when no node of the main graph is a quantizer (:data:`QUANTIZER_OPS`)."""
    return not any(node.op_type in QUANTIZER_OPS for node in model.graph.node)


def qdq_path(output: str | os.PathLike[str]) -> str:
    """Where the QDQ model of ``csdc compile -o OUTPUT`` is written: next to it, ``net.sir`` -> ``net.qdq.onnx``."""
    root, _ = os.path.splitext(os.fspath(output))
    return root + ".qdq.onnx"


def _input_shape(model: onnx.ModelProto) -> tuple[int | None, ...]:
    dims = model.graph.input[0].type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in dims[1:])


def calibration_images(spec: str, model: onnx.ModelProto, data_dir: str | None = None,
                       limit: int = CALIBRATION_LIMIT) -> np.ndarray:
    """The calibration images named by ``spec`` for ``model`` (float32, laid out as its input).

    ``spec``: a built-in set (its training split) or a ``.npz`` file with ``x``. At most ``limit``
    images, the first ones. Raises :class:`DataError` naming the file or set for a bad file, a
    shape that does not fit the model's input, or non-finite values."""
    from csdc.runtime.datasets import BUILTIN_SETS, laid_out_as_input, load_builtin, load_npz

    shape = _input_shape(model)
    if spec in BUILTIN_SETS:
        images, _ = load_builtin(spec, "train", data_dir)
        x = laid_out_as_input(images, shape)  # e.g. flattened for a model that takes (N, 64)
        if x is None:
            raise DataError(f"--calibrate {spec}: its images have shape {tuple(images.shape[1:])} but the model's input "
                            f"expects {tuple('?' if e is None else e for e in shape)}; pass your own data as a .npz")
        return np.ascontiguousarray(x[:limit], dtype=np.float32)
    if data_dir is not None:
        raise DataError("--data-dir applies to a built-in set, not to a .npz calibration file")
    if not os.path.exists(spec) and os.sep not in spec and "." not in spec:
        raise DataError(f"--calibrate {spec}: no such file, and not a built-in data set (built-in: "
                        f"{', '.join(BUILTIN_SETS)}); pass a .npz with x (N, ...) float32 laid out as the model's input")
    x, _ = load_npz(spec, shape, limit=limit)
    return np.ascontiguousarray(x, dtype=np.float32)


def quantize_static_qdq(float_model: str | os.PathLike[str], calib_x: np.ndarray,
                        output: str | os.PathLike[str] | None = None, *, per_channel: bool = True,
                        batch: int = BATCH) -> onnx.ModelProto:
    """QDQ model of the float ONNX file ``float_model``, by onnxruntime's ``quantize_static`` with the
    settings of the module docstring, calibrated on ``calib_x``; checked, and written atomically to
    ``output`` if given. ``per_channel=False`` gives one weight scale per tensor."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from csdc.files import write_atomic

    if len(calib_x) == 0:
        raise DataError("no calibration images")
    path = os.fspath(float_model)
    input_name = onnx.load(path, load_external_data=False).graph.input[0].name

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._starts = iter(range(0, len(calib_x), batch))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self._starts, None)
            if start is None:
                return None
            return {input_name: np.ascontiguousarray(calib_x[start:start + batch], dtype=np.float32)}

    root = logging.getLogger()
    level = root.level
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # onnxruntime logs to the root logger, e.g. that a LayerNorm's 1-D scale falls back from per-channel
        root.setLevel(logging.ERROR)
        pre, out = os.path.join(tmp, "pre.onnx"), os.path.join(tmp, "qdq.onnx")
        try:
            quant_pre_process(path, pre)
            quantize_static(pre, out, _Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QUInt8,
                            weight_type=QuantType.QInt8, per_channel=per_channel, reduce_range=False,
                            calibrate_method=CalibrationMethod.MinMax,
                            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True})
        except Exception as exc:  # onnxruntime raises many types for a model it cannot quantize
            cause = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise CsdcError(f"{path}: onnxruntime's quantize_static failed: {type(exc).__name__}: {cause}") from None
        finally:
            root.setLevel(level)
        model = onnx.load(out)
    onnx.checker.check_model(model, full_check=True)
    if output is not None:
        write_atomic(output, model.SerializeToString())
    return model
