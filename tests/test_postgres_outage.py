"""Three daemons on a PostgreSQL of the test's own, stopped for 30 s in the middle of runs."""

from __future__ import annotations

import time

import pg_instance
import psycopg
import pytest
from harness import py
from pg_harness import hosts, start
from support import require, wait_until

OUTAGE_S = 30.0
BACK_WITHIN_S = 10.0

WRITER = """
import time
from supervisor.errors import ControlError
from supervisor.sdk import Agent, MemoryRejected, OutputDenied
agent = Agent()
i = 0
while True:
    try:
        agent.memory.put("writer", f"k{i}", i, idempotency_key=f"k{i}")
        print(f"acked {i}", flush=True)
        i += 1
    except MemoryRejected as exc:
        print(f"memory refused {i}: {exc}", flush=True)  # retried below, same key
    try:
        agent.emit("post", f"post {i}")
        print(f"emit acked {i}", flush=True)
    except (ControlError, OutputDenied) as exc:
        print(f"emit refused {i}: {exc}", flush=True)
    time.sleep(0.2)
"""


@pytest.fixture
def own_pg():
    require(pg_instance.available, pg_instance.MISSING)
    server = pg_instance.OwnPostgres().init()
    yield server
    server.destroy()


def lines(daemons, prefix: str) -> list[str]:
    return [e["line"] for d in daemons for e in d.find("agent_output", agent="writer")
            if e["line"].startswith(prefix)]


def test_thirty_second_outage_loses_no_acknowledged_update_and_runs_nothing_twice(tmp_path,
                                                                                own_pg):
    """With the database stopped for 30 s mid-run, the running agent goes on, its writes,
    outputs and reads are refused retryably, scheduled slots still run once, every
    acknowledged update is kept, and every daemon is back within 10 s of the database's
    return."""
    agents = {"writer": {"jobs": [{"id": "w", "command": py(WRITER),
                                   "schedule": {"always": True}}]},
              "tick": {"jobs": [{"id": "t", "command": py("pass"),
                                 "schedule": {"every_s": 0.5}}]}}
    breaker = {"launches": {"max_runs": 10000}, "outputs": {"max_outputs": 100000},
               "duplicates": {"max_repeats": 100000}}
    # lease_s 70: runs are fenced at half the lease, so a 30 s outage does not stop them.
    daemons = hosts(tmp_path, "wk_outage", agents, count=3, breaker=breaker,
                    storage_overrides={"dsn": own_pg.dsn, "lease_s": 70.0})
    try:
        start(daemons)
        wait_until(lambda: len(lines(daemons, "acked")) >= 5, 20, message="writes before")
        own_pg.stop()
        down_at = time.monotonic()
        for d in daemons:
            d.wait_event("storage_unreachable", timeout_s=10)
        wait_until(lambda: lines(daemons, "memory refused") and lines(daemons, "emit refused"),
                   10, message="refusals during the outage")
        client = daemons[0].client()
        try:
            read_refusal = client.call_raw("memory-get", {"namespace": "writer", "key": "k0"})
        finally:
            client.close()
        wait_until(lambda: time.monotonic() - down_at >= OUTAGE_S, OUTAGE_S + 5, interval_s=0.5)
        finished_during_outage = [e for d in daemons for e in d.find("run_finished",
                                                                       agent="writer")]
        skipped = [e for d in daemons for e in d.find("firing_skipped", agent="tick")
                   if e["reason"].startswith("shared storage unreachable")]
        own_pg.start()
        for d in daemons:
            d.wait_event("storage_back", timeout_s=BACK_WITHIN_S)
        acked_before = len(lines(daemons, "acked"))
        wait_until(lambda: len(lines(daemons, "acked")) >= acked_before + 5, 20,
                   message="writes after the return")
        wait_until(lambda: all(d.call("status")["cluster"].get("leader") for d in daemons),
                   BACK_WITHIN_S, message="a leader seen by every host")
        # Counted before the stop: a clean stop hands the `always` agent to a peer.
        writer_starts = sum(len(d.find("run_started", agent="writer")) for d in daemons)
        tick_starts = sum(len(d.find("run_started", agent="tick")) for d in daemons)
    finally:
        for d in daemons:
            d.stop()
    assert finished_during_outage == []
    assert skipped
    refusal = lines(daemons, "memory refused")[0]
    assert "not applied" in refusal and "retry" in refusal
    assert "retry" in lines(daemons, "emit refused")[0]
    assert read_refusal["ok"] is False and read_refusal["retry"] is True
    assert read_refusal["error"].startswith("not applied: shared storage unreachable")
    assert not [e for d in daemons for e in d.find("control_handler_crashed")]
    acked = {int(line.split()[1]) for line in lines(daemons, "acked")}
    with psycopg.connect(own_pg.dsn) as conn:
        conn.execute("set search_path = wk_outage")
        stored = dict(conn.execute("select key, value::int from entries where namespace = "
                                   "'writer'").fetchall())
        claims = conn.execute("select count(*) from firing_claims where agent = 'tick'"
                              ).fetchone()[0]
    assert all(stored.get(f"k{i}") == i for i in acked)
    assert writer_starts == 1
    assert 0 < tick_starts <= claims
