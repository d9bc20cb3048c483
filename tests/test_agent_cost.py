"""What agents pay for talking to the daemon: imports, and no files written on their own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from harness import DaemonProc, py

from supervisor.errors import DaemonNotRunning
from supervisor.sdk import Agent, NotInRun

ROOT = str(Path(__file__).resolve().parent.parent)
BIN = os.path.dirname(sys.executable)

# Modules the agents' side must never load: the daemon's dependencies, and the standard
# library's heavy parts. Checked in `python -I -S`, where nothing else imports them.
FORBIDDEN = ("structlog", "psutil", "msgspec", "yaml", "apscheduler", "asyncio", "ssl",
             "sqlite3", "socket", "argparse", "pathlib", "dataclasses", "typing", "threading",
             "re", "json", "enum",  # ~8 ms of every call: JSON goes through wire.py
             "supervisor.cli.main", "supervisor.runs.locks", "supervisor.health.heartbeat",
             "supervisor.control.protocol")

# Runs one `watchkeeper` verb in a fresh, bare interpreter and reports its exit code and
# the forbidden modules it loaded.
PROBE = f"""
import sys
sys.path.insert(0, {ROOT!r})
from supervisor.entry import main
try:
    code = main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {FORBIDDEN!r} or m in {FORBIDDEN!r})
import json  # only now: the verb itself must not have needed it
print(json.dumps({{"argv": sys.argv[1:], "code": code, "loaded": loaded}}), flush=True)
"""

VERBS = [["heartbeat"], ["lock", "t1"], ["unlock", "t1"], ["emit", "post", "hello"],
         ["usage", "--tokens", "12", "--cost", "0.01"], ["upstream-ok", "research"],
         ["memory", "put", "notes", "k", '{"a": 1}'], ["memory", "get", "notes", "k"],
         ["memory", "merge", "notes", "k", '{"b": 2}'], ["memory", "append", "notes", "l", "x"],
         ["search", "a"], ["memory", "delete", "notes", "k"]]

AGENT = f"""
import json, subprocess, sys
for argv in {VERBS!r}:
    out = subprocess.run([sys.executable, "-I", "-S", "-c", {PROBE!r}, *argv],
                         capture_output=True, text=True).stdout.splitlines()
    print(out[-1], flush=True)
"""


def bare_python(code: str, env: dict | None = None, cwd: Path | None = None):
    return subprocess.run([sys.executable, "-I", "-S", "-c", code], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=30)


def test_sdk_import_loads_only_what_the_socket_needs():
    """`import supervisor.sdk` in a fresh interpreter loads none of the forbidden modules."""
    code = (f"import sys; sys.path.insert(0, {ROOT!r}); import supervisor.sdk; "
            "print(' '.join(sorted(sys.modules)))")
    loaded = set(bare_python(code).stdout.split())
    assert "supervisor.sdk" in loaded and "_socket" in loaded
    assert loaded.isdisjoint(FORBIDDEN), sorted(loaded & set(FORBIDDEN))


def test_every_agent_verb_in_a_run_loads_only_what_the_socket_needs(tmp_path):
    """Each agent verb, run by a real agent against the daemon, succeeds without loading a
    forbidden module."""
    spec = {"jobs": [{"id": "main", "command": py(AGENT), "schedule": {"every_s": 3600}}],
            "memory_write": ["notes"]}
    with DaemonProc(tmp_path, {"probe": spec}).start() as d:
        d.call("start-now", agent="probe")
        d.wait_event("run_finished", agent="probe", timeout_s=60)
        results = [json.loads(e["line"]) for e in d.find("agent_output", agent="probe",
                                                         stream="stdout")]
        assert [r["argv"] for r in results] == VERBS, d.tail()
        assert [(r["argv"][0], r["code"]) for r in results if r["code"] != 0] == []
        assert [(r["argv"][0], r["loaded"]) for r in results if r["loaded"]] == []
        assert (d.state_dir / "status" / "probe.heartbeat").exists()


@pytest.mark.parametrize("argv", [["heartbeat"], ["lock", "t1"], ["emit", "post", "hi"],
                                  ["usage", "--tokens", "3"], ["upstream-ok", "research"],
                                  ["memory", "put", "notes", "k", "1"]])
def test_agent_verb_outside_a_run_fails_clearly(tmp_path, argv):
    """An agent verb without WATCHKEEPER_RUN_ID exits 1 saying so and writes no file."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHKEEPER_")}
    env["WATCHKEEPER_SOCKET"] = str(tmp_path / "control.sock")
    result = subprocess.run([os.path.join(BIN, "watchkeeper"), *argv], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=30)
    assert result.returncode == 1, result.stderr
    assert "not inside a watchkeeper run" in result.stderr
    assert "Traceback" not in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_heartbeat_outside_a_run_exits_1_even_where_no_daemon_is_found(tmp_path):
    """heartbeat outside a run, with no socket or configuration to find, exits 1 saying so."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHKEEPER_")}
    result = subprocess.run([os.path.join(BIN, "watchkeeper"), "heartbeat"], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=30)
    assert result.returncode == 1, result.stderr
    assert "not inside a watchkeeper run" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["heartbeat"], ["lock", "t1"]])
def test_cli_agent_verb_without_daemon_exits_3_and_writes_nothing(tmp_path, argv):
    """Inside a run with the daemon gone, heartbeat and lock exit 3 and write no file."""
    env = {**os.environ, "WATCHKEEPER_RUN_ID": "r1", "WATCHKEEPER_AGENT": "a",
           "WATCHKEEPER_STATE_DIR": str(tmp_path), "WATCHKEEPER_SOCKET": str(tmp_path / "s")}
    result = subprocess.run([os.path.join(BIN, "watchkeeper"), *argv], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=30)
    assert result.returncode == 3, result.stderr
    assert "not running" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_sdk_without_daemon_raises_and_writes_nothing(tmp_path, monkeypatch):
    """The SDK's heartbeat and lock raise DaemonNotRunning and never write files themselves."""
    monkeypatch.setenv("WATCHKEEPER_RUN_ID", "r1")
    monkeypatch.setenv("WATCHKEEPER_STATE_DIR", str(tmp_path))
    monkeypatch.setenv("WATCHKEEPER_SOCKET", str(tmp_path / "control.sock"))
    agent = Agent()
    with pytest.raises(DaemonNotRunning):
        agent.heartbeat()
    with pytest.raises(DaemonNotRunning):
        agent.lock("t1")
    assert list(tmp_path.iterdir()) == []


def test_sdk_outside_a_run_raises_not_in_run(tmp_path, monkeypatch):
    """The SDK refuses run operations without WATCHKEEPER_RUN_ID, before any connection."""
    monkeypatch.delenv("WATCHKEEPER_RUN_ID", raising=False)
    agent = Agent(str(tmp_path / "control.sock"))
    for call in (agent.heartbeat, lambda: agent.emit("post", "x"),
                 lambda: agent.memory.put("notes", "k", 1), lambda: agent.lock("t")):
        with pytest.raises(NotInRun, match="WATCHKEEPER_RUN_ID"):
            call()


def test_the_watchkeeper_script_itself_imports_none_of_the_forbidden_modules(tmp_path):
    """bin/watchkeeper (what pip installs as the command) serving an agent verb loads no
    forbidden module: unlike pip's console-script wrapper, it does not import re."""
    script = os.path.join(ROOT, "bin", "watchkeeper")
    env = {**os.environ, "PYTHONPATH": ROOT, "WATCHKEEPER_RUN_ID": "r1",
           "WATCHKEEPER_RUN_TOKEN": "t", "WATCHKEEPER_SOCKET": str(tmp_path / "s")}
    result = subprocess.run([sys.executable, "-S", "-X", "importtime", script, "heartbeat"],
                            capture_output=True, text=True, env=env, timeout=30)
    assert result.returncode == 3, result.stderr  # no daemon at that socket
    imported = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert "supervisor.cli.agent" in imported
    assert sorted(m for m in imported if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN) == []
