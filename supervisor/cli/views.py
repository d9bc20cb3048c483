"""What the operator verbs print: tables and sentences for a person, JSON on request.

The JSON of every verb is the daemon's reply unchanged (documented in docs/cli.md and
tested key by key); the human form is built here from the same reply, with local times
("14:02, 3 min ago"). Colour only on a terminal, never with NO_COLOR (no-color.org).
"""

from __future__ import annotations

import json
import os
import sys
import time

RED, GREEN, YELLOW, DIM = "31", "32", "33", "2"


def print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def colour_enabled(stream=None) -> bool:
    stream = stream or sys.stdout
    if "NO_COLOR" in os.environ or os.environ.get("TERM") == "dumb":
        return False
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def paint(text: str, code: str) -> str:
    return f"\033[{code}m{text}\033[0m" if colour_enabled() else text


# -- times ------------------------------------------------------------------------------------
def ago(ts: float | None, now: float | None = None) -> str:
    """'3 min ago', 'in 2 h', 'just now'; '-' for no time."""
    if not ts:
        return "-"
    delta = (now if now is not None else time.time()) - ts
    span = _span(abs(delta))
    if span is None:
        return "just now"
    return f"{span} ago" if delta > 0 else f"in {span}"


def _span(seconds: float) -> str | None:
    if seconds < 1:
        return None
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit}"
    return f"{seconds:.0f} s"


def span(seconds: float) -> str:
    """'3 min', '2 h', '0 s'."""
    return _span(seconds) or "0 s"


def when(ts: float | None, now: float | None = None) -> str:
    """Local clock time and how long ago: '14:02:07, 3 min ago'; the date when not today."""
    if not ts:
        return "-"
    local = time.localtime(ts)
    today = time.localtime(now if now is not None else time.time())
    fmt = "%H:%M:%S" if local[:3] == today[:3] else "%b %d %H:%M"
    return f"{time.strftime(fmt, local)}, {ago(ts, now)}"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f} s" if seconds < 60 else _span(seconds) or "0 s"


# -- tables -----------------------------------------------------------------------------------
def table(header: tuple, rows: list[tuple]) -> list[str]:
    """Left-aligned columns two spaces apart; the header dimmed on a terminal."""
    cells = [tuple(str(v) for v in header)] + [tuple(str(v) for v in r) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
             for r in cells]
    return [paint(lines[0], DIM)] + lines[1:]


def print_table(header: tuple, rows: list[tuple], empty: str) -> None:
    if not rows:
        print(empty)
        return
    for line in table(header, rows):
        print(line)


def shorten(text, width: int = 50) -> str:
    text = text if isinstance(text, str) else json.dumps(text, default=str)
    text = " ".join(text.split())
    return text if len(text) <= width else text[:width - 1] + "…"


# -- verbs ------------------------------------------------------------------------------------
def show_runs(runs: list[dict]) -> None:
    rows = []
    for r in runs:
        took = duration(r["ended"] - r["started"]) if r["ended"] else "running"
        exit_text = (f"signal {r['signal']}" if r["signal"] else
                     f"exit {r['exit_code']}" if r["ended"] else "")
        rows.append((r["run_id"], r["job"], when(r["started"]), took,
                     _outcome(r["outcome"]), exit_text, r["stop_reason"] or ""))
    print_table(("RUN", "JOB", "STARTED", "TOOK", "OUTCOME", "EXIT", "STOPPED BY"), rows,
                "no runs recorded yet")


def _outcome(outcome: str | None) -> str:
    if not outcome:
        return "-"
    colour = {"succeeded": GREEN, "failed": RED, "timed_out": RED, "killed": RED}.get(outcome)
    return paint(outcome, colour) if colour else outcome


def show_locks(locks: list[dict]) -> None:
    rows = [(lk["task"], "held" if lk["held"] else "free (stale file)",
             (lk["owner"] or {}).get("agent", "-"), (lk["owner"] or {}).get("run_id", "-"),
             when((lk["owner"] or {}).get("started"))) for lk in locks]
    print_table(("TASK", "STATE", "AGENT", "RUN", "SINCE"), rows, "no task locks")


def show_outputs(outputs: list[dict]) -> None:
    rows = [(when(o["time"]), o["agent"], o["kind"],
             "allowed" if o["allowed"] else paint("denied", RED), shorten(o["summary"]))
            for o in outputs]
    print_table(("TIME", "AGENT", "KIND", "GATE", "SUMMARY"), rows, "no outputs recorded yet")


def show_memory_list(entries: list[dict]) -> None:
    rows = [(e["key"], e["version"], when(e["updated_at"]), e["updated_by"],
             shorten(e["value"], 40)) for e in entries]
    print_table(("KEY", "VERSION", "UPDATED", "BY", "VALUE"), rows, "no entries")


def show_memory_history(changes: list[dict]) -> None:
    rows = [(c["seq"], when(c["time"]), c["agent"], c["op"], f"{c['namespace']}/{c['key']}",
             f"{c['old_version'] or '-'} -> {c['new_version'] or '-'}") for c in changes]
    print_table(("SEQ", "TIME", "AGENT", "OP", "ENTRY", "VERSION"), rows, "no changes recorded")


def show_control_result(verb: str, result: dict | None) -> None:
    """One sentence for start-now, pause, resume and reload."""
    result = result or {}
    if verb == "start-now":
        run = f": run {result['run_id']}" if result.get("run_id") else ""
        print(f"{result.get('result', 'done')}{run}")
    elif verb in ("pause", "resume"):
        names = result.get("paused" if verb == "pause" else "resumed") or []
        print(f"{verb}d: {', '.join(names)}" if names else f"nothing to {verb}")
    elif verb == "reload":
        print(f"reloaded: {result.get('agents', 0)} agents")
    else:
        print(", ".join(f"{k}: {v}" for k, v in result.items()))


# -- status -----------------------------------------------------------------------------------
def show_status(status: dict, command_prefix: str = "watchkeeper", where=None) -> None:
    """The daemon line, the halt (why, since when, undelivered alerts, the reset command),
    memory as a bar, then one row per agent; NEXT only while the pipeline may run.
    `where(agent) -> str` adds a HOST column (several hosts, one pipeline)."""
    d = status["daemon"]
    breaker = status.get("extensions", {}).get("breaker") or {}
    print(f"watchkeeper {d['version']}, pid {d['pid']}, {d['state']}, "
          f"up {_span(d['uptime_s']) or '0 s'}"
          + (f", breaker {breaker['state']}" if breaker.get("state") else ""))
    halted = d.get("halted")
    if halted:
        _show_halt(status, command_prefix)
    memory = status.get("memory")
    if memory:
        print(f"memory  {bar(memory['percent_used'], memory['act_percent'])} "
              f"{memory['percent_used']:.0f}% used, {memory['level']} "
              f"(warning at {memory['warn_percent']:g}%, action at {memory['act_percent']:g}%)")
    header = (("AGENT", "STATE", "LAST", "OUTPUTS", "HEARTBEAT") + (() if halted else ("NEXT",))
              + (("HOST",) if where else ()))
    rows, notes = [], []
    for a in status["agents"]:
        state = a["state"] + (" paused" if a["paused"] else "") + (
            f" ({a['job']})" if a.get("job") and a["state"] == "running" else "")
        last = f"{_outcome(a['last_outcome'])} {ago(a['last_ended'])}" if a["last_ended"] else "-"
        row = (a["agent"], state, last, window_fill(a.get("breaker_window")),
               _age(a.get("heartbeat_age_s")))
        rows.append(row + (() if halted else (ago(a["next_run"]),)) + ((where(a),) if where else ()))
        if a["degraded"]:
            reason = a.get("degraded_reason") or "upstream " + ", ".join(a["degraded"])
            notes.append(f"{a['agent']}: {paint('degraded', YELLOW)}: {reason}")
    print()
    print_table(header, rows, "no agents configured")
    for note in notes:
        print(note)


def _show_halt(status: dict, command_prefix: str) -> None:
    d = status["daemon"]
    since = f" since {when(d['halted_since'])}" if d.get("halted_since") else ""
    reason = d.get("halt_reason") or "circuit breaker open"
    print(paint(f"HALTED{since}: {reason}", RED))
    undelivered = undelivered_alerts(status)
    if undelivered is not None:
        print(f"  alerts not yet delivered: {undelivered}")
    print("  nothing starts until the breaker is reset:")
    print(f"  {command_prefix} breaker reset --reason \"what was fixed\"")


def undelivered_alerts(status: dict) -> int | None:
    """The alert outbox's undelivered count (the breaker feature's `alerts`), when the
    daemon reports one."""
    alerts = (status.get("extensions", {}).get("breaker") or {}).get("alerts")
    if isinstance(alerts, dict) and isinstance(alerts.get("undelivered"), int):
        return alerts["undelivered"]
    return None


def window_fill(window: dict | None, painted: bool = True) -> str:
    """'9/10 in 60 s', red from 80 % of the limit when `painted`."""
    if not window:
        return "-"
    text = f"{window['outputs']}/{window['max_outputs']} in {window['window_s']:g} s"
    return paint(text, RED) if painted and window_near_limit(window) else text


def window_near_limit(window: dict | None) -> bool:
    return bool(window) and window["outputs"] >= 0.8 * window["max_outputs"]


def _age(seconds: float | None) -> str:
    return "-" if seconds is None else f"{_span(seconds) or '0 s'} ago"


def bar(percent: float, full_at: float, width: int = 20) -> str:
    """[#####.....]: `percent` of `full_at`; ASCII so any terminal and font shows it."""
    filled = max(0, min(width, round(width * percent / full_at))) if full_at > 0 else 0
    text = "#" * filled + "." * (width - filled)
    colour = RED if percent >= full_at else YELLOW if filled > width * 0.8 else None
    return f"[{paint(text, colour) if colour else text}]"
