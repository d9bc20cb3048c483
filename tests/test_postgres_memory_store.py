"""The steward's PostgreSQL store behaves like the SQLite one, update for update."""

from __future__ import annotations

import msgspec
import pytest
from pg_harness import PG_DSN, PG_MISSING, drop_schema, new_schema, pg_available
from support import require

from supervisor.memory.context import ContextRetriever
from supervisor.memory.store import MemoryStore, Op, Update
from supervisor.pg.db import Database
from supervisor.pg.memory import PgMemoryStore, PgSearchBackend
from supervisor.pg.migrations import migrate
from supervisor.storage.settings import StorageSettings

GRANTS = {"a": ["notes*", "shared"], "b": ["shared"]}


@pytest.fixture
def pg_store():
    require(pg_available, PG_MISSING)
    schema = new_schema("memory")
    db = Database(StorageSettings(backend="postgresql", dsn=PG_DSN, schema=schema,
                                  host_name="test"))
    migrate(db)
    yield PgMemoryStore(db), db
    db.close()
    drop_schema(schema)


def stream() -> list[list[Update]]:
    u = Update
    return [
        [u(op=Op.PUT, namespace="notes", key="k%_1", value={"a": 1}, agent="a"),
         u(op=Op.PUT, namespace="notes", key="k%_2", value="solar panels recycling", agent="a"),
         u(op=Op.PUT, namespace="shared", key="doc", value=1, expect_version=0, agent="b")],
        [u(op=Op.MERGE, namespace="notes", key="k%_1", value={"b": {"c": 2}, "a": None},
           agent="a"),
         u(op=Op.APPEND, namespace="notes", key="list", value=1, agent="a",
           idempotency_key="x1"),
         u(op=Op.APPEND, namespace="notes", key="list", value=1, agent="a",
           idempotency_key="x1"),
         u(op=Op.PUT, namespace="shared", key="doc", value=2, expect_version=0, agent="a"),
         u(op=Op.PUT, namespace="secret", key="s", value=0, agent="b")],
        [u(op=Op.DELETE, namespace="notes", key="k%_2", agent="a"),
         u(op=Op.PUT, namespace="notes", key="k%_2", value="back", agent="a"),
         u(op=Op.APPEND, namespace="notes", key="k%_1", value=3, agent="a")],
    ]


def test_same_updates_give_same_results_and_entries(tmp_path, pg_store):
    """Every update of a mixed stream gets the same result and leaves the same entries,
    versions and history in PostgreSQL as in SQLite."""
    pg, _db = pg_store
    with MemoryStore(tmp_path) as lite:
        for batch in stream():
            expected = lite.apply_batch(batch, GRANTS)
            assert pg.apply_batch(batch, GRANTS) == expected
        for store in (lite, pg):
            assert store.get("notes", "list").value == [1]
        assert _entries(pg.list("notes", "k%_")) == _entries(lite.list("notes", "k%_"))
        assert _history(pg.history(namespace="notes")) == _history(lite.history(namespace="notes"))
        assert pg.revert(agent="b") == lite.revert(agent="b")
        assert _entries(pg.list("shared")) == _entries(lite.list("shared"))


def test_export_import_and_search(pg_store):
    """An export of the PostgreSQL store imports back, and full-text search finds an entry."""
    pg, db = pg_store
    pg.apply_batch(stream()[0], GRANTS)
    exported = pg.export()
    assert pg.import_(exported) == 3
    hits = ContextRetriever(PgSearchBackend(db)).search("recycling solar", k=2,
                                                        namespaces=["note*"])
    assert [(h.namespace, h.key) for h in hits] == [("notes", "k%_2")]


def _entries(entries) -> list[tuple]:
    return [(e.namespace, e.key, e.value, e.version, e.updated_by) for e in entries]


def _history(records) -> list[dict]:
    return [{k: v for k, v in msgspec.to_builtins(r).items() if k not in ("time", "seq")}
            for r in records]


def test_paged_export_restores_history_into_a_fresh_postgresql_store(tmp_path, pg_store):
    """A SQLite store's pages import into an empty PostgreSQL store with the same history
    (seqs included), and the next write there gets the next seq, not a taken one."""
    from supervisor.memory.backup import export_page, import_page

    pg, _db = pg_store
    with MemoryStore(tmp_path) as lite:
        for batch in stream():
            lite.apply_batch(batch, GRANTS)
        history = export_page(lite, "history", 0, 1 << 20)
        entries = export_page(lite, "entries", 0, 1 << 20)
        assert import_page(pg, history)["history"] == len(history["history"])
        import_page(pg, entries, restored_history=True)
        assert pg.history(limit=1000) == lite.history(limit=1000)
        last = max(h["seq"] for h in history["history"])
    pg.apply_batch([Update(op=Op.PUT, namespace="notes", key="new", value=1, agent="a")],
                   GRANTS)
    assert pg.history(limit=1)[0].seq == last + 1
