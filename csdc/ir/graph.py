"""The spiking network: a DAG (networkx) of named IR ops.

Each node holds one op and produces one tensor (``shape``, ``kind``). Edges carry the
input position (``port``) of the consumer. A network has exactly one :class:`Encode`
source and one :class:`Readout` sink, and a global time window ``T``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Container, Iterator

import networkx as nx
import numpy as np

from csdc.errors import IRError
from csdc.ir.ops import (CURRENT, SPIKES, T_MAX, Add, ConvSynapse, DenseSynapse, DiagonalSynapse, Encode, MBENeuron, Neuron, Op,
                         Readout, ReduceSum, Reshape, Shape, SpikeMatMul, SpikeMaxPool, SumPool, Transpose, compact,
                         elements, int_attr)

#: Largest magnitude any int64 quantity of a backend may reach (a factor 2 below int64's, for float rounding)
VALUE_LIMIT = 2.0**62
#: Largest finite float32: logits are reported in float32
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True, slots=True)
class TensorInfo:
    shape: Shape
    kind: str


class Network:
    """A spiking network. Build it with :meth:`add` in topological order."""

    def __init__(self, T: int, metadata: dict | None = None):
        self.T = int_attr(T, "time window T", 1, T_MAX)
        if metadata is not None and not isinstance(metadata, dict):
            raise IRError(f"metadata must be a JSON object, got {type(metadata).__name__}")
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

    def free_name(self, base: str, taken: Container[str] = ()) -> str:
        """``base``, or the first of ``base_2``, ``base_3``, ... that names no node here nor is in ``taken``."""
        cand, i = base, 1
        while cand in self or cand in taken:
            i += 1
            cand = f"{base}_{i}"
        return cand

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
            if not isinstance(op, (Encode, Readout)):  # the only floats: the input step and the dequantization
                floats = [k for k, v in {**op.arrays(), **op.attributes()}.items()
                          if (isinstance(v, np.ndarray) and v.dtype.kind not in "iu") or isinstance(v, float)]
                if floats:
                    raise IRError(f"node '{name}' ({type(op).__name__}): {', '.join(floats)} not integer; everything "
                                  "that runs must be an integer (only Encode and Readout carry floats)")
            if isinstance(op, MBENeuron) and op.steps > self.T:
                raise IRError(f"node '{name}' (MBENeuron): {op.steps} encoding steps do not fit the network's "
                              f"window T={self.T} (its output is a sequence of T steps)")
            if not isinstance(op, Readout) and not self.consumers(name):
                raise IRError(f"node '{name}' ({type(op).__name__}) has no consumer (dead code)")
        if self.info(self.output_name).kind != CURRENT:
            raise IRError("the readout must produce a current")

    # -- safety: what every backend relies on ----------------------------------------------
    def footprint(self) -> int:
        """Bytes one sample needs in a time-stepped backend, an upper bound: every node's output over T steps
        (1 byte per spike, 8 per current) and the zero-padded input of every window op. Python integers."""
        total = 0
        for name, op in self.nodes():
            info = self.info(name)
            total += self.T * elements(info.shape) * (1 if info.kind == SPIKES else 8)
            if isinstance(op, (ConvSynapse, SumPool, SpikeMaxPool)) and any(op.padding):
                c, h, w = self.info(self.inputs(name)[0]).shape
                p = op.padding
                total += self.T * c * (h + p[0] + p[2]) * (w + p[1] + p[3]) * 8
        return total

    def magnitude_bounds(self) -> dict[str, float]:
        """Per node, a bound on ``|value|`` of one step (float64 sums: they cannot wrap around, unlike the
        int64 sums of the exact bit-width analysis, which this proves safe to run). Raises IRError naming
        the first node whose values, or their sum over the T steps, could exceed ``VALUE_LIMIT``."""
        T = float(self.T)
        mag: dict[str, float] = {}
        for name, op in self.nodes():
            ins = [mag[s] for s in self.inputs(name)]
            if isinstance(op, Encode):
                m = float(max(abs(op.lo), abs(op.hi)))
            elif isinstance(op, Neuron):
                # the simulators' membrane bound: v0 + T (input + bias) + threshold
                peak = (float(np.abs(compact(op.v0)).max(initial=0)) + float(np.abs(compact(op.threshold)).max(initial=0))
                        + T * (ins[0] + float(np.abs(compact(op.bias)).max(initial=0))))
                if not peak < VALUE_LIMIT:
                    raise IRError(f"node '{name}' (Neuron): the membrane potential can reach {peak:.3g}, beyond the "
                                  f"int64 range the backends compute in")
                m = 1.0
            elif isinstance(op, MBENeuron):
                # u = v0 + V + offset, lowered only by resets; one output step sums K weights
                peak = (float(np.abs(compact(op.v0)).max(initial=0)) + T * ins[0]
                        + float(np.abs(op.offset).max()) + float(op.reset.sum(axis=1).max()))
                if not peak < VALUE_LIMIT:
                    raise IRError(f"node '{name}' (MBENeuron): the membrane potential can reach {peak:.3g}, beyond "
                                  "the int64 range the backends compute in")
                m = float(np.abs(op.weight.astype(np.float64)).sum(axis=0).max())
            elif isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)):
                w = np.abs(compact(op.mantissa).astype(np.float64))
                if isinstance(op, DenseSynapse):
                    row = float(w.sum(axis=1).max(initial=0)) * (op.mantissa.shape[1] / w.shape[1])
                elif isinstance(op, ConvSynapse):
                    row = float(w.sum(axis=(1, 2, 3)).max(initial=0)) * (elements(op.mantissa.shape[1:]) / elements(w.shape[1:]))
                else:
                    row = float(w.max(initial=0))
                m = row * 2.0**op.exponent * ins[0]
            elif isinstance(op, SpikeMatMul):
                k = self.info(self.inputs(name)[0]).shape[-1]
                m = 2.0 * k * T * abs(op.weight)
            elif isinstance(op, Add):
                m = float(sum(ins))
            elif isinstance(op, SumPool):
                m = float(op.kernel[0] * op.kernel[1]) * ins[0]
            elif isinstance(op, ReduceSum):
                shp = self.info(self.inputs(name)[0]).shape
                m = float(elements(tuple(shp[a] for a in op.axes))) * ins[0]
            elif isinstance(op, (Reshape, Transpose, Readout)):
                m = ins[0]
            elif self.info(name).kind == SPIKES:  # any other spiking op emits binary events
                m = 1.0
            else:
                raise IRError(f"node '{name}': no arithmetic bound is known for op {type(op).__name__}")
            if not T * m < VALUE_LIMIT:
                raise IRError(f"node '{name}' ({type(op).__name__}): its values can reach {m:.3g} per step "
                              f"({T * m:.3g} over T={self.T} steps), beyond the int64 range the backends compute in")
            mag[name] = m
        return mag

    def verify_arithmetic(self) -> None:
        """Prove that no backend's int64 arithmetic can overflow and that the logits are finite float32:
        bound the magnitudes wrap-free (``magnitude_bounds``), then run the compiler's exact bit-width analysis
        against the int64 profile, then bound the logits. Raises IRError / BudgetError naming the node."""
        from csdc.compiler.bitwidth import analyze_bitwidth  # the compiler owns the analysis

        self.magnitude_bounds()
        report = analyze_bitwidth(self, "int64")
        readout = self.op(self.output_name)
        assert isinstance(readout, Readout)
        total = 2.0 ** max(report.accumulator_bits - 1, 0)
        peak = total * float(np.abs(readout.scale).max(initial=0)) + float(np.abs(readout.offset).max(initial=0))
        if not peak < FLOAT32_MAX:
            raise IRError(f"node '{self.output_name}' (Readout): logits can reach {peak:.3g}, which is not a finite "
                          "float32; the readout scale or offset is corrupt")
