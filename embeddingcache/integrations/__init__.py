"""Adapters to other libraries, each importable only when that library is installed:
``embeddingcache.integrations.langchain`` (``pip install 'embeddingcache[langchain]'``)."""
