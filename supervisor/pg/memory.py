"""The steward's store in PostgreSQL: the same semantics as memory.store.MemoryStore.

Every daemon applies its own loop turn's batch directly, in one transaction that first takes
the `steward` advisory lock: the database serialises the batches of all hosts, so there is
exactly one writer at any moment and each batch reads what the previous one committed
(versions, expect_version checks and history order hold across hosts). The transaction
commits with synchronous_commit=on before any update of the batch is acknowledged, so an
acknowledged update is in PostgreSQL's WAL on disk. No leader is involved in a write: when
a daemon dies, the others' writes go on without a take-over gap, and a batch the dead
daemon had not committed was never acknowledged.

The write logic is MemoryStore's own; only the connection differs (`_PgConnection`).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import Any

import psycopg

from ..memory.context import Candidate
from ..memory.reads import Entry, entry_from_row
from ..memory.settings import StewardSettings
from ..memory.store import MemoryStore
from .db import STEWARD_LOCK, Database, StorageUnavailable, one_line


class _PgConnection:
    """The slice of sqlite3.Connection that MemoryStore uses, on a psycopg connection:
    qmark parameters, and each statement outside a transaction in one of its own."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.in_tx = False

    def execute(self, sql: str, params: Sequence[Any] = ()) -> psycopg.Cursor:
        sql = sql.replace("?", "%s")
        if self.in_tx:
            return self.db.conn.execute(sql, params)
        with self.db.tx() as conn:
            return conn.execute(sql, params)  # rows are fetched before the commit returns

    @property
    def in_transaction(self) -> bool:
        return self.in_tx

    def close(self) -> None:
        """The Database belongs to the cluster feature, which closes it."""


class PgMemoryStore(MemoryStore):
    def __init__(self, db: Database, settings: StewardSettings | None = None) -> None:
        # Not MemoryStore.__init__: it opens a SQLite file.
        self.settings = settings or StewardSettings()
        self.path = None
        self._clock = time.time
        self._conn = _PgConnection(db)
        self.db = db

    def integrity_check(self) -> str:
        return "ok"  # PostgreSQL checks its own pages; nothing to ask of it here

    def list(self, namespace: str, prefix: str = "") -> list[Entry]:
        rows = self._conn.execute(
            "select namespace, key, value, version, updated_at, updated_by, run_id from entries "
            "where namespace = ? and starts_with(key, ?) and value is not null order by key",
            (namespace, prefix)).fetchall()
        return [entry_from_row(row) for row in rows]

    def after_history_restore(self) -> None:
        """History rows inserted with their own seq (memory/backup.py): move the sequence past
        them, or the next write would reuse a seq."""
        self._conn.execute("select setval(pg_get_serial_sequence('history', 'seq'), "
                           "(select max(seq) from history))")

    @contextlib.contextmanager
    def _transaction(self):
        try:
            with self.db.tx(lock=STEWARD_LOCK, durable=True):
                self._conn.in_tx = True
                try:
                    yield
                finally:
                    self._conn.in_tx = False
        except (psycopg.OperationalError, psycopg.InterfaceError, ConnectionError) as exc:
            # The steward answers "not applied: <this>" with retry=True: the agent must read
            # that the batch was not committed and that the same write may be sent again.
            raise StorageUnavailable(f"shared storage unreachable ({one_line(exc)}); "
                                     "nothing was committed, retry later") from None


class PgSearchBackend:
    """Lazy-context candidates ranked by PostgreSQL full-text search (ts_rank_cd)."""

    def __init__(self, db: Database) -> None:
        self.db = db

    def close(self) -> None:
        """Nothing of its own to close."""

    def candidates(self, terms: Sequence[str], namespaces: Sequence[str] | None,
                   limit: int) -> list[Candidate]:
        if not terms:
            return []
        query = " | ".join(f"'{t}'" for t in terms)  # terms are \w+: no quote can occur
        scope, params = "", [query]
        if namespaces:
            scope = " and (" + " or ".join("namespace like %s" for _ in namespaces) + ")"
            params += [_glob_to_like(g) for g in namespaces]
        with self.db.tx() as conn:
            rows = conn.execute(
                "select namespace, key, version, value, ts_rank_cd(search, q) as rank "
                "from entries, to_tsquery('english', %s) q where search @@ q and value is not "
                f"null{scope} order by rank desc, namespace, key limit %s",
                (*params, limit)).fetchall()
        return [Candidate(ns, key, version, value, float(rank))
                for ns, key, version, value, rank in rows]


def _glob_to_like(glob: str) -> str:
    out = glob.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return out.replace("*", "%").replace("?", "_")
