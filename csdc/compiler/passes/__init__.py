"""Compiler passes over the quantized graph. One pass per module; each is a function
``QGraph -> QGraph`` whose docstring states the invariant it establishes."""

from __future__ import annotations

from typing import Callable

from csdc.compiler.qgraph import QGraph
from csdc.errors import CsdcError

Pass = Callable[[QGraph], QGraph]


class PassError(CsdcError):
    """A pass failed; the message names the pipeline so far."""


def run_passes(graph: QGraph, passes: list[Pass], check: Callable[[QGraph, str], None] | None = None) -> QGraph:
    """Run ``passes`` in order; ``check(graph, pass_name)`` runs after each (tests use a verifier)."""
    done: list[str] = []
    for p in passes:
        graph = p(graph)
        done.append(p.__name__)
        if check is not None:
            try:
                check(graph, p.__name__)
            except CsdcError as exc:
                raise PassError(f"after passes [{', '.join(done)}]: {exc}") from None
    return graph
