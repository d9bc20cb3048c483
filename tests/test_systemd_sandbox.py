"""Units under a real systemd: notify, watchdog, journal fields, unit verification, the deploy unit.

All tests share one sandbox per module (a boot costs about a second) and give each test units of
its own names.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from sandbox_systemd import SystemdSandbox
from support import require, wait_until

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
DEPLOY_UNIT = ROOT / "deploy" / "systemd" / "watchkeeper.service"

NOTIFY_SERVICE = """\
import pathlib, sys, time
from supervisor.systemd.notify import SystemdNotifier

trigger = pathlib.Path(sys.argv[1])
notifier = SystemdNotifier()
notifier.status("waiting for trigger")
while not trigger.exists():
    time.sleep(0.05)
notifier.ready()
notifier.status("serving 3 agents")
while True:
    notifier.watchdog_ping()
    time.sleep(notifier.watchdog_interval_s() or 1.0)
"""

JOURNAL_SERVICE = """\
import signal, structlog
from supervisor.systemd.journal import JournalRenderer, journal_stream_matches
from supervisor.systemd.notify import SystemdNotifier

structlog.configure(processors=[structlog.processors.add_log_level, JournalRenderer()])
log = structlog.get_logger("watchkeeper.demo")
log.info("journal_probe", stream_matches=journal_stream_matches())
log.info("agent_started", agent="x", run_id="r1")
log.info("agent_started", agent="y", run_id="r2")
log.warning("agent_slow", agent="x", run_id="r1")
log.error("agent_failed", agent="y", run_id="r2", exception="Traceback:\\n  boom\\nValueError")
SystemdNotifier().ready()
signal.pause()
"""

# Stands in for /opt/watchkeeper/bin/watchkeeper under the deploy unit: system python3 and the
# standard library only, because PrivateTmp=yes hides the venv under /tmp.
DAEMON_STUB = """\
#!/usr/bin/python3
import json, os, shutil, signal, socket, subprocess, sys, time

def notify(message):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.sendto(message.encode(), os.environ["NOTIFY_SOCKET"])

def delegated_cgroup():
    own = open("/proc/self/cgroup").read().strip().split("::")[1]
    run_cgroup = f"/sys/fs/cgroup{own}/run-1"
    os.makedirs(run_cgroup, exist_ok=True)
    child = subprocess.Popen(["sleep", "60"])
    with open(f"{run_cgroup}/cgroup.procs", "w") as procs:
        procs.write(str(child.pid))
    moved = str(child.pid) in open(f"{run_cgroup}/cgroup.procs").read().split()
    child.kill()
    child.wait()
    return {"path": run_cgroup, "moved": moved}

def chrome():
    if not shutil.which("chromium"):
        return None
    page = subprocess.run(
        ["chromium", "--headless", "--dump-dom", "data:text/html,<p>sandboxed</p>"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "HOME": os.environ["STATE_DIRECTORY"]})
    return {"returncode": page.returncode, "dom": page.stdout, "stderr": page.stderr[-2000:]}

probes = {"argv": sys.argv[1:], "uid": os.getuid(), "cgroup": delegated_cgroup(),
          "chrome": chrome(), "environ": dict(os.environ)}
with open(os.path.join(os.environ["STATE_DIRECTORY"], "probes.json"), "w") as out:
    json.dump(probes, out)
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
notify("READY=1")
while True:
    notify("WATCHDOG=1")
    time.sleep(int(os.environ["WATCHDOG_USEC"]) / 2e6)
"""


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory):
    require(*SystemdSandbox.available())
    box = SystemdSandbox(tmp_path_factory.mktemp("sandbox"))
    box.start()
    yield box
    box.stop()


def python_unit(script_path: str, *args: str, extra: str = "", type_: str = "notify") -> str:
    return (f"[Service]\nType={type_}\nEnvironment=PYTHONPATH={ROOT}\n"
            f"ExecStart={PYTHON} {script_path} {' '.join(args)}\n{extra}")


def journal_json(box: SystemdSandbox, *args: str) -> list[dict]:
    output = box.run("journalctl", "--output=json", "--no-pager", *args, check=False).stdout
    return [json.loads(line) for line in output.splitlines() if line.strip()]


def test_boots_to_running(sandbox):
    """The sandbox's systemd is PID 1 of its namespace and reports the system as running."""
    assert sandbox.run("cat", "/proc/1/comm").stdout.strip() == "systemd"
    state = sandbox.run("systemctl", "is-system-running", check=False).stdout.strip()
    assert state in ("running", "degraded")


def test_cgroup_tree_is_pure_v2(sandbox):
    """Inside, /sys/fs/cgroup is a cgroup2 mount and systemd keeps itself in init.scope."""
    assert sandbox.run("stat", "-f", "-c", "%T", "/sys/fs/cgroup").stdout.strip() == "cgroup2fs"
    assert "0::/init.scope" in sandbox.run("cat", "/proc/1/cgroup").stdout.splitlines()


def test_notify_unit_active_only_after_ready(sandbox):
    """A Type=notify unit stays activating, and `systemctl start` blocks, until READY=1."""
    trigger = "/run/notify-ready.trigger"
    sandbox.write_file("/opt/wk-test/notify_service.py", NOTIFY_SERVICE)
    sandbox.install_unit("notify-ready.service",
                         python_unit("/opt/wk-test/notify_service.py", trigger))
    start = subprocess.Popen(sandbox.command("systemctl", "start", "notify-ready.service"),
                             env=sandbox.environment())
    try:
        wait_until(lambda: sandbox.unit_property("notify-ready.service", "StatusText")
                   == "waiting for trigger", timeout_s=20, message="status before READY")
        assert sandbox.unit_property("notify-ready.service", "ActiveState") == "activating"
        assert start.poll() is None
        sandbox.write_file(trigger, "")
        assert start.wait(timeout=20) == 0
    finally:
        start.kill()
        start.wait()
    assert sandbox.unit_property("notify-ready.service", "ActiveState") == "active"
    wait_until(lambda: 'Status: "serving 3 agents"' in sandbox.status("notify-ready.service"),
               timeout_s=10, message="status line in systemctl status")


def test_watchdog_restarts_stopped_service(sandbox):
    """A service that stops pinging (SIGSTOP) is killed by the watchdog and restarted."""
    trigger = "/run/notify-watchdog.trigger"
    sandbox.write_file(trigger, "")
    sandbox.write_file("/opt/wk-test/notify_service.py", NOTIFY_SERVICE)
    sandbox.install_unit("notify-watchdog.service", python_unit(
        "/opt/wk-test/notify_service.py", trigger,
        # A stopped process ignores SIGABRT until continued; SIGKILL follows after 1 s.
        extra="WatchdogSec=2\nTimeoutAbortSec=1\nRestart=on-failure\nRestartSec=100ms\n"))
    sandbox.run("systemctl", "start", "notify-watchdog.service")
    first_pid = sandbox.unit_property("notify-watchdog.service", "MainPID")
    sandbox.run("kill", "-STOP", first_pid)

    def restarted() -> bool:
        unit = "notify-watchdog.service"
        return (sandbox.unit_property(unit, "NRestarts") == "1"
                and sandbox.unit_property(unit, "ActiveState") == "active"
                and sandbox.unit_property(unit, "MainPID") not in ("0", first_pid))

    wait_until(restarted, timeout_s=20, message="restart after watchdog timeout")
    log = sandbox.run("journalctl", "--no-pager", "-u", "notify-watchdog.service").stdout
    assert "Watchdog timeout" in log


def test_journal_fields_filter_by_agent(sandbox):
    """Events sent by JournalRenderer can be selected with `journalctl AGENT=x`."""
    sandbox.write_file("/opt/wk-test/journal_service.py", JOURNAL_SERVICE)
    sandbox.install_unit("journal-agent.service",
                         python_unit("/opt/wk-test/journal_service.py"))
    sandbox.run("systemctl", "start", "journal-agent.service")
    entries = wait_until(
        lambda: (found := journal_json(sandbox, "-u", "journal-agent.service", "AGENT=x"))
        and len(found) >= 2 and found,
        timeout_s=10, message="two journal entries for AGENT=x")
    assert [(entry["EVENT"], entry["RUN_ID"]) for entry in entries] == [
        ("agent_started", "r1"), ("agent_slow", "r1")]
    assert {entry["SYSLOG_IDENTIFIER"] for entry in entries} == {"watchkeeper"}


def test_journal_priority_filter(sandbox):
    """`journalctl -p warning` returns only the warning and error events, with intact fields."""
    sandbox.write_file("/opt/wk-test/journal_service.py", JOURNAL_SERVICE)
    sandbox.install_unit("journal-priority.service",
                         python_unit("/opt/wk-test/journal_service.py"))
    sandbox.run("systemctl", "start", "journal-priority.service")
    entries = wait_until(
        lambda: (found := journal_json(sandbox, "-u", "journal-priority.service",
                                       "-p", "warning")) and len(found) >= 2 and found,
        timeout_s=10, message="warning entries")
    assert [(entry["EVENT"], entry["PRIORITY"]) for entry in entries] == [
        ("agent_slow", "4"), ("agent_failed", "3")]
    assert entries[1]["EXCEPTION"] == "Traceback:\n  boom\nValueError"


def test_journal_stream_matches_under_systemd(sandbox):
    """Under a unit whose stderr goes to the journal, journal_stream_matches() is True."""
    sandbox.write_file("/opt/wk-test/journal_service.py", JOURNAL_SERVICE)
    sandbox.install_unit("journal-stream.service",
                         python_unit("/opt/wk-test/journal_service.py"))
    sandbox.run("systemctl", "start", "journal-stream.service")
    probes = wait_until(lambda: journal_json(sandbox, "-u", "journal-stream.service",
                                             "EVENT=journal_probe"),
                        timeout_s=10, message="journal_probe entry")
    assert probes[0]["STREAM_MATCHES"] == "True"


def test_verify_accepts_valid_unit(sandbox):
    """`systemd-analyze verify` passes a well-formed unit without a word."""
    sandbox.write_file("/etc/systemd/system/verify-good.service",
                       "[Unit]\nDescription=good\n[Service]\nType=oneshot\nExecStart=/bin/true\n")
    result = sandbox.run("systemd-analyze", "verify", "/etc/systemd/system/verify-good.service")
    assert (result.stdout + result.stderr).strip() == ""


def test_verify_reports_unknown_key(sandbox):
    """`systemd-analyze verify` names a misspelt key and fails the unit that lacks ExecStart."""
    sandbox.write_file("/etc/systemd/system/verify-bad.service",
                       "[Service]\nType=oneshot\nExecStrat=/bin/true\n")
    result = sandbox.run("systemd-analyze", "verify", "/etc/systemd/system/verify-bad.service",
                         check=False)
    assert ":3: Unknown key 'ExecStrat' in section [Service]" in result.stderr
    assert result.returncode != 0


# -- the deploy unit ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def deployed(sandbox):
    """The deploy unit installed as shipped, running a stub daemon; returns the stub's probes."""
    sandbox.write_file("/opt/watchkeeper/bin/watchkeeper", DAEMON_STUB, mode=0o755)
    sandbox.write_file("/etc/watchkeeper/watchkeeper.yaml", "agents: []\n")
    if sandbox.run("id", "watchkeeper", check=False).returncode != 0:
        sandbox.run("useradd", "--system", "--user-group", "--home-dir", "/var/lib/watchkeeper",
                    "--shell", "/usr/sbin/nologin", "watchkeeper")
    sandbox.install_unit("watchkeeper.service", DEPLOY_UNIT.read_text())
    sandbox.run("systemctl", "start", "watchkeeper.service", timeout_s=180)
    return json.loads(sandbox.read_file("/var/lib/watchkeeper/probes.json"))


def test_deploy_unit_verifies_clean(sandbox, deployed):
    """The shipped unit passes `systemd-analyze verify` with no warnings."""
    result = sandbox.run("systemd-analyze", "verify", "/etc/systemd/system/watchkeeper.service")
    assert (result.stdout + result.stderr).strip() == ""


def test_deploy_unit_runs_as_watchkeeper(sandbox, deployed):
    """The daemon runs as the watchkeeper user with its command line and state directory."""
    assert deployed["argv"] == ["--config", "/etc/watchkeeper/watchkeeper.yaml", "run"]
    assert deployed["uid"] == int(sandbox.run("id", "-u", "watchkeeper").stdout)
    assert deployed["environ"]["STATE_DIRECTORY"] == "/var/lib/watchkeeper"
    assert deployed["environ"]["RUNTIME_DIRECTORY"] == "/run/watchkeeper"
    assert deployed["environ"]["WATCHDOG_USEC"] == "30000000"
    assert sandbox.unit_property("watchkeeper.service", "ActiveState") == "active"


def test_deploy_unit_delegates_writable_cgroup(sandbox, deployed):
    """Under Delegate=yes the daemon creates a run cgroup in its own subtree and moves a child in."""
    assert deployed["cgroup"] == {
        "path": "/sys/fs/cgroup/system.slice/watchkeeper.service/run-1", "moved": True}


def test_deploy_unit_keeps_chrome_sandbox_working(sandbox, deployed):
    """Headless Chromium with its own sandbox (no --no-sandbox) renders a page under the unit."""
    require(shutil.which("chromium") is not None, "needs chromium (apt-get install chromium)")
    assert deployed["chrome"] is not None
    assert "<p>sandboxed</p>" in deployed["chrome"]["dom"], deployed["chrome"]["stderr"]



def test_deploy_unit_exposure_ok():
    """deploy/systemd/security_score.py rates the shipped unit's exposure at 2.3 or less."""
    require(*SystemdSandbox.available())  # the script boots a sandbox of its own
    script = ROOT / "deploy" / "systemd" / "security_score.py"
    result = subprocess.run([PYTHON, str(script), "--threshold", "2.3"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level for watchkeeper.service" in result.stdout
