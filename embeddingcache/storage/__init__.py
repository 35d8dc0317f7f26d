"""Storage: tables, where shards live, batched reads and writes, retries."""

from .layout import SQLiteLayout
from .store import Lookup, ModelInfo, ShardSummary, Store

__all__ = ["Lookup", "ModelInfo", "SQLiteLayout", "ShardSummary", "Store"]
