"""Security of the control socket and of what the daemon runs and logs."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import DaemonProc, py
from hostile import AGENT_ENV, ROOMY_BREAKER
from support import require, wait_until

from supervisor.control.client import ControlClient

# Publishes its run id and token (test only), then stays alive; its own calls succeed.
LEAKY = r"""
import json, os, sys, time
from supervisor.sdk import Agent
a = Agent()
a.heartbeat()
path = os.environ["LEAK_TO"]
with open(path + ".tmp", "w") as f:
    json.dump({"run_id": os.environ["WATCHKEEPER_RUN_ID"],
               "token": os.environ["WATCHKEEPER_RUN_TOKEN"]}, f)
os.rename(path + ".tmp", path)
time.sleep(60)
"""

AS_RUN = [("heartbeat", {}), ("emit", {"kind": "post", "summary": "forged"}),
          ("lock", {"task": "forged-task"}),
          ("memory", {"op": "put", "namespace": "victim", "key": "k", "value": 1})]


def _leaky(tmp_path: Path) -> tuple[DaemonProc, dict]:
    leak = tmp_path / "leak.json"
    spec = {"jobs": [{"id": "main", "command": py(LEAKY), "schedule": {"every_s": 3600},
                      "env": {"LEAK_TO": str(leak)}}]}
    d = DaemonProc(tmp_path, {"victim": spec}, breaker=ROOMY_BREAKER).start(extra_env=AGENT_ENV)
    d.call("start-now", agent="victim")
    d.wait_event("run_started", agent="victim")
    wait_until(leak.exists, 20, message="the agent never published its token")
    return d, json.loads(leak.read_text())


def test_stolen_token_is_useless_outside_its_run(tmp_path):
    """A process that is not part of run X cannot heartbeat, emit, lock or write memory as X,
    even holding X's run id and token in its own environment."""
    d, creds = _leaky(tmp_path)
    try:
        code = ("import json, sys\nfrom supervisor.control.client import ControlClient\n"
                f"c = ControlClient({str(d.socket_path)!r})\n"
                "out = []\n"
                f"for cmd, args in {AS_RUN!r}:\n"
                "    out.append(c.call_raw(cmd, args))\n"
                "print(json.dumps(out))\n")
        env = {**os.environ, **AGENT_ENV, "WATCHKEEPER_RUN_ID": creds["run_id"],
               "WATCHKEEPER_RUN_TOKEN": creds["token"],
               "WATCHKEEPER_STATE_DIR": str(d.state_dir), "WATCHKEEPER_AGENT": "victim"}
        sibling = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, timeout=30)
        replies = json.loads(sibling.stdout)
        assert [r["ok"] for r in replies] == [False] * len(AS_RUN), replies
        assert all("not part of run" in r["error"] for r in replies), replies
        assert not (d.state_dir / "tasks" / "forged-task.lock").exists()
        assert d.call("outputs", agent="victim") == []
        assert d.call("memory-get", namespace="victim", key="k") is None
    finally:
        d.stop()


def test_forged_token_is_refused(tmp_path):
    """A request naming a live run with a wrong token is refused."""
    d, creds = _leaky(tmp_path)
    try:
        client = ControlClient(d.socket_path)
        client.run_id, client.token = creds["run_id"], "0" * 32
        reply = client.call_raw("heartbeat", {})
        client.close()
        assert reply["ok"] is False and "not a live run" in reply["error"]
    finally:
        d.stop()


NOBODY = r"""
import json, socket, sys
replies = {}
for cmd, args in [("ping", {}), ("status", {}), ("pause", {}), ("resume", {}), ("reload", {}),
                  ("breaker-reset", {"reason": "x"}), ("start-now", {"agent": "a"}),
                  ("stop", {})]:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(json.dumps({"id": 1, "cmd": cmd, "args": args}).encode() + b"\n")
    replies[cmd] = json.loads(s.makefile().readline())
    s.close()
print(json.dumps(replies))
"""


def test_admin_commands_need_the_daemons_user():
    """A process of another uid (not an agent, not in the socket group) that can reach the
    socket may ping, but reading status, pause, resume, reload, breaker-reset, start-now and
    stop are refused."""
    require(os.geteuid() == 0, "needs root to run a process as another uid")
    # The venv's interpreter may live under /root; the client needs only the stdlib.
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    require(python is not None, "a system python3 that another uid can execute")
    nobody = pwd.getpwnam("nobody")
    agent = {"jobs": [{"id": "main", "command": ["true"], "schedule": {"every_s": 3600}}]}
    # Not under tmp_path: pytest resets /tmp/pytest-of-root to 0700 whenever any session
    # starts, which on a shared machine cut `nobody` off from the socket mid-test.
    root = Path(tempfile.mkdtemp(prefix="wk-security-"))
    try:
        with DaemonProc(root, {"a": agent}).start(extra_env=AGENT_ENV) as d:
            opened = _reachable_by_others(d.socket_path)
            try:
                out = subprocess.run([python, "-c", NOBODY, str(d.socket_path)],
                                     user=nobody.pw_uid, group=nobody.pw_gid, extra_groups=[],
                                     capture_output=True, text=True, timeout=30)
            finally:
                for path, mode in opened:
                    path.chmod(mode)
            replies = json.loads(out.stdout)
            assert replies["ping"]["ok"]
            for cmd in ("status", "pause", "resume", "reload", "breaker-reset", "start-now", "stop"):
                assert replies[cmd]["ok"] is False, (cmd, replies[cmd])
                assert "permission denied" in replies[cmd]["error"]
            assert d.call("ping")["pid"] == d.proc.pid
            assert d.find("control_denied", cmd="pause")
            assert not d.find("agent_paused") and not d.find("run_started")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_a_member_of_the_daemons_group_may_read_but_not_administer():
    """A uid whose supplementary groups hold the daemon's own group (no socket_group set)
    may read status, but pause, reload, breaker-reset, start-now and stop stay refused."""
    require(os.geteuid() == 0, "needs root to run a process as another uid")
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    require(python is not None, "a system python3 that another uid can execute")
    nobody = pwd.getpwnam("nobody")
    agent = {"jobs": [{"id": "main", "command": ["true"], "schedule": {"every_s": 3600}}]}
    root = Path(tempfile.mkdtemp(prefix="wk-security-"))
    try:
        with DaemonProc(root, {"a": agent}).start(extra_env=AGENT_ENV) as d:
            opened = _reachable_by_others(d.socket_path)
            try:
                out = subprocess.run([python, "-c", NOBODY, str(d.socket_path)],
                                     user=nobody.pw_uid, group=nobody.pw_gid,
                                     extra_groups=[os.getgid()],
                                     capture_output=True, text=True, timeout=30)
            finally:
                for path, mode in opened:
                    path.chmod(mode)
            assert out.returncode == 0, out.stderr
            replies = json.loads(out.stdout)
            assert replies["status"]["ok"], replies["status"]
            for cmd in ("pause", "resume", "reload", "breaker-reset", "start-now", "stop"):
                assert replies[cmd]["ok"] is False, (cmd, replies[cmd])
                assert "permission denied" in replies[cmd]["error"]
            assert not d.find("agent_paused") and not d.find("run_started")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _reachable_by_others(socket_path: Path) -> list[tuple[Path, int]]:
    """Let other users traverse to the socket and connect (the daemon creates it 0660 in
    0700 test directories); returns the modes to restore."""
    changed = [(socket_path, socket_path.stat().st_mode & 0o7777)]
    socket_path.chmod(0o666)
    for parent in socket_path.parents:
        if parent == Path("/tmp") or parent == Path("/"):
            break
        mode = parent.stat().st_mode & 0o7777
        changed.append((parent, mode))
        parent.chmod(mode | 0o011)  # group too: a member of the owner's group checks those bits
    return changed


def test_shell_metacharacters_in_argv_are_passed_literally(tmp_path):
    """A job argv full of shell metacharacters reaches the program unchanged, and nothing
    it names is executed."""
    nasty = ["$(touch pwned1)", "`touch pwned2`", "; touch pwned3", "| touch pwned4",
             "&& touch pwned5 &", "> pwned6", "$HOME", "*", "'\"", "\\n"]
    code = "import json, sys; print(json.dumps(sys.argv[1:]))"
    spec = {"jobs": [{"id": "main", "command": ["{python}", "-c", code, *nasty],
                      "schedule": {"every_s": 3600}, "env": {"X": "$(touch pwned7)"}}]}
    with DaemonProc(tmp_path, {"echo": spec}).start(extra_env=AGENT_ENV) as d:
        d.call("start-now", agent="echo")
        line = d.wait_event("agent_output", agent="echo", stream="stdout")["line"]
        d.wait_event("run_finished", agent="echo", outcome="succeeded")
    assert json.loads(line) == nasty
    assert not list(tmp_path.rglob("pwned*"))


SECRETS = {"OPENAI_API_KEY": "sk-live-0123456789abcdef", "GITHUB_TOKEN": "ghp_s3cr3tt0k3n",
           "CLIENT_SECRET": "shhh-client-secret", "DB_PASSWORD": "hunter2-correct-horse"}


def test_job_env_secrets_never_reach_logs_status_or_alerts(tmp_path):
    """Secrets in a job's env appear in no log line, status reply, run record or alert,
    whether the run succeeds, fails to spawn, crash-loops or times out."""
    def job(jid: str, command: list[str], **extra) -> dict:
        return {"id": jid, "command": command, "schedule": {"every_s": 3600},
                "env": SECRETS, **extra}
    agents = {
        "ok": {"jobs": [job("main", ["true"])]},
        "missing": {"jobs": [job("main", ["/nonexistent/agent-binary", "--flag"])]},
        "badcwd": {"jobs": [job("main", ["true"], cwd="no/such/dir")]},
        "crasher": {"jobs": [job("main", ["false"], retries={"max_attempts": 3,
                                                               "backoff_s": 0.05})]},
        "sleeper": {"jobs": [job("main", ["sleep", "30"], timeout_s=0.5)]},
    }
    settings = {"crash_loop": {"failures": 2, "cooldown_s": 60}, "breaker": ROOMY_BREAKER}
    with DaemonProc(tmp_path, agents, **settings).start(extra_env=AGENT_ENV) as d:
        for name in agents:
            d.call("start-now", agent=name)
        d.wait_event("run_finished", agent="ok")
        d.wait_event("run_spawn_failed", agent="missing")
        d.wait_event("run_spawn_failed", agent="badcwd")
        d.wait_event("agent_crash_loop", agent="crasher", timeout_s=20)
        d.wait_event("run_finished", agent="sleeper", outcome="timed_out")
        seen = [json.dumps(d.call("status")), json.dumps(d.call("runs", limit=100)),
                json.dumps(d.call("breaker-status"))]
    seen += d.raw_lines
    assert d.find("alert"), "no alert was raised, so alerts were not checked"
    text = "\n".join(seen)
    leaked = [name for name, value in SECRETS.items() if value in text]
    assert not leaked, f"secrets leaked: {leaked}"
