"""The arguments of every control command, as one strict struct per command.

Checked before a handler runs, so a handler only ever sees arguments of the right types and
ranges: a big integer, a list where a string belongs or an unknown argument is an error reply
naming the field (`args.limit: Expected int <= 1000`), never an exception in a handler (the
fuzz suite found 1,827 "internal error" replies before this). Handlers still read
`req.args` as a dict; this module only decides whether that dict is acceptable.

`memory` (an agent's write) is checked by memory.updates.parse_update, whose struct is the
same discipline; commands not listed here (debug commands) check their own arguments.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from .protocol import Request, error

Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
Name = Annotated[str, msgspec.Meta(max_length=512)]


class _Args(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class NoArgs(_Args):
    pass


class AgentArgs(_Args):  # pause, resume, reload and stop (the CLI may name an agent/job)
    agent: Name | None = None
    job: Name | None = None


class RunsArgs(_Args):
    agent: Name | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 20


class TaskArgs(_Args):
    task: Annotated[str, msgspec.Meta(max_length=128)]


class EmitArgs(_Args):
    kind: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    summary: str = ""
    content: str | None = None
    content_hash: Annotated[str, msgspec.Meta(max_length=128)] | None = None


class UsageArgs(_Args):
    tokens: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    cost: float = 0.0
    model: str = ""


class OutputsArgs(_Args):
    agent: Name | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 50


class ReasonArgs(_Args):
    reason: str


class MemoryKeyArgs(_Args):
    namespace: Name
    key: Name


class MemoryListArgs(_Args):
    namespace: Name
    prefix: Name = ""


class MemoryHistoryArgs(_Args):
    namespace: Name | None = None
    key: Name | None = None
    agent: Name | None = None
    run_id: Name | None = None
    limit: Annotated[int, msgspec.Meta(ge=1, le=10000)] = 100


class SearchArgs(_Args):
    query: str
    k: Annotated[int, msgspec.Meta(ge=1, le=1000)] | None = None
    token_budget: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] | None = None
    namespaces: list[Name] | None = None
    speakers: list[Name] | None = None
    explain: bool = False


class RevertArgs(_Args):
    seq: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)] | None = None
    agent: Name | None = None
    run_id: Name | None = None
    force: bool = False


class ExportArgs(_Args):
    part: Literal["entries", "history"] = "entries"
    after: Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)] = 0
    max_bytes: Annotated[int, msgspec.Meta(ge=1024, le=64 << 20)] = 2 << 20


class ImportArgs(_Args):
    data: dict[str, Any]
    restored_history: bool = False


ARGS: dict[str, type[_Args]] = {
    "ping": NoArgs, "status": NoArgs, "locks": NoArgs, "heartbeat": NoArgs,
    "breaker-status": NoArgs, "memory-export": ExportArgs,
    "runs": RunsArgs, "outputs": OutputsArgs,
    "start-now": AgentArgs, "pause": AgentArgs, "resume": AgentArgs, "reload": AgentArgs,
    "stop": AgentArgs,
    "lock": TaskArgs, "unlock": TaskArgs,
    "emit": EmitArgs, "usage": UsageArgs, "breaker-reset": ReasonArgs,
    "memory-get": MemoryKeyArgs, "memory-list": MemoryListArgs,
    "memory-history": MemoryHistoryArgs, "search": SearchArgs,
    "memory-revert": RevertArgs, "memory-import": ImportArgs,
}

_AT = re.compile(r" - at `\$(?P<path>[^`]*)`\Z")


def check_args(req: Request) -> bytes | None:
    """None when `req.args` fits its command's struct; the error reply otherwise."""
    struct = ARGS.get(req.cmd)
    if struct is None:
        return None
    try:
        msgspec.convert(req.args, struct)
    except msgspec.ValidationError as exc:
        return error(req.id, f"{req.cmd}: invalid arguments: {_for_people(str(exc), struct)}",
                     field=_field(str(exc)))
    return None


def _field(message: str) -> str | None:
    found = _AT.search(message)
    if found:
        return "args" + found["path"]
    named = re.search(r"field `([^`]*)`", message)  # unknown or missing
    return f"args.{named[1]}" if named else None


def _for_people(message: str, struct: type[_Args]) -> str:
    """msgspec's `Expected int <= 1000 - at `$.limit`` as `args.limit: expected int <= 1000`."""
    found = _AT.search(message)
    if not found:
        named = re.search(r"Object (?P<what>missing required|contains unknown) field `(?P<f>[^`]*)`",
                          message)
        if named is None:
            return message
        allowed = ", ".join(struct.__struct_fields__) or "none"
        what = "unknown" if named["what"] == "contains unknown" else "missing required"
        return f"args.{named['f']}: {what} argument (arguments: {allowed})"
    what = message[:found.start()].replace("`", "")
    return f"args{found['path']}: {what[0].lower()}{what[1:]}"
