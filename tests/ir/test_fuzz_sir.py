"""Seeded mutation fuzzing of .sir files, and one regression test per class of issue 13 (items 1-9).

Every mutated file (header fields, integer attributes at and beyond every documented bound, dtypes,
shapes, broadcast targets, .npy headers, zip entries; digests recomputed so that validation, not the
checksum, is what is exercised) must end in one of two ways: ``from_bytes`` raises a CsdcError, or the
network loads and the numba simulator's readout equals the reference semantics' on real inputs (and
running raises nothing but a CsdcError). Anything else is a failure, listed with its seed.

The normal run fuzzes a few hundred files (``CSDC_FUZZ_CASES`` changes how many). The slow run of 10 000
files is opt-in (docs/robustness.md)::

    CSDC_FUZZ_SLOW=1 .venv/bin/python -m pytest -q -m slow tests/ir/test_fuzz_sir.py -s
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import zipfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from csdc.backends.numba import NumbaBackend
from csdc.compiler.pipeline import compile_onnx
from csdc.errors import CsdcError, SirFormatError
from csdc.ir import semantics, serialize
from csdc.ir.ops import DELAY_MAX, ENCODE_MAX, T_MAX, WINDOW_MAX

ROOT = Path(__file__).resolve().parents[2]
MODELS = {"cnn": ROOT / "examples" / "digits_cnn" / "model.onnx",
          "csdformer": ROOT / "examples" / "digits_csdformer" / "model.onnx"}
BUDGET = "256M"  # small, so that an accepted mutant is also cheap to run


@pytest.fixture(scope="module")
def bases() -> dict[str, bytes]:
    return {k: serialize.to_bytes(compile_onnx(p)[0]) for k, p in MODELS.items()}


@pytest.fixture(autouse=True)
def _budget(monkeypatch) -> None:
    monkeypatch.setenv("CSDC_MEMORY_BUDGET", BUDGET)


# ------------------------------------------------------------------------- the archive, editable
def unpack(data: bytes) -> tuple[dict, dict[str, bytes]]:
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        header = json.loads(zf.read("header.json"))
        entries = {n: zf.read(n) for n in zf.namelist() if n.startswith("arrays/")}
    return header, entries


def pack(header: dict | bytes, entries: dict[str, bytes], deflate: frozenset[str] = frozenset(),
         extra: list[tuple[str, bytes]] = ()) -> bytes:
    """A .sir with ``header`` (its digest recomputed) and ``entries``; names in ``deflate`` compressed."""
    hb = header if isinstance(header, bytes) else json.dumps(header, indent=1, sort_keys=True).encode()
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, blob in entries.items():
            zf.writestr(name, blob, compress_type=zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED)
        for name, blob in extra:
            zf.writestr(name, blob)
        zf.writestr("header.json", hb)
        zf.writestr("header.sha256", hashlib.sha256(hb).hexdigest())
    return buf.getvalue()


def npy(arr: np.ndarray, allow_pickle: bool = False) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, arr, allow_pickle=allow_pickle)
    return buf.getvalue()


def set_array(header: dict, entries: dict[str, bytes], node: dict, field: str, arr: np.ndarray,
              declare: bool = True) -> None:
    """Store ``arr`` as ``node``'s array ``field``; with ``declare``, the header describes it truthfully."""
    desc = node["arrays"][field]
    blob = npy(arr, allow_pickle=arr.dtype.hasobject)
    entries[desc["entry"]] = blob
    desc["sha256"] = hashlib.sha256(blob).hexdigest()
    if declare:
        desc["shape"] = list(arr.shape)
        desc["dtype"] = str(arr.dtype) if not arr.dtype.hasobject else "object"
        desc.pop("broadcast_to", None)


def forged_npy(shape: tuple[int, ...], dtype: str, payload: bytes) -> bytes:
    """An .npy whose header declares ``shape`` but which holds only ``payload``."""
    head = {"descr": dtype, "fortran_order": False, "shape": shape}
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, head)
    return buf.getvalue() + payload


# ------------------------------------------------------------------------------- mutations
INTS = [0, 1, -1, 2, 3, 7, 2**15, 2**31 - 1, 2**31, 2**53 + 1, 2**62, 2**63 - 1, 2**63, 2**64, -(2**63), -(2**63) - 1,
        10**30, T_MAX, T_MAX + 1, DELAY_MAX, DELAY_MAX + 1, WINDOW_MAX, WINDOW_MAX + 1, ENCODE_MAX, ENCODE_MAX + 1, 62, 63]
JUNK = [1e300, 15.7, -0.0, 1.0, float("nan"), float("inf"), "15", "", None, True, False, [], [1], [[2]], {"a": 1}, "x" * 3]


def _value(rng: np.random.Generator, current: object) -> object:
    r = rng.random()
    if r < 0.45:
        return INTS[rng.integers(len(INTS))]
    if r < 0.65 and isinstance(current, int) and not isinstance(current, bool):
        return int(current) + int(rng.integers(-3, 4))
    if r < 0.8 and isinstance(current, list) and current:
        out = list(current)
        out[rng.integers(len(out))] = _value(rng, out[0])
        if rng.random() < 0.2:
            out = out[:-1] if rng.random() < 0.5 else out + [out[-1]]
        return out
    return copy.deepcopy(JUNK[rng.integers(len(JUNK))])


def _mutate_attribute(rng, header, entries) -> str:
    if rng.random() < 0.15:
        header["T"] = _value(rng, header["T"])
        return "T"
    nodes = [n for n in header["nodes"] if n["attributes"]]
    node = nodes[rng.integers(len(nodes))]
    key = sorted(node["attributes"])[rng.integers(len(node["attributes"]))]
    node["attributes"][key] = _value(rng, node["attributes"][key])
    return f"attribute {node['op']}.{key}"


def _pick_array(rng, header):
    nodes = [n for n in header["nodes"] if n["arrays"]]
    node = nodes[rng.integers(len(nodes))]
    field = sorted(node["arrays"])[rng.integers(len(node["arrays"]))]
    return node, field


def _load_array(entries, desc) -> np.ndarray:
    """An entry's array, read only if its .npy header is honest (an earlier mutation may have forged it)."""
    fh = io.BytesIO(entries[desc["entry"]])
    np.lib.format.read_magic(fh)
    shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
    if int(np.prod(shape, dtype=object)) * dtype.itemsize != len(fh.getvalue()) - fh.tell() or dtype.hasobject:
        raise ValueError("forged entry")
    fh.seek(0)
    return np.lib.format.read_array(fh, allow_pickle=False)


def _mutate_values(rng, header, entries) -> str:
    """Small in-range edits (the network usually stays valid: numba must then equal the reference) or
    extremes of the stored dtype."""
    node, field = _pick_array(rng, header)
    desc = node["arrays"][field]
    arr = _load_array(entries, desc).copy()
    if arr.size == 0:
        return "values (empty)"
    flat = arr.reshape(-1)
    i = rng.integers(flat.size)
    if arr.dtype.kind == "f":
        flat[i] = [flat[i] * 2, -flat[i], 0.0, 1e308, np.nan, np.inf, 1e-300][rng.integers(7)]
    else:
        info = np.iinfo(arr.dtype)
        choice = rng.integers(5)
        if choice == 0:
            flat[i] = info.max
        elif choice == 1:
            flat[i] = info.min
        else:
            flat[i] = np.clip(int(flat[i]) + int(rng.integers(-3, 4)), info.min, info.max)
    set_array(header, entries, node, field, arr, declare=False)
    return f"values {node['op']}.{field}"


def _mutate_dtype(rng, header, entries) -> str:
    node, field = _pick_array(rng, header)
    desc = node["arrays"][field]
    arr = _load_array(entries, desc)
    dt = ["int8", "int16", "int32", "int64", "uint8", "uint64", "float16", "float32", "float64", "bool", "complex64",
          "<U3", ">i8", "object"][rng.integers(14)]
    if dt == "object":
        new = np.empty(arr.shape, dtype=object)
        new[...] = 1
    else:
        with np.errstate(all="ignore"):
            new = arr.astype(dt)
    declare = rng.random() < 0.5
    set_array(header, entries, node, field, new, declare=declare)
    if not declare and rng.random() < 0.5:
        desc["dtype"] = dt
    return f"dtype {node['op']}.{field} -> {dt}"


def _mutate_shape(rng, header, entries) -> str:
    node, field = _pick_array(rng, header)
    desc = node["arrays"][field]
    arr = _load_array(entries, desc)
    choice = rng.integers(6)
    if choice == 0:
        new = arr.reshape(-1)
    elif choice == 1:
        new = arr[..., None]
    elif choice == 2 and arr.ndim:
        new = arr[:0]
    elif choice == 3 and arr.ndim:
        new = np.concatenate([arr, arr[:1]], axis=0)
    elif choice == 4 and arr.ndim:
        new = arr[:max(1, arr.shape[0] // 2)]
    else:
        new = arr.T
    set_array(header, entries, node, field, np.ascontiguousarray(new), declare=rng.random() < 0.7)
    return f"shape {node['op']}.{field} {arr.shape} -> {new.shape}"


def _mutate_broadcast(rng, header, entries) -> str:
    node, field = _pick_array(rng, header)
    desc = node["arrays"][field]
    shape = list(desc.get("broadcast_to", desc["shape"]))
    if not shape:
        shape = [1]
    choice = rng.integers(4)
    if choice == 0:
        shape[rng.integers(len(shape))] = int([2**20, 2**31 - 1, 2**40, 0, 3][rng.integers(5)])
    elif choice == 1:
        shape = shape + [int(rng.integers(1, 2**16))]
    elif choice == 2:
        shape = [2**15, 2**15, 2**10][: len(shape)] or [2**30]
    else:
        shape = _value(rng, shape)
    desc["broadcast_to"] = shape
    return f"broadcast_to {node['op']}.{field} -> {str(shape)[:40]}"


def _mutate_npy_header(rng, header, entries) -> str:
    node, field = _pick_array(rng, header)
    desc = node["arrays"][field]
    shape = [(2**40,), (2**20, 2**20), (1 << 62,), (3, 3), tuple(desc["shape"])][rng.integers(5)]
    blob = forged_npy(shape, ["<i8", "<f8", "|i1", "|O", "<i4"][rng.integers(5)], b"\x00" * int(rng.integers(0, 64)))
    entries[desc["entry"]] = blob
    desc["sha256"] = hashlib.sha256(blob).hexdigest()
    if rng.random() < 0.5:
        desc["shape"] = list(shape)
    return f"npy header {node['op']}.{field} {shape}"


def _mutate_structure(rng, header, entries) -> str:
    nodes = header["nodes"]
    i = int(rng.integers(len(nodes)))
    choice = rng.integers(10)
    if choice == 0:
        del nodes[i]
    elif choice == 1:
        nodes.insert(i, copy.deepcopy(nodes[i]))
    elif choice == 2:
        nodes[i]["op"] = ["Neuron", "DenseSynapse", "Encode", "Readout", "Bogus", "__class__", 7][rng.integers(7)]
    elif choice == 3:
        nodes[i]["inputs"] = [[], [nodes[0]["name"]], [nodes[-1]["name"]], "x", [1], None][rng.integers(6)]
    elif choice == 4:
        if nodes[i]["attributes"]:
            nodes[i]["attributes"].pop(sorted(nodes[i]["attributes"])[0])
        else:
            nodes[i]["attributes"]["extra"] = 1
    elif choice == 5:
        nodes[i]["name"] = [None, "", 5, nodes[0]["name"]][rng.integers(4)]
    elif choice == 6:
        header["metadata"] = [None, [], "x", {"compile": "x"}, {"compile": [1]}][rng.integers(5)]
    elif choice == 7:
        key = ["nodes", "T", "metadata", "format"][rng.integers(4)]
        header.pop(key, None)
    elif choice == 8 and nodes[i]["arrays"]:
        field = sorted(nodes[i]["arrays"])[0]
        nodes[i]["arrays"][field] = [None, [], "x", {"entry": "arrays/none.npy"}][rng.integers(4)]
    else:
        nodes[i]["arrays"] = [None, [], {}][rng.integers(3)]
    return f"structure {choice}"


def _mutate_version(rng, header, entries) -> str:
    header["format_version"] = [1, 0, -1, 3, True, "2", 2.0, None][rng.integers(8)]
    if header["format_version"] == 1 and rng.random() < 0.7:  # a plausible version-1 file: 'weight' arrays
        for node in header["nodes"]:
            if "mantissa" in node["arrays"]:
                node["arrays"]["weight"] = node["arrays"].pop("mantissa")
                node["attributes"].pop("exponent", None)
    return f"format_version {header['format_version']!r}"


def _mutate_benign(rng, header, entries) -> str:
    """Edits that keep the network valid: a neuron's delay (below T too: the time-stepped reference
    then judges numba), or a parameter nudged by a few units."""
    if rng.random() < 0.5:
        neurons = [n for n in header["nodes"] if n["op"] == "Neuron"]
        node = neurons[rng.integers(len(neurons))]
        node["attributes"]["delay"] = int(rng.integers(0, header["T"] + 3))
        return f"delay {node['attributes']['delay']}"
    node, field = _pick_array(rng, header)
    arr = _load_array(entries, node["arrays"][field]).copy()
    if arr.size and arr.dtype.kind in "iu":
        flat = arr.reshape(-1)
        i = rng.integers(flat.size)
        info = np.iinfo(arr.dtype)
        flat[i] = np.clip(int(flat[i]) + int(rng.integers(-2, 3)), max(info.min, 1 if field == "threshold" else info.min),
                          info.max)
        set_array(header, entries, node, field, arr, declare=False)
    return f"nudge {node['op']}.{field}"


MUTATIONS = [_mutate_benign, _mutate_benign, _mutate_attribute, _mutate_attribute, _mutate_values, _mutate_values, _mutate_values, _mutate_dtype,
             _mutate_shape, _mutate_broadcast, _mutate_npy_header, _mutate_structure, _mutate_version]


def mutant(base: bytes, seed: int) -> tuple[bytes, str]:
    """The mutated file of ``seed`` and what was done to it."""
    rng = np.random.default_rng(seed)
    header, entries = unpack(base)
    if seed % 97 == 0:  # zip level: a bomb, a missing or a damaged entry, a huge header
        name = sorted(entries)[rng.integers(len(entries))]
        kind = seed // 97 % 4
        if kind == 0:
            entries[name] = b"\x00" * (24 << 20)  # 24 MiB of zeros: a few KB deflated
            return pack(header, entries, deflate=frozenset({name})), "zip bomb entry"
        if kind == 1:
            del entries[name]
            return pack(header, entries), "missing entry"
        if kind == 2:
            raw = pack(header, entries, deflate=frozenset(entries))
            data = bytearray(raw)
            pos = raw.find(name.encode()) + len(name) + 8
            data[pos % len(data)] ^= 0xFF
            return bytes(data), "damaged deflate stream"
        return pack(b"{" + b" " * (65 << 20) + b"}", entries), "huge header"
    done = []
    pool = [_mutate_benign] if seed % 3 == 1 else MUTATIONS  # a third stay valid: numba must equal the reference
    for _ in range(1 + int(rng.integers(0, 3))):
        try:
            done.append(pool[rng.integers(len(pool))](rng, header, entries))
        except Exception:  # noqa: BLE001 - the fuzzer's own edit, not csdc
            done.append("skipped")  # an earlier mutation broke the structure this one edits
    try:
        return pack(header, entries), "; ".join(done)
    except (TypeError, ValueError):
        return pack(json.dumps(header, default=str).encode(), entries), "; ".join(done)


# ---------------------------------------------------------------------------------- the check
def _inputs(net, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.random((3, *net.input_shape), dtype=np.float32)


def outcome(data: bytes, seed: int, backend: NumbaBackend) -> tuple[str, str]:
    """('refused' | 'refused at run' | 'equal' | 'FAILURE', detail)."""
    try:
        net = serialize.from_bytes(data, source="mutant.sir")
    except CsdcError as exc:
        msg = str(exc)
        if not msg.startswith("mutant.sir:"):
            return "FAILURE", f"error does not name the file: {msg[:200]}"
        return "refused", msg
    except Exception as exc:  # noqa: BLE001 - what the fuzzer looks for
        return "FAILURE", f"load raised {type(exc).__name__}: {str(exc)[:200]}"
    try:
        x = _inputs(net, seed)
        got = backend.run(net, x)
        exact = all(net.op(n).delay >= net.T for n in net.neurons())
        ref = semantics.run_counts(net, x) if exact else semantics.run_steps(net, x, keep=False)
    except CsdcError as exc:
        return "refused at run", str(exc)
    except Exception as exc:  # noqa: BLE001
        return "FAILURE", f"run raised {type(exc).__name__}: {str(exc)[:200]}"
    if not np.array_equal(got.readout, ref.readout):
        return "FAILURE", "numba readout differs from the reference"
    if not (np.all(np.isfinite(got.logits)) and np.allclose(got.logits, ref.logits, rtol=1e-6, atol=0)):
        return "FAILURE", "logits differ from the reference or are not finite"
    return "equal", ""


def fuzz(bases: dict[str, bytes], cases: int, first_seed: int = 0) -> tuple[Counter, list[str]]:
    backend = NumbaBackend()
    counts: Counter = Counter()
    failures = []
    names = sorted(bases)
    for seed in range(first_seed, first_seed + cases):
        base = names[seed % len(names)]
        data, what = mutant(bases[base], seed)
        result, detail = outcome(data, seed, backend)
        counts[result] += 1
        if result == "FAILURE":
            failures.append(f"seed {seed} ({base}: {what}): {detail}")
    return counts, failures


def test_fuzz_sir(bases) -> None:
    cases = int(os.environ.get("CSDC_FUZZ_CASES", "300"))
    counts, failures = fuzz(bases, cases)
    print(f"\n.sir fuzz: {cases} cases: {dict(counts)}")
    assert not failures, f"{len(failures)} of {cases} mutants failed:\n" + "\n".join(failures[:20])
    assert counts["refused"] > cases // 4 and counts["equal"] > cases // 20  # both paths are exercised


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("CSDC_FUZZ_SLOW") != "1", reason="opt-in: CSDC_FUZZ_SLOW=1 (10 000 cases)")
def test_fuzz_sir_slow(bases) -> None:
    counts, failures = fuzz(bases, 10_000, first_seed=100_000)
    print(f"\n.sir slow fuzz: 10000 cases: {dict(counts)}")
    assert not failures, f"{len(failures)} mutants failed:\n" + "\n".join(failures[:50])


# ------------------------------------------------------------- regressions, one per class (1-9)
def _edit(base: bytes, fn) -> bytes:
    header, entries = unpack(base)
    fn(header, entries)
    return pack(header, entries)


def _node(header: dict, op: str) -> dict:
    return next(n for n in header["nodes"] if n["op"] == op)


def _refused(data: bytes, *words: str) -> str:
    with pytest.raises(SirFormatError) as info:
        serialize.from_bytes(data, source="net.sir")
    msg = str(info.value)
    for w in words:
        assert w in msg, f"{w!r} not in {msg!r}"
    return msg


@pytest.mark.parametrize("op,key,value", [
    ("Neuron", "delay", 2**63), ("Neuron", "delay", 9223372036854775808 * 2), ("Neuron", "delay", DELAY_MAX + 1),
    ("ConvSynapse", "stride", [2**63, 1]), ("ConvSynapse", "padding", [0, 0, 0, 2**64]), ("SpikeMaxPool", "stride", [2**63, 2]),
    ("SpikeMaxPool", "padding", [WINDOW_MAX + 1, 0, 0, 0]), ("ConvSynapse", "exponent", 63),
])
def test_1_integer_attributes_beyond_int64_or_maxima_are_refused(bases, op, key, value) -> None:
    _refused(_edit(bases["cnn"], lambda h, e: _node(h, op)["attributes"].__setitem__(key, value)), "net.sir:", key)


def test_1_matmul_weight_beyond_int64_is_refused(bases) -> None:
    _refused(_edit(bases["csdformer"], lambda h, e: _node(h, "SpikeMatMul")["attributes"].__setitem__("weight", 2**63)),
             "SpikeMatMul weight")


def test_1_run_delay_flag_beyond_the_maximum_is_an_error(bases, tmp_path, capsys) -> None:
    from csdc.cli import main

    p = tmp_path / "net.sir"
    p.write_bytes(bases["cnn"])
    assert main(["run", str(p), "--delay", "9223372036854775808", "--limit", "2", "--no-progress"]) == 2
    assert "--delay must be in 0.." in capsys.readouterr().err


@pytest.mark.parametrize("T", [1e300, 15.7, "15", T_MAX + 1, 10**9, True, None])
def test_2_T_must_be_an_integer_within_its_maximum(bases, T) -> None:
    _refused(_edit(bases["cnn"], lambda h, e: h.__setitem__("T", T)), "T")


def test_3_zip_bomb_is_refused_before_inflating(bases) -> None:
    header, entries = unpack(bases["cnn"])
    name = _node(header, "DenseSynapse")["arrays"]["mantissa"]["entry"]
    entries[name] = b"\x00" * (64 << 20)
    data = pack(header, entries, deflate=frozenset({name}))
    assert len(data) < 1 << 20
    _refused(data, "node", "mantissa", "declares")


def test_3_npy_header_declaring_a_huge_shape_is_refused_before_allocating(bases) -> None:
    def forge(h, e):
        desc = _node(h, "DenseSynapse")["arrays"]["mantissa"]
        blob = forged_npy((2**20, 2**20), "<i8", b"\x00" * 64)
        e[desc["entry"]] = blob
        desc["sha256"] = hashlib.sha256(blob).hexdigest()
    _refused(_edit(bases["cnn"], forge), "mantissa")
    # declared in the header too: refused by the size the header allows for the entry
    def forge_both(h, e):
        forge(h, e)
        _node(h, "DenseSynapse")["arrays"]["mantissa"]["shape"] = [2**20, 2**20]
    _refused(_edit(bases["cnn"], forge_both), "mantissa")


def test_3_broadcast_target_beyond_the_budget_is_refused_at_load(tmp_path) -> None:
    """A file of a few KB whose per-channel arrays are broadcast to 2^28 neurons: refused before running."""
    from csdc.ir import DiagonalSynapse, Encode, Network, Neuron, Readout, ReduceSum

    shape = (4, 2**26)
    one = np.ones((4, 1), np.int64)
    net = Network(4)
    net.add("x", Encode(shape, 1.0, 0, 3))
    net.add("n", Neuron(np.broadcast_to(one * 2, shape), np.broadcast_to(one, shape), np.broadcast_to(one * 0, shape), 4),
            ["x"])
    net.add("d", DiagonalSynapse(np.broadcast_to(one, shape)), ["n"])
    net.add("r", ReduceSum((1,)), ["d"])
    net.add("out", Readout(np.ones(4), np.zeros(4)), ["r"])
    serialize.save(net, tmp_path / "wide.sir")  # saving checks the arithmetic, not this machine's memory
    assert (tmp_path / "wide.sir").stat().st_size < 16 << 10
    with pytest.raises(SirFormatError, match="one sample of this network.*memory budget"):
        serialize.load(tmp_path / "wide.sir")


def test_3_one_sample_beyond_the_memory_budget_is_refused(bases, monkeypatch) -> None:
    monkeypatch.setenv("CSDC_MEMORY_BUDGET", "64K")
    _refused(bases["cnn"], "memory budget", "CSDC_MEMORY_BUDGET")


@pytest.mark.parametrize("changes", [{"lo": "0", "hi": "15"}, {"hi": "15"}, {"lo": 1.5}, {"hi": 2**40}, {"scale": "1"}])
def test_4_encode_range_must_be_integers(bases, changes) -> None:
    _refused(_edit(bases["cnn"], lambda h, e: _node(h, "Encode")["attributes"].update(changes)), "Encode")


def test_5_conv_with_zero_output_channels_or_a_zero_kernel_is_refused(bases) -> None:
    def zero_out(h, e):
        node = _node(h, "ConvSynapse")
        set_array(h, e, node, "mantissa", np.zeros((0, 1, 3, 3), np.int8))
    _refused(_edit(bases["cnn"], zero_out), "ConvSynapse", "empty axis")

    def zero_kernel(h, e):
        node = _node(h, "ConvSynapse")
        node["attributes"]["dilation"] = [3, 3]
        set_array(h, e, node, "mantissa", np.zeros((16, 1, 0, 3), np.int8))
    _refused(_edit(bases["cnn"], zero_kernel), "ConvSynapse")


@pytest.mark.parametrize("shape", [[-2, -32], [64, 2**58 + 1], [0, 5], [2**31, 2**31, 2]])
def test_6_reshape_shapes_must_be_positive_and_counted_without_wrap(bases, shape) -> None:
    _refused(_edit(bases["csdformer"], lambda h, e: _node(h, "Reshape")["attributes"].__setitem__("shape", shape)),
             "Reshape")


def test_7_format_1_upgrade_errors_are_load_errors(bases) -> None:
    def v1(h, e):
        h["format_version"] = 1
        h["nodes"][0]["arrays"] = None
    _refused(_edit(bases["cnn"], v1), "net.sir:")

    def v1_nodes(h, e):
        h["format_version"] = 1
        h["nodes"] = {"a": 1}
    _refused(_edit(bases["cnn"], v1_nodes), "net.sir:")


def test_7_inspect_takes_a_non_dict_compile_metadata(bases, tmp_path, capsys) -> None:
    from csdc.cli import main

    p = tmp_path / "net.sir"
    p.write_bytes(_edit(bases["cnn"], lambda h, e: h["metadata"].__setitem__("compile", "x")))
    assert main(["inspect", str(p)]) == 0
    assert "neuron populations" in capsys.readouterr().out


def test_8_weight_mantissa_times_power_of_two_is_rechecked(bases) -> None:
    def wrap(h, e):
        node = _node(h, "DenseSynapse")
        node["attributes"]["exponent"] = 62
        set_array(h, e, node, "mantissa", np.full((10, 128), 3, np.int8), declare=True)
    _refused(_edit(bases["cnn"], wrap), "DenseSynapse", "int64")


def test_8_readout_scale_that_makes_logits_infinite_is_refused(bases) -> None:
    def huge(h, e):
        node = _node(h, "Readout")
        set_array(h, e, node, "scale", np.full(10, 1e308), declare=True)
    _refused(_edit(bases["cnn"], huge), "Readout", "float32")


@pytest.mark.parametrize("edit,words", [
    (lambda h, e: h["nodes"][1].pop("arrays"), ("node '", "arrays")),
    (lambda h, e: h["nodes"][1].__setitem__("arrays", None), ("node '", "arrays")),
    (lambda h, e: h["nodes"][2]["arrays"]["threshold"].__setitem__("dtype", "object"), ("threshold", "dtype")),
    (lambda h, e: h.__setitem__("nodes", None), ("nodes",)),
    (lambda h, e: h["nodes"][2].__setitem__("inputs", "input"), ("inputs",)),
])
def test_9_every_load_error_names_the_node_array_or_field(bases, edit, words) -> None:
    _refused(_edit(bases["cnn"], edit), "net.sir:", *words)


def test_9_pickled_object_array_names_the_array(bases) -> None:
    def obj(h, e):
        node = _node(h, "Neuron")
        arr = np.empty(3, dtype=object)
        set_array(h, e, node, "v0", arr, declare=False)
    _refused(_edit(bases["cnn"], obj), "v0")


# ------------------------------------------------------------------------------- determinism
def test_results_do_not_depend_on_threads_or_batch_size(bases) -> None:
    import numba

    net = serialize.from_bytes(bases["csdformer"])
    x = np.random.default_rng(1).random((13, *net.input_shape), dtype=np.float32)
    backend = NumbaBackend()
    before = numba.get_num_threads()
    runs = []
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            for batch in (1, 5, 13):
                runs.append(np.concatenate([backend.run(net, x[i:i + batch]).readout for i in range(0, len(x), batch)]))
    finally:
        numba.set_num_threads(before)
    for r in runs[1:]:
        assert np.array_equal(r, runs[0])
    assert np.array_equal(runs[0], semantics.run_counts(net, x).readout)
