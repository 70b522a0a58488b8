"""Acceptance tests of the IR ops (csdc/ir/ops.py) and the network graph (csdc/ir/graph.py):
bad shapes, kinds and parameters are rejected with an IRError that names the problem, the
graph keeps its invariants, and op parameters are immutable."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import numpy as np
import pytest

from csdc.errors import CsdcError, IRError
from csdc.ir import (
    CURRENT,
    OP_REGISTRY,
    SPIKES,
    Add,
    ConvSynapse,
    DenseSynapse,
    DiagonalSynapse,
    Encode,
    Network,
    Neuron,
    Readout,
    ReduceSum,
    Reshape,
    SpikeMatMul,
    SpikeMaxPool,
    SumPool,
    Transpose,
)

_HERE = Path(__file__).resolve().parent
if str(_HERE) not in sys.path:
    sys.path.insert(0, str(_HERE))

from ir_nets import all_ops_network


def _neuron(shape, threshold=2, delay=1) -> Neuron:
    return Neuron(np.full(shape, threshold), np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64), delay)


def z(*shape) -> np.ndarray:
    return np.zeros(shape, dtype=np.int64)


# ------------------------------------------------------------------- infer: shapes and kinds
INFER_CASES = [
    # (id, op, in_shapes, in_kinds, message pattern)
    ("dense wrong in-size", DenseSynapse(z(3, 4)), [(2, 5)], [SPIKES], r"DenseSynapse expects input \(\.\.\., 4\), got \(2, 5\)"),
    ("dense scalar input", DenseSynapse(z(3, 4)), [()], [SPIKES], r"DenseSynapse expects input"),
    ("dense two inputs", DenseSynapse(z(3, 4)), [(4,), (4,)], [SPIKES, SPIKES], r"DenseSynapse takes 1 input\(s\), got 2"),
    ("conv wrong channels", ConvSynapse(z(4, 2, 3, 3), groups=2), [(3, 5, 5)], [SPIKES], r"ConvSynapse expects input \(4, H, W\), got \(3, 5, 5\)"),
    ("conv rank", ConvSynapse(z(4, 1, 1, 1)), [(1, 5)], [SPIKES], r"ConvSynapse expects input \(1, H, W\)"),
    ("conv window not fitting", ConvSynapse(z(1, 1, 5, 5)), [(1, 3, 3)], [SPIKES], r"window \(5, 5\).*does not fit input 3x3"),
    ("conv dilated window not fitting", ConvSynapse(z(1, 1, 2, 2), dilation=3), [(1, 3, 3)], [SPIKES], r"does not fit input 3x3"),
    ("diagonal shape", DiagonalSynapse(z(2, 3)), [(3, 2)], [SPIKES], r"DiagonalSynapse weight shape \(2, 3\) != input shape \(3, 2\)"),
    ("diagonal of a current", DiagonalSynapse(z(3)), [(3,)], [CURRENT], r"DiagonalSynapse input 0 must carry spikes or ternary, got current"),
    ("add of spikes", Add(), [(3,), (3,)], [CURRENT, SPIKES], r"Add input 1 must carry current, got spikes"),
    ("add shape mismatch", Add(), [(3,), (4,)], [CURRENT, CURRENT], r"Add input shapes differ"),
    ("add single input", Add(), [(3,)], [CURRENT], r"Add needs at least 2 inputs, got 1"),
    ("neuron of spikes", _neuron((3,)), [(3,)], [SPIKES], r"Neuron input 0 must carry current, got spikes"),
    ("neuron shape", _neuron((3,)), [(4,)], [CURRENT], r"Neuron parameters have shape \(3,\), input has \(4,\)"),
    ("maxpool of a current", SpikeMaxPool(2, 2), [(1, 4, 4)], [CURRENT], r"SpikeMaxPool input 0 must carry spikes, got current"),
    ("maxpool window not fitting", SpikeMaxPool((4, 2), (1, 1)), [(1, 3, 3)], [SPIKES], r"window \(4, 2\).*does not fit input 3x3"),
    ("maxpool rank", SpikeMaxPool(2, 2), [(4, 4)], [SPIKES], r"SpikeMaxPool expects a \(C, H, W\) input, got \(4, 4\)"),
    ("sumpool window not fitting", SumPool(3, 1, (0, 0, 0, 0)), [(2, 2, 5)], [SPIKES], r"does not fit input 2x5"),
    ("sumpool rank", SumPool(2, 2), [(2, 4, 4, 1)], [SPIKES], r"SumPool expects a \(C, H, W\) input"),
    ("reshape element count", Reshape((5, 2)), [(3, 3)], [SPIKES], r"Reshape from \(3, 3\) to \(5, 2\) changes the element count"),
    ("transpose perm", Transpose((0, 2)), [(3, 3)], [SPIKES], r"Transpose perm \(0, 2\) does not fit input rank 2"),
    ("transpose rank", Transpose((1, 0)), [(3, 3, 3)], [CURRENT], r"Transpose perm \(1, 0\) does not fit input rank 3"),
    ("readout shape mismatch", Readout([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]), [(4,)], [CURRENT], r"Readout expects input \(3,\), got \(4,\)"),
    ("readout of spikes", Readout([1.0], [0.0]), [(1,)], [SPIKES], r"Readout input 0 must carry current, got spikes"),
    ("matmul of a current", SpikeMatMul(), [(2, 3), (3, 4)], [SPIKES, CURRENT], r"SpikeMatMul input 1 must carry spikes or ternary, got current"),
    ("matmul inner size", SpikeMatMul(), [(2, 3), (4, 4)], [SPIKES, SPIKES], r"SpikeMatMul needs \(\.\.\., M, K\) x \(\.\.\., K, N\).*got \(2, 3\) x \(4, 4\)"),
    ("matmul leading axes", SpikeMatMul(), [(2, 2, 3), (3, 3, 4)], [SPIKES, SPIKES], r"equal leading axes"),
    ("matmul rank 1", SpikeMatMul(), [(3,), (3,)], [SPIKES, SPIKES], r"SpikeMatMul needs"),
    ("matmul one input", SpikeMatMul(), [(2, 3)], [SPIKES], r"SpikeMatMul takes 2 input\(s\), got 1"),
    ("encode with an input", Encode((3,), 1.0, 0, 1), [(3,)], [CURRENT], r"Encode takes 0 input\(s\), got 1"),
    ("reduce of spikes", ReduceSum((0,)), [(3, 2)], [SPIKES], r"ReduceSum input 0 must carry current, got spikes"),
    ("reduce axis out of range", ReduceSum((2,)), [(3, 2)], [CURRENT], r"ReduceSum axes \(2,\) do not fit input \(3, 2\)"),
    ("reduce every axis", ReduceSum((0, 1)), [(3, 2)], [CURRENT], r"at least one axis must remain"),
]


@pytest.mark.parametrize("op,in_shapes,in_kinds,pattern", [c[1:] for c in INFER_CASES], ids=[c[0] for c in INFER_CASES])
def test_infer_rejects_bad_inputs(op, in_shapes, in_kinds, pattern) -> None:
    with pytest.raises(IRError, match=pattern):
        op.infer(in_shapes, in_kinds)


def test_infer_accepts_good_inputs() -> None:
    assert DenseSynapse(z(3, 4)).infer([(7, 4)], [SPIKES]) == (7, 3)
    assert DenseSynapse(z(3, 4)).infer([(4,)], [CURRENT]) == (3,)
    assert ConvSynapse(z(6, 2, 3, 3), (2, 1), (1, 0, 1, 2), (1, 2), 2).infer([(4, 7, 9)], [SPIKES]) == (6, 4, 7)
    assert SpikeMaxPool((2, 3), (2, 2), (0, 1, 1, 0)).infer([(2, 5, 5)], [SPIKES]) == (2, 3, 2)
    assert SpikeMaxPool((2, 3), (2, 2)).output_kind([SPIKES]) == SPIKES
    assert SumPool(2, 2).output_kind([SPIKES]) == CURRENT
    assert Reshape((2, 6)).infer([(3, 4)], [CURRENT]) == (2, 6)
    assert Reshape((12,)).output_kind([SPIKES]) == SPIKES and Reshape((12,)).output_kind([CURRENT]) == CURRENT
    assert Transpose((2, 0, 1)).infer([(2, 3, 4)], [SPIKES]) == (4, 2, 3)
    assert Add().infer([(2,), (2,), (2,)], [CURRENT] * 3) == (2,)
    assert SpikeMatMul(3).infer([(2, 5, 3), (2, 3, 4)], [SPIKES, SPIKES]) == (2, 5, 4)
    assert SpikeMatMul(3).output_kind([SPIKES, SPIKES]) == CURRENT
    assert _neuron((2, 3)).output_kind([CURRENT]) == SPIKES
    assert ReduceSum((2, 0)).infer([(4, 3, 2)], [CURRENT]) == (3,) and ReduceSum((2, 0)).axes == (0, 2)


# ------------------------------------------------------------------- construction parameters
CONSTRUCT_CASES = [
    ("neuron threshold 0", lambda: Neuron([1, 0, 2], [0, 0, 0], [0, 0, 0], 1), r"Neuron thresholds must be >= 1, got minimum 0"),
    ("neuron threshold negative", lambda: Neuron([[-3]], [[0]], [[0]], 1), r"thresholds must be >= 1, got minimum -3"),
    ("neuron delay negative", lambda: Neuron([1], [0], [0], -1), r"Neuron delay must be in 0..1048576, got -1"),
    ("neuron shapes differ", lambda: Neuron([1, 1], [0], [0, 0], 1), r"Neuron threshold/v0/bias shapes differ"),
    ("neuron fractional threshold", lambda: Neuron([1.5], [0], [0], 1), r"parameter 'threshold' must be an integer array"),
    ("neuron nan v0", lambda: Neuron([1], [np.nan], [0], 1), r"parameter 'v0' must be an integer array"),
    ("dense 1-D weight", lambda: DenseSynapse(z(4)), r"DenseSynapse weight must be 2-D"),
    ("dense float weight", lambda: DenseSynapse([[0.5, 1.0]]), r"parameter 'weight' must be an integer array, got dtype float64"),
    ("dense string weight", lambda: DenseSynapse([["a"]]), r"parameter 'weight' must be an integer array"),
    ("conv 3-D weight", lambda: ConvSynapse(z(1, 3, 3)), r"ConvSynapse weight must be 4-D"),
    ("conv groups", lambda: ConvSynapse(z(3, 1, 1, 1), groups=2), r"groups=2 does not divide 3 output channels"),
    ("conv groups zero", lambda: ConvSynapse(z(3, 1, 1, 1), groups=0), r"groups=0"),
    ("conv stride 0", lambda: ConvSynapse(z(1, 1, 1, 1), stride=0), r"stride and dilation must be >= 1"),
    ("conv stride 3 entries", lambda: ConvSynapse(z(1, 1, 1, 1), stride=(1, 1, 1)), r"'stride' must have 2 entries"),
    ("conv negative padding", lambda: ConvSynapse(z(1, 1, 1, 1), padding=(0, -1, 0, 0)), r"'padding' must be 4 non-negative entries"),
    ("pool kernel 0", lambda: SpikeMaxPool(0, 1), r"SpikeMaxPool kernel and stride must be >= 1"),
    ("sumpool stride 0", lambda: SumPool(2, (1, 0)), r"SumPool kernel and stride must be >= 1"),
    ("pool padding 2 entries", lambda: SumPool(2, 1, (1, 1)), r"'padding' must be 4 non-negative entries"),
    ("encode scale 0", lambda: Encode((2,), 0.0, 0, 1), r"Encode scale must be positive and finite, got 0.0"),
    ("encode scale inf", lambda: Encode((2,), float("inf"), 0, 1), r"Encode scale must be positive and finite"),
    ("encode empty range", lambda: Encode((2,), 1.0, 3, 2), r"Encode range \[3, 2\] is empty"),
    ("readout 2-D scale", lambda: Readout([[1.0]], [[0.0]]), r"Readout scale/offset must be 1-D of equal length"),
    ("readout lengths differ", lambda: Readout([1.0, 1.0], [0.0]), r"Readout scale/offset must be 1-D of equal length"),
    ("readout nan scale", lambda: Readout([np.nan], [0.0]), r"parameter 'scale' has non-finite values"),
    ("readout inf offset", lambda: Readout([1.0], [np.inf]), r"parameter 'offset' has non-finite values"),
    ("matmul weight 0", lambda: SpikeMatMul(0), r"SpikeMatMul weight must be non-zero"),
    ("dense negative exponent", lambda: DenseSynapse(z(2, 2), exponent=-1), r"DenseSynapse weight exponent must be in 0..62, got -1"),
    ("reduce no axes", lambda: ReduceSum(()), r"ReduceSum axes must be distinct non-negative axes"),
    ("reduce repeated axis", lambda: ReduceSum((1, 1)), r"ReduceSum axes must be distinct"),
    ("network T 0", lambda: Network(0), r"time window T must be in 1..65536, got 0"),
]


@pytest.mark.parametrize("make,pattern", [c[1:] for c in CONSTRUCT_CASES], ids=[c[0] for c in CONSTRUCT_CASES])
def test_constructors_reject_bad_parameters(make, pattern) -> None:
    with pytest.raises(IRError, match=pattern) as info:
        make()
    assert isinstance(info.value, CsdcError)  # the CLI turns it into a clear message + exit code


def test_integer_valued_floats_are_accepted_as_int64() -> None:
    op = DenseSynapse(np.array([[1.0, -2.0]]))
    assert op.weight.dtype == np.int64 and op.weight.tolist() == [[1, -2]]
    assert Neuron(np.uint8([3]), [0], [0], 0).threshold.dtype == np.int64


# ------------------------------------------------------------------------------ Network.add
def _small(T: int = 2) -> Network:
    net = Network(T)
    net.add("in", Encode((3,), 1.0, 0, 3))
    net.add("act", _neuron((3,)), ["in"])
    return net


def test_add_rejects_duplicate_names() -> None:
    net = _small()
    with pytest.raises(IRError, match=r"node 'act' already exists"):
        net.add("act", _neuron((3,)), ["in"])
    assert len(net) == 2


def test_add_rejects_unknown_inputs() -> None:
    net = _small()
    with pytest.raises(IRError, match=r"node 'fc': input 'nope' does not exist"):
        net.add("fc", DenseSynapse(z(2, 3)), ["nope"])
    assert "fc" not in net and len(net) == 2


@pytest.mark.parametrize("name", ["", None, 3])
def test_add_rejects_bad_names(name) -> None:
    with pytest.raises(IRError, match=r"node names must be non-empty strings"):
        _small().add(name, DenseSynapse(z(2, 3)), ["act"])


def test_add_rejects_spikes_into_add_naming_the_node() -> None:
    net = _small()
    with pytest.raises(IRError, match=r"node 'sum' \(Add\): Add input 1 must carry current, got spikes"):
        net.add("sum", Add(), ["in", "act"])
    assert "sum" not in net and len(net) == 2 and net.consumers("act") == []


def test_add_rejects_shape_errors_naming_the_node() -> None:
    net = _small()
    with pytest.raises(IRError, match=r"node 'fc' \(DenseSynapse\): DenseSynapse expects input \(\.\.\., 4\), got \(3,\)"):
        net.add("fc", DenseSynapse(z(2, 4)), ["act"])


def test_add_rejects_an_input_used_twice_and_leaves_the_network_unchanged() -> None:
    net = _small()
    with pytest.raises(IRError, match=r"node 'twice': input 'in' is used twice"):
        net.add("twice", Add(), ["in", "in"])
    # a failed add must not leave a half-added node behind
    assert "twice" not in net and len(net) == 2
    assert net.consumers("in") == ["act"]
    net.add("twice", DenseSynapse(z(3, 3)), ["act"])  # the name is still free
    net.add("out", Readout([1.0] * 3, [0.0] * 3), ["twice"])
    net.verify()


def test_add_records_shapes_kinds_and_ports() -> None:
    net = _small()
    net.add("fc", DenseSynapse(z(3, 3)), ["act"])
    net.add("sum", Add(), ["fc", "in"])
    assert net.info("act").kind == SPIKES and net.info("sum").kind == CURRENT
    assert net.info("sum").shape == (3,)
    assert net.inputs("sum") == ["fc", "in"]
    assert net.order() == ["in", "act", "fc", "sum"]


# --------------------------------------------------------------------------- Network.verify
def test_verify_rejects_missing_encode() -> None:
    with pytest.raises(IRError, match=r"exactly one Encode node, found 0"):
        Network(2).verify()


def test_verify_rejects_two_encodes() -> None:
    net = Network(2)
    net.add("a", Encode((3,), 1.0, 0, 1))
    net.add("b", Encode((3,), 1.0, 0, 1))
    net.add("sum", Add(), ["a", "b"])
    net.add("out", Readout([1.0] * 3, [0.0] * 3), ["sum"])
    with pytest.raises(IRError, match=r"exactly one Encode node, found 2"):
        net.verify()


def test_verify_rejects_missing_readout() -> None:
    net = _small()
    net.add("fc", DenseSynapse(z(2, 3)), ["act"])
    with pytest.raises(IRError, match=r"exactly one Readout node, found 0"):
        net.verify()


def test_verify_rejects_dead_nodes() -> None:
    net = _small()
    net.add("fc", DenseSynapse(z(2, 3)), ["act"])
    net.add("unused", DenseSynapse(z(5, 3)), ["act"])
    net.add("out", Readout([1.0, 1.0], [0.0, 0.0]), ["fc"])
    with pytest.raises(IRError, match=r"node 'unused' \(DenseSynapse\) has no consumer \(dead code\)"):
        net.verify()


def test_verify_accepts_the_all_ops_network_and_every_op_is_used() -> None:
    net = all_ops_network()
    net.verify()
    assert {type(op).__name__ for _, op in net.nodes()} == set(OP_REGISTRY)
    assert net.input_shape == (2, 5, 5) and net.num_classes == 3


def test_replace_op_rejects_a_change_of_output() -> None:
    net = _small()
    with pytest.raises(IRError, match=r"node 'act': replacement changes the output"):
        net.replace_op("act", Reshape((3,)))  # current passes through as current, not spikes
    net.replace_op("act", _neuron((3,), threshold=5))
    assert int(net.op("act").threshold[0]) == 5


def test_with_delay_sets_every_neuron_and_keeps_the_rest() -> None:
    net = all_ops_network(T=3)
    d = net.with_delay(0)
    assert [d.op(n).delay for n in d.neurons()] == [0] * len(net.neurons())
    assert d.order() == net.order() and d.metadata == net.metadata
    assert [net.op(n).delay for n in net.neurons()] != [0] * len(net.neurons())


# ------------------------------------------------------------------------------ immutability
def test_op_arrays_are_read_only_and_ops_frozen() -> None:
    net = all_ops_network()
    seen = 0
    for name, op in net.nodes():
        for field, arr in op.arrays().items():
            seen += 1
            assert not arr.flags.writeable, f"{name}.{field} is writeable"
            with pytest.raises(ValueError):
                arr.flat[0] = 7
        for f in dataclasses.fields(op):
            with pytest.raises(dataclasses.FrozenInstanceError):
                setattr(op, f.name, getattr(op, f.name))
    assert seen >= 10


def test_ops_do_not_alias_or_freeze_the_callers_arrays() -> None:
    base = np.zeros(6, dtype=np.int64)
    w = base.reshape(2, 3)
    op = DenseSynapse(w)
    assert w.flags.writeable, "constructing an op must not make the caller's array read-only"
    base[0] = 5  # changing the caller's memory must not change the op
    assert int(op.weight[0, 0]) == 0
    thr = np.full(3, 2, dtype=np.int64)
    n = Neuron(thr, np.zeros(3, dtype=np.int64), np.zeros(3, dtype=np.int64), 1)
    thr[:] = 0  # would be an invalid threshold had it been shared
    assert n.threshold.tolist() == [2, 2, 2]
    scale = np.ones(2)
    r = Readout(scale, np.zeros(2))
    scale[0] = np.nan
    assert r.scale.tolist() == [1.0, 1.0]
    per_channel = np.full((3, 1), 2, dtype=np.int64)
    n = Neuron(np.broadcast_to(per_channel, (3, 4)), np.zeros((3, 4)), np.zeros((3, 4)), 1)
    per_channel[:] = 0  # a broadcast view of a writable array is copied (its compact form only)
    assert n.threshold.min() == 2 and n.threshold.shape == (3, 4) and 0 in n.threshold.strides


def test_weights_keep_their_dtype_and_read_only_arrays_are_shared() -> None:
    w = np.arange(-3, 3, dtype=np.int8).reshape(2, 3).copy()
    w.flags.writeable = False  # nobody can change it: shared, not copied
    view_of_writable = np.arange(-3, 3, dtype=np.int8).reshape(2, 3)
    view_of_writable.flags.writeable = False  # its base still is writable: copied
    assert not np.shares_memory(DenseSynapse(view_of_writable).mantissa, view_of_writable)
    op = DenseSynapse(w.T, exponent=3)  # a transposed view of it too
    assert op.mantissa.dtype == np.int8 and np.shares_memory(op.mantissa, w)
    assert op.weight.dtype == np.int64 and np.array_equal(op.weight, w.T.astype(np.int64) * 8)
    assert DenseSynapse(np.array([[200]], dtype=np.uint8)).mantissa.dtype == np.int16  # unsigned: widened, signed
    writable = np.ones((2, 2), dtype=np.int16)
    assert not np.shares_memory(DenseSynapse(writable).mantissa, writable)
