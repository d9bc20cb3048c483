"""watchkeeper installed with `install-systemd` and run by the shipped unit under a real systemd.

One sandbox for the module, one deployment in it; the tests run in file order and follow
the life of the service: install, start, journal, cgroups, reload, watchdog, stop. The
package installed in the sandbox is this checkout's `supervisor/`, with the dependencies
copied from the test's own virtual environment into /opt/watchkeeper (a venv of the
system Python: the unit's ProtectHome= and PrivateTmp= hide the test's venv).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import psutil
import pytest
import yaml
from sandbox_systemd import SandboxCommandError, SystemdSandbox
from support import require, wait_until

ROOT = Path(__file__).resolve().parent.parent
DEPLOY_UNIT = ROOT / "deploy" / "systemd" / "watchkeeper.service"
SYSTEM_PYTHON = "/usr/bin/python3"
VENV = "/opt/watchkeeper"
SITE = f"{VENV}/lib/python{sys.version_info.major}.{sys.version_info.minor}/site-packages"
WATCHKEEPER = f"{VENV}/bin/watchkeeper"
UNIT = "watchkeeper.service"
STATE_DIR = "/var/lib/watchkeeper"
CGROUP = "/system.slice/watchkeeper.service"
MAIN_CONFIG = "/etc/watchkeeper/watchkeeper.yaml"

ENTRY_POINT = f"""\
#!{VENV}/bin/python
import sys
from supervisor.cli.main import main
sys.exit(main())
"""
# Faster than the shipped 30 s: a frozen daemon is restarted within seconds.
TEST_DROP_IN = """\
[Service]
WatchdogSec=2
TimeoutAbortSec=2
RestartSec=100ms
"""
CONFIG = {"state_dir": STATE_DIR, "working_dir": STATE_DIR, "stop_grace_s": 3, "tick_s": 0.5}
# An `always` agent that leaves a grandchild in a session of its own, and says where.
KEEPER = """\
import os, subprocess, time
grandchild = subprocess.Popen(["sleep", "1000"], start_new_session=True)
with open(os.path.join(os.environ["WATCHKEEPER_WORK_DIR"], "keeper.pids"), "w") as out:
    out.write(f"{os.getpid()} {grandchild.pid} {os.environ['WATCHKEEPER_RUN_ID']}")
while True:
    print("keeper alive", flush=True)
    time.sleep(1)
"""
TICKER = "print('tick one', flush=True); print('tick two', flush=True)"
AGENTS = {
    "keeper": {"jobs": [{"id": "main", "command": ["{python}", "-c", KEEPER],
                         "schedule": {"always": True}, "timeout_s": None}]},
    "ticker": {"jobs": [{"id": "main", "command": ["{python}", "-c", TICKER],
                         "schedule": {"every_s": 1}}]},
}


class Deployment:
    """The sandbox with watchkeeper installed, and the questions the tests ask it."""

    def __init__(self, box: SystemdSandbox) -> None:
        self.box = box
        self.install_output = ""
        self.sample_config = ""
        self.sample_check = ""
        self.sample_modes: list[str] = []

    def install(self) -> None:
        box = self.box
        box.run(SYSTEM_PYTHON, "-m", "venv", "--without-pip", VENV)
        shutil.copytree(sysconfig.get_paths()["purelib"], box.host_path(SITE),
                        dirs_exist_ok=True, symlinks=True,
                        ignore=shutil.ignore_patterns("__editable__*", "supervisor"))
        shutil.copytree(ROOT / "supervisor", box.host_path(f"{SITE}/supervisor"),
                        ignore=shutil.ignore_patterns("__pycache__"))
        box.write_file(WATCHKEEPER, ENTRY_POINT, mode=0o755)
        # The unit's ProtectSystem=strict keeps the daemon from caching bytecode itself.
        box.run(f"{VENV}/bin/python", "-m", "compileall", "-q", f"{SITE}/supervisor")
        self.install_output = box.run(WATCHKEEPER, "install-systemd",
                                      "--unit-file", str(DEPLOY_UNIT)).stdout
        self.sample_config = box.read_file(MAIN_CONFIG)
        self.sample_modes = box.run("stat", "-c", "%n %U:%G %a", MAIN_CONFIG,
                                    "/etc/watchkeeper").stdout.splitlines()
        self.sample_check = box.run(WATCHKEEPER, "--config", MAIN_CONFIG,
                                    "check-config").stdout
        self.write_config(AGENTS)
        box.write_file(f"/etc/systemd/system/{UNIT}.d/e2e.conf", TEST_DROP_IN)
        box.run("systemctl", "daemon-reload")

    def write_config(self, agents: dict[str, dict]) -> None:
        # The sample install-systemd wrote (its socket_group among others), sped up.
        self.write_etc(MAIN_CONFIG, yaml.safe_dump({**yaml.safe_load(self.sample_config),
                                                    **CONFIG}))
        for name, spec in agents.items():
            self.write_etc(f"/etc/watchkeeper/agents.d/{name}.yaml", yaml.safe_dump(spec))

    def write_etc(self, path: str, text: str) -> None:
        """A config file as install-systemd makes them: root's, readable by the daemon."""
        self.box.write_file(path, text, mode=0o640)
        self.box.run("chown", "root:watchkeeper", path)

    def prop(self, name: str) -> str:
        return self.box.unit_property(UNIT, name)

    def journal(self, *matches: str) -> list[dict]:
        result = self.box.run("journalctl", "--output=json", "--no-pager", *matches,
                              check=False)
        if result.returncode != 0 and result.stderr.strip():
            raise SandboxCommandError(result)  # exit 1 alone: --grep matched nothing
        return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]

    def unit_journal(self, *matches: str) -> list[dict]:
        """This unit's entries from its current invocation."""
        return self.journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={self.prop('InvocationID')}",
                            *matches)

    def keeper_pids(self) -> tuple[int, int, str]:
        """(keeper's pid, its grandchild's pid, its run id), as written by the current run."""
        def read():
            try:
                pid, grandchild, run_id = self.box.read_file(f"{STATE_DIR}/work/keeper/keeper.pids").split()
            except (OSError, ValueError):
                return None
            return (int(pid), int(grandchild), run_id) if self.alive(int(pid)) else None
        return wait_until(read, timeout_s=20, message="keeper's pids")

    def alive(self, pid: int) -> bool:
        """Whether `pid` (a pid inside the sandbox) is a live, not zombie, process."""
        result = self.box.run("cat", f"/proc/{pid}/stat", check=False)
        return result.returncode == 0 and result.stdout.rsplit(")", 1)[1].split()[0] != "Z"

    def cgroup_of(self, pid: int) -> str:
        """The process's v2 cgroup (the host also shows its v1 hierarchies: skipped)."""
        lines = self.box.run("cat", f"/proc/{pid}/cgroup").stdout.splitlines()
        return next(line[3:] for line in lines if line.startswith("0::"))

    def supervised_processes(self) -> list[psutil.Process]:
        """Host processes in this sandbox that carry the daemon's state dir in their env."""
        sandbox_ns = os.readlink(f"/proc/{self.box.pid}/ns/pid")
        found = []
        for proc in psutil.process_iter():
            try:
                if (os.readlink(f"/proc/{proc.pid}/ns/pid") == sandbox_ns and
                        proc.environ().get("WATCHKEEPER_STATE_DIR") == STATE_DIR):
                    found.append(proc)
            except (OSError, psutil.Error):
                continue
        return found


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    require(*SystemdSandbox.available())
    require(os.access(SYSTEM_PYTHON, os.X_OK) and _python_version(SYSTEM_PYTHON)
            == f"{sys.version_info.major}.{sys.version_info.minor}",
            f"needs {SYSTEM_PYTHON} of this Python's version (the venv's packages are copied)")
    box = SystemdSandbox(tmp_path_factory.mktemp("e2e"))
    box.start()
    try:
        deployment = Deployment(box)
        deployment.install()
        yield deployment
    finally:
        box.stop()


@pytest.fixture
def started(deployed):
    """The service running, so that a test needing it passes when run alone too."""
    if deployed.prop("ActiveState") != "active":
        deployed.box.run("systemctl", "start", UNIT, timeout_s=90)
    return deployed


def _python_version(python: str) -> str:
    return subprocess.run([python, "-c", "import sys; print(*sys.version_info[:2], sep='.')"],
                          capture_output=True, text=True).stdout.strip()


def test_install_creates_user_config_and_unit(deployed):
    """install-systemd creates the system user, a sample config that checks OK, the unit."""
    box = deployed.box
    assert deployed.install_output.splitlines()[:6] == [
        "user watchkeeper: created (home /var/lib/watchkeeper, created by systemd's "
        "StateDirectory=)",
        "/etc/watchkeeper: created",
        "/etc/watchkeeper/agents.d: created",
        "/etc/watchkeeper/watchkeeper.yaml: sample written",
        "/etc/systemd/system/watchkeeper.service: installed",
        "systemctl daemon-reload: done"]
    passwd = box.run("getent", "passwd", "watchkeeper").stdout.strip().split(":")
    assert passwd[5:] == [STATE_DIR, "/usr/sbin/nologin"]
    assert box.read_file(f"/etc/systemd/system/{UNIT}") == DEPLOY_UNIT.read_text()
    assert not box.host_path(f"/etc/systemd/system/{UNIT}.d/install.conf").exists()
    assert f"state_dir: {STATE_DIR}" in deployed.sample_config
    assert yaml.safe_load(deployed.sample_config)["socket_group"] == "watchkeeper"
    assert deployed.sample_check.startswith(f"{MAIN_CONFIG}: OK (0 agents")
    assert deployed.sample_modes == [f"{MAIN_CONFIG} root:watchkeeper 640",
                                     "/etc/watchkeeper root:watchkeeper 750"]


def test_install_again_keeps_the_config(deployed):
    """A second install-systemd keeps the edited config and leaves the unit as it is."""
    before = deployed.box.read_file(MAIN_CONFIG)
    output = deployed.box.run(WATCHKEEPER, "install-systemd",
                              "--unit-file", str(DEPLOY_UNIT)).stdout
    assert f"{MAIN_CONFIG}: exists, kept" in output
    assert f"/etc/systemd/system/{UNIT}: unchanged" in output
    assert deployed.box.read_file(MAIN_CONFIG) == before


def test_unit_verifies_clean(deployed):
    """`systemd-analyze verify` accepts the installed unit (and drop-in) without a word."""
    result = deployed.box.run("systemd-analyze", "verify", f"/etc/systemd/system/{UNIT}")
    assert (result.stdout + result.stderr).strip() == ""


def test_start_returns_after_ready(deployed):
    """`systemctl start` returns once the daemon is running: active, with its status line."""
    deployed.box.run("systemctl", "start", UNIT, timeout_s=90)
    assert deployed.prop("ActiveState") == "active"
    assert deployed.prop("StatusText").startswith("2 agents: ")
    running = deployed.unit_journal("EVENT=daemon_state", "NEW=running")
    started = deployed.journal("_PID=1", f"UNIT={UNIT}",
                               "MESSAGE_ID=39f53479d3a045ac8e11786248231fbf")
    assert len(running) == 1 and started
    assert int(running[0]["__MONOTONIC_TIMESTAMP"]) < int(started[-1]["__MONOTONIC_TIMESTAMP"])
    status = json.loads(deployed.box.run(WATCHKEEPER, "--config", MAIN_CONFIG, "--json",
                                         "status").stdout)
    assert status["daemon"]["state"] == "running"
    assert status["daemon"]["pid"] == int(deployed.prop("MainPID"))


@pytest.mark.usefixtures("started")
def test_systemctl_status_shows_status_line(deployed):
    """`systemctl status` shows the daemon's STATUS= line."""
    wait_until(lambda: 'Status: "2 agents: 1 running' in deployed.box.status(UNIT)
               or 'Status: "2 agents: 2 running' in deployed.box.status(UNIT),
               timeout_s=10, message=f"status line in:\n{deployed.box.status(UNIT)}")


@pytest.mark.usefixtures("started")
def test_journal_selects_one_agents_lines(deployed):
    """`journalctl -u watchkeeper AGENT=ticker` returns ticker's lines and events, only them."""
    entries = wait_until(
        lambda: (found := deployed.journal("-u", UNIT, "AGENT=ticker"))
        and len([e for e in found if e["EVENT"] == "agent_output"]) >= 4 and found,
        timeout_s=20, message="four output lines of ticker in the journal")
    assert {entry["AGENT"] for entry in entries} == {"ticker"}
    lines = [entry for entry in entries if entry["EVENT"] == "agent_output"]
    assert {entry["LINE"] for entry in lines} == {"tick one", "tick two"}
    assert {entry["PRIORITY"] for entry in lines} == {"6"}
    started = {e["RUN_ID"] for e in entries if e["EVENT"] == "run_started"}
    assert {entry["RUN_ID"] for entry in lines} <= started
    assert {"run_started", "run_finished"} <= {entry["EVENT"] for entry in entries}
    keeper = deployed.journal("-u", UNIT, "AGENT=keeper", "EVENT=agent_output")
    assert keeper and {entry["LINE"] for entry in keeper} == {"keeper alive"}


@pytest.mark.usefixtures("started")
def test_watchkeeper_logs_reads_the_journal(deployed):
    """`watchkeeper logs ticker -p info -o json` prints ticker's journal entries and no other's."""
    output = deployed.box.run(WATCHKEEPER, "logs", "ticker", "-p", "info", "-o", "json").stdout
    entries = [json.loads(line) for line in output.splitlines()]
    assert len(entries) >= 4
    assert {entry["AGENT"] for entry in entries} == {"ticker"}
    assert {entry["_SYSTEMD_UNIT"] for entry in entries} == {UNIT}


# Every verb of the README's command table that talks to the daemon or reads its
# configuration, with no --config: the installed /etc/watchkeeper/watchkeeper.yaml is found.
READ_VERBS = [("status",), ("status", "--json"), ("top", "--json"), ("runs",),
              ("runs", "ticker"), ("check-config",), ("breaker", "status"), ("outputs",),
              ("locks",), ("memory", "list", "notes"), ("memory", "history"),
              ("search", "anything"), ("config-reference",)]
ADMIN_VERBS = [("pause", "ticker"), ("resume", "ticker"), ("start-now", "ticker"),
               ("reload",), ("breaker", "reset", "--reason", "e2e"), ("memory", "export")]
OPERATOR = "wkoperator"


@pytest.mark.usefixtures("started")
def test_every_verb_finds_the_installed_daemon_as_root(deployed):
    """As root, every verb of the command table works without --config."""
    # `logs` runs journalctl, which shows the unit's entries to root and to the
    # systemd-journal group: only root's run is checked.
    for verb in READ_VERBS + ADMIN_VERBS + [("logs", "ticker", "-n", "1")]:
        result = deployed.box.run(WATCHKEEPER, *verb, check=False)
        assert result.returncode == 0, (verb, result.stderr)
    assert "keeper" in deployed.box.run(WATCHKEEPER, "status").stdout


@pytest.mark.usefixtures("started")
def test_every_verb_finds_the_installed_daemon_as_a_group_member(deployed):
    """A member of the watchkeeper group (the sample's socket_group) runs every verb
    without --config, admin verbs included: pause, resume, breaker reset."""
    box = deployed.box
    if box.run("id", OPERATOR, check=False).returncode != 0:
        box.run("useradd", "--no-create-home", "--groups", "watchkeeper", OPERATOR)
    as_operator = ("runuser", "-u", OPERATOR, "--", WATCHKEEPER)
    for verb in READ_VERBS + ADMIN_VERBS:
        result = box.run(*as_operator, *verb, check=False)
        assert result.returncode == 0, (verb, result.stderr)
    uid = box.run("id", "-u", OPERATOR).stdout.strip()
    resets = deployed.unit_journal("EVENT=breaker_reset")
    assert any(e["BY"].startswith(f"uid {uid} ") for e in resets), resets  # the operator's


@pytest.mark.usefixtures("started")
def test_runs_get_cgroups_of_their_own(deployed):
    """Under Delegate=yes the daemon sits in supervisor/ and each run in runs/<run_id>."""
    started = deployed.unit_journal("EVENT=daemon_started")
    assert started[0]["CGROUPS"] == f"/sys/fs/cgroup{CGROUP}"
    assert deployed.cgroup_of(int(deployed.prop("MainPID"))) == f"{CGROUP}/supervisor"
    keeper, grandchild, run_id = deployed.keeper_pids()
    assert deployed.cgroup_of(keeper) == f"{CGROUP}/runs/{run_id}"
    assert deployed.cgroup_of(grandchild) == f"{CGROUP}/runs/{run_id}"


@pytest.mark.usefixtures("started")
def test_reload_with_broken_config_keeps_running(deployed):
    """`systemctl reload` with a broken agent file fails (check-config runs first) and
    says why; a SIGHUP all the same keeps the daemon and journals why."""
    main_pid = deployed.prop("MainPID")
    deployed.write_etc("/etc/watchkeeper/agents.d/broken.yaml",
                       "jobs:\n  - id: x\n    command: [x]\n"
                       "    schedule: {cron: '*/61 * * * *'}\n")
    refused = deployed.box.run("systemctl", "reload", UNIT, check=False)
    assert refused.returncode != 0
    wait_until(lambda: any("broken.yaml:4: jobs[0].schedule.cron" in e.get("MESSAGE", "")
                           for e in deployed.journal(f"_SYSTEMD_UNIT={UNIT}")),
               timeout_s=10, message="check-config's reason in the unit's journal")
    assert deployed.prop("MainPID") == main_pid
    deployed.box.run("systemctl", "kill", "--kill-whom=main", "--signal=HUP", UNIT)
    errors = wait_until(lambda: deployed.unit_journal("EVENT=reload_config_error"),
                        timeout_s=10, message="reload_config_error in the journal")
    assert "broken.yaml:4: jobs[0].schedule.cron" in errors[0]["ERROR"]
    assert errors[0]["PRIORITY"] == "3"
    wait_until(lambda: deployed.prop("ActiveState") == "active", timeout_s=10,
               message="active again after the reload")
    assert deployed.prop("MainPID") == main_pid
    assert deployed.unit_journal("EVENT=reload_rejected")
    deployed.box.run("rm", "/etc/watchkeeper/agents.d/broken.yaml")
    deployed.box.run("systemctl", "reload", UNIT)
    wait_until(lambda: deployed.unit_journal("EVENT=reload_applied"), timeout_s=10,
               message="reload_applied once the file is gone")


@pytest.mark.usefixtures("started")
def test_frozen_daemon_is_restarted_by_the_watchdog(deployed):
    """A daemon frozen with SIGSTOP is killed by the watchdog and restarted with its agents."""
    old_pid = deployed.prop("MainPID")
    old_invocation = deployed.prop("InvocationID")
    restarts = int(deployed.prop("NRestarts"))
    old_keeper, old_grandchild, old_run = deployed.keeper_pids()
    deployed.box.run("kill", "-STOP", old_pid)

    def restarted() -> bool:
        return (int(deployed.prop("NRestarts")) == restarts + 1
                and deployed.prop("ActiveState") == "active"
                and deployed.prop("MainPID") not in ("0", old_pid))

    wait_until(restarted, timeout_s=30, message="restart after the watchdog timeout")
    expected = [
        "watchkeeper.service: Watchdog timeout (limit 2s)!",
        f"watchkeeper.service: Killing process {old_pid} (watchkeeper) with signal SIGABRT.",
        # The frozen daemon could not stop its agents: KillMode=mixed's final SIGKILL did. The
        # grandchild, not the keeper: the keeper may die first of its own, writing to the pipe
        # of the dead daemon (a broken pipe) in the moment before systemd's SIGKILL.
        f"watchkeeper.service: Killing process {old_grandchild} (sleep) with signal SIGKILL.",
    ]

    def logged_by_systemd() -> bool:
        messages = [entry["MESSAGE"] for entry in deployed.journal(
            "_PID=1", f"UNIT={UNIT}", f"INVOCATION_ID={old_invocation}")]
        return all(line in messages for line in expected)

    # journald may lag behind the restart systemd already reports on a busy host.
    wait_until(logged_by_systemd, timeout_s=10, interval_s=0.2,
               message=f"{expected} in systemd's journal")
    keeper, grandchild, run_id = deployed.keeper_pids()
    assert run_id != old_run
    assert not deployed.alive(old_keeper) and not deployed.alive(old_grandchild)


@pytest.mark.usefixtures("started")
def test_stop_leaves_no_process_behind(deployed):
    """`systemctl stop` ends the daemon cleanly, no agent or grandchild survives it, and
    systemd had nothing left to kill."""
    deployed.keeper_pids()
    assert deployed.supervised_processes()
    invocation = deployed.prop("InvocationID")
    deployed.box.run("systemctl", "stop", UNIT, timeout_s=60)
    assert deployed.prop("ActiveState") == "inactive"
    assert deployed.prop("Result") == "success"
    assert deployed.supervised_processes() == []
    stopped = deployed.journal("-u", UNIT, f"_SYSTEMD_INVOCATION_ID={invocation}",
                               "EVENT=daemon_stopped")
    assert stopped and stopped[0]["EXIT_CODE"] == "0"
    assert deployed.journal("_PID=1", f"UNIT={UNIT}", f"INVOCATION_ID={invocation}",
                            "--grep=Killing process") == []
