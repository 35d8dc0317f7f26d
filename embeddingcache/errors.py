"""The exceptions and warnings of embeddingcache.

Every error the library raises on purpose derives from `EmbeddingCacheError`.
Errors about the caller's input also derive from the built-in they refine, so that
``except ValueError`` keeps working:

    EmbeddingCacheError
    ├── InvalidInputError (ValueError)       empty, whitespace-only or None text, bad option,
    │                                        a key or token a header cannot carry
    │   └── TextTooLongError                 longer than the model accepts, truncate=False
    ├── InvalidInputTypeError (TypeError)    a text that is not a str
    ├── StorageError                         the cache database cannot be opened or written
    │   ├── ShardMismatchError               a shard belongs to another model
    │   └── DimensionMismatchError           a vector of another dimension than the shard's
    ├── BackupError                          a backup cannot be written or read, is not
    │                                        sound (refused whole), or would overwrite a cache
    └── ProviderError                        one provider could not compute
        ├── ModelLoadError                   the model could not be loaded
        └── AllProvidersFailedError          nobody could compute; says what was tried

    EmbeddingCacheWarning (UserWarning)      a repair: a file moved aside, a vector recomputed

Foreign exceptions (SQLAlchemy, torch, httpx, botocore) are translated where they enter the library,
with the original kept as ``__cause__``.
"""

from __future__ import annotations

__all__ = [
    "AllProvidersFailedError",
    "BackupError",
    "DimensionMismatchError",
    "EmbeddingCacheError",
    "EmbeddingCacheWarning",
    "InvalidInputError",
    "InvalidInputTypeError",
    "ModelLoadError",
    "ProviderError",
    "ShardMismatchError",
    "StorageError",
    "TextTooLongError",
]


class EmbeddingCacheError(Exception):
    """Base class of every error raised by embeddingcache."""


class InvalidInputError(EmbeddingCacheError, ValueError):
    """A text or an option has a value the library cannot use."""


class TextTooLongError(InvalidInputError):
    """A text has more tokens than the model accepts and truncation was not asked for.

    ``index`` is the position of the text in the caller's input; ``detail`` says by how much;
    ``tokens`` and ``limit``, where the engine counted them: the text's tokens and the most the
    model takes.
    """

    def __init__(
        self, detail: str, *, index: int, tokens: int | None = None, limit: int | None = None
    ) -> None:
        super().__init__(f"texts[{index}]: {detail}")
        self.detail = detail
        self.index = index
        self.tokens = tokens
        self.limit = limit

    def at(self, index: int) -> TextTooLongError:
        """The same error for the text at ``index`` of a longer input."""
        return TextTooLongError(self.detail, index=index, tokens=self.tokens, limit=self.limit)


class InvalidInputTypeError(EmbeddingCacheError, TypeError):
    """A text is not a ``str``."""


class StorageError(EmbeddingCacheError):
    """The cache database cannot be opened, read or written."""


class ShardMismatchError(StorageError):
    """A model shard records another model than the one asked for."""


class DimensionMismatchError(StorageError):
    """A vector's dimension differs from the one its model shard records."""


class BackupError(EmbeddingCacheError):
    """A backup could not be written or read (a folder, a bucket), a backup failed its
    checks (a file missing, truncated or damaged: nothing was restored), or a restore would
    overwrite a cache that holds files and was not told to."""


class ProviderError(EmbeddingCacheError):
    """A provider could not compute embeddings.

    ``reason`` says why; ``fix``, when known, what would make it work; ``backend_helps`` is
    false where a backend could not compute it either (a model name that does not exist);
    ``status`` the HTTP status of a server that refused, when one did.
    """

    status: int | None = None

    def __init__(self, reason: str, *, fix: str | None = None, backend_helps: bool = True) -> None:
        super().__init__(f"{reason}; to fix: {fix}" if fix else reason)
        self.reason = reason
        self.fix = fix
        self.backend_helps = backend_helps


class ModelLoadError(ProviderError):
    """The embedding model could not be loaded."""


class AllProvidersFailedError(ProviderError):
    """Every provider in the fallback chain failed; the message lists what was tried."""


class EmbeddingCacheWarning(UserWarning):
    """The cache repaired something: a damaged file moved aside, a damaged vector recomputed."""
