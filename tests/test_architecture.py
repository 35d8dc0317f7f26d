"""The boundaries docs/architecture.md draws hold in the code."""

from __future__ import annotations

import ast
from collections.abc import Collection
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


EDGES = sorted(
    ["transfer.py", "cli.py"]
    + [p.relative_to(PACKAGE).as_posix() for p in (PACKAGE / "server").glob("*.py")]
)


@pytest.mark.parametrize("module", EDGES)
def test_the_edges_use_only_public_names_of_the_cache(module: str) -> None:
    """The server, import/export and the CLI go through the cache's and the pipeline's public
    calls, so that the pipeline may change inside without breaking them."""
    assert _private_uses(PACKAGE / module) == []


def test_the_check_finds_a_private_attribute(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f(cache):\n    return cache._resolve([])\n", encoding="utf-8")
    assert _private_uses(sample) == ["sample.py:2: ._resolve"]


# -- imports, function and class sizes -------------------------------------------------------

MAX_FUNCTION_LINES = 80
MAX_CLASS_LINES = 450
# A command line's option table and an app's route table read best as one list each.
LONG_FUNCTIONS = {"cli.py:_parser", "server/app.py:create_app"}


def _modules(root: Path) -> dict[str, tuple[Path, bool]]:
    """Each module of the package at ``root`` by dotted name, with its file and whether it is
    a package's ``__init__``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _imported(
    node: ast.Import | ast.ImportFrom, name: str, is_package: bool, modules: Collection[str]
) -> set[str]:
    """The dotted names an import statement in module ``name`` reaches."""
    if isinstance(node, ast.Import):
        return {alias.name for alias in node.names}
    if node.level == 0:
        base = node.module or ""
    else:
        # One dot is the module's own package (a package's __init__ is its own); each
        # further dot goes one package up.
        here = name.split(".") if is_package else name.split(".")[:-1]
        here = here[: len(here) - (node.level - 1)]
        base = ".".join([*here, node.module] if node.module else here)
    # `from X import y` imports the submodule X.y when there is one, else a name of X.
    return {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}


def import_graph(root: Path) -> dict[str, set[str]]:
    """Which of the package's modules each module imports: every import statement counts,
    those under ``if TYPE_CHECKING:`` and inside functions included. Importing a submodule
    is not counted as importing the packages above it (which Python imports first)."""
    modules = _modules(root)
    graph: dict[str, set[str]] = {}
    for name, (path, is_package) in modules.items():
        graph[name] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import | ast.ImportFrom):
                reached = _imported(node, name, is_package, modules)
                graph[name].update(r for r in reached if r in modules and r != name)
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The groups of modules that import each other, directly or through others (the
    strongly connected components of more than one module), sorted."""
    reach = {}
    for start in graph:
        seen, todo = set(), list(graph[start])
        while todo:
            module = todo.pop()
            if module not in seen:
                seen.add(module)
                todo.extend(graph[module])
        reach[start] = seen
    groups = {
        tuple(sorted(m for m in graph if m in reach[start] and start in reach[m]))
        for start in graph
        if start in reach[start]
    }
    return sorted(list(group) for group in groups)


def _definitions(root: Path) -> list[tuple[str, ast.AST, int]]:
    """Every function and class of the package at ``root``, nested ones included, as
    ``(file:qualified name, node, lines from its ``def`` or ``class`` to its end)``."""
    found: list[tuple[str, ast.AST, int]] = []

    def visit(node: ast.AST, where: str, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                name = prefix + child.name
                lines = (child.end_lineno or child.lineno) - child.lineno + 1
                found.append((f"{where}:{name}", child, lines))
                visit(child, where, name + ".")
            else:
                visit(child, where, prefix)

    for path in sorted(root.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        visit(tree, path.relative_to(root).as_posix(), "")
    return found


def long_functions(root: Path, limit: int = MAX_FUNCTION_LINES) -> set[str]:
    return {
        name
        for name, node, lines in _definitions(root)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and lines > limit
    }


def long_classes(root: Path, limit: int = MAX_CLASS_LINES) -> set[str]:
    return {
        name
        for name, node, lines in _definitions(root)
        if isinstance(node, ast.ClassDef) and lines > limit
    }


def test_no_module_of_the_package_imports_itself_through_others() -> None:
    """The package has no import cycle, type-only and function-local imports included."""
    assert import_cycles(import_graph(PACKAGE)) == []


def test_no_function_is_over_80_lines() -> None:
    """Every function of the package is at most 80 lines, but the two tables named above."""
    assert long_functions(PACKAGE) - LONG_FUNCTIONS == set()


def test_no_class_is_over_450_lines() -> None:
    """Every class of the package is at most 450 lines."""
    assert long_classes(PACKAGE) == set()


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text, encoding="utf-8")


def test_the_graph_resolves_each_form_of_relative_import(tmp_path: Path) -> None:
    """Each form of relative import reaches the module it names, wherever it stands."""
    _write(
        tmp_path / "pkg",
        {
            "__init__.py": "from .a import A\n",
            "a.py": "from . import b\nA = 1\n",
            "b.py": "def f():\n    from .sub.c import C\n",
            "sub/__init__.py": "from .. import b\n",
            "sub/c.py": "if TYPE_CHECKING:\n    from ..a import A\nfrom . import d\nC = 1\n",
            "sub/d.py": "import pkg.a\nfrom pkg.sub import c\nfrom .. import A\n",
        },
    )
    assert import_graph(tmp_path / "pkg") == {
        "pkg": {"pkg.a"},
        "pkg.a": {"pkg.b"},
        "pkg.b": {"pkg.sub.c"},
        "pkg.sub": {"pkg.b"},
        "pkg.sub.c": {"pkg.a", "pkg.sub.d"},
        "pkg.sub.d": {"pkg", "pkg.a", "pkg.sub.c"},
    }


def test_the_check_finds_a_planted_cycle(tmp_path: Path) -> None:
    """A cycle closed by type-only and function-local imports is found; without it, none is."""
    files = {
        "__init__.py": "",
        "a.py": "from .sub import b\n",
        "sub/__init__.py": "",
        "sub/b.py": "if TYPE_CHECKING:\n    from ..c import C\n",
        "c.py": "C = 1\ndef f():\n    from . import a\n",
        "d.py": "from . import a\n",
    }
    _write(tmp_path / "pkg", files)
    assert import_cycles(import_graph(tmp_path / "pkg")) == [["pkg.a", "pkg.c", "pkg.sub.b"]]
    _write(tmp_path / "pkg", {"c.py": "C = 1\n"})
    assert import_cycles(import_graph(tmp_path / "pkg")) == []


def _function(name: str, lines: int, indent: str = "") -> str:
    """The source of a function ``lines`` long, its ``def`` line included."""
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(lines - 1))
    return f"{indent}def {name}():\n{body}"


def test_the_checks_find_a_planted_long_function_and_class(tmp_path: Path) -> None:
    """A function or class one line over its limit is found, nested or not; one at it is not."""
    source = _function("fits", 80) + "class K:\n" + _function("long", 81, "    ")
    _write(tmp_path / "pkg", {"__init__.py": "", "m.py": source})
    assert long_functions(tmp_path / "pkg") == {"m.py:K.long"}
    assert long_classes(tmp_path / "pkg", limit=81) == {"m.py:K"}
    assert long_classes(tmp_path / "pkg", limit=82) == set()
