"""Compile-time MBE fits (csdc/compiler/mbe.py): every approximation within its stated error on
every level of its input range, measured independently by the numba kernel."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from csdc.backends.numba import kernels as K
from csdc.compiler.mbe import FUNCTIONS, choose, fit, gelu
from csdc.errors import CsdcError


def numba_values(f, q: np.ndarray) -> np.ndarray:
    """``(decoded total + constant) / 2^frac_bits`` for each level, by the numba kernel (one element per level)."""
    out = np.empty((1, f.steps, q.size), dtype=np.int64)
    cur = q.astype(np.int64).reshape(1, 1, -1)  # a constant current over a window of f.steps steps
    # the kernel integrates Tc = 1 current over T = f.steps steps: feed q / T exactly by a zero current and v0 = q
    K.mbe_neurons(np.zeros_like(cur), q.astype(np.int64), f.offset, f.threshold, f.reset, f.weight, out)
    return (out.sum(axis=1)[0] + f.constant) / float(2**f.frac_bits)


def check_bound(f, target) -> None:
    q = np.arange(f.lo, f.hi + 1)
    err = np.abs(numba_values(f, q) - target(q.astype(np.float64)))
    assert err.max() <= f.max_abs_error + 1e-9
    assert math.isclose(err.max(), f.max_abs_error, rel_tol=1e-9, abs_tol=1e-12)
    assert math.isclose(err.mean(), f.mean_abs_error, rel_tol=1e-9, abs_tol=1e-12)


# the paper's primitives on the ranges their exponent / mantissa splits leave (on a grid of 2^-8 or
# 2^-7), and GELU between uint8 quantizers; the bounds are what these fits reach here plus a margin for
# least squares rounding differently on another CPU
CASES = [
    ("gelu", lambda q: gelu(0.05 * (q - 128)) / 0.02, 0, 255, 16, 0.35),  # output levels of s = 0.02
    ("exp2", lambda q: FUNCTIONS["exp2"](q / 256), 0, 255, 8, 1e-3),  # 2^frac on [0, 1)
    ("reciprocal", lambda q: FUNCTIONS["reciprocal"](q / 128), 64, 127, 8, 3.5e-3),  # 1 / mantissa on [0.5, 1)
    ("rsqrt", lambda q: FUNCTIONS["rsqrt"](q / 128), 64, 255, 8, 3.5e-3),  # 1 / sqrt on [0.5, 2)
    ("identity", lambda q: q, -128, 127, 1, 0.0),
]


@pytest.mark.parametrize(("name", "target", "lo", "hi", "bases", "bound"), CASES, ids=[c[0] for c in CASES])
def test_each_primitive_within_its_stated_bound_on_every_level(name, target, lo, hi, bases, bound) -> None:
    f = fit(name, target, lo, hi, bases=bases, steps=16)
    check_bound(f, target)
    assert f.max_abs_error <= bound
    assert f.steps_used <= 16 and f.bases <= bases
    assert f.report()["max_abs_error"] == f.max_abs_error


def test_more_bases_lower_the_gelu_error() -> None:
    target = lambda q: gelu(0.05 * (q - 128)) / 0.02  # noqa: E731
    errors = [fit("gelu", target, 0, 255, bases=k).max_abs_error for k in (1, 4, 16)]
    assert errors[0] > errors[1] > errors[2]


@settings(max_examples=25, deadline=None)
@given(st.floats(0.005, 0.2), st.integers(0, 255), st.floats(0.005, 0.1), st.integers(-40, 0), st.integers(1, 200),
       st.sampled_from([2, 4, 8]), st.integers(4, 16))
def test_random_gelu_quantizer_pairs_meet_their_stated_bound(s_in, zero, s_out, lo, span, bases, steps) -> None:
    """GELU between random quantizers on random level ranges: the stated worst-case and mean errors are
    those the numba kernel produces on every level."""
    target = lambda q: gelu(s_in * (q - zero)) / s_out  # noqa: E731
    f = fit("gelu", target, lo, lo + span, bases=bases, steps=steps)
    check_bound(f, target)


def test_choose_takes_the_fewest_bases_that_meet_the_target() -> None:
    target = lambda q: gelu(0.05 * (q - 128)) / 0.02  # noqa: E731
    f = choose("gelu", target, 0, 255, max_error=0.5)
    assert f.max_abs_error <= 0.5
    smaller = fit("gelu", target, 0, 255, bases=f.bases // 2)
    assert smaller.max_abs_error > 0.5
    assert choose("gelu", target, 0, 255, max_error=0.5, bases=3).bases <= 3


def test_bad_ranges_and_functions_are_refused_by_name() -> None:
    with pytest.raises(CsdcError, match="empty level range"):
        fit("gelu", gelu, 5, 4)
    with pytest.raises(CsdcError, match=r"reciprocal: the function is not finite .*\(e\.g\. at \[0\]\)"):
        fit("reciprocal", FUNCTIONS["reciprocal"], 0, 10)
    with pytest.raises(CsdcError, match="bases must be in"):
        fit("gelu", gelu, 0, 10, bases=0)
