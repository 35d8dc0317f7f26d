"""Which of a model's prompts the framework adapters embed documents and queries with."""

from __future__ import annotations

from ..models import resolve_model


def document_and_query_prompts(model: str) -> tuple[str | None, str | None]:
    """The names of the model's document and query prompts; ``None`` where it has no such
    prompt (it then embeds documents and queries alike)."""
    prompts = resolve_model(model).prompts
    return (
        "document" if "document" in prompts else None,
        "query" if "query" in prompts else None,
    )
