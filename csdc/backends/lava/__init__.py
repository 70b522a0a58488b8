"""Lava backend (lava-nc 0.10): the spiking IR as Lava processes for Loihi-style hardware.

Public names are loaded lazily: ``LavaBackend``, ``build_process_graph``, ``LavaGraph``,
``run_graph`` (these import lava-nc through the Python 3.11 compatibility hook of
:mod:`.compat` and raise :class:`LavaUnavailableError` -- an ImportError and a CsdcError --
with install instructions when lava-nc is not usable), and ``make_plan``,
``hardware_report``, ``export_bundle`` (pure numpy: planning and exporting a deployment
bundle do not need lava-nc). See docs/lava.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from csdc.backends.lava.compat import LavaUnavailableError, import_lava

_LAZY = {
    "LavaBackend": "csdc.backends.lava.backend",
    "build_process_graph": "csdc.backends.lava.backend",
    "LavaGraph": "csdc.backends.lava.builder",
    "run_graph": "csdc.backends.lava.builder",
    "make_plan": "csdc.backends.lava.plan",
    "hardware_report": "csdc.backends.lava.plan",
    "export_bundle": "csdc.backends.lava.export",
}
_NEEDS_LAVA = {"csdc.backends.lava.backend", "csdc.backends.lava.builder"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'csdc.backends.lava' has no attribute '{name}'")
    if module in _NEEDS_LAVA:
        import_lava()
    return getattr(importlib.import_module(module), name)


__all__ = [
    "LavaBackend",
    "LavaGraph",
    "LavaUnavailableError",
    "build_process_graph",
    "export_bundle",
    "hardware_report",
    "import_lava",
    "make_plan",
    "run_graph",
]
