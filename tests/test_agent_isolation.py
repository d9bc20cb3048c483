"""Agents under their own uids (a daemon started as root, outside systemd): what the kernel
refuses them, and what an admin-group member may still do."""

from __future__ import annotations

import grp
import json
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from harness import DaemonProc
from hostile import ROOMY_BREAKER
from support import require, wait_until
from untrusted import ADMIN_VERBS, probe_job, report_of

SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/usr/local/bin")


@pytest.fixture
def accounts():
    """Two agent users and an admin group, created for this test and removed after it."""
    require(os.geteuid() == 0, "needs root to create users and run agents under them")
    require(shutil.which("useradd") is not None, "useradd (to create agent users)")
    require(SYSTEM_PYTHON is not None, "a system python3 that other uids can execute")
    tag = f"wkt{os.getpid() % 100000}"
    names = {"alpha": f"{tag}a", "beta": f"{tag}b", "admins": f"{tag}adm"}
    subprocess.run(["groupadd", names["admins"]], check=True)
    for key in ("alpha", "beta"):
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", names[key]], check=True)
    try:
        yield names
    finally:
        for key in ("alpha", "beta"):
            subprocess.run(["userdel", names[key]], check=False)
        subprocess.run(["groupdel", names["admins"]], check=False)


@pytest.fixture
def traversable():
    """A fresh directory other uids may traverse. Not under tmp_path: pytest resets
    /tmp/pytest-of-root to 0700 whenever any session starts, which on a shared machine
    cut agents off from their socket in the middle of a test."""
    path = Path(tempfile.mkdtemp(prefix="wk-isolation-"))
    path.chmod(0o711)
    yield path
    shutil.rmtree(path, ignore_errors=True)


ALPHA = f"""
verbs = {ADMIN_VERBS!r}
report("admin", [call(cmd, args) for cmd, args in verbs])
report("heartbeat", call("heartbeat", {{}}))
report("lock", [call("lock", {{"task": "alphas-task"}}), os.environ.get("WATCHKEEPER_TASK_LOCKS")])
report("uid", [os.getuid(), os.getgid(), sorted(os.getgroups())])
report("caps", [line.split()[1] for line in open("/proc/self/status")
                if line.split()[:1] in (["CapPrm:"], ["CapEff:"], ["CapAmb:"])])
state = os.environ["WATCHKEEPER_STATE_DIR"]
work = os.environ["WATCHKEEPER_WORK_DIR"]
beta = next(a for a in call("status")["result"]["agents"] if a["agent"] == "beta")
report("files", {{
    "own work dir": attempt(lambda: open(os.path.join(work, "notes.txt"), "w").close()),
    "beta heartbeat": attempt(lambda: open(state + "/status/beta.heartbeat", "w").close()),
    "beta lock": attempt(lambda: open(state + "/tasks/betas-task.lock", "w").close()),
    "list locks": attempt(lambda: os.listdir(state + "/tasks")),
    "state.db": attempt(lambda: open(state + "/state.db", "r+b").close()),
    "read state.db": attempt(lambda: open(state + "/state.db", "rb").close()),
    "memory db": attempt(lambda: open(state + "/memory.sqlite3", "a").close()),
    "list state dir": attempt(lambda: os.listdir(state)),
    "beta work dir": attempt(lambda: os.listdir(state + "/work/beta")),
    "beta config": attempt(lambda: open(os.environ["AGENTS_DIR"] + "/beta.yaml").read()),
    "beta environ": attempt(lambda: open(f"/proc/{{beta['pid']}}/environ", "rb").read()),
    "daemon environ": attempt(lambda: open(f"/proc/{{DAEMON}}/environ", "rb").read()),
    "daemon mem": attempt(lambda: open(f"/proc/{{DAEMON}}/mem", "r+b").close()),
    "signal daemon": attempt(lambda: os.kill(DAEMON, signal.SIGTERM)),
    "signal beta": attempt(lambda: os.kill(beta["pid"], signal.SIGKILL)),
}})
idle()
"""

BETA = """
report("up", call("heartbeat", {}))
idle()
"""

ADMIN_CLIENT = r"""
import json, socket, sys
verbs = json.loads(sys.argv[2])
out = []
for cmd, args in verbs:
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    s.sendall(json.dumps({"id": 1, "cmd": cmd, "args": args}).encode() + b"\n")
    out.append(json.loads(s.makefile().readline()))
    s.close()
print(json.dumps(out))
"""


def _as_uid(d: DaemonProc, verbs: list, uid: int, gid: int, groups: list[int]) -> list:
    out = subprocess.run([SYSTEM_PYTHON, "-c", ADMIN_CLIENT, str(d.socket_path),
                          json.dumps(verbs)], user=uid, group=gid, extra_groups=groups,
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def _daemon(root: Path, names: dict) -> DaemonProc:
    agents = {
        "alpha": {"user": names["alpha"], "jobs": [probe_job(ALPHA, SYSTEM_PYTHON)]},
        "beta": {"user": names["beta"],
                 "jobs": [probe_job(BETA, SYSTEM_PYTHON, env={"BETA_SECRET": "s3cr3t"})]},
    }
    d = DaemonProc(root, agents, breaker=ROOMY_BREAKER, socket_group=names["admins"])
    d.agents_dir.chmod(0o700)  # the operator's files: the daemon reads them, agents may not
    for job in (agents["alpha"]["jobs"][0], agents["beta"]["jobs"][0]):
        job["env"]["AGENTS_DIR"] = str(d.agents_dir)
    d.write_config()
    return d


def test_agents_under_their_own_uids_cannot_touch_the_daemon_or_each_other(
        traversable, accounts):
    """An agent under its own uid is refused every admin verb and cannot write another
    agent's heartbeat or lock, the daemon's databases, read another agent's secrets or
    config, read the daemon's memory or signal it; its own work dir is its to write."""
    d = _daemon(traversable, accounts)
    with d.start():
        d.call("start-now", agent="beta")
        assert report_of(d, "beta", "up")["ok"] is True
        d.call("start-now", agent="alpha")
        for (cmd, _), reply in zip(ADMIN_VERBS, report_of(d, "alpha", "admin"), strict=True):
            assert reply["ok"] is False and "inside a run" in reply["error"], (cmd, reply)
        assert report_of(d, "alpha", "heartbeat")["ok"] is True
        lock, lock_mode = report_of(d, "alpha", "lock")
        assert lock["ok"] is True and lock_mode == "daemon", lock
        held = (d.state_dir / "tasks" / "alphas-task.lock").stat()
        assert (held.st_uid, held.st_mode & 0o777) == (os.geteuid(), 0o600)
        alpha = pwd.getpwnam(accounts["alpha"])
        assert report_of(d, "alpha", "uid") == [alpha.pw_uid, alpha.pw_gid, []]
        assert report_of(d, "alpha", "caps") == ["0" * 16] * 3
        files = report_of(d, "alpha", "files")
        assert files.pop("own work dir") == "ok"
        assert all(v.startswith("denied") for v in files.values()), files
        assert d.call("ping")["pid"] == d.proc.pid
        beta = next(a for a in d.call("status")["agents"] if a["agent"] == "beta")
        assert beta["run_id"] is not None and beta["paused"] is False
        for path in (d.state_dir / "state.db", d.state_dir / "daemon.lock"):
            assert path.stat().st_mode & 0o077 == 0, path
        assert d.state_dir.stat().st_mode & 0o777 == 0o711
        assert not d.find("agent_files_readable_by_agents")


def test_admin_group_members_primary_or_supplementary_may_run_every_admin_verb(
        traversable, accounts):
    """A member of socket_group, by primary or by supplementary group, may run every admin
    verb; a uid outside the group, and an agent's uid even inside it, are refused them."""
    d = _daemon(traversable, accounts)
    admins = grp.getgrnam(accounts["admins"]).gr_gid
    verbs = [v for v in ADMIN_VERBS if v[0] != "stop"]
    with d.start():
        d.call("start-now", agent="beta")
        assert report_of(d, "beta", "up")["ok"] is True
        for uid, gid, groups in ((61001, admins, []), (61002, 61002, [admins])):
            for (cmd, _), reply in zip(verbs, _as_uid(d, verbs, uid, gid, groups), strict=True):
                assert "permission denied" not in reply.get("error", ""), (uid, cmd, reply)
                if cmd not in ("memory-revert", "memory-import"):
                    assert reply["ok"] is True, (uid, cmd, reply)
        outsider = _as_uid(d, verbs, 61003, 61003, [])
        assert all("permission denied" in r["error"] for r in outsider), outsider
        # An agent's uid outside every run (a cron job of its own, say), even in the group.
        alpha = pwd.getpwnam(accounts["alpha"])
        escaped = _as_uid(d, verbs, alpha.pw_uid, alpha.pw_gid, [admins])
        assert all("permission denied" in r["error"] for r in escaped), escaped
        assert _as_uid(d, [("stop", {})], 61002, 61002, [admins])[0]["ok"] is True
        wait_until(lambda: d.proc.poll() is not None, 20, message="the daemon did not stop")


def test_agent_files_readable_by_agents_are_reported(traversable, accounts):
    """With agents under their own uids and agents.d open to others, the daemon warns that
    every agent can read the other agents' env secrets, naming the files."""
    d = _daemon(traversable, accounts)
    d.agents_dir.chmod(0o755)
    with d.start():
        warning = d.wait_event("agent_files_readable_by_agents")
        assert str(d.agents_dir / "beta.yaml") in warning["files"]


def test_a_work_dir_granted_by_acl_is_writable_by_its_agent_only(traversable):
    """Without CAP_CHOWN the daemon grants an agent its work dir by an ACL: that uid may
    write in it, another unprivileged uid may not."""
    require(os.geteuid() == 0, "needs root to act as two other uids")
    from supervisor.kernel.identity import grant_dir_to

    work = traversable / "work-alpha"
    work.mkdir(mode=0o700)
    grant_dir_to(work, 61011)

    def writes_as(uid: int) -> int:
        pid = os.fork()
        if pid == 0:
            try:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
                (work / f"by-{uid}").write_text("x")
                os._exit(0)
            except OSError:
                os._exit(13)
        return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])

    assert writes_as(61011) == 0
    assert writes_as(61012) == 13
    assert [p.name for p in work.iterdir()] == ["by-61011"]


WHOAMI = """
report("who", [os.getuid(), os.getgid(), os.getgroups(), call("heartbeat", {})["ok"],
               call("pause", {"agent": "beta"})["ok"]])
"""


def test_agents_get_uids_of_their_own_from_agent_uid_range(traversable):
    """With `agent_uid_range` and no users configured, each agent runs under a distinct uid
    (and gid) from the range, not the daemon's, and is still refused admin verbs."""
    require(os.geteuid() == 0, "needs root to run agents under other uids")
    require(SYSTEM_PYTHON is not None, "a system python3 that other uids can execute")
    agents = {name: {"jobs": [probe_job(WHOAMI, SYSTEM_PYTHON)]} for name in ("alpha", "beta")}
    with DaemonProc(traversable, agents, agent_uid_range=[70000, 70999]).start() as d:
        for name in agents:
            d.call("start-now", agent=name)
        seen = {name: report_of(d, name, "who") for name in agents}
        assert not d.find("agents_not_isolated")
    uids = {who[0] for who in seen.values()}
    assert len(uids) == 2 and all(70000 <= uid <= 70999 for uid in uids), seen
    for uid, gid, groups, beat, paused in seen.values():
        assert (gid, groups, beat, paused) == (uid, [], True, False)
