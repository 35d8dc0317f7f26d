"""Providers compute the vectors the cache does not have: ``local`` (sentence-transformers)
and ``remote`` (an ``embeddingcache serve`` backend)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import numpy as np

from ..models import ModelSpec

__all__ = ["Provider"]


class Provider(Protocol):
    """Something that turns texts into float32 vectors of one model."""

    name: str

    def compute(
        self,
        spec: ModelSpec,
        texts: Sequence[str],
        *,
        prompt: str,
        batch_size: int,
        show_progress: bool,
        truncate: bool,
    ) -> np.ndarray:
        """Vectors of ``prompt + text`` for each text, as a float32 ``(n, dim)`` array.

        Raises:
            TextTooLongError: a text is longer than the model accepts and ``truncate`` is
                false; its ``index`` is the position in ``texts``.
            ProviderError: the provider could not compute; the next one may.
        """
        ...

    def close(self) -> None: ...
