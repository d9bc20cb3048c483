"""Lifecycle and control: reload, one daemon per state dir, the socket, the CLI."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys

import psutil
from harness import DaemonProc, py, wk
from support import wait_until

from supervisor.runs import locks


def every(seconds: float, code: str, **job) -> dict:
    return {"jobs": [{"id": "main", "command": py(code), "schedule": {"every_s": seconds},
                      **job}]}


def test_reload_with_broken_file_keeps_old_config(tmp_path):
    """SIGHUP with a broken agent file logs every error and keeps running the old config."""
    with DaemonProc(tmp_path, {"a": every(60, "pass")}).start() as d:
        (d.agents_dir / "b.yaml").write_text("jobs:\n  - id: x\n    command: [x]\n"
                                            "    schedule: {cron: '*/61 * * * *'}\n")
        d.signal(signal.SIGHUP)
        ev = d.wait_event("reload_config_error")
        assert "b.yaml:4: jobs[0].schedule.cron" in ev["error"]
        d.wait_event("reload_rejected")
        assert [a["agent"] for a in d.call("status")["agents"]] == ["a"]
        assert d.call("status")["daemon"]["state"] == "running"


def test_reload_with_nul_in_env_is_rejected_and_old_env_kept(tmp_path):
    """A reload whose job env holds a NUL byte is rejected at load; the old env still runs."""
    check = "import os, sys; sys.exit(os.environ['GREETING'] != 'hello')"
    with DaemonProc(tmp_path, {"a": every(60, check, env={"GREETING": "hello"})}).start() as d:
        d.agents["a"] = every(60, check, env={"GREETING": "hel\0lo"})
        d.write_config()
        res = wk("--config", str(d.config_path), "reload")
        assert res.returncode == 1
        assert "a.yaml:7: jobs[0].env.GREETING: the value contains a NUL byte" in res.stderr
        d.wait_event("reload_rejected")
        d.call("start-now", agent="a")
        assert d.wait_event("run_finished", agent="a")["outcome"] == "succeeded"
        assert d.call("status")["daemon"]["state"] == "running"


def test_reload_with_non_utf8_file_is_rejected(tmp_path):
    """A reload whose agent file is not UTF-8 is rejected and the daemon is running again."""
    with DaemonProc(tmp_path, {"a": every(60, "pass")}).start() as d:
        (d.agents_dir / "b.yaml").write_bytes(b"jobs: [{id: x, command: [\"\xff\"]}]\n")
        d.signal(signal.SIGHUP)
        assert "b.yaml:1: (document): byte 0xff is not UTF-8" in \
            d.wait_event("reload_config_error")["error"]
        d.wait_event("reload_rejected")
        assert d.call("status")["daemon"]["state"] == "running"


def test_reload_over_control_socket_reports_errors(tmp_path):
    """`watchkeeper reload` prints the errors of a rejected configuration and exits 1."""
    with DaemonProc(tmp_path, {"a": every(60, "pass")}).start() as d:
        (d.agents_dir / "a.yaml").write_text("jobs: [{id: main, command: [x], "
                                            "schedule: {every_s: 1}, bogus: 2}]\n")
        res = wk("--config", str(d.config_path), "reload")
        assert res.returncode == 1
        assert "a.yaml:1: jobs[0].bogus: unknown key" in res.stderr


def test_reload_adds_and_removes_agents_without_touching_others(tmp_path):
    """A reload that removes a running agent stops it; an unchanged agent's run goes on."""
    agents = {"keep": every(60, "import time; time.sleep(60)"),
              "drop": every(60, "import time; time.sleep(60)")}
    with DaemonProc(tmp_path, agents).start() as d:
        keep_run = d.call("start-now", agent="keep")["run_id"]
        d.call("start-now", agent="drop")
        d.wait_event("run_started", agent="drop")
        del d.agents["drop"]
        d.agents["new"] = every(60, "pass")
        d.write_config()
        d.call("reload")
        ev = d.wait_event("run_finished", agent="drop")
        assert ev["stop_reason"] == "removed"
        d.wait_event("agent_state", agent="drop", new="removed")
        status = {a["agent"]: a for a in d.call("status")["agents"]}
        assert set(status) == {"keep", "new"}
        assert status["keep"]["run_id"] == keep_run and status["keep"]["state"] == "running"


def test_second_daemon_on_same_state_dir_refuses(tmp_path):
    """A second daemon on the same state dir exits non-zero with a clear error."""
    with DaemonProc(tmp_path, {"a": every(60, "pass")}).start() as d:
        res = wk("--config", str(d.config_path), "run", "--log-format", "json")
        assert res.returncode == 1
        assert f"another watchkeeper (pid {d.proc.pid}) already runs on" in res.stderr
        assert d.call("ping")["pid"] == d.proc.pid


def test_cli_against_stopped_daemon(tmp_path):
    """Every control command says in one line that the daemon is not running, exit 3."""
    d = DaemonProc(tmp_path, {"a": every(60, "pass")})
    for argv in (["status"], ["pause"], ["start-now", "a"], ["reload"]):
        res = wk("--config", str(d.config_path), *argv)
        assert res.returncode == 3, res.stderr
        assert res.stderr.startswith("watchkeeper: watchkeeper is not running")
        assert len(res.stderr.strip().splitlines()) == 1


def test_status_table_and_pause_resume(tmp_path):
    """status lists agents; pause stops firings of one agent and resume brings them back."""
    with DaemonProc(tmp_path, {"a": every(0.3, "pass"), "b": every(60, "pass")}).start() as d:
        res = wk("--config", str(d.config_path), "status")
        assert res.returncode == 0
        lines = res.stdout.splitlines()
        header = next(i for i, ln in enumerate(lines) if ln.startswith("AGENT"))
        assert lines[header].split()[:3] == ["AGENT", "STATE", "LAST"]
        assert {ln.split()[0] for ln in lines[header + 1:header + 3]} == {"a", "b"}
        assert d.call("pause", agent="a") == {"paused": ["a"]}
        d.wait_event("firing_skipped", agent="a", reason="paused")
        assert d.call("status")["agents"][0]["paused"] is True
        d.call("resume", agent="a")
        n = len(d.find("run_started", agent="a"))
        d.wait_event("run_started", agent="a", count=n + 1)


def test_pause_survives_restart(tmp_path):
    """A paused agent is still paused after the daemon restarts."""
    d = DaemonProc(tmp_path, {"a": every(60, "pass")}).start()
    d.call("pause", agent="a")
    d.stop()
    with DaemonProc(tmp_path, {"a": every(60, "pass")}).start() as d2:
        assert d2.call("status")["agents"][0]["paused"] is True


def test_control_socket_is_0660(tmp_path):
    """The control socket is created with mode 0660."""
    with DaemonProc(tmp_path, {"a": every(60, "pass")}).start() as d:
        assert stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o660


def _raw(sock_path, payload: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(str(sock_path))
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon hung up on an oversized frame: its reply is still readable
        data = b""
        try:
            while chunk := s.recv(65536):
                data += chunk
        except ConnectionResetError:
            pass
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def test_malformed_messages_get_error_replies_and_daemon_keeps_serving(tmp_path):
    """Garbage, wrong types, unknown commands and oversized frames get errors; ping works."""
    with DaemonProc(tmp_path, {"a": every(60, "pass")}).start() as d:
        replies = _raw(d.socket_path, b"not json\n{\"cmd\": 5}\n[1,2]\n"
                       b"{\"cmd\": \"nope\"}\n{\"cmd\": \"ping\", \"id\": 7}\n")
        assert [r["ok"] for r in replies] == [False, False, False, False, True]
        assert "malformed JSON" in replies[0]["error"]
        assert "unknown command 'nope'" in replies[3]["error"]
        assert replies[4]["id"] == 7
        big = _raw(d.socket_path, b"{\"cmd\": \"ping\", \"pad\": \"" + b"x" * (2 << 20))
        assert big and "frame too large" in big[0]["error"]
        assert d.call("ping")["pid"] == d.proc.pid


def test_agent_commands_need_a_live_run_token(tmp_path):
    """lock without a run token, or with another run's token, is refused."""
    with DaemonProc(tmp_path, {"a": every(60, "import time; time.sleep(30)")}).start() as d:
        run_id = d.call("start-now", agent="a")["run_id"]
        replies = _raw(d.socket_path, json.dumps(
            {"cmd": "lock", "args": {"task": "t1"}, "run_id": run_id, "token": "0" * 32}
        ).encode() + b"\n")
        assert not replies[0]["ok"] and "not a live run" in replies[0]["error"]


def test_agent_locks_a_task_through_the_cli(tmp_path):
    """A bash agent locks a task with `watchkeeper lock`; a second run is told it is busy;
    the lock goes away when the holding run ends."""
    script = ("set -e; watchkeeper lock article-42; echo locked; sleep 2; echo done")
    spec = {"jobs": [{"id": "main", "command": ["bash", "-c", script],
                      "schedule": {"every_s": 60}, "env": {"PATH": os.path.dirname(
                          sys.executable) + ":" + os.environ["PATH"]}}]}
    second = {"jobs": [{"id": "main", "command": ["bash", "-c",
                        "watchkeeper lock article-42; echo rc=$?"],
                        "schedule": {"every_s": 60},
                        "env": {"PATH": os.path.dirname(sys.executable) + ":"
                                + os.environ["PATH"]}}]}
    with DaemonProc(tmp_path, {"writer": spec, "other": second}).start() as d:
        d.call("start-now", agent="writer")
        d.wait_event("agent_output", agent="writer", line="locked", timeout_s=20)
        owner = locks.read_owner(d.state_dir / "tasks" / "article-42.lock")
        assert owner.agent == "writer"
        d.call("start-now", agent="other")
        d.wait_event("agent_output", agent="other", line="rc=4", timeout_s=20)
        d.wait_event("run_finished", agent="writer", timeout_s=20)
        wait_until(lambda: not (d.state_dir / "tasks" / "article-42.lock").exists(), 5)


def test_stale_lock_of_dead_owner_is_cleared_by_watchdog(tmp_path):
    """The daemon's watchdog removes a lock whose holder died, without waiting 30 minutes."""
    state = tmp_path / "state"
    code = ("import time; from supervisor.runs import locks; "
            f"held = locks.acquire({str(state)!r}, 'job-7', agent='x'); "
            "print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.kill()
    holder.wait()
    lock = state / "tasks" / "job-7.lock"
    assert lock.exists()
    settings = {"locks": {"check_interval_s": 0.2, "stale_after_s": 1800}}
    with DaemonProc(tmp_path, {"a": every(60, "pass")}, **settings).start() as d:
        d.wait_event("lock_broken", task="job-7", reason="owner_dead")
        assert not lock.exists()


def test_previous_daemon_leftovers_are_stopped_at_start(tmp_path):
    """Runs orphaned by a SIGKILLed daemon are stopped when the next daemon starts."""
    spec = {"jobs": [{"id": "main", "command": py("import time; time.sleep(300)"),
                      "schedule": {"always": True}}]}
    d = DaemonProc(tmp_path, {"svc": spec}).start()
    pid = d.wait_event("run_started", agent="svc")["pid"]
    d.kill()
    assert psutil.pid_exists(pid)
    with DaemonProc(tmp_path, {"svc": spec}).start() as d2:
        d2.wait_event("previous_leftovers_stopping")
        wait_until(lambda: not psutil.pid_exists(pid) or
                   psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, 10)
        d2.wait_event("runs_lost_with_previous_daemon")
