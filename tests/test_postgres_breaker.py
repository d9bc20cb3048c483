"""One circuit breaker for every host: global counts, one alert, everyone halts."""

from __future__ import annotations

import json
import sys

from harness import py, wk
from pg_harness import (
    hosts,
    query,
    start,
)
from support import wait_until

EMIT_TWICE = """
from supervisor.sdk import Agent, OutputDenied
agent = Agent()
for n in range(2):
    try:
        agent.emit("post", f"post {n} from {agent.run_id}")
        print("allowed", flush=True)
    except OutputDenied:
        print("denied", flush=True)
"""


def alerts(path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_trip_on_one_host_halts_every_host_with_one_alert(tmp_path, schema):
    """Outputs counted across hosts trip the breaker on the host that crosses the limit;
    the other host halts too, and exactly one alert goes out in total."""
    sink = tmp_path / "alerts.jsonl"
    record = [sys.executable, "-c",
              f"import sys; open({str(sink)!r}, 'a').write(sys.stdin.read() + '\\n')"]
    agents = {"poster": {"jobs": [{"id": "p", "command": py(EMIT_TWICE),
                                   "schedule": {"every_s": 3600}}]},
              "sleeper": {"host": "h1", "jobs": [{"id": "s", "command": py(
                  "import time; time.sleep(120)"), "schedule": {"always": True}}]}}
    h1, h2 = hosts(tmp_path, schema, agents, breaker={"outputs": {"max_outputs": 3}},
                   alerts={"commands": [{"argv": record}]})
    try:
        start([h1, h2])
        h1.wait_event("run_started", agent="sleeper")
        h1.call("start-now", agent="poster")
        h1.wait_event("run_finished", agent="poster", outcome="succeeded")
        h2.call("start-now", agent="poster")
        h2.wait_event("breaker_tripped", agent="poster")
        h1.wait_event("pipeline_halted_by_peer", timeout_s=5)
        stopped = h1.wait_event("run_finished", agent="sleeper", timeout_s=10)
        wait_until(lambda: alerts(sink), 10, message="the alert command ran")
        status = [d.call("status") for d in (h1, h2)]
        refused = h1.client().call_raw("start-now", {"agent": "poster"})
    finally:
        h1.stop()
        h2.stop()
    emitted = [len(d.find("output_emitted", agent="poster")) for d in (h1, h2)]
    denied = [len(d.find("output_denied", agent="poster")) for d in (h1, h2)]
    assert emitted == [2, 1] and denied == [0, 1]  # the limit counted both hosts' outputs
    assert stopped["stop_reason"] == "breaker"
    assert all(s["daemon"]["halted"] for s in status)
    assert not refused["ok"] and refused["result"] == "pipeline halted by the circuit breaker"
    trips = [a for a in alerts(sink) if a.get("kind") == "breaker_trip"]
    assert len(trips) == 1 and trips[0]["agent"] == "poster", alerts(sink)
    assert query(schema, "select state, changed_by from breaker_state") == [("open", "h2")]


def test_reset_on_one_host_resumes_every_host(tmp_path, schema):
    """`watchkeeper breaker reset` on one host closes the shared breaker and the other host
    resumes scheduling."""
    agents = {"poster": {"jobs": [{"id": "p", "command": py(EMIT_TWICE),
                                   "schedule": {"every_s": 3600}}]}}
    h1, h2 = hosts(tmp_path, schema, agents, breaker={"outputs": {"max_outputs": 1}})
    try:
        start([h1, h2])
        h1.call("start-now", agent="poster")
        h2.wait_event("pipeline_halted_by_peer", timeout_s=10)
        reset = wk("--config", str(h2.config_path), "breaker", "reset", "--reason", "fixed")
        h1.wait_event("pipeline_resumed_by_peer", timeout_s=5)
        statuses = [d.call("status")["daemon"]["halted"] for d in (h1, h2)]
    finally:
        h1.stop()
        h2.stop()
    assert reset.returncode == 0, reset.stderr
    assert statuses == [False, False]
    assert query(schema, "select state from breaker_state") == [("closed",)]


def test_trip_reaches_peer_by_poll_when_listen_is_off(tmp_path, schema):
    """With transaction_pooling (no LISTEN) a trip on one host still halts the other within
    poll_s, through the poll alone."""
    agents = {"poster": {"jobs": [{"id": "p", "command": py(EMIT_TWICE),
                                   "schedule": {"every_s": 3600}}]}}
    h1, h2 = hosts(tmp_path, schema, agents, breaker={"outputs": {"max_outputs": 1}},
                   storage_overrides={"transaction_pooling": True})
    try:
        start([h1, h2])
        h1.call("start-now", agent="poster")
        tripped = h1.wait_event("breaker_tripped", agent="poster")
        h2.wait_event("pipeline_halted_by_peer", timeout_s=0.5 + 2.0)
    finally:
        h1.stop()
        h2.stop()
    assert tripped and all(e["listen"] is False for d in (h1, h2)
                           for e in d.find("cluster_joined"))


def test_half_open_after_auto_reset_is_taken_once_for_every_host(tmp_path, schema):
    """The auto reset to half-open is taken once for the cluster: one host's timer half-opens
    the shared breaker and the other host resumes with it (pipeline_resumed_by_peer) instead
    of half-opening on its own."""
    agents = {"poster": {"host": "h1", "jobs": [{"id": "p", "command": py(EMIT_TWICE),
                                                 "schedule": {"every_s": 3600}}]}}
    daemons = hosts(tmp_path, schema, agents,
                    breaker={"outputs": {"max_outputs": 1}, "auto_reset_after_s": 3})
    try:
        start(daemons)
        daemons[0].call("start-now", agent="poster")
        daemons[0].wait_event("breaker_tripped", agent="poster")
        daemons[1].wait_event("pipeline_halted_by_peer")
        wait_until(lambda: any(d.find("breaker_half_open") for d in daemons), 15,
                   message="a host half-opens")
        opener = next(d for d in daemons if d.find("breaker_half_open"))
        other = next(d for d in daemons if d is not opener)
        other.wait_event("pipeline_resumed_by_peer", timeout_s=5)
        shared = query(schema, "select state, changed_by from breaker_state")
        statuses = [d.call("status") for d in daemons]
    finally:
        for d in daemons:
            d.stop()
    assert not other.find("breaker_half_open")
    assert shared == [("half_open", opener.root.name)]
    assert [s["daemon"]["halted"] for s in statuses] == [False, False]
