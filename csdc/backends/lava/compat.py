"""Make lava-nc 0.10.0 importable on Python 3.11 without touching its installed files.

Needed only when the Lava environment (:mod:`csdc.backends.lava.env`) had to be made with
Python 3.11 because no Python 3.10 was found; on 3.10 lava-nc installs and imports as is.

Why: lava-nc 0.10.0 declares ``Requires-Python <3.11``. The only thing that actually breaks
on 3.11 is one module, ``lava.magma.compiler.var_model``: three dataclasses there
(``CoreEncoder``, ``ChipEncoder``, ``AxonEncoder``) use an *instance* of the dataclass
``ByteEncoder`` as a field default (``x: ByteEncoder = ByteEncoder()``). Since Python 3.11,
``dataclasses`` rejects every unhashable default as mutable (before, it only rejected
list/dict/set), so importing that module -- and with it ``lava.magma.compiler``, i.e. all of
Lava's compiler and runtime -- raises ``ValueError: mutable default ... use default_factory``.
The upstream fix is ``x: ByteEncoder = field(default_factory=ByteEncoder)``.

How (:mod:`csdc.backends.lava._hook`, copied into every deployment bundle and installed by
the bundle's runtime before it imports lava): a :class:`sys.meta_path` finder in front of the
normal path finder claims exactly one module name, ``lava.magma.compiler.var_model``; every
other import falls through untouched. Its loader reads the installed source, parses it and
rewrites only class-body annotated assignments of a ``@dataclass`` class whose default is a
call of a non-frozen dataclass defined in the same module -- precisely the pattern 3.11
rejects -- into ``field(default_factory=...)``. The module is compiled from the rewritten tree
in memory (no ``.pyc`` is read or written), with its real ``__file__``. If lava is fixed
upstream the rewrite finds nothing and changes nothing. On Python < 3.11 the hook does nothing.

csdc itself never imports lava: :class:`LavaUnavailableError` is what the Lava backend raises
when its environment is missing or broken.
"""

from __future__ import annotations

from csdc.backends.lava._hook import (
    TARGET_MODULE,
    LavaCompatFinder,
    hook_needed,
    install,
    prepare_lava,
    rewrite_mutable_defaults,
    tolerate_same_start_method,
    uninstall,
)
from csdc.errors import CsdcError

INSTALL_HINT = "create the Lava environment with `csdc lava-env` (see docs/lava.md)"


class LavaUnavailableError(CsdcError, ImportError):
    """The Lava environment is missing, broken, or cannot be made."""


__all__ = [
    "INSTALL_HINT",
    "TARGET_MODULE",
    "LavaCompatFinder",
    "LavaUnavailableError",
    "hook_needed",
    "install",
    "prepare_lava",
    "rewrite_mutable_defaults",
    "tolerate_same_start_method",
    "uninstall",
]
