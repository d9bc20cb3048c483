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
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import msgspec
import structlog

from .memory_reads import Entry, HistoryRecord, MemoryReader, ReadQueries, entry_from_row
from .memory_settings import (
    SCHEMA_KEYWORDS,
    StewardSettings,
    check_schema,
    json_type,
    schema_error,
)
from .memory_sqlite import (
    INSERT_HISTORY,
    Transaction,
    connect,
    create_tables,
    decode_value,
    encode_value,
)
from .memory_updates import (
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
MAX_NESTING = 64  # deeper values are malformed: merge and schema checks walk the tree
MAX_NAME_CHARS = 512


def allowed(agent_write_globs: Iterable[str], namespace: str) -> bool:
    """True when `namespace` matches one of the agent's write globs (fnmatch, case-sensitive)."""
    return any(fnmatchcase(namespace, glob) for glob in agent_write_globs)


class PruneCounts(msgspec.Struct, frozen=True):
    history: int
    idempotency: int


# -- value operations -----------------------------------------------------------------------------

def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge-patch of `patch` onto `target` (inputs are not mutated)."""
    if not isinstance(patch, dict):
        return patch
    result = dict(target) if isinstance(target, dict) else {}
    for name, member in patch.items():
        if member is None:
            result.pop(name, None)
        else:
            result[name] = merge_patch(result.get(name), member)
    return result


def _too_deep(value: Any, limit: int = MAX_NESTING) -> bool:
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
        stack.extend((child, depth + 1) for child in children)
    return False


def _malformed(update: Update) -> str | None:
    for field in ("namespace", "key"):
        name = getattr(update, field)
        if not isinstance(name, str) or not name or len(name) > MAX_NAME_CHARS:
            return f"{field} must be a non-empty string of at most {MAX_NAME_CHARS} chars"
        if any(ord(ch) < 32 for ch in name):
            return f"{field} {name!r} contains control characters"
    if update.op is not Op.DELETE and update.value is msgspec.UNSET:
        return f"op {update.op} needs a value"
    if update.expect_version is not None and update.expect_version < 0:
        return f"expect_version must be >= 0 (0 = must not exist), got {update.expect_version}"
    if update.value is not msgspec.UNSET and _too_deep(update.value):
        return f"value nests deeper than {MAX_NESTING} levels"
    return None


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
            now = self._clock()
            results = [self._apply_checked(u, grants.get(u.agent, (u.agent,)), now)
                       for u in updates]
        applied = sum(r.ok for r in results)
        log.debug("batch_applied", updates=len(results), applied=applied,
                  rejected=len(results) - applied,
                  duration_ms=round((time.monotonic() - started) * 1000, 2))
        return results

    def _apply_checked(self, update: Update, write_globs: Sequence[str], now: float) -> Result:
        problem = _malformed(update)
        if problem:
            return rejected(update, Reason.MALFORMED, problem)
        if not allowed(write_globs, update.namespace):
            return rejected(update, Reason.FORBIDDEN,
                            f"agent {update.agent!r} may not write namespace {update.namespace!r}; "
                            f"allowed globs: {list(write_globs)}")
        if update.idempotency_key is not None:
            row = self._conn.execute("select result from idempotency where agent = ? and key = ?",
                                     (update.agent, update.idempotency_key)).fetchone()
            if row:
                return msgspec.structs.replace(msgspec.json.decode(row[0], type=Result),
                                               replayed=True)
        result = self._apply(update, HistoryOp(update.op.value), now)
        if result.ok and update.idempotency_key is not None:
            self._conn.execute("insert into idempotency values (?, ?, ?, ?)",
                               (update.agent, update.idempotency_key,
                                msgspec.json.encode(result).decode(), now))
        return result

    def _apply(self, update: Update, history_op: HistoryOp, now: float) -> Result:
        """Check and write one update inside the open transaction; nothing is written on reject."""
        row = self._conn.execute("select value, version from entries where namespace = ? and key = ?",
                                 (update.namespace, update.key)).fetchone()
        old_text, counter = row if row else (None, 0)
        current = counter if old_text is not None else 0
        if update.expect_version is not None and update.expect_version != current:
            return rejected(update, Reason.VERSION_CONFLICT,
                            f"expected version {update.expect_version}, current is {current}",
                            current_version=current)
        if update.op is Op.DELETE and old_text is None:
            return Result(status=Status.APPLIED, namespace=update.namespace, key=update.key,
                          version=counter, detail="already absent")
        old = decode_value(old_text)
        new, problem = _new_value(update, old, old_text is not None)
        if problem:
            return rejected(update, Reason.MALFORMED, problem)
        try:
            new_text = None if update.op is Op.DELETE else encode_value(new)
        except TypeError as exc:  # a Python caller passed a non-JSON value; agents cannot
            return rejected(update, Reason.MALFORMED, f"value is not JSON: {exc}")
        problem = self._limits_error(update.namespace, new_text, new)
        if problem:
            return rejected(update, *problem)
        self._write(update.namespace, update.key, new_text, counter + 1, row is not None,
                    update.agent, update.run_id, now)
        self._conn.execute(INSERT_HISTORY, (
            update.namespace, update.key, history_op.value, update.agent, update.run_id, now,
            current or None, counter + 1, old_text, new_text))
        return Result(status=Status.APPLIED, namespace=update.namespace, key=update.key,
                      version=counter + 1)

    def _limits_error(self, namespace: str, new_text: str | None,
                      new: Any) -> tuple[Reason, str] | None:
        if new_text is None:
            return None
        size = len(new_text.encode())
        if size > self.settings.max_value_bytes:
            return Reason.TOO_LARGE, (f"value is {size} bytes encoded; max_value_bytes is "
                                      f"{self.settings.max_value_bytes}")
        for glob, schema in self.settings.schemas.items():
            if fnmatchcase(namespace, glob):
                problem = schema_error(new, schema)
                return (Reason.SCHEMA, f"schema {glob!r}: {problem}") if problem else None
        return None

    def _write(self, namespace: str, key: str, value: str | None, version: int, exists: bool,
               agent: str, run_id: str, now: float) -> None:
        if exists:
            self._conn.execute(
                "update entries set value = ?, version = ?, updated_at = ?, updated_by = ?, "
                "run_id = ? where namespace = ? and key = ?",
                (value, version, now, agent, run_id, namespace, key))
        else:
            self._conn.execute(
                "insert into entries (namespace, key, value, version, updated_at, updated_by, "
                "run_id) values (?, ?, ?, ?, ?, ?, ?)",
                (namespace, key, value, version, now, agent, run_id))

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
        target = Update(op=Op.DELETE if old_text is None else Op.PUT, namespace=namespace,
                        key=key, value=decode_value(old_text) if old_text is not None else msgspec.UNSET,
                        agent=ADMIN_AGENT, run_id=f"revert:{first_seq}")
        if later and not force:
            current = self.get(namespace, key)
            return rejected(target, Reason.VERSION_CONFLICT,
                            f"{later} later write(s) by others since seq {first_seq}; "
                            f"pass force=True to overwrite them",
                            current_version=current.version if current else 0)
        result = self._apply(target, HistoryOp.REVERT, now)
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
        write is recorded in history as op "import" by ADMIN_AGENT. Size and schema limits are
        not applied: a restore must reproduce what was there.
        """
        doc = msgspec.convert(data, type=_ExportDoc)
        with self._transaction():
            now = self._clock()
            for e in doc.entries:
                row = self._conn.execute(
                    "select value, version from entries where namespace = ? and key = ?",
                    (e.namespace, e.key)).fetchone()
                old_text, counter = row if row else (None, 0)
                version = max(e.version, counter + 1) if row else e.version
                new_text = encode_value(e.value)
                self._write(e.namespace, e.key, new_text, version, row is not None, e.updated_by,
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


def _new_value(update: Update, old: Any, exists: bool) -> tuple[Any, str | None]:
    """The value an update produces from `old`, or a reason it cannot apply."""
    if update.op is Op.PUT:
        return update.value, None
    if update.op is Op.MERGE:
        return merge_patch(old if exists else None, update.value), None
    if update.op is Op.APPEND:
        if not exists:
            return [update.value], None
        if not isinstance(old, list):
            return None, f"append needs a JSON list at {update.namespace}/{update.key}, " \
                         f"found {json_type(old)}"
        return [*old, update.value], None
    return None, None

