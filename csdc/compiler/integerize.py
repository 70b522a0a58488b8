"""Integerization: the precision policy, the error bound of every population, weight splitting.

Structural lowering (:mod:`csdc.compiler.lower`) describes every pre-activation as a sum of
synapse groups with real units; this module decides the integer unit of each sum and
accounts for what rounding costs (docs/precision.md has the derivation).

*Precision.* A sum of groups gets the unit ``U = |u_anchor| / 2^k`` (per element): the anchor
group (the one with the most weights) keeps its integer weights exactly (the ``2^k`` is a weight
exponent), every other group gets ``round(w_int * u_g / U)``, the reading quantizer (step ``s``)
becomes a threshold ``Theta = round(s / U)`` and its bias ``B = round(b / U)``. Per population,
in units of one quantization level (one spike), the firing count ``floor((V + B + Theta//2) / Theta)``
differs from the exact ``floor(x / s + 1/2)`` by at most::

    bound = (E_w + |B - b/U| + [Theta odd] / 2) / Theta + T |Theta - s/U| / Theta

with ``E_w = sum_j |w_j - w_j_exact| * c_j`` over the rounded weights of each neuron (``c_j`` the
largest count input ``j`` can deliver in a window, ``K T^2`` for an activation product) plus the
error carried by an already materialized current (a residual stream). ``k`` is the smallest
exponent that brings ``bound`` below :data:`AIM_LEVELS`, raised further when a later residual branch
adds error to the same stream, lowered when the profile's threshold or membrane budget does not allow
it, and lowered into the profile's fast lanes (int32 membranes and weights) where the bound there stays
below :data:`LANE_LEVELS`; :data:`TARGET_LEVELS` is the guarantee, a warning above it, and a model is
refused only when even a bound of :data:`REFUSE_LEVELS` needs more bits than the profile has.

*Weight splitting.* A synapse whose mantissa is wider than the profile's weight budget becomes
several synapse nodes with the same connectivity, ``w = sum_i m_i 2^(e + i b)`` with
``|m_i| < 2^b`` and the sign of ``w``, summed by an :class:`Add`: the same integer current
(exact), more synapses.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Callable

import numpy as np

from csdc.compiler.bitwidth import (HardwareProfile, bit_widths, budget_excess, current_bounds, current_summands, signed_bits,
                                   two_word_layout, weight_mantissa_exponent)
from csdc.errors import BudgetError
from csdc.ir.graph import Network
from csdc.ir.ops import (Add, ConvSynapse, DenseSynapse, DiagonalSynapse, compact, narrowest,
                         power_of_two_exponent)

TARGET_LEVELS = 2.0 ** -8  # worst-case integerization error guaranteed where the budget allows, in quantization levels
LANE_LEVELS = 2.0 ** -16  # a profile's fast lanes are kept where the bound stays below this (docs/precision.md)
AIM_LEVELS = 2.0 ** -24  # aimed at where the budget allows it: below onnxruntime's own float32 noise (~1e-7 of a level)
REFUSE_LEVELS = 0.5  # beyond this the rounding can change a count: the model is refused
MAX_K = 62  # weight exponents of the IR


@dataclass
class PopulationError:
    """The achieved worst-case integerization error of one population (or the readout)."""

    bound: float  # in quantization levels of the population (the readout: absolute error of a logit)
    site: str  # the materialization whose exponent k set this population's integer unit
    k: int
    threshold_bits: int = 0
    weights: float = 0.0  # the parts of ``bound``
    bias: float = 0.0
    threshold: float = 0.0
    readout: bool = False  # the readout has no quantization level: ``bound`` is in logits


@dataclass
class PrecisionReport:
    target: float = TARGET_LEVELS
    populations: dict[str, PopulationError] = field(default_factory=dict)
    sites: dict[str, int] = field(default_factory=dict)  # site -> chosen k
    synapse_sites: dict[str, str] = field(default_factory=dict)  # synapse node -> the site whose unit scaled its weights
    split_synapses: dict[str, int] = field(default_factory=dict)  # split node -> groups
    synapses_before_split: int = 0
    warnings: list[str] = field(default_factory=list)
    units: str = ""  # the profile whose policy chose the units ("": not recorded)

    @property
    def worst(self) -> tuple[str, float]:
        levels = {n: p for n, p in self.populations.items() if not p.readout}
        if not levels:
            return "", 0.0
        name = max(levels, key=lambda n: levels[n].bound)
        return name, levels[name].bound

    def to_dict(self) -> dict:
        return {"target": self.target, "worst": dict(zip(("population", "bound"), self.worst)),
                "populations": {n: asdict(p) for n, p in self.populations.items()},
                "split_synapses": dict(self.split_synapses), "synapses_before_split": self.synapses_before_split,
                **({"units": self.units} if self.units else {})}


@dataclass
class Precision:
    """The precision policy of one compile: the profile's budget, the error target, an optional
    ``--frac-bits`` override (thresholds with exactly that many significant bits, as a fixed rule)
    and per-site corrections learned from the previous lowering round."""

    profile: HardwareProfile
    frac_bits: int | None = None
    target: float = TARGET_LEVELS
    aim: float = AIM_LEVELS
    extra: dict[str, int] = field(default_factory=dict)  # site -> bits added to its own choice
    cap: dict[str, int] = field(default_factory=dict)  # site -> largest k the budget allows

    def choose_k(self, site: str, theta: tuple[float, float] | None, bound_at: Callable[[int], float]) -> int:
        """The exponent of a site: the smallest ``k >= 0`` whose ``bound_at(k)`` (in levels) meets the
        aim, within the threshold budget and the cap learned from the membrane budget; ``theta``:
        (min, max) of ``step / |u_anchor|`` over the readers' elements (None: no quantizer reads the
        sum). When even ``k = 0`` exceeds the budget, ``k < 0``: a unit coarser than the anchor's own,
        whose weights are then rounded too (counted in the bound)."""
        if self.frac_bits is not None:
            if theta is None:
                return self.frac_bits
            return max(0, math.ceil(self.frac_bits - math.log2(theta[0])))
        k_max = min(MAX_K, self.cap.get(site, MAX_K))
        k = k_min = min(0, k_max)
        if theta is not None:  # the largest threshold keeps within the profile's threshold bits
            lo, hi = (math.log2(max(t, 2.0 ** -60)) for t in theta)
            k_max = max(-MAX_K, min(k_max, self.profile.threshold_bits - 1 - math.ceil(hi)))
            k_min = min(0, k_max)
            k = max(k_min, min(k_max, math.floor(-lo)))  # thresholds of at least 1
        for _ in range(8):  # each step adds the bits the bound lacks: error ~ 2^-k, 1-2 steps suffice
            b = bound_at(k)
            if b <= self.aim or k >= k_max:
                break
            k = min(k_max, k + max(1, math.ceil(math.log2(b / self.aim))))
        return min(k_max, max(k_min, k + self.extra.get(site, 0)))


def rounded_with_residual(exact: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest integers (int64) and the absolute rounding residuals (float64)."""
    w = np.rint(exact)
    return w.astype(np.int64), np.abs(w - exact)


ROUNDING_CHUNK = 1 << 16  # weights rounded at a time: float temporaries stay small for any layer size


@dataclass(frozen=True)
class ScaledWeights:
    """Integer weights ``mantissa * 2^exponent`` of a synapse group rescaled to a common unit, with the
    worst-case error they add per output channel (``sum |rounding| * count``) and the worst relative
    rounding of a single weight."""

    mantissa: np.ndarray
    exponent: int
    error: np.ndarray  # (out channels,) float64
    relative: float


def scaled_weights(w_int: np.ndarray, mult: np.ndarray, count_max: np.ndarray | float,
                   in_axes: tuple[int, ...]) -> ScaledWeights:
    """``w_int`` times a per-output-channel multiplier ``mult`` (1-D or scalar), rounded; the error
    sums ``|rounding| * count_max`` over ``in_axes`` (``count_max`` broadcasts against one channel).

    A multiplier of ``+-2^k`` on every channel (the anchor group) keeps ``w_int`` itself (times the
    channel signs, no copy when all are positive) with exponent ``k``: exact."""
    shape = (-1,) + (1,) * (w_int.ndim - 1)
    a = np.abs(mult)
    k = math.log2(a.flat[0]) if a.size and a.flat[0] > 0 else -1.0
    channels = w_int.shape[0]
    if a.size and np.all(a == a.flat[0]) and k >= 0 and k == int(k):
        zero = np.zeros(channels)
        if np.all(mult > 0):
            return ScaledWeights(w_int, int(k), zero, 0.0)
        signed = w_int.astype(np.int64) * np.sign(mult).astype(np.int64).reshape(shape)
        return ScaledWeights(narrowest(signed), int(k), zero, 0.0)
    mult = np.broadcast_to(mult, (channels,)).reshape(shape)
    rows = max(1, ROUNDING_CHUNK // max(1, int(np.prod(w_int.shape[1:]))))
    w = np.empty(w_int.shape, dtype=np.int64)
    err = np.empty(channels)
    rel = 0.0
    for r in range(0, channels, rows):
        exact = w_int[r:r + rows] * mult[r:r + rows]
        w[r:r + rows], res = rounded_with_residual(exact)
        err[r:r + rows] = (res * count_max).sum(axis=in_axes)
        nz = exact != 0
        if np.any(nz):
            rel = max(rel, float(np.max(res[nz] / np.abs(exact[nz]))))
    mant, e = split_power_of_two(w)
    return ScaledWeights(mant, e, err, rel)


def split_power_of_two(w: np.ndarray) -> tuple[np.ndarray, int]:
    """(mantissa in the narrowest integer dtype, exponent) with ``w == mantissa * 2**exponent`` and the
    exponent as large as possible (the weights' common power of two)."""
    e = power_of_two_exponent(w)
    return narrowest(w >> e if e else w), e


@dataclass(frozen=True)
class NeuronParameters:
    threshold: np.ndarray  # broadcast arrays over the population (int64)
    v0: np.ndarray
    bias: np.ndarray
    bound: float  # worst-case error in levels, and its parts
    weights: float
    bias_part: float
    threshold_part: float


def neuron_parameters(step: float, U: np.ndarray, bias_real: np.ndarray, weight_err: np.ndarray, T: int) -> NeuronParameters:
    """Threshold, initial potential and per-step bias of a quantizer with step ``step`` reading a current
    in units ``U`` with real bias ``bias_real`` and accumulated weight error ``weight_err`` (integer units),
    and the worst-case error bound of its firing count in levels (module docstring)."""
    theta_real = step / U
    theta = np.maximum(np.rint(theta_real), 1).astype(np.int64)
    b_real = bias_real / U
    B = np.rint(b_real).astype(np.int64)
    b = np.floor_divide(B, T)
    v0 = theta // 2 + (B - T * b)
    w_part = np.asarray(weight_err, dtype=np.float64) / theta
    b_part = (np.abs(B - b_real) + 0.5 * (theta % 2)) / theta
    t_part = T * np.abs(theta - theta_real) / theta
    total = w_part + b_part + t_part
    return NeuronParameters(theta, v0, b, float(np.max(total)), float(np.max(w_part)), float(np.max(b_part)), float(np.max(t_part)))


def neuron_bound_at(step: float, ubase: np.ndarray, bias_real: np.ndarray, weight_err_at: Callable[[np.ndarray], np.ndarray],
                    T: int) -> Callable[[int], float]:
    """``k -> bound`` of a neuron whose unit is ``ubase / 2^k`` (for :meth:`Precision.choose_k`)."""
    def bound(k: int) -> float:
        U = ubase / float(2 ** k)
        return neuron_parameters(step, U, bias_real, weight_err_at(U), T).bound
    return bound


# -- weight splitting ---------------------------------------------------------------------------
def split_mantissa(w: np.ndarray, exponent: int, bits: int, cuts: tuple[int, ...] = ()) -> list[tuple[np.ndarray, int]]:
    """``w * 2^exponent`` as ``sum_i m_i * 2^e_i`` with every ``m_i`` a signed ``bits``-bit integer of
    the sign of ``w`` (digits of ``|w|`` in base ``2^(bits-1)``, a digit also ending at every exponent
    in ``cuts``): every part's positive and negative weights are parts of the original's, so bounds
    computed per part add up to the original's."""
    w = np.asarray(w, dtype=np.int64)
    sign = np.sign(w)
    mag = np.abs(w)
    step = bits - 1
    ends = sorted(c - exponent for c in cuts if c > exponent)
    parts = []
    shift = 0
    while shift < 63 and np.any(mag >> shift):
        end = min([shift + step] + [c for c in ends if c > shift])
        digit = (mag >> shift) & ((1 << (end - shift)) - 1)
        if np.any(digit):
            m, e = split_power_of_two(sign * digit)
            parts.append((m, exponent + shift + e))
        shift = end
    return parts


def split_wide_synapses(net: Network, weight_bits: int,
                        cuts: dict[str, tuple[int, ...]] | None = None) -> tuple[Network, dict[str, int]]:
    """A copy of ``net`` in which every synapse wider than ``weight_bits`` mantissa bits is several
    synapse nodes summed by an Add under the original name (module docstring); with ``cuts`` (synapse ->
    exponents), a synapse's parts also end at those exponents (a part either side of a two-word
    membrane's shift: see :func:`split_for_profile`). Returns the split nodes with their number of groups."""
    cuts = cuts or {}
    parted = {}
    for name, op in net.nodes():
        if isinstance(op, (DenseSynapse, ConvSynapse, DiagonalSynapse)) and op.mantissa.size:
            wide = weight_mantissa_exponent(op)[0] > weight_bits
            if wide or cuts.get(name):
                parts = split_mantissa(compact(op.mantissa), op.exponent, weight_bits if wide else 64, cuts.get(name, ()))
                if wide or len(parts) > 1:
                    parted[name] = parts
    if not parted:
        return net, {}
    out = Network(net.T, net.metadata)
    groups: dict[str, int] = {}
    for name, op in net.nodes():
        ins = net.inputs(name)
        if name not in parted:
            out.add(name, op, ins)
            continue
        parts = parted[name]
        names = []
        for i, (m, e) in enumerate(parts):
            m = np.broadcast_to(m, op.mantissa.shape) if m.shape != op.mantissa.shape else m
            part = _with_weights(op, m, e)
            names.append(out.add(out.free_name(f"{name}_part{i}", net), part, ins))
        groups[name] = len(names)
        out.add(name, Add(), names) if len(names) > 1 else out.add(name, _with_weights(op, *parts[0]), ins)
    return out, groups


def split_for_profile(net: Network, profile: HardwareProfile) -> tuple[Network, dict[str, int]]:
    """``net`` with its synapses split for ``profile``: wider than its weights (:func:`split_wide_synapses`);
    on a profile with words, also at the shift ``s`` of every two-word membrane that does not fit its
    words otherwise, so that a synapse reading into it feeds its fine compartment only its bits below
    ``2^s`` (a smaller fine word) and its coarse compartment the rest."""
    split, groups = split_wide_synapses(net, profile.weight_bits)
    if not profile.word_bits:
        return split, groups
    bounds = current_bounds(split)
    cuts: dict[str, set[int]] = {}
    for node in split.neurons():
        words = two_word_layout(split, node, profile.word_bits, bounds)
        if words is None or words.widest <= profile.word_bits:
            continue
        for leaf in current_summands(net, net.inputs(node)[0]):
            if isinstance(net.op(leaf), (DenseSynapse, ConvSynapse, DiagonalSynapse)):
                cuts.setdefault(leaf, set()).add(words.shift)
    if not cuts:
        return split, groups
    return split_wide_synapses(net, profile.weight_bits, {k: tuple(sorted(v)) for k, v in cuts.items()})


def _with_weights(op: DenseSynapse | ConvSynapse | DiagonalSynapse, mantissa: np.ndarray, exponent: int):
    if isinstance(op, ConvSynapse):
        return ConvSynapse(mantissa, op.stride, op.padding, op.dilation, op.groups, exponent)
    return type(op)(mantissa, exponent)


def mantissa_bits(w: np.ndarray) -> int:
    """Signed bits of the widest entry of an integer array once its common power of two is removed."""
    if not np.any(w):
        return 1
    e = power_of_two_exponent(w)
    return signed_bits(int(w.min()) >> e, int(w.max()) >> e)


# -- the policy over a whole model ----------------------------------------------------------
ROUNDS = 4  # lowerings at most: the first, then one per correction of the sites' exponents


def integerize(lower_round: Callable[[Precision], tuple[Network, object]], profile: HardwareProfile,
               frac_bits: int | None = None) -> tuple[Network, object]:
    """Lower with ``lower_round`` (which returns the network and a report with a ``precision``
    :class:`PrecisionReport`) until every population meets the error target within the budget.

    A site's exponent serves every population reading its unit (a residual stream is read by
    every later block), so a population above the target raises the exponent of its site by the
    bits it lacks, and a population whose threshold or membrane exceeds the profile caps it. With
    ``frac_bits`` the fixed rule applies and one lowering is made. Raises BudgetError when a
    population cannot get below :data:`REFUSE_LEVELS` within the budget."""
    precision = Precision(profile, frac_bits)
    net, report = lower_round(precision)
    seen = [dict(report.precision.sites)]  # type: ignore[attr-defined]
    while frac_bits is None and len(seen) < ROUNDS and _adjust(precision, net, report.precision):  # type: ignore[attr-defined]
        del net  # the next lowering replaces it: never two networks at the peak
        net, report = lower_round(precision)
        sites = dict(report.precision.sites)  # type: ignore[attr-defined]
        if sites in seen:
            break
        seen.append(sites)
    _refuse_or_warn(net, report.precision, profile, frac_bits)  # type: ignore[attr-defined]
    return net, report


def _adjust(precision: Precision, net: Network, rep: PrecisionReport) -> bool:
    """Correct the sites' exponents from one lowering's errors and bit widths; True if any changed.

    On a profile with fast lanes (``lane_bits``: int32 in the simulators) the policy keeps ``v`` and
    ``v - Theta`` inside them where the bound at the lower exponent stays below :data:`LANE_LEVELS`:
    speed where it costs no exactness, wide membranes only for the sums that need them."""
    widths = profile_widths(net, precision.profile)
    lane = replace(precision.profile, membrane_bits=precision.profile.lane_bits) if precision.profile.lane_bits else None
    worst: dict[str, float] = {}
    for pe in rep.populations.values():
        worst[pe.site] = max(worst.get(pe.site, 0.0), pe.bound)
    changed = False
    want: dict[str, int] = {}
    for pop, pe in rep.populations.items():
        over = budget_excess(widths.get(pop, {}), precision.profile)
        excess = max((v for q, v in over.items() if q != "weight_bits"), default=0)
        if excess <= 0 and lane is not None:
            spare = budget_excess(widths.get(pop, {}), lane).get("membrane_bits", 0)
            if spare > 0 and worst[pe.site] * 2.0 ** spare <= LANE_LEVELS:
                excess = spare
        if excess > 0 and pe.k > -MAX_K:
            cap = max(-MAX_K, pe.k - excess)
            if cap < precision.cap.get(pe.site, MAX_K):
                precision.cap[pe.site] = cap
                changed = True
        elif pe.bound > precision.aim and not pe.readout:
            want[pe.site] = max(want.get(pe.site, 0), math.ceil(math.log2(pe.bound / precision.aim)))
    for syn, site in rep.synapse_sites.items():  # rescaled weights wider than the profile would be split: fewer bits if exact enough
        excess = budget_excess(widths.get(syn, {}), precision.profile).get("weight_bits", 0)
        if lane is not None and excess > 0 and worst.get(site, 0.0) * 2.0 ** excess <= LANE_LEVELS:
            cap = rep.sites.get(site, MAX_K) - excess
            if cap < precision.cap.get(site, MAX_K):
                precision.cap[site] = cap
                changed = True
    for site, bits in want.items():
        if rep.sites.get(site, 0) < precision.cap.get(site, MAX_K):
            precision.extra[site] = precision.extra.get(site, 0) + bits
            changed = True
    return changed


def profile_widths(net: Network, profile: HardwareProfile) -> dict[str, dict[str, int]]:
    """Per-node bit widths of ``net`` as ``profile`` will hold it: on a profile with words, once its wide
    synapses are split (the split parts' exponents decide which compartment of a two-word membrane
    each feeds)."""
    if profile.word_bits:
        net = split_for_profile(net, profile)[0]
    return bit_widths(net, profile).per_node


def _refuse_or_warn(net: Network, rep: PrecisionReport, profile: HardwareProfile, frac_bits: int | None) -> None:
    widths = profile_widths(net, profile)
    for pop, pe in rep.populations.items():
        if pe.bound <= rep.target or pe.readout:
            continue
        lack = math.ceil(math.log2(pe.bound / REFUSE_LEVELS)) if pe.bound >= REFUSE_LEVELS else 0
        entry = widths.get(pop, {})
        membrane = (f"a membrane of two {profile.word_bits}-bit words" if profile.word_bits
                    else f"a {profile.membrane_bits}-bit membrane")
        if lack and frac_bits is None and "threshold_bits" in entry:
            need_t, need_m = entry["threshold_bits"] + lack, entry["membrane_bits"] + lack
            raise BudgetError(
                f"population '{pop}' needs {need_t}-bit thresholds and a {need_m}-bit membrane to keep its worst-case "
                f"integerization error below half a quantization level (it is {pe.bound:.3g} levels at "
                f"{entry['threshold_bits']}-bit thresholds); profile '{profile.name}' allows {profile.threshold_bits}-bit "
                f"thresholds and {membrane}: choose a wider --profile")
        why = (f"--frac-bits {frac_bits}" if frac_bits is not None
               else f"profile '{profile.name}' ({profile.threshold_bits}-bit thresholds, {membrane.removeprefix('a ')})")
        rep.warnings.append(f"population '{pop}': worst-case integerization error {pe.bound:.3g} of a level "
                            f"(target {rep.target:.3g}) under {why}")
