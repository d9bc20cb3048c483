"""The memory store's SQLite file: its tables, connections and transactions.

Entries, append-only history and idempotency keys, plus the full-text index that lazy context
retrieval reads (supervisor/memory/context.py). Values are stored as JSON text; NULL in `entries.value`
is a tombstone that keeps the key's version counter.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from .settings import StewardSettings

SCHEMA_VERSION = 1  # stamped in pragma user_version

DDL = """
create table if not exists entries (
    id integer primary key,
    namespace text not null,
    key text not null,
    value text,                -- JSON; NULL is a tombstone that keeps the version counter
    version integer not null,
    updated_at real not null,
    updated_by text not null,
    run_id text not null,
    unique (namespace, key)
);
create table if not exists history (
    seq integer primary key autoincrement,  -- autoincrement: pruned seqs are never reused
    namespace text not null, key text not null, op text not null,
    agent text not null, run_id text not null, time real not null,
    old_version integer, new_version integer, old_value text, new_value text
);
create index if not exists history_by_key on history (namespace, key, seq);
create index if not exists history_by_agent on history (agent, seq);
create index if not exists history_by_run on history (run_id, seq);
create index if not exists history_by_time on history (time);
create table if not exists idempotency (
    agent text not null, key text not null, result text not null, created_at real not null,
    primary key (agent, key)
) without rowid;
create index if not exists idempotency_by_age on idempotency (created_at);
-- Full-text index for lazy context retrieval (supervisor/memory/context.py). Triggers keep it in the
-- same transaction as every write path (apply, revert, import), so it can never drift.
create virtual table if not exists entries_fts using fts5(
    namespace, key, body, tokenize = 'porter unicode61'
);
create trigger if not exists entries_fts_insert after insert on entries
when new.value is not null begin
    insert into entries_fts (rowid, namespace, key, body) values (new.id, new.namespace, new.key,
        (select group_concat(value, ' ') from json_tree(new.value) where type = 'text'));
end;
create trigger if not exists entries_fts_update after update of value on entries begin
    delete from entries_fts where rowid = old.id;
    insert into entries_fts (rowid, namespace, key, body)
        select new.id, new.namespace, new.key,
            (select group_concat(value, ' ') from json_tree(new.value) where type = 'text')
        where new.value is not null;
end;
create trigger if not exists entries_fts_delete after delete on entries begin
    delete from entries_fts where rowid = old.id;
end;
"""

INSERT_HISTORY = ("insert into history (namespace, key, op, agent, run_id, time, old_version, "
                  "new_version, old_value, new_value) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)")


def connect(path: Path, settings: StewardSettings, *, readonly: bool = False) -> sqlite3.Connection:
    """Open a connection with the store's pragmas; readers get a read-only one."""
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, isolation_level=None,
                               check_same_thread=False)
        conn.execute("pragma query_only = on")
    else:
        conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("pragma journal_mode = wal")
        # WAL + synchronous=FULL fsyncs the WAL at every commit, so a commit that returned
        # survives power loss and kernel panics, not only a killed process (NORMAL would lose the
        # last commits on power loss). The daemon acknowledges an update only after commit, and
        # group commit spreads that one fsync over every update of the loop turn.
        conn.execute("pragma synchronous = full")
    conn.execute(f"pragma busy_timeout = {int(settings.busy_timeout_ms)}")
    return conn


def create_tables(conn: sqlite3.Connection) -> None:
    """Create whatever tables, indexes and triggers are missing, and stamp the schema version."""
    # One script in one transaction: several processes may open the same file at once.
    conn.executescript(f"begin immediate; {DDL} pragma user_version = {SCHEMA_VERSION}; commit;")


class Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception.

    IMMEDIATE takes the write lock up front, so a second writer waits on busy_timeout at BEGIN
    instead of failing with SQLITE_BUSY halfway through a read-then-write.
    """

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("begin immediate")

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        try:
            if exc_type is None:
                self._conn.execute("commit")
        finally:
            # A failed COMMIT (disk full, I/O error) may leave the transaction open; without
            # this rollback every later BEGIN would fail with "transaction within transaction".
            if self._conn.in_transaction:
                self._conn.execute("rollback")


def encode_value(value: Any) -> str:
    """The JSON text stored in a value column."""
    return msgspec.json.encode(value).decode()


def decode_value(text: str | None) -> Any:
    """A value column's JSON text decoded; NULL (a tombstone or no old value) is None."""
    return None if text is None else msgspec.json.decode(text)
