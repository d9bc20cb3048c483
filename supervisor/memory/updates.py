"""What an agent sends the memory store and what it gets back: updates and their results.

The wire form an agent writes is checked here (`parse_update`); whether an update may apply is
decided when it is written (memory_writes).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from typing import Any

import msgspec

ADMIN_AGENT = "watchkeeper-admin"  # the agent named on revert and import writes


class Op(StrEnum):
    PUT = "put"
    MERGE = "merge"
    APPEND = "append"
    DELETE = "delete"


class HistoryOp(StrEnum):
    """What a history record did: an agent's `Op`, or an administrative write."""

    PUT = "put"
    MERGE = "merge"
    APPEND = "append"
    DELETE = "delete"
    REVERT = "revert"
    IMPORT = "import"


class Status(StrEnum):
    APPLIED = "applied"
    REJECTED = "rejected"


class Reason(StrEnum):
    VERSION_CONFLICT = "version_conflict"
    TOO_LARGE = "too_large"
    SCHEMA = "schema"
    FORBIDDEN = "forbidden"
    MALFORMED = "malformed"


class _AgentUpdate(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    # The wire form has no agent/run_id fields, so an agent that tries to set them is refused.
    op: Op
    namespace: str
    key: str
    value: Any = msgspec.UNSET
    expect_version: int | None = None
    idempotency_key: str | None = None


class Update(_AgentUpdate, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """One write. `agent` and `run_id` are set by the daemon from the run, never by the agent."""

    agent: str = ""
    run_id: str = ""


class MalformedUpdate(ValueError):
    """An agent sent something that is not an update; the message says what would be valid."""


def parse_update(payload: bytes | str | Mapping[str, Any], *, agent: str, run_id: str) -> Update:
    """Decode an agent's update (JSON bytes/str or a decoded dict) and stamp agent and run_id."""
    try:
        if isinstance(payload, bytes | str):
            wire = msgspec.json.decode(payload, type=_AgentUpdate)
        else:
            wire = msgspec.convert(payload, type=_AgentUpdate)
    except (msgspec.ValidationError, msgspec.DecodeError, RecursionError) as exc:
        raise MalformedUpdate(f"bad update from agent {agent!r}: {exc}; expected "
                              f"{{op: put|merge|append|delete, namespace, key, value?, "
                              f"expect_version?, idempotency_key?}}") from exc
    return Update(**msgspec.structs.asdict(wire), agent=agent, run_id=run_id)


class Result(msgspec.Struct, kw_only=True, frozen=True, omit_defaults=True):
    """The outcome of one update: applied with its new version, or rejected with a reason."""

    status: Status
    namespace: str = ""
    key: str = ""
    version: int | None = None
    reason: Reason | None = None
    current_version: int | None = None
    detail: str = ""
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.status is Status.APPLIED


def rejected(update: Update | None, reason: Reason, detail: str,
             current_version: int | None = None) -> Result:
    return Result(status=Status.REJECTED, namespace=update.namespace if update else "",
                  key=update.key if update else "", reason=reason, detail=detail,
                  current_version=current_version)
