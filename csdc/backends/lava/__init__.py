"""Lava backend (lava-nc 0.10): the spiking IR as Lava processes for Loihi-style hardware.

Importing this package installs the Python 3.11 compatibility hook (:mod:`.compat`) and
imports lava; it raises :class:`csdc.backends.lava.compat.LavaUnavailableError` (an
ImportError and a CsdcError) with install instructions when lava-nc is not usable.
See docs/lava.md.
"""

from csdc.backends.lava.compat import LavaUnavailableError, import_lava

import_lava()

from csdc.backends.lava.backend import LavaBackend, build_process_graph  # noqa: E402
from csdc.backends.lava.builder import LavaGraph, run_graph  # noqa: E402
from csdc.backends.lava.plan import hardware_report, make_plan  # noqa: E402

__all__ = ["LavaBackend", "LavaGraph", "LavaUnavailableError", "build_process_graph", "hardware_report", "make_plan",
           "run_graph"]
