"""Keys, normalization policies and slugs."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from embeddingcache.keys import key_of, keys_of, model_slug, normalize_text
from embeddingcache.models import CATALOG, resolve_model


@pytest.mark.parametrize(
    ("policy", "text", "expected"),
    [
        ("strip", "  Hello World \n", "Hello World"),
        ("strip", "\u3000ideographic space\u3000", "ideographic space"),
        ("lower", "  Hello World \n", "hello world"),
        ("none", "  Hello World \n", "  Hello World \n"),
    ],
)
def test_normalization_policies(policy: str, text: str, expected: str) -> None:
    assert normalize_text(text, policy) == expected
    assert normalize_text(expected, policy) == expected  # idempotent


def test_the_key_is_the_raw_sha512_digest_of_the_utf8_string() -> None:
    text = "naïve café 🍵"
    assert key_of(text) == hashlib.sha512(text.encode("utf-8")).digest()
    assert len(key_of(text)) == 64
    assert keys_of([text, "b"]) == [key_of(text), key_of("b")]


def test_keys_are_stable_across_processes() -> None:
    code = "from embeddingcache.keys import key_of; print(key_of('stable ✓').hex())"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert out == key_of("stable ✓").hex()


def test_a_clean_name_is_its_own_slug() -> None:
    assert model_slug("nomic-embed-text-v2") == "nomic-embed-text-v2"
    assert model_slug("e5.small_v2") == "e5.small_v2"


@pytest.mark.parametrize(
    "name",
    [
        "../../etc/passwd",
        "/absolute/path/model",
        "..",
        ".hidden",
        "a/../../b",
        "C:\\Windows\\model",
        "x" * 5000,
        "nul",
        "hashstring",
        "CON",
        "🙂 emoji model",
    ],
)
def test_a_slug_is_a_safe_bounded_file_name(name: str) -> None:
    slug = model_slug(name)
    assert "/" not in slug and "\\" not in slug and "\x00" not in slug
    assert ".." not in slug
    assert not slug.startswith(".")
    assert 0 < len(slug) <= 80
    assert slug.split(".")[0] not in {"hashstring", "nul", "con"}


def test_names_differing_only_in_case_or_punctuation_get_different_slugs() -> None:
    names = ["Org/Model", "org/model", "org_model", "org-model", "org model", "org.model!"]
    assert len({model_slug(n) for n in names}) == len(names)


def test_catalog_names_and_aliases_resolve_to_one_spec() -> None:
    minilm = CATALOG["all-MiniLM-L6-v2"]
    assert resolve_model("sentence-transformers/all-MiniLM-L6-v2") is minilm
    assert resolve_model("all-minilm-l6-v2") is minilm
    assert model_slug("all-MiniLM-L6-v2") == "all-minilm-l6-v2"
    nomic = resolve_model("nomic-embed-text-v2")
    assert resolve_model("nomic-ai/nomic-embed-text-v2-moe") is nomic
    assert nomic.dimension == 768 and nomic.engine == "sentence-transformers"
    assert nomic.prompt(None) == "search_document: "
    assert nomic.prompt("query") == "search_query: "


def test_a_local_folder_is_named_by_its_absolute_path(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pathlib import Path

    folder = Path(str(tmp_path)) / "my-model"
    folder.mkdir()
    monkeypatch.chdir(str(tmp_path))
    assert resolve_model("./my-model").name == str(folder.resolve())
    assert resolve_model("some-org/some-model").name == "some-org/some-model"


def test_a_folder_name_follows_its_symlink_working_directory_and_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each spec of a folder is remembered by its name (resolving a path is most of a cached
    text's time), and resolved again whenever the name reaches another directory."""
    first, second = tmp_path / "v1", tmp_path / "v2"
    for folder in (first, second):
        (folder / "model").mkdir(parents=True)
    link = tmp_path / "current"
    link.symlink_to(first)
    assert resolve_model(str(link)).name == str(first)
    assert resolve_model(str(link)) is resolve_model(str(link))
    link.unlink()
    link.symlink_to(second)
    assert resolve_model(str(link)).name == str(second)

    monkeypatch.chdir(first)
    assert resolve_model("model").name == str(first / "model")
    monkeypatch.chdir(second)
    assert resolve_model("model").name == str(second / "model")

    (second / "model" / "config_sentence_transformers.json").write_text(
        '{"prompts": {"query": "q: "}}', encoding="utf-8"
    )
    assert resolve_model("model").prompt("query") == "q: "
    shutil.rmtree(second / "model")
    assert resolve_model("model").name == "model"  # no such folder: a Hub id
