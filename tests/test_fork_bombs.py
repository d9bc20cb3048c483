"""Fork bombs in the process-group fallback (cgroups off): whatever a run made is gone soon
after it ends, and passing max_processes is a process_cap event, escapes included.

The bombs are bounded (a few hundred processes): the machine is shared."""

from __future__ import annotations

import pytest
from harness import DaemonProc, py
from hostile import AGENT_ENV, kill_all, processes_for
from support import wait_until

CAP = 40

# The first process starts a binary tree of 255 subshells, each with a sleep, all ignoring
# SIGTERM, and exits at once: the run is over before the bomb has grown.
EXITING_BOMB = ["bash", "-c", "trap '' TERM; b() { if [ $1 -gt 0 ]; then b $(($1-1)) & "
                              "b $(($1-1)) & fi; exec sleep 60; }; b 7 & exit 0"]
# The first process stays and keeps forking.
GROWING_BOMB = ["bash", "-c", "for i in $(seq 300); do sleep 60 & done; wait"]
# Every child leaves the run's session and process group (setsid) and double-forks, so its
# sleeper is reparented to the daemon and only its inherited run id says whose it is.
DETACHING_BOMB = py(
    "import os, time\n"
    "for i in range(120):\n"
    "    pid = os.fork()\n"
    "    if pid == 0:\n"
    "        os.setsid()\n"
    "        if os.fork() == 0:\n"
    "            time.sleep(60)\n"
    "        os._exit(0)\n"
    "    os.waitpid(pid, 0)  # the run's own tree stays one process\n"
    "time.sleep(60)\n")


@pytest.mark.parametrize("command", [EXITING_BOMB, GROWING_BOMB, DETACHING_BOMB],
                         ids=["exits-at-once", "keeps-forking", "setsid-double-fork"])
def test_fork_bomb_is_capped_and_every_process_stopped(tmp_path, command):
    """A bomb past max_processes gives a run_process_cap event and leaves no process behind
    once its run has ended, the daemon still answering."""
    spec = {"max_processes": CAP, "jobs": [{"id": "main", "command": command,
                                            "schedule": {"every_s": 3600}}]}
    # A grace period longer than the test's deadline: only the cap can stop a bomb in time.
    d = DaemonProc(tmp_path, {"bomb": spec}, cgroups="off", stop_grace_s=60)
    try:
        with d.start(extra_env=AGENT_ENV):
            d.call("start-now", agent="bomb")
            cap = d.wait_event("run_process_cap", agent="bomb", timeout_s=30)
            assert cap["processes"] > CAP
            d.wait_event("run_finished", agent="bomb", timeout_s=30)
            wait_until(lambda: not processes_for(d.state_dir), 20,
                       message=f"bomb processes left: {len(processes_for(d.state_dir))}")
            assert d.call("ping")["pid"] == d.proc.pid
    finally:
        kill_all(processes_for(d.state_dir))


# The run's only process makes 80 escapes (setsid, then a double fork so the sleeper is
# reparented to the daemon) and exits at once, without waiting for any of them: the daemon
# learns of the escapes by reaping their middle processes (SIGCHLD), not from the run's tree.
ESCAPE_THEN_EXIT_BOMB = py(
    "import os, signal, time\n"
    "for i in range(80):\n"
    "    if os.fork() == 0:\n"
    "        os.setsid()\n"
    "        signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "        if os.fork() == 0:\n"
    "            time.sleep(60)\n"
    "        os._exit(0)\n"
    "os._exit(0)\n")


def test_escapes_of_a_run_that_exited_at_once_are_killed(tmp_path):
    """Processes that escaped with setsid and a double fork from a run that exited at once
    are all killed, and a process_cap or leftover-kill event names that run."""
    spec = {"max_processes": CAP, "jobs": [{"id": "main", "command": ESCAPE_THEN_EXIT_BOMB,
                                            "schedule": {"every_s": 3600}}]}
    d = DaemonProc(tmp_path, {"bomb": spec}, cgroups="off", stop_grace_s=60)
    try:
        with d.start(extra_env=AGENT_ENV):
            d.call("start-now", agent="bomb")
            finished = d.wait_event("run_finished", agent="bomb", timeout_s=30)
            wait_until(lambda: not processes_for(d.state_dir), 20,
                       message=f"escaped processes left: {len(processes_for(d.state_dir))}")
            named = [e for name in ("run_process_cap", "run_leftovers_killed")
                     for e in d.find(name, agent="bomb")]
            assert named and all(e["run_id"] == finished["run_id"] for e in named)
            assert d.call("ping")["pid"] == d.proc.pid
    finally:
        kill_all(processes_for(d.state_dir))
