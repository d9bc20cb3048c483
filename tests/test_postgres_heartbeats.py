"""Heartbeats on PostgreSQL: a beat on one host is seen by every host."""

from __future__ import annotations

from harness import py
from pg_harness import hosts, start
from support import wait_until

from supervisor.health.heartbeat import heartbeat_path, read_heartbeat

BEATER = ("import time; from supervisor.sdk import Agent; a = Agent(); a.heartbeat(); "
          "print('beat', flush=True); time.sleep(60)")


def test_heartbeat_on_one_host_reaches_the_other(tmp_path, schema):
    """An agent's heartbeat on h1 appears, with its run id, in h2's status directory."""
    agents = {"up": {"host": "h1", "jobs": [{"id": "b", "command": py(BEATER),
                                             "schedule": {"always": True}}]}}
    h1, h2 = hosts(tmp_path, schema, agents)
    try:
        start([h1, h2])
        run_id = h1.wait_event("agent_output", agent="up", line="beat")["run_id"]
        beat = wait_until(lambda: read_heartbeat(heartbeat_path(h2.state_dir, "up")), 5,
                          message="the beat reaches h2")
    finally:
        h1.stop()
        h2.stop()
    assert beat.run_id == run_id
