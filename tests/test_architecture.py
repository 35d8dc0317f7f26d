"""The boundaries docs/architecture.md draws hold in the code."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "embeddingcache"


def _private_uses(path: Path) -> list[str]:
    """``x._name`` attribute uses in a module where ``x`` is not ``self`` or ``cls`` (a
    module's own private helpers, called by bare name, are fine)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Attribute):
            continue
        name = node.attr
        if not name.startswith("_") or (name.startswith("__") and name.endswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and owner.id in {"self", "cls", "sys"}:
            continue  # its own state; sys._getframe is the stdlib's
        found.append(f"{path.name}:{node.lineno}: .{name}")
    return found


@pytest.mark.parametrize("module", ["server.py", "transfer.py", "cli.py"])
def test_the_edges_use_only_public_names_of_the_cache(module: str) -> None:
    """The server, import/export and the CLI go through the cache's and the pipeline's public
    calls, so that the pipeline may change inside without breaking them."""
    assert _private_uses(PACKAGE / module) == []


def test_the_check_finds_a_private_attribute(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f(cache):\n    return cache._resolve([])\n", encoding="utf-8")
    assert _private_uses(sample) == ["sample.py:2: ._resolve"]
