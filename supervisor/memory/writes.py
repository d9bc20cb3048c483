"""Writing one update: the checks that decide whether it applies, then the write and its history.

Every check runs before anything is written, so a rejected update leaves no trace and never
aborts the others in its batch. `UpdateWriter` works inside a transaction its caller holds
(MemoryStore, one per batch); it neither opens nor commits one.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import msgspec

from .settings import StewardSettings, json_type, schema_error
from .sqlite import INSERT_HISTORY, decode_value, encode_value
from .updates import HistoryOp, Op, Reason, Result, Status, Update, rejected

MAX_NESTING = 64  # deeper values are malformed: merge and schema checks walk the tree
MAX_NAME_CHARS = 512


def allowed(agent_write_globs: Iterable[str], namespace: str) -> bool:
    """True when `namespace` matches one of the agent's write globs (fnmatch, case-sensitive)."""
    return any(fnmatchcase(namespace, glob) for glob in agent_write_globs)


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


class UpdateWriter:
    """Checks and writes updates on one connection, inside the caller's open transaction."""

    __slots__ = ("_conn", "_settings")

    def __init__(self, conn: sqlite3.Connection, settings: StewardSettings) -> None:
        self._conn, self._settings = conn, settings

    def apply_checked(self, update: Update, write_globs: Sequence[str], now: float) -> Result:
        """Apply an agent's update: shape, grant and idempotency checks first, then `apply`."""
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
        result = self.apply(update, HistoryOp(update.op.value), now)
        if result.ok and update.idempotency_key is not None:
            self._conn.execute("insert into idempotency values (?, ?, ?, ?)",
                               (update.agent, update.idempotency_key,
                                msgspec.json.encode(result).decode(), now))
        return result

    def apply(self, update: Update, history_op: HistoryOp, now: float) -> Result:
        """Check and write one update inside the open transaction; nothing is written on reject."""
        row = self.stored(update.namespace, update.key)
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
        self.write(update.namespace, update.key, new_text, counter + 1, row is not None,
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
        if size > self._settings.max_value_bytes:
            return Reason.TOO_LARGE, (f"value is {size} bytes encoded; max_value_bytes is "
                                      f"{self._settings.max_value_bytes}")
        for glob, schema in self._settings.schemas.items():
            if fnmatchcase(namespace, glob):
                problem = schema_error(new, schema)
                return (Reason.SCHEMA, f"schema {glob!r}: {problem}") if problem else None
        return None

    def stored(self, namespace: str, key: str) -> tuple[str | None, int] | None:
        """A key's stored (value text, version counter), tombstone or not; None if never written."""
        return self._conn.execute(
            "select value, version from entries where namespace = ? and key = ?",
            (namespace, key)).fetchone()

    def write(self, namespace: str, key: str, value: str | None, version: int, exists: bool,
              agent: str, run_id: str, now: float) -> None:
        """Set a key's value (None: tombstone), version and provenance; no checks, no history."""
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
