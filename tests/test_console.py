"""The daemon's console for a person: one short line per thing that happened."""

from __future__ import annotations

import os
import re

import pytest
import structlog
import yaml
from harness import PY, DaemonProc, py, wk
from support import wait_until
from terminal import Terminal

from supervisor.log.console import PersonConsole

LINE = re.compile(r"^\d\d:\d\d:\d\d \S+\s* │ ")


def render(event: dict, **kwargs) -> str | None:
    try:
        return PersonConsole(width=80, **kwargs)(None, event.get("level", "info"), event)
    except structlog.DropEvent:
        return None


def test_agent_output_is_time_agent_and_text():
    """An agent's line is shown as `HH:MM:SS agent │ text`, nothing else."""
    line = render({"event": "agent_output", "agent": "content", "run_id": "r1",
                   "stream": "stdout", "line": "drafted solar-panels"})
    assert re.fullmatch(r"\d\d:\d\d:\d\d content     │ drafted solar-panels", line)


def test_bookkeeping_only_with_verbose():
    """run_started is hidden by default and shown with -v."""
    event = {"event": "run_started", "agent": "seo", "level": "info", "run_id": "r", "pid": 7}
    assert render(event) is None
    assert "run_started" in render(event, verbose=True)


def test_failed_run_is_shown_and_a_successful_one_is_not():
    """A failed run is an operator's business; a successful one is bookkeeping."""
    failed = {"event": "run_finished", "agent": "seo", "outcome": "failed", "exit": "exit 1"}
    assert render(failed).endswith("│ run failed: exit 1")
    assert render({**failed, "outcome": "succeeded"}) is None


def test_breaker_trip_is_shown_once():
    """The breaker's own error record is dropped; the gate's critical record is the line."""
    trip = {"event": "breaker_tripped", "agent": "content", "limit": "10 outputs in 60s",
            "count": 11}
    assert render({**trip, "level": "error"}) is None
    assert render({**trip, "level": "critical"}).endswith(
        "│ BREAKER TRIPPED: 11 > 10 outputs in 60s; pipeline halted")


def test_long_lines_fit_the_width():
    """A long agent line is cut to the terminal's width with an ellipsis."""
    line = render({"event": "agent_output", "agent": "a", "line": "x" * 300})
    assert len(line) == 80 and line.endswith("…")


@pytest.fixture
def console_daemon(tmp_path):
    """A daemon in a real 80x24 terminal with an agent that talks and one that runs away."""
    (tmp_path / "agents.d").mkdir()
    (tmp_path / "watchkeeper.yaml").write_text(yaml.safe_dump({
        "state_dir": str(tmp_path / "state"), "stop_grace_s": 2,
        "breaker": {"outputs": {"max_outputs": 2, "window_s": 60}}}))
    talk = "print('hello from the talker', flush=True)"
    runaway = ("from supervisor.sdk import Agent; a = Agent()\n"
               "for i in range(5): a.emit('post', f'post {i}')")
    for name, code, every_s in (("talker", talk, 3600), ("runaway", runaway, 3600)):
        (tmp_path / "agents.d" / f"{name}.yaml").write_text(yaml.safe_dump(
            {"jobs": [{"id": "j", "command": py(code), "schedule": {"every_s": every_s}}]}))
    env = {k: v for k, v in os.environ.items() if k.startswith(("PATH", "PYTHON", "HOME"))}
    term = Terminal(tmp_path, [PY, "-m", "supervisor.cli", "--config",
                               str(tmp_path / "watchkeeper.yaml"), "run"],
                    {**env, "TERM": "xterm", "NO_COLOR": "1"})
    yield term, tmp_path
    term.send("C-c")
    pid_file = tmp_path / "state" / "daemon.pid"
    wait_until(lambda: "stopped (exit" in term.screen() or not pid_file.exists(), 20)
    term.close()


def test_console_in_a_terminal_is_one_short_line_per_thing(console_daemon):
    """In an 80x24 terminal the daemon prints agent output and the trip as short framed
    lines, no bookkeeping and no key=value wall, and a clean start has no warning."""
    term, tmp_path = console_daemon
    term.wait_for("│ started: 2 agents")
    cfg = ("--config", str(tmp_path / "watchkeeper.yaml"))
    assert wk(*cfg, "start-now", "talker").returncode == 0
    term.wait_for("talker      │ hello from the talker")
    assert wk(*cfg, "start-now", "runaway").returncode == 0
    term.wait_for("│ BREAKER TRIPPED")
    lines = [ln for ln in term.lines() if ln.strip()]
    assert all(LINE.match(ln) for ln in lines), lines
    assert all(len(ln) <= 80 for ln in lines)
    assert not any("run_started" in ln or "agent_state" in ln for ln in lines), lines
    assert sum("BREAKER TRIPPED" in ln for ln in lines) == 1
    before_trip = lines[:next(i for i, ln in enumerate(lines) if "runaway" in ln)]
    assert not any("=" in ln for ln in before_trip), before_trip



def test_a_real_trip_and_reset_are_each_logged_once(tmp_path):
    """In the JSON log of a real trip and `breaker reset`, each is exactly one record."""
    runaway = ("from supervisor.sdk import Agent; a = Agent()\n"
               "for i in range(5): a.emit('post', f'post {i}')")
    agents = {"runaway": {"jobs": [{"id": "j", "command": py(runaway),
                                    "schedule": {"every_s": 3600}}]},
              "idle": {"jobs": [{"id": "j", "command": py("pass"),
                                 "schedule": {"every_s": 3600}}]}}
    d = DaemonProc(tmp_path, agents, breaker={"outputs": {"max_outputs": 2, "window_s": 60}})
    with d.start():
        d.call("start-now", agent="runaway")
        d.wait_event("breaker_tripped", timeout_s=20)
        d.wait_event("run_finished", agent="runaway", timeout_s=20)
        reset = wk("--config", str(d.config_path), "breaker", "reset", "--reason", "fixed")
        assert reset.returncode == 0, reset.stderr
        d.wait_event("breaker_reset")
        # A run after the reset: anything the trip or the reset logs comes before its end.
        d.call("start-now", agent="idle")
        d.wait_event("run_finished", agent="idle", timeout_s=20)
    assert [e["level"] for e in d.find("breaker_tripped")] == ["critical"]
    assert [(e["level"], e["reason"]) for e in d.find("breaker_reset")] == [("warning", "fixed")]


def test_restart_with_a_closed_breaker_warns_of_nothing(tmp_path):
    """A second start restores a closed breaker at info level: no warning at all."""
    agents = {"idle": {"jobs": [{"id": "j", "command": py("pass"),
                                 "schedule": {"every_s": 3600}}]}}
    d = DaemonProc(tmp_path, agents)
    with d.start():
        pass
    with d.start():
        restored = d.wait_event("breaker_restored")
        warnings = [e for e in d.events if e.get("level") in ("warning", "error", "critical")]
    assert restored["level"] == "info" and restored["state"] == "closed"
    assert [e["event"] for e in warnings if e["event"] != "agents_not_isolated"] == []
