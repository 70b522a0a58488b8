"""The pass protocol: every canonical pass keeps its declared contract (requires / ensures), never
mutates its input, and the manager caps fixed-point loops and names the pipeline in its errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from csdc.compiler.frontend import load_qgraph
from csdc.compiler.passes import CONTRACTS, FixedPoint, PassError, PassManager, PassResult, declare, no_ops
from csdc.compiler.pipeline import CompileOptions, canonical_passes, canonicalize
from csdc.compiler.qgraph import QGraph, QNode

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*/model*.onnx"))


def test_every_canonical_pass_declares_a_contract():
    names = [getattr(p, "__name__", "") for p in canonical_passes(CompileOptions())]
    missing = [n for n in names if n not in CONTRACTS or not CONTRACTS[n].ensures]
    assert not missing, missing


@pytest.mark.parametrize("path", EXAMPLES, ids=[f"{p.parent.name}/{p.name}" for p in EXAMPLES])
def test_contracts_hold_on_the_shipped_examples(path):
    graph = canonicalize(load_qgraph(path), CompileOptions(), contracts=True)
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "Conv", "Gemm", "BatchNormalization") for n in graph.nodes)


@pytest.mark.parametrize("route,arch", [("brevitas-qcdq-torchscript", "attention"), ("brevitas-qonnx", "cnn"),
                                        ("torch-lsq-dynamo", "attention"), ("ort-int8-activations", "cnn")])
def test_contracts_hold_on_producer_models(tmp_path, route, arch):
    pytest.importorskip("brevitas")
    import producers as P

    path = P.build_route(route, arch, str(tmp_path))
    canonicalize(load_qgraph(path), CompileOptions(), contracts=True)


def _graph() -> QGraph:
    return QGraph(nodes=[QNode("id", "Identity", ("x",), ("a",)), QNode("relu", "Relu", ("a",), ("y",))],
                  constants={}, shapes={"x": (1, 4), "a": (1, 4), "y": (1, 4)}, input="x", output="y")


def test_a_pass_that_mutates_its_input_is_caught():
    def sloppy(graph: QGraph) -> QGraph:
        graph.provenance["id"] = "touched"
        return graph.with_nodes(graph.nodes)

    with pytest.raises(PassError, match="sloppy: mutated its input graph"):
        PassManager([sloppy], check=True).run(_graph())
    PassManager([sloppy]).run(_graph())  # unchecked runs do not look


def test_broken_ensures_and_requires_name_the_pipeline():
    def keep(graph: QGraph) -> QGraph:
        return graph.with_nodes(graph.nodes)

    def rename(graph: QGraph) -> QGraph:
        return graph.with_nodes(graph.nodes)

    declare(keep, ensures=[no_ops("Identity")])
    declare(rename, requires=[no_ops("Relu")])
    try:
        with pytest.raises(PassError, match=r"after passes \[keep\]: keep: does not ensure no_ops\(Identity\)"):
            PassManager([keep], check=True).run(_graph())
        with pytest.raises(PassError, match=r"after passes \[\]: rename: requires no_ops\(Relu\)"):
            PassManager([rename], check=True).run(_graph())
    finally:
        del CONTRACTS["keep"], CONTRACTS["rename"]


def test_fixed_point_groups_report_changes_and_are_capped():
    def drop_one_identity(graph: QGraph) -> PassResult:
        ids = [n for n in graph.nodes if n.op_type == "Identity"]
        if not ids:
            return PassResult(graph, False)
        n = ids[0]
        nodes = [m.with_(inputs=tuple(n.inputs[0] if i == n.outputs[0] else i for i in m.inputs)) for m in graph.nodes if m is not n]
        return PassResult(graph.with_nodes(nodes), True)

    g = _graph()
    g = g.with_nodes([QNode("id0", "Identity", ("x",), ("x0",)), g.nodes[0].with_(inputs=("x0",)), g.nodes[1]])
    result = PassManager([FixedPoint([drop_one_identity], max_rounds=4)]).run(g)
    assert result.modified and [n.op_type for n in result.graph.nodes] == ["Relu"]
    assert not PassManager([drop_one_identity]).run(result.graph).modified

    def flip(graph: QGraph) -> QGraph:  # never settles
        n = graph.nodes[-1]
        return graph.with_nodes([*graph.nodes[:-1], n.with_(attrs={"k": 1 - n.attrs.get("k", 0)})])

    with pytest.raises(PassError, match=r"still change the graph after 3 rounds"):
        PassManager([FixedPoint([flip], max_rounds=3)]).run(_graph())


def test_an_unexpected_exception_in_a_pass_becomes_a_pass_error():
    def broken(graph: QGraph) -> QGraph:
        return {}["missing"]

    def fine(graph: QGraph) -> QGraph:
        return graph

    with pytest.raises(PassError, match=r"after passes \[fine\]: broken: internal error KeyError"):
        PassManager([fine, broken]).run(_graph())

    def no_shape(graph: QGraph) -> QGraph:
        del graph.shapes["a"]  # what a missing shape used to raise, far from its cause
        return graph.with_nodes(graph.nodes).shapes["a"]

    with pytest.raises(PassError, match=r"KeyError: 'a' \(tensor 'a' of node 'id', op Identity\)"):
        PassManager([no_shape]).run(_graph())


def test_modified_flag_compares_attribute_arrays_by_value():
    def copy_attrs(graph: QGraph) -> QGraph:
        return graph.with_nodes([n.with_(attrs={k: np.array(v) for k, v in n.attrs.items()}) for n in graph.nodes])

    g = _graph()
    g = g.with_nodes([g.nodes[0].with_(attrs={"w": np.arange(3)}), g.nodes[1]])
    assert not PassManager([copy_attrs]).run(g).modified
