"""Reading the memory store: entries, listings and history.

`ReadQueries` serves both the single writer (`MemoryStore`) and any number of `MemoryReader`s,
each on its own read-only connection; WAL lets them run beside the writer.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import msgspec

from .settings import StewardSettings
from .sqlite import connect, decode_value
from .updates import HistoryOp

HISTORY_COLUMNS = ("seq, namespace, key, op, agent, run_id, time, old_version, new_version, "
                   "old_value, new_value")


class Entry(msgspec.Struct, kw_only=True, frozen=True):
    namespace: str
    key: str
    value: Any
    version: int
    updated_at: float
    updated_by: str
    run_id: str


class HistoryRecord(msgspec.Struct, kw_only=True, frozen=True):
    seq: int
    namespace: str
    key: str
    op: HistoryOp
    agent: str
    run_id: str
    time: float
    old_version: int | None
    new_version: int | None
    old_value: Any
    new_value: Any


class ReadQueries:
    """Read queries shared by the writer (`MemoryStore`) and concurrent `MemoryReader`s."""

    _conn: sqlite3.Connection

    def get(self, namespace: str, key: str) -> Entry | None:
        row = self._conn.execute(
            "select namespace, key, value, version, updated_at, updated_by, run_id from entries "
            "where namespace = ? and key = ? and value is not null", (namespace, key)).fetchone()
        return entry_from_row(row) if row else None

    def list(self, namespace: str, prefix: str = "") -> list[Entry]:
        """Live entries of `namespace` whose key starts with `prefix`, in key order."""
        # A range on the unique index instead of LIKE/GLOB, so '%', '_' or '*' in a prefix are
        # literal characters.
        rows = self._conn.execute(
            "select namespace, key, value, version, updated_at, updated_by, run_id from entries "
            "where namespace = ? and key >= ? and key < ? and value is not null order by key",
            (namespace, prefix, prefix + "\U0010ffff")).fetchall()
        return [entry_from_row(row) for row in rows]

    def has_live_entries(self) -> bool:
        """Whether any entry holds a value (not only tombstones)."""
        return self._conn.execute(
            "select exists (select 1 from entries where value is not null)").fetchone()[0] == 1

    def history(self, namespace: str | None = None, key: str | None = None,
                agent: str | None = None, run_id: str | None = None,
                limit: int = 100) -> list[HistoryRecord]:
        """History records matching every given filter, newest first."""
        filters = {"namespace": namespace, "key": key, "agent": agent, "run_id": run_id}
        where = [f"{column} = ?" for column, wanted in filters.items() if wanted is not None]
        params = [wanted for wanted in filters.values() if wanted is not None]
        sql = (f"select {HISTORY_COLUMNS} from history "
               f"{'where ' + ' and '.join(where) if where else ''} order by seq desc limit ?")
        return [history_from_row(row) for row in self._conn.execute(sql, (*params, limit))]

    def close(self) -> None:
        self._conn.close()


def entry_from_row(row: tuple) -> Entry:
    """An `entries` row (the columns `get` selects) as an Entry."""
    ns, key, value, version, updated_at, updated_by, run_id = row
    return Entry(namespace=ns, key=key, value=decode_value(value), version=version,
                 updated_at=updated_at, updated_by=updated_by, run_id=run_id)


def history_from_row(row: tuple) -> HistoryRecord:
    """A `history` row (HISTORY_COLUMNS) as a HistoryRecord."""
    seq, ns, key, op, agent, run_id, at, old_v, new_v, old_value, new_value = row
    return HistoryRecord(seq=seq, namespace=ns, key=key, op=HistoryOp(op), agent=agent,
                         run_id=run_id, time=at, old_version=old_v, new_version=new_v,
                         old_value=decode_value(old_value), new_value=decode_value(new_value))


class MemoryReader(ReadQueries):
    """A read-only connection for concurrent readers (WAL lets them run beside the writer)."""

    def __init__(self, path: Path, settings: StewardSettings | None = None) -> None:
        self.path = Path(path)
        self._conn = connect(self.path, settings or StewardSettings(), readonly=True)
