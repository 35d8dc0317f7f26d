"""The documentation source holds together without building it (mkdocs is not installed here):
docs/api.md's directives name real objects and cover embeddingcache.__all__, mkdocs.yml's nav
names pages that exist, and the links between pages lead somewhere."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import re
import sys
import textwrap
import unicodedata
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import embeddingcache

ROOT = Path(__file__).resolve().parent.parent
MKDOCS = ROOT / "mkdocs.yml"
DOCS = ROOT / "docs"
API = DOCS / "api.md"

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
CODE_SPAN = re.compile(r"(`+).+?\1", re.DOTALL)
# [text](target) and ![alt](target), with an optional "title"; not the autorefs form [text][id].
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^#{1,6}[ \t]+(.+?)[ \t]*#*[ \t]*$", re.MULTILINE)


def _config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(MKDOCS.read_text(encoding="utf-8"))
    return config


def _handler_options() -> dict[str, Any]:
    """The options mkdocs.yml gives every mkdocstrings directive."""
    for plugin in _config()["plugins"]:
        if isinstance(plugin, dict) and "mkdocstrings" in plugin:
            options: dict[str, Any] = plugin["mkdocstrings"]["handlers"]["python"]["options"]
            return options
    raise AssertionError("mkdocs.yml configures no mkdocstrings plugin")


def _directives() -> list[tuple[str, dict[str, Any]]]:
    """Each ``::: dotted.path`` of docs/api.md, with the options indented below it."""
    lines = API.read_text(encoding="utf-8").splitlines()
    found = []
    for number, line in enumerate(lines):
        if not line.startswith(":::"):
            continue
        block = []
        for following in lines[number + 1 :]:
            if following.strip() and not following[0].isspace():
                break
            block.append(following)
        given = yaml.safe_load(textwrap.dedent("\n".join(block))) or {}
        found.append((line[3:].strip(), given.get("options") or {}))
    return found


DIRECTIVES = _directives()


def _resolve(path: str) -> Any:
    """The object a dotted path names: the longest importable module, then its attributes."""
    parts = path.split(".")
    for split in range(len(parts), 0, -1):
        module_name = ".".join(parts[:split])
        try:
            found: Any = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise  # the module exists but needs something that is not installed
            continue
        for name in parts[split:]:
            found = getattr(found, name)
        return found
    raise ModuleNotFoundError(f"no module in {path!r}")


def _resolve_or_skip(path: str) -> Any:
    try:
        return _resolve(path)
    except ModuleNotFoundError as exc:
        if exc.name and not exc.name.startswith("embeddingcache"):
            pytest.skip(f"{path} needs {exc.name}, which is not installed")
        raise


def _shown_members(target: Any, options: dict[str, Any]) -> list[str]:
    """The names a directive renders under a module or class: its ``members`` option, else
    the module's ``__all__``, else the public names the class itself defines."""
    if options.get("members"):
        return list(options["members"])
    if inspect.ismodule(target):
        return list(getattr(target, "__all__", [n for n in vars(target) if not n.startswith("_")]))
    return [name for name in vars(target) if not name.startswith("_")]


def _targets() -> Iterator[tuple[str, dict[str, Any], Any]]:
    """(path, options, object) of each directive that resolves here; the others fail
    test_each_directive_of_the_api_page_names_an_importable_object, or skip it."""
    for path, options in DIRECTIVES:
        try:
            target = _resolve(path)
        except (ImportError, AttributeError):
            continue
        yield path, options, target


def _documented_objects() -> list[Any]:
    """Every object docs/api.md renders: each directive's target and the members shown."""
    objects = []
    for _, options, target in _targets():
        objects.append(target)
        if inspect.ismodule(target) or inspect.isclass(target):
            objects.extend(getattr(target, name, None) for name in _shown_members(target, options))
    return objects


def _is_documented(obj: Any, documented: list[Any]) -> bool:
    return any(obj is other for other in documented)


def _pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def _prose(page: Path) -> str:
    """A page's Markdown without code blocks and code spans, where a link is only text."""
    return CODE_SPAN.sub("", FENCE.sub("", page.read_text(encoding="utf-8")))


def _headings(page: Path) -> set[str]:
    """The ids of a page's headings (a ``# comment`` in fenced code is no heading)."""
    return {_slug(text) for text in HEADING.findall(FENCE.sub("", page.read_text("utf-8")))}


def _slug(heading: str) -> str:
    """The id Python-Markdown's toc extension gives a heading (its default slugify)."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).replace("`", "").replace("*", "")
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode("ascii")
    text = re.sub(r"[^\w\s-]", "", text).strip().lower()
    return re.sub(r"[-\s]+", "-", text)


def _links() -> Iterator[tuple[Path, str]]:
    """(page, target) for each link from a docs page to a place inside the docs."""
    for page in _pages():
        for target in LINK.findall(_prose(page)):
            if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target):
                continue  # https:, mailto:...: not a page of this site
            yield page, target


def _nav_pages(nav: Any) -> Iterator[str]:
    """The pages a nav entry names, nested sections included, external URLs left out."""
    if isinstance(nav, str):
        if not re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", nav):
            yield nav
    elif isinstance(nav, list):
        for entry in nav:
            yield from _nav_pages(entry)
    elif isinstance(nav, dict):
        for value in nav.values():
            yield from _nav_pages(value)


def _classes_in(annotation: Any, module: str) -> list[type]:
    """The embeddingcache classes a (string) annotation names in the namespace of ``module``."""
    namespace = vars(sys.modules[module])
    found = []
    for name in re.findall(r"[A-Za-z_]\w*", str(annotation)):
        obj = namespace.get(name)
        if inspect.isclass(obj) and obj.__module__.startswith("embeddingcache"):
            found.append(obj)
    return found


@pytest.mark.parametrize("path", [path for path, _ in DIRECTIVES])
def test_each_directive_of_the_api_page_names_an_importable_object(path: str) -> None:
    """``::: path`` resolves by import and getattr, and so does each member it lists."""
    target = _resolve_or_skip(path)
    options = dict(DIRECTIVES)[path]
    for name in options.get("members") or []:
        assert hasattr(target, name), f"{path} has no member {name!r} to show"


def test_every_name_in_all_is_documented_on_the_api_page() -> None:
    """Each name of ``embeddingcache.__all__`` is a directive or a member one renders."""
    assert DIRECTIVES, "docs/api.md has no ::: directive"
    documented = _documented_objects()
    missing = [
        name
        for name in embeddingcache.__all__
        if f"embeddingcache.{name}" not in dict(DIRECTIVES)
        and not _is_documented(getattr(embeddingcache, name), documented)
    ]
    assert not missing, f"docs/api.md documents none of {missing}"


def test_every_public_method_of_a_documented_class_shows_on_the_api_page() -> None:
    """mkdocstrings hides members without a docstring unless ``show_if_no_docstring``."""
    defaults = _handler_options()
    hidden = []
    for path, options, target in _targets():
        if not inspect.isclass(target):
            continue
        if {**defaults, **options}.get("show_if_no_docstring", False):
            continue
        for name in _shown_members(target, options):
            member = inspect.getattr_static(target, name)
            if isinstance(member, (staticmethod, classmethod)):
                member = member.__func__
            if (inspect.isfunction(member) or isinstance(member, property)) and not (
                member.__doc__ or ""
            ).strip():
                hidden.append(f"{path}.{name}")
    assert not hidden, f"no docstring, so not rendered: {hidden}"


def test_every_report_a_public_method_returns_is_documented() -> None:
    """The embeddingcache classes that EmbeddingCache's methods return, and their fields'
    types, each have a directive (or are a member one renders)."""
    documented = _documented_objects()
    cache = embeddingcache.EmbeddingCache
    todo: list[type] = []
    members = {name: m for klass in reversed(cache.__mro__) for name, m in vars(klass).items()}
    for name, member in members.items():
        function = member.fget if isinstance(member, property) else member
        if name.startswith("_") or not inspect.isfunction(function):
            continue
        returned = inspect.signature(function).return_annotation
        todo.extend(_classes_in(returned, function.__module__))
    seen: set[type] = set()
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.add(cls)
        if dataclasses.is_dataclass(cls):
            for field in dataclasses.fields(cls):
                todo.extend(_classes_in(field.type, cls.__module__))
    missing = [
        f"{cls.__module__}.{cls.__qualname__}"
        for cls in seen
        if not _is_documented(cls, documented)
    ]
    assert seen, "no public method of EmbeddingCache returns an embeddingcache class"
    assert not missing, f"returned by a public method but not in docs/api.md: {missing}"


def test_every_page_in_the_nav_exists_in_docs() -> None:
    """Each page mkdocs.yml's nav names is a file under its docs_dir."""
    config = _config()
    assert (ROOT / config.get("docs_dir", "docs")).resolve() == DOCS
    pages = list(_nav_pages(config["nav"]))
    assert "api.md" in pages
    missing = [page for page in pages if not (DOCS / page).is_file()]
    assert not missing, f"mkdocs.yml's nav names pages docs/ lacks: {missing}"


def test_every_page_in_docs_is_in_the_nav() -> None:
    """A Markdown page left out of the nav would be built but reachable from no menu."""
    listed = {DOCS / page for page in _nav_pages(_config()["nav"])}
    orphans = [str(page.relative_to(ROOT)) for page in _pages() if page not in listed]
    assert not orphans, f"pages missing from mkdocs.yml's nav: {orphans}"


def test_every_relative_link_between_docs_pages_points_at_a_file_that_exists() -> None:
    """``[x](other.md)``, ``other.md#anchor`` and images resolve, from the linking page, to a
    file inside docs/ (MkDocs publishes nothing else: ../README.md would be a broken link)."""
    broken = []
    for page, target in _links():
        path = target.split("#", 1)[0]
        if not path:
            continue
        linked = (page.parent / path).resolve()
        if not linked.is_file() or not linked.is_relative_to(DOCS):
            broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to files that are not in docs/: {broken}"


def test_every_anchor_of_a_link_between_docs_pages_names_a_heading() -> None:
    """``other.md#anchor`` (or ``#anchor`` on the same page) names a heading of that page."""
    broken = []
    for page, target in _links():
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not anchor or linked.suffix != ".md" or not linked.is_file():
            continue
        if anchor in _headings(linked):
            continue
        if linked == API and any(anchor == p or anchor.startswith(f"{p}.") for p, _ in DIRECTIVES):
            continue  # mkdocstrings gives each object it renders its dotted path as id
        broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert not broken, f"links to headings that do not exist: {broken}"
