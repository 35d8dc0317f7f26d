"""``CachedSentenceTransformer``: sentence-transformers' ``SentenceTransformer``, read through
an `embeddingcache.EmbeddingCache`.

    from embeddingcache.integrations.sentence_transformers import CachedSentenceTransformer

    model = CachedSentenceTransformer("all-MiniLM-L6-v2")  # was SentenceTransformer(...)
    model.encode(["a text"]), model.encode_query("a question")

``encode``, ``encode_query`` and ``encode_document`` take the arguments of sentence-transformers'
own methods that a cache can honour and return what they return: a 1-d result for a ``str``, a
2-d array (or tensor, or list of tensors) for a list. Each distinct text is computed once, by
the real model, and then read from the cache. Texts longer than the model accepts are truncated,
as the model does; outer whitespace is trimmed first (the cache's ``"strip"`` policy, which
leaves the tokens alone). Needs ``sentence-transformers`` (``embeddingcache[local]``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cache import EmbeddingCache
from ..errors import InvalidInputError
from ..models import resolve_model

if TYPE_CHECKING:
    import torch

__all__ = ["CachedSentenceTransformer"]

# Which of a model's prompts encode_document uses when the caller names none, in this order,
# as sentence-transformers' own encode_document does.
DOCUMENT_PROMPTS = ("document", "passage", "corpus")


class CachedSentenceTransformer:
    """A stand-in for ``SentenceTransformer(model_name_or_path)`` that caches every vector.

    Args:
        model_name_or_path: a catalog name, Hugging Face id or local model folder (see
            `embeddingcache.EmbeddingCache`).
        cache: an open cache to use; by default one is made from the model, ``device`` and
            ``cache_options`` (``cache_dir=``, ``db_url=``, ``remote_url=``...) and closed by
            `close`.
        device: where the model computes (``"cpu"``, ``"cuda"``...), and where tensors are
            returned.
        truncate_dim: keep the first ``truncate_dim`` dimensions of every vector (Matryoshka
            models), unless a call says otherwise.
    """

    def __init__(
        self,
        model_name_or_path: str,
        *,
        cache: EmbeddingCache | None = None,
        device: str | None = None,
        truncate_dim: int | None = None,
        **cache_options: Any,
    ) -> None:
        self._owned = cache is None
        self.cache = (
            cache
            if cache is not None
            else EmbeddingCache(model_name_or_path, device=device, **cache_options)
        )
        self.model_name_or_path = model_name_or_path
        self.device = device
        self.truncate_dim = truncate_dim
        self.prompts: Mapping[str, str] = _prompts(model_name_or_path)
        self._model: Any = None

    # -- encoding -------------------------------------------------------------------------

    def encode(
        self,
        inputs: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        batch_size: int = 32,
        show_progress_bar: bool | None = None,
        output_value: str | None = "sentence_embedding",
        precision: str = "float32",
        convert_to_numpy: bool = True,
        convert_to_tensor: bool = False,
        device: str | None = None,
        normalize_embeddings: bool = False,
        truncate_dim: int | None = None,
        **unsupported: Any,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """Embeddings of ``inputs``, as ``SentenceTransformer.encode`` returns them.

        A ``str`` gives one vector, a list one per text; ``convert_to_tensor`` gives a
        tensor, ``convert_to_numpy=False`` a list of tensors (one tensor for a ``str``).

        Raises:
            InvalidInputError: an argument a cache cannot honour (``output_value`` other than
                ``"sentence_embedding"``, ``precision`` other than ``"float32"``, a
                multi-process ``pool``...), or a text that is empty or whitespace only.
            InvalidInputTypeError: a text is not a ``str``.
        """
        _refuse(output_value, precision, unsupported)
        if prompt is not None:
            # sentence-transformers takes prompt over prompt_name when given both.
            prompt_name = None
        single = isinstance(inputs, str)
        dim = truncate_dim if truncate_dim is not None else self.truncate_dim
        if not single and len(inputs) == 0:
            return _empty(convert_to_numpy, convert_to_tensor)
        vectors = self.cache.get_embeddings(
            inputs,
            self.cache.model,
            batch_size=batch_size,
            show_progress=bool(show_progress_bar),
            normalize_embeddings=normalize_embeddings,
            dimensions=dim,
            truncate=True,
            prompt_name=prompt_name,
            prompt=prompt,
        )
        return self._convert(vectors, single, convert_to_numpy, convert_to_tensor, device)

    def encode_query(
        self,
        inputs: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        **options: Any,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """`encode` with the model's ``"query"`` prompt, unless another is named."""
        if prompt_name is None and prompt is None and "query" in self.prompts:
            prompt_name = "query"
        return self.encode(inputs, prompt_name, prompt, **options)

    def encode_document(
        self,
        inputs: str | Sequence[str],
        prompt_name: str | None = None,
        prompt: str | None = None,
        **options: Any,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        """`encode` with the model's ``"document"`` prompt (or ``"passage"``, ``"corpus"``),
        unless another is named."""
        if prompt_name is None and prompt is None:
            prompt_name = next((name for name in DOCUMENT_PROMPTS if name in self.prompts), None)
        return self.encode(inputs, prompt_name, prompt, **options)

    # -- what passes through to the model ----------------------------------------------------

    def get_sentence_embedding_dimension(self) -> int:
        """The dimension of the vectors `encode` returns (after ``truncate_dim``)."""
        return self._dimension(self.truncate_dim)

    get_embedding_dimension = get_sentence_embedding_dimension

    @property
    def max_seq_length(self) -> int:
        """The model's limit in tokens (read only: changing it would change cached vectors).
        Loads the model."""
        return int(self._sentence_transformer().max_seq_length)

    @property
    def tokenizer(self) -> Any:
        """The model's tokenizer. Loads the model."""
        return self._sentence_transformer().tokenizer

    def close(self) -> None:
        """Close the cache, if this object made it."""
        if self._owned:
            self.cache.close()

    def __enter__(self) -> CachedSentenceTransformer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CachedSentenceTransformer({self.model_name_or_path!r}, cache={self.cache!r})"

    # A copy (a Ray or Dask worker's) travels as its cache's configuration (see
    # `embeddingcache.travel`): the model it loaded for the tokenizer loads again where it
    # lands, if it is asked for there.
    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if k not in ("_model", "prompts")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _model=None, prompts=_prompts(state["model_name_or_path"]))

    # -- internals --------------------------------------------------------------------------

    def _dimension(self, truncate_dim: int | None) -> int:
        full = self.cache.dimension(self.cache.model)
        return min(full, truncate_dim) if truncate_dim is not None else full

    def _sentence_transformer(self) -> Any:
        if self._model is None:
            self._model = _load_sentence_transformer(self.cache.model, self.device)
        return self._model

    def _convert(
        self,
        vectors: np.ndarray,
        single: bool,
        convert_to_numpy: bool,
        convert_to_tensor: bool,
        device: str | None,
    ) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
        if not convert_to_tensor and convert_to_numpy:
            return vectors
        import torch

        tensor = torch.from_numpy(vectors)
        target = device or self.device
        if target is not None:
            tensor = tensor.to(target)
        if convert_to_tensor or single:
            return tensor
        return list(tensor.unbind(0))


def _empty(
    convert_to_numpy: bool, convert_to_tensor: bool
) -> np.ndarray | torch.Tensor | list[torch.Tensor]:
    """What sentence-transformers returns for no texts."""
    if convert_to_tensor:
        import torch

        return torch.tensor([])
    return np.array([]) if convert_to_numpy else []


def _refuse(output_value: str | None, precision: str, unsupported: Mapping[str, Any]) -> None:
    """Raise for what a cache of float32 sentence vectors cannot give."""
    if output_value != "sentence_embedding":
        raise InvalidInputError(
            f"output_value={output_value!r} is not cached; only 'sentence_embedding' is "
            "(use SentenceTransformer itself for token embeddings)"
        )
    if precision != "float32":
        raise InvalidInputError(
            f"precision={precision!r} is not supported; only 'float32' is (quantize the "
            "float32 vectors with sentence_transformers.quantization.quantize_embeddings)"
        )
    # The multi-process arguments mean nothing to a cache when they are left unset.
    named = sorted(
        k for k, v in unsupported.items() if not (k in ("pool", "chunk_size") and v is None)
    )
    if named:
        raise InvalidInputError(
            f"CachedSentenceTransformer.encode does not support {', '.join(named)}"
        )


def _prompts(model: str) -> Mapping[str, str]:
    """The model's prompts by name, as the cache applies them."""
    return resolve_model(model).prompts


def _load_sentence_transformer(model: str, device: str | None) -> Any:
    """The real ``SentenceTransformer`` of a model, for what only it knows (its tokenizer,
    its token limit)."""
    from sentence_transformers import SentenceTransformer

    from ..engines.sentence_transformers import loading_for

    loading = loading_for(resolve_model(model))
    return SentenceTransformer(
        loading.load_source(), device=device, trust_remote_code=loading.trust_remote_code
    )
