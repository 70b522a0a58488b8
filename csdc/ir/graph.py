"""The spiking network: a DAG (networkx) of named IR ops.

Each node holds one op and produces one tensor (``shape``, ``kind``). Edges carry the
input position (``port``) of the consumer. A network has exactly one :class:`Encode`
source and one :class:`Readout` sink, and a global time window ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import networkx as nx

from csdc.errors import IRError
from csdc.ir.ops import CURRENT, Encode, Neuron, Op, Readout, Shape


@dataclass(frozen=True, slots=True)
class TensorInfo:
    shape: Shape
    kind: str


class Network:
    """A spiking network. Build it with :meth:`add` in topological order."""

    def __init__(self, T: int, metadata: dict | None = None):
        if int(T) < 1:
            raise IRError(f"time window T must be >= 1, got {T}")
        self.T = int(T)
        self.metadata: dict = dict(metadata or {})
        self.graph = nx.DiGraph()
        self._order: list[str] = []

    # -- construction -------------------------------------------------------------
    def add(self, name: str, op: Op, inputs: list[str] | tuple[str, ...] = ()) -> str:
        """Add node ``name`` computing ``op`` on the outputs of ``inputs`` (in port order)."""
        if not isinstance(name, str) or not name:
            raise IRError(f"node names must be non-empty strings, got {name!r}")
        if name in self.graph:
            raise IRError(f"node '{name}' already exists")
        for i, src in enumerate(inputs):
            if src not in self.graph:
                raise IRError(f"node '{name}': input '{src}' does not exist")
            if src in inputs[:i]:
                raise IRError(f"node '{name}': input '{src}' is used twice")
        shapes = [self.graph.nodes[s]["info"].shape for s in inputs]
        kinds = [self.graph.nodes[s]["info"].kind for s in inputs]
        try:
            shape = tuple(int(d) for d in op.infer(shapes, kinds))
        except IRError as exc:
            raise IRError(f"node '{name}' ({type(op).__name__}): {exc}") from None
        self.graph.add_node(name, op=op, info=TensorInfo(shape, op.output_kind(kinds)))
        for port, src in enumerate(inputs):
            self.graph.add_edge(src, name, port=port)
        self._order.append(name)
        return name

    def replace_op(self, name: str, op: Op) -> None:
        """Swap the op of ``name`` for one with the same output shape and kind."""
        ins = self.inputs(name)
        shapes = [self.info(s).shape for s in ins]
        kinds = [self.info(s).kind for s in ins]
        shape = tuple(op.infer(shapes, kinds))
        old = self.info(name)
        if shape != old.shape or op.output_kind(kinds) != old.kind:
            raise IRError(f"node '{name}': replacement changes the output from {old} to {shape} {op.output_kind(kinds)}")
        self.graph.nodes[name]["op"] = op

    # -- queries --------------------------------------------------------------------
    def op(self, name: str) -> Op:
        return self.graph.nodes[name]["op"]

    def info(self, name: str) -> TensorInfo:
        return self.graph.nodes[name]["info"]

    def inputs(self, name: str) -> list[str]:
        preds = self.graph.in_edges(name, data="port")
        return [src for src, _, _ in sorted(preds, key=lambda e: e[2])]

    def consumers(self, name: str) -> list[str]:
        return list(self.graph.successors(name))

    def order(self) -> list[str]:
        """Node names in topological (insertion) order."""
        return list(self._order)

    def nodes(self) -> Iterator[tuple[str, Op]]:
        for name in self._order:
            yield name, self.op(name)

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, name: str) -> bool:
        return name in self.graph

    @property
    def input_name(self) -> str:
        names = [n for n, op in self.nodes() if isinstance(op, Encode)]
        if len(names) != 1:
            raise IRError(f"a network needs exactly one Encode node, found {len(names)}")
        return names[0]

    @property
    def output_name(self) -> str:
        names = [n for n, op in self.nodes() if isinstance(op, Readout)]
        if len(names) != 1:
            raise IRError(f"a network needs exactly one Readout node, found {len(names)}")
        return names[0]

    @property
    def input_shape(self) -> Shape:
        return self.info(self.input_name).shape

    @property
    def num_classes(self) -> int:
        return self.info(self.output_name).shape[0]

    def neurons(self) -> list[str]:
        return [n for n, op in self.nodes() if isinstance(op, Neuron)]

    def with_delay(self, delay: int) -> "Network":
        """A copy in which every neuron population has delay ``delay``."""
        out = Network(self.T, self.metadata)
        for name, op in self.nodes():
            out.add(name, op.with_delay(delay) if isinstance(op, Neuron) else op, self.inputs(name))
        return out

    def verify(self) -> None:
        """Check the invariants of a complete network; raise IRError naming the first violation."""
        _ = self.input_name, self.output_name
        if not nx.is_directed_acyclic_graph(self.graph):
            raise IRError("the network has a cycle")
        for name, op in self.nodes():
            ins = self.inputs(name)
            shapes = [self.info(s).shape for s in ins]
            kinds = [self.info(s).kind for s in ins]
            try:
                shape = tuple(op.infer(shapes, kinds))
            except IRError as exc:
                raise IRError(f"node '{name}' ({type(op).__name__}): {exc}") from None
            if shape != self.info(name).shape:
                raise IRError(f"node '{name}': recorded shape {self.info(name).shape} != inferred {shape}")
            if not isinstance(op, Readout) and not self.consumers(name):
                raise IRError(f"node '{name}' ({type(op).__name__}) has no consumer (dead code)")
        if self.info(self.output_name).kind != CURRENT:
            raise IRError("the readout must produce a current")
