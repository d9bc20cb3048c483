"""The steward on PostgreSQL: every host writes the same memory, and no acknowledged update
is lost when the leader dies."""

from __future__ import annotations

import time

from harness import py
from pg_harness import (
    hosts,
    query,
    start,
)
from support import wait_until

WRITER = """
import os, sys
from supervisor.sdk import Agent
agent = Agent()
run_id = os.environ["WATCHKEEPER_RUN_ID"]
with open(os.path.join(os.environ["WATCHKEEPER_STATE_DIR"], "acks.txt"), "a",
          buffering=1) as acks:
    i = 0
    while True:
        key = f"{run_id}-{i}"
        try:
            version = agent.memory.put("writer", key, {"i": i})
        except Exception:
            sys.exit(1)  # not acknowledged: the update may or may not be there
        acks.write(f"{key} {version}\\n")
        i += 1
"""


def acked(d) -> dict[str, int]:
    path = d.state_dir / "acks.txt"
    if not path.exists():
        return {}
    pairs = (line.split() for line in path.read_text().splitlines() if line.count(" ") == 1)
    return {key: int(version) for key, version in pairs}


def test_leader_killed_mid_stream_loses_no_acknowledged_update(tmp_path, schema):
    """SIGKILL of the leader while both hosts stream memory writes loses no acknowledged
    update, and the other host leads within leader_lease_s + poll_s."""
    # per_host: an `always` job runs once in the cluster unless the agent says otherwise,
    # and this test needs a writer on each host.
    agents = {"writer": {"per_host": True, "jobs": [{"id": "w", "command": py(WRITER),
                                                     "schedule": {"always": True}}]}}
    leader, follower = hosts(tmp_path, schema, agents)
    try:
        start([leader])
        leader.wait_event("leader_elected")
        start([follower])
        wait_until(lambda: len(acked(leader)) >= 200 and len(acked(follower)) >= 200, 30,
                   message="both hosts stream acknowledged writes")
        leader.kill()
        killed_at = time.monotonic()
        before = len(acked(follower))
        follower.wait_event("leader_elected", timeout_s=10)
        took_over_s = time.monotonic() - killed_at
        wait_until(lambda: len(acked(follower)) >= before + 200, 20,
                   message="the follower's writes go on")
        reply = follower.call("memory-get", namespace="writer", key=next(iter(acked(leader))))
        wait_until(lambda: query(schema, "select count(*) from runs where host = 'h1' and "
                                 "stop_reason = 'host_lost'")[0][0] == 1, 3.0 + 2 * 3.0,
                   message="the new leader closes the dead host's run record")
    finally:
        follower.stop()
        leader.stop()
    assert took_over_s <= 2.0 + 0.5 + 1.0  # leader_lease_s + poll_s + a tick and some slack
    stored = dict(query(schema, "select key, version from entries where namespace = 'writer' "
                        "and value is not null"))
    for host in (leader, follower):
        missing = {k: v for k, v in acked(host).items() if stored.get(k) != v}
        assert not missing, f"{len(missing)} acknowledged updates lost, e.g. {list(missing)[:3]}"
    assert reply["value"] == {"i": 0}


def test_version_checks_hold_across_hosts(tmp_path, schema):
    """An expect_version write on one host conflicts with a write committed on another."""
    code = ("import sys; from supervisor.sdk import Agent, MemoryConflict; a = Agent()\n"
            "v = a.memory.put('shared', 'doc', {'by': a.run_id}, expect_version=int(sys.argv[1]))\n"
            "print('version', v, flush=True)")
    conflict = code.replace("v = a.memory", "try:\n    v = a.memory").replace(
        "\nprint(", "\nexcept MemoryConflict as e:\n    print('conflict', e.current_version)\n"
        "    raise SystemExit(0)\nprint(")
    agents = {"one": {"memory_write": ["shared"], "jobs": [
        {"id": "put", "command": py(conflict) + ["0"], "schedule": {"every_s": 3600}}]}}
    h1, h2 = hosts(tmp_path, schema, agents)
    try:
        start([h1, h2])
        h1.call("start-now", agent="one")
        h1.wait_event("agent_output", agent="one", line="version 1")
        # Overlap is judged cluster-wide: h2 may start the agent once h1's run has ended and
        # h1 has released its run lease, which it does just after logging run_finished; until
        # then h2 skips the firing ("already running on host h1") and is asked again.
        h1.wait_event("run_finished", agent="one")
        asked = 0

        def started_on_h2() -> bool:
            nonlocal asked
            if h2.find("agent_output", agent="one"):
                return True
            if len(h2.find("firing_skipped", agent="one")) >= asked:
                h2.call("start-now", agent="one")
                asked += 1
            return False

        wait_until(started_on_h2, 30, message=f"h2 never ran `one`; last: {h2.tail()}")
        line = h2.find("agent_output", agent="one")[0]["line"]
    finally:
        h1.stop()
        h2.stop()
    assert line == "conflict 1"
