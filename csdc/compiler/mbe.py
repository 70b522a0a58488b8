"""Compile-time fitting of MBE neurons (docs/mbe.md): integer parameters that approximate a
function of an integer input level, with the error measured on every level.

The input of a nonlinear op between quantizers is an integer level ``q`` in ``[lo, hi]`` (its
quantizer's range), so the whole domain is enumerable: the fit is checked on all of it, and
the reported worst-case and mean absolute errors are exact, not sampled.

Construction (the paper's neuron with every time constant equal to dt / ln 2, in integers):
basis n covers the levels from its knot ``b_n`` on; its membrane starts at ``u_n = q - b_n``
(``offset[n] = -b_n``) and its thresholds and resets halve every step, ``2^(m_n - t)`` for
t = 1..m_n, so its spikes are the binary digits of ``clip(q - b_n, 0, 2^m_n - 1)`` (a saturating
ramp, digit by digit), and the next basis starts where it saturates, ``b_(n+1) = b_n + 2^m_n - 1``. Steps
beyond m_n get an unreachable threshold (no spike, no energy). The output weights ``d_n(t)`` of
all bases and one constant are then fitted jointly by least squares on every level, reweighted
towards the largest errors (Lawson's iteration, towards the minimax fit), and rounded to
integers in units of ``2^-F`` of the target (``max |target| 2^F`` about 2^20). Knots are placed uniformly or where the
function bends (density ~ |f''|^p for a few p), whichever gives the smaller worst-case error.
Above :data:`FIT_SAMPLE_LEVELS` levels the weights are fitted on a seeded sample of the levels (with every
knot and its neighbours) and the errors are still measured on every level, by the numba kernel.
:func:`choose` doubles the number of bases until the worst-case error meets a target.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from csdc.errors import CsdcError
from csdc.ir.ops import MBE_BASES_MAX, MBE_STEPS_MAX, MBENeuron
from csdc.ir.semantics import mbe_spikes, mbe_total

OUTPUT_BITS = 20  # output weights in units of 2^-F of the target, F chosen so that max |target| 2^F ~ 2^20
#: above this many levels the weights are fitted on a sample of them (every knot, its neighbours and a seeded
#: random draw) and the errors are measured on every level by the numba kernel
FIT_SAMPLE_LEVELS = 8192
_LAWSON_ITERATIONS = 30
_KNOT_POWERS = (0.0, 1 / 3, 1 / 2, 1.0)  # knot densities tried: uniform, then ~ |f''|^p


def gelu(x: np.ndarray) -> np.ndarray:
    """GELU with the exact erf (ONNX ``Gelu`` default and ``0.5 x (1 + Erf(x / sqrt 2))``)."""
    from scipy.special import erf

    x = np.asarray(x, dtype=np.float64)
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


FUNCTIONS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "gelu": gelu,
    "exp2": lambda x: np.exp2(np.asarray(x, dtype=np.float64)),
    "reciprocal": lambda x: 1.0 / np.asarray(x, dtype=np.float64),
    "rsqrt": lambda x: 1.0 / np.sqrt(np.asarray(x, dtype=np.float64)),
    "identity": lambda x: np.asarray(x, dtype=np.float64),
}


@dataclass(frozen=True)
class MBEFit:
    """Integer MBE parameters approximating ``target(q)`` on the levels ``lo..hi``.

    The population built by :meth:`op` (input ``q``, i.e. ``v0 + V = q``) emits in total
    ``mbe_total = sum_{n,t} s_n(t) weight[n, t]``, and ``(mbe_total + constant) / 2^frac_bits``
    approximates ``target(q)`` within ``max_abs_error`` everywhere on ``lo..hi`` (mean
    ``mean_abs_error``), in the target's units. ``steps_used``: encoding steps any basis uses."""

    name: str
    lo: int
    hi: int
    threshold: np.ndarray
    reset: np.ndarray
    weight: np.ndarray
    offset: np.ndarray
    constant: int
    frac_bits: int
    max_abs_error: float
    mean_abs_error: float
    steps_used: int

    @property
    def bases(self) -> int:
        return int(self.threshold.shape[0])

    @property
    def steps(self) -> int:
        return int(self.threshold.shape[1])

    def op(self, v0: np.ndarray) -> MBENeuron:
        """The MBE population for inputs whose ``v0 + V`` is the level ``q`` (``v0``: the population's shape)."""
        return MBENeuron(self.threshold, self.reset, self.weight, self.offset, v0)

    def evaluate(self, q: np.ndarray) -> np.ndarray:
        """``(mbe_total + constant) / 2^frac_bits`` at the levels ``q`` (1-D), by the IR's semantics."""
        q = np.asarray(q, dtype=np.int64)
        total = mbe_total(self.op(np.zeros((), np.int64)), q)
        return (total + self.constant) / float(2**self.frac_bits)

    def report(self) -> dict:
        return {"function": self.name, "levels": [self.lo, self.hi], "bases": self.bases, "steps": self.steps,
                "steps_used": self.steps_used, "max_abs_error": self.max_abs_error,
                "mean_abs_error": self.mean_abs_error, "frac_bits": self.frac_bits}


def _sar_tables(knots: np.ndarray, hi: int, steps: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Thresholds, resets and offsets of successive-approximation bases starting at ``knots``."""
    k = len(knots)
    ends = np.append(knots[1:], hi)
    unreachable = max(int(hi - knots.min()) + 1, 1)  # above any membrane value an in-range level leaves
    threshold = np.full((k, steps), unreachable, dtype=np.int64)
    reset = np.zeros((k, steps), dtype=np.int64)
    used = 0
    for n, (b, e) in enumerate(zip(knots, ends)):
        m = max(int(e - b).bit_length(), 1)  # 2^m - 1 >= the increments up to the next knot (== but for the last)
        for t in range(min(m, steps)):
            threshold[n, t] = reset[n, t] = 1 << (m - 1 - t)
        used = max(used, min(m, steps))
    # steps no basis uses are dropped (a shorter table, same spikes)
    return threshold[:, :used].copy(), reset[:, :used].copy(), -knots.astype(np.int64), used


def _knots(lo: int, hi: int, bases: int, y: np.ndarray, power: float) -> np.ndarray:
    """At most ``bases`` integer knots in ``[lo, hi]``, the first at ``lo``: uniform (``power`` 0), or
    with density ~ |f''|^power (more bases where the function bends)."""
    n = hi - lo + 1
    bases = min(bases, n)
    if power and n > 4:
        d2 = np.convolve(np.abs(np.diff(y, 2)), np.ones(5) / 5, mode="same")
        density = d2**power + 1e-3 * ((d2**power).mean() + 1e-12)
        cdf = np.concatenate([[0.0], np.cumsum(density)])
        cdf /= cdf[-1]
        pos = np.searchsorted(cdf, np.arange(bases) / bases)
        knots = lo + np.clip(pos, 0, n - 1)
    else:
        knots = lo + (np.arange(bases) * n) // bases
    knots = np.unique(np.append(knots.astype(np.int64), lo))
    # a basis with m digits spans 2^m - 1 increments: the next one starts where it saturates (the last
    # one takes what is left)
    widths = np.diff(np.append(knots, hi + 1))
    out = [lo]
    for w in widths[:-1]:
        p = (1 << max(int(round(math.log2(max(w, 2)))), 1)) - 1
        if out[-1] + p >= hi:
            break
        out.append(out[-1] + p)
    return np.array(out, dtype=np.int64)


def _solve(features: np.ndarray, y: np.ndarray, normal: bool = False) -> np.ndarray:
    """Weighted least squares reweighted towards the largest errors (Lawson): near-minimax coefficients.
    Stops when the worst error has not improved by 0.1 % in 5 iterations (LAPACK's QR-based gelsy; ``normal``:
    on the normal equations, for a sample of many levels, where the QR of the tall matrix dominates the time)."""
    from scipy.linalg import lstsq

    w = np.ones(len(y))
    best, best_err, stalled = None, np.inf, 0
    for _ in range(_LAWSON_ITERATIONS):
        if normal:
            wf = features * w[:, None]
            coef = lstsq(wf.T @ features, wf.T @ y, lapack_driver="gelsy", check_finite=False)[0]
        else:
            sw = np.sqrt(w)
            coef = lstsq(features * sw[:, None], y * sw, lapack_driver="gelsy", check_finite=False)[0]
        err = np.abs(features @ coef - y)
        stalled = 0 if err.max() < best_err * 0.999 else stalled + 1
        if err.max() < best_err:
            best, best_err = coef, err.max()
        if err.max() == 0 or stalled >= 5:
            break
        w = w * err / err.sum() + 1e-12
        w /= w.sum()
    return best


def fit(name: str, target: Callable[[np.ndarray], np.ndarray], lo: int, hi: int, *, bases: int = 4,
        steps: int = 16, frac_bits: int | None = None) -> MBEFit:
    """Fit an MBE population to ``target`` (a function of the integer level q, vectorised, float64)
    on every level ``lo..hi``; the errors are measured on all of them after rounding to integers.
    ``frac_bits``: the output unit 2^-F of the target (default: ``max |target| 2^F`` about 2^20, so
    rounding the weights costs a negligible part of the error)."""
    lo, hi = int(lo), int(hi)
    if hi < lo:
        raise CsdcError(f"MBE fit of {name}: empty level range [{lo}, {hi}]")
    if hi - lo + 1 > 2**20:
        raise CsdcError(f"MBE fit of {name}: {hi - lo + 1} levels, more than the 2^20 csdc enumerates")
    if not 1 <= bases <= MBE_BASES_MAX or not 1 <= steps <= MBE_STEPS_MAX:
        raise CsdcError(f"MBE fit of {name}: bases must be in 1..{MBE_BASES_MAX} and steps in 1..{MBE_STEPS_MAX}, "
                        f"got {bases} and {steps}")
    q = np.arange(lo, hi + 1, dtype=np.int64)
    sampled = len(q) > FIT_SAMPLE_LEVELS
    draw = np.random.default_rng(0).choice(len(q), FIT_SAMPLE_LEVELS, replace=False) if sampled else None
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # reported below, by level
        y = np.asarray(target(q.astype(np.float64)), dtype=np.float64)
    if y.shape != q.shape or not np.all(np.isfinite(y)):
        bad = q[~np.isfinite(y)][:3] if y.shape == q.shape else []
        raise CsdcError(f"MBE fit of {name}: the function is not finite on every level of [{lo}, {hi}]"
                        + (f" (e.g. at {[int(v) for v in bad]})" if len(bad) else ""))
    if frac_bits is None:
        frac_bits = max(OUTPUT_BITS - math.ceil(math.log2(float(np.abs(y).max()) + 1.0)), 0)
    best: MBEFit | None = None
    for power in _KNOT_POWERS:
        knots = _knots(lo, hi, bases, y, power)
        threshold, reset, offset, used = _sar_tables(knots, hi, steps)
        probe = MBENeuron(threshold, reset, np.zeros_like(threshold), offset, np.zeros((), np.int64))
        idx = (np.unique(np.concatenate([draw, np.clip(np.concatenate([knots - 1, knots, knots + 1]) - lo, 0, len(q) - 1),
                                         [0, len(q) - 1]])) if sampled else slice(None))
        qs = q[idx]
        spikes = mbe_spikes(probe, qs).reshape(len(qs), -1).astype(np.float64)  # (levels, S * K), step-major
        features = np.concatenate([spikes, np.ones((len(qs), 1))], axis=1)
        coef = _solve(features, y[idx], normal=sampled)
        scale = float(2**frac_bits)
        weight = np.rint(coef[:-1] * scale).astype(np.int64).reshape(used, len(knots)).T.copy()
        weight[reset == 0] = 0  # the steps beyond a basis's digits never fire: no weight
        constant = int(np.rint(coef[-1] * scale))
        op = MBENeuron(threshold, reset, weight, offset, np.zeros((), np.int64))
        got = ((numba_totals(op, q) if sampled else mbe_total(op, q)) + constant) / scale
        err = np.abs(got - y)
        cand = MBEFit(name, lo, hi, threshold, reset, weight, offset, constant, frac_bits, float(err.max()),
                      float(err.mean()), used)
        if best is None or cand.max_abs_error < best.max_abs_error:
            best = cand
    assert best is not None
    return best


def numba_totals(op: MBENeuron, q: np.ndarray, chunk: int = 1 << 16) -> np.ndarray:
    """``mbe_total(op, q)`` for many levels ``q`` (1-D; the population's ``v0`` ignored) by the numba kernel, in chunks."""
    from csdc.backends.numba.kernels import mbe_neurons

    q = np.asarray(q, dtype=np.int64)
    out = np.empty(len(q), dtype=np.int64)
    zero = np.zeros((1, 1, min(chunk, len(q))), dtype=np.int64)
    for i in range(0, len(q), chunk):
        part = q[i:i + chunk]
        steps = np.zeros((1, op.steps, len(part)), dtype=np.int64)
        # a constant current of 0 and v0 = q: the kernel's membrane starts at the level itself
        mbe_neurons(zero[:, :, :len(part)], part.copy(), op.offset, op.threshold, op.reset, op.weight, steps)
        out[i:i + chunk] = steps[0].sum(axis=0)
    return out


def sum_ranges(readout: np.ndarray, values: np.ndarray, count: int,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Over every choice of ``count`` levels (with repetition) of a table of integer ``readout``s (>= 0) and real
    ``values``: for each total ``q = 0..count * max(readout)`` of the readouts, the least and the largest total of
    the values (+inf / -inf where no choice reaches q). A dynamic program over the elements (numba), used to state
    the worst case of a row sum exactly. ``limit``: only the totals up to it (exact there: readouts are >= 0, so a
    partial total above the limit never comes back under it), for a cost proportional to the limit."""
    readout = np.asarray(readout, dtype=np.int64)
    values = np.asarray(values, dtype=np.float64)
    # levels with the same readout: only their least and largest value matter
    keys = np.unique(readout)
    lo_v = np.array([values[readout == k].min() for k in keys])
    hi_v = np.array([values[readout == k].max() for k in keys])
    top = int(count) * int(keys.max())
    return _sum_ranges(keys, lo_v, hi_v, int(count), top if limit is None else max(min(int(limit), top), 0))


@functools.cache
def _sum_ranges_kernel():  # type: ignore[no-untyped-def]
    from numba import njit

    @njit(cache=True, nogil=True)
    def run(keys, lo_v, hi_v, count, limit):  # type: ignore[no-untyped-def]
        width = limit + 1
        least = np.full(width, np.inf)
        most = np.full(width, -np.inf)
        least[0] = 0.0
        most[0] = 0.0
        top = 0
        for _ in range(count):
            new_least = np.full(width, np.inf)
            new_most = np.full(width, -np.inf)
            for q in range(top + 1):
                if least[q] == np.inf:
                    continue
                for i in range(len(keys)):
                    t = q + keys[i]
                    if t > limit:
                        break  # keys ascend
                    a = least[q] + lo_v[i]
                    b = most[q] + hi_v[i]
                    if a < new_least[t]:
                        new_least[t] = a
                    if b > new_most[t]:
                        new_most[t] = b
            least, most = new_least, new_most
            top = min(top + keys.max(), limit)
        return least, most

    return run


def _sum_ranges(keys: np.ndarray, lo_v: np.ndarray, hi_v: np.ndarray, count: int,
                limit: int) -> tuple[np.ndarray, np.ndarray]:
    if count == 0:
        return np.zeros(1), np.zeros(1)
    return _sum_ranges_kernel()(keys, lo_v, hi_v, count, limit)


BASES_CHOICES = (1, 2, 4, 8, 16, 32, 64)
#: worst-case error the compiler aims at for an approximated op, in steps of the quantizer that reads it
MBE_TARGET_LEVELS = 0.25


def choose(name: str, target: Callable[[np.ndarray], np.ndarray], lo: int, hi: int, *, max_error: float,
           steps: int = 16, max_bases: int = 32, bases: int | None = None, frac_bits: int | None = None) -> MBEFit:
    """The fit with the fewest bases (1, 2, 4, ... up to ``max_bases``) whose worst-case error over
    ``lo..hi`` is at most ``max_error``, else the best one tried; ``bases`` given: exactly that many."""
    if bases is not None:
        return fit(name, target, lo, hi, bases=bases, steps=steps, frac_bits=frac_bits)
    best = None
    for k in (b for b in BASES_CHOICES if b <= max_bases):
        cand = fit(name, target, lo, hi, bases=k, steps=steps, frac_bits=frac_bits)
        if best is None or cand.max_abs_error < best.max_abs_error:
            best = cand
        if cand.max_abs_error <= max_error or k >= hi - lo + 1:
            return cand
    assert best is not None
    return best


def fit_table(name: str, values: np.ndarray, *, bases: int | None, steps: int, frac_bits: int | None = None,
              max_bases: int = MBE_BASES_MAX) -> MBEFit:
    """An MBE fit of a function given by its values at the levels 0..len(values)-1 (e.g. an elementwise
    subgraph evaluated on every count of its input quantizer), aiming at :data:`MBE_TARGET_LEVELS`
    (``frac_bits``: the output unit, default as :func:`fit`; ``max_bases``: the most bases :func:`choose`
    tries). Cached by value: the precision policy lowers a model several times."""
    values = np.ascontiguousarray(values, dtype=np.float64)
    return _fit_table(name, values.tobytes(), bases, min(steps, len(values) - 1) if len(values) > 1 else 1, frac_bits,
                      max_bases)


@functools.lru_cache(maxsize=256)
def _fit_table(name: str, data: bytes, bases: int | None, steps: int, frac_bits: int | None, max_bases: int) -> MBEFit:
    values = np.frombuffer(data, dtype=np.float64)
    target = lambda q: values[np.asarray(q, dtype=np.int64)]  # noqa: E731
    return choose(name, target, 0, len(values) - 1, max_error=MBE_TARGET_LEVELS, steps=steps,
                  max_bases=max_bases, bases=bases, frac_bits=frac_bits)


# -- large domains: continuous piecewise-linear fits on geometric knots, verified on every level -------------------
#: most levels a large-domain fit verifies (the numba kernel, chunk by chunk)
LARGE_LEVELS_MAX = 2**26


@dataclass(frozen=True)
class MBESum:
    """MBE populations that read one input ``q`` and whose outputs add up: ``(sum of their totals + constant) /
    2^frac_bits`` approximates ``target(q)`` on ``lo..hi`` (each part at most ``MBE_BASES_MAX`` bases; each part's
    own ``constant`` is 0). ``max_abs_error`` / ``mean_abs_error``: of ``weight(q) * (approximation - target(q))``,
    measured on **every** level by the numba kernel; ``max_rel_error``: the worst ``|approximation / target - 1|``."""

    name: str
    lo: int
    hi: int
    parts: tuple[MBEFit, ...]
    constant: int
    frac_bits: int
    max_abs_error: float
    mean_abs_error: float
    max_rel_error: float
    #: the sum of the parts' totals at every level lo..hi, as measured (kept: a lowering reads it again)
    table: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def bases(self) -> int:
        return sum(p.bases for p in self.parts)

    @property
    def steps(self) -> int:
        return max(p.steps for p in self.parts)

    def totals(self, q: np.ndarray) -> np.ndarray:
        """``sum of the parts' totals`` (int64) at the levels ``q`` (1-D), by the numba kernel (or its measured table)."""
        q = np.asarray(q, dtype=np.int64)
        if self.table is not None and (q.size == 0 or (q.min() >= self.lo and q.max() <= self.hi)):
            return self.table[q - self.lo]
        return sum(numba_totals(p.op(np.zeros((), np.int64)), q) for p in self.parts)

    def evaluate(self, q: np.ndarray) -> np.ndarray:
        return (self.totals(q) + self.constant) / float(2**self.frac_bits)

    def report(self) -> dict:
        return {"function": self.name, "levels": [self.lo, self.hi], "bases": self.bases, "populations": len(self.parts),
                "steps": self.steps, "max_abs_error": self.max_abs_error, "mean_abs_error": self.mean_abs_error,
                "max_rel_error": self.max_rel_error, "frac_bits": self.frac_bits}


def _geometric_knots(lo: int, hi: int, ratio: float, steps: int) -> np.ndarray:
    """Knots from ``lo``: each piece ``2^m - 1`` levels wide (m <= ``steps`` digits), about ``ratio - 1`` times the
    distance of its start from ``lo - 1`` (relative resolution, as a function of a power law wants), at least 1."""
    knots = [lo]
    while knots[-1] < hi:
        b = knots[-1]
        m = min(max(int(math.floor(math.log2((ratio - 1.0) * (b - lo + 1) + 1.0))), 1), steps)
        knots.append(b + (1 << m) - 1)
    return np.array(knots[:-1], dtype=np.int64)


def _secant_knots(q: np.ndarray, y: np.ndarray, w: np.ndarray, tol: float, steps: int) -> np.ndarray:
    """Knots from ``q[0]``, each piece the widest ``2^m - 1`` levels (m <= ``steps`` digits) whose secant stays within
    ``tol`` of ``y`` on every level it spans (errors weighted by ``w``): the resolution follows the curvature, for
    any smooth target (an exponential's, a reciprocal's far from 0)."""
    lo, hi = int(q[0]), int(q[-1])
    knots = [lo]
    while True:
        b = knots[-1] - lo
        end = b + 1
        for m in range(2, steps + 1):
            e = min(b + (1 << m) - 1, hi - lo)
            line = y[b] + (y[e] - y[b]) * np.arange(e - b + 1, dtype=np.float64) / (e - b)
            if float(np.max(w[b:e + 1] * np.abs(line - y[b:e + 1]))) > tol:
                break
            end = e
            if e == hi - lo:
                break
        if end >= hi - lo:
            return np.array(knots, dtype=np.int64)
        knots.append(lo + end)


def fit_geometric(name: str, target: Callable[[np.ndarray], np.ndarray], lo: int, hi: int, *,
                  weight: Callable[[np.ndarray], np.ndarray] | None = None, max_error: float, steps: int = 16,
                  max_bases: int = 8 * MBE_BASES_MAX, frac_bits: int | None = None,
                  knots: str = "geometric") -> MBESum:
    """An MBE fit of a smooth monotone ``target`` (e.g. ``1/sqrt``) on a domain too large for :func:`fit`'s
    least squares (up to :data:`LARGE_LEVELS_MAX` levels).

    Construction: successive-approximation bases (as :func:`fit`) on knots ``b_n`` whose pieces grow
    geometrically (:func:`_geometric_knots`); each basis ramps linearly from ``target(b_n)`` to ``target(b_(n+1))``
    (secant interpolation, its digits weighted ``slope * 2^(m-1-t)`` and its leading digit taking the rounding
    remainder so that the value at every knot is the rounded target: errors do not accumulate along the
    knots), knot values lowered by half of the adjacent pieces' largest deviation (the secant of a convex
    function lies above it). The fewest pieces (ratio halved from 2) whose ``weight * error`` is within
    ``max_error`` on every level wins, else the finest tried within ``max_bases``. Bases are split into
    populations of at most ``MBE_BASES_MAX``. The error is **verified on every level** of ``lo..hi`` by the
    numba kernel. ``weight``: the error's weight per level (default 1). ``knots="secant"``: pieces as wide as the
    target's curvature allows (:func:`_secant_knots`, the tolerance divided by sqrt 2 from twice ``max_error``)
    instead of geometric ones: a convex target far from a power law's pole (``exp(-s d)`` on every level, ``1/q``
    from a large ``q``) within a tight ``max_error``."""
    if knots not in ("geometric", "secant"):
        raise CsdcError(f"MBE fit of {name}: knots must be 'geometric' or 'secant', got {knots!r}")
    lo, hi = int(lo), int(hi)
    if hi <= lo:
        raise CsdcError(f"MBE fit of {name}: empty level range [{lo}, {hi}]")
    if hi - lo + 1 > LARGE_LEVELS_MAX:
        raise CsdcError(f"MBE fit of {name}: {hi - lo + 1} levels, more than the 2^26 csdc verifies")
    steps = max(1, min(int(steps), MBE_STEPS_MAX))
    q = np.arange(lo, hi + 1, dtype=np.int64)
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        y = np.asarray(target(q.astype(np.float64)), dtype=np.float64)
    if y.shape != q.shape or not np.all(np.isfinite(y)):
        raise CsdcError(f"MBE fit of {name}: the function is not finite on every level of [{lo}, {hi}]")
    w = np.ones_like(y) if weight is None else np.asarray(weight(q.astype(np.float64)), dtype=np.float64)
    if frac_bits is None:
        frac_bits = max(OUTPUT_BITS - math.ceil(math.log2(float(np.abs(y).max()) + 1.0)), 0)
    # candidates are compared on a sample (every level near lo, a geometric grid above); the one returned is
    # measured on every level, refined further while that misses the target
    sample = q if q.size <= 2**16 else np.unique(np.concatenate([
        q[:4096], np.rint(np.geomspace(lo + 4096, hi, 2**15)).astype(np.int64), [hi]]))
    best: tuple[MBESum, np.ndarray, bool] | None = None  # (fit, its knots, measured on every level)
    ratio, tol, placement = 2.0, 2.0 * max_error, knots
    while True:
        knots = (_geometric_knots(lo, hi, ratio, steps) if placement == "geometric"
                 else _secant_knots(q, y, w, tol, steps))
        if len(knots) > max_bases and best is not None:
            break
        cand = _secant_sum(name, q, y, w, knots, hi, steps, frac_bits, sample)
        everywhere = sample is q
        if cand.max_abs_error <= max_error and not everywhere:
            cand, everywhere = _secant_sum(name, q, y, w, knots, hi, steps, frac_bits, q), True
        if best is None or cand.max_abs_error < best[0].max_abs_error:
            best = (cand, knots, everywhere)
        if cand.max_abs_error <= max_error or len(knots) >= hi - lo + 1:
            break
        ratio, tol = 1.0 + (ratio - 1.0) / 2 ** 0.5, tol / 2 ** 0.5
    fitted, knots, everywhere = best
    return fitted if everywhere else _secant_sum(name, q, y, w, knots, hi, steps, frac_bits, q)


def _secant_sum(name: str, q: np.ndarray, y: np.ndarray, w: np.ndarray, knots: np.ndarray, hi: int, steps: int,
                frac_bits: int, measured: np.ndarray) -> MBESum:
    """The secant fit on ``knots`` (``y``, ``w``: target and weight on every level ``q``), its errors measured on the
    levels ``measured`` (all of ``q``, or a sample while candidates are compared)."""
    lo = int(q[0])
    ends = np.append(knots[1:], hi)
    # knot values lowered by half the largest deviation of the secants next to them (minimax for a convex target)
    dev = np.zeros(len(knots))
    for n, (b, e) in enumerate(zip(knots, ends)):
        seg = slice(b - lo, e - lo + 1)
        line = y[b - lo] + (y[e - lo] - y[b - lo]) * (q[seg] - b) / max(e - b, 1)
        dev[n] = float(np.max(line - y[seg]))
    shift = np.zeros(len(knots) + 1)
    shift[:-1] = dev / 2
    shift[1:] = np.maximum(shift[1:], dev / 2)
    scale = float(2**frac_bits)
    at_knots = np.rint((np.append(y[knots - lo], y[hi - lo]) - shift) * scale).astype(np.int64)
    rows_t, rows_r, rows_w = [], [], []
    for n, (b, e) in enumerate(zip(knots, ends)):
        m = max(int(e - b).bit_length(), 1)
        rise = int(at_knots[n + 1] - at_knots[n])
        slope = rise / max(int(e - b), 1)
        th = np.zeros(steps, np.int64)
        wt = np.zeros(steps, np.int64)
        for t in range(m):
            th[t] = 1 << (m - 1 - t)
            wt[t] = int(np.rint(slope * th[t]))
        # the value where the basis reaches the next knot (u = e - b) is exact: the leading digit takes the remainder
        u = int(e - b)
        digits = [(u >> (m - 1 - t)) & 1 for t in range(m)]
        if digits[0]:
            wt[0] += rise - int(sum(d * wt[t] for t, d in enumerate(digits)))
        rows_t.append(th)
        rows_w.append(wt)
    threshold = np.array(rows_t)
    reset = threshold.copy()
    weight_tab = np.array(rows_w)
    unreachable = int(hi - lo) + 2
    threshold[reset == 0] = unreachable
    parts = []
    for start in range(0, len(knots), MBE_BASES_MAX):
        sl = slice(start, start + MBE_BASES_MAX)
        used = max(int(np.count_nonzero(reset[sl], axis=1).max()), 1)
        parts.append(MBEFit(name, lo, hi, threshold[sl, :used].copy(), reset[sl, :used].copy(),
                            weight_tab[sl, :used].copy(), -knots[sl].astype(np.int64), 0, frac_bits, 0.0, 0.0, used))
    constant = int(at_knots[0])
    totals = sum(numba_totals(p.op(np.zeros((), np.int64)), measured) for p in parts)
    got = (totals + constant) / scale
    at = measured - lo
    err = w[at] * np.abs(got - y[at])
    with np.errstate(divide="ignore", invalid="ignore"):
        rel = np.abs(got / y[at] - 1.0)
    return MBESum(name, lo, hi, tuple(parts), constant, frac_bits, float(err.max()), float(err.mean()),
                  float(np.max(rel[np.isfinite(rel)], initial=0.0)), totals if measured is q else None)


__all__ = ["BASES_CHOICES", "FIT_SAMPLE_LEVELS", "FUNCTIONS", "LARGE_LEVELS_MAX", "MBE_TARGET_LEVELS", "OUTPUT_BITS",
           "MBEFit", "MBESum", "choose", "fit", "fit_geometric", "fit_table", "gelu", "numba_totals", "sum_ranges"]
