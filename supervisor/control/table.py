"""A table of control commands by who may call them: the core's own (handlers.py) and each
feature's (its `commands()`); the handlers merge them when the control server starts."""

from __future__ import annotations

from collections.abc import Callable

Handler = Callable[..., bytes | None]  # (handlers, connection, request[, run]) -> reply


class CommandTable:
    """Three kinds of caller: read-only (operators and runs), admin, and a run as its agent."""

    __slots__ = ("read_only", "admin", "agent")

    def __init__(self) -> None:
        self.read_only: dict[str, Handler] = {}
        self.admin: dict[str, Handler] = {}
        self.agent: dict[str, Handler] = {}

    def names(self) -> set[str]:
        return {*self.read_only, *self.admin, *self.agent}

    def merge(self, other: CommandTable) -> None:
        """Add `other`'s commands; a name served twice is a programming error."""
        twice = self.names() & other.names()
        if twice:
            raise ValueError(f"control commands served twice: {', '.join(sorted(twice))}")
        self.read_only.update(other.read_only)
        self.admin.update(other.admin)
        self.agent.update(other.agent)

    def get(self, name: str) -> Handler | None:
        return self.read_only.get(name) or self.admin.get(name) or self.agent.get(name)


def command(table: dict[str, Handler], name: str):
    """Decorator: put the function in `table` (one of a CommandTable's three) as `name`."""
    def register(fn: Handler) -> Handler:
        table[name] = fn
        return fn
    return register
