"""Datasets csdc runs networks on.

- ``load_digits_split``: scikit-learn's bundled 8x8 digits (no download), as
  float32 images ``(N, 1, 8, 8)`` in [0, 1] (pixel / 16, so a step of 1/16 is exact)
  with int64 labels, split deterministically (stratified, 25% test, random_state 0).
- ``load_npz``: a user data file ``.npz`` with ``x`` (float, laid out as the ONNX
  model's input) and optional integer labels ``y``; every problem raises
  :class:`csdc.errors.DataError` naming the file, the problem and the fix.
- ``iter_batches``: stream a dataset in slices (views, no copy of the whole set).
- ``load_builtin``: a built-in set by name (:data:`BUILTIN_SETS`): ``digits`` or
  ``fashion-mnist`` (the idx files of Debian's ``dataset-fashion-mnist`` package,
  :mod:`csdc.runtime.fashion_mnist`).

A float32 ``x`` stored uncompressed (``numpy.savez``, the usual case) is memory-mapped
instead of read: a 10 000-image file costs no memory up front, and batches are paged in
as they are run. The member's CRC is still checked (in one streaming pass).
"""

from __future__ import annotations

import os
import struct
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np

from csdc.errors import DataError

#: Fraction of the digits set held out as the test split, and the split's seed.
DIGITS_TEST_FRACTION = 0.25
DIGITS_SPLIT_SEED = 0

_DIGITS_SPLITS = ("train", "test", "all")


def load_digits_split(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """Return scikit-learn's digits set as ``(x, y)``.

    ``x`` is float32 ``(N, 1, 8, 8)`` holding pixel / 16 (values k/16, k = 0..16),
    ``y`` is int64 ``(N,)``. ``split`` is ``"train"`` (1347 images), ``"test"``
    (450 images) or ``"all"`` (1797 images, in scikit-learn's order). The split is
    stratified by class and fixed (``random_state=0``), so it is identical on every
    machine and every call.
    """
    if split not in _DIGITS_SPLITS:
        raise DataError(
            f"unknown digits split {split!r}: use one of {', '.join(_DIGITS_SPLITS)}"
        )
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data.astype(np.float32) / np.float32(16.0)).reshape(-1, 1, 8, 8)
    y = digits.target.astype(np.int64)
    if split == "all":
        return np.ascontiguousarray(x), y
    idx = np.arange(len(y))
    train_idx, test_idx = train_test_split(
        idx,
        test_size=DIGITS_TEST_FRACTION,
        random_state=DIGITS_SPLIT_SEED,
        stratify=y,
    )
    sel = np.sort(train_idx if split == "train" else test_idx)
    return np.ascontiguousarray(x[sel]), y[sel]


def _memmap_member(path: str, key: str) -> np.ndarray | None:
    """Memory-map array ``key`` of the .npz at ``path`` when it is stored uncompressed as a
    C-ordered float32 array whose CRC checks out; ``None`` when it cannot (then the caller
    reads it normally, which reports any problem)."""
    try:
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo(key + ".npy")
        if info.compress_type != zipfile.ZIP_STORED:
            return None
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if len(local) < 30 or local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = struct.unpack("<HH", local[26:30])
            start = info.header_offset + 30 + name_len + extra_len
            f.seek(start)
            crc, left = 0, info.file_size
            while left > 0:
                block = f.read(min(left, 1 << 22))
                if not block:
                    return None
                crc = zlib.crc32(block, crc)
                left -= len(block)
            if crc != info.CRC:
                return None
            f.seek(start)
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                return None
            offset = f.tell()
        if fortran or dtype != np.dtype(np.float32) or len(shape) == 0:
            return None
        if offset - start + int(np.prod(shape)) * dtype.itemsize != info.file_size:
            return None
        return np.memmap(path, dtype=dtype, mode="r", shape=shape, offset=offset)
    except (OSError, ValueError, KeyError, zipfile.BadZipFile, struct.error):
        return None


def load_npz(
    path: str | os.PathLike[str], input_shape: tuple[int, ...] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a user data file ``.npz`` holding ``x`` and optionally ``y``.

    ``x`` must be a floating array ``(N, ...)`` laid out exactly as the ONNX model's
    input; it is returned as float32. ``y``, if present, must hold N integer labels
    and is returned as int64. ``input_shape`` is the model's input shape *without*
    the batch dimension (e.g. ``(1, 8, 8)``); ``None`` skips the shape check, and an
    entry that is not a positive int (``None``, a symbolic name) matches any size.
    The file is read with ``allow_pickle=False``; a float32 ``x`` stored uncompressed is
    returned as a read-only ``numpy.memmap`` (see the module docstring). Any problem raises
    :class:`csdc.errors.DataError` naming the file.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise DataError(f"{name}: data file not found; check the path")
    if os.path.isdir(name):
        raise DataError(f"{name}: is a directory, not a .npz data file")
    try:
        archive = np.load(name, allow_pickle=False)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{name}: not a readable .npz file ({exc}); save the data with "
            "numpy.savez(path, x=x, y=y)"
        ) from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(
            f"{name}: is a single .npy array, not a .npz archive; save the data with "
            "numpy.savez(path, x=x, y=y)"
        )
    with archive:
        keys = set(archive.files)
        if "x" not in keys:
            found = ", ".join(sorted(keys)) or "nothing"
            raise DataError(
                f"{name}: no array 'x' in the file (found: {found}); save the inputs "
                "as numpy.savez(path, x=x, y=y)"
            )
        try:
            x = _memmap_member(name, "x")
            if x is None:
                x = archive["x"]
            y = archive["y"] if "y" in keys else None
        except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
            raise DataError(
                f"{name}: corrupt or unreadable array in the .npz file ({exc}); "
                "write the file again with numpy.savez"
            ) from exc
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(
            f"{name}: 'x' has dtype {x.dtype}, expected a floating type as fed to the "
            "ONNX model; convert it, e.g. x = x.astype(numpy.float32) (and divide by "
            "the pixel range, e.g. / 255, if the model expects values in [0, 1])"
        )
    if x.ndim == 0 or x.shape[0] == 0:
        raise DataError(f"{name}: 'x' is empty (shape {x.shape}); it needs at least one sample")
    if input_shape is not None:
        expected = tuple(input_shape)
        got = tuple(int(d) for d in x.shape[1:])
        fits = len(got) == len(expected) and all(
            not isinstance(e, (int, np.integer)) or int(e) <= 0 or int(e) == g
            for e, g in zip(expected, got)
        )
        if not fits:
            raise DataError(
                f"{name}: 'x' has shape {tuple(x.shape)}, i.e. samples of shape {got}, "
                f"but the model input expects (N, {', '.join(map(str, expected))}) "
                f"[expected per-sample {expected}, got {got}]; reshape or transpose x "
                "to the model's layout (N x C x H x W)"
            )
    if y is not None:
        if not (np.issubdtype(y.dtype, np.integer) or y.dtype == np.bool_):
            raise DataError(
                f"{name}: 'y' has dtype {y.dtype}, expected integer class labels; "
                "convert them, e.g. y = y.astype(numpy.int64)"
            )
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DataError(
                f"{name}: 'y' has shape {tuple(y.shape)} but 'x' has {x.shape[0]} "
                f"samples; 'y' must be a 1-D array of {x.shape[0]} labels"
            )
        y = y.astype(np.int64, copy=False)
    return x.astype(np.float32, copy=False), y


def iter_batches(
    x: np.ndarray, y: np.ndarray | None, batch_size: int
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Yield ``(x[i:i+batch_size], y[i:i+batch_size])`` slices in order.

    The slices are views, so the whole set is never copied; ``y`` may be ``None``
    (then ``None`` is yielded in its place). The last batch may be smaller.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(x)
    if y is not None and len(y) != n:
        raise DataError(f"x has {n} samples but y has {len(y)} labels")
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        yield x[start:stop], (None if y is None else y[start:stop])


#: Names of the built-in data sets (``--data NAME`` / ``--dataset NAME``).
BUILTIN_SETS = ("digits", "fashion-mnist")


def load_builtin(name: str, split: str = "test", data_dir: str | os.PathLike[str] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of built-in set ``name`` (one of :data:`BUILTIN_SETS`) and ``split``.

    ``data_dir`` points at the files of a set that lives on disk (fashion-mnist); it is an
    error for digits, which scikit-learn ships."""
    if name == "digits":
        if data_dir is not None:
            raise DataError("--data-dir applies to fashion-mnist only; digits ships with scikit-learn")
        return load_digits_split(split)
    if name == "fashion-mnist":
        from csdc.runtime.fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(split, data_dir)
    raise DataError(f"unknown data set {name!r}: the built-in sets are {', '.join(BUILTIN_SETS)}")
