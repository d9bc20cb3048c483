"""Per-run pids.max under the shipped unit in a real systemd (sandbox), where the service's
cgroup and its pids controller are delegated: the kernel itself refuses a run's fork past
its limit, which is max_processes x 64 (pids.max counts threads), never more than the
service's own TasksMax less a reserve for the daemon."""

from __future__ import annotations

import errno
import json
import os
import sys

import pytest
from sandbox_systemd import SystemdSandbox
from support import require, wait_until
from test_systemd_e2e import (
    CGROUP,
    MAIN_CONFIG,
    SYSTEM_PYTHON,
    UNIT,
    WATCHKEEPER,
    Deployment,
    _python_version,
)
from untrusted import probe_job

from supervisor.cgroups import RESERVED_TASKS, RunCgroups

# The run's cgroup files belong to the daemon's uid (agents run under uids of their own), so
# the run says where its cgroup is and stays, and the test reads them from outside.
OWN_CGROUP = """
import threading
cg = "/sys/fs/cgroup" + open("/proc/self/cgroup").read().split("::", 1)[1].strip()
"""
# Threads until the kernel refuses one (pids.max counts them), then a fork without end:
# the daemon's own cap counts processes, so only the kernel can stop this run.
EXHAUST = OWN_CGROUP + """
threading.stack_size(256 * 1024)
hold = threading.Event()
threads = 0
while True:
    try:
        threading.Thread(target=hold.wait, daemon=True).start()
        threads += 1
    except RuntimeError:
        break
forked, fork_error = 0, None
while True:
    try:
        if os.fork() == 0:
            time.sleep(30)
            os._exit(0)
        forked += 1
    except OSError as exc:
        fork_error = exc.errno
        break
report("pids", {"cgroup": cg, "threads": threads, "forked": forked, "fork_error": fork_error})
idle()
"""
LIMIT = OWN_CGROUP + """
report("pids", {"cgroup": cg})
idle()
"""


@pytest.fixture(scope="module")
def deployed(tmp_path_factory):
    """The shipped unit (TasksMax=512) with an exhausting agent and one at the default cap."""
    require(*SystemdSandbox.available())
    require(os.access(SYSTEM_PYTHON, os.X_OK) and _python_version(SYSTEM_PYTHON)
            == f"{sys.version_info.major}.{sys.version_info.minor}",
            f"needs {SYSTEM_PYTHON} of this Python's version (the venv's packages are copied)")
    box = SystemdSandbox(tmp_path_factory.mktemp("pids"))
    box.start()
    try:
        deployment = Deployment(box)
        deployment.install()
        box.run("rm", "-f", *[f"/etc/watchkeeper/agents.d/{n}.yaml" for n in ("keeper", "ticker")])
        deployment.write_config({"exhaust": {"max_processes": 2, "jobs": [probe_job(EXHAUST)]},
                                 "roomy": {"jobs": [probe_job(LIMIT)]}})
        box.run("systemctl", "start", UNIT, timeout_s=90)
        # A host that binds pids to a cgroup v1 hierarchy (hybrid mode) cannot hand it to v2.
        controllers = box.run("cat", f"/sys/fs/cgroup{CGROUP}/cgroup.controllers").stdout.split()
        require("pids" in controllers, "needs the pids controller on cgroup v2 (this host "
                f"offers the unit's cgroup only {controllers or 'no controllers'})")
        yield deployment
    finally:
        box.stop()


def _pids_report(d: Deployment, agent: str) -> dict:
    def find():
        for entry in d.unit_journal(f"AGENT={agent}", "EVENT=agent_output"):
            try:
                line = json.loads(entry["LINE"])
            except ValueError:
                continue
            if isinstance(line, dict) and line.get("tag") == "pids":
                return [line["data"]]
        return None
    d.box.run(WATCHKEEPER, "--config", MAIN_CONFIG, "start-now", agent)
    try:
        return wait_until(find, timeout_s=60, message=f"{agent}'s pids report")[0]
    except AssertionError as exc:
        said = [{k: v for k, v in e.items() if k.isupper() and not k.startswith("_")}
                for e in d.unit_journal(f"AGENT={agent}")]
        raise AssertionError(f"{exc}; {agent} said: {said}") from None


def _read(d: Deployment, cgroup: str, name: str) -> str:
    return d.box.run("cat", f"{cgroup}/{name}").stdout.strip()


def test_the_kernel_refuses_a_runs_fork_past_its_pids_max(deployed):
    """A run of an agent with max_processes 2 gets pids.max 128, and past it the kernel
    refuses its fork with EAGAIN and counts the refusal in pids.events."""
    found = _pids_report(deployed, "exhaust")
    assert found["fork_error"] == errno.EAGAIN
    assert found["forked"] <= 1 and 0 < found["threads"] < 128
    assert _read(deployed, found["cgroup"], "pids.max") == "128"
    events = dict(line.split() for line in
                  _read(deployed, found["cgroup"], "pids.events").splitlines())
    assert int(events["max"]) > 0


def test_a_runs_pids_max_leaves_the_service_a_reserve(deployed):
    """At the default max_processes (256 x 64 tasks), a run's pids.max is the service's
    TasksMax less 64 tasks, so a bomb cannot take every task the daemon needs."""
    found = _pids_report(deployed, "roomy")
    assert _read(deployed, found["cgroup"].rsplit("/runs/", 1)[0], "pids.max") == "512"
    assert _read(deployed, found["cgroup"], "pids.max") == str(512 - 64)


def test_a_runs_pids_max_is_clamped_below_the_base_limit(tmp_path):
    """create() writes max_pids into the run's pids.max, but at most the base cgroup's own
    pids.max less RESERVED_TASKS, and as asked where the base has no limit."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "pids.max").write_text("512\n")
    cgroups = RunCgroups(tmp_path, created_base=False)
    assert (cgroups.create("small", max_pids=128) / "pids.max").read_text() == "128"
    assert (cgroups.create("big", max_pids=256 * 64) / "pids.max").read_text() == \
        str(512 - RESERVED_TASKS)
    (tmp_path / "pids.max").write_text("max\n")
    assert (cgroups.create("free", max_pids=256 * 64) / "pids.max").read_text() == "16384"
