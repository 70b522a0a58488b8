"""Fashion-MNIST reader: idx parsing and validation on crafted files, the real package files when
installed, and the built-in set through ``csdc train`` / ``csdc run``."""

from __future__ import annotations

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

from csdc.errors import DataError
from csdc.runtime.datasets import BUILTIN_SETS, load_builtin
from csdc.runtime.fashion_mnist import DEFAULT_DIR, load_fashion_mnist, read_idx


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(np.uint8).tobytes()


def write_set(folder, n_train: int = 60, n_test: int = 20, gz: bool = True, seed: int = 0):
    """A small Fashion-MNIST-shaped data set in idx files; images carry their class in a
    bright band, so that a tiny model can learn them."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for split, stem, n in (("train", "train", n_train), ("test", "t10k", n_test)):
        y = (np.arange(n) % 10).astype(np.uint8)
        x = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
        for i, c in enumerate(y):
            x[i, 2 * c + 4: 2 * c + 7, :] = 250
        for name, arr in ((f"{stem}-images-idx3-ubyte", x), (f"{stem}-labels-idx1-ubyte", y)):
            data = idx_bytes(arr)
            if gz:
                with gzip.open(folder / (name + ".gz"), "wb") as f:
                    f.write(data)
            else:
                (folder / name).write_bytes(data)
        out[split] = (x, y)
    return out


@pytest.mark.parametrize("gz", [True, False])
def test_reads_idx_files_gzipped_or_plain(tmp_path, gz):
    raw = write_set(tmp_path, gz=gz)
    x, y = load_fashion_mnist("train", tmp_path)
    assert x.shape == (60, 1, 28, 28) and x.dtype == np.float32
    assert y.dtype == np.int64 and np.array_equal(y, raw["train"][1])
    assert np.array_equal(np.rint(x[:, 0] * 255).astype(np.uint8), raw["train"][0])
    xt, yt = load_builtin("fashion-mnist", "test", tmp_path)
    assert xt.shape == (20, 1, 28, 28) and np.array_equal(yt, raw["test"][1])


@pytest.mark.parametrize("data, message", [
    (b"", "bad magic number"),
    (b"\x00\x00\x08", "bad magic number"),
    (b"\x01\x00\x08\x01" + struct.pack(">I", 3) + b"abc", "bad magic number"),
    (b"\x00\x00\x0d\x01" + struct.pack(">I", 3) + b"abc", "element type 0x0d"),
    (b"\x00\x00\x08\x07", "7 dimensions"),
    (b"\x00\x00\x08\x02" + struct.pack(">I", 3), "truncated idx header"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 5) + b"abc", "holds 3 bytes"),
    (b"\x00\x00\x08\x01" + struct.pack(">I", 2) + b"abc", "holds more bytes"),
    (b"\x00\x00\x08\x03" + struct.pack(">3I", 1 << 20, 1 << 20, 1 << 20), "not a data set csdc reads"),
])
def test_bad_idx_files_are_named_errors(tmp_path, data, message):
    path = tmp_path / "bad-idx1-ubyte"
    path.write_bytes(data)
    with pytest.raises(DataError, match=message) as err:
        read_idx(str(path))
    assert str(path) in str(err.value)


def test_corrupt_gzip_is_a_named_error(tmp_path):
    path = tmp_path / "x.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage")
    with pytest.raises(DataError, match="cannot read the idx file"):
        read_idx(str(path))


def test_missing_files_name_the_package(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*dataset-fashion-mnist"):
        load_fashion_mnist("test", tmp_path / "empty")


def test_inconsistent_sets_are_refused(tmp_path):
    write_set(tmp_path, gz=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.zeros(7, np.uint8)))
    with pytest.raises(DataError, match="7,.*labels for 20 images"):
        load_fashion_mnist("test", tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.full(20, 10, np.uint8)))
    with pytest.raises(DataError, match="label 10 outside 0..9"):
        load_fashion_mnist("test", tmp_path)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(idx_bytes(np.zeros((20, 8, 8), np.uint8)))
    with pytest.raises(DataError, match="expected 28x28"):
        load_fashion_mnist("test", tmp_path)


def test_builtin_names():
    assert BUILTIN_SETS == ("digits", "fashion-mnist", "mnist5k")
    with pytest.raises(DataError, match="built-in sets are digits, fashion-mnist, mnist5k"):
        load_builtin("mnist")
    with pytest.raises(DataError, match="--data-dir applies to fashion-mnist only"):
        load_builtin("digits", "test", "/tmp")


@pytest.mark.skipif(not os.path.isdir(DEFAULT_DIR), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_package_files():
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28)
    assert np.array_equal(np.bincount(y), np.full(10, 1000))
    assert 0.0 <= float(x.min()) and float(x.max()) == 1.0
    xtr, ytr = load_fashion_mnist("train")
    assert xtr.shape == (60000, 1, 28, 28) and np.array_equal(np.bincount(ytr), np.full(10, 6000))


def _csdc(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "csdc.cli", *args], capture_output=True, text=True, timeout=600)


def test_train_compile_run_on_the_builtin_set(tmp_path):
    """`csdc train --dataset fashion-mnist`, compile, and `csdc run --data fashion-mnist --compare`
    on a small idx set in --data-dir: the SNN agrees with onnxruntime on every image."""
    pytest.importorskip("torch")
    data = tmp_path / "fmnist"
    write_set(data, n_train=40, n_test=20)
    onnx_path, sir = tmp_path / "m.onnx", tmp_path / "m.sir"
    r = _csdc("train", "--dataset", "fashion-mnist", "--data-dir", str(data), "--dim", "16", "--depth", "1",
              "--heads", "2", "--epochs", "1", "--no-progress", "-o", str(onnx_path))
    assert r.returncode == 0, r.stderr
    assert "Fashion-MNIST (28x28): 40 train / 20 test images" in r.stdout
    r = _csdc("compile", str(onnx_path), "-o", str(sir))
    assert r.returncode == 0, r.stderr
    r = _csdc("run", str(sir), "--data", "fashion-mnist", "--data-dir", str(data), "--compare", str(onnx_path),
              "--json")
    assert r.returncode == 0, r.stderr
    import json

    summary = json.loads(r.stdout)
    assert summary["samples"] == 20
    assert summary["comparison"]["agreement"] == 1.0
    # digits-shaped data for a 28x28 network is a clear error
    r = _csdc("run", str(sir), "--data", "digits")
    assert r.returncode == 2 and "expects (1, 28, 28)" in r.stderr
    r = _csdc("run", str(sir), "--data", "fashion-mnist", "--data-dir", str(tmp_path / "none"))
    assert r.returncode == 2 and "dataset-fashion-mnist" in r.stderr


@pytest.mark.skipif(not os.path.isdir(DEFAULT_DIR),
                    reason="FASHION-MNIST NOT CHECKED: Debian's dataset-fashion-mnist is not installed "
                           "(scripts/setup.sh --test installs it where apt-get runs as root)")
def test_shipped_fashion_csdformer_agrees_with_onnxruntime():
    """The committed reference CSDformer (examples/fashion_csdformer) at default options: on the first
    300 test images the SNN (numba, D = T) agrees with onnxruntime on every image."""
    from csdc.backends.numba import NumbaBackend
    from csdc.compiler.pipeline import compile_onnx
    from csdc.runtime.evaluate import compare, run_dataset

    model = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "fashion_csdformer", "model.onnx")
    net, report = compile_onnx(model)
    assert net.T == 4 and report.delay == 4
    assert report.error_bound < 2 ** -8
    x, y = load_fashion_mnist("test")
    x, y = x[:300], y[:300]
    out = run_dataset(net, NumbaBackend(), x, y, progress=False)
    c = compare(model, out, x, net)
    assert c.agreement == 1.0 and c.warning is None
    assert out.summary.accuracy == c.onnx_accuracy and out.summary.accuracy > 0.85
