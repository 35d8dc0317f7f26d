"""A column of vectors for a batch of rows: what Ray Data's ``map_batches`` and Dask's
``map_partitions`` call.

    embed = EmbedColumn(cache, column="text")   # cache: an EmbeddingCache
    batch = embed(batch)                        # batch["embedding"]: one vector a row

A batch is a dict of numpy arrays (Ray's ``"numpy"`` format), a pandas ``DataFrame`` or a
pyarrow ``Table``; the result is the same kind with the vectors added as ``output_column``: a
2-d float32 array in a dict, a column of 1-d arrays in a ``DataFrame``, a fixed-size list
column in a ``Table``. Rows keep their order. Each callable pickles as its cache's
configuration (see `embeddingcache.travel`), so it travels to the workers as it is, and
every copy that lands in one process shares one open cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..cache import EmbeddingCache
from ..errors import InvalidInputError, InvalidInputTypeError

if TYPE_CHECKING:
    from typing_extensions import Unpack

    from ..options import CallOptions

__all__ = ["EmbedColumn", "EmbedTexts"]


class EmbedTexts:
    """Vectors of a sequence of texts, as a ``(n, dim)`` float32 array: ``get_embeddings``
    with the options given once (``model``, ``prompt_name``, ``truncate``...), as a callable
    that travels (a Dask bag's partition is a list of texts).

    Args:
        cache: the cache, built on the driver: it travels as its configuration.
        model: the model of these calls (the cache's own by default).
        options: `EmbeddingCache.get_embeddings`' options, but ``output``.
    """

    def __init__(
        self, cache: EmbeddingCache, model: str | None = None, **options: Unpack[CallOptions]
    ) -> None:
        if not isinstance(cache, EmbeddingCache):
            raise InvalidInputTypeError(f"cache must be an EmbeddingCache, not {cache!r}")
        if "output" in options:
            raise InvalidInputError("the vectors are a numpy array; output= is not an option here")
        self.cache = cache
        self.model = model
        self.options: dict[str, Any] = dict(options)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        if not isinstance(texts, (list, tuple)):
            texts = list(texts)
        vectors: np.ndarray = self.cache.get_embeddings(texts, self.model, **self.options)
        return vectors

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.cache!r}, model={self.model!r})"


class EmbedColumn(EmbedTexts):
    """Add a column of vectors to a batch of rows, from its column of texts.

    Args:
        cache: the cache, built on the driver: it travels as its configuration.
        column: the column of texts.
        output_column: the column of vectors it adds (or replaces).
        model, options: as `EmbedTexts`.

    Raises (when called):
        InvalidInputError: the batch has no such column, or a text is empty or ``None``
            (the message names its row in the batch).
        InvalidInputTypeError: the batch is none of the kinds above.
    """

    def __init__(
        self,
        cache: EmbeddingCache,
        *,
        column: str = "text",
        output_column: str = "embedding",
        model: str | None = None,
        **options: Unpack[CallOptions],
    ) -> None:
        super().__init__(cache, model, **options)
        self.column = column
        self.output_column = output_column

    def __call__(self, batch: Any) -> Any:
        if isinstance(batch, Mapping):
            out = dict(batch)
            out[self.output_column] = super().__call__(_texts(batch, self.column))
            return out
        kind = type(batch).__module__.split(".")[0]
        if kind == "pandas":
            vectors = super().__call__(_texts(batch, self.column))
            return batch.assign(**{self.output_column: list(vectors)})
        if kind == "pyarrow":
            import pyarrow as pa

            vectors = super().__call__(_texts(batch, self.column))
            flat = pa.array(vectors.reshape(-1), type=pa.float32())
            listed = pa.FixedSizeListArray.from_arrays(flat, vectors.shape[1])
            if self.output_column in batch.column_names:
                batch = batch.drop_columns([self.output_column])
            return batch.append_column(self.output_column, listed)
        raise InvalidInputTypeError(
            "a batch must be a dict of numpy arrays, a pandas DataFrame or a pyarrow Table, "
            f"not {type(batch).__name__}"
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({self.cache!r}, column={self.column!r}, "
            f"output_column={self.output_column!r})"
        )


def _texts(batch: Any, column: str) -> list[str]:
    """The texts of a batch's column, as Python strings."""
    names = batch.column_names if hasattr(batch, "column_names") else list(batch.keys())
    if column not in names:
        raise InvalidInputError(f"the batch has no column {column!r}; its columns: {names}")
    values = batch[column]
    if hasattr(values, "to_pylist"):  # a pyarrow column
        texts: list[str] = values.to_pylist()
    elif hasattr(values, "tolist"):  # numpy, pandas
        texts = values.tolist()
    else:
        texts = list(values)
    return texts
