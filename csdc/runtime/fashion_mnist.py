"""Fashion-MNIST from the original idx files (Debian's ``dataset-fashion-mnist`` package).

The package installs ``train-images-idx3-ubyte.gz``, ``train-labels-idx1-ubyte.gz``,
``t10k-images-idx3-ubyte.gz`` and ``t10k-labels-idx1-ubyte.gz`` under
``/usr/share/datasets/fashion-mnist/``: 60,000 training and 10,000 test images, 28x28,
8-bit grey levels, 10 classes. Nothing is downloaded: a missing file is a
:class:`~csdc.errors.DataError` that names the package to install, or ``--data-dir`` to
point elsewhere (the files may be gzipped or not).

idx format (big-endian): a magic number ``0x0000 TT NN`` (TT = 0x08 for unsigned bytes,
NN = number of dimensions), NN 32-bit dimension sizes, then the data in C order. Every
header field is checked against the file size before anything is allocated, so a
truncated or foreign file is an error naming it, never a silent short read.

Images are returned as float32 ``(N, 1, 28, 28)`` holding ``pixel / 255`` (an input
quantizer with step 1/255 and 255 levels reads them exactly), labels as int64.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np

from csdc.errors import DataError

#: Where Debian's dataset-fashion-mnist package puts the idx files.
DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
APT_HINT = "install them with 'apt-get install dataset-fashion-mnist' (after 'apt-get update'), or pass --data-dir"

#: The names of the classes, in label order.
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")

_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_UBYTE = 0x08
_MAX_ELEMENTS = 1 << 31  # far above Fashion-MNIST's 47 M pixels; a larger header is not this data set


def read_idx(path: str) -> np.ndarray:
    """The uint8 array of an idx file (``.gz`` or plain), with its header checked against its size."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0:
                raise DataError(f"{path}: not an idx file (bad magic number {head.hex() or 'empty'})")
            if head[2] != _UBYTE:
                raise DataError(f"{path}: idx element type 0x{head[2]:02x}, expected 0x08 (unsigned bytes)")
            ndim = head[3]
            if not 1 <= ndim <= 4:
                raise DataError(f"{path}: idx header declares {ndim} dimensions, expected 1 to 4")
            dims_raw = f.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{path}: truncated idx header")
            dims = struct.unpack(f">{ndim}I", dims_raw)
            count = 1
            for d in dims:
                count *= d
            if count == 0 or count > _MAX_ELEMENTS:
                raise DataError(f"{path}: idx header declares shape {dims} ({count} elements); not a data set csdc reads")
            data = f.read(count + 1)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read the idx file ({exc})") from None
    if len(data) != count:
        raise DataError(f"{path}: idx header declares shape {dims} ({count} bytes) but the file holds "
                        f"{'more' if len(data) > count else len(data)} bytes of data")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find(directory: str, stem: str) -> str:
    for name in (stem + ".gz", stem):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raise DataError(f"Fashion-MNIST file {stem}(.gz) not found in {directory}; {APT_HINT}")


def load_fashion_mnist(split: str = "test", data_dir: str | os.PathLike[str] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` of the Fashion-MNIST ``split`` ("train": 60,000 images, "test": 10,000).

    ``x`` is float32 ``(N, 1, 28, 28)`` holding pixel / 255, ``y`` int64 labels 0..9.
    ``data_dir`` defaults to :data:`DEFAULT_DIR`."""
    if split not in _FILES:
        raise DataError(f"unknown Fashion-MNIST split {split!r}: use 'train' or 'test'")
    directory = os.fspath(data_dir) if data_dir is not None else DEFAULT_DIR
    if not os.path.isdir(directory):
        raise DataError(f"Fashion-MNIST folder {directory} does not exist; {APT_HINT}")
    img_stem, lab_stem = _FILES[split]
    images = read_idx(_find(directory, img_stem))
    labels = read_idx(_find(directory, lab_stem))
    if images.ndim != 3 or images.shape[1:] != (28, 28):
        raise DataError(f"{directory}/{img_stem}: images of shape {images.shape[1:]}, expected 28x28")
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{directory}/{lab_stem}: {labels.shape} labels for {len(images)} images")
    if int(labels.max()) >= len(CLASSES):
        raise DataError(f"{directory}/{lab_stem}: label {int(labels.max())} outside 0..{len(CLASSES) - 1}")
    x = (images.astype(np.float32) / np.float32(255.0)).reshape(-1, 1, 28, 28)
    return np.ascontiguousarray(x), labels.astype(np.int64)


__all__ = ["CLASSES", "DEFAULT_DIR", "load_fashion_mnist", "read_idx"]
