"""Lower a spiking IR network to a Lava deployment plan: processes, wiring and the global-clock
schedule (offsets and delay balancing). Pure numpy / scipy: no lava import.

Process mapping (see docs/lava.md):

- ``DenseSynapse`` on a 1-D input -> Lava ``Dense``; ``DenseSynapse`` on an N-D input,
  ``DiagonalSynapse``, ``SumPool``, ``ReduceSum`` -> Lava ``Sparse`` (the op as a sparse integer
  matrix; a ReduceSum is a matrix of ones fed by a current);
  ``ConvSynapse`` -> Lava ``Sparse`` (default) or Lava ``Conv`` (``conv="lava.Conv"``). Each
  only where its fixed-point model is exact: Dense and Sparse clip weights to [-256, 255] (mixed sign, ``num_weight_bits=9``) times ``2**weight_exp``
  and carry int32 currents; Conv wraps its output at 24 bits and needs symmetric padding.
  Otherwise the op becomes an exact int64 ``CsdcSynapse`` with the same one-step latency.
- ``MBENeuron`` -> ``CsdcMBENeuron`` (latency T: it integrates the window, then encodes; docs/mbe.md).
- ``Neuron`` -> ``CsdcNeuron``, ``TernaryNeuron`` -> ``CsdcTernaryNeuron`` (graded spikes -1/0/+1,
  so the synapses it feeds take graded input): int64 state where one 24-bit Loihi 2 word holds the
  membrane, else (``bitwidth.membrane_words``) ``CsdcTwoWordNeuron`` / ``CsdcTwoWordTernaryNeuron``
  (two words, a fine and a coarse compartment; the coarse summands come from copies of their synapse
  or SpikeMatMul processes with weights divided by ``2**shift``, named ``<node>__coarse<shift>``; a
  process left without readers is pruned; a synapse whose bits on both sides of a shift keep two
  words from fitting is first cut there: :func:`lava_network`), ``SpikeMaxPool`` -> ``CsdcMaxPool``, ``SpikeMatMul`` ->
  ``CsdcSpikeMatMul`` (latency 1, like a synapse), ``Encode`` ->
  ``CsdcEncode``, ``Readout`` -> ``CsdcReadout`` (custom fixed-point process models).
- ``Add`` is no process: every branch connects to the consumer's InPort, and Lava InPorts sum
  all their incoming connections (a dendrite). ``Reshape`` / ``Transpose`` are no process
  either: they become Lava virtual ports (``OutPort.reshape`` / ``OutPort.transpose``).

Global clock. Every IR node gets an *offset*: the global step carrying its local step 1.
``Encode`` has offset 1; a synapse adds 1 (Lava's Dense t-1 buffer); a neuron adds its delay D;
max-pool and routing add 0, a SpikeMatMul adds 1, an MBE population T. An Add or a SpikeMatMul takes the largest
offset of its inputs and delays every earlier input by the difference with a ``CsdcDelay``
(delay balancing). The readout window
starts at its input's offset, so the end-to-end latency is ``offset(readout) - 1 + T`` steps.
Samples are pipelined with ``period = T + max D`` steps (``max D`` at least T with an MBE population).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from csdc.compiler.bitwidth import (PROFILES, HardwareProfile, MembraneWords, analyze_bitwidth, current_bounds,
                                   membrane_words)
from csdc.compiler.integerize import split_for_profile
from csdc.errors import BudgetError, CsdcError, IRError
from csdc.ir.graph import Network
from csdc.ir.ops import (
    SPIKES,
    TERNARY,
    Add,
    ConvSynapse,
    DenseSynapse,
    DiagonalSynapse,
    Encode,
    MBENeuron,
    Neuron,
    Op,
    Readout,
    ReduceSum,
    Reshape,
    SpikeMatMul,
    SpikeMaxPool,
    SumPool,
    TernaryNeuron,
    Transpose,
)
from csdc.ir.semantics import _windows

PLAN_FORMAT = "csdc-lava-plan"
PLAN_VERSION = 2  # 2: two-word DIF populations (params "shift", "word_bits"; a "c_in" port)

#: Loihi 2 budgets used for the planning and the hardware report: 8-bit synaptic weights, 24-bit
#: neuron state words (a membrane of one or two words: thresholds and potentials up to 48 bits),
#: 24-bit dendritic accumulators and graded-spike payloads (the "loihi2" profile of the bit-width
#: analysis, whose numbers take precedence where it has them).
LOIHI2 = {"weight_bits": 8, "word_bits": 24, "threshold_bits": 48, "membrane_bits": 48, "accumulator_bits": 24,
          "payload_bits": 24}

_INT32 = 2**31  # Lava's Dense / Sparse send int32 currents
TERNARY_MESSAGE_BITS = 2  # payload of a signed spike -1/0/+1 (two's complement)
_CONV24 = 2**23  # Lava's Conv computes in float64 (exact) and wraps its output at 24 bits signed
CONV_IMPLS = ("lava.Sparse", "lava.Conv")


@dataclass
class Term:
    """One summand of an IR tensor: the output of ``proc`` delayed by ``delay`` steps and routed
    through ``transforms`` (in IR shapes, starting from the process's IR output shape)."""

    proc: str
    delay: int
    transforms: tuple[tuple[str, tuple[int, ...]], ...] = ()


@dataclass
class Plan:
    """A JSON-able deployment plan plus its integer arrays (for an ``.npz``)."""

    meta: dict
    processes: list[dict] = field(default_factory=list)
    connections: list[dict] = field(default_factory=list)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"format": PLAN_FORMAT, "version": PLAN_VERSION, "meta": self.meta,
                "processes": self.processes, "connections": self.connections}

    def process(self, name: str) -> dict:
        for p in self.processes:
            if p["name"] == name:
                return p
        raise KeyError(name)


# -- linear ops as sparse matrices ----------------------------------------------------------
def linear_matrix(op: Op, in_shape: tuple[int, ...], out_shape: tuple[int, ...]) -> sp.csr_matrix:
    """The synaptic matrix M (out_size, in_size), int64, with ``out.ravel() = M @ in.ravel()``."""
    n_in, n_out = int(np.prod(in_shape)), int(np.prod(out_shape))
    if isinstance(op, DenseSynapse):
        lead = int(np.prod(in_shape[:-1])) if len(in_shape) > 1 else 1
        return sp.kron(sp.identity(lead, dtype=np.int64, format="csr"), sp.csr_matrix(op.weight), format="csr").astype(np.int64)
    if isinstance(op, DiagonalSynapse):
        return sp.diags(op.weight.ravel().astype(np.int64), format="csr", dtype=np.int64)
    if isinstance(op, ReduceSum):
        kept = [d for d in range(len(in_shape)) if d not in op.axes]
        coords = np.indices(in_shape).reshape(len(in_shape), -1)
        rows = np.ravel_multi_index(tuple(coords[d] for d in kept), out_shape)
        return sp.csr_matrix((np.ones(n_in, np.int64), (rows, np.arange(n_in))), shape=(n_out, n_in))
    if isinstance(op, (ConvSynapse, SumPool)):
        if isinstance(op, ConvSynapse):
            kh, kw = op.weight.shape[2:]
            stride, padding, dilation, groups = op.stride, op.padding, op.dilation, op.groups
        else:
            kh, kw = op.kernel
            stride, padding, dilation, groups = op.stride, op.padding, (1, 1), in_shape[0]
        c, h, w = in_shape
        # index map of the zero-padded input: -1 marks padding
        idx = np.arange(n_in, dtype=np.int64).reshape(c, h, w)
        padded = np.full((c, h + padding[0] + padding[2], w + padding[1] + padding[3]), -1, dtype=np.int64)
        padded[:, padding[0]:padding[0] + h, padding[1]:padding[1] + w] = idx
        win = _windows(padded, (kh, kw), stride, (0, 0, 0, 0), dilation)  # c, oh, ow, kh, kw
        o, oh, ow = out_shape
        cg = c // groups
        og = o // groups
        rows: list[np.ndarray] = []
        cols: list[np.ndarray] = []
        vals: list[np.ndarray] = []
        out_idx = np.arange(n_out, dtype=np.int64).reshape(o, oh, ow)
        pairs = ([(oc, (oc // og) * cg + ci, op.weight[oc, ci]) for oc in range(o) for ci in range(cg)]
                 if isinstance(op, ConvSynapse) else [(ch, ch, np.ones((kh, kw), np.int64)) for ch in range(c)])
        for oc, ic, wk in pairs:
            src = win[ic]  # oh, ow, kh, kw
            vals_k = np.broadcast_to(wk, src.shape)
            dst = np.broadcast_to(out_idx[oc][:, :, None, None], src.shape)
            keep = (src >= 0) & (vals_k != 0)
            rows.append(dst[keep])
            cols.append(src[keep])
            vals.append(vals_k[keep])
        if not vals:
            return sp.csr_matrix((n_out, n_in), dtype=np.int64)
        m = sp.coo_matrix((np.concatenate(vals).astype(np.int64), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(n_out, n_in))
        return m.tocsr()
    raise IRError(f"no synaptic matrix for {type(op).__name__}")


def abs_bounds(net: Network) -> dict[str, int]:
    """Worst-case per-step ``max |value|`` of every node's output (scalar, conservative)."""
    b: dict[str, int] = {}
    for name, op in net.nodes():
        ins = [b[s] for s in net.inputs(name)]
        if isinstance(op, Encode):
            b[name] = max(abs(op.lo), abs(op.hi))
        elif isinstance(op, (Neuron, SpikeMaxPool)):
            b[name] = 1
        elif isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse, SumPool, ReduceSum)):
            m = linear_matrix(op, net.info(net.inputs(name)[0]).shape, net.info(name).shape)
            row = np.asarray(abs(m).sum(axis=1)).ravel()
            b[name] = int(row.max(initial=0)) * ins[0]
        elif isinstance(op, Add):
            b[name] = int(sum(ins))
        elif isinstance(op, SpikeMatMul):
            k = net.info(net.inputs(name)[0]).shape[-1]
            b[name] = abs(op.weight) * 2 * k * net.T  # A(t) C_B(t) + C_A(t-1) B(t) <= 2 K T
        elif isinstance(op, MBENeuron):
            b[name] = int(np.abs(op.weight).sum(axis=0).max())  # the weights of the bases firing at one step
        else:
            b[name] = ins[0]
    return b


def split_words(x: np.ndarray, shift: int) -> tuple[np.ndarray, np.ndarray]:
    """``x = hi * 2**shift + lo`` with ``0 <= lo < 2**shift`` (floor division), as int64 arrays."""
    x = np.asarray(x, dtype=np.int64)
    return x >> shift, x & ((1 << shift) - 1)


def _exact_shift(values, shift: int, node: str):  # type: ignore[no-untyped-def]
    """An integer array or sparse matrix divided by ``2**shift``: exact, or an IRError naming ``node``."""
    if not shift:
        return values
    data = values.data if sp.issparse(values) else values
    if np.any(data & ((1 << shift) - 1)):
        raise IRError(f"node '{node}': its weights are not multiples of 2**{shift}, so it cannot feed a coarse "
                      f"compartment in units of 2**{shift}")
    if sp.issparse(values):
        out = values.copy()
        out.data = out.data >> shift
        return out
    return values >> shift


def membrane_layouts(net: Network, word_bits: int) -> tuple[dict[str, MembraneWords], dict[str, str]]:
    """Per DIF / ternary population whose membrane needs more than one ``word_bits``-bit word, its
    two-word layout (:func:`csdc.compiler.bitwidth.membrane_words`); and per population that two
    words cannot hold either, why (it stays one int64 word in simulation)."""
    bounds = current_bounds(net)
    words: dict[str, MembraneWords] = {}
    refused: dict[str, str] = {}
    for name in net.neurons():
        try:
            layout = membrane_words(net, name, word_bits, bounds)
        except BudgetError as exc:
            refused[name] = str(exc)
            continue
        if layout is not None:
            words[name] = layout
    return words, refused


def loihi2_word_bits() -> int:
    """Bits of a Loihi 2 neuron state word (the ``loihi2`` profile's)."""
    return PROFILES["loihi2"].word_bits or LOIHI2["word_bits"]


def lava_network(net: Network, word_bits: int) -> tuple[Network, dict[str, MembraneWords], dict[str, str]]:
    """The network a plan maps, with its :func:`membrane_layouts`: ``net`` itself, or, where two words
    cannot hold a population's membrane because a synapse reading into it feeds its fine compartment
    bits above the shift (a generic compile's unsplit residual-stream synapses), ``net`` with those
    synapses cut at the shift
    (``integerize.split_for_profile`` with the network's own weight widths: the parts below and above
    ``2^s``, summed by an Add under the synapse's name; the same integer current, so the same spikes).
    A ``--profile loihi2`` compile comes already cut."""
    words, refused = membrane_layouts(net, word_bits)
    if not refused:
        return net, words, refused
    wide = max(PROFILES.values(), key=lambda p: p.weight_bits).weight_bits  # cut only: never split by width
    cut = split_for_profile(net, HardwareProfile("lava", weight_bits=wide, threshold_bits=wide, membrane_bits=64,
                                                 word_bits=word_bits))[0]
    return (cut, *membrane_layouts(cut, word_bits))


def _weight_exp(m: sp.csr_matrix) -> int | None:
    """Smallest e >= 0 such that every weight is ``mant << e`` with mant in [-256, 255] (Lava's
    fixed-point Dense/Sparse with mixed sign and ``num_weight_bits=9``), or None."""
    w = m.data.astype(np.int64)
    if w.size == 0:
        return 0
    for e in range(24):
        if np.all(w % (1 << e) == 0):
            mant = w >> e
            if mant.min() >= -256 and mant.max() <= 255:
                return e
        else:
            return None
    return None


class _Route:
    """A chain of virtual-port steps from a start shape, simplified as it is built."""

    def __init__(self, shape: tuple[int, ...]):
        self.start = tuple(shape)
        self.shape = tuple(shape)
        self.steps: list[tuple[str, tuple[int, ...], tuple[int, ...]]] = []  # (kind, arg, shape after)

    def add(self, kind: str, arg: tuple[int, ...]) -> None:
        if kind == "reshape":
            new = tuple(int(s) for s in arg)
            if int(np.prod(new)) != int(np.prod(self.shape)):
                raise IRError(f"internal routing error: reshape {self.shape} -> {new}")
            if new == self.shape:
                return
            if self.steps and self.steps[-1][0] == "reshape":
                self.steps.pop()  # reshape o reshape = reshape
                before = self.steps[-1][2] if self.steps else self.start
                if before == new:
                    self.shape = new
                    return
            self.steps.append(("reshape", new, new))
            self.shape = new
            return
        perm = tuple(int(p) for p in arg)
        if sorted(perm) != list(range(len(self.shape))):
            raise IRError(f"internal routing error: transpose {perm} of {self.shape}")
        if perm == tuple(range(len(perm))):
            return
        self.shape = tuple(self.shape[p] for p in perm)
        self.steps.append(("transpose", perm, self.shape))


class _Planner:
    def __init__(self, net: Network, n_samples: int, keep_trains: bool, use_lava_synapses: bool, conv: str):
        if conv not in CONV_IMPLS:
            raise IRError(f"unknown Lava convolution mapping '{conv}'; choose one of {', '.join(CONV_IMPLS)}")
        self.conv = conv
        self.word_bits = loihi2_word_bits()
        net, self.words, self.words_refused = lava_network(net, self.word_bits)
        self.net = net
        self.T = net.T
        self.n = int(n_samples)
        self.keep = bool(keep_trains)
        self.use_lava = bool(use_lava_synapses)
        delays = [net.op(nm).delay for nm in net.neurons()]
        delays += [self.T for _, op in net.nodes() if isinstance(op, MBENeuron)]  # an MBE population's window is 2T
        self.period = self.T + max(delays, default=0)
        self.bounds = abs_bounds(net)
        self.plan = Plan(meta={})
        self.terms: dict[str, list[Term]] = {}
        self.offset: dict[str, int] = {}
        self.procs: dict[str, dict] = {}
        self.delay_procs: dict[tuple[str, int], str] = {}
        self.connected: set[tuple] = set()
        self.relay_count = 0

    # -- processes -------------------------------------------------------------------
    def _proc(self, name: str, kind: str, ir_node: str | None, in_port: tuple | None, out_port: tuple | None,
              out_ir: tuple | None, in_ir: tuple | None, offset: int | None, params: dict,
              arrays: dict[str, np.ndarray] | None = None, impl: str = "custom", start: int | None = None) -> dict:
        if name in self.procs:
            raise IRError(f"duplicate Lava process name '{name}'")
        keys = {}
        for k, v in (arrays or {}).items():
            key = f"{name}/{k}"
            self.plan.arrays[key] = v
            keys[k] = key
        p = {"name": name, "kind": kind, "impl": impl, "ir_node": ir_node,
             "in_port": list(in_port) if in_port is not None else None,
             "out_port": list(out_port) if out_port is not None else None,
             "out_ir": list(out_ir) if out_ir is not None else None,
             "in_ir": list(in_ir) if in_ir is not None else None,
             "start": start, "offset": offset, "params": params, "arrays": keys}
        self.procs[name] = p
        self.plan.processes.append(p)
        return p

    def _delayed(self, proc: str, d: int) -> str:
        if d == 0:
            return proc
        key = (proc, d)
        if key not in self.delay_procs:
            src = self.procs[proc]
            name = f"{proc}__delay{d}"
            off = None if src["offset"] is None else src["offset"] + d
            self._proc(name, "delay", None, tuple(src["out_port"]), tuple(src["out_port"]), tuple(src["out_ir"]),
                       tuple(src["out_ir"]), off, {"steps": d}, impl="custom", start=src["offset"])
            self._connect_raw(proc, name, [])
            self.delay_procs[key] = name
        return self.delay_procs[key]

    # -- wiring -----------------------------------------------------------------------
    def _connect_raw(self, src: str, dst: str, transforms: list, dst_port: str | None = None) -> None:
        key = (src, dst, dst_port, tuple((t[0], t[1]) for t in transforms))
        if key in self.connected:
            # the same OutPort -> InPort edge twice (e.g. x + x through two routes): Lava keeps one
            # connection per port pair, so route the duplicate through a zero-step relay
            self.relay_count += 1
            sp_ = self.procs[src]
            relay = f"{src}__relay{self.relay_count}"
            self._proc(relay, "delay", None, tuple(sp_["out_port"]), tuple(sp_["out_port"]), tuple(sp_["out_ir"]),
                       tuple(sp_["out_ir"]), sp_["offset"], {"steps": 0}, impl="custom", start=sp_["offset"])
            self._connect_raw(src, relay, [])
            src = relay
            key = (src, dst, dst_port, key[3])
        self.connected.add(key)
        conn = {"src": src, "dst": dst, "transforms": [[t[0], list(t[1])] for t in transforms]}
        if dst_port is not None:
            conn["dst_port"] = dst_port
        self.plan.connections.append(conn)

    def _connect_terms(self, terms: list[Term], dst: str, dst_port: str | None = None) -> None:
        """Connect every term to dst's InPort (``dst_port``: its name when the process has
        several); the IR tensor is converted to dst's port layout."""
        d = self.procs[dst]
        in_port = tuple(d["in_port_b"] if dst_port == "b_in" else d["in_port"])
        for term in terms:
            src_name = self._delayed(term.proc, term.delay)
            src = self.procs[src_name]
            route = _Route(tuple(src["out_port"]))
            # process output layout -> IR layout
            if src["impl"] == "lava.Conv":
                route.add("transpose", (2, 1, 0))
            route.add("reshape", tuple(src["out_ir"]))
            for kind, arg in term.transforms:
                route.add(kind, arg)
            # IR layout -> destination port layout
            if d["impl"] == "lava.Conv":
                route.add("reshape", tuple(d["in_ir"]))
                route.add("transpose", (2, 1, 0))
            route.add("reshape", in_port)
            if route.shape != in_port:
                raise IRError(f"internal wiring error: {src_name} -> {dst} gives {route.shape}, port is {in_port}")
            self._connect_raw(src_name, dst, route.steps, dst_port)

    # -- lowering ---------------------------------------------------------------------
    def _synapse(self, name: str, op: Op, shift: int = 0, proc_name: str | None = None) -> None:
        """The process of synapse node ``name`` (named ``proc_name``, default ``name``), its
        weights divided by ``2**shift`` (exact: a coarse compartment's copy of the synapse)."""
        src = self.net.inputs(name)[0]
        in_ir, out_ir = self.net.info(src).shape, self.net.info(name).shape
        in_kind = self.net.info(src).kind
        m = _exact_shift(linear_matrix(op, in_ir, out_ir), shift, name)
        in_bound = self.bounds[src]
        acc = int(np.asarray(abs(m).sum(axis=1)).ravel().max(initial=0)) * in_bound
        # binary spikes carry no payload; a ternary spike is a graded spike carrying its sign
        msg_bits = 0 if in_kind == SPIKES else TERNARY_MESSAGE_BITS if in_kind == TERNARY else 24
        exp = _weight_exp(m)
        off = self.offset[src] + 1
        impl, reason = "custom", ""
        if self.use_lava:
            sym = isinstance(op, ConvSynapse) and op.padding[0] == op.padding[2] and op.padding[1] == op.padding[3]
            if (self.conv == "lava.Conv" and isinstance(op, ConvSynapse) and sym and acc < _CONV24
                    and np.abs(op.weight >> shift).max(initial=0) < _INT32):
                impl = "lava.Conv"
            elif exp is not None and acc < _INT32:
                impl = "lava.Dense" if isinstance(op, DenseSynapse) and len(in_ir) == 1 else "lava.Sparse"
            else:
                reason = ("weights are not mant * 2**e with mant in [-256, 255]" if exp is None
                          else f"accumulator bound {acc} exceeds int32")
        params: dict = {"num_message_bits": msg_bits, "acc_bound": acc, "reason": reason}
        arrays: dict[str, np.ndarray] = {}
        if impl == "lava.Conv":
            c, h, w = in_ir
            o, oh, ow = out_ir
            lw = np.ascontiguousarray((op.weight >> shift)[:, :, ::-1, ::-1].transpose(0, 3, 2, 1)).astype(np.int64)
            arrays["weight"] = lw
            params.update(stride=[op.stride[1], op.stride[0]], padding=[op.padding[1], op.padding[0]],
                          dilation=[op.dilation[1], op.dilation[0]], groups=op.groups)
            in_port, out_port = (w, h, c), (ow, oh, o)
        elif impl == "lava.Dense":
            arrays["weights"] = (op.weight.astype(np.int64) >> (shift + exp))
            params.update(weight_exp=exp, num_weight_bits=9)
            in_port, out_port = (int(np.prod(in_ir)),), (int(np.prod(out_ir)),)
        else:
            mm = m.copy()
            if impl == "lava.Sparse":
                mm.data = mm.data >> exp
                params.update(weight_exp=exp, num_weight_bits=9)
            arrays.update(data=mm.data.astype(np.int64), indices=mm.indices.astype(np.int64),
                          indptr=mm.indptr.astype(np.int64), shape=np.array(mm.shape, dtype=np.int64))
            if impl == "custom":
                in_port, out_port = tuple(in_ir), tuple(out_ir)
            else:
                in_port, out_port = (int(np.prod(in_ir)),), (int(np.prod(out_ir)),)
        if shift:
            params["shift"] = shift
        proc_name = proc_name or name
        self._proc(proc_name, "synapse", name, in_port, out_port, out_ir, in_ir, off, params, arrays, impl=impl,
                   start=self.offset[src])
        self._connect_terms(self.terms[src], proc_name)
        if proc_name == name:
            self.terms[name] = [Term(name, 0)]
            self.offset[name] = off

    # One lowering per op type, registered in LOWERINGS below. Each creates the node's Lava
    # process (if any), wires its inputs and sets ``terms`` / ``offset`` of the node.
    def _encode(self, name: str, op: Encode, ins: list[str], shape: tuple[int, ...]) -> None:
        self._proc(name, "encode", name, None, shape, shape, None, 1,
                   {"scale": float(op.scale), "lo": int(op.lo), "hi": int(op.hi)}, start=1)
        self.terms[name], self.offset[name] = [Term(name, 0)], 1

    def _linear_op(self, name: str, op: Op, ins: list[str], shape: tuple[int, ...]) -> None:
        self._synapse(name, op)

    def _neuron(self, name: str, op: Neuron, ins: list[str], shape: tuple[int, ...]) -> None:
        start = self.offset[ins[0]]
        words = self.words.get(name)
        params: dict = {"delay": int(op.delay)}
        if words is None:  # one int64 word
            arrays = {"threshold": op.threshold, "v0": op.v0, "bias": op.bias}
            if name in self.words_refused:
                params["two_words_refused"] = self.words_refused[name]
        else:  # two words, two compartments: threshold, v0 and bias as (hi, lo) words
            params.update(shift=words.shift, word_bits=self.word_bits, coarse=list(words.coarse),
                          widths={"hi": words.hi_bits, "coarse": words.coarse_bits, "fine": words.fine_bits})
            arrays = {}
            for key, value in (("threshold", op.threshold), ("v0", op.v0), ("bias", op.bias)):
                arrays[f"{key}_hi"], arrays[f"{key}_lo"] = split_words(value, words.shift)
        kind = "ternary" if isinstance(op, TernaryNeuron) else "neuron"
        self._proc(name, kind, name, shape, shape, shape, shape, start + op.delay, params, arrays, start=start)
        fine, coarse = self._compartments(name, ins[0], words)
        self._connect_terms(fine, name)
        if coarse:
            self._connect_terms(coarse, name, "c_in")
        self.terms[name], self.offset[name] = [Term(name, 0)], start + op.delay

    def _compartments(self, name: str, current: str, words: MembraneWords | None) -> tuple[list[Term], list[Term]]:
        """The terms of ``current`` for the fine and the coarse compartment of population ``name``:
        a coarse summand comes from a copy of its process with weights divided by ``2**shift``."""
        terms = self.terms[current]
        if words is None or not words.coarse:
            return terms, []
        coarse = Counter(words.coarse)
        if Counter(t.proc for t in terms if t.proc in coarse) != coarse:
            raise IRError(f"node '{name}': the coarse summands {sorted(coarse)} of its two-word membrane are not "
                          f"the processes feeding it ({sorted(t.proc for t in terms)})")
        fine = [t for t in terms if t.proc not in coarse]
        return fine, [Term(self._coarse_copy(t.proc, words.shift), t.delay, t.transforms) for t in terms
                      if t.proc in coarse]

    def _coarse_copy(self, node: str, shift: int) -> str:
        """The process of synapse or SpikeMatMul ``node`` with its weights divided by ``2**shift``."""
        proc = f"{node}__coarse{shift}"
        if proc not in self.procs:
            op = self.net.op(node)
            if isinstance(op, SpikeMatMul):
                self._matmul(node, op, self.net.inputs(node), self.net.info(node).shape, shift, proc)
            elif isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)):
                self._synapse(node, op, shift, proc)
            else:
                raise IRError(f"node '{node}' ({type(op).__name__}) cannot feed a coarse compartment")
        return proc

    def _mbe(self, name: str, op: MBENeuron, ins: list[str], shape: tuple[int, ...]) -> None:
        start = self.offset[ins[0]]  # integrates its input's T steps, then emits its S encoding steps
        self._proc(name, "mbe", name, shape, shape, shape, shape, start + self.T, {},
                   {"v0": op.v0, "offset": op.offset, "threshold": op.threshold, "reset": op.reset,
                    "weight": op.weight}, start=start)
        self._connect_terms(self.terms[ins[0]], name)
        self.terms[name], self.offset[name] = [Term(name, 0)], start + self.T

    def _maxpool(self, name: str, op: SpikeMaxPool, ins: list[str], shape: tuple[int, ...]) -> None:
        start = self.offset[ins[0]]
        in_shape = self.net.info(ins[0]).shape
        self._proc(name, "maxpool", name, in_shape, shape, shape, in_shape, start,
                   {"kernel": list(op.kernel), "stride": list(op.stride), "padding": list(op.padding)}, start=start)
        self._connect_terms(self.terms[ins[0]], name)
        self.terms[name], self.offset[name] = [Term(name, 0)], start

    def _matmul(self, name: str, op: SpikeMatMul, ins: list[str], shape: tuple[int, ...], shift: int = 0,
                proc_name: str | None = None) -> None:
        start = max(self.offset[s] for s in ins)
        a_shape, b_shape = self.net.info(ins[0]).shape, self.net.info(ins[1]).shape
        proc_name = proc_name or name
        params: dict = {"weight": int(_exact_shift(np.array([op.weight], np.int64), shift, name)[0])}
        if shift:
            params["shift"] = shift
        p = self._proc(proc_name, "matmul", name, a_shape, shape, shape, a_shape, start + 1, params, start=start)
        p["in_port_b"] = list(b_shape)
        for port, s in zip(("a_in", "b_in"), ins):
            d = start - self.offset[s]  # delay balancing of the earlier operand
            self._connect_terms([Term(t.proc, t.delay + d, t.transforms) for t in self.terms[s]], proc_name, port)
        if proc_name == name:
            self.terms[name], self.offset[name] = [Term(name, 0)], start + 1

    def _add(self, name: str, op: Add, ins: list[str], shape: tuple[int, ...]) -> None:
        off = max(self.offset[s] for s in ins)
        terms: list[Term] = []
        for s in ins:
            d = off - self.offset[s]  # delay balancing of the earlier branches
            terms += [Term(t.proc, t.delay + d, t.transforms) for t in self.terms[s]]
        self.terms[name], self.offset[name] = terms, off

    def _route(self, name: str, op: Reshape | Transpose, ins: list[str], shape: tuple[int, ...]) -> None:
        step = ("reshape", op.shape) if isinstance(op, Reshape) else ("transpose", op.perm)
        self.terms[name] = [Term(t.proc, t.delay, (*t.transforms, step)) for t in self.terms[ins[0]]]
        self.offset[name] = self.offset[ins[0]]

    def _readout(self, name: str, op: Readout, ins: list[str], shape: tuple[int, ...]) -> None:
        start = self.offset[ins[0]]
        self._proc(name, "readout", name, shape, None, None, shape, start, {},
                   {"scale": op.scale, "offset": op.offset}, start=start)
        self._connect_terms(self.terms[ins[0]], name)
        self.offset[name] = start

    def _prune(self) -> None:
        """Drop the synapse, SpikeMatMul and delay processes whose output reaches no process (a
        synapse whose every reader takes its coarse copy), with their connections and arrays."""
        while True:
            feeding = {c["src"] for c in self.plan.connections}
            dead = {p["name"] for p in self.plan.processes
                    if p["kind"] in ("synapse", "matmul", "delay") and p["name"] not in feeding}
            if not dead:
                return
            for name in dead:
                for key in self.procs.pop(name)["arrays"].values():
                    del self.plan.arrays[key]
            self.plan.processes = [p for p in self.plan.processes if p["name"] not in dead]
            self.plan.connections = [c for c in self.plan.connections if c["dst"] not in dead]

    def run(self) -> Plan:
        net = self.net
        for name, op in net.nodes():
            lower = LOWERINGS.get(type(op))
            if lower is None:
                raise IRError(f"node '{name}': the Lava backend has no mapping for {type(op).__name__} "
                              f"(mapped: {', '.join(sorted(c.__name__ for c in LOWERINGS))})")
            lower(self, name, op, net.inputs(name), net.info(name).shape)
        self._prune()
        readout = net.output_name
        self.plan.meta = {
            "T": self.T,
            "period": self.period,
            "n_samples": self.n,
            "keep_trains": self.keep,
            "latency": self.offset[readout] - 1 + self.T,
            "total_steps": (self.n - 1) * self.period + self.offset[readout] - 1 + self.T if self.n else 0,
            "input": net.input_name,
            "input_shape": list(net.input_shape),
            "readout": readout,
            "num_classes": net.num_classes,
            "offsets": dict(self.offset),
            "spiking": [n for n, op in net.nodes() if isinstance(op, (Neuron, SpikeMaxPool))],
        }
        return self.plan


#: IR op type -> lowering (explicit registry: a new IR op fails loudly until it is mapped).
LOWERINGS: dict[type[Op], Callable[[_Planner, str, Any, list[str], tuple[int, ...]], None]] = {
    Encode: _Planner._encode,
    DenseSynapse: _Planner._linear_op,
    ConvSynapse: _Planner._linear_op,
    DiagonalSynapse: _Planner._linear_op,
    SumPool: _Planner._linear_op,
    ReduceSum: _Planner._linear_op,
    Neuron: _Planner._neuron,
    TernaryNeuron: _Planner._neuron,
    MBENeuron: _Planner._mbe,
    SpikeMaxPool: _Planner._maxpool,
    SpikeMatMul: _Planner._matmul,
    Add: _Planner._add,
    Reshape: _Planner._route,
    Transpose: _Planner._route,
    Readout: _Planner._readout,
}


def make_plan(net: Network, n_samples: int = 1, *, keep_trains: bool = False, use_lava_synapses: bool = True,
              conv: str = "lava.Sparse") -> Plan:
    """Lower ``net`` to a :class:`Plan` for ``n_samples`` pipelined samples.

    ``conv`` chooses Lava's process for convolutions: ``"lava.Sparse"`` (default: the
    convolution as a sparse synaptic matrix, as Loihi stores it; about 4x faster in Lava's CPU
    simulation) or ``"lava.Conv"`` (Lava's Conv process, whose fixed-point model runs one
    scipy ``convolve2d`` per input/output channel pair every step).
    ``use_lava_synapses=False`` maps every synapse to the exact custom ``CsdcSynapse``
    (useful to isolate Lava's own processes when debugging)."""
    net.verify()
    return _Planner(net, n_samples, keep_trains, use_lava_synapses, conv).run()


_CUSTOM_CLASS = {"encode": "CsdcEncode", "neuron": "CsdcNeuron", "maxpool": "CsdcMaxPool", "delay": "CsdcDelay",
                 "ternary": "CsdcTernaryNeuron", "mbe": "CsdcMBENeuron",
                 "readout": "CsdcReadout", "matmul": "CsdcSpikeMatMul", "synapse": "CsdcSynapse"}


def _lava_class(p: dict) -> str:
    """The Lava process class that runs plan process ``p``."""
    if p["impl"] != "custom":
        return p["impl"]
    if p["kind"] in ("neuron", "ternary") and p["params"].get("shift"):
        return "CsdcTwoWordNeuron" if p["kind"] == "neuron" else "CsdcTwoWordTernaryNeuron"
    return _CUSTOM_CLASS[p["kind"]]


def _profile_bits(net: Network) -> tuple[dict[str, int], dict[str, dict[str, int]]]:
    """Loihi 2 budgets (:data:`LOIHI2`, updated from the compiler's ``loihi2`` profile) and per-node
    bit widths from the bit-width analysis."""
    budget = dict(LOIHI2)
    prof = PROFILES["loihi2"]
    budget.update(weight_bits=prof.weight_bits, threshold_bits=prof.threshold_bits, membrane_bits=prof.membrane_bits,
                  word_bits=loihi2_word_bits())
    try:
        per_node = analyze_bitwidth(net, "int64").per_node  # measure without enforcing a budget
    except CsdcError:
        per_node = {}
    return budget, per_node


def hardware_report(net: Network, plan: Plan | None = None) -> list[dict]:
    """Per Lava process: the class that runs it, its offset, what real Loihi 2 would need and
    where the network exceeds the ``loihi2`` hardware profile of the bit-width analysis (8-bit
    weights; 24-bit neuron words, a DIF membrane of one or two words (the two-word microcode
    with its shift and per-compartment widths); 24-bit dendritic accumulators and graded-spike
    payloads)."""
    plan = plan or make_plan(net)
    net = lava_network(net, loihi2_word_bits())[0]  # the network the plan maps (synapses cut at shifts)
    bounds = abs_bounds(net)
    budget, bits = _profile_bits(net)
    rows = []
    for p in plan.processes:
        node = p["ir_node"]
        kind, impl = p["kind"], p["impl"]
        nb = bits.get(node, {}) if node else {}
        notes: list[str] = []
        if kind == "synapse":
            op = net.op(node)
            w = op.weight if hasattr(op, "weight") else np.ones(1, np.int64)
            wbits = nb.get("weight_bits", int(np.abs(w).max(initial=0)).bit_length() + 1)
            if wbits > budget["weight_bits"]:
                notes.append(f"weights need {wbits} bits (> {budget['weight_bits']}): split into synapse groups with "
                             "different weight exponents on Loihi 2")
            acc = p["params"]["acc_bound"]
            if acc.bit_length() + 1 > budget["accumulator_bits"]:
                notes.append(f"per-step current up to {acc} exceeds the {budget['accumulator_bits']}-bit dendritic accumulator")
            if p["params"]["num_message_bits"] and bounds[net.inputs(node)[0]].bit_length() + 1 > budget["payload_bits"]:
                notes.append(f"graded input exceeds the {budget['payload_bits']}-bit spike payload")
            hw = ("Loihi 2 synapses" if impl.startswith("lava.")
                  else "Loihi 2 synapses (custom only in simulation: " + p["params"]["reason"] + ")")
            if p["params"].get("shift"):
                hw += f" feeding a coarse compartment (weight exponent lowered by {p['params']['shift']})"
        elif kind in ("neuron", "ternary"):
            op = net.op(node)
            prm = p["params"]
            if not prm.get("shift"):  # one word holds it, or two words do not (then it says why)
                tb = nb.get("threshold_bits", int(op.threshold.max(initial=1)).bit_length())
                if tb > budget["word_bits"]:
                    notes.append(f"thresholds need {tb} bits (> {budget['word_bits']})")
                if nb.get("membrane_bits", 0) > budget["word_bits"]:
                    notes.append(f"membrane potential may need {nb['membrane_bits']} bits (> {budget['word_bits']})")
                if "two_words_refused" in prm:
                    notes.append(prm["two_words_refused"])
            hw = ("custom neuron microcode (DIF: integration window T, delayed firing after D steps, reset by "
                  "subtraction, per-neuron v0 and bias)" if kind == "neuron" else
                  "custom neuron microcode (ternary DIF: as DIF, plus -1 graded spikes and reset by addition below 0)")
            if prm.get("shift"):
                w = prm["widths"]
                hw += (f"; two-word membrane microcode (shift {prm['shift']}, coarse/fine compartments: high word "
                       f"{w['hi']} bits, coarse accumulator {w['coarse']} bits, fine word {w['fine']} bits, of "
                       f"{prm['word_bits']})")
        elif kind == "mbe":
            op = net.op(node)
            tb = nb.get("threshold_bits", int(op.threshold.max()).bit_length())
            if tb > budget["word_bits"]:
                notes.append(f"thresholds need {tb} bits (> {budget['word_bits']})")
            if nb.get("membrane_bits", 0) > budget["word_bits"]:
                notes.append(f"membrane potential may need {nb['membrane_bits']} bits (> {budget['word_bits']})")
            hw = ("custom neuron microcode (MBE: integration window T, then per basis a threshold / reset table over "
                  "S steps; a spike sends its step's output weight as a graded payload)")
        elif kind == "maxpool":
            hw = "custom neuron microcode (TDEC max-pool: running counts and window max per step)"
        elif kind == "matmul":
            hw = ("custom neuron microcode (TDEC VMM: running spike counts held as neuron state, sent as graded spikes "
                  "and gated by the other operand's spikes)")
            if p["params"].get("shift"):
                hw += f" feeding a coarse compartment (event weight divided by 2**{p['params']['shift']})"
        elif kind == "encode":
            hw = "host / embedded CPU (graded spikes carrying the input levels)"
        elif kind == "readout":
            if nb.get("accumulator_bits", 0) > budget["membrane_bits"]:
                notes.append(f"readout accumulates {nb['accumulator_bits']} bits (> {budget['membrane_bits']})")
            hw = "host / embedded CPU (accumulate currents, dequantize)"
        else:
            hw = "Loihi 2 axon / synaptic delay"
        rows.append({"process": p["name"], "ir_node": node, "kind": kind,
                     "lava": _lava_class(p),
                     "offset": p["offset"], "loihi2": hw, "notes": notes})
    return rows


__all__ = ["CONV_IMPLS", "LOIHI2", "LOWERINGS", "PLAN_FORMAT", "PLAN_VERSION", "TERNARY_MESSAGE_BITS", "Plan", "abs_bounds",
           "hardware_report", "lava_network", "linear_matrix", "make_plan", "membrane_layouts", "split_words"]
