"""The memory steward's embedded store: shared agent memory in one SQLite file.

The steward is the single writer. `MemoryStore.apply_batch` applies every update gathered in one
loop turn inside ONE transaction (group commit) and returns one `Result` per update; a rejected
update never aborts the others because every check runs before anything is written. Readers may
open their own connection (`MemoryReader`) and run concurrently thanks to WAL.

Semantics, in one place:
- versions count from 1 per (namespace, key) and never go back: a delete leaves a tombstone row
  (value NULL) that keeps the counter, so a re-created key never reuses a version that an agent may
  still hold in `expect_version` (the ABA problem).
- `expect_version=0` means "must not exist".
- merge is RFC 7386 JSON merge-patch: objects merge recursively, `null` removes a member, and a
  non-object patch replaces the value. Chosen over a shallow merge because it is a published
  standard agents (and their models) already know, and nested settings merge without clobbering.
- append adds the value as ONE element to a JSON list, creating the list when the key is absent;
  appending to a non-list is rejected as malformed.
- idempotency: an applied result is remembered per (agent, idempotency_key) and replayed on retry.
  Rejections are not remembered: they wrote nothing, so evaluating a retry afresh is safe.
- history is append-only (pruned only by age) and records old and new values, so `revert` can
  write the old values back as new, audited updates by `ADMIN_AGENT`.

This module is the store itself: opening it, batches, revert, export/import and pruning. Its
parts live beside it in memory/: settings.py (the `[steward]` section and the JSON Schema subset),
sqlite.py (tables, connections, transactions), updates.py (updates and results),
writes.py (checking and writing one update) and reads.py (queries, `MemoryReader`).
Their public names are importable from here.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import structlog

from .backup import check_page, parse_page
from .reads import Entry, HistoryRecord, MemoryReader, ReadQueries, entry_from_row
from .settings import (
    SCHEMA_KEYWORDS,
    StewardSettings,
    check_schema,
    schema_error,
)
from .sqlite import (
    INSERT_HISTORY,
    Transaction,
    connect,
    create_tables,
    decode_value,
    encode_value,
)
from .updates import (
    ADMIN_AGENT,
    HistoryOp,
    MalformedUpdate,
    Op,
    Reason,
    Result,
    Status,
    Update,
    parse_update,
    rejected,
)
from .writes import MAX_NAME_CHARS, MAX_NESTING, UpdateWriter, allowed, merge_patch

__all__ = [
    "ADMIN_AGENT", "EXPORT_FORMAT", "EXPORT_FORMAT_VERSION", "MAX_NAME_CHARS", "MAX_NESTING",
    "SCHEMA_KEYWORDS", "Entry", "HistoryOp", "HistoryRecord", "MalformedUpdate", "MemoryReader",
    "MemoryStore", "Op", "PruneCounts", "Reason", "Result", "Status", "StewardSettings", "Update",
    "allowed", "check_schema", "connect", "merge_patch", "parse_update", "rejected",
    "schema_error",
]

log = structlog.get_logger("watchkeeper.memory_store")

EXPORT_FORMAT = "watchkeeper-memory"
EXPORT_FORMAT_VERSION = 1


class PruneCounts(msgspec.Struct, frozen=True):
    history: int
    idempotency: int


class MemoryStore(ReadQueries):
    """The single writer of shared agent memory: one SQLite file under the state dir.

    `clock` gives wall-clock seconds for records (updated_at, history time, pruning ages).
    """

    def __init__(self, state_dir: Path, settings: StewardSettings | None = None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings or StewardSettings()
        self.path = Path(state_dir) / self.settings.db_file
        self._clock = clock
        self._conn = connect(self.path, self.settings)
        create_tables(self._conn)

    def integrity_check(self) -> str:
        """SQLite's `pragma integrity_check`: "ok", or the problems it found, one per line."""
        return "\n".join(row[0] for row in self._conn.execute("pragma integrity_check"))

    def reader(self) -> MemoryReader:
        """A new read-only connection to this store, for use beside the writer."""
        return MemoryReader(self.path, self.settings)

    def __enter__(self) -> MemoryStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- writes -----------------------------------------------------------------------------------

    def apply_batch(self, updates: Sequence[Update],
                    grants: Mapping[str, Sequence[str]] | None = None) -> list[Result]:
        """Apply `updates` in one durable transaction and return one Result each, in order.

        `grants` maps an agent to the namespace globs it may write; an agent absent from it may
        write only the namespace named after itself. Results are valid only once this returns:
        if the commit raises (disk full, I/O error) nothing was applied and nothing may be acked.
        """
        grants = grants or {}
        started = time.monotonic()
        with self._transaction():
            now, writer = self._clock(), self._writer()
            results = [writer.apply_checked(u, grants.get(u.agent, (u.agent,)), now)
                       for u in updates]
        applied = sum(r.ok for r in results)
        log.debug("batch_applied", updates=len(results), applied=applied,
                  rejected=len(results) - applied,
                  duration_ms=round((time.monotonic() - started) * 1000, 2))
        return results

    # -- administration ---------------------------------------------------------------------------

    def revert(self, *, seq: int | None = None, agent: str | None = None,
               run_id: str | None = None, force: bool = False) -> list[Result]:
        """Undo one history record (`seq`) or every write by `agent` and/or `run_id`.

        For each key touched, the value from before the earliest selected write is written back
        as a new update by ADMIN_AGENT (history op "revert"). A key that someone outside the
        selection changed afterwards is left alone and reported as version_conflict, unless
        `force` is set: reverting it would silently discard that later work.
        """
        if seq is None and agent is None and run_id is None:
            raise ValueError("revert needs seq, or agent and/or run_id")
        if seq is not None:
            where, params = "seq = ?", [seq]
        else:
            chosen = {"agent": agent, "run_id": run_id}
            where = " and ".join(f"{col} = ?" for col, val in chosen.items() if val is not None)
            params = [val for val in chosen.values() if val is not None]
        with self._transaction():
            now = self._clock()
            return [self._revert_key(ns, key, first_seq, where, params, force, now)
                    for ns, key, first_seq in self._conn.execute(
                        f"select namespace, key, min(seq) from history where {where} "
                        f"group by namespace, key order by min(seq)", params).fetchall()]

    def _revert_key(self, namespace: str, key: str, first_seq: int, where: str,
                    params: Sequence[Any], force: bool, now: float) -> Result:
        old_text, = self._conn.execute("select old_value from history where seq = ?",
                                       (first_seq,)).fetchone()
        later = self._conn.execute(
            f"select count(*) from history where namespace = ? and key = ? and seq > ? "
            f"and not ({where})", (namespace, key, first_seq, *params)).fetchone()[0]
        value = decode_value(old_text) if old_text is not None else msgspec.UNSET
        target = Update(op=Op.DELETE if old_text is None else Op.PUT, namespace=namespace,
                        key=key, value=value, agent=ADMIN_AGENT, run_id=f"revert:{first_seq}")
        if later and not force:
            current = self.get(namespace, key)
            return rejected(target, Reason.VERSION_CONFLICT,
                            f"{later} later write(s) by others since seq {first_seq}; "
                            f"pass force=True to overwrite them",
                            current_version=current.version if current else 0)
        result = self._writer().apply(target, HistoryOp.REVERT, now)
        log.info("memory_reverted", namespace=namespace, key=key, since_seq=first_seq,
                 status=result.status.value, version=result.version)
        return result

    def export(self) -> dict[str, Any]:
        """Every live entry as a JSON-able dict. History is this store's audit log; not exported."""
        entries = self._conn.execute(
            "select namespace, key, value, version, updated_at, updated_by, run_id from entries "
            "where value is not null order by namespace, key").fetchall()
        return {"format": EXPORT_FORMAT, "format_version": EXPORT_FORMAT_VERSION,
                "exported_at": self._clock(),
                "entries": [msgspec.to_builtins(entry_from_row(row)) for row in entries]}

    def import_(self, data: Mapping[str, Any]) -> int:
        """Restore entries from `export()` output; returns how many were written.

        An imported entry keeps its version and metadata unless the key already exists here,
        where the version becomes max(imported, current + 1) so versions never go back. Every
        write is recorded in history as op "import" by ADMIN_AGENT. Every entry is checked as
        a put would be (memory.backup.check_page) before anything is written.
        """
        doc = msgspec.convert(data, type=_ExportDoc)
        check_page(self, parse_page(data))  # names, versions, sizes: exactly as a put
        with self._transaction():
            now = self._clock()
            writer = self._writer()
            for e in doc.entries:
                row = writer.stored(e.namespace, e.key)
                old_text, counter = row if row else (None, 0)
                version = max(e.version, counter + 1) if row else e.version
                new_text = encode_value(e.value)
                writer.write(e.namespace, e.key, new_text, version, row is not None, e.updated_by,
                             e.run_id, e.updated_at)
                self._conn.execute(INSERT_HISTORY, (
                    e.namespace, e.key, HistoryOp.IMPORT.value, ADMIN_AGENT, "import", now,
                    counter if old_text is not None else None, version, old_text, new_text))
        log.info("memory_imported", entries=len(doc.entries))
        return len(doc.entries)

    def prune(self) -> PruneCounts:
        """Drop history older than the retention and idempotency keys older than their TTL."""
        with self._transaction():
            now = self._clock()
            history = self._conn.execute("delete from history where time < ?",
                                         (now - self.settings.history_retention_s,)).rowcount
            keys = self._conn.execute("delete from idempotency where created_at < ?",
                                      (now - self.settings.idempotency_ttl_s,)).rowcount
        log.info("memory_pruned", history=history, idempotency=keys)
        return PruneCounts(history=history, idempotency=keys)

    def _transaction(self) -> Transaction:
        return Transaction(self._conn)

    def _writer(self) -> UpdateWriter:
        return UpdateWriter(self._conn, self.settings)


class _ExportEntry(Entry, forbid_unknown_fields=True):
    """An exported entry: Entry's fields, and an import refuses any other."""


class _ExportDoc(msgspec.Struct, kw_only=True, frozen=True):
    format: str
    format_version: int
    entries: list[_ExportEntry]

    def __post_init__(self) -> None:
        if (self.format, self.format_version) != (EXPORT_FORMAT, EXPORT_FORMAT_VERSION):
            raise ValueError(f"not a {EXPORT_FORMAT} v{EXPORT_FORMAT_VERSION} export: "
                             f"format={self.format!r} format_version={self.format_version}")


