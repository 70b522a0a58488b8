"""Bit-width analysis: the integer range of every weight, threshold, current and membrane
potential, checked against a hardware profile.

Weights are counted as a signed mantissa times a power of two shared by the synapse node
(``w = m * 2^e``, as Loihi's weight exponent): the scale-absorption multiplies integer weights
by ``2^k``, which costs exponent, not mantissa bits.

Bounds are worst cases over all inputs: a spike is 0 or 1 per step, the encoded input lies
in its declared range, so each synapse's per-step current lies in
``[W+ lo + W- hi, W+ hi + W- lo]``. A neuron integrates T steps before firing (D >= T) and
reset by subtraction never takes ``v`` below 0, so
``min(0, v0) + T min(lo + bias, 0) <= v <= v0 + T max(hi + bias, 0)``. A ternary neuron's spike is
-1, 0 or +1 (a signed graded spike), and its reset by addition never takes ``v`` above
``threshold - 1``, so its upper bound starts from ``max(v0, threshold - 1)``.

A profile with words (``loihi2``: 24 bits) holds a DIF or ternary membrane wider than one word in two,
``V = hi * 2^s + lo`` (:func:`membrane_words`), and checks every word and compartment accumulator
against the word; MBE neurons keep one word.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from csdc.compiler import broadcast
from csdc.errors import BudgetError
from csdc.ir.graph import Network
from csdc.ir.ops import (Add, ConvSynapse, DenseSynapse, DiagonalSynapse, Encode, Neuron, Readout, ReduceSum, Reshape,
                         SpikeMatMul, SpikeMaxPool, SumPool, Transpose, compact,
                         power_of_two_exponent)
from csdc.ir.ops import TERNARY, MBENeuron, TernaryNeuron


@dataclass(frozen=True)
class HardwareProfile:
    """Bit budgets (signed quantities include the sign bit)."""

    name: str
    weight_bits: int
    threshold_bits: int
    membrane_bits: int
    lane_bits: int = 0  # membrane width of the simulator's fast path (int32 lanes: 31), preferred where exact enough; 0: none
    # width of one neuron state word and of one dendritic accumulator; 0: none. A DIF / ternary membrane
    # wider than a word takes two (membrane_words); MBE neurons and the readout's window keep the rules below
    word_bits: int = 0
    units: str = ""  # the profile whose precision policy picks every site's exponent ("": this one)


PROFILES = {
    # the simulators' 64-bit integer datapath, staying in int32 lanes (31-bit membranes) wherever the
    # error stays below integerize.LANE_LEVELS: wide only where a sum of rescaled groups needs it
    "generic": HardwareProfile("generic", weight_bits=32, threshold_bits=48, membrane_bits=64, lane_bits=31),
    # Loihi 2: 8-bit weight mantissas with a per-synapse-group exponent (wider weights are split), 24-bit
    # neuron words and dendritic accumulators, a membrane of up to two words; the units are the generic
    # compile's, so a loihi2 network is the generic one mapped onto the hardware: spike for spike alike
    "loihi2": HardwareProfile("loihi2", weight_bits=8, threshold_bits=48, membrane_bits=48, word_bits=24, units="generic"),
    "int64": HardwareProfile("int64", weight_bits=32, threshold_bits=48, membrane_bits=64),
}


def signed_bits(lo: int, hi: int) -> int:
    """Bits of a two's complement integer holding every value in [lo, hi]."""
    lo, hi = int(min(lo, 0)), int(max(hi, 0))
    return max(hi.bit_length(), (-lo - 1).bit_length() if lo < 0 else 0) + 1


def weight_mantissa_exponent(op: DenseSynapse | ConvSynapse | DiagonalSynapse) -> tuple[int, int]:
    """(signed mantissa bits, shared exponent) of a synapse's weights ``mantissa * 2**exponent``, with
    any power of two common to the mantissas moved into the exponent."""
    m = compact(op.mantissa)
    if not np.any(m):
        return 1, 0
    e = power_of_two_exponent(m)
    return signed_bits(int(m.min()) >> e, int(m.max()) >> e), op.exponent + e


@dataclass
class BitReport:
    profile: str
    weight_bits: int = 0  # mantissa bits (see weight_mantissa_exponent)
    weight_exponent: int = 0
    threshold_bits: int = 0
    membrane_bits: int = 0
    accumulator_bits: int = 0
    per_node: dict[str, dict[str, int]] = field(default_factory=dict)
    word_bits: int = 0  # the profile's word (0: none; then the two fields below are left out of to_dict)
    membrane_words: int = 0  # most words of any DIF / ternary membrane
    two_words: list[str] = field(default_factory=list)  # the populations whose membrane takes two words

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.word_bits:
            for key in ("word_bits", "membrane_words", "two_words"):
                del d[key]
        return d


def _exact_product(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """``x @ w`` of integer arrays, through float64 BLAS when every partial sum stays exact (< 2^53)."""
    reach = float(np.abs(x).max(initial=0)) * float(np.abs(w).max(initial=0)) * max(x.shape[-1], 1)
    if reach < 2.0 ** 52:
        return np.rint(x.astype(np.float64) @ w.astype(np.float64)).astype(np.int64)
    return x.astype(np.int64) @ w.astype(np.int64)


def _channel_extremes(lo: np.ndarray, hi: np.ndarray, channels: int, padded: bool) -> tuple[np.ndarray, np.ndarray]:
    """One (lo, hi) per channel of a (C, H, W) tensor's bounds: the extremes over positions, widened
    to include 0 when a window reads zero padding (1-D int64)."""
    lo_c = np.broadcast_to(lo.min(axis=(1, 2)), (channels,)).astype(np.int64)
    hi_c = np.broadcast_to(hi.max(axis=(1, 2)), (channels,)).astype(np.int64)
    if padded:
        lo_c, hi_c = np.minimum(lo_c, 0), np.maximum(hi_c, 0)
    return lo_c, hi_c


def _synapse_bounds(op, lo: np.ndarray, hi: np.ndarray, in_shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Per-step output bounds of a synapse from its input bounds (broadcast arrays), in O(parameters)
    time and with temporaries no larger than the (narrow) weights."""
    m = compact(op.mantissa)
    wp, wn = np.maximum(m, 0), np.minimum(m, 0)  # same dtype as the mantissa: no overflow, no widening
    if isinstance(op, DiagonalSynapse):
        wp, wn = wp.astype(np.int64), wn.astype(np.int64)
        out = (wp * lo + wn * hi, wp * hi + wn * lo)
    elif isinstance(op, DenseSynapse):
        if lo.shape[-1] == 1 and hi.shape[-1] == 1:  # the same bounds for every input feature (spikes, pixels)
            sp, sn = wp.sum(axis=1, dtype=np.int64), wn.sum(axis=1, dtype=np.int64)
            out = (lo * sp + hi * sn, hi * sp + lo * sn)
        else:
            k = in_shape[-1]
            lo_b = np.broadcast_to(lo, lo.shape[:-1] + (k,))
            hi_b = np.broadcast_to(hi, hi.shape[:-1] + (k,))
            out = (_exact_product(lo_b, wp.T) + _exact_product(hi_b, wn.T),
                   _exact_product(hi_b, wp.T) + _exact_product(lo_b, wn.T))
    else:
        lo_c, hi_c = _channel_extremes(lo, hi, in_shape[0], any(op.padding))
        o, cg = m.shape[:2]
        og = o // op.groups
        # (groups, og, cg): every tap of a channel at that channel's extreme
        sp = wp.sum(axis=(2, 3), dtype=np.int64).reshape(op.groups, og, cg)
        sn = wn.sum(axis=(2, 3), dtype=np.int64).reshape(op.groups, og, cg)
        group_lo, group_hi = lo_c.reshape(op.groups, 1, cg), hi_c.reshape(op.groups, 1, cg)
        out = ((sp * group_lo + sn * group_hi).sum(axis=-1).reshape(o, 1, 1),
               (sp * group_hi + sn * group_lo).sum(axis=-1).reshape(o, 1, 1))
    return out[0] << op.exponent, out[1] << op.exponent


def current_bounds(net: Network) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-step (lo, hi) bounds of every node's output: broadcast arrays (per element in meaning)."""
    b: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, op in net.nodes():
        try:
            ins = [b[s] for s in net.inputs(name)]
            shape = net.info(name).shape
            one = (1,) * len(shape)
            if isinstance(op, Encode):
                b[name] = (np.full(one, op.lo, np.int64), np.full(one, op.hi, np.int64))
            elif isinstance(op, TernaryNeuron):
                b[name] = (-np.ones(one, np.int64), np.ones(one, np.int64))
            elif isinstance(op, (Neuron, SpikeMaxPool)):
                b[name] = (np.zeros(one, np.int64), np.ones(one, np.int64))
            elif isinstance(op, MBENeuron):
                # one output step is the sum of the weights of the bases that fire at that step
                w = op.weight
                b[name] = (np.full(one, int(np.minimum(w, 0).sum(axis=0).min()), np.int64),
                           np.full(one, int(np.maximum(w, 0).sum(axis=0).max()), np.int64))
            elif isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)):
                b[name] = _synapse_bounds(op, *ins[0], net.info(net.inputs(name)[0]).shape)
            elif isinstance(op, SpikeMatMul):
                # per step, each output gets at most K count-gated adds of each of two kinds, counts <= T
                k = net.info(net.inputs(name)[0]).shape[-1]
                reach = np.full(one, 2 * k * net.T * abs(op.weight), np.int64)
                signed = op.weight < 0 or any(net.info(s).kind == TERNARY for s in net.inputs(name))
                b[name] = (-reach, reach) if signed else (np.zeros(one, np.int64), reach)
            elif isinstance(op, Add):
                b[name] = (sum(i[0] for i in ins), sum(i[1] for i in ins))
            elif isinstance(op, SumPool):
                area = op.kernel[0] * op.kernel[1]
                lo, hi = _channel_extremes(*ins[0], shape[0], any(op.padding))
                b[name] = (area * lo.reshape(-1, 1, 1), area * hi.reshape(-1, 1, 1))
            elif isinstance(op, ReduceSum):
                in_shape = net.info(net.inputs(name)[0]).shape
                b[name] = tuple(broadcast.reduce_sum(v, in_shape, op.axes) for v in ins[0])  # type: ignore[assignment]
            elif isinstance(op, Reshape):
                in_shape = net.info(net.inputs(name)[0]).shape
                b[name] = tuple(broadcast.reshape(v, in_shape, shape) for v in ins[0])  # type: ignore[assignment]
            elif isinstance(op, Transpose):
                b[name] = tuple(np.transpose(v, op.perm) for v in ins[0])  # type: ignore[assignment]
            elif isinstance(op, Readout):
                b[name] = ins[0]
            else:
                raise BudgetError(f"bit-width analysis does not know op {type(op).__name__}")
        except OverflowError:  # a bound that no integer type holds (int64 arithmetic would wrap)
            raise BudgetError(f"node '{name}' ({type(op).__name__}): its per-step current bound exceeds 64-bit "
                              "integers; the model's scales or weights are out of range") from None
    return b


def membrane_range(op: Neuron, lo: np.ndarray, hi: np.ndarray, T: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-element (min, max) a DIF or ternary population's membrane potential can reach, given the
    per-step bounds (lo, hi) of its input current (module docstring; broadcast arrays)."""
    v0, bias = compact(op.v0), compact(op.bias)
    top = np.maximum(v0, compact(op.threshold) - 1) if isinstance(op, TernaryNeuron) else v0
    return np.minimum(v0, 0) + T * np.minimum(lo + bias, 0), top + T * np.maximum(hi + bias, 0)


@dataclass(frozen=True)
class MembraneWords:
    """A membrane potential kept in two words, ``V = hi * 2^shift + lo`` with ``0 <= lo < 2^shift``
    (docs/precision.md, ``--profile loihi2``): the summands whose values are multiples of
    ``2^shift`` feed the coarse compartment in units of ``2^shift`` (their weight exponent lowered
    by ``shift``, exact), the others the fine compartment in units of 1. Per integration step::

        lo += I_fine + b_lo;  c = lo >> shift;  lo -= c << shift;  hi += I_coarse + b_hi + c

    (threshold, v0 and bias split alike: ``X = X_hi * 2^shift + X_lo``, ``0 <= X_lo < 2^shift``).
    The widths are signed bits of ``hi`` (with the threshold's and v0's high words), of the coarse
    compartment's accumulator (every partial sum of its summands, plus ``b_hi + c``) and of the
    fine word (``lo`` plus every partial sum of its summands and ``b_lo``, and ``lo`` during a reset)."""

    shift: int
    coarse: tuple[str, ...]  # IR leaf nodes feeding the coarse compartment (values multiples of 2^shift)
    fine: tuple[str, ...]  # the other leaves
    hi_bits: int
    coarse_bits: int
    fine_bits: int

    @property
    def widest(self) -> int:
        return max(self.hi_bits, self.coarse_bits, self.fine_bits)


def current_summands(net: Network, tensor: str) -> list[str]:
    """The leaves of the tree of :class:`Add` nodes producing ``tensor``, in input order (``[tensor]``
    itself when it is not an Add)."""
    leaves: list[str] = []
    stack = [tensor]
    while stack:
        name = stack.pop()
        if isinstance(net.op(name), Add):
            stack.extend(reversed(net.inputs(name)))
        else:
            leaves.append(name)
    return leaves


def summand_exponent(op) -> int | None:  # type: ignore[no-untyped-def]
    """The largest ``e`` such that every value of a summand is a multiple of ``2^e`` by its weights: a
    synapse's weight exponent plus the power of two common to its mantissas, the power of two of a
    :class:`SpikeMatMul`'s event weight; None for any other current (it feeds the fine compartment).
    A coarse summand's weights are these divided by ``2^shift``."""
    if isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)) and np.any(compact(op.mantissa)):
        return weight_mantissa_exponent(op)[1]
    if isinstance(op, SpikeMatMul):
        return power_of_two_exponent(np.array([op.weight], np.int64))
    return None


def _partial_sums(parts: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Per-element range of every partial sum of the summands (in any order): sum of the negative
    lower bounds, sum of the positive upper bounds."""
    zero = np.zeros(1, np.int64)
    return (sum((np.minimum(lo, 0) for lo, _ in parts), zero), sum((np.maximum(hi, 0) for _, hi in parts), zero))


def _words_at(op: Neuron, shift: int, vmin: int, vtop: int, coarse: list[tuple[np.ndarray, np.ndarray]],
              fine: list[tuple[np.ndarray, np.ndarray]]) -> tuple[int, int, int]:
    """(hi, coarse accumulator, fine word) signed bits of ``op``'s membrane split at ``shift``, given the
    extremes of the single-word membrane (``vtop`` includes the threshold) and the per-step bounds of
    the coarse (in units of 2^shift) and fine summands."""
    unit = np.int64(1) << np.int64(shift)
    mask = unit - 1
    bias, th = compact(op.bias), compact(op.threshold)
    b_hi, b_lo = bias >> shift, bias & mask
    hi_bits = signed_bits(vmin >> shift, vtop >> shift)
    f_lo, f_hi = _partial_sums(fine)  # f_lo <= 0 <= f_hi
    word_hi = mask + f_hi + b_lo  # lo < 2^shift plus the fine current and the bias's low word (>= 0)
    c_lo, c_hi = (f_lo + b_lo) >> shift, word_hi >> shift  # the carry
    if isinstance(op, TernaryNeuron):  # reset by addition: lo + Th_lo < 2^(shift+1) before its carry
        reset_lo, reset_hi = 0, int(mask + (th & mask).max())
    else:  # reset by subtraction: lo - Th_lo > -2^shift before its borrow
        reset_lo, reset_hi = -int((th & mask).max()), 0
    fine_bits = signed_bits(min(int(f_lo.min()), reset_lo), max(int(word_hi.max()), reset_hi))
    g_lo, g_hi = _partial_sums(coarse)
    coarse_bits = signed_bits(int((g_lo + np.minimum(b_hi, 0) + np.minimum(c_lo, 0)).min()),
                              int((g_hi + np.maximum(b_hi, 0) + np.maximum(c_hi, 0)).max()))
    return hi_bits, coarse_bits, fine_bits


def two_word_layout(net: Network, node: str, word_bits: int, bounds: dict) -> MembraneWords | None:
    """:func:`membrane_words` without the check: the layout at the smallest shift where every word fits,
    else at the smallest shift where ``hi`` fits (then some width is above ``word_bits``)."""
    op = net.op(node)
    if not isinstance(op, Neuron):
        raise BudgetError(f"node '{node}' ({type(op).__name__}): only Neuron and TernaryNeuron populations have "
                          "two-word membranes")
    lo, hi = bounds[net.inputs(node)[0]]
    vmin, vmax = membrane_range(op, lo, hi, net.T)
    vlow, vtop = int(vmin.min()), max(int(vmax.max()), int(compact(op.threshold).max()))
    if signed_bits(vlow, vtop) <= word_bits:
        return None
    leaves = current_summands(net, net.inputs(node)[0])
    exps = {leaf: summand_exponent(net.op(leaf)) for leaf in leaves}
    first = signed_bits(vlow, vtop) - word_bits
    best = None
    for shift in range(first, max(first + 1, word_bits)):
        coarse = [leaf for leaf in leaves if exps[leaf] is not None and exps[leaf] >= shift]
        fine = [leaf for leaf in leaves if leaf not in coarse]
        if signed_bits(vlow >> shift, vtop >> shift) > word_bits:
            continue
        widths = _words_at(op, shift, vlow, vtop, [tuple(b >> shift for b in bounds[c]) for c in coarse],
                           [bounds[f] for f in fine])
        words = MembraneWords(shift, tuple(coarse), tuple(fine), *widths)
        best = best or words
        if words.widest <= word_bits:
            return words
    return best


def membrane_words(net: Network, node: str, word_bits: int, bounds: dict | None = None) -> MembraneWords | None:
    """How the DIF or ternary population ``node`` keeps its membrane in ``word_bits``-bit words: None when
    one word holds it (every reachable potential and the threshold), else the two-word layout at the
    smallest shift where every word fits (:class:`MembraneWords`). ``bounds``: :func:`current_bounds`
    of ``net``, if already computed. Raises BudgetError naming the node and the widths when two words
    do not suffice."""
    words = two_word_layout(net, node, word_bits, current_bounds(net) if bounds is None else bounds)
    if words is not None and words.widest > word_bits:
        raise BudgetError(two_words_refusal(node, net.op(node), words, word_bits))
    return words


def two_words_refusal(node: str, op: object, words: MembraneWords, word_bits: int) -> str:
    return (f"node '{node}' ({type(op).__name__}) does not fit two {word_bits}-bit membrane words: at shift "
            f"{words.shift} its high word needs {words.hi_bits} bits, its coarse accumulator {words.coarse_bits}, "
            f"its fine word {words.fine_bits}")


def bit_widths(net: Network, profile: HardwareProfile | str = "generic") -> BitReport:
    """The bit widths every node of ``net`` needs (weights, thresholds, membrane, readout accumulator)."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    bounds = current_bounds(net)
    rep = BitReport(prof.name, word_bits=prof.word_bits, membrane_words=1 if prof.word_bits else 0)
    T = net.T
    for name, op in net.nodes():
        entry: dict[str, int] = {}
        if isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)) and op.mantissa.size:
            entry["weight_bits"], entry["weight_exponent"] = weight_mantissa_exponent(op)
            rep.weight_bits = max(rep.weight_bits, entry["weight_bits"])
            rep.weight_exponent = max(rep.weight_exponent, entry["weight_exponent"])
        if isinstance(op, Neuron):
            vmin, vmax = membrane_range(op, *bounds[net.inputs(name)[0]], T)
            entry["threshold_bits"] = int(compact(op.threshold).max()).bit_length()
            entry["membrane_bits"] = signed_bits(int(vmin.min()), int(vmax.max()))
            rep.threshold_bits = max(rep.threshold_bits, entry["threshold_bits"])
            rep.membrane_bits = max(rep.membrane_bits, entry["membrane_bits"])
            if prof.word_bits:
                words = two_word_layout(net, name, prof.word_bits, bounds)
                entry["membrane_words"] = 1 if words is None else 2
                if words is not None:
                    entry.update(word_shift=words.shift, hi_bits=words.hi_bits, coarse_bits=words.coarse_bits,
                                 fine_bits=words.fine_bits)
                    rep.membrane_words = 2
                    rep.two_words.append(name)
        if isinstance(op, MBENeuron):
            # u = v0 + V + offset[n] after integration (reached while integrating, from v0 on), then lowered
            # by the resets only
            lo, hi = bounds[net.inputs(name)[0]]
            v0 = compact(op.v0)
            vmax = np.maximum(v0 + T * np.maximum(hi, 0), v0) + max(int(op.offset.max()), 0)
            vmin = np.minimum(v0 + T * np.minimum(lo, 0), v0) + min(int(op.offset.min()), 0) - int(op.reset.sum(axis=1).max())
            entry["threshold_bits"] = int(op.threshold.max()).bit_length()
            entry["membrane_bits"] = signed_bits(int(vmin.min()), int(vmax.max()))
            rep.threshold_bits = max(rep.threshold_bits, entry["threshold_bits"])
            rep.membrane_bits = max(rep.membrane_bits, entry["membrane_bits"])
        if isinstance(op, Readout):
            lo, hi = bounds[net.inputs(name)[0]]
            entry["accumulator_bits"] = signed_bits(int(T * lo.min()), int(T * hi.max()))
            rep.accumulator_bits = entry["accumulator_bits"]
        if entry:
            rep.per_node[name] = entry
    return rep


def budget_limits(entry: dict[str, int], prof: HardwareProfile) -> dict[str, int]:
    """The profile's limit on each quantity of one node's widths. On a profile with words, a membrane of
    one word (an MBE neuron's always) holds its potential and threshold in ``word_bits``; a DIF / ternary
    membrane of two words may reach ``membrane_bits`` with every word (``hi``, the coarse accumulator,
    the fine word: ``words_bits``) within ``word_bits``. The readout runs on the host / embedded CPU
    (Lava's hardware report): its window accumulator is held in ``membrane_bits``."""
    one_word = bool(prof.word_bits) and entry.get("membrane_words", 1) == 1
    cell = prof.word_bits if one_word else None
    return {"weight_bits": prof.weight_bits, "threshold_bits": cell or prof.threshold_bits,
            "membrane_bits": cell or prof.membrane_bits, "words_bits": prof.word_bits,
            "accumulator_bits": prof.membrane_bits}


def words_bits(entry: dict[str, int]) -> int | None:
    """The widest word of a two-word membrane entry (None for one word)."""
    if entry.get("membrane_words") != 2:
        return None
    return max(entry["hi_bits"], entry["coarse_bits"], entry["fine_bits"])


def budget_excess(entry: dict[str, int], prof: HardwareProfile) -> dict[str, int]:
    """Bits by which one node's widths exceed the profile: {quantity: excess} (empty if it fits)."""
    widths = dict(entry)
    if words_bits(entry) is not None:
        widths["words_bits"] = words_bits(entry)
    return {q: widths[q] - lim for q, lim in budget_limits(entry, prof).items() if q in widths and widths[q] > lim}


def analyze_bitwidth(net: Network, profile: HardwareProfile | str = "generic") -> BitReport:
    """Compute the bit widths the network needs; raise BudgetError naming the node that exceeds ``profile``."""
    prof = PROFILES[profile] if isinstance(profile, str) else profile
    rep = bit_widths(net, prof)
    for name, entry in rep.per_node.items():
        over = budget_excess(entry, prof)
        limit = budget_limits(entry, prof)
        op = type(net.op(name)).__name__
        if "weight_bits" in over:
            raise BudgetError(f"node '{name}' ({op}) needs {entry['weight_bits']}-bit weights, profile "
                              f"'{prof.name}' allows {prof.weight_bits}")
        if "words_bits" in over:
            words = MembraneWords(entry["word_shift"], (), (), entry["hi_bits"], entry["coarse_bits"], entry["fine_bits"])
            raise BudgetError(f"{two_words_refusal(name, net.op(name), words, prof.word_bits)}; profile '{prof.name}'")
        word = " in one word" if prof.word_bits and limit["membrane_bits"] == prof.word_bits else ""
        if "threshold_bits" in over:
            raise BudgetError(f"node '{name}' ({op}) needs {entry['threshold_bits']}-bit thresholds, profile "
                              f"'{prof.name}' allows {limit['threshold_bits']}{word}")
        if "membrane_bits" in over:
            raise BudgetError(f"node '{name}' ({op}) can reach a {entry['membrane_bits']}-bit membrane potential, "
                              f"profile '{prof.name}' allows {limit['membrane_bits']}{word}")
        if "accumulator_bits" in over:
            raise BudgetError(f"node '{name}' (Readout) accumulates up to {entry['accumulator_bits']} bits, profile "
                              f"'{prof.name}' allows {prof.membrane_bits}")
    return rep
