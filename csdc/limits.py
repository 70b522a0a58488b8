"""Resource limits checked before anything large is read or allocated (docs/robustness.md).

The memory budget bounds what one file may make csdc allocate: the decompressed size of a
``.sir`` archive's arrays, the activations of one sample of a network, a ``--data`` slice. The
default is half of what the machine (or the process's address-space limit, ``ulimit -v``)
offers; ``CSDC_MEMORY_BUDGET`` overrides it (bytes, or with a suffix K, M, G, T: ``4G``).
"""

from __future__ import annotations

import os
import re

from csdc.errors import CsdcError

BUDGET_ENV = "CSDC_MEMORY_BUDGET"
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'4G' -> 4 * 2**30; a plain number is bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if m is None:
        raise CsdcError(f"{BUDGET_ENV}={text!r} is not a size; use bytes or a suffix, e.g. 4G or 512M")
    value = int(float(m.group(1)) * _UNITS[m.group(2).upper()])
    if value < 1:
        raise CsdcError(f"{BUDGET_ENV}={text!r} must be positive")
    return value


def machine_memory() -> int:
    """Bytes the process can use: physical memory, capped by the address-space limit if one is set."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        total = 8 * 2**30
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_AS)
        if soft != resource.RLIM_INFINITY and soft > 0:
            total = min(total, soft)
    except (ImportError, ValueError, OSError):
        pass
    return int(total)


def memory_budget() -> int:
    """The memory budget in bytes: ``CSDC_MEMORY_BUDGET`` if set, else half of :func:`machine_memory`."""
    text = os.environ.get(BUDGET_ENV)
    if text:
        return parse_size(text)
    return machine_memory() // 2


def format_size(n: int) -> str:
    for unit in ("T", "G", "M", "K"):
        if n >= _UNITS[unit]:
            return f"{n / _UNITS[unit]:.1f} {unit}iB"
    return f"{n} B"


def check_budget(need: int, what: str, error: type[CsdcError] = CsdcError) -> None:
    """Raise ``error`` if ``need`` bytes exceed the memory budget; ``what`` names the culprit."""
    budget = memory_budget()
    if need > budget:
        raise error(f"{what} needs {format_size(need)}, more than the memory budget of {format_size(budget)} "
                        f"(set {BUDGET_ENV}, e.g. {BUDGET_ENV}=16G, to allow more)")
