"""Two daemons through a real pgbouncer in transaction pooling mode, started by the test."""

from __future__ import annotations

import pg_instance
import psycopg
import pytest
from harness import py
from pg_harness import PG_DSN, hosts, query, start
from support import require, wait_until

WRITER = """
from supervisor.sdk import Agent
agent = Agent()
for i in range(5):
    agent.memory.put("writer", f"k{i}", i)
print("written", flush=True)
"""


@pytest.fixture
def bouncer(schema):
    require(pg_instance.pgbouncer_available, pg_instance.PGBOUNCER_MISSING)
    params = psycopg.conninfo.conninfo_to_dict(PG_DSN)
    proxy = pg_instance.OwnPgBouncer(params.get("host", "127.0.0.1"),
                                     int(params.get("port", 5432)), params["dbname"]).start()
    wait_until(lambda: _reachable(proxy.dsn), 10, interval_s=0.1, message="pgbouncer up")
    yield proxy
    proxy.destroy()


def _reachable(dsn: str) -> bool:
    try:
        psycopg.connect(dsn, connect_timeout=2).close()
        return True
    except psycopg.Error:
        return False


def test_cluster_works_through_pgbouncer_in_transaction_mode(tmp_path, schema, bouncer):
    """Through pgbouncer (pool_mode transaction, two server connections), each slot runs once,
    memory writes are acknowledged and stored, and a pause on one host holds on the other."""
    agents = {"tick": {"jobs": [{"id": "t", "command": py("pass"),
                                 "schedule": {"every_s": 0.4}}]},
              "writer": {"jobs": [{"id": "w", "command": py(WRITER),
                                   "schedule": {"every_s": 3600}}]}}
    daemons = hosts(tmp_path, schema, agents, breaker={"launches": {"max_runs": 10000}},
                    storage_overrides={"dsn": bouncer.dsn, "transaction_pooling": True})
    try:
        start(daemons)
        joined = [d.wait_event("cluster_joined") for d in daemons]
        daemons[0].call("start-now", agent="writer")
        daemons[0].wait_event("agent_output", agent="writer", line="written", timeout_s=15)
        wait_until(lambda: query(schema, "select count(*) from firing_claims where agent = "
                                 "'tick'")[0][0] >= 4, 20, message="four claimed slots")
        daemons[1].call("pause", agent="tick")
        daemons[0].wait_event("agent_paused", agent="tick", timeout_s=10)
        started = sum(len(d.find("run_started", agent="tick")) for d in daemons)
        claims = query(schema, "select count(*) from firing_claims where agent = 'tick'")[0][0]
        stored = query(schema, "select key, value from entries where namespace = 'writer' "
                       "order by key")
    finally:
        for d in daemons:
            d.stop()
    assert all(j["listen"] is False for j in joined)  # LISTEN cannot work through the pooler
    assert 0 < started <= claims  # a slot whose agent still runs elsewhere is skipped
    assert stored == [(f"k{i}", str(i)) for i in range(5)]
