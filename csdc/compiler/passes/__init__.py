"""Compiler passes over the quantized graph, and the protocol they share.

One pass per module; each is a function ``QGraph -> QGraph`` whose docstring states the invariant it
establishes, and which returns a new graph (never mutating its input: ``QGraph.with_nodes`` copies).
A pass declares its contract at the end of its module with :func:`declare`: what it ``requires`` of
its input and ``ensures`` of its output, as predicates ``QGraph -> reason | None`` (None: holds).
:class:`PassManager` runs a list of passes (and :class:`FixedPoint` groups, capped), tells whether each
changed the graph (:class:`PassResult`), checks the contracts and that no pass mutated its input
when asked (tests), and turns any failure inside a pass into a :class:`PassError` naming the
pipeline so far.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np

from csdc.compiler.qgraph import QGraph, QNode
from csdc.errors import CsdcError

Pass = Callable[[QGraph], QGraph]
Predicate = Callable[[QGraph], "str | None"]  # a reason when the property does not hold


class PassError(CsdcError):
    """A pass failed or broke its contract; the message names the pipeline so far."""


@dataclass(frozen=True)
class PassResult:
    graph: QGraph
    modified: bool


@dataclass(frozen=True)
class Contract:
    requires: tuple[Predicate, ...] = ()
    ensures: tuple[Predicate, ...] = ()


CONTRACTS: dict[str, Contract] = {}


def pass_name(p: Pass) -> str:
    return getattr(p, "__name__", type(p).__name__)


def declare(p: Pass, requires: Iterable[Predicate] = (), ensures: Iterable[Predicate] = ()) -> None:
    """Record the contract of pass ``p`` (looked up by its name)."""
    CONTRACTS[pass_name(p)] = Contract(tuple(requires), tuple(ensures))


# ------------------------------------------------------------------------------------ predicates
def well_formed(graph: QGraph) -> str | None:
    """Every node reads only the input, constants and earlier nodes' outputs; the output is produced."""
    produced = {graph.input, *graph.constants}
    for n in graph.nodes:
        for i in n.inputs:
            if i and i not in produced:
                return f"node '{n.name}' ({n.op_type}) reads '{i}' before it is produced"
        produced.update(n.outputs)
    return None if graph.output in produced else f"the output '{graph.output}' is not produced"


def no_ops(*ops: str) -> Predicate:
    """No node of these op types (in the standard domain) remains."""
    def check(graph: QGraph) -> str | None:
        left = [n for n in graph.nodes if n.op_type in ops and not n.domain]
        return f"{left[0].op_type} '{left[0].name}' remains" if left else None
    check.__name__ = f"no_ops({', '.join(ops)})"
    return check


def no_foreign_domains(graph: QGraph) -> str | None:
    """Every node is a standard ONNX op or one of csdc's internal ops."""
    left = [n for n in graph.nodes if n.domain not in ("", "ai.onnx")]
    return f"{left[0].domain}.{left[0].op_type} '{left[0].name}' remains" if left else None


def shapes_known(graph: QGraph) -> str | None:
    """Every tensor a node produces has a shape (or is a constant)."""
    for n in graph.nodes:
        for o in n.outputs:
            if o and o not in graph.shapes and o not in graph.constants:
                return f"tensor '{o}' of node '{n.name}' ({n.op_type}) has no shape"
    return None


def idempotent(p: Pass) -> Predicate:
    """Running ``p`` again changes nothing: the pattern it rewrites no longer occurs."""
    def check(graph: QGraph) -> str | None:
        again = p(graph.with_nodes(graph.nodes))
        return None if not _changed(graph, again) else f"{pass_name(p)} still finds something to rewrite"
    check.__name__ = f"idempotent({pass_name(p)})"
    return check


# ------------------------------------------------------------------------------------ running
def _same_node(a: QNode, b: QNode) -> bool:
    if a is b:
        return True
    if (a.name, a.op_type, a.inputs, a.outputs, a.domain) != (b.name, b.op_type, b.inputs, b.outputs, b.domain):
        return False
    if a.attrs is b.attrs:
        return True
    if a.attrs.keys() != b.attrs.keys():
        return False
    for k, v in a.attrs.items():
        w = b.attrs[k]
        if v is w:
            continue
        if isinstance(v, np.ndarray) or isinstance(w, np.ndarray):
            if not (isinstance(v, np.ndarray) and isinstance(w, np.ndarray) and v.shape == w.shape and np.array_equal(v, w)):
                return False
        elif v != w:
            return False
    return True


def _changed(before: QGraph, after: QGraph) -> bool:
    return (len(before.nodes) != len(after.nodes) or any(not _same_node(a, b) for a, b in zip(before.nodes, after.nodes))
            or before.constants.keys() != after.constants.keys())


def _snapshot(graph: QGraph) -> tuple:
    return (tuple(id(n) for n in graph.nodes), tuple(graph.constants), tuple(graph.shapes), tuple(graph.qconstants),
            tuple(graph.provenance.items()), len(graph.warnings))


@dataclass
class FixedPoint:
    """Passes run in turn until none changes the graph, at most ``max_rounds`` times."""

    passes: Sequence[Pass]
    max_rounds: int = 8
    __name__: str = field(default="fixed_point")


class PassManager:
    """Runs passes in order. With ``check`` (tests) it verifies before each pass its ``requires``, after
    it its ``ensures`` and that the graph stays well formed, and that the pass left its input untouched.
    Any exception inside a pass becomes a :class:`PassError` naming the pass and the pipeline so far."""

    def __init__(self, passes: Sequence[Pass | FixedPoint], check: bool = False,
                 verify: Callable[[QGraph, str], None] | None = None) -> None:
        self.passes, self.check, self.verify = list(passes), check, verify
        self.done: list[str] = []

    def run(self, graph: QGraph) -> PassResult:
        modified = False
        for p in self.passes:
            if isinstance(p, FixedPoint):
                for _ in range(p.max_rounds):
                    round_modified = False
                    for q in p.passes:
                        result = self._run_one(q, graph)
                        graph, round_modified = result.graph, round_modified or result.modified
                    modified = modified or round_modified
                    if not round_modified:
                        break
                else:
                    raise PassError(f"{graph.path}: passes [{', '.join(pass_name(q) for q in p.passes)}] still change the "
                                    f"graph after {p.max_rounds} rounds (after [{', '.join(self.done)}])")
            else:
                result = self._run_one(p, graph)
                graph, modified = result.graph, modified or result.modified
        return PassResult(graph, modified)

    def _fail(self, graph: QGraph, name: str, why: str) -> PassError:
        return PassError(f"{graph.path}: after passes [{', '.join(self.done)}]: {name}: {why}")

    def _run_one(self, p: Pass, graph: QGraph) -> PassResult:
        name = pass_name(p)
        contract = CONTRACTS.get(name, Contract())
        if self.check:
            for pred in contract.requires:
                why = pred(graph)
                if why is not None:
                    raise self._fail(graph, name, f"requires {getattr(pred, '__name__', pred)}: {why}")
            before = _snapshot(graph)
        try:
            out = p(graph)
        except CsdcError:
            raise
        except Exception as exc:  # a bug or an input no check caught: name where it happened
            raise self._fail(graph, name, f"internal error {type(exc).__name__}: {exc}{_culprit(graph, exc)}") from exc
        if isinstance(out, PassResult):
            new, modified = out.graph, out.modified
        else:
            new, modified = out, _changed(graph, out)
        self.done.append(name)
        if self.check:
            if _snapshot(graph) != before:
                raise self._fail(graph, name, "mutated its input graph")
            for pred in (well_formed, *contract.ensures):
                why = pred(new)
                if why is not None:
                    raise self._fail(graph, name, f"does not ensure {getattr(pred, '__name__', pred)}: {why}")
        if self.verify is not None:
            try:
                self.verify(new, name)
            except CsdcError as exc:
                raise self._fail(graph, name, str(exc)) from None
        return PassResult(new, modified)


def _culprit(graph: QGraph, exc: Exception) -> str:
    """The node behind a KeyError on a tensor name (the usual form of a missing shape or constant)."""
    key = exc.args[0] if isinstance(exc, KeyError) and exc.args else None
    if not isinstance(key, str):
        return ""
    nodes = [n for n in graph.nodes if key in n.inputs or key in n.outputs]
    return f" (tensor '{key}' of node '{nodes[0].name}', op {nodes[0].op_type})" if nodes else ""


def run_passes(graph: QGraph, passes: list[Pass], check: Callable[[QGraph, str], None] | None = None) -> QGraph:
    """Run ``passes`` in order; ``check(graph, pass_name)`` runs after each (tests use a verifier)."""
    return PassManager(passes, verify=check).run(graph).graph
