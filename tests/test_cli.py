"""The command line: the worked example, and every kind of bad input gets a clear message,
a non-zero exit code and no partial output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest

from csdc.cli import main

ROOT = os.path.join(os.path.dirname(__file__), "..")
MODEL = os.path.join(ROOT, "examples", "digits_cnn", "model.onnx")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "compiler"))
from onnx_build import Builder, with_ops  # noqa: E402


@pytest.fixture(scope="module")
def sir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "digits.sir"
    assert main(["compile", MODEL, "-o", str(out)]) == 0
    return out


def test_compile_run_inspect(sir, tmp_path, capsys):
    res = tmp_path / "results.npz"
    assert main(["run", str(sir), "--data", "digits", "--compare", MODEL, "--limit", "100", "--output", str(res),
                 "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["samples"] == 100 and summary["comparison"]["agreement"] >= 0.99
    with np.load(res, allow_pickle=False) as f:
        assert f["logits"].dtype == np.float32 and f["logits"].shape == (100, 10)
        assert f["labels"].shape == (100,)
    assert main(["run", str(sir), "--backend", "reference", "--limit", "20"]) == 0
    text = capsys.readouterr().out
    for word in ("SNN accuracy", "synaptic operations   not measured", "energy estimate", "wall time"):
        assert word in text
    assert main(["inspect", str(sir)]) == 0
    assert "Neuron" in capsys.readouterr().out


def test_run_with_npz_and_delay_override(sir, tmp_path, capsys):
    from csdc.runtime.datasets import load_digits_split

    x, y = load_digits_split("test")
    np.savez(tmp_path / "d.npz", x=x[:30], y=y[:30])
    assert main(["run", str(sir), "--data", str(tmp_path / "d.npz"), "--delay", "2", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["delay"] == 2 and s["samples"] == 30


def _fails(argv, capsys, *words):
    code = main(argv)
    err = capsys.readouterr().err
    assert code != 0, err
    for w in words:
        assert w in err, err
    return err


def test_unsupported_ops_listed_and_nothing_written(tmp_path, capsys):
    path = tmp_path / "bad.onnx"
    onnx.save(with_ops(["Softmax", "LayerNormalization", "Gelu"]), path)
    out = tmp_path / "bad.sir"
    _fails(["compile", str(path), "-o", str(out)], capsys, "Softmax", "LayerNormalization", "Gelu", "bad.onnx")
    assert os.listdir(tmp_path) == ["bad.onnx"]


def test_float_model_refused(tmp_path, capsys):
    b = Builder((1, 1, 8, 8))
    m = b.model(b.gemm(b.node("Flatten", [b.node("Relu", [b.conv("x", 1, 4)])], axis=1), 256, 10), (1, 10))
    onnx.save(m, tmp_path / "float.onnx")
    _fails(["compile", str(tmp_path / "float.onnx"), "-o", str(tmp_path / "f.sir")], capsys, "float model", "quantize")
    assert not (tmp_path / "f.sir").exists()


def test_corrupt_and_missing_onnx(tmp_path, capsys):
    bad = tmp_path / "corrupt.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 50)
    _fails(["compile", str(bad), "-o", str(tmp_path / "x.sir")], capsys, "corrupt.onnx", "not a readable ONNX model")
    truncated = tmp_path / "trunc.onnx"
    truncated.write_bytes(open(MODEL, "rb").read()[:2000])
    _fails(["compile", str(truncated), "-o", str(tmp_path / "x.sir")], capsys, "trunc.onnx")
    _fails(["compile", str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "x.sir")], capsys, "nope.onnx", "no such file")
    assert not (tmp_path / "x.sir").exists()


def test_dataset_shape_mismatch(sir, tmp_path, capsys):
    np.savez(tmp_path / "wrong.npz", x=np.zeros((4, 3, 32, 32), np.float32))
    _fails(["run", str(sir), "--data", str(tmp_path / "wrong.npz")], capsys, "wrong.npz", "(1, 8, 8)")
    _fails(["run", str(sir), "--data", str(tmp_path / "missing.npz")], capsys, "missing.npz")


def test_bad_sir_file(tmp_path, capsys):
    p = tmp_path / "broken.sir"
    p.write_bytes(b"PK\x03\x04 not really")
    _fails(["run", str(p)], capsys, "broken.sir")
    _fails(["inspect", str(tmp_path / "absent.sir")], capsys, "absent.sir", "csdc compile")


def test_console_script_exit_code(tmp_path):
    exe = os.path.join(os.path.dirname(sys.executable), "csdc")
    proc = subprocess.run([exe, "compile", str(tmp_path / "none.onnx"), "-o", str(tmp_path / "o.sir")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "no such file" in proc.stderr
    help_text = subprocess.run([exe, "run", "--help"], capture_output=True, text=True).stdout
    for opt in ("--backend", "--data", "--compare", "--batch", "--limit", "--delay", "--output", "--json"):
        assert opt in help_text


def test_sweep_table_and_plot(sir, tmp_path, capsys):
    png = tmp_path / "sweep.png"
    assert main(["sweep", str(sir), "--delays", "0,T", "--limit", "60", "--compare", MODEL, "--plot", str(png), "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["delay"] for r in rows] == [0, 15]
    assert rows[1]["agreement"] >= 0.99 and rows[0]["latency_steps"] == 15 and rows[1]["latency_steps"] == 45
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    _fails(["sweep", str(sir), "--delays", "a..b"], capsys, "--delays")
