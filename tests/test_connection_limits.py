"""Idle clients cannot starve agents: per-peer caps, slots reserved for runs, idle timeout."""

from __future__ import annotations

import os
import subprocess
import sys

from harness import DaemonProc, py
from hostile import AGENT_ENV, ROOMY_BREAKER
from support import wait_until

from supervisor.control.admission import (
    MAX_CONNECTIONS,
    MAX_CONNECTIONS_PER_PEER,
    RESERVED_FOR_RUNS,
    Admission,
)
from supervisor.control.client import ControlClient
from supervisor.errors import ControlError, DaemonNotRunning

HOLDERS, PER_HOLDER = 10, 100  # 1,000 idle connections

HOLDER = r"""
import select, socket, sys
socks = []
for _ in range(int(sys.argv[2])):
    s = socket.socket(socket.AF_UNIX)
    s.connect(sys.argv[1])
    socks.append(s)
print("ready", flush=True)
busy = True
while True:  # keep them busy (empty frames) until told "quiet", then idle; EOF ends
    if select.select([sys.stdin], [], [], 0.3)[0]:
        line = sys.stdin.readline()
        if not line:
            break
        busy = False
    for s in list(socks) if busy else []:
        try:
            s.send(b"\n")
        except OSError:  # refused by the daemon (per-peer cap or a full pool)
            socks.remove(s)
"""

EMITTER = r"""
import os, time
from supervisor.sdk import Agent
go = os.path.join(os.environ["WATCHKEEPER_STATE_DIR"], "..", "go")
while not os.path.exists(go):
    time.sleep(0.05)
answered = 0
for i in range(100):
    agent = Agent()  # a new connection for every output: each needs a slot
    agent.emit("post", f"post {i}")
    agent.close()
    answered += 1
print("answered", answered, flush=True)
time.sleep(60)
"""


def _status_answers(d: DaemonProc) -> bool:
    client = ControlClient(d.socket_path, timeout_s=15)  # a busy 2-core CI box
    client.run_id = client.token = None
    try:
        return "agents" in client.call("status")
    except (ControlError, DaemonNotRunning, OSError):
        return False
    finally:
        client.close()


def test_thousand_idle_connections_do_not_starve_an_agent(tmp_path):
    """With 1,000 connections held by other processes, an agent's 100 emits on new
    connections are all answered, and once the holders go quiet the idle timeout frees the
    slots so that status answers again."""
    spec = {"jobs": [{"id": "main", "command": py(EMITTER), "schedule": {"every_s": 3600}}]}
    d = DaemonProc(tmp_path, {"emitter": spec}, breaker=ROOMY_BREAKER,
                   control_idle_timeout_s=2)
    holders = []
    with d.start(extra_env=AGENT_ENV):
        d.call("start-now", agent="emitter")
        try:
            for _ in range(HOLDERS):
                holders.append(subprocess.Popen(
                    [sys.executable, "-c", HOLDER, str(d.socket_path), str(PER_HOLDER)],
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE))
            for holder in holders:
                assert holder.stdout.readline() == b"ready\n"
            assert not _status_answers(d)  # the general pool is full: the reserve is tested
            (tmp_path / "go").touch()
            line = d.wait_event("agent_output", agent="emitter", stream="stdout",
                                timeout_s=60)
            assert line["line"] == "answered 100"
            assert len(d.find("output_emitted", agent="emitter")) == 100
            for holder in holders:
                holder.stdin.write(b"quiet\n")
                holder.stdin.flush()
            wait_until(lambda: _status_answers(d), timeout_s=30)
            assert d.find("control_idle_closed")
        finally:
            for holder in holders:
                holder.kill()
                holder.wait(10)


def test_admission_caps_each_peer_and_keeps_a_reserve_for_runs():
    """One process gets at most its cap; the last slots go only to run processes."""
    runs = {4242}
    admission = Admission(lambda pid: pid in runs)
    for _ in range(MAX_CONNECTIONS_PER_PEER):
        assert admission.refusal(1) is None
        admission.admitted(1)
    assert "already has" in admission.refusal(1)
    pid = 2
    while admission.total < MAX_CONNECTIONS - RESERVED_FOR_RUNS:
        if admission.refusal(pid) is not None:
            pid += 1
            continue
        admission.admitted(pid)
    assert "agent runs" in admission.refusal(pid + 1)
    assert admission.refusal(4242) is None
    admission.released(1)
    assert admission.per_peer[1] == MAX_CONNECTIONS_PER_PEER - 1


def test_client_reconnects_after_the_idle_timeout(tmp_path):
    """A client whose idle connection the daemon closed connects anew on its next call."""
    with DaemonProc(tmp_path, {}, control_idle_timeout_s=0.5).start() as d:
        client = d.client()
        try:
            pid = client.call("ping")["pid"]
            d.wait_event("control_idle_closed", peer_pid=os.getpid())
            assert client.call("ping")["pid"] == pid
        finally:
            client.close()


def test_one_process_with_a_thousand_connections_cannot_block_status(tmp_path):
    """One process opening 1,000 idle connections gets its cap of them; status answers."""
    with DaemonProc(tmp_path, {}).start() as d:
        holder = subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(d.socket_path), "1000"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            assert holder.stdout.readline() == b"ready\n"
            assert _status_answers(d)
            refused = d.wait_event("control_connection_refused")
            assert "already has" in refused["reason"]
        finally:
            holder.kill()
            holder.wait(10)
