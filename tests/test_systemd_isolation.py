"""Agents under their own uids, under the shipped unit in a real systemd (sandbox): the
daemon holds only CAP_SETUID, CAP_SETGID and CAP_KILL, /proc is invisible across uids, and
an agent still cannot switch its supervisor off, touch its files, read its memory, signal
it or leave its run's cgroup; an admin-group member can still do every admin verb."""

from __future__ import annotations

import json
import os
import sys

import pytest
import yaml
from sandbox_systemd import SystemdSandbox
from support import require, wait_until
from test_systemd_e2e import (
    CGROUP,
    CONFIG,
    MAIN_CONFIG,
    STATE_DIR,
    SYSTEM_PYTHON,
    UNIT,
    WATCHKEEPER,
    Deployment,
    _python_version,
)
from untrusted import ADMIN_VERBS, probe_job

ALPHA = f"""
verbs = {ADMIN_VERBS!r}
report("admin", [call(cmd, args) for cmd, args in verbs])
report("heartbeat", call("heartbeat", {{}}))
report("caps", [line.split()[1] for line in open("/proc/self/status")
                if line.split()[:1] in (["CapPrm:"], ["CapEff:"], ["CapAmb:"])])
state = os.environ["WATCHKEEPER_STATE_DIR"]
cg = "/sys/fs/cgroup{CGROUP}"
beta = next(a for a in call("status")["result"]["agents"] if a["agent"] == "beta")
def write(path, text="1"):
    with open(path, "w") as f:
        f.write(text)
report("files", {{
    "own work dir": attempt(lambda: write(os.environ["WATCHKEEPER_WORK_DIR"] + "/x")),
    "beta heartbeat": attempt(lambda: write(state + "/status/beta.heartbeat")),
    "beta lock": attempt(lambda: write(state + "/tasks/betas-task.lock")),
    "state.db": attempt(lambda: open(state + "/state.db", "r+b").close()),
    "memory db": attempt(lambda: open(state + "/memory.sqlite3", "a").close()),
    "beta config": attempt(lambda: open("/etc/watchkeeper/agents.d/beta.yaml").read()),
    "beta environ": attempt(lambda: open(f"/proc/{{beta['pid']}}/environ", "rb").read()),
    "daemon mem": attempt(lambda: open(f"/proc/{{DAEMON}}/mem", "r+b").close()),
    "signal daemon": attempt(lambda: os.kill(DAEMON, signal.SIGTERM)),
    "leave run cgroup": attempt(lambda: write(cg + "/supervisor/cgroup.procs", str(os.getpid()))),
    "leave to service": attempt(lambda: write(cg + "/cgroup.procs", str(os.getpid()))),
    "freeze daemon": attempt(lambda: write(cg + "/supervisor/cgroup.freeze")),
}})
idle()
"""
BETA = """
report("up", call("heartbeat", {}))
idle()
"""
BOMB = """
forked = 0
for _ in range(60):
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        forked += 1
    except OSError:
        break
report("forked", forked)
idle()
"""
GAMMA = """
report("who", [os.getuid(), os.getgid(), os.getgroups(), call("heartbeat", {})["ok"]])
"""
OFFLINE = """
def own_loopback():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    socket.create_connection(server.getsockname(), timeout=5).close()
report("offline", {"ns": os.readlink("/proc/self/ns/net"),
                   "interfaces": sorted(line.split(":")[0].strip()
                                         for line in open("/proc/self/net/dev").readlines()[2:]),
                   "own loopback": attempt(own_loopback),
                   "uid": os.getuid(), "heartbeat": call("heartbeat", {})["ok"],
                   "caps": [line.split()[1] for line in open("/proc/self/status")
                            if line.split()[:1] in (["CapPrm:"], ["CapEff:"], ["CapAmb:"])]})
"""
LIMITS = """
def metadata():  # UDP: a TCP SYN the filter drops is retried, not refused
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"?", ("169.254.169.254", 80))
report("limits", {"ns": os.readlink("/proc/self/ns/net"),
                  "metadata": attempt(metadata),
                  "nice": attempt(lambda: os.nice(1)),
                  "netlink": attempt(lambda: socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0))})
"""


@pytest.fixture(scope="module")
def isolated(tmp_path_factory):
    """The shipped unit with two agents under users of their own and an admin group."""
    require(*SystemdSandbox.available())
    require(os.access(SYSTEM_PYTHON, os.X_OK) and _python_version(SYSTEM_PYTHON)
            == f"{sys.version_info.major}.{sys.version_info.minor}",
            f"needs {SYSTEM_PYTHON} of this Python's version (the venv's packages are copied)")
    box = SystemdSandbox(tmp_path_factory.mktemp("isolation"))
    box.start()
    try:
        deployment = Deployment(box)
        deployment.install()
        box.run("rm", "-f", *[f"/etc/watchkeeper/agents.d/{n}.yaml" for n in ("keeper", "ticker")])
        box.run("groupadd", "wk-admins")
        box.run("usermod", "-aG", "wk-admins", "watchkeeper")
        for user in ("wk-alpha", "wk-beta"):
            box.run("useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user)
        box.run("chmod", "0750", "/etc/watchkeeper/agents.d")
        agents = {"alpha": {"user": "wk-alpha", "jobs": [probe_job(ALPHA)]},
                  "beta": {"user": "wk-beta",
                           "jobs": [probe_job(BETA, env={"BETA_SECRET": "s3cr3t"})]},
                  "gamma": {"jobs": [probe_job(GAMMA)]},
                  "bomb": {"max_processes": 20, "jobs": [probe_job(BOMB)]},
                  "delta": {"network": False, "jobs": [probe_job(OFFLINE)]},
                  "epsilon": {"jobs": [probe_job(LIMITS)]}}
        deployment.write_config(agents)
        deployment.write_etc(MAIN_CONFIG, yaml.safe_dump({**CONFIG, "socket_group": "wk-admins"}))
        box.run("systemctl", "start", UNIT, timeout_s=90)
        yield deployment
    finally:
        box.stop()


def _report(d: Deployment, agent: str, tag: str):
    def find():
        for entry in d.unit_journal(f"AGENT={agent}", "EVENT=agent_output"):
            try:
                line = json.loads(entry["LINE"])
            except ValueError:
                continue
            if isinstance(line, dict) and line.get("tag") == tag:
                return [line["data"]]
        return None
    try:
        return wait_until(find, timeout_s=30, message=f"{agent}'s {tag!r} report")[0]
    except AssertionError as exc:
        said = [e.get("LINE") for e in d.unit_journal(f"AGENT={agent}")]
        raise AssertionError(f"{exc}; {agent} said: {said}") from None


def _admin(d: Deployment, *argv: str) -> str:
    return d.box.run(WATCHKEEPER, "--config", MAIN_CONFIG, *argv).stdout


def test_an_agent_under_the_unit_cannot_switch_off_or_touch_its_supervisor(isolated):
    """Under the shipped unit an agent with its own uid is refused every admin verb and
    cannot write the daemon's files, read another agent's secrets or config, open the
    daemon's memory, signal it, freeze it or leave its run's cgroup; it has no capability."""
    d = isolated
    _admin(d, "start-now", "beta")
    assert _report(d, "beta", "up")["ok"] is True
    _admin(d, "start-now", "alpha")
    for (cmd, _), reply in zip(ADMIN_VERBS, _report(d, "alpha", "admin"), strict=True):
        assert reply["ok"] is False and "inside a run" in reply["error"], (cmd, reply)
    assert _report(d, "alpha", "heartbeat")["ok"] is True
    assert _report(d, "alpha", "caps") == ["0" * 16] * 3
    files = _report(d, "alpha", "files")
    assert files.pop("own work dir") == "ok"
    assert all(v.startswith("denied") for v in files.values()), files
    assert d.prop("ActiveState") == "active"
    assert not d.unit_journal("EVENT=agents_not_isolated")


def test_an_admin_group_member_under_the_unit_may_pause_and_reset(isolated):
    """A user whose supplementary group is socket_group may pause, resume and reset the
    breaker under the unit (ProtectProc=invisible hides its /proc from the daemon)."""
    d = isolated
    d.box.run("useradd", "--system", "--no-create-home", "-G", "wk-admins", "wk-operator")
    as_operator = ["setpriv", "--reuid=wk-operator", "--regid=wk-operator", "--init-groups",
                   WATCHKEEPER, "--socket", f"{STATE_DIR}/control.sock"]
    for argv in (["pause", "beta"], ["resume", "beta"],
                 ["breaker", "reset", "--reason", "operator checked"]):
        result = d.box.run(*as_operator, *argv, check=False)
        assert result.returncode == 0, (argv, result.stdout, result.stderr)
    assert d.unit_journal("EVENT=agent_paused") and d.unit_journal("EVENT=agent_resumed")


def test_an_agent_without_a_user_gets_a_uid_of_its_own_under_the_unit(isolated):
    """Under the unit (CAP_SETUID without root) an agent whose file names no user runs
    under a uid of its own from the default range, not the daemon's."""
    d = isolated
    _admin(d, "start-now", "gamma")
    uid, gid, groups, beat = _report(d, "gamma", "who")
    assert 70000 <= uid <= 70999 and (gid, groups, beat) == (uid, [], True)
    assert uid != int(d.box.run("id", "-u", "watchkeeper").stdout)


def test_a_fork_bomb_under_its_own_uid_is_killed_at_its_process_cap(isolated):
    """Under the unit, where /proc hides an isolated agent's processes from the daemon, the
    run's cgroup still counts them: a run past its max_processes is killed (process_cap)."""
    d = isolated
    _admin(d, "start-now", "bomb")
    capped = wait_until(lambda: d.unit_journal("EVENT=run_process_cap", "AGENT=bomb"),
                        timeout_s=30, message="run_process_cap for the fork bomb")
    assert int(capped[0]["PROCESSES"]) > 20
    finished = wait_until(lambda: d.unit_journal("EVENT=run_finished", "AGENT=bomb"),
                          timeout_s=30, message="the fork bomb's run_finished")
    assert finished[0]["STOP_REASON"] == "process_cap"



SAME_UID = """
report("same", {
    "uid": os.getuid(),
    "daemon environ": attempt(lambda: open(f"/proc/{DAEMON}/environ", "rb").read()),
    "daemon mem": attempt(lambda: open(f"/proc/{DAEMON}/mem", "rb").close()),
    "pause": call("pause", {"agent": "same"})["ok"],
})
"""


@pytest.fixture(scope="module")
def shared_uid(tmp_path_factory):
    """The shipped unit without its capabilities: agents share the daemon's uid."""
    require(*SystemdSandbox.available())
    require(os.access(SYSTEM_PYTHON, os.X_OK) and _python_version(SYSTEM_PYTHON)
            == f"{sys.version_info.major}.{sys.version_info.minor}",
            f"needs {SYSTEM_PYTHON} of this Python's version (the venv's packages are copied)")
    box = SystemdSandbox(tmp_path_factory.mktemp("shared-uid"))
    box.start()
    try:
        deployment = Deployment(box)
        deployment.install()
        box.run("rm", "-f", *[f"/etc/watchkeeper/agents.d/{n}.yaml" for n in ("keeper", "ticker")])
        deployment.write_config({"same": {"jobs": [probe_job(SAME_UID)]}})
        box.write_file(f"/etc/systemd/system/{UNIT}.d/no-caps.conf",
                       "[Service]\nAmbientCapabilities=\nCapabilityBoundingSet=\n")
        box.run("systemctl", "daemon-reload")
        box.run("systemctl", "start", UNIT, timeout_s=90)
        yield deployment
    finally:
        box.stop()


def test_an_agent_sharing_the_daemons_uid_cannot_read_its_memory(shared_uid):
    """Without CAP_SETUID agents share the daemon's uid (the daemon says they are not
    isolated), yet cannot read its environment or memory (it is not dumpable) nor run an
    admin verb."""
    d = shared_uid
    assert d.unit_journal("EVENT=agents_not_isolated")
    _admin(d, "start-now", "same")
    same = _report(d, "same", "same")
    assert same["uid"] == int(d.box.run("id", "-u", "watchkeeper").stdout), same
    assert same["daemon environ"].startswith("denied") and same["daemon mem"].startswith(
        "denied"), same
    assert same["pause"] is False


def test_an_agent_with_network_off_under_the_unit_has_only_its_own_loopback(isolated):
    """Under the unit an agent with `network: false` runs, under its own uid and with no
    capability, in a network namespace of its own that holds only a working loopback, and
    still heartbeats through the daemon's socket."""
    d = isolated
    _admin(d, "start-now", "delta")
    _admin(d, "start-now", "epsilon")
    offline = _report(d, "delta", "offline")
    online = _report(d, "epsilon", "limits")
    assert offline["ns"] != online["ns"], (offline, online)
    assert offline["interfaces"] == ["lo"] and offline["own loopback"] == "ok", offline
    assert offline["heartbeat"] is True and 70000 <= offline["uid"] <= 70999, offline
    assert offline["caps"] == ["0" * 16] * 3, offline


def test_the_unit_keeps_agents_from_link_local_addresses_priorities_and_netlink(isolated):
    """Under the unit an agent with network is refused (EPERM) a connection to the cloud
    metadata address 169.254.169.254 (IPAddressDeny=), a lower priority (~@resources) and
    a netlink socket (EAFNOSUPPORT: RestrictAddressFamilies=)."""
    d = isolated
    _admin(d, "start-now", "epsilon")
    limits = _report(d, "epsilon", "limits")
    assert limits["metadata"] == "denied:1", limits
    assert limits["nice"] == "denied:1", limits
    assert limits["netlink"] == "denied:97", limits
