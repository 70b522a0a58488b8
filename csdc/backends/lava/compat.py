"""Make lava-nc 0.10.0 importable on Python 3.11 without touching its installed files.

Why: lava-nc 0.10.0 declares ``Requires-Python <3.11``. The only thing that actually breaks
on 3.11 is one module, ``lava.magma.compiler.var_model``: three dataclasses there
(``CoreEncoder``, ``ChipEncoder``, ``AxonEncoder``) use an *instance* of the dataclass
``ByteEncoder`` as a field default (``x: ByteEncoder = ByteEncoder()``). Since Python 3.11,
``dataclasses`` rejects every unhashable default as mutable (before, it only rejected
list/dict/set), so importing that module -- and with it ``lava.magma.compiler``, i.e. all of
Lava's compiler and runtime -- raises ``ValueError: mutable default ... use default_factory``.
The upstream fix is ``x: ByteEncoder = field(default_factory=ByteEncoder)``.

How (:mod:`csdc.backends.lava._hook`): :func:`install` puts a :class:`sys.meta_path` finder
in front of the normal path finder. It claims exactly one module name,
``lava.magma.compiler.var_model``; every other import falls through untouched. Its loader
reads the installed source, parses it and rewrites only class-body annotated assignments of a
``@dataclass`` class whose default is a call of a non-frozen dataclass defined in the same
module -- precisely the pattern 3.11 rejects -- into ``field(default_factory=...)``. The module
is compiled from the rewritten tree in memory (no ``.pyc`` is read or written, so a cache
compiled from the original source is never used), with its real ``__file__`` so tracebacks
point at the installed file. If lava is fixed upstream the rewrite finds nothing and changes
nothing. On Python < 3.11 the hook is not needed and :func:`install` does nothing.

:func:`import_lava` installs the hook and imports the parts of lava csdc uses; it raises
:class:`LavaUnavailableError` (a :class:`csdc.errors.CsdcError` and an ``ImportError``) with
install instructions when lava-nc is missing or still fails to import.
"""

from __future__ import annotations

import multiprocessing
import sys
import types

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

INSTALL_HINT = (
    "install lava-nc 0.10.0 without its Python pin: "
    "`pip install --no-deps --ignore-requires-python lava-nc==0.10.0` plus its dependencies "
    "`pip install \"numpy>=1.24.4,<2\" \"networkx<=2.8.7\" \"scipy>=1.10.1,<2\" \"scikit-learn>=1.5,<2\" "
    "\"asteval>=0.9.31,<0.10\"`; see docs/lava.md"
)


class LavaUnavailableError(CsdcError, ImportError):
    """lava-nc is not installed or cannot be imported in this environment."""


def import_lava() -> types.ModuleType:
    """Install the hook, import the lava modules csdc needs and return ``lava``.

    Lava's multiprocessing runtime calls ``multiprocessing.set_start_method('fork')`` at
    import time. That fails if anything created a multiprocessing object before (even with
    'fork' in effect): :func:`tolerate_same_start_method` makes the same-method call a no-op.
    Another start method already chosen gets a clear error instead of a RuntimeError from
    inside lava.
    """
    install()
    method = multiprocessing.get_start_method(allow_none=True)
    if method not in (None, "fork") and "lava.magma.runtime.message_infrastructure.multiprocessing" not in sys.modules:
        raise LavaUnavailableError(
            f"lava-nc needs the 'fork' multiprocessing start method, but '{method}' was already set in this "
            "process; import csdc.backends.lava before choosing another start method")
    try:
        import lava
        import lava.magma.compiler.var_model

        prepare_lava()  # lava's runtime sets the 'fork' start method at import
        import lava.magma.core.run_conditions
        import lava.magma.core.run_configs
        import lava.proc.dense.models
        import lava.proc.dense.process  # noqa: F401
    except ModuleNotFoundError as exc:
        if exc.name and exc.name.split(".")[0] == "lava":
            raise LavaUnavailableError(f"lava-nc is not installed ({exc}); {INSTALL_HINT}") from None
        raise LavaUnavailableError(
            f"lava-nc is installed but a dependency is missing ({exc}); {INSTALL_HINT}") from None
    except Exception as exc:  # lava failing to import is an environment problem: say so clearly
        raise LavaUnavailableError(
            f"lava-nc failed to import on Python {sys.version.split()[0]}: {type(exc).__name__}: {exc}; "
            f"{INSTALL_HINT}") from exc
    return sys.modules["lava"]


__all__ = [
    "INSTALL_HINT",
    "TARGET_MODULE",
    "LavaCompatFinder",
    "LavaUnavailableError",
    "hook_needed",
    "import_lava",
    "install",
    "prepare_lava",
    "rewrite_mutable_defaults",
    "tolerate_same_start_method",
    "uninstall",
]
