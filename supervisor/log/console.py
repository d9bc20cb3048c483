"""The daemon's log in a terminal, for a person: `HH:MM:SS agent │ text`, one short line
per thing that happened.

Shown: what agents print, and the events an operator acts on (a trip, a degraded agent, a
memory action, a crash loop, an alert delivered or failing, a failed run), plus every
warning and error. Bookkeeping (`agent_state`, `run_started`, ...) only with `-v`. JSON
lines and the journal keep every event and field; this is only the terminal's view.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import structlog

DAEMON = "watchkeeper"
RED, YELLOW, DIM, BOLD = "31", "33", "2", "1"


def _g(e: dict, key: str, default="?"):
    value = e.get(key)
    return default if value is None else value


# event -> the sentence an operator reads. Everything info-level not named here (and not
# agent output) is bookkeeping.
SENTENCES: dict[str, Callable[[dict], str]] = {
    "breaker_tripped": lambda e: f"BREAKER TRIPPED: {_g(e, 'count')} > {_g(e, 'limit')}; "
                                 "pipeline halted",
    "pipeline_halted_at_start": lambda e: "pipeline HALTED (breaker open since before the "
                                          "restart); `watchkeeper breaker reset --reason ...`",
    "breaker_reset": lambda e: f"breaker reset by {_g(e, 'by')}: {_g(e, 'reason')}",
    "agent_degraded": lambda e: "degraded: " + ", ".join(
        f"{k} {v}" for k, v in (e.get("reasons") or {}).items()),
    "agent_recovered": lambda e: "recovered: upstreams healthy again",
    "agent_crash_loop": lambda e: f"crash loop: {_g(e, 'failures')} failures in a row "
                                  f"(last {_g(e, 'last_exit')}); cooling down "
                                  f"{_g(e, 'cooldown_s')} s",
    "run_finished": lambda e: f"run {e.get('outcome')}: {_g(e, 'exit')}"
                              + (f" ({e['stop_reason']})" if e.get("stop_reason") else ""),
    "memory_level_changed": lambda e: f"memory {_g(e, 'level')} "
                                      f"({_g(e, 'percent_used')}% used)",
    "memory_stop_run": lambda e: f"memory: run stopped at {_g(e, 'memory_mb')} MB "
                                 f"(limit {_g(e, 'limit_mb')} MB)",
    "orphan_killed": lambda e: f"memory: killed orphaned {_g(e, 'cmdline')} "
                               f"({_g(e, 'rss_freed_mb')} MB freed)",
    "alert_delivered": lambda e: f"alert {_g(e, 'kind')} delivered to {_g(e, 'sink')}",
    "alert_delivery_failed": lambda e: f"alert {_g(e, 'kind')} NOT delivered to "
                                       f"{_g(e, 'sink')}: {_g(e, 'error')}",
    "alert_retry": lambda e: f"alert {_g(e, 'kind')} to {_g(e, 'sink')} failed "
                             f"(attempt {_g(e, 'attempt')}), retrying: {_g(e, 'error')}",
    "agents_not_isolated": lambda e: "agents run as the daemon's user, NOT isolated: set "
                                     "agent_user (docs/security.md)",
    "daemon_started": lambda e: f"started: {_g(e, 'agents')} agents (`watchkeeper status` "
                                "shows them)",
    "breaker_state_changed": lambda e: f"breaker {_g(e, 'from_state')} -> "
                                       f"{_g(e, 'to_state')}: {_g(e, 'reason', '')}",
    "daemon_stopped": lambda e: f"stopped (exit {_g(e, 'exit_code')})",
    "reload_applied": lambda e: f"configuration reloaded: {_g(e, 'agents')} agents",
    "reload_rejected": lambda e: f"reload REJECTED ({_g(e, 'errors')} errors); still running "
                                 "the previous configuration",
}
# A successful run is bookkeeping; only a failed one is worth a line by default.
QUIET_UNLESS = {"run_finished": lambda e: e.get("outcome") not in (None, "succeeded"),
                # closed -> open is the trip, which has its own line
                "breaker_state_changed": lambda e: e.get("to_state") != "open"}
# Keys that are already in the line's frame, or noise for a person.
FRAME_KEYS = {"event", "level", "timestamp", "agent", "run_id", "logger"}


class PersonConsole:
    """structlog renderer: the terminal's one line per event, or DropEvent."""

    __slots__ = ("verbose", "colors", "width")

    def __init__(self, verbose: bool = False, colors: bool = False,
                 width: int | None = None) -> None:
        self.verbose, self.colors, self.width = verbose, colors, width

    def __call__(self, logger, method: str, event_dict: dict) -> str:
        text = self.text(event_dict)
        if text is None:
            raise structlog.DropEvent
        agent = event_dict.get("agent") or DAEMON
        line = f"{time.strftime('%H:%M:%S')} {agent:<11} │ {text}"
        width = self.width or _columns()
        if len(line) > width:
            line = line[:width - 1] + "…"
        return self.paint(line, event_dict.get("level", "info"))

    def text(self, e: dict) -> str | None:
        event, level = e.get("event", ""), e.get("level", "info")
        if event == "agent_output":
            return str(e.get("line", ""))
        # The breaker logs its trip and the gate logs it again with the halt: show one.
        if event == "breaker_tripped" and level == "error":
            return None
        sentence = SENTENCES.get(event)
        wanted = QUIET_UNLESS.get(event, lambda _e: True)(e)
        if sentence is not None:
            return sentence(e) if wanted or self.verbose else None
        if level in ("warning", "error", "critical") or self.verbose:
            return _generic(e)
        return None

    def paint(self, line: str, level: str) -> str:
        if not self.colors:
            return line
        code = {"critical": BOLD + ";" + RED, "error": RED, "warning": YELLOW,
                "debug": DIM}.get(level)
        return f"\033[{code}m{line}\033[0m" if code else line


def _generic(e: dict) -> str:
    """`event_name: key=value ...` for events without a sentence (warnings, -v)."""
    fields = " ".join(f"{k}={v}" for k, v in e.items() if k not in FRAME_KEYS)
    return f"{e.get('event', '')}: {fields}" if fields else str(e.get("event", ""))


def _columns() -> int:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns
    except (OSError, ValueError):
        return 100
