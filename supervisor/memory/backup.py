"""Export and import of the memory store in pages, entries and history both.

One reply or request holding a whole store was dropped past 8 MiB (export) or refused past
1 MiB (import), so `memory export | memory import` did not round-trip a store of a few MB.
Now `memory-export` answers one page of at most `max_bytes` with a cursor to the next, and
`memory-import` takes one page per request; the CLI (cli/backup_client.py) loops.

An import is checked exactly like a put, before anything of its page is written: names
(non-empty, no control characters, at most MAX_NAME_CHARS), versions (1 to 2**63-1), the
value's nesting, its encoded size and the namespace's schema. History is restored verbatim
(same seq, op, agent, times, values) only after the store's last seq, which in practice
means into a fresh store; entries whose history was restored get no extra `import` record,
so the restored history is identical to the exported one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import msgspec

from .reads import HISTORY_COLUMNS, history_from_row
from .sqlite import INSERT_HISTORY, decode_value, encode_value
from .updates import ADMIN_AGENT, HistoryOp, Op, Update
from .writes import MAX_NAME_CHARS, _malformed

EXPORT_FORMAT = "watchkeeper-memory"
FORMAT_VERSION = 2  # 1: entries only (MemoryStore.export); 2: entries and history, paged
MAX_VERSION = 2**63 - 1
DEFAULT_PAGE_BYTES = 2 << 20
_ROWS_PER_QUERY = 500
_PARTS = {"entries": ("id", "select id, namespace, key, value, version, updated_at, updated_by, "
                            "run_id from entries where value is not null and id > ? "
                            "order by id limit ?"),
          "history": ("seq", f"select {HISTORY_COLUMNS} from history where seq > ? "
                             "order by seq limit ?")}


class ImportRejected(ValueError):
    """A page that cannot be imported; the message names the item and what would be valid."""


def export_page(store, part: str, after: int, max_bytes: int) -> dict[str, Any]:
    """Items of `part` after cursor `after`, up to about `max_bytes` (at least one item)."""
    _, sql = _PARTS[part]
    items: list[dict] = []
    size, cursor, more = 0, after, True
    while more and size < max_bytes:
        rows = store._conn.execute(sql, (cursor, _ROWS_PER_QUERY)).fetchall()
        more = len(rows) == _ROWS_PER_QUERY
        for index, row in enumerate(rows):
            item, row_size = _item(part, row)
            items.append(item)
            size += row_size
            cursor = row[0]
            if size >= max_bytes:
                more = more or index < len(rows) - 1
                break
    return {"format": EXPORT_FORMAT, "format_version": FORMAT_VERSION,
            "exported_at": store._clock(), "part": part, part: items,
            "next": cursor if more else None}


def _item(part: str, row: tuple) -> tuple[dict, int]:
    if part == "entries":
        _, ns, key, value, version, updated_at, updated_by, run_id = row
        return ({"namespace": ns, "key": key, "value": decode_value(value), "version": version,
                 "updated_at": updated_at, "updated_by": updated_by, "run_id": run_id},
                len(value) + len(ns) + len(key) + 100)
    record = msgspec.to_builtins(history_from_row(row))
    return record, len(row[9] or "") + len(row[10] or "") + len(row[1]) + len(row[2]) + 150


class _Entry(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    namespace: str
    key: str
    value: Any
    version: int
    updated_at: float
    updated_by: str
    run_id: str


class _History(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
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


class _Page(msgspec.Struct, kw_only=True):
    format: str
    format_version: int
    entries: list[_Entry] = []
    history: list[_History] = []
    exported_at: float | None = None
    part: str | None = None
    next: int | None = None


def parse_page(data: Mapping[str, Any]) -> _Page:
    try:
        page = msgspec.convert(data, _Page)
    except msgspec.ValidationError as exc:
        raise ImportRejected(f"not an export document: {exc}") from None
    if page.format != EXPORT_FORMAT or page.format_version not in (1, FORMAT_VERSION):
        raise ImportRejected(f"not a {EXPORT_FORMAT} export (format_version 1 or "
                             f"{FORMAT_VERSION}): format={page.format!r} "
                             f"format_version={page.format_version}")
    return page


def check_page(store, page: _Page) -> None:
    """Every entry and history record as a put would check it; raise on the first problem."""
    writer = store._writer()
    for index, e in enumerate(page.entries):
        where = f"entries[{index}] ({e.namespace!r}/{e.key!r})"
        _check_names(where, e.namespace, e.key, e.value)
        _check_version(where, "version", e.version, allow_none=False)
        _check_meta(where, e.updated_at, e.updated_by, e.run_id)
        limits = writer._limits_error(e.namespace, encode_value(e.value), e.value)
        if limits is not None:
            raise ImportRejected(f"{where}: {limits[1]}")
    for index, h in enumerate(page.history):
        where = f"history[{index}] (seq {h.seq})"
        _check_names(where, h.namespace, h.key, msgspec.UNSET)
        _check_version(where, "seq", h.seq, allow_none=False)
        _check_version(where, "old_version", h.old_version, allow_none=True)
        _check_version(where, "new_version", h.new_version, allow_none=True)
        _check_meta(where, h.time, h.agent, h.run_id)


def _check_names(where: str, namespace: str, key: str, value: Any) -> None:
    problem = _malformed(Update(op=Op.PUT if value is not msgspec.UNSET else Op.DELETE,
                                namespace=namespace, key=key, value=value))
    if problem:
        raise ImportRejected(f"{where}: {problem}")


def _check_version(where: str, field: str, version: int | None, *, allow_none: bool) -> None:
    if version is None and allow_none:
        return
    if version is None or not 1 <= version <= MAX_VERSION:
        raise ImportRejected(f"{where}: {field} {version} is out of range (1 to {MAX_VERSION})")


def _check_meta(where: str, at: float, agent: str, run_id: str) -> None:
    if not math.isfinite(at):
        raise ImportRejected(f"{where}: time {at} is not a finite number")
    for field, name in (("agent", agent), ("run_id", run_id)):
        if len(name) > MAX_NAME_CHARS or any(ord(ch) < 32 for ch in name):
            raise ImportRejected(f"{where}: {field} must be at most {MAX_NAME_CHARS} chars "
                                 "without control characters")


def import_page(store, data: Mapping[str, Any], *, restored_history: bool = False) -> dict:
    """Check then write one page in one transaction; counts of what was written."""
    page = parse_page(data)
    check_page(store, page)
    with store._transaction():
        history = _restore_history(store, page.history)
        entries = _write_entries(store, page.entries, restored_history)
    return {"imported": entries, "history": history}


def _restore_history(store, records: list[_History]) -> int:
    if not records:
        return 0
    last = store._conn.execute("select coalesce(max(seq), 0) from history").fetchone()[0]
    first = min(h.seq for h in records)
    if first <= last:
        raise ImportRejected(f"history seq {first} is not after this store's last seq {last}: "
                             "history is restored only into a store without it (import into "
                             "a fresh state dir, or import an export without `history`)")
    for h in sorted(records, key=lambda r: r.seq):
        store._conn.execute(
            "insert into history (seq, namespace, key, op, agent, run_id, time, old_version, "
            "new_version, old_value, new_value) values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (h.seq, h.namespace, h.key, h.op.value, h.agent, h.run_id, h.time, h.old_version,
             h.new_version, _encoded_or_null(h.old_value), _encoded_or_null(h.new_value)))
    sync = getattr(store, "after_history_restore", None)  # PostgreSQL: move the sequence on
    if sync is not None:
        sync()
    return len(records)


def _encoded_or_null(value: Any) -> str | None:
    return None if value is None else encode_value(value)


def _write_entries(store, entries: list[_Entry], restored_history: bool) -> int:
    writer, now = store._writer(), store._clock()
    for e in entries:
        row = writer.stored(e.namespace, e.key)
        old_text, counter = row if row else (None, 0)
        version = max(e.version, counter + 1) if row else e.version
        new_text = encode_value(e.value)
        writer.write(e.namespace, e.key, new_text, version, row is not None, e.updated_by,
                     e.run_id, e.updated_at)
        if restored_history and row is None:
            continue  # its story is in the restored history already
        store._conn.execute(INSERT_HISTORY, (
            e.namespace, e.key, HistoryOp.IMPORT.value, ADMIN_AGENT, "import", now,
            counter if old_text is not None else None, version, old_text, new_text))
    return len(entries)
