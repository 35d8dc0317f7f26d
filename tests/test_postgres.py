"""What only a server database shows: names, and failing clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from embeddingcache import EmbeddingCache, InvalidInputError, StorageError
from embeddingcache.keys import key_of
from embeddingcache.storage import Store, layout_for
from embeddingcache.storage.layout import server_schema


def test_schema_names_are_valid_bounded_and_distinct() -> None:
    names = ["org/Model", "org/model", "org_model", "org-model", "x" * 500, "x" * 501, "../.."]
    schemas = [server_schema(n) for n in names]
    assert len(set(schemas)) == len(names)
    for schema in schemas:
        assert len(schema.encode()) <= 63
        assert schema.startswith("ec_")
        assert schema.replace("_", "").isalnum() and schema == schema.lower()
    assert server_schema("all-MiniLM-L6-v2") == "ec_all_minilm_l6_v2"


def test_a_very_long_model_name_gets_a_shard_of_its_own(pg_url: str) -> None:
    store = Store(layout_for(Path("unused"), pg_url))
    long_a, long_b = "a" * 300 + "/one", "a" * 300 + "/two"
    store.put(long_a, [key_of("t")], ["t"], np.ones((1, 4), np.float32))
    store.put(long_b, [key_of("t")], ["t"], np.zeros((1, 4), np.float32))
    assert store.lookup(long_a, [key_of("t")]).vectors.tolist() == [[1.0] * 4]
    assert store.lookup(long_b, [key_of("t")]).vectors.tolist() == [[0.0] * 4]
    assert sorted(s.model for s in store.summaries()) == [long_a, long_b]
    store.close()


def test_an_unreachable_database_is_a_storage_error_with_the_password_masked(
    tmp_path: Path,
) -> None:
    url = "postgresql://someone:s3cret-pw@127.0.0.1:1/nowhere"
    with EmbeddingCache(db_url=url) as cache:
        with pytest.raises(StorageError) as raised:
            cache.get_embeddings(["x"], "all-MiniLM-L6-v2")
    message = str(raised.value)
    assert "postgresql+psycopg://someone:***@127.0.0.1:1/nowhere" in message
    assert "s3cret-pw" not in message


def test_refused_credentials_are_a_storage_error(pg_admin_url: str) -> None:
    from sqlalchemy import make_url

    url = make_url(pg_admin_url).set(username="no_such_role_here", password="hunter2")
    with EmbeddingCache(db_url=url.render_as_string(hide_password=False)) as cache:
        with pytest.raises(StorageError, match="no_such_role_here") as raised:
            cache.get_embeddings(["x"], "all-MiniLM-L6-v2")
    assert "hunter2" not in str(raised.value)


def test_unsupported_urls_are_refused_clearly() -> None:
    with pytest.raises(InvalidInputError, match="pass cache_dir"):
        EmbeddingCache(db_url="sqlite:///x.db")
    with pytest.raises(InvalidInputError, match="unsupported database 'oracle'"):
        EmbeddingCache(db_url="oracle://u:p@host/db")


def test_hits_read_through_prepared_statements_and_survive_a_dropped_connection(
    pg_url: str,
) -> None:
    """The hit path keeps a psycopg connection per thread and prepared statements (no pool
    checkout, no SQL compiled per call); a connection the server ends is replaced once."""
    from sqlalchemy import create_engine, text

    store = Store(layout_for(Path("unused"), pg_url))
    keys = [key_of(t) for t in ("one", "two")]
    store.put("m", keys, ["one", "two"], np.arange(8, dtype=np.float32).reshape(2, 4))
    checkouts: list[object] = []
    from sqlalchemy import event

    event.listen(store.layout.engine, "checkout", lambda *args: checkouts.append(args))
    for _ in range(3):
        assert store.lookup("m", keys[:1]).vectors.tolist() == [[0.0, 1.0, 2.0, 3.0]]
        assert store.lookup("m", keys).vectors.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert checkouts == []  # the hits took no connection from the pool
    admin = create_engine(pg_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        ended = connection.execute(
            text(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                "AND query LIKE 'SELECT hashid, vector, last_used%'"
            )
        ).all()
    admin.dispose()
    assert ended  # the reader's connection was there, and is gone now
    assert store.lookup("m", keys).vectors.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    store.close()
