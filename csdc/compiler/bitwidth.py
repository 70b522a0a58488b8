"""Bit-width analysis: the integer range of every weight, threshold, current and membrane
potential, checked against a hardware profile.

Weights are counted as a signed mantissa times a power of two shared by the synapse node
(``w = m * 2^e``, as Loihi's weight exponent): the scale-absorption multiplies integer weights
by ``2^k``, which costs exponent, not mantissa bits.

Bounds are worst cases over all inputs: a spike is 0 or 1 per step, the encoded input lies
in its declared range, so each synapse's per-step current lies in
``[W+ lo + W- hi, W+ hi + W- lo]``. A neuron integrates T steps before firing (D >= T) and
reset by subtraction never takes ``v`` below 0, so
``min(0, v0) + T min(lo + bias, 0) <= v <= v0 + T max(hi + bias, 0)``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from csdc.errors import BudgetError
from csdc.ir import semantics
from csdc.ir.graph import Network
from csdc.ir.ops import (Add, ConvSynapse, DenseSynapse, DiagonalSynapse, Encode, Neuron, Readout, Reshape,
                         SpikeMatMul, SpikeMaxPool, SumPool, Transpose)


@dataclass(frozen=True)
class HardwareProfile:
    """Bit budgets (signed quantities include the sign bit)."""

    name: str
    weight_bits: int
    threshold_bits: int
    membrane_bits: int


PROFILES = {
    # a 32-bit integer datapath: 24-bit weight mantissas, 24-bit thresholds, 32-bit membrane
    "generic": HardwareProfile("generic", weight_bits=24, threshold_bits=24, membrane_bits=32),
    "loihi2": HardwareProfile("loihi2", weight_bits=8, threshold_bits=24, membrane_bits=24),
    "int64": HardwareProfile("int64", weight_bits=32, threshold_bits=48, membrane_bits=64),
}


def signed_bits(lo: int, hi: int) -> int:
    """Bits of a two's complement integer holding every value in [lo, hi]."""
    lo, hi = int(min(lo, 0)), int(max(hi, 0))
    return max(hi.bit_length(), (-lo - 1).bit_length() if lo < 0 else 0) + 1


def weight_mantissa_exponent(w: np.ndarray) -> tuple[int, int]:
    """(signed mantissa bits, shared exponent) of an integer weight array."""
    nz = np.abs(w[w != 0]).astype(np.int64)
    if nz.size == 0:
        return 1, 0
    e = 0
    while np.all(nz % (2 ** (e + 1)) == 0):
        e += 1
    m = w // (2 ** e)
    return signed_bits(int(m.min()), int(m.max())), e


@dataclass
class BitReport:
    profile: str
    weight_bits: int = 0  # mantissa bits (see weight_mantissa_exponent)
    weight_exponent: int = 0
    threshold_bits: int = 0
    membrane_bits: int = 0
    accumulator_bits: int = 0
    per_node: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _pos_neg(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.maximum(w, 0), np.minimum(w, 0)


def current_bounds(net: Network) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-step (lo, hi) bounds of every node's output, elementwise."""
    b: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, op in net.nodes():
        ins = [b[s] for s in net.inputs(name)]
        shape = net.info(name).shape
        if isinstance(op, Encode):
            b[name] = (np.full(shape, op.lo, np.int64), np.full(shape, op.hi, np.int64))
        elif isinstance(op, (Neuron, SpikeMaxPool)):
            b[name] = (np.zeros(shape, np.int64), np.ones(shape, np.int64))
        elif isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)):
            lo, hi = ins[0]
            wp, wn = _pos_neg(op.weight)
            cls = type(op)
            kw = {} if isinstance(op, (DenseSynapse, DiagonalSynapse)) else dict(stride=op.stride, padding=op.padding, dilation=op.dilation, groups=op.groups)
            P, N = cls(wp, **kw), cls(wn, **kw)
            f = lambda o, v: semantics._linear(o, v[None])[0]  # noqa: E731
            b[name] = (f(P, lo) + f(N, hi), f(P, hi) + f(N, lo))
        elif isinstance(op, SpikeMatMul):
            # per step, each output gets at most K count-gated adds of each of two kinds, counts <= T
            k = net.info(net.inputs(name)[0]).shape[-1]
            reach = np.full(shape, 2 * k * net.T * abs(op.weight), np.int64)
            b[name] = (-reach, reach) if op.weight < 0 else (np.zeros(shape, np.int64), reach)
        elif isinstance(op, Add):
            b[name] = (np.sum([i[0] for i in ins], axis=0), np.sum([i[1] for i in ins], axis=0))
        elif isinstance(op, (SumPool, Reshape, Transpose)):
            f = lambda v: semantics._linear(op, v[None])[0]  # noqa: E731
            b[name] = (f(ins[0][0]), f(ins[0][1]))
        elif isinstance(op, Readout):
            b[name] = ins[0]
        else:
            raise BudgetError(f"bit-width analysis does not know op {type(op).__name__}")
    return b


def analyze_bitwidth(net: Network, profile: HardwareProfile | str = "generic") -> BitReport:
    """Compute the bit widths the network needs; raise BudgetError naming the node that exceeds ``profile``."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    bounds = current_bounds(net)
    rep = BitReport(prof.name)
    T = net.T
    for name, op in net.nodes():
        entry: dict[str, int] = {}
        if isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)) and op.weight.size:
            entry["weight_bits"], entry["weight_exponent"] = weight_mantissa_exponent(op.weight)
            rep.weight_bits = max(rep.weight_bits, entry["weight_bits"])
            rep.weight_exponent = max(rep.weight_exponent, entry["weight_exponent"])
            if entry["weight_bits"] > prof.weight_bits:
                raise BudgetError(f"node '{name}' ({type(op).__name__}) needs {entry['weight_bits']}-bit weights, profile "
                                  f"'{prof.name}' allows {prof.weight_bits}; compile with a smaller --frac-bits or another --profile")
        if isinstance(op, Neuron):
            lo, hi = bounds[net.inputs(name)[0]]
            vmax = op.v0 + T * np.maximum(hi + op.bias, 0)
            vmin = np.minimum(op.v0, 0) + T * np.minimum(lo + op.bias, 0)
            entry["threshold_bits"] = int(op.threshold.max()).bit_length()
            entry["membrane_bits"] = signed_bits(int(vmin.min()), int(vmax.max()))
            rep.threshold_bits = max(rep.threshold_bits, entry["threshold_bits"])
            rep.membrane_bits = max(rep.membrane_bits, entry["membrane_bits"])
            if entry["threshold_bits"] > prof.threshold_bits:
                raise BudgetError(f"node '{name}' (Neuron) needs {entry['threshold_bits']}-bit thresholds, profile "
                                  f"'{prof.name}' allows {prof.threshold_bits}; compile with a smaller --frac-bits")
            if entry["membrane_bits"] > prof.membrane_bits:
                raise BudgetError(f"node '{name}' (Neuron) can reach a {entry['membrane_bits']}-bit membrane potential, "
                                  f"profile '{prof.name}' allows {prof.membrane_bits}; compile with a smaller --frac-bits")
        if isinstance(op, Readout):
            lo, hi = bounds[net.inputs(name)[0]]
            entry["accumulator_bits"] = signed_bits(int(T * lo.min()), int(T * hi.max()))
            rep.accumulator_bits = entry["accumulator_bits"]
            if entry["accumulator_bits"] > prof.membrane_bits:
                raise BudgetError(f"node '{name}' (Readout) accumulates up to {entry['accumulator_bits']} bits, profile "
                                  f"'{prof.name}' allows {prof.membrane_bits}")
        if entry:
            rep.per_node[name] = entry
    return rep
