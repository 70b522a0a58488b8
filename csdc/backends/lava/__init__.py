"""Lava backend (lava-nc 0.10): the spiking IR as Lava processes for Loihi-style hardware.

lava-nc lives in an environment of its own (numpy < 2, networkx <= 2.8.7, Python 3.10;
:mod:`.env`, ``csdc lava-env``). csdc plans the processes here (pure numpy: ``make_plan``,
``hardware_report``), writes a self-contained deployment bundle (``export_bundle``) and
``LavaBackend`` runs the bundle with the Lava environment's Python in a subprocess, reading
back readouts, spike counts and trains. See docs/lava.md.
"""

from __future__ import annotations

import importlib
from typing import Any

from csdc.backends.lava.compat import LavaUnavailableError

_LAZY = {
    "LavaBackend": "csdc.backends.lava.backend",
    "make_plan": "csdc.backends.lava.plan",
    "hardware_report": "csdc.backends.lava.plan",
    "export_bundle": "csdc.backends.lava.export",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'csdc.backends.lava' has no attribute '{name}'")
    return getattr(importlib.import_module(module), name)


__all__ = ["LavaBackend", "LavaUnavailableError", "export_bundle", "hardware_report", "make_plan"]
