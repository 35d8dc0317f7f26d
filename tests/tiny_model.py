"""Build a tiny sentence-transformers model offline: random BERT weights, a generated vocabulary.

One token per character of a word (words up to 100 characters; longer ones are one [UNK]), so
that a token count is easy to reason about in tests: ``"x" * 62`` is 64 tokens with [CLS] and
[SEP], the model's limit.
"""

from __future__ import annotations

import os
import string
from pathlib import Path

MAX_SEQ_LENGTH = 64
DIMENSION = 32


def build_tiny_model(target: Path) -> Path:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.base.modules import Transformer
    from sentence_transformers.sentence_transformer.modules import Pooling
    from transformers import BertConfig, BertModel, BertTokenizerFast

    torch.manual_seed(1234)
    raw = target.parent / f"{target.name}-hf"
    raw.mkdir(parents=True, exist_ok=True)
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *chars, *("##" + c for c in chars)]
    tokenizer = BertTokenizerFast(
        vocab={token: i for i, token in enumerate(tokens)},
        do_lower_case=False,
        model_max_length=MAX_SEQ_LENGTH,
    )
    tokenizer.save_pretrained(str(raw))
    config = BertConfig(
        vocab_size=len(tokens),
        hidden_size=DIMENSION,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=MAX_SEQ_LENGTH,
    )
    BertModel(config).save_pretrained(str(raw))
    transformer = Transformer(str(raw), max_seq_length=MAX_SEQ_LENGTH)
    model = SentenceTransformer(modules=[transformer, Pooling(DIMENSION, "mean")], device="cpu")
    model.save(str(target))
    return target


STATIC_DIMENSION = 256
# The static model's words: the benchmarks' sentences and the tests' texts. Digits are one
# token each; any other word is [UNK].
STATIC_WORDS = (  # noqa: SIM905 (a sentence of words reads better than a list)
    "cache vector text model store query batch token shard hash river stone cloud green "
    "quick brown fox jumps over lazy dog light paper music garden window table market "
    "number line of the corpus cold hello world a an and is in to"
).split()


def build_static_model(target: Path) -> Path:
    """A sentence-transformers ``StaticEmbedding`` model (a bag of word vectors, tens of
    thousands of texts per second on one CPU, as a transformer on a GPU), built offline: a
    word-level tokenizer over `STATIC_WORDS` and the ten digits, and seeded random weights."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import StaticEmbedding
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {token: i for i, token in enumerate(["[PAD]", "[UNK]", *STATIC_WORDS, *"0123456789"])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.Lowercase()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.Digits(individual_digits=True)]
    )
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    generator = torch.Generator().manual_seed(1234)
    weights = torch.randn(len(vocab), STATIC_DIMENSION, generator=generator)
    module = StaticEmbedding(tokenizer, embedding_weights=weights)
    SentenceTransformer(modules=[module], device="cpu").save(str(target))
    return target


if __name__ == "__main__":
    import sys

    build = build_static_model if sys.argv[2:] == ["static"] else build_tiny_model
    print(build(Path(sys.argv[1])))
