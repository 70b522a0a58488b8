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
network (and proves its arithmetic safe, docs/robustness.md). Files are written by
``csdc.files.write_atomic``: to a temporary file in the target folder, renamed into place,
so an interrupted write never leaves a partial ``.sir``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
import zlib
from typing import Callable

import numpy as np

from csdc.errors import CsdcError, IRError, SirFormatError
from csdc.files import read_npy_header, write_atomic  # noqa: F401 - the atomic writer, also used through this module
from csdc.ir.graph import Network
from csdc.ir.ops import DIM_MAX, ELEMENTS_MAX, RANK_MAX, compact, elements, narrowest, op_from_dict
from csdc.limits import check_budget

FORMAT_NAME = "csdc-sir"
FORMAT_VERSION = 2


def _upgrade_1(header: dict) -> dict:
    """Version 1 stored synapse weights as one ``weight`` array; version 2 as mantissa and exponent."""
    if not isinstance(header.get("nodes"), list) or not all(
            isinstance(n, dict) and isinstance(n.get("arrays"), dict) and isinstance(n.get("attributes"), dict)
            for n in header["nodes"]):
        raise ValueError("'nodes' must be a list of objects with 'arrays' and 'attributes'")
    for node in header["nodes"]:
        if node.get("op") in ("DenseSynapse", "ConvSynapse", "DiagonalSynapse") and "weight" in node["arrays"]:
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


def save(net: Network, path: str | os.PathLike) -> None:
    """Verify ``net`` (structure and arithmetic, as loading will) and write it atomically as a .sir file."""
    net.verify()
    net.verify_arithmetic()  # never write a file that loading would refuse
    write_atomic(path, lambda fh: write_archive(net, fh))


# the dtypes an array may be declared with (what the writer produces: integer parameters, float readout)
_DTYPES = frozenset({"int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64", "float32", "float64"})
HEADER_MAX = 64 * 2**20  # bytes of header.json
_NPY_HEADER_MAX = 2**16  # bytes of an .npy header (numpy writes < 256 for our arrays)


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not a number JSON allows")


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_header(header: dict) -> None:
    """Types of every header field the loader reads; raise ValueError naming the field."""
    if not _is_int(header.get("T")):
        raise ValueError(f"'T' must be an integer, got {header.get('T')!r}")
    if not isinstance(header.get("metadata", {}), dict):
        raise ValueError("'metadata' must be a JSON object")
    nodes = header.get("nodes")
    if not isinstance(nodes, list):
        raise ValueError("'nodes' must be a list")
    for i, node in enumerate(nodes):
        if not isinstance(node, dict):
            raise ValueError(f"nodes[{i}] must be an object")
        where = f"nodes[{i}]"
        if not isinstance(node.get("name"), str):
            raise ValueError(f"{where}: 'name' must be a string")
        where = f"node '{node['name']}'"
        if not isinstance(node.get("op"), str):
            raise ValueError(f"{where}: 'op' must be a string")
        if not isinstance(node.get("inputs"), list) or not all(isinstance(v, str) for v in node["inputs"]):
            raise ValueError(f"{where}: 'inputs' must be a list of node names")
        if not isinstance(node.get("attributes"), dict):
            raise ValueError(f"{where}: 'attributes' must be an object")
        if not isinstance(node.get("arrays"), dict):
            raise ValueError(f"{where}: 'arrays' must be an object")
        for field, desc in node["arrays"].items():
            at = f"{where}: array '{field}'"
            if not isinstance(desc, dict):
                raise ValueError(f"{at}: its description must be an object")
            for key in ("entry", "dtype", "sha256"):
                if not isinstance(desc.get(key), str):
                    raise ValueError(f"{at}: '{key}' must be a string")
            if desc["dtype"] not in _DTYPES:
                raise ValueError(f"{at}: dtype {desc['dtype']!r} is not one of {', '.join(sorted(_DTYPES))}")
            for key in ("shape", "broadcast_to"):
                if key == "broadcast_to" and key not in desc:
                    continue
                v = desc.get(key)
                if not isinstance(v, list) or len(v) > RANK_MAX or not all(_is_int(d) and 0 <= d <= DIM_MAX for d in v):
                    raise ValueError(f"{at}: '{key}' must be a list of at most {RANK_MAX} integers in 0..{DIM_MAX}, got {v!r}")
                if elements(v) > ELEMENTS_MAX:
                    raise ValueError(f"{at}: '{key}' {v} has more than {ELEMENTS_MAX} elements")
            if "broadcast_to" in desc:
                stored, target = desc["shape"], desc["broadcast_to"]
                if len(stored) != len(target) or any(a not in (1, b) for a, b in zip(stored, target)):
                    raise ValueError(f"{at}: stored shape {stored} cannot be broadcast to {target}")


def _read_npy(blob: bytes, desc: dict) -> np.ndarray:
    """The array of an .npy entry, checked against its header description before anything is allocated."""
    fh = io.BytesIO(blob)
    shape, fortran, dtype = read_npy_header(fh)
    if dtype.kind not in "iuf" or dtype.itemsize > 8 or dtype.fields is not None or dtype.subdtype is not None:
        raise ValueError(f"stored dtype {dtype} is not a plain integer or float type")
    if list(shape) != list(desc["shape"]):
        raise ValueError(f"has shape {tuple(shape)}, header says {desc['shape']}")
    if fortran and len(shape) > 1:
        raise ValueError("is stored in Fortran order; csdc writes C order")
    data = blob[fh.tell():]
    if len(data) != elements(shape) * dtype.itemsize:
        raise ValueError(f"holds {len(data)} bytes of data, its shape {tuple(shape)} and dtype {dtype} need "
                         f"{elements(shape) * dtype.itemsize}")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    target = np.dtype(desc["dtype"])
    if target.kind in "iu":
        if arr.dtype.kind not in "iu":
            raise ValueError(f"stores {arr.dtype} values for a {target} array")
        if arr.size:
            info = np.iinfo(target)
            lo, hi = int(arr.min()), int(arr.max())
            if lo < info.min or hi > info.max:
                raise ValueError(f"values [{lo}, {hi}] do not fit its dtype {target}")
    elif not np.all(np.isfinite(arr)):
        raise ValueError("has non-finite values")
    out = arr.astype(target.newbyteorder("="))
    out.flags.writeable = False  # our own array: the op may keep it without a copy
    return out


def from_bytes(data: bytes, source: str = "<bytes>") -> Network:
    """Parse and check the bytes of a .sir file: structure, digests, types and ranges of every field, sizes
    against the memory budget before anything is decompressed or allocated, then the network (shapes,
    and the arithmetic of every backend, ``Network.verify_arithmetic``). Every problem is a
    SirFormatError naming the file and the node / array / field."""
    def fail(msg: str) -> SirFormatError:
        return SirFormatError(f"{source}: {msg}")

    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        infos = {i.filename: i for i in zf.infolist()}
    except _ARCHIVE_ERRORS as exc:
        raise fail(f"not a .sir file or truncated ({exc}); recompile it with 'csdc compile'") from None
    with zf:
        if not {"header.json", "header.sha256"} <= set(infos):
            raise fail("missing header; the file is truncated or not a .sir file: recompile it with 'csdc compile'")
        if infos["header.json"].file_size > HEADER_MAX or infos["header.sha256"].file_size > 1024:
            raise fail(f"header.json declares {infos['header.json'].file_size} bytes, more than the {HEADER_MAX} a .sir "
                       "header may have; the file is corrupt or hostile: recompile it")
        try:
            header_bytes = zf.read("header.json")
            digest = zf.read("header.sha256").decode().strip()
        except (UnicodeDecodeError, *_ARCHIVE_ERRORS) as exc:
            raise fail(f"damaged archive ({exc}); recompile it") from None
        if hashlib.sha256(header_bytes).hexdigest() != digest:
            raise fail("header checksum mismatch: the file was modified or corrupted; recompile it")
        try:
            header = json.loads(header_bytes, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            raise fail(f"header is not valid JSON ({exc}); recompile it") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_NAME:
            raise fail(f"not a {FORMAT_NAME} file; compile one with 'csdc compile'")
        version = header.get("format_version")
        if not _is_int(version):
            raise fail("header has no integer format_version; recompile it")
        if version > FORMAT_VERSION:
            raise fail(f"format version {version} is newer than this csdc supports ({FORMAT_VERSION}); upgrade csdc")
        where = "header"
        try:
            while version < FORMAT_VERSION:
                if version not in UPGRADES:
                    raise fail(f"format version {version} is no longer supported; recompile the model")
                where = f"upgrade from format version {version}"
                header = UPGRADES[version](header)
                version = header["format_version"]
            where = "header"
            _check_header(header)
            # every entry's declared size, before anything is decompressed
            declared = 0
            for node in header["nodes"]:
                for field, desc in node["arrays"].items():
                    where = f"node '{node['name']}': array '{field}'"
                    info = infos.get(desc["entry"])
                    if info is None:
                        raise fail(f"{where}: entry '{desc['entry']}' is missing from the archive; recompile it")
                    most = _NPY_HEADER_MAX + elements(desc["shape"]) * np.dtype(desc["dtype"]).itemsize
                    if info.file_size > most:
                        raise fail(f"{where}: entry '{desc['entry']}' declares {info.file_size} bytes, its header "
                                   f"shape {desc['shape']} allows at most {most}; the file is corrupt or hostile: recompile it")
                    declared += info.file_size
            check_budget(declared, f"{source}: the arrays of this .sir", SirFormatError)
            net = Network(header["T"], header.get("metadata", {}))
            for node in header["nodes"]:
                arrays = {}
                for field, desc in node["arrays"].items():
                    where = f"node '{node['name']}': array '{field}'"
                    try:
                        blob = zf.read(desc["entry"])
                    except _ARCHIVE_ERRORS as exc:
                        raise fail(f"{where} unreadable ({exc}); recompile it") from None
                    if hashlib.sha256(blob).hexdigest() != desc["sha256"]:
                        raise fail(f"{where} checksum mismatch (corrupted or tampered); recompile it")
                    arr = _read_npy(blob, desc)
                    if "broadcast_to" in desc:
                        arr = np.broadcast_to(arr, tuple(desc["broadcast_to"]))
                    arrays[field] = arr
                where = f"node '{node['name']}' ({node['op']})"
                try:
                    op = op_from_dict(node["op"], node["attributes"], arrays)
                except IRError as exc:
                    raise fail(f"{where}: {exc}; recompile it") from None
                net.add(node["name"], op, node["inputs"])
            where = "network"
            net.verify()
            check_budget(net.footprint(), f"{source}: one sample of this network (T={net.T})", SirFormatError)
            net.verify_arithmetic()
        except SirFormatError:
            raise
        except CsdcError as exc:
            raise fail(f"invalid network: {exc}; recompile it") from None
        except (KeyError, IndexError, TypeError, ValueError, AttributeError, ArithmeticError, RecursionError) as exc:
            cause = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc) or type(exc).__name__
            raise fail(f"invalid network ({where}): {cause}; recompile it") from None
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
