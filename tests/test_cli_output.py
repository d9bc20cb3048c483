"""What the operator verbs print: documented JSON keys, tables for people, colour rules,
a closed pipe, and a halted pipeline's status."""

from __future__ import annotations

import json
import os
import pty
import re
import subprocess
from pathlib import Path

import pytest
from harness import PY, DaemonProc, py, wk
from support import wait_until

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"

WORKER = ("from supervisor.sdk import Agent; a = Agent(); a.heartbeat(); "
          "a.memory.put('worker', 'k1', {'x': 1}); a.emit('post', 'hello world')")
HOLDER = ("import time; from supervisor.sdk import Agent; a = Agent(); a.lock('t1'); "
          "time.sleep(3600)")


def documented_keys() -> dict[str, set[str]]:
    """docs/cli.md's key table: {"status .daemon": {"pid", ...}, "runs": {...}}."""
    keys = {}
    for line in DOC.read_text().splitlines():
        m = re.match(r"\| `([^`]+)`( \S+)? \| [^|]+ \| (.+) \|$", line)
        if m:
            where = m.group(1) + (m.group(2) or "")
            names = re.findall(r"`([a-z_]+)`", m.group(3).split(" (and ")[0])
            keys[where] = set(names)
    return keys


@pytest.fixture(scope="module")
def daemon(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-output")
    agents = {"worker": {"jobs": [{"id": "j", "command": py(WORKER),
                                   "schedule": {"every_s": 3600}}]},
              "holder": {"jobs": [{"id": "j", "command": py(HOLDER),
                                   "schedule": {"every_s": 3600}}]}}
    with DaemonProc(root, agents) as d:
        d.start()
        d.call("start-now", agent="worker")
        d.call("start-now", agent="holder")
        wait_until(lambda: any(r["ended"] for r in d.call("runs", agent="worker")), 15)
        wait_until(lambda: d.call("locks"), 15)
        yield d


def run_json(d: DaemonProc, *verb: str):
    res = wk("--config", str(d.config_path), *verb, "--json")
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def first(value):
    return value[0] if isinstance(value, list) else value


JSON_VERBS = {
    "status": ("status",), "runs": ("runs",), "locks": ("locks",), "outputs": ("outputs",),
    "breaker status": ("breaker", "status"), "memory list": ("memory", "list", "worker"),
    "memory history": ("memory", "history"), "memory export": ("memory", "export"),
    "search": ("search", "hello"), "check-config": ("check-config",),
    "pause": ("pause", "worker"), "resume": ("resume", "worker"), "reload": ("reload",),
    "start-now": ("start-now", "worker"),
    "breaker reset": ("breaker", "reset", "--reason", "test"), "top": ("top",),
}


@pytest.mark.parametrize("verb", sorted(JSON_VERBS))
def test_json_keys_match_the_documented_ones(daemon, verb):
    """`--json` prints exactly the keys docs/cli.md documents for this verb."""
    documented = documented_keys()
    result = run_json(daemon, *JSON_VERBS[verb])
    assert set(first(result)) == documented[verb]
    if verb == "status":
        assert set(result["daemon"]) == documented["status .daemon"]
        assert set(result["agents"][0]) == documented["status .agents[]"]
        assert set(result["memory"]) == documented["status .memory"]
        window = result["agents"][0]["breaker_window"]
        assert set(window) == documented["status .agents[].breaker_window"]
    if verb == "locks":
        assert set(result[0]["owner"]) == documented["locks [].owner"]


def test_documented_verbs_are_all_tested():
    """Every verb in docs/cli.md's key table has a JSON test above."""
    verbs = {k.split(" .")[0].split(" [")[0] for k in documented_keys()}
    assert verbs == set(JSON_VERBS)


@pytest.mark.parametrize("verb", [("outputs",), ("locks",), ("memory", "list", "worker"),
                                  ("memory", "history"), ("runs", "worker")])
def test_human_tables_by_default(daemon, verb):
    """Without --json a listing verb prints a table with local times, not JSON."""
    res = wk("--config", str(daemon.config_path), *verb)
    assert res.returncode == 0, res.stderr
    assert not res.stdout.lstrip().startswith(("[", "{"))
    assert re.search(r"\d\d:\d\d:\d\d, (just now|\d+ (s|min) ago)", res.stdout), res.stdout


def test_control_verbs_answer_in_sentences(daemon):
    """pause, resume and reload say what they did in words, not key=value."""
    cfg = ("--config", str(daemon.config_path))
    assert wk(*cfg, "pause", "worker").stdout == "paused: worker\n"
    assert wk(*cfg, "resume", "worker").stdout == "resumed: worker\n"
    assert wk(*cfg, "reload").stdout == "reloaded: 2 agents\n"


def test_status_shows_window_fill_and_heartbeat_age(daemon):
    """status shows each agent's output window fill against its limit and its heartbeat age."""
    res = wk("--config", str(daemon.config_path), "status")
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith("worker"))
    assert re.search(r"\b1/\d+ in 600 s\b", row), row  # the limit is derived from the schedule
    assert re.search(r"\d+ (s|min) ago", row), row
    assert re.search(r"memory  \[[#.]{20}\] \d+% used", res.stdout), res.stdout


def test_closed_pipe_ends_quietly(daemon):
    """A reader that closed the pipe gets no traceback: exit 141, nothing on stderr."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        res = subprocess.run([PY, "-m", "supervisor.cli", "--config", str(daemon.config_path),
                              "status"], stdout=write_end, stderr=subprocess.PIPE, timeout=30)
    finally:
        os.close(write_end)
    assert res.stderr == b""
    assert res.returncode == 141


def status_on_a_terminal(d: DaemonProc, no_color: bool) -> str:
    """`status` with its stdout on a pseudo-terminal; what it wrote."""
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update({"TERM": "xterm", **({"NO_COLOR": "1"} if no_color else {})})
    leader, follower = pty.openpty()
    try:
        subprocess.run([PY, "-m", "supervisor.cli", "--config", str(d.config_path), "status"],
                       stdout=follower, stderr=subprocess.PIPE, timeout=30,
                       env=env, check=True)
        os.close(follower)
        chunks = []
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the writer is gone and everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks).decode()
    finally:
        os.close(leader)


def test_colour_on_a_terminal_but_never_with_no_color(daemon):
    """On a terminal status is coloured; NO_COLOR=1 removes every escape sequence."""
    assert "\033[" in status_on_a_terminal(daemon, no_color=False)
    assert "\033[" not in status_on_a_terminal(daemon, no_color=True)


def test_halted_status_says_why_since_when_and_how_to_reset(tmp_path):
    """Halted, status shows the trip, since when, the exact reset command, and no NEXT times."""
    emit_twice = ("from supervisor.sdk import Agent; a = Agent(); a.emit('post', 'one'); "
                  "a.emit('post', 'two')")
    agents = {"runaway": {"jobs": [{"id": "j", "command": py(emit_twice),
                                    "schedule": {"every_s": 3600}}]}}
    with DaemonProc(tmp_path, agents, breaker={"outputs": {"max_outputs": 1,
                                                           "window_s": 60}}) as d:
        d.start()
        d.call("start-now", agent="runaway")
        wait_until(lambda: d.call("status")["daemon"]["halted"], 15)
        res = wk("--config", str(d.config_path), "status")
    lines = res.stdout.splitlines()
    assert re.match(r"HALTED since \d\d:\d\d:\d\d, (just now|\d+ s ago): circuit breaker "
                    r"tripped by runaway: 2 seen, limit 1 outputs in 60s$", lines[1]), lines
    assert (f'  watchkeeper --config {d.config_path} breaker reset --reason "what was fixed"'
            in lines)
    header = next(ln for ln in lines if ln.startswith("AGENT"))
    assert "NEXT" not in header


def test_the_exit_code_table_in_cli_md_is_the_one_in_errors_py():
    """Every exit code the CLI returns is defined once (supervisor/errors.py) and docs/cli.md's
    table lists exactly those codes, busy as 4 and denied as 5."""
    from supervisor import errors

    codes = {name: value for name, value in vars(errors).items() if name.startswith("EXIT_")}
    table = DOC.read_text().split("## Exit codes", 1)[1]
    documented = {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}
    assert documented == set(codes.values())
    assert re.search(r"^\| 4 \| busy:", table, re.MULTILINE) and codes["EXIT_BUSY"] == 4
    assert re.search(r"^\| 5 \| denied:", table, re.MULTILINE) and codes["EXIT_DENIED"] == 5
