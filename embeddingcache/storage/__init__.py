"""Storage: tables, where shards live, batched reads and writes, retries."""

from .layout import Layout, ServerLayout, SQLiteLayout, layout_for
from .store import Lookup, ModelInfo, ShardSummary, Store

__all__ = [
    "Layout",
    "Lookup",
    "ModelInfo",
    "SQLiteLayout",
    "ServerLayout",
    "ShardSummary",
    "Store",
    "layout_for",
]
