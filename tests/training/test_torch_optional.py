"""PyTorch is optional: only csdc/training may import it, and importing csdc.training
without it says how to install it."""

from __future__ import annotations

import ast
import importlib
import os
import sys
from pathlib import Path

import pytest

import csdc

PKG = os.path.dirname(os.path.abspath(csdc.__file__))


def _imports_torch(path: str) -> bool:
    tree = ast.parse(Path(path).read_text(encoding="utf-8"), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            if any(a.name == "torch" or a.name.startswith("torch.") for a in node.names):
                return True
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and (node.module == "torch" or node.module.startswith("torch."))
        ):
            return True
    return False


def test_only_csdc_training_imports_torch() -> None:
    offenders = []
    for root, _, files in os.walk(PKG):
        rel = os.path.relpath(root, PKG)
        if rel == "training" or rel.startswith("training" + os.sep):
            continue
        for f in files:
            if f.endswith(".py") and _imports_torch(os.path.join(root, f)):
                offenders.append(os.path.relpath(os.path.join(root, f), PKG))
    assert not offenders, f"torch imported outside csdc/training: {offenders}"


def test_import_without_torch_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name == "csdc.training" or name.startswith("csdc.training."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` fail
    with pytest.raises(ImportError, match=r"pip install csdc\[torch\]"):
        importlib.import_module("csdc.training")
