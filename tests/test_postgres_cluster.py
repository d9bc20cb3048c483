"""Several daemons, one PostgreSQL schema: scheduling, status, migrations, frozen hosts."""

from __future__ import annotations

import json
import signal
import time

import psutil
from harness import py, wk
from pg_harness import (
    hosts,
    query,
    start,
)
from support import wait_until

MANY_LAUNCHES = {"launches": {"max_runs": 10000}}


def every(seconds: float, code: str, **job) -> dict:
    return {"jobs": [{"id": "main", "command": py(code), "schedule": {"every_s": seconds},
                      **job}]}


def stop_all(daemons) -> None:
    for d in daemons:
        d.stop()


def test_each_scheduled_firing_runs_on_exactly_one_host(tmp_path, schema):
    """Three hosts fire the same interval and cron schedules, and each slot runs once in all."""
    agents = {"tick": every(0.5, "pass"),
              "cron": {"jobs": [{"id": "c", "command": py("pass"),
                                 "schedule": {"cron": "* * * * * *"}}]}}
    daemons = hosts(tmp_path, schema, agents, count=3, breaker=MANY_LAUNCHES)
    try:
        start(daemons)
        wait_until(lambda: query(schema, "select count(*) from runs where ended is not null "
                                 "and agent = 'cron'")[0][0] >= 4, 20, message="4 cron runs")
    finally:
        stop_all(daemons)
    for agent in ("tick", "cron"):
        started = sum(len(d.find("run_started", agent=agent)) for d in daemons)
        claims = query(schema, "select count(*) from firing_claims where agent = %s", (agent,))
        # A claimed slot whose agent still runs on another host is skipped (overlap: skip,
        # cluster-wide), so a slot starts at most one run: runs <= claims.
        assert (4 if agent == "cron" else 1) <= started <= claims[0][0]
        not_started = sum(len([e for e in d.find("firing_skipped", agent=agent)
                               if e["reason"].startswith("already running")])
                          + len(d.find("run_refused", agent=agent)) for d in daemons)
        assert started >= claims[0][0] - not_started
        stood_back = [e for d in daemons for e in d.find("firing_skipped", agent=agent)
                      if e["reason"].startswith("claimed by host h")]
        assert stood_back  # the other hosts fired too, and let the claimant run it


def test_pinned_job_runs_only_on_its_host(tmp_path, schema):
    """A job with `host: h2` runs on h2 alone and the other host skips it as pinned."""
    daemons = hosts(tmp_path, schema, {"pinned": every(0.3, "pass", host="h2")},
                    breaker=MANY_LAUNCHES)
    try:
        start(daemons)
        daemons[1].wait_event("run_finished", agent="pinned", count=3)
        daemons[0].wait_event("firing_skipped", agent="pinned", reason="pinned to host h2")
    finally:
        stop_all(daemons)
    assert not daemons[0].find("run_started")
    assert {h for h, in query(schema, "select distinct host from runs")} == {"h2"}


def test_status_shows_every_host_and_where_agents_ran(tmp_path, schema):
    """`watchkeeper status` on one host lists both hosts, the leader and where each agent ran."""
    agents = {"a": every(3600, "pass", host="h2"), "b": every(3600, "pass", host="h1")}
    daemons = hosts(tmp_path, schema, agents)
    try:
        start(daemons)
        daemons[0].wait_event("leader_elected")
        daemons[1].call("start-now", agent="a")
        daemons[1].wait_event("run_finished", agent="a")
        out = wk("--config", str(daemons[0].config_path), "status")
        snap = daemons[0].call("status")
    finally:
        stop_all(daemons)
    assert out.returncode == 0, out.stderr
    assert "host h1" in out.stdout and "host h2" in out.stdout and "leader" in out.stdout
    assert "last on h2" in out.stdout
    by_agent = {a["agent"]: a for a in snap["agents"]}
    assert by_agent["a"]["last_host"] == "h2" and by_agent["a"]["last_outcome"] == "succeeded"
    assert snap["cluster"]["leader"] == "h1"
    assert [h["host"] for h in snap["cluster"]["hosts"] if h["alive"]] == ["h1", "h2"]


def test_migrate_command_applies_the_schema_once(tmp_path, schema):
    """`watchkeeper migrate` creates the schema at the latest version, and a second run applies nothing."""
    (d,) = hosts(tmp_path, schema, {"x": every(3600, "pass")}, count=1)
    first = wk("--config", str(d.config_path), "migrate")
    second = wk("--config", str(d.config_path), "migrate")
    assert first.returncode == 0 and "(1, 2)" in first.stdout, first.stderr
    assert second.returncode == 0 and "nothing to apply" in second.stdout
    assert query(schema, "select version from schema_migrations order by version") == [(1,), (2,)]


def _freeze(pid: int, sig: int) -> list[int]:
    """Send `sig` to a daemon and every process under it (a frozen VM stops them all)."""
    tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    for member in tree:
        psutil.Process(member).send_signal(sig)
    return tree


LOCKER = """
import time
from supervisor.errors import LockBusy
from supervisor.sdk import Agent
agent = Agent()
try:
    agent.lock("report")
except LockBusy:
    raise SystemExit(0)
print("got the lock", flush=True)
time.sleep(120)
"""


def test_frozen_host_loses_its_leases_and_the_work_moves(tmp_path, schema):
    """A host frozen with SIGSTOP loses its task lock lease, another host takes the task, and
    the thawed host stops its stale run."""
    daemons = hosts(tmp_path, schema, {"worker": every(0.5, LOCKER)}, breaker=MANY_LAUNCHES)
    try:
        start(daemons)
        wait_until(lambda: query(schema, "select host from task_locks where task_id = 'report'"),
                   15, message="someone holds the lock")
        (holder_name,), = query(schema, "select host from task_locks where task_id = 'report'")
        holder = daemons[0] if holder_name == "h1" else daemons[1]
        other = daemons[1] if holder is daemons[0] else daemons[0]
        stale_run = holder.find("lock_acquired", task="report")[0]["run_id"]
        frozen_at = time.monotonic()
        tree = _freeze(holder.proc.pid, signal.SIGSTOP)
        try:
            other.wait_event("agent_output", agent="worker", line="got the lock", timeout_s=15)
            moved_after_s = time.monotonic() - frozen_at
        finally:
            _freeze_resume(tree)
        holder.wait_event("lock_lease_lost", run_id=stale_run, timeout_s=10)
        ended = holder.wait_event("run_finished", run_id=stale_run, timeout_s=10)
    finally:
        stop_all(daemons)
    assert moved_after_s < 3.0 + 4.0  # lease_s, plus a firing and the lock attempt
    assert ended["stop_reason"] == "lease_lost"
    assert query(schema, "select stop_reason from runs where run_id = %s",
                 (stale_run,)) == [("lease_lost",)]


def _freeze_resume(tree: list[int]) -> None:
    for member in tree:
        try:
            psutil.Process(member).send_signal(signal.SIGCONT)
        except psutil.NoSuchProcess:
            pass


def test_task_lock_is_exclusive_across_hosts(tmp_path, schema):
    """A task lock held by a run on one host is refused, naming its holder, to a run on another."""
    holder = ("from supervisor.sdk import Agent; import time; Agent().lock('t1'); "
              "print('held', flush=True); time.sleep(60)")
    taker = ("import json, subprocess, sys; r = subprocess.run([sys.executable, '-m', "
             "'supervisor.cli', 'lock', 't1'], capture_output=True, text=True); "
             "print(json.dumps([r.returncode, r.stderr.strip()]), flush=True)")
    daemons = hosts(tmp_path, schema, {"holder": every(3600, holder, host="h1"),
                                       "taker": every(3600, taker, host="h2")})
    try:
        start(daemons)
        daemons[0].call("start-now", agent="holder")
        daemons[0].wait_event("agent_output", agent="holder", line="held")
        daemons[1].call("start-now", agent="taker")
        line = daemons[1].wait_event("agent_output", agent="taker")["line"]
    finally:
        stop_all(daemons)
    code, message = json.loads(line)
    assert code == 4 and "agent holder" in message and "on h1" in message


def test_leadership_holds_with_a_tick_longer_than_the_lease(tmp_path, schema):
    """The cluster renews its leases on its own cadence: with a housekeeping tick three times
    the leader lease, the leader keeps the lease over several lease periods, never lost."""
    daemons = hosts(tmp_path, schema, {"x": every(3600, "pass")}, count=2, tick_s=3.0,
                    storage_overrides={"leader_lease_s": 1.0, "poll_s": 0.3})
    try:
        start(daemons)
        daemons[0].wait_event("leader_elected")
        t_end = time.monotonic() + 4.0  # four lease periods, more than one tick
        wait_until(lambda: time.monotonic() > t_end or daemons[0].find("leader_lost")
                   or daemons[1].find("leader_elected"), 10, interval_s=0.1)
        assert not daemons[0].find("leader_lost")
        assert not daemons[1].find("leader_elected")
        assert daemons[1].call("status")["cluster"]["leader"] == "h1"
    finally:
        stop_all(daemons)
