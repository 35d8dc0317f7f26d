"""Adapters to other libraries, each importable only when that library is installed:
``embeddingcache.integrations.langchain`` (``pip install 'embeddingcache[langchain]'``),
``embeddingcache.integrations.llama_index`` (``embeddingcache[llama-index]``) and
``embeddingcache.integrations.sentence_transformers`` (``embeddingcache[local]``)."""
