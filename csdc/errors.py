"""Error types. Every error csdc raises for bad input is a CsdcError: the CLI prints its
message (which names the culprit and the fix) and exits non-zero."""

from __future__ import annotations


class CsdcError(Exception):
    """Base class of the errors a user can cause; ``exit_code`` is what the CLI returns."""

    exit_code = 2


class UnsupportedModelError(CsdcError):
    """The ONNX model uses an op or a pattern that cannot be made spike-driven.

    ``problems`` lists every offending node at once, as (node, op_type, reason) tuples.
    """

    def __init__(self, path: str, problems: list[tuple[str, str, str]]):
        self.path = path
        self.problems = list(problems)
        lines = [f"{path}: {len(self.problems)} node(s) cannot be converted to a spiking network:"]
        for node, op_type, reason in self.problems:
            lines.append(f"  - node '{node}' (op {op_type}): {reason}")
        super().__init__("\n".join(lines))


class ModelFileError(CsdcError):
    """The model file is missing, unreadable or not a valid ONNX model."""


class SirFormatError(CsdcError):
    """A .sir file is missing, truncated, corrupted, tampered with or of an unknown version."""


class DataError(CsdcError):
    """A dataset is missing or does not match the network (shape, dtype, labels)."""


class BudgetError(CsdcError):
    """An integer quantity does not fit the bit budget of the hardware profile."""


class IRError(CsdcError):
    """The spiking IR is malformed (wrong edge kind, shape mismatch, bad parameter)."""



def lowering_node(exc: BaseException) -> str | None:
    """The source (ONNX) node being lowered when ``exc`` was raised, if a frame of its traceback belongs to
    an object that records one (``current_node``, as the lowering does); the innermost such frame wins."""
    node = None
    tb = exc.__traceback__
    while tb is not None:
        current = getattr(tb.tb_frame.f_locals.get("self"), "current_node", None)
        if isinstance(current, str) and current:
            node = current
        tb = tb.tb_next
    return node


def in_model(exc: CsdcError, model: str) -> CsdcError:
    """``exc`` with its message prefixed by the model file and, where known, the ONNX node being lowered
    (errors raised below the passes, e.g. by the IR's checks, name only IR nodes). Errors that already
    name the model are returned unchanged."""
    msg = str(exc)
    if msg.startswith(model) or isinstance(exc, UnsupportedModelError):
        return exc
    node = lowering_node(exc)
    where = f"{model}: " + (f"node '{node}': " if node and not node.startswith("<") else "")
    try:
        out = type(exc)(where + msg)
    except TypeError:  # an error class with its own constructor
        out = CsdcError(where + msg)
    out.exit_code = exc.exit_code
    return out
