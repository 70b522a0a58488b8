"""The ``.sir`` file: a spiking network on disk, loaded without executing code.

A ``.sir`` file is a ZIP archive with

- ``header.json``: format name and ``format_version``, T, metadata, and the nodes in
  topological order (name, op type, inputs, JSON attributes, and for each array its
  entry name, dtype, shape and SHA-256);
- ``arrays/<n>.npy``: the arrays in numpy's ``.npy`` format, read with ``allow_pickle=False``; an
  array that is a broadcast view in memory (per-channel values of a population) is stored in its
  compact form and its header entry names the full shape (``broadcast_to``);
- ``header.sha256``: the SHA-256 of ``header.json``.

Loading checks the archive, both digests, the version (older versions are upgraded by the
functions in ``UPGRADES``), that every op is a registered IR op, and finally verifies the
network. Files are written to a temporary file in the target folder and renamed into place,
so an interrupted write never leaves a partial ``.sir``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
import zlib
from typing import Callable

import numpy as np

from csdc.errors import CsdcError, IRError, SirFormatError
from csdc.ir.graph import Network
from csdc.ir.ops import compact, narrowest, op_from_dict

FORMAT_NAME = "csdc-sir"
FORMAT_VERSION = 2


def _upgrade_1(header: dict) -> dict:
    """Version 1 stored synapse weights as one ``weight`` array; version 2 as mantissa and exponent."""
    for node in header["nodes"]:
        if node["op"] in ("DenseSynapse", "ConvSynapse", "DiagonalSynapse") and "weight" in node["arrays"]:
            node["arrays"]["mantissa"] = node["arrays"].pop("weight")
            node["attributes"]["exponent"] = 0
    return {**header, "format_version": 2}


# version -> function turning a header of that version into one of the next version
UPGRADES: dict[int, Callable[[dict], dict]] = {1: _upgrade_1}
# what zipfile raises on a damaged archive: bad CRC or structure, a broken deflate stream, a
# stream that ends early, a forged compression method / version / encryption flag
_ARCHIVE_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError, OSError, ValueError)


class _HashingWriter:
    """A file-like sink that forwards writes and hashes them (an array is streamed, never held twice)."""

    def __init__(self, fh) -> None:
        self.fh, self.sha = fh, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.fh.write(data)


def write_archive(net: Network, fh) -> None:
    """Write ``net`` as a .sir archive to the binary file object ``fh`` (arrays streamed one by one)."""
    nodes = []
    with zipfile.ZipFile(fh, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        for name, op in net.nodes():
            arrays = {}
            for field, arr in op.arrays().items():
                stored = compact(arr)
                key = f"arrays/{len(nodes)}_{field}.npy"
                with zf.open(key, "w", force_zip64=True) as entry:
                    sink = _HashingWriter(entry)
                    np.lib.format.write_array(sink, np.ascontiguousarray(narrowest(stored)), allow_pickle=False)
                desc = {"entry": key, "dtype": str(arr.dtype), "shape": list(stored.shape), "sha256": sink.sha.hexdigest()}
                if stored.shape != arr.shape:
                    desc["broadcast_to"] = list(arr.shape)
                arrays[field] = desc
            nodes.append({"name": name, "op": type(op).__name__, "inputs": net.inputs(name),
                          "attributes": op.attributes(), "arrays": arrays})
        header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "T": net.T,
                  "metadata": net.metadata, "nodes": nodes}
        header_bytes = json.dumps(header, indent=1, sort_keys=True).encode()
        zf.writestr("header.json", header_bytes)
        zf.writestr("header.sha256", hashlib.sha256(header_bytes).hexdigest())


def to_bytes(net: Network) -> bytes:
    """Serialize a network to the bytes of a .sir file."""
    buf = io.BytesIO()
    write_archive(net, buf)
    return buf.getvalue()


def write_atomic(path: str | os.PathLike, data: bytes | Callable) -> None:
    """Write ``data`` (bytes, or a function writing to a binary file object) to ``path`` through a
    temporary file renamed into place."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise CsdcError(f"cannot write '{path}': folder '{folder}' does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as fh:
            if callable(data):
                data(fh)
            else:
                fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save(net: Network, path: str | os.PathLike) -> None:
    """Verify ``net`` and write it atomically as a .sir file."""
    net.verify()
    write_atomic(path, lambda fh: write_archive(net, fh))


def from_bytes(data: bytes, source: str = "<bytes>") -> Network:
    """Parse and check the bytes of a .sir file."""
    def fail(msg: str) -> SirFormatError:
        return SirFormatError(f"{source}: {msg}")

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        names = set(zf.namelist())
    except _ARCHIVE_ERRORS as exc:
        raise fail(f"not a .sir file or truncated ({exc}); recompile it with 'csdc compile'") from None
    with zf:
        if not {"header.json", "header.sha256"} <= names:
            raise fail("missing header; the file is truncated or not a .sir file: recompile it with 'csdc compile'")
        try:
            header_bytes = zf.read("header.json")
            digest = zf.read("header.sha256").decode().strip()
        except _ARCHIVE_ERRORS as exc:
            raise fail(f"damaged archive ({exc}); recompile it") from None
        if hashlib.sha256(header_bytes).hexdigest() != digest:
            raise fail("header checksum mismatch: the file was modified or corrupted; recompile it")
        try:
            header = json.loads(header_bytes)
        except (ValueError, RecursionError) as exc:
            raise fail(f"header is not valid JSON ({exc}); recompile it") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise fail(f"not a {FORMAT_NAME} file; compile one with 'csdc compile'")
        version = header.get("format_version")
        if not isinstance(version, int):
            raise fail("header has no integer format_version; recompile it")
        if version > FORMAT_VERSION:
            raise fail(f"format version {version} is newer than this csdc supports ({FORMAT_VERSION}); upgrade csdc")
        while version < FORMAT_VERSION:
            if version not in UPGRADES:
                raise fail(f"format version {version} is no longer supported; recompile the model")
            header = UPGRADES[version](header)
            version = header["format_version"]
        try:
            net = Network(header["T"], header.get("metadata", {}))
            for node in header["nodes"]:
                arrays = {}
                for field, desc in node["arrays"].items():
                    try:
                        blob = zf.read(desc["entry"])
                    except (KeyError, *_ARCHIVE_ERRORS) as exc:
                        raise fail(f"node '{node['name']}': array '{field}' unreadable ({exc}); recompile it") from None
                    if hashlib.sha256(blob).hexdigest() != desc["sha256"]:
                        raise fail(f"node '{node['name']}': array '{field}' checksum mismatch (corrupted or tampered); recompile it")
                    arr = np.lib.format.read_array(io.BytesIO(blob), allow_pickle=False)
                    if list(arr.shape) != list(desc["shape"]):
                        raise fail(f"node '{node['name']}': array '{field}' has shape {arr.shape}, header says {desc['shape']}; recompile it")
                    arr = arr.astype(desc["dtype"])
                    arr.flags.writeable = False  # our own array: the op may keep it without a copy
                    if "broadcast_to" in desc:
                        arr = np.broadcast_to(arr, tuple(desc["broadcast_to"]))
                    arrays[field] = arr
                op = op_from_dict(node["op"], node["attributes"], arrays)
                net.add(node["name"], op, node["inputs"])
            net.verify()
        except SirFormatError:
            raise
        except (IRError, KeyError, TypeError, ValueError, AttributeError, ArithmeticError) as exc:
            raise fail(f"invalid network: {exc}; recompile it") from None
    return net


def load(path: str | os.PathLike) -> Network:
    """Load and verify a .sir file."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as fh:
            data = fh.read()
    except FileNotFoundError:
        raise SirFormatError(f"{path}: no such file; compile one with 'csdc compile model.onnx -o {path}'") from None
    except OSError as exc:
        raise SirFormatError(f"{path}: cannot read ({exc})") from None
    return from_bytes(data, source=path)
