"""Acceptance tests of the .sir format (csdc/ir/serialize.py, SPEC 5): lossless round trip of
every registered op, loading never executes code, every kind of damaged file gives a
SirFormatError naming the file and the fix, and writes are atomic."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from csdc.errors import CsdcError, IRError, SirFormatError
from csdc.ir import (
    OP_REGISTRY,
    DiagonalSynapse,
    Encode,
    Network,
    Neuron,
    Readout,
    semantics,
    serialize,
)
from csdc.ir.ops import ops_equal

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from ir_nets import all_ops_input, all_ops_network

HINTS = ("recompile", "compile", "upgrade")


# ----------------------------------------------------------------------------- helpers
def assert_same_network(a: Network, b: Network) -> None:
    assert a.T == b.T
    assert a.metadata == b.metadata
    assert a.order() == b.order()
    for name in a.order():
        oa, ob = a.op(name), b.op(name)
        assert ops_equal(oa, ob), name
        assert a.info(name) == b.info(name), name  # shape and kind
        assert a.inputs(name) == b.inputs(name), name
        for field, arr in ob.arrays().items():
            assert arr.dtype == oa.arrays()[field].dtype, (name, field)
            assert not arr.flags.writeable, (name, field)


def assert_clear_error(exc: BaseException, source: str) -> None:
    msg = str(exc)
    assert isinstance(exc, SirFormatError) and isinstance(exc, CsdcError)
    assert msg.startswith(f"{source}:"), f"message does not name the file: {msg!r}"
    assert any(h in msg for h in HINTS), f"message does not say what to do: {msg!r}"


def entries(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        return {n: zf.read(n) for n in zf.namelist()}


def rezip(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, blob in files.items():
            zf.writestr(name, blob)
    return buf.getvalue()


def with_header(data: bytes, mutate, fix_digest: bool = True, blobs: dict[str, bytes] | None = None) -> bytes:
    """Rewrite the header (and optionally array entries) of a .sir, recomputing its digest."""
    files = entries(data)
    header = json.loads(files["header.json"])
    mutate(header)
    files.update(blobs or {})
    files["header.json"] = json.dumps(header).encode()
    if fix_digest:
        files["header.sha256"] = hashlib.sha256(files["header.json"]).hexdigest().encode()
    return rezip(files)


def node_desc(header: dict, name: str) -> dict:
    return next(n for n in header["nodes"] if n["name"] == name)


@pytest.fixture(scope="module")
def net() -> Network:
    return all_ops_network(T=4, seed=3)


@pytest.fixture(scope="module")
def sir_bytes(net: Network) -> bytes:
    return serialize.to_bytes(net)


def load_bytes(tmp_path: Path, data: bytes, name: str = "net.sir") -> tuple[Network | None, str]:
    path = tmp_path / name
    path.write_bytes(data)
    return serialize.load(path), str(path)


# ------------------------------------------------------------------------------ round trip
def test_round_trip_covers_every_registered_op(net: Network, tmp_path: Path) -> None:
    used = {type(op).__name__ for _, op in net.nodes()}
    missing = set(OP_REGISTRY) - used
    assert not missing, f"ops without a round-trip case (add them to tests/ir/ir_nets.py): {sorted(missing)}"
    path = tmp_path / "all.sir"
    serialize.save(net, path)
    loaded = serialize.load(path)
    assert_same_network(net, loaded)
    assert os.listdir(tmp_path) == ["all.sir"]
    # the header is a fixed point of save -> load -> save
    assert entries(serialize.to_bytes(loaded))["header.json"] == entries(path.read_bytes())["header.json"]
    x = all_ops_input(5)
    r0, r1 = semantics.run_counts(net, x), semantics.run_counts(loaded, x)
    assert np.array_equal(r0.readout, r1.readout)
    assert np.array_equal(r0.logits, r1.logits)
    assert r0.counts.keys() == r1.counts.keys()
    for k in r0.counts:
        assert np.array_equal(r0.counts[k], r1.counts[k]), k


def test_round_trip_of_any_delay_and_run_steps(net: Network, tmp_path: Path) -> None:
    d0 = net.with_delay(0)
    path = tmp_path / "d0.sir"
    serialize.save(d0, path)
    loaded = serialize.load(path)
    assert_same_network(d0, loaded)
    x = all_ops_input(2, seed=7)
    a, b = semantics.run_steps(d0, x), semantics.run_steps(loaded, x)
    assert np.array_equal(a.readout, b.readout)
    for k in a.trains:
        assert np.array_equal(a.trains[k], b.trains[k]), k


def test_round_trip_is_exact_at_integer_and_float_extremes(tmp_path: Path) -> None:
    # the widest values a network may hold (docs/robustness.md): 32-bit weight mantissas, 24-bit input levels
    w = np.array([-(2**31), 2**31 - 1, 127, -128, 128, -129, 32767, 32768, 0, -1])
    n = w.size
    net = Network(7, metadata={"list": [1, "a", None], "float": 1e-300, "big": 2**62})
    net.add("x", Encode((n,), 3.0517578125e-05, -(2**24), 2**24))
    net.add("s", Neuron(np.full(n, 2**40), np.full(n, -(2**40)), w // 4, 2**20), ["x"])
    net.add("d", DiagonalSynapse(w), ["s"])
    net.add("out", Readout(np.linspace(-1e9, 1e-9, n), np.full(n, -0.1)), ["d"])
    serialize.save(net, tmp_path / "x.sir")
    loaded = serialize.load(tmp_path / "x.sir")
    assert_same_network(net, loaded)
    assert loaded.op("d").weight.tolist() == w.tolist()
    assert loaded.op("out").scale.tobytes() == net.op("out").scale.tobytes()  # bit-exact floats
    assert loaded.op("x").scale == 3.0517578125e-05


def test_int64_extremes_are_refused_on_save_and_at_load(tmp_path: Path) -> None:
    big = np.iinfo(np.int64)
    w = np.array([big.min, big.max, 0, -1])
    net = Network(7)
    net.add("x", Encode((4,), 1.0, 0, 1))
    net.add("s", Neuron(np.full(4, 2), np.zeros(4), np.zeros(4), 7), ["x"])
    net.add("d", DiagonalSynapse(w), ["s"])
    net.add("out", Readout(np.ones(4), np.zeros(4)), ["d"])
    with pytest.raises(IRError, match=r"node 'd' \(DiagonalSynapse\).*int64"):
        serialize.save(net, tmp_path / "x.sir")
    assert not (tmp_path / "x.sir").exists()
    (tmp_path / "x.sir").write_bytes(serialize.to_bytes(net))  # written by hand, the loader refuses it too
    with pytest.raises(SirFormatError, match=r"node 'd' \(DiagonalSynapse\).*int64"):
        serialize.load(tmp_path / "x.sir")


# ------------------------------------------------------------------- no code execution
class _Payload:
    """Unpickling this object creates the file ``marker`` (via builtins.open)."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickled_array_is_rejected_without_unpickling(sir_bytes: bytes, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    obj = np.empty(3, dtype=object)
    obj[:] = [_Payload(str(marker)) for _ in range(3)]
    buf = io.BytesIO()
    np.lib.format.write_array(buf, obj, allow_pickle=True)
    evil = buf.getvalue()
    # the payload is live: unpickling it really would run code
    np.lib.format.read_array(io.BytesIO(evil), allow_pickle=True)
    assert marker.exists()
    marker.unlink()

    header = json.loads(entries(sir_bytes)["header.json"])
    entry = node_desc(header, "out")["arrays"]["scale"]["entry"]

    for dtype in ("float64", "object", "O"):
        def mutate(h: dict, dtype=dtype) -> None:
            desc = node_desc(h, "out")["arrays"]["scale"]
            desc["sha256"] = hashlib.sha256(evil).hexdigest()  # checksums are consistent
            desc["dtype"] = dtype

        data = with_header(sir_bytes, mutate, blobs={entry: evil})
        with pytest.raises(SirFormatError) as info:
            load_bytes(tmp_path, data)
        assert str(tmp_path / "net.sir") in str(info.value)
        assert not marker.exists(), "loading a .sir unpickled an array"


@pytest.mark.parametrize("op_name", ["os.system", "system", "Op", "_Window", "__class__", "eval", "numpy.load"])
def test_unknown_op_names_are_rejected(sir_bytes: bytes, tmp_path: Path, monkeypatch, op_name: str) -> None:
    calls = []
    monkeypatch.setattr(os, "system", lambda *a: calls.append(a) or 0)

    def mutate(h: dict) -> None:
        node = node_desc(h, "skip2")
        node["op"] = op_name
        node["attributes"] = {"command": "touch pwned"}

    data = with_header(sir_bytes, mutate)
    with pytest.raises(SirFormatError, match=rf"unknown op '{re.escape(op_name)}'") as info:
        load_bytes(tmp_path, data)
    assert str(tmp_path / "net.sir") in str(info.value)
    assert calls == []


def test_json_header_cannot_smuggle_objects(sir_bytes: bytes, tmp_path: Path) -> None:
    """Fields that do not belong to the op, and non-JSON values, never reach a constructor."""
    def mutate(h: dict) -> None:
        node_desc(h, "pool1")["attributes"]["__reduce__"] = "os.system"

    with pytest.raises(SirFormatError, match=r"fields .* do not match"):
        load_bytes(tmp_path, with_header(sir_bytes, mutate))

    def bad_entry(h: dict) -> None:
        node_desc(h, "fc_a")["arrays"]["mantissa"]["entry"] = "../../etc/passwd"

    with pytest.raises(SirFormatError, match=r"node 'fc_a': array 'mantissa'"):
        load_bytes(tmp_path, with_header(sir_bytes, bad_entry))


# ------------------------------------------------------------------------------ bad files
def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.sir"
    with pytest.raises(SirFormatError) as info:
        serialize.load(path)
    assert_clear_error(info.value, str(path))
    assert "no such file" in str(info.value)


@pytest.mark.parametrize("content", [b"", b"\x00", b"hello, not a zip", bytes(range(256)) * 7, b"PK\x03\x04garbage"],
                         ids=["empty", "nul", "text", "random", "fake-zip-magic"])
def test_non_sir_files(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bad.sir"
    path.write_bytes(content)
    with pytest.raises(SirFormatError) as info:
        serialize.load(path)
    assert_clear_error(info.value, str(path))


def test_random_non_zip_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.sir"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(SirFormatError) as info:
        serialize.load(path)
    assert_clear_error(info.value, str(path))


def test_a_zip_without_a_header(tmp_path: Path) -> None:
    path = tmp_path / "other.sir"
    path.write_bytes(rezip({"hello.txt": b"hi"}))
    with pytest.raises(SirFormatError, match="missing header") as info:
        serialize.load(path)
    assert_clear_error(info.value, str(path))


def test_truncated_files(sir_bytes: bytes, tmp_path: Path) -> None:
    n = len(sir_bytes)
    cuts = sorted({1, 2, 4, 10, 22, 30, 64, n // 4, n // 3, n // 2, 2 * n // 3, n - 100, n - 23, n - 22, n - 1})
    for cut in cuts:
        path = tmp_path / f"cut{cut}.sir"
        path.write_bytes(sir_bytes[:cut])
        with pytest.raises(SirFormatError) as info:
            serialize.load(path)
        assert_clear_error(info.value, str(path))


def test_corrupted_array_bytes_checksum_mismatch(sir_bytes: bytes, tmp_path: Path) -> None:
    """An array entry whose bytes changed but whose zip CRC is valid: the SHA-256 catches it."""
    files = entries(sir_bytes)
    header = json.loads(files["header.json"])
    entry = node_desc(header, "conv1")["arrays"]["mantissa"]["entry"]
    blob = bytearray(files[entry])
    blob[-1] ^= 0x01  # last weight changes by one
    files[entry] = bytes(blob)
    path = tmp_path / "corrupt.sir"
    path.write_bytes(rezip(files))
    with pytest.raises(SirFormatError, match=r"node 'conv1': array 'mantissa' checksum mismatch") as info:
        serialize.load(path)
    assert_clear_error(info.value, str(path))


def test_tampered_header_digest_mismatch(sir_bytes: bytes, tmp_path: Path) -> None:
    def mutate(h: dict) -> None:
        node_desc(h, "act1")["attributes"]["delay"] = 0

    path = tmp_path / "tampered.sir"
    path.write_bytes(with_header(sir_bytes, mutate, fix_digest=False))
    with pytest.raises(SirFormatError, match="header checksum mismatch") as info:
        serialize.load(path)
    assert_clear_error(info.value, str(path))


@pytest.mark.parametrize("version,pattern", [
    (3, r"format version 3 is newer than this csdc supports \(2\); upgrade csdc"),
    (999, r"format version 999 is newer"),
    (0, r"format version 0 is no longer supported; recompile"),
    (-1, r"format version -1 is no longer supported"),
    ("1", r"no integer format_version"),
    (None, r"no integer format_version"),
    (1.0, r"no integer format_version"),
])
def test_wrong_format_version(sir_bytes: bytes, tmp_path: Path, version, pattern: str) -> None:
    def mutate(h: dict) -> None:
        h["format_version"] = version

    path = tmp_path / "v.sir"
    path.write_bytes(with_header(sir_bytes, mutate))
    with pytest.raises(SirFormatError, match=pattern) as info:
        serialize.load(path)
    assert_clear_error(info.value, str(path))


def test_wrong_format_name(sir_bytes: bytes, tmp_path: Path) -> None:
    path = tmp_path / "f.sir"
    path.write_bytes(with_header(sir_bytes, lambda h: h.update(format="onnx")))
    with pytest.raises(SirFormatError, match="not a csdc-sir file") as info:
        serialize.load(path)
    assert_clear_error(info.value, str(path))


def test_older_versions_go_through_upgrades(sir_bytes: bytes, net: Network, tmp_path: Path, monkeypatch) -> None:
    def upgrade0(h: dict) -> dict:
        h = dict(h, format_version=1)
        h["metadata"] = dict(h["metadata"], upgraded=True)
        return h

    monkeypatch.setitem(serialize.UPGRADES, 0, upgrade0)
    loaded, _ = load_bytes(tmp_path, with_header(sir_bytes, lambda h: h.update(format_version=0)))
    assert loaded.metadata["upgraded"] is True
    assert loaded.order() == net.order()


def test_version_1_files_load_with_weights_as_mantissas(sir_bytes: bytes, net: Network, tmp_path: Path) -> None:
    """Version 1 stored one ``weight`` array per synapse (no exponent); it loads as mantissa * 2**0."""
    def to_v1(h: dict) -> None:
        h["format_version"] = 1
        for node in h["nodes"]:
            if "mantissa" in node["arrays"]:
                node["arrays"]["weight"] = node["arrays"].pop("mantissa")
                node["attributes"].pop("exponent")

    loaded, _ = load_bytes(tmp_path, with_header(sir_bytes, to_v1))
    for name, op in net.nodes():
        if hasattr(op, "mantissa"):
            assert loaded.op(name).exponent == 0
            assert np.array_equal(loaded.op(name).mantissa, op.mantissa), name


def test_broadcast_parameters_are_stored_compactly(net: Network, tmp_path: Path) -> None:
    """Per-channel values given as a broadcast view are written once per channel and load as a view."""
    header = json.loads(entries(serialize.to_bytes(net))["header.json"])
    desc = node_desc(header, "act1")["arrays"]["threshold"]
    assert desc["shape"] == [4, 1, 1] and desc["broadcast_to"] == [4, 5, 5]
    assert "broadcast_to" not in node_desc(header, "conv1")["arrays"]["mantissa"]
    path = tmp_path / "b.sir"
    serialize.save(net, path)
    thr = serialize.load(path).op("act1").threshold
    assert thr.shape == (4, 5, 5) and 0 in thr.strides and not thr.flags.writeable
    assert np.array_equal(thr, net.op("act1").threshold)


def test_invalid_network_in_a_consistent_file(sir_bytes: bytes, tmp_path: Path) -> None:
    """Digests fine, but the network does not verify (shape mismatch): still a SirFormatError."""
    def mutate(h: dict) -> None:
        node_desc(h, "tokens")["attributes"]["shape"] = [4, 9]  # Dense 'mix' expects (..., 4)

    path = tmp_path / "shape.sir"
    path.write_bytes(with_header(sir_bytes, mutate))
    with pytest.raises(SirFormatError, match=r"node 'mix'") as info:
        serialize.load(path)
    assert_clear_error(info.value, str(path))


def test_random_byte_corruption_never_escapes_as_another_error(sir_bytes: bytes, net: Network) -> None:
    """Flip bytes anywhere (zip headers, deflate streams, CRCs, the central directory): the
    loader either raises SirFormatError or, when the change is immaterial (e.g. a timestamp),
    returns the very same network."""
    rng = np.random.default_rng(2024)
    n = len(sir_bytes)
    positions = sorted(set(rng.integers(0, n, 300).tolist()) | set(range(48)) | set(range(n - 48, n)))
    bad = []
    for pos in positions:
        for mask in (0x01, 0xFF):
            data = bytearray(sir_bytes)
            data[pos] ^= mask
            try:
                loaded = serialize.from_bytes(bytes(data), source="fuzz.sir")
            except SirFormatError as exc:
                if not str(exc).startswith("fuzz.sir:") or not any(h in str(exc) for h in HINTS):
                    bad.append((pos, mask, f"unclear message: {exc}"))
            except Exception as exc:  # noqa: BLE001 - this is what the test is about
                bad.append((pos, mask, f"{type(exc).__name__}: {exc}"))
            else:
                assert_same_network(net, loaded)
    assert not bad, f"{len(bad)} corruptions escaped, e.g. {bad[:5]}"


# ---------------------------------------------------------------------------- atomic write
def _folder(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path))


def test_interrupted_rename_leaves_nothing(net: Network, tmp_path: Path, monkeypatch) -> None:
    def boom(*a, **k):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="simulated"):
        serialize.save(net, tmp_path / "a.sir")
    assert _folder(tmp_path) == []


class _HalfWriter:
    """A file object that writes half of what it is given, then is interrupted."""

    def __init__(self, fh, exc: BaseException):
        self.fh, self.exc = fh, exc

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.fh.close()
        return False

    def write(self, data: bytes) -> int:
        self.fh.write(data[: len(data) // 2])
        self.fh.flush()
        raise self.exc

    def __getattr__(self, name):
        return getattr(self.fh, name)


@pytest.mark.parametrize("exc", [OSError("no space left on device (simulated)"), KeyboardInterrupt()],
                         ids=["oserror", "ctrl-c"])
def test_interrupted_write_leaves_no_partial_file(net: Network, tmp_path: Path, monkeypatch, exc) -> None:
    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _HalfWriter(real_fdopen(fd, *a, **k), exc))
    # a failed write is a CsdcError naming the file (disk full is the user's to fix); Ctrl-C stays itself
    with pytest.raises(CsdcError if isinstance(exc, OSError) else type(exc)):
        serialize.save(net, tmp_path / "a.sir")
    assert _folder(tmp_path) == []


def test_failed_save_keeps_the_existing_target(net: Network, tmp_path: Path, monkeypatch) -> None:
    target = tmp_path / "model.sir"
    serialize.save(net, target)
    before = target.read_bytes()
    other = net.with_delay(0)

    real_fsync = os.fsync

    def fsync_fails(fd):
        real_fsync(fd)
        raise OSError("I/O error (simulated)")

    monkeypatch.setattr(os, "fsync", fsync_fails)
    with pytest.raises(CsdcError, match="simulated"):
        serialize.save(other, target)
    monkeypatch.setattr(os, "fsync", real_fsync)

    real_fdopen = os.fdopen
    monkeypatch.setattr(os, "fdopen", lambda fd, *a, **k: _HalfWriter(real_fdopen(fd, *a, **k), KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        serialize.save(other, target)
    monkeypatch.setattr(os, "fdopen", real_fdopen)

    def replace_fails(*a, **k):
        raise OSError("rename failed (simulated)")

    monkeypatch.setattr(os, "replace", replace_fails)
    with pytest.raises(OSError, match="simulated"):
        serialize.save(other, target)
    monkeypatch.undo()

    assert _folder(tmp_path) == ["model.sir"]
    assert target.read_bytes() == before
    assert_same_network(net, serialize.load(target))
    serialize.save(other, target)  # and a save that succeeds replaces it
    assert _folder(tmp_path) == ["model.sir"]
    assert_same_network(other, serialize.load(target))


def test_invalid_network_is_not_written(tmp_path: Path) -> None:
    bad = Network(2)
    bad.add("x", Encode((3,), 1.0, 0, 3))
    bad.add("s", Neuron([1, 1, 1], [0, 0, 0], [0, 0, 0], 2), ["x"])  # no readout
    with pytest.raises(IRError, match="Readout"):
        serialize.save(bad, tmp_path / "bad.sir")
    assert _folder(tmp_path) == []


def test_save_into_a_missing_folder(net: Network, tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir" / "x.sir"
    with pytest.raises(CsdcError, match=r"folder '.*dir' does not exist"):
        serialize.save(net, path)
    assert _folder(tmp_path) == []


def _json_paths(obj, prefix=()):
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _json_paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _json_paths(v, (*prefix, i))


def test_malformed_header_structure_is_a_sir_format_error(sir_bytes: bytes, net: Network) -> None:
    """A header with consistent digests but any value replaced by a JSON value of another
    type or range: SirFormatError, or a network that loads and verifies (e.g. a new delay)."""
    header = json.loads(entries(sir_bytes)["header.json"])
    paths = [p for p in _json_paths(header) if p]
    values = [None, True, 0, -1, 1, 2**70, -(2**70), 1.5, 1e308, "x", "", "object", [], {}, [1], [[1]], {"a": 1}]
    rng = np.random.default_rng(7)
    bad = []
    for _ in range(300):
        path = paths[rng.integers(len(paths))]
        value = values[rng.integers(len(values))]

        def mutate(h: dict, path=path, value=value) -> None:
            obj = h
            for k in path[:-1]:
                obj = obj[k]
            obj[path[-1]] = value

        data = with_header(sir_bytes, mutate)
        try:
            serialize.from_bytes(data, source="h.sir").verify()
        except SirFormatError as exc:
            if not str(exc).startswith("h.sir:"):
                bad.append((path, value, str(exc)))
        except Exception as exc:  # noqa: BLE001 - this is what the test is about
            bad.append((path, value, f"{type(exc).__name__}: {exc}"))
    assert not bad, f"{len(bad)} malformed headers escaped, e.g. {bad[:5]}"


def test_deeply_nested_header_json(sir_bytes: bytes, tmp_path: Path) -> None:
    files = entries(sir_bytes)
    files["header.json"] = b"[" * 200_000 + b"]" * 200_000
    files["header.sha256"] = hashlib.sha256(files["header.json"]).hexdigest().encode()
    path = tmp_path / "deep.sir"
    path.write_bytes(rezip(files))
    with pytest.raises(SirFormatError) as info:
        serialize.load(path)
    assert_clear_error(info.value, str(path))
