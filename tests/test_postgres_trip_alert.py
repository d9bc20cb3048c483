"""The trip commits in PostgreSQL before its alert row commits in the host's SQLite outbox: a
crash between the two must not leave the cluster halted with nobody told."""

from __future__ import annotations

import json
import sqlite3
import sys

from harness import py
from pg_harness import hosts, query, start
from support import wait_until

EMIT_TWICE = """
from supervisor.sdk import Agent, OutputDenied
agent = Agent()
for n in range(2):
    try:
        agent.emit("post", f"post {n}")
    except OutputDenied:
        pass
"""


def trip_alerts(path) -> list[dict]:
    if not path.exists():
        return []
    return [a for a in (json.loads(line) for line in path.read_text().splitlines() if line)
            if a.get("kind") == "breaker_trip"]


def test_trip_alert_lost_between_the_two_commits_is_sent_at_restart(tmp_path, schema):
    """A host restarting with the breaker open by its own trip but no alert row for it (the
    SQLite commit lost) sends the trip alert again with the same id; with the row present,
    a restart sends nothing new."""
    sink = tmp_path / "alerts.jsonl"
    record = [sys.executable, "-c",
              f"import sys; open({str(sink)!r}, 'a').write(sys.stdin.read() + '\\n')"]
    agents = {"poster": {"jobs": [{"id": "p", "command": py(EMIT_TWICE),
                                   "schedule": {"every_s": 3600}}]}}

    def host():
        [h1] = hosts(tmp_path, schema, agents, count=1, breaker={"outputs": {"max_outputs": 1}},
                     alerts={"commands": [{"argv": record}]})
        return h1

    h1 = host()
    try:
        start([h1])
        h1.call("start-now", agent="poster")
        h1.wait_event("breaker_tripped", agent="poster")
        [first] = wait_until(lambda: trip_alerts(sink), 10, message="no trip alert")
    finally:
        h1.stop()
    assert query(schema, "select state, changed_by from breaker_state") == [("open", "h1")]

    again = host()
    try:
        start([again])  # the alert row committed: nothing is owed, nothing re-derived
        assert again.call("status")["daemon"]["halted"] is True
    finally:
        again.stop()
    assert not again.find("trip_alert_rederived") and len(trip_alerts(sink)) == 1

    with sqlite3.connect(h1.state_dir / "state.db") as db:  # the crash lost the SQLite commit
        db.execute("DELETE FROM alert_deliveries")
        db.execute("DELETE FROM alert_outbox")
    db.close()
    last = host()
    try:
        start([last])
        last.wait_event("trip_alert_rederived", agent="poster")
        wait_until(lambda: len(trip_alerts(sink)) == 2, 10, message="no re-derived alert")
        assert last.call("status")["daemon"]["halted"] is True
    finally:
        last.stop()
    resent = trip_alerts(sink)[1]
    assert resent["alert_id"] == first["alert_id"] and resent["agent"] == "poster"
