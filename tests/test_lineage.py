"""Which run a process belongs to: a run's root pid up the chain first, its environment never
on its own (kernel/lineage.py)."""

from __future__ import annotations

import os
import subprocess
import sys

from support import wait_until

from supervisor.kernel.lineage import ancestry, read_markers
from supervisor.kernel.procscan import LiveRun, Owner, ProcInfo, classify
from supervisor.kernel.proctree import attribute_tree, tree_children

DAEMON, STATE = 100, "/var/lib/wk"


def _proc(pid, ppid, run_id=None):
    return ProcInfo(pid=pid, ppid=ppid, name="node", cmdline=("node",), run_id=run_id,
                    state_dir=STATE if run_id else None)


def test_a_forged_marker_below_a_live_run_belongs_to_that_run():
    """A process below run B's root that names run A (live or dead) in its environment is B's."""
    table = {DAEMON: _proc(DAEMON, 1), 200: _proc(200, DAEMON, "run-b"),
             300: _proc(300, DAEMON, "run-a"), 201: _proc(201, 200, "run-a"),
             202: _proc(202, 200, "run-dead"), 203: _proc(203, 202)}
    live = {"run-a": LiveRun("a", 300), "run-b": LiveRun("b", 200)}
    owners = classify(table, daemon_pid=DAEMON, state_dir=STATE, live_runs=live)
    assert {pid: (o.owner, o.run_id) for pid, o in owners.items() if pid in (201, 202, 203)} \
        == {pid: (Owner.RUN, "run-b") for pid in (201, 202, 203)}


def test_an_orphan_without_a_root_on_its_chain_keeps_its_inherited_marker():
    """A process re-parented to the daemon has no run root above it: its marker names its run."""
    table = {DAEMON: _proc(DAEMON, 1), 400: _proc(400, DAEMON, "run-a"), 401: _proc(401, 400)}
    owners = classify(table, daemon_pid=DAEMON, state_dir=STATE,
                      live_runs={"run-a": LiveRun("a", 300)})
    assert owners[401] == (Owner.RUN, "run-a")


def test_a_real_child_naming_another_run_is_attributed_to_its_roots_run():
    """A real grandchild whose environment says WATCHKEEPER_RUN_ID=run-a, started below a
    process we call run-b's root, is attributed to run-b."""
    script = ("import os, subprocess, sys, time\n"
              "env = dict(os.environ, WATCHKEEPER_RUN_ID='run-a')\n"
              "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], env=env)\n"
              "time.sleep(60)\n")
    root = subprocess.Popen([sys.executable, "-c", script])
    try:
        me = os.getpid()
        kids = wait_until(lambda: tree_children(me).get(root.pid), 10,
                          message="the grandchild started")
        grandchild = kids[0]
        wait_until(lambda: read_markers(grandchild).get("WATCHKEEPER_RUN_ID") == "run-a", 10,
                   message="the grandchild exec'd with its forged marker")
        assert ancestry(grandchild)[:3] == [grandchild, root.pid, me]
        owners = attribute_tree(tree_children(me), me, {root.pid: "run-b"}, {})
        assert owners[grandchild] == "run-b"
    finally:
        for pid in [*tree_children(os.getpid()).get(root.pid, []), root.pid]:
            os.kill(pid, 9)
        root.wait()
