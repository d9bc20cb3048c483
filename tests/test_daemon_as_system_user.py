"""Agents under uids of their own (agent_uid_range) while the daemon runs outside systemd as an
unprivileged system user holding only CAP_SETUID, CAP_SETGID and CAP_KILL, as the shipped unit
grants them: from inside a run nothing reaches the daemon or the other agent; an admin-group
member outside any run still may run admin verbs."""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest
from harness import PY, DaemonProc
from hostile import ROOMY_BREAKER
from support import require
from test_agent_isolation import SYSTEM_PYTHON, _as_uid
from untrusted import ADMIN_VERBS, probe_job, report_of

UID_RANGE = [71000, 71999]
CAPS = "+setuid,+setgid,+kill"

ALPHA = f"""
verbs = {ADMIN_VERBS!r}
report("admin", [call(cmd, args) for cmd, args in verbs])
report("heartbeat", call("heartbeat", {{}}))
report("who", [os.getuid(), os.getgid(), os.getgroups()])
state = os.environ["WATCHKEEPER_STATE_DIR"]
beta = next(a for a in call("status")["result"]["agents"] if a["agent"] == "beta")
mine = os.environ["WATCHKEEPER_RUN_TOKEN"]
as_beta = [("heartbeat", {{}}), ("emit", {{"kind": "post", "summary": "forged-by-alpha"}}),
           ("lock", {{"task": "betas-task"}}),
           ("memory", {{"op": "put", "namespace": "beta", "key": "k", "value": 1}})]
report("forged frames", [call(cmd, args, run_id=beta["run_id"], token=token)
                         for token in (mine, "0" * 32) for cmd, args in as_beta])
report("files", {{
    "own work dir": attempt(lambda: open(os.environ["WATCHKEEPER_WORK_DIR"] + "/x", "w").close()),
    "beta heartbeat": attempt(lambda: open(state + "/status/beta.heartbeat", "w").close()),
    "beta lock": attempt(lambda: open(state + "/tasks/betas-task.lock", "w").close()),
    "state.db": attempt(lambda: open(state + "/state.db", "r+b").close()),
    "memory db": attempt(lambda: open(state + "/memory.sqlite3", "a").close()),
    "beta environ": attempt(lambda: open(f"/proc/{{beta['pid']}}/environ", "rb").read()),
}})
report("daemon", {{
    "environ": attempt(lambda: open(f"/proc/{{DAEMON}}/environ", "rb").read()),
    "mem": attempt(lambda: open(f"/proc/{{DAEMON}}/mem", "rb").close()),
    "SIGTERM": attempt(lambda: os.kill(DAEMON, signal.SIGTERM)),
    "SIGKILL": attempt(lambda: os.kill(DAEMON, signal.SIGKILL)),
}})
# A fresh process whose environment says it is beta's run, carrying alpha's own token.
reexec(f"report('forged env', [call(cmd, args) for cmd, args in {{as_beta!r}}])",
       WATCHKEEPER_AGENT="beta", WATCHKEEPER_RUN_ID=beta["run_id"])
"""

BETA = """
report("up", call("heartbeat", {}))
idle()
"""


class SystemUserDaemon(DaemonProc):
    """The real daemon, started through setpriv as `user` with the unit's three capabilities
    (inheritable, ambient and bounding) and the user's own groups."""

    def __init__(self, root: Path, agents: dict, user: str, **settings) -> None:
        self.user = user
        super().__init__(root, agents, **settings)

    def start(self, wait_ready: bool = True, extra_env: dict | None = None,
              notify_socket: Path | None = None) -> SystemUserDaemon:
        env = {**os.environ, "HOME": str(self.root), **(extra_env or {})}
        env.pop("NOTIFY_SOCKET", None)
        self.proc = subprocess.Popen(
            ["setpriv", f"--reuid={self.user}", f"--regid={self.user}", "--init-groups",
             f"--inh-caps=-all,{CAPS}", f"--ambient-caps={CAPS}", f"--bounding-set=-all,{CAPS}",
             "--", PY, "-m", "supervisor.cli", "--config", str(self.config_path), "run",
             "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
        threading.Thread(target=self._read_log, args=(self.proc,), daemon=True).start()
        if wait_ready:
            self.wait_event("daemon_state", new="running", timeout_s=15)
        return self


@pytest.fixture(scope="module")
def deployment():
    """One daemon as a system user created for these tests (removed after), in its admin
    group, with alpha run once next to a live beta; yields (daemon, names)."""
    require(os.geteuid() == 0, "needs root to create a system user and drop to it")
    require(shutil.which("useradd") is not None and shutil.which("setpriv") is not None,
            "useradd and setpriv (to create the daemon's user and start it with capabilities)")
    require(SYSTEM_PYTHON is not None, "a system python3 that other uids can execute")
    tag = f"wks{os.getpid() % 100000}"
    names = {"daemon": f"{tag}d", "admins": f"{tag}adm"}
    root = Path(tempfile.mkdtemp(prefix="wk-sysuser-"))
    root.chmod(0o711)  # agents and the daemon's user traverse it; pytest's tmp dirs are 0700
    subprocess.run(["groupadd", names["admins"]], check=True)
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "-G", names["admins"], names["daemon"]], check=True)
    d = None
    try:
        agents = {"alpha": {"jobs": [probe_job(ALPHA, SYSTEM_PYTHON)]},
                  "beta": {"jobs": [probe_job(BETA, SYSTEM_PYTHON, env={"BETA_SECRET": "s3cr3t"})]}}
        d = SystemUserDaemon(root, agents, names["daemon"], breaker=ROOMY_BREAKER,
                             socket_group=names["admins"], agent_uid_range=UID_RANGE)
        owner = pwd.getpwnam(names["daemon"])
        d.state_dir.mkdir()
        for path in (d.state_dir, d.agents_dir):
            os.chown(path, owner.pw_uid, owner.pw_gid)
        d.agents_dir.chmod(0o700)  # the operator's files: the daemon reads them, agents may not
        with d.start():
            d.call("start-now", agent="beta")
            assert report_of(d, "beta", "up")["ok"] is True
            d.call("start-now", agent="alpha")
            yield d, names
    finally:
        if d is not None and d.proc is not None:
            d.stop()
        subprocess.run(["userdel", names["daemon"]], check=False)
        subprocess.run(["groupdel", names["admins"]], check=False)
        shutil.rmtree(root, ignore_errors=True)


def test_the_daemon_runs_as_its_system_user_with_only_the_units_capabilities(deployment):
    """The daemon under test runs as its unprivileged system user, holding exactly
    CAP_SETUID, CAP_SETGID and CAP_KILL, and its alpha run has a range uid of its own."""
    d, names = deployment
    owner = pwd.getpwnam(names["daemon"])
    status = dict(line.split(":", 1) for line in
                  Path(f"/proc/{d.proc.pid}/status").read_text().splitlines())
    assert status["Uid"].split()[:2] == [str(owner.pw_uid)] * 2, status["Uid"]
    wanted = (1 << 5) | (1 << 6) | (1 << 7)  # CAP_KILL, CAP_SETGID, CAP_SETUID
    assert int(status["CapEff"], 16) == wanted and int(status["CapBnd"], 16) == wanted, status
    uid, gid, groups = report_of(d, "alpha", "who")
    assert UID_RANGE[0] <= uid <= UID_RANGE[1] and (gid, groups) == (uid, []), (uid, gid, groups)
    assert not d.find("agents_not_isolated")


def test_every_admin_verb_from_inside_a_run_is_refused(deployment):
    """From inside a run under its own uid every admin verb is refused as coming from a run,
    while the run's own heartbeat is accepted."""
    d, _ = deployment
    for (cmd, _), reply in zip(ADMIN_VERBS, report_of(d, "alpha", "admin"), strict=True):
        assert reply["ok"] is False and "inside a run" in reply["error"], (cmd, reply)
    assert report_of(d, "alpha", "heartbeat")["ok"] is True
    beta = next(a for a in d.call("status")["agents"] if a["agent"] == "beta")
    assert beta["paused"] is False and beta["run_id"] is not None
    assert d.call("ping")["pid"] == d.proc.pid


def test_another_agents_run_id_in_raw_frames_or_in_the_environment_is_refused(deployment):
    """Alpha naming beta's live run id, with its own or a made-up token in raw frames or
    with beta's identity in its environment, can neither heartbeat, emit, lock nor write
    memory as beta."""
    d, _ = deployment
    frames = report_of(d, "alpha", "forged frames")
    from_env = report_of(d, "alpha", "forged env")
    for reply in frames + from_env:
        assert reply["ok"] is False and "not a live run" in reply["error"], reply
    assert (len(frames), len(from_env)) == (8, 4)
    assert d.call("outputs", agent="beta") == []
    assert not (d.state_dir / "tasks" / "betas-task.lock").exists()
    assert d.call("memory-get", namespace="beta", key="k") is None


def test_another_agents_and_the_daemons_files_are_permission_denied(deployment):
    """An agent may write its own work dir but opening beta's heartbeat or lock file,
    state.db or memory.sqlite3 for writing, or beta's /proc environ, fails with EACCES."""
    d, _ = deployment
    files = report_of(d, "alpha", "files")
    assert files.pop("own work dir") == "ok"
    assert files == dict.fromkeys(files, "denied:13"), files
    assert (d.state_dir / "state.db").exists() and (d.state_dir / "memory.sqlite3").exists()


def test_the_daemons_memory_environment_and_signals_are_denied_to_a_run(deployment):
    """A run cannot read the daemon's /proc/PID/environ or mem, nor signal it (EPERM),
    and the daemon keeps running."""
    d, _ = deployment
    daemon = report_of(d, "alpha", "daemon")
    assert daemon["environ"].startswith("denied") and daemon["mem"].startswith("denied"), daemon
    assert daemon["SIGTERM"] == daemon["SIGKILL"] == "denied:1", daemon
    assert d.proc.poll() is None and d.call("status")["daemon"]["state"] == "running"


def test_a_socket_group_member_outside_any_run_may_pause_and_resume(deployment):
    """A uid outside every run whose primary or supplementary group is socket_group may
    pause and resume an agent; a uid outside the group is refused."""
    d, names = deployment
    admins = grp.getgrnam(names["admins"]).gr_gid
    verbs = [("pause", {"agent": "beta"}), ("resume", {"agent": "beta"})]
    for uid, gid, groups in ((61021, admins, []), (61022, 61022, [admins])):
        replies = _as_uid(d, verbs, uid, gid, groups)
        assert [r["ok"] for r in replies] == [True, True], (uid, replies)
    # The reply can come before the daemon's log line is read back: wait for both events.
    d.wait_event("agent_paused", count=2)
    d.wait_event("agent_resumed", count=2)
    assert len(d.find("agent_paused")) == 2 and len(d.find("agent_resumed")) == 2
    outsider = _as_uid(d, verbs, 61023, 61023, [])
    assert all("permission denied" in r["error"] for r in outsider), outsider
