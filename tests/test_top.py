"""`watchkeeper top`: the layout at 80x24, and the live screen in a real terminal."""

from __future__ import annotations

import os
import time

from harness import PY, DaemonProc, py, wk
from support import wait_until
from terminal import Terminal

from supervisor.cli.top import View, frame


def agent(name: str, **extra) -> dict:
    return {"agent": name, "state": "idle", "paused": False, "degraded": [], "run_id": None,
            "pid": None, "job": None, "failures": 0, "last_outcome": None, "last_exit": None,
            "last_ended": None, "next_run": None, "heartbeat_age_s": 12.0,
            "breaker_window": {"outputs": 9, "max_outputs": 10, "window_s": 60.0},
            "degraded_reason": None, **extra}


def view(now: float, runs: list[dict], halted: bool = False) -> View:
    status = {"daemon": {"pid": 1, "version": "0", "state": "running", "uptime_s": 600,
                         "halted": halted, "halt_reason": "circuit breaker tripped by b",
                         "halted_since": now - 60},
              "agents": [agent("a"), agent("b", degraded=["a"])],
              "extensions": {"breaker": {"state": "open" if halted else "closed",
                                         "alerts": {"undelivered": 2, "oldest_age_s": 50.0,
                                                    "last_error": "refused"}}},
              "memory": {"level": "normal", "percent_used": 40.0, "warn_percent": 80.0,
                         "act_percent": 87.0}}
    return View(status, runs, [], now, hours=3.0)


def run(agent_name: str, started: float, ended: float | None, outcome: str | None) -> dict:
    return {"run_id": "r", "agent": agent_name, "job": "j", "started": started, "ended": ended,
            "outcome": outcome, "exit_code": 1 if outcome == "failed" else 0, "signal": None}


def text(lines) -> list[str]:
    return ["".join(t for t, _ in line) for line in lines]


def test_frame_fits_80x24_with_every_agent():
    """The screen is 24 lines of at most 79 characters, one row per agent with its fill."""
    now = time.time()
    screen = text(frame(view(now, []), 80, 24))
    assert len(screen) == 24 and all(len(line) <= 79 for line in screen)
    rows = [line for line in screen if line.startswith(("a ", "b "))]
    assert len(rows) == 2 and all("9/10 in 60 s" in row for row in rows)


def test_timeline_cells_show_each_outcome_where_it_happened():
    """A failed run is an x in its interval, a success a #, a running run a >, none a dot."""
    now = time.time()
    runs = [run("a", now - 3 * 3600 + 10, now - 3 * 3600 + 20, "succeeded"),
            run("a", now - 90 * 60, now - 89 * 60, "failed"), run("a", now - 5, None, None)]
    row = next(line for line in text(frame(view(now, runs), 80, 24)) if line.startswith("a "))
    cells = row[44:]
    assert len(cells) == 34
    assert cells[0] == "#" and cells[-1] == ">" and cells.count("x") == 1
    assert cells.index("x") == len(cells) // 2 and set(cells) == {"#", ".", "x", ">"}


def test_halted_frame_shows_reason_alerts_and_reset():
    """Halted, the screen names the reason, the undelivered alerts and the reset command."""
    screen = text(frame(view(time.time(), [], halted=True), 80, 24))
    assert screen[1].startswith("HALTED 1 min ago: circuit breaker tripped by b")
    assert screen[2] == 'reset: watchkeeper breaker reset --reason "..."; alerts undelivered: 2'


def test_top_in_a_terminal_shows_agents_and_keys_act(tmp_path):
    """In a real 80x24 terminal top shows each agent; s, p and r act on the selected one,
    a trip shows HALTED, and q quits."""
    runaway = ("from supervisor.sdk import Agent; a = Agent()\n"
               "for i in range(5): a.emit('post', f'post {i}')")
    agents = {name: {"jobs": [{"id": "j", "command": py(code), "schedule": {"every_s": 3600}}]}
              for name, code in (("alpha", "pass"), ("runaway", runaway))}
    env = {k: v for k, v in os.environ.items() if k.startswith(("PATH", "PYTHON", "HOME"))}
    with DaemonProc(tmp_path / "d", agents,
                    breaker={"outputs": {"max_outputs": 2, "window_s": 60}}) as d:
        d.start()
        config = str(d.config_path)
        term = Terminal(tmp_path, [PY, "-m", "supervisor.cli", "--config", config, "top",
                                   "--interval-s", "0.3"], {**env, "TERM": "xterm"})
        try:
            term.wait_for("runaway")
            assert "alpha" in term.screen()
            term.send("s")
            wait_until(lambda: d.call("runs", agent="alpha"), 15)
            term.wait_for("start-now alpha: started")
            term.send("p")
            wait_until(lambda: d.call("status")["agents"][0]["paused"], 15)
            term.send("r")
            wait_until(lambda: not d.call("status")["agents"][0]["paused"], 15)
            assert wk("--config", config, "start-now", "runaway").returncode == 0
            term.wait_for("HALTED")
            screen = term.lines()
            assert len(screen) <= 24 and all(len(line) <= 80 for line in screen)
            assert any("BREAKER TRIPPED" in line for line in screen)
            term.send("q")
            wait_until(lambda: "watchkeeper pid" not in term.screen(), 10)
        finally:
            term.close()
