"""Wide-range functions of an integer current read out as spikes, and the fits behind them (docs/mbe.md).

An MBE population's decoded current can span far more than the T levels one spike population counts, so
:func:`mbe_digits` reads it out with digit populations (radix ``2^b``, most significant first): the building
block of the softmax (its exponential and the reciprocal of the row sum) and LayerNorm (``1/sqrt`` of the
variance) lowerings in :mod:`csdc.compiler.lower`. Also here: the LayerNorm ``1/sqrt`` fit over every sum of
squares (:func:`rsqrt_fit`) and the softmax's exact worst-case error over every row (:func:`softmax_error`).
Integer operations that are not spike accumulations: none."""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from csdc.compiler.mbe import FIT_SAMPLE_LEVELS, MBEFit, MBESum, fit_geometric, fit_table, numba_totals, sum_ranges
from csdc.errors import CsdcError
from csdc.ir.graph import Network
from csdc.ir.ops import Add, DiagonalSynapse, Neuron
from csdc.ir.semantics import mbe_total


@dataclass(frozen=True)
class Digits:
    """A non-negative function of an integer current read out as spike populations, one per digit (most
    significant first; :meth:`Lowering.mbe_digits`): ``f(q) ~ unit * sum_k places[k] * count_k``.

    ``readout[i]``: the integer ``sum_k places[k] * count_k`` the populations count at level ``q = lo + i``
    (delay >= T), so compositions can measure their own errors exactly; ``max_abs_error`` / ``mean_abs_error``:
    ``|unit * readout - f(q)|`` over every level, in f's (real) units (fit error plus the last digit's rounding)."""

    nodes: tuple[str, ...]
    places: tuple[int, ...]
    unit: float
    lo: int
    readout: np.ndarray
    max_abs_error: float
    mean_abs_error: float
    mbe_node: str  # the MBE population, or the Add of several (a fitter's MBESum, a refinement)
    fit: MBEFit | MBESum
    refinement: MBEFit | None = None  # a second population fitted to the first one's residual (same unit)
    counts: np.ndarray | None = None  # (levels, digits): each digit population's count at every level
    populations: tuple[str, ...] = ()  # the MBE populations whose currents make the readout's input

    @property
    def hi(self) -> int:
        return self.lo + len(self.readout) - 1

    @property
    def bases(self) -> int:
        return self.fit.bases + (self.refinement.bases if self.refinement else 0)

    def report(self) -> dict:
        """The fields of a ``CompileReport.approximations`` entry this readout fills (errors in f's units)."""
        return {"mbe_node": self.mbe_node, "mbe_nodes": list(self.populations), "bases": self.bases,
                "steps": self.fit.steps, "levels": [self.lo, self.hi],
                "digits": list(self.nodes), "places": list(self.places), "unit": self.unit,
                "max_abs_error": self.max_abs_error, "mean_abs_error": self.mean_abs_error}



#: LayerNorm's 1/sqrt in units of 2^-F with r(1) 2^F about 2^28: the knots' rounding stays far below the fit's error
RSQRT_BITS = 28


@functools.lru_cache(maxsize=64)
def rsqrt_fit(channels: int, s_max: int, eps_levels: float, max_error: float, steps: int, scale: float = 1.0,
              frac: int = 0) -> MBESum:
    """MBE populations for LayerNorm's ``r(S) = 1/sqrt(S / C + eps)`` on every sum of squares ``S = 0..s_max``, the
    error weighted by ``sqrt(S) 2^-frac`` (the largest |centred level| a token with that S can have) within
    ``max_error``, in units of ``1 / scale``; S in units of ``4^-frac`` squared levels (cached: the precision policy
    lowers a model several times)."""
    top = scale * float(layernorm_rsqrt(np.ones(1), channels, eps_levels, frac)[0])
    frac_bits = max(RSQRT_BITS - math.ceil(math.log2(top)), 0)
    return fit_geometric("rsqrt", lambda S: scale * layernorm_rsqrt(S, channels, eps_levels, frac), 0, s_max,
                         weight=lambda S: np.sqrt(S) / 2**frac, max_error=max_error * scale, steps=steps,
                         frac_bits=frac_bits)


def layernorm_rsqrt(S: np.ndarray, channels: int, eps_levels: float, frac: int = 0) -> np.ndarray:
    """LayerNorm's ``1/sqrt(variance + eps)`` (in level units) from the sum ``S`` of the squares of C centred levels
    rounded to ``2^-frac`` of a level (``S`` in units of ``4^-frac``): Sheppard's correction removes the rounding's
    mean contribution (``4^-frac / 12`` per channel) where it is small against the variance (at most half of the
    mean square). ``S = 0`` means every centred level is 0, so any value serves there: ``S = 1``'s keeps the range,
    and so the digits' precision, small."""
    mean_square = np.maximum(np.asarray(S, dtype=np.float64), 1.0) / (channels * 4.0**frac)
    return 1.0 / np.sqrt(np.maximum(mean_square - 1.0 / (12.0 * 4.0**frac), mean_square / 2.0) + eps_levels)



def mbe_digits(net: Network, base: str, current: str, lo: int, values: np.ndarray, *, delay: int, digits: int = 2,
               radix_bits: int | None = None, bases: int | None = None, max_bases: int = 64, steps: int = 16,
               refine: bool = False, add: Callable[[str, object, list[str]], str] | None = None,
               fitter: Callable[[np.ndarray], MBEFit | MBESum] | None = None) -> Digits:
    """An MBE function of a non-negative integer current, read out as spikes with a stated precision.

    ``current``: an IR current whose window total ``q`` lies in ``lo .. lo + len(values) - 1``;
    ``values[i] >= 0``: the function at ``q = lo + i`` (real units). One MBE population (fitted by
    :func:`fit_table` to ``values / unit`` within a quarter of ``unit``, ``bases`` or the fewest up to
    ``max_bases``) makes the current ``E ~ f(q) 2^F / unit``; ``digits`` DIF populations of radix
    ``B = 2^radix_bits <= T + 1`` (default ``min(16, 2^floor(log2 T))``) read it: digit k has threshold
    ``theta_k = B^(D-1-k) 2^F`` and integrates ``E + theta_(D-1) / 2`` minus ``theta_i`` per spike of every higher
    digit i (one-to-one synapses fed by spikes: ACs), each flooring: together they count ``E`` rounded to the last
    digit. So ``f(q) ~ unit * sum_k B^(D-1-k) count_k`` with ``unit = max f / (T B^(D-1))``: the top digit counts up
    to T, the others up to B - 1; the precision is ``max f / (2 T B^(D-1))`` plus the fit's error, measured on
    every level (the readout is computed in integers as the populations count it, delay >= T).
    ``refine``: a second MBE population on the same current, fitted to the first one's residual in the same
    unit, adds its current (smaller errors for twice the bases and spikes).
    Integer ops that are not spike accumulations: none. ``add(name, op, inputs) -> node`` adds an IR node
    (default ``net.add`` with ``_2``, ``_3``, ... for a name taken; the lowering's records them for --explain).
    ``fitter``: makes the MBE population(s) from ``values / unit`` instead of :func:`fit_table` (e.g.
    :func:`fit_geometric`'s populations for a domain too large for least squares; their currents are added)."""
    values = np.asarray(values, dtype=np.float64)
    add = add or (lambda name, op, inputs: net.add(net.free_name(name), op, inputs))
    T = net.T
    if values.ndim != 1 or not len(values) or not np.all(np.isfinite(values)) or values.min() < 0:
        raise CsdcError(f"{base}: an MBE digit readout needs finite non-negative values, one per level")
    b = min(4, T.bit_length() - 1) if radix_bits is None else int(radix_bits)
    if not 1 <= b or (1 << b) > T + 1 or digits < 1:
        raise CsdcError(f"{base}: digits of radix 2^{b} need at most T + 1 = {T + 1} (a lower digit counts up to "
                        "radix - 1) and at least one digit")
    B = 1 << b
    places = tuple(B ** (digits - 1 - k) for k in range(digits))
    unit = float(values.max()) / (T * places[0]) or 1.0
    f = fitter(values / unit) if fitter is not None else fit_table(base, values / unit, bases=bases, steps=steps,
                                                                   max_bases=max_bases)
    shape = net.info(current).shape
    q = np.arange(len(values), dtype=np.int64)
    totals = lambda g: (numba_totals if len(q) > FIT_SAMPLE_LEVELS else mbe_total)(g.op(np.zeros((), np.int64)), q)  # noqa: E731
    if isinstance(f, MBESum):
        pops = [add(f"{base}_mbe", p.op(np.full(shape, -int(lo), dtype=np.int64)), [current]) for p in f.parts]
        mbe = pops[0] if len(pops) == 1 else add(f"{base}_mbe_sum", Add(), pops)
        E = f.totals(q)
    else:
        mbe = add(f"{base}_mbe", f.op(np.full(shape, -int(lo), dtype=np.int64)), [current])
        pops = [mbe]
        E = totals(f)
    g, constant, cur, second = None, f.constant, mbe, ""
    if refine:
        g = fit_table(f"{base}_residual", values / unit - (E + f.constant) / float(2**f.frac_bits), bases=bases, steps=steps,
                      frac_bits=f.frac_bits, max_bases=max_bases)
        E, constant = E + totals(g), constant + g.constant
        second = add(f"{base}_mbe_residual", g.op(np.full(shape, -int(lo), dtype=np.int64)), [current])
        cur = add(f"{base}_mbe_sum", Add(), [mbe, second])
        pops.append(second)
    full = lambda v: np.broadcast_to(np.int64(v), shape)  # noqa: E731
    # every digit floors the current plus half the last digit's threshold: the readout is the current rounded to the
    # last digit, and a lower digit counts at most radix - 1 (so radix T + 1 fits in T steps)
    total = constant + ((places[-1] << f.frac_bits) // 2)  # T * bias + v0: the fits' constants and the rounding
    rest, readout, nodes, per_digit = E + total, np.zeros(len(q), dtype=np.int64), [], []
    for k, place in enumerate(places):
        theta = place << f.frac_bits
        bias = total // T
        if k:  # what the higher digits left: the previous rest minus theta_(k-1) per spike of digit k-1
            minus = add(f"{base}_minus_digit{k - 1}", DiagonalSynapse(np.broadcast_to(np.int8(-1), shape),
                                                                      exponent=(theta * B).bit_length() - 1), [nodes[-1]])
            cur = add(f"{base}_rest{k}", Add(), [cur, minus])
        nodes.append(add(f"{base}_digit{k}", Neuron(full(theta), full(total - T * bias), full(bias), delay), [cur]))
        count = np.clip(np.floor_divide(rest, theta), 0, T)
        rest = rest - count * theta
        readout += place * count
        per_digit.append(count)
    err = np.abs(unit * readout - values)
    return Digits(tuple(nodes), places, unit, int(lo), readout, float(err.max()), float(err.mean()),
                  mbe if g is None else f"{mbe} + {second}", f, g, np.stack(per_digit, axis=1), tuple(pops))


#: most levels of a softmax's row sum (the reciprocal's domain, fitted and verified on every level, and the exact
#: worst case's dynamic program): rows of 64 at T = 255 with the exponential in units of 1 / (T 2^8)
SOFTMAX_ROW_SUM_LEVELS = 2**22
#: the exponential's fit error at most this many units of its last digit (its rounding adds half a unit): each
#: element's error enters the row sum, N - 1 of them in the worst case
SOFTMAX_EXP_TARGET = 0.1
#: the reciprocal's fit error at most this share of an output step (times e <= 1 in each output)
SOFTMAX_RECIPROCAL_TARGET = 0.02
#: a softmax fit's output unit 2^-F with its largest value times 2^F about 2^28: rounding the digits' weights costs far
#: less than the targets above
SOFTMAX_FIT_BITS = 28
SOFTMAX_SAMPLE_ROWS = 4096  # random rows on which the mean error of a softmax is measured
#: the exact worst case's dynamic program first runs up to this many times the row max's readout (the others' exact
#: total up to about 1: the worst rows have a small sum), doubling while the bound above it may exceed what it found
SOFTMAX_DP_START = 1.0


def softmax_radix_bits(T: int, N: int) -> int | None:
    """The radix 2^b of a softmax's digits (exponential and reciprocal): the finest a digit population can count (2^b
    <= T + 1) whose row sums (N T 2^b levels) stay within :data:`SOFTMAX_ROW_SUM_LEVELS`; None if none does."""
    return next((b for b in range((T + 1).bit_length() - 1, 0, -1) if N * T << b <= SOFTMAX_ROW_SUM_LEVELS), None)


def _fit_bits(top: float) -> int:
    return max(SOFTMAX_FIT_BITS - math.ceil(math.log2(top)), 0)


@functools.lru_cache(maxsize=64)
def softmax_exp_fit(step: float, T: int, radix: int, steps: int) -> MBESum:
    """MBE populations for a softmax's ``exp(-step d)`` on every gap ``d = 0..T``, in units of ``1 / (T radix)`` (the
    digit readout's unit: the top digit counts to T), within :data:`SOFTMAX_EXP_TARGET` units on every level: secant
    pieces as wide as the curvature allows (:func:`fit_geometric`, ``knots="secant"``; cached: the precision policy
    lowers a model several times)."""
    top = float(T * radix)
    return fit_geometric("exp", lambda d: top * np.exp(-step * d), 0, T, max_error=SOFTMAX_EXP_TARGET, steps=steps,
                         frac_bits=_fit_bits(top), knots="secant")


@functools.lru_cache(maxsize=64)
def softmax_reciprocal_fit(q_lo: int, q_hi: int, T: int, radix: int, max_error: float, steps: int) -> MBESum:
    """MBE populations for a softmax's ``1 / S`` on every readout total ``q = q_lo..q_hi`` of the row's exponentials
    (``S = unit_e q``, ``q_lo`` the readout of the row max alone, ``q_lo / q`` in ``[1/N, 1]``), in units of
    ``1 / (T radix)`` of ``max 1/S``, levels counted from ``q_lo``: secant pieces within ``max_error`` units on every
    level (:func:`fit_geometric`, ``knots="secant"``; cached)."""
    top = float(T * radix)
    return fit_geometric("reciprocal", lambda i: top * q_lo / (q_lo + i), 0, q_hi - q_lo, max_error=max_error,
                         steps=steps, frac_bits=_fit_bits(top), knots="secant")


def softmax_pairs(e: Digits, r: Digits) -> list[tuple[int, int]]:
    """The (e digit, r digit) products a softmax sums: all but the product of the two last digits when both have more
    than one (it adds at most B_e B_r units, a few thousandths of an output step, and its weight would set the
    output neuron's unit: 2^10 finer than the others); its absence is in the stated error."""
    drop = (len(e.places) - 1, len(r.places) - 1) if len(e.places) > 1 and len(r.places) > 1 else None
    return [(k, m) for k in range(len(e.places)) for m in range(len(r.places)) if (k, m) != drop]


def softmax_product(e: Digits, r: Digits, d: np.ndarray, q: np.ndarray) -> np.ndarray:
    """The integer ``sum over softmax_pairs of places * counts`` at gap levels ``d`` and row sums ``q`` (broadcast):
    the output neuron's input in units ``e.unit r.unit``."""
    ce, cr = e.counts[d], r.counts[q - r.lo]
    return sum(e.places[k] * r.places[m] * ce[..., k] * cr[..., m] for k, m in softmax_pairs(e, r))


def softmax_error(e: Digits, r: Digits, N: int, step: float) -> tuple[float, float]:
    """(worst, mean) ``|y^_j - y_j|`` of the softmax made of the digit readouts ``e`` (of ``exp(-step d)``, d = 0..T)
    and ``r`` (of ``1 / (e.unit q)`` over the row sums q), rows of ``N``, in output units (probability), with
    ``y^_j = e.unit r.unit softmax_product(d_j, q)`` (what the populations count) and ``y_j`` the float64 softmax.

    The worst case is exact over every row the input range allows (d_j in 0..T, one of them 0): for element j at
    d_j = a, the others enter through their readout total q_o (which fixes ``r^``) and their exact total S_o (``y_j =
    e(a) / (e(a) + S_o)`` is monotone in it), so the extremes of S_o at each q_o (:func:`sum_ranges`, over the N - 1
    others, or the N - 2 besides an element at the max) give it. The dynamic program runs up to a total ``Q`` of the
    others' readouts; above it every row is bounded through ``S_o = e.unit q_o + sum of the others' own errors``
    (each between the least and largest error of one level), and ``Q`` doubles until that bound is below the exact
    worst case found under it, which is then the worst case over every row. The mean is over SOFTMAX_SAMPLE_ROWS
    seeded rows of uniform random counts (one at the row max). Cached by the readouts' content (the precision policy
    lowers a model several times)."""
    key = hashlib.sha256()
    for part in (e.readout, e.counts, r.readout, r.counts):
        key.update(np.ascontiguousarray(part, dtype=np.int64).tobytes())
    key.update(repr((e.places, r.places, e.unit, r.unit, r.lo, int(N), float(step))).encode())
    if key.hexdigest() not in _SOFTMAX_ERRORS:
        _SOFTMAX_ERRORS[key.hexdigest()] = _softmax_error(e, r, int(N), float(step))
    return _SOFTMAX_ERRORS[key.hexdigest()]


_SOFTMAX_ERRORS: dict[str, tuple[float, float]] = {}


def _softmax_error(e: Digits, r: Digits, N: int, step: float) -> tuple[float, float]:
    T = len(e.readout) - 1
    exact_e = np.exp(-step * np.arange(T + 1, dtype=np.float64))
    R = e.readout.astype(np.int64)
    # the output's integer is sum_k ce_k(a) G_k(q): G_k(q) = sum over the pairs (k, m) of places * r's count m at q
    G = np.zeros((len(e.places), len(r.readout)))
    for k, m in softmax_pairs(e, r):
        G[k] += float(e.places[k] * r.places[m]) * r.counts[:, m]
    ce = np.ascontiguousarray(e.counts, dtype=np.float64)
    own = exact_e - e.unit * R  # each level's error in the row sum
    unit = e.unit * r.unit
    worst = 0.0
    for j_at_max, free in ((True, N - 1), (False, N - 2)):
        if free < 0:
            continue
        a = np.zeros(1, np.int64) if j_at_max else np.arange(T + 1, dtype=np.int64)
        # the row sum's readout is q = R(a) [+ R(0): another element at the max] + q_o
        q_a = R[a] + (0 if j_at_max else R[0]) - r.lo
        s_fixed = 0.0 if j_at_max else exact_e[0]
        # an element's output is at most this (both y^ and y are >= 0): gaps that cannot beat the worst are skipped
        reach = np.maximum(unit * ce[a] @ G.max(axis=1), exact_e[a] / (exact_e[a] + s_fixed + free * exact_e.min()))
        top = free * int(R.max())
        limit = min(max(int(SOFTMAX_DP_START * R[0]), 1), top)
        while True:
            least, most = sum_ranges(R, exact_e, free, limit)
            found = _softmax_worst()(a, q_a, reach, ce, G, unit, exact_e, least, most, s_fixed, worst)
            if limit >= top:
                break
            beyond = np.minimum(reach, _softmax_coarse(e, r, a, own, free, s_fixed, exact_e, limit + 1))
            bound = _softmax_bound()(a, q_a, beyond, ce, G, unit, exact_e, max(limit + 1, free * int(R.min())), top,
                                     e.unit, free * own.min(), free * own.max(), free * exact_e.min(), float(free),
                                     s_fixed, found)
            if bound <= found:
                break
            limit = min(2 * limit, top)
        worst = max(worst, found)
    d = np.random.default_rng(0).integers(0, T + 1, size=(SOFTMAX_SAMPLE_ROWS, N))
    d[:, 0] = 0
    exact = np.exp(-step * d)
    exact /= exact.sum(axis=1, keepdims=True)
    q = e.readout[d].sum(axis=1)
    got = e.unit * r.unit * softmax_product(e, r, d, q[:, None])
    return worst, float(np.abs(got - exact).mean())


def _softmax_coarse(e: Digits, r: Digits, a: np.ndarray, own: np.ndarray, free: int, s_fixed: float,
                    exact_e: np.ndarray, start: int) -> np.ndarray:
    """For each gap ``a``, a bound on the error of every row whose others' readout total is at least ``start`` (so that
    :func:`_softmax_bound` scans only the gaps it leaves above the worst case found). With the true total ``A = e(a) +
    s_fixed + S_o`` and ``unit_e q = A - eps`` (eps: the row's readout errors ``own``, at most ``eps_hi``):
    ``|y^ - y| <= dropped + e^(a) rho + e(a) |eps| / (A (A - eps_hi)) + |own(a)| / (A - eps_hi)`` (rho: the reciprocal
    readout's worst error; dropped: the left-out product of the last digits), decreasing in ``A >= A(start)``."""
    pairs = softmax_pairs(e, r)
    last_e, last_r = len(e.places) - 1, len(r.places) - 1
    dropped = (0.0 if (last_e, last_r) in pairs else
               e.unit * r.unit * e.places[-1] * r.places[-1] * e.counts[a, -1] * float(r.counts[:, -1].max()))
    fixed = own[0] if s_fixed else 0.0  # another element at the row max
    eps_lo, eps_hi = own[a] + fixed + free * own.min(), own[a] + fixed + free * own.max()
    least = exact_e[a] + s_fixed + max(e.unit * start + free * own.min(), free * exact_e.min())
    room = least - eps_hi
    with np.errstate(divide="ignore"):
        coarse = (dropped + e.unit * e.readout[a] * r.max_abs_error
                  + exact_e[a] * np.maximum(np.abs(eps_lo), np.abs(eps_hi)) / (least * room) + np.abs(own[a]) / room)
    return np.where(room > 0, coarse, np.inf)


@functools.cache
def _softmax_worst():  # type: ignore[no-untyped-def]
    """The numba kernel of :func:`softmax_error`'s exact part: the largest error (at least ``worst``) over the gaps
    ``a`` of element j and the others' readout totals q_o = 0..len(least) - 1 that some row reaches, their exact total
    at its extremes (a gap whose outputs ``reach`` no further than ``worst`` is skipped)."""
    from numba import njit

    @njit(cache=True, nogil=True)
    def run(a, q_a, reach, ce, G, unit, exact_e, least, most, s_fixed, worst):  # type: ignore[no-untyped-def]
        for i in range(len(a)):
            if reach[i] <= worst:
                continue
            ea = exact_e[a[i]]
            for qo in range(len(least)):
                if least[qo] == np.inf:
                    continue
                q = q_a[i] + qo
                y = 0.0
                for k in range(ce.shape[1]):
                    y += ce[a[i], k] * G[k, q]
                y *= unit
                worst = max(worst, abs(y - ea / (ea + s_fixed + least[qo])), abs(y - ea / (ea + s_fixed + most[qo])))
        return worst

    return run


@functools.cache
def _softmax_bound():  # type: ignore[no-untyped-def]
    """The numba kernel of :func:`softmax_error`'s bound above the dynamic program's limit: the others' exact total
    at readout total q_o lies in ``[unit_e q_o + free min(own), unit_e q_o + free max(own)]`` and in ``[free min e,
    free]``. Returns at least ``worst``, more only if some row may exceed it (gaps that cannot are skipped)."""
    from numba import njit

    @njit(cache=True, nogil=True)
    def run(a, q_a, reach, ce, G, unit, exact_e, start, stop, unit_e, own_lo, own_hi, s_min, s_max, s_fixed,
            worst):  # type: ignore[no-untyped-def]
        for i in range(len(a)):
            if reach[i] <= worst:
                continue
            ea = exact_e[a[i]]
            for qo in range(start, stop + 1):
                q = q_a[i] + qo
                y = 0.0
                for k in range(ce.shape[1]):
                    y += ce[a[i], k] * G[k, q]
                y *= unit
                lo = max(unit_e * qo + own_lo, s_min)
                hi = min(unit_e * qo + own_hi, s_max)
                if lo > hi:
                    continue
                worst = max(worst, abs(y - ea / (ea + s_fixed + lo)), abs(y - ea / (ea + s_fixed + hi)))
        return worst

    return run


__all__ = ["Digits", "RSQRT_BITS", "SOFTMAX_DP_START", "SOFTMAX_EXP_TARGET", "SOFTMAX_FIT_BITS",
           "SOFTMAX_RECIPROCAL_TARGET", "SOFTMAX_ROW_SUM_LEVELS", "SOFTMAX_SAMPLE_ROWS", "layernorm_rsqrt", "mbe_digits",
           "rsqrt_fit", "softmax_error", "softmax_exp_fit", "softmax_pairs", "softmax_product", "softmax_radix_bits",
           "softmax_reciprocal_fit"]
