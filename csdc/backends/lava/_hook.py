"""Import hook that makes lava-nc 0.10.0 importable on Python 3.11 (standard library only).

This file is also copied verbatim into Lava deployment bundles, so it imports nothing from
csdc. See :mod:`csdc.backends.lava.compat` (and docs/lava.md) for the why and the how:
lava-nc 0.10.0's ``lava.magma.compiler.var_model`` uses dataclass instances as dataclass
field defaults (``x: ByteEncoder = ByteEncoder()``), which Python 3.11 rejects; the finder
below rewrites exactly those defaults to ``field(default_factory=...)`` (the upstream fix)
while that one module is imported, without touching any installed file.
"""

from __future__ import annotations

import ast
import contextlib
import importlib.abc
import importlib.machinery
import importlib.util
import multiprocessing
import sys
import types
from collections.abc import Iterator, Sequence
from typing import ClassVar

#: The single module the hook rewrites.
TARGET_MODULE = "lava.magma.compiler.var_model"


# -- the source rewrite --------------------------------------------------------------
def _is_dataclass_decorator(node: ast.expr) -> bool:
    """``@dataclass``, ``@dataclasses.dataclass`` or the same called with arguments."""
    target = node.func if isinstance(node, ast.Call) else node
    return (isinstance(target, ast.Name) and target.id == "dataclass") or (
        isinstance(target, ast.Attribute) and target.attr == "dataclass"
    )


def _is_frozen(node: ast.expr) -> bool:
    if not isinstance(node, ast.Call):
        return False
    return any(kw.arg == "frozen" and isinstance(kw.value, ast.Constant) and kw.value.value is True
               for kw in node.keywords)


def _mutable_dataclass_names(tree: ast.Module) -> set[str]:
    """Top-level classes decorated as non-frozen dataclasses: their instances are unhashable
    (``eq=True`` without ``frozen`` sets ``__hash__ = None``), so 3.11 rejects them as defaults."""
    names = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef):
            decos = [d for d in node.decorator_list if _is_dataclass_decorator(d)]
            if decos and not any(_is_frozen(d) for d in decos):
                names.add(node.name)
    return names


class _DefaultFactoryRewriter(ast.NodeTransformer):
    """Rewrite ``name: T = C(...)`` in dataclass bodies to ``name: T = field(default_factory=...)``
    when ``C`` is one of ``mutable`` (dataclasses of the same module)."""

    FIELD_ALIAS = "_csdc_compat_dataclass_field"

    def __init__(self, mutable: set[str]):
        self.mutable = mutable
        self.rewritten: list[str] = []

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.ClassDef:
        if not any(_is_dataclass_decorator(d) for d in node.decorator_list):
            return node
        for stmt in node.body:
            value = stmt.value if isinstance(stmt, ast.AnnAssign) else None
            if (isinstance(value, ast.Call) and isinstance(value.func, ast.Name)
                    and value.func.id in self.mutable and isinstance(stmt.target, ast.Name)):
                if value.args or value.keywords:
                    factory: ast.expr = ast.Lambda(
                        args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[], kw_defaults=[], defaults=[]),
                        body=value)
                else:
                    factory = ast.Name(id=value.func.id, ctx=ast.Load())
                stmt.value = ast.Call(
                    func=ast.Name(id=self.FIELD_ALIAS, ctx=ast.Load()), args=[],
                    keywords=[ast.keyword(arg="default_factory", value=factory)])
                self.rewritten.append(f"{node.name}.{stmt.target.id}")
        return node


def rewrite_mutable_defaults(source: str, filename: str) -> tuple[ast.Module, list[str]]:
    """Parse ``source`` and apply the upstream fix; returns the tree and the rewritten
    ``Class.field`` names (empty when the source needs no fix, and the tree is then unchanged)."""
    tree = ast.parse(source, filename=filename)
    rewriter = _DefaultFactoryRewriter(_mutable_dataclass_names(tree))
    tree = rewriter.visit(tree)
    if rewriter.rewritten:
        imp = ast.ImportFrom(module="dataclasses",
                             names=[ast.alias(name="field", asname=_DefaultFactoryRewriter.FIELD_ALIAS)], level=0)
        # after the docstring and any ``from __future__`` imports, which must stay first
        pos = 0
        while pos < len(tree.body) and (
            (isinstance(tree.body[pos], ast.Expr) and isinstance(getattr(tree.body[pos], "value", None), ast.Constant))
            or (isinstance(tree.body[pos], ast.ImportFrom) and tree.body[pos].module == "__future__")
        ):
            pos += 1
        tree.body.insert(pos, imp)
        ast.fix_missing_locations(tree)
    return tree, rewriter.rewritten


# -- the import hook -----------------------------------------------------------------
class _PatchedVarModelLoader(importlib.machinery.SourceFileLoader):
    """Loads the target module from its installed source with the rewrite applied."""

    rewritten: ClassVar[list[str]] = []  # Class.field names rewritten by the last load

    def get_code(self, fullname: str) -> types.CodeType:
        # Always compile from source: a cached .pyc holds the unfixed module.
        path = self.get_filename(fullname)
        source = importlib.util.decode_source(self.get_data(path))
        tree, rewritten = rewrite_mutable_defaults(source, path)
        type(self).rewritten = rewritten
        return compile(tree, path, "exec", dont_inherit=True)

    def set_data(self, path: str, data: bytes, *, _mode: int = 0o666) -> None:
        """Never write bytecode next to the installed file."""


class LavaCompatFinder(importlib.abc.MetaPathFinder):
    """Meta-path finder that claims only :data:`TARGET_MODULE`."""

    def find_spec(self, fullname: str, path: Sequence[str] | None, target: types.ModuleType | None = None):
        if fullname != TARGET_MODULE:
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec  # not installed, or not a plain source file: leave it to the normal machinery
        loader = _PatchedVarModelLoader(fullname, spec.origin)
        return importlib.util.spec_from_file_location(fullname, spec.origin, loader=loader,
                                                      submodule_search_locations=None)


def hook_needed() -> bool:
    """The 3.11 dataclass check is what breaks lava 0.10.0; older Pythons need no hook."""
    return sys.version_info >= (3, 11)


def install() -> bool:
    """Insert the finder at the front of ``sys.meta_path`` (idempotent). Returns whether the
    hook is installed. Must run before anything imports ``lava.magma.compiler``."""
    if not hook_needed():
        return False
    if not any(isinstance(f, LavaCompatFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, LavaCompatFinder())
    return True


def uninstall() -> None:
    """Remove the finder (modules already imported stay imported)."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, LavaCompatFinder)]


@contextlib.contextmanager
def tolerate_same_start_method() -> Iterator[None]:
    """Let lava's import-time ``multiprocessing.set_start_method('fork')`` succeed when 'fork'
    is already in effect.

    Lava 0.10 calls it unconditionally when ``lava.magma.runtime.message_infrastructure.
    multiprocessing`` is imported, and the standard library raises "context has already been
    set" as soon as anything created a multiprocessing object before (a Queue, a tqdm progress
    bar, ...), even if that fixed the very same method. While the context is active, a request
    for the method already in effect is a no-op; a different method still raises. The original
    function is restored on exit."""
    original = multiprocessing.set_start_method

    def set_start_method(method: str, force: bool = False) -> None:
        if not force and multiprocessing.get_start_method(allow_none=True) == method:
            return
        original(method, force=force)

    multiprocessing.set_start_method = set_start_method  # type: ignore[assignment]
    try:
        yield
    finally:
        multiprocessing.set_start_method = original  # type: ignore[assignment]


def prepare_lava() -> None:
    """Install the finder and import lava's multiprocessing runtime (which fixes the 'fork'
    start method) under :func:`tolerate_same_start_method`. Call before importing lava."""
    install()
    with tolerate_same_start_method():
        importlib.import_module("lava.magma.runtime.message_infrastructure.multiprocessing")
