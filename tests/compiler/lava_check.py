"""Lava against numba for the compiler's tests, under the policy of tests/backends/test_lava.py: the Lava
environment must be usable (the test fails loudly otherwise); ``CSDC_ALLOW_NO_LAVA=1`` skips instead."""

from __future__ import annotations

import os

import numpy as np
import pytest

from csdc.ir.graph import Network


def assert_lava_equals_numba(net: Network, x: np.ndarray, trains: bool = False) -> None:
    """Lava's readout and every population's spike counts (``trains``: spike trains) equal numba's on ``x``."""
    from csdc.backends.lava import env as lava_env
    from csdc.backends.lava.backend import LavaBackend
    from csdc.backends.lava.compat import LavaUnavailableError
    from csdc.backends.numba import NumbaBackend

    try:
        lava_env.require()
    except LavaUnavailableError as exc:
        if os.environ.get("CSDC_ALLOW_NO_LAVA") == "1":
            pytest.skip(f"LAVA BACKEND NOT TESTED: {exc}")
        raise
    want, got = NumbaBackend().run(net, x, keep_trains=trains), LavaBackend().run(net, x, keep_trains=trains)
    assert np.array_equal(got.readout, want.readout)
    expected, measured = (want.trains, got.trains) if trains else (want.counts, got.counts)
    assert measured.keys() == expected.keys()
    for name in expected:
        assert np.array_equal(measured[name], expected[name]), name
