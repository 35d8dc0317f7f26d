"""LangChain's own standard tests (langchain-tests), run against CachedEmbeddings."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_tests", reason="langchain-tests is not installed")

from langchain_tests.integration_tests import EmbeddingsIntegrationTests
from langchain_tests.unit_tests import EmbeddingsUnitTests

from embeddingcache.integrations.langchain import CachedEmbeddings


class CachedEmbeddingsParams:
    """The adapter, made from the tiny model in a fresh cache directory for each test."""

    @pytest.fixture(autouse=True)
    def _model_folder(self, prompted_model: str, cache_dir: Path) -> None:
        self._params = {"model": prompted_model, "cache_dir": cache_dir, "device": "cpu"}

    @property
    def embeddings_class(self) -> type[CachedEmbeddings]:
        return CachedEmbeddings

    @property
    def embedding_model_params(self) -> dict[str, Any]:
        return self._params

    @pytest.fixture
    def model(self) -> Iterator[CachedEmbeddings]:
        embeddings = CachedEmbeddings(**self._params)
        yield embeddings
        embeddings.close()


class TestCachedEmbeddingsUnit(CachedEmbeddingsParams, EmbeddingsUnitTests):
    @property
    def init_from_env_params(self) -> tuple[dict[str, str], dict[str, Any], dict[str, Any]]:
        # The cache reads its directory and model from the environment.
        return (
            {"EMBEDDING_CACHE_MODEL": self._params["model"]},
            {"cache_dir": self._params["cache_dir"], "device": "cpu"},
            {"model": self._params["model"]},
        )


class TestCachedEmbeddingsIntegration(CachedEmbeddingsParams, EmbeddingsIntegrationTests):
    pass
