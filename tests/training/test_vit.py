"""The standard ViT (csdc.training.vit) trained in float, its exports by torch.onnx (TorchScript at
opsets 16 / 17 / 20, dynamo at 18 / 20: which ops each really writes), ``csdc train --model vit``,
and its post-training quantization by onnxruntime's quantize_static (csdc.compiler.calibrate)."""

from __future__ import annotations

import collections

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from csdc.runtime.datasets import load_digits_split

torch = pytest.importorskip("torch")

from csdc.compiler.calibrate import calibration_images, is_float_model, quantize_static_qdq  # noqa: E402
from csdc.training.loop import onnx_predict, predict_logits, train  # noqa: E402
from csdc.training.vit import EXPORTERS, ViT, build_vit, export_vit_onnx  # noqa: E402

TINY = {"img_size": 8, "depth": 1, "dim": 16, "heads": 2, "mlp_ratio": 2.0}
#: quantize_static (uint8 activations, int8 per-channel weights) may cost at most this much accuracy (fraction)
#: on the digits test split; measured: the 30-epoch digits ViT of docs/vit.md loses none.
QDQ_MARGIN = 0.03


@pytest.fixture(scope="module")
def digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return (*load_digits_split("train"), *load_digits_split("test"))


@pytest.fixture(scope="module")
def tiny_vit(digits) -> ViT:
    x_tr, y_tr, _, _ = digits
    model = build_vit(0, **TINY)
    train(model, x_tr, y_tr, epochs=6, lr=5e-3, seed=0, progress=False)
    return model


@pytest.fixture(scope="module")
def tiny_onnx(tiny_vit, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("vit") / "vit.onnx"
    export_vit_onnx(tiny_vit, path)
    return str(path)


#: The ops each exporter writes for the model (docs/vit.md). LayerNorm as one op from opset 17; GELU as
#: one op from opset 20, before that its erf form; at opset 16 LayerNorm is decomposed.
NONLINEAR = {
    ("torchscript", 17): {"LayerNormalization": 3, "Softmax": 1, "Erf": 1},
    ("torchscript", 20): {"LayerNormalization": 3, "Softmax": 1, "Gelu": 1},
    ("torchscript", 16): {"ReduceMean": 7, "Sub": 3, "Pow": 3, "Sqrt": 3, "Softmax": 1, "Erf": 1},
    ("dynamo", 18): {"LayerNormalization": 3, "Softmax": 1, "Erf": 1},
    ("dynamo", 20): {"LayerNormalization": 3, "Softmax": 1, "Gelu": 1},
}


@pytest.mark.parametrize("exporter,opset", EXPORTERS)
def test_exports_write_the_documented_ops_and_run_in_onnxruntime(tiny_vit, digits, exporter, opset) -> None:
    proto = export_vit_onnx(tiny_vit, opset=opset, exporter=exporter)
    ops = collections.Counter(n.op_type for n in proto.graph.node)
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == opset
    for op, count in NONLINEAR[(exporter, opset)].items():
        assert ops[op] == count, (op, dict(ops))
    # constant shapes only: no Shape / Gather / Concat for the batch-dynamic reshapes
    assert not {"Shape", "Gather", "Concat", "Expand"} & set(ops), dict(ops)
    assert "LayerNormalization" not in ops if opset < 17 else "Gelu" not in ops if opset < 20 else "Erf" not in ops
    assert is_float_model(proto)
    x_te = digits[2][:64]
    assert np.abs(onnx_predict(proto, x_te) - predict_logits(tiny_vit, x_te)).max() < 1e-4


def test_vit_learns_digits_and_the_onnx_equals_pytorch(tiny_vit, tiny_onnx, digits) -> None:
    _, _, x_te, y_te = digits
    ox = onnx_predict(tiny_onnx, x_te)
    assert np.mean(ox.argmax(1) == y_te) > 0.6  # a 1-block, width-16 model after 6 epochs
    assert np.mean(ox.argmax(1) == predict_logits(tiny_vit, x_te).argmax(1)) >= 0.99


def test_bad_configurations_are_refused() -> None:
    with pytest.raises(ValueError, match="divisible"):
        ViT(dim=10, heads=4)
    with pytest.raises(ValueError, match="patch"):
        ViT(img_size=8, patch=3)
    with pytest.raises(ValueError, match="exporter"):
        export_vit_onnx(ViT(**TINY), exporter="jit")


def test_quantize_static_gives_a_qdq_model_onnxruntime_runs_within_the_margin(tiny_onnx, digits, tmp_path) -> None:
    x_tr, _, x_te, y_te = digits
    calib = calibration_images("digits", onnx.load(tiny_onnx))
    assert calib.shape == (len(x_tr), 1, 8, 8) and np.array_equal(calib, x_tr)  # the training split
    out = tmp_path / "vit.qdq.onnx"
    q = quantize_static_qdq(tiny_onnx, calib, out)
    assert out.exists() and not is_float_model(q)
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    dq_of = {n.output[0]: n for n in q.graph.node if n.op_type == "DequantizeLinear"}
    weights = 0
    for n in q.graph.node:
        if n.op_type in ("Conv", "Gemm") or (n.op_type == "MatMul" and n.input[1] in dq_of
                                             and dq_of[n.input[1]].input[0] in inits):
            dq = dq_of[n.input[1]]
            w, scale, zp = (inits[i] for i in dq.input)
            assert w.dtype == np.int8 and not zp.any() and w.min() >= -127  # symmetric
            assert scale.ndim == 1 and scale.size > 1  # per output channel
            weights += 1
        if n.op_type == "QuantizeLinear":
            assert inits[n.input[2]].dtype == np.uint8
    assert weights == 1 + 6 + 1  # patch conv, q/k/v/proj/fc1/fc2 of the block, head
    soft = [n for n in q.graph.node if n.op_type == "Softmax"]
    assert len(soft) == 1
    (q_soft,) = [n for n in q.graph.node if n.op_type == "QuantizeLinear" and n.input[0] == soft[0].output[0]]
    # onnxruntime fixes the softmax range to [0, 1] rather than calibrating it
    assert np.isclose(inits[q_soft.input[1]], 1 / 255) and inits[q_soft.input[2]] == 0
    acc_float = np.mean(onnx_predict(tiny_onnx, x_te).argmax(1) == y_te)
    acc_qdq = np.mean(onnx_predict(q, x_te).argmax(1) == y_te)
    assert acc_qdq >= acc_float - QDQ_MARGIN, (acc_float, acc_qdq)


def test_cli_train_vit(tmp_path, capsys) -> None:
    from csdc.cli import main

    out = tmp_path / "vit.onnx"
    assert main(["train", "--model", "vit", "--depth", "1", "--dim", "16", "--heads", "2", "--epochs", "1",
                 "--opset", "20", "--no-progress", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("training ViT-1-16 (heads 2, MLP ratio 2), float")
    assert "float, opset 20" in text and f"csdc compile {out} --calibrate digits --nonlinear mbe" in text
    proto = onnx.load(out)
    assert {"Gelu", "LayerNormalization", "Softmax"} <= {n.op_type for n in proto.graph.node}
    assert is_float_model(proto)


@pytest.mark.parametrize("argv,words", [
    (["--levels", "4"], "--levels and --weight-bits do not apply to --model vit"),
    (["--input-levels", "16"], "--input-levels does not apply to --model vit"),
])
def test_cli_train_vit_refuses_quantizer_options(tmp_path, capsys, argv, words) -> None:
    from csdc.cli import main

    out = tmp_path / "vit.onnx"
    assert main(["train", "--model", "vit", *argv, "-o", str(out)]) == 2
    assert words in capsys.readouterr().err and not out.exists()


def test_cli_train_opset_is_for_vit_only(tmp_path, capsys) -> None:
    from csdc.cli import main

    out = tmp_path / "m.onnx"
    assert main(["train", "--model", "csdformer", "--opset", "20", "-o", str(out)]) == 2
    assert "--opset applies to --model vit only" in capsys.readouterr().err and not out.exists()


def _studies():
    import importlib.util
    import os

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    spec = importlib.util.spec_from_file_location("vit_studies", os.path.join(root, "scripts", "vit_studies.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("opset,loose", [(17, {"Div", "Erf"}), (20, set()),
                                         (16, {"ReduceMean", "Sub", "Pow", "Sqrt", "Div", "Erf"})])
def test_studies_find_what_quantize_static_leaves_in_float(tiny_vit, digits, tmp_path, opset, loose) -> None:
    """docs/vit.md: onnxruntime leaves GELU's Div -> Erf (opset 17) and the decomposed LayerNorm (opset 16) in
    float between its quantizers; at opset 20 every op reads a DequantizeLinear and feeds a QuantizeLinear."""
    studies = _studies()
    src = tmp_path / f"vit{opset}.onnx"
    export_vit_onnx(tiny_vit, src, opset=opset)
    q = quantize_static_qdq(src, digits[0][:256])
    census, paths = studies.float_paths(q)
    assert {p.rsplit("(", 1)[1].rstrip(")") for p in paths} == loose
    assert census.get("Softmax") == 1 and (census.get("LayerNormalization") == 3) == (opset >= 17)
    row = {"set": "digits", "export": f"opset{opset}", "float_acc": 0.9, "qdq_acc": 0.9, "float_qdq_agreement": 1.0,
           "nonlinear": census, "snn": {"None": {"refused": "m.onnx: 1 node(s) cannot be converted to a spiking "
                                                            "network:\n  - node 'a' (op Softmax): why"}}}
    assert "| refused: Softmax |" in studies.markdown([row]).splitlines()[-1]


def test_studies_tabulate_and_plot_the_bases_sweep(tmp_path) -> None:
    studies = _studies()
    run = {"snn_acc": 0.95, "latency": 300, "agreement": 0.99, "spikes": 12345.0, "energy_uj": 1.5, "compile_s": 3.0,
           "ops": [{"op": "gelu", "bases": 4, "steps": 16, "latency_steps": 255, "max_abs_error": 0.25}]}
    rows = [{"set": "digits", "export": "opset17", "qdq_acc": 0.96, "float_acc": 0.97,
             "snn": {"None": run, "2/None": dict(run, snn_acc=0.9), "None/8": dict(run, agreement=0.98)}},
            {"set": "digits", "export": "opset20", "qdq_acc": 0.96, "float_acc": 0.97, "snn": {"None": {"refused": "x"}}}]
    table = studies.sweep_markdown(rows).splitlines()
    assert len(table) == 5 and table[3] == "| digits | K = 2 | 90.00 % | 96.00 % | 99.00 % | 300 | 0.01 M | 1.5 uJ |"
    assert table[4].startswith("| digits | S = 8 | 95.00 % |")
    assert studies.markdown(rows).splitlines()[2] == ("| digits | opset17 | 97.00 % | 96.00 % | 95.00 % | 99.00 % | 300 | "
                                                      "0.01 M | 1.5 uJ | 3 s |")
    assert "| digits | opset17 | gelu | 1 | 4x16 | 255 | 0.25 |" in studies.ops_markdown(rows)
    assert studies.plot(rows, str(tmp_path / "sweep.png")) and (tmp_path / "sweep.png").stat().st_size > 0
    assert studies.sweep_markdown(rows[1:]) == "" and not studies.plot(rows[1:], str(tmp_path / "none.png"))
