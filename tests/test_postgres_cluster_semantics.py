"""Three daemons, one PostgreSQL schema: the semantics of one host, cluster-wide."""

from __future__ import annotations

import signal
import time

import psutil
from harness import py
from pg_harness import hosts, query, start
from support import wait_until

MANY_LAUNCHES = {"launches": {"max_runs": 10000}}
FOREVER = "import time; print('up', flush=True); time.sleep(300)"


def every(seconds: float, code: str, **job) -> dict:
    return {"jobs": [{"id": "main", "command": py(code), "schedule": {"every_s": seconds},
                      **job}]}


def always(code: str = FOREVER, **agent) -> dict:
    return {"jobs": [{"id": "main", "command": py(code), "schedule": {"always": True}}],
            **agent}


def stop_all(daemons) -> None:
    for d in daemons:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def signal_tree(pid: int, sig: int) -> list[int]:
    """Send `sig` to a daemon and every process under it (a host that dies or freezes
    takes its agents with it)."""
    tree = [pid] + [p.pid for p in psutil.Process(pid).children(recursive=True)]
    for member in tree:
        try:
            psutil.Process(member).send_signal(sig)
        except psutil.NoSuchProcess:
            pass
    return tree


def after_first(daemon, first: str, then: str, **match) -> list[dict]:
    """The `then` events a daemon logged after its first `first` event matching `match`."""
    events = list(daemon.events)
    start_at = next(i for i, e in enumerate(events) if e.get("event") == first
                    and all(str(e.get(k, "")).startswith(v) for k, v in match.items()))
    return [e for e in events[start_at:] if e.get("event") == then]


def paused_skips(daemon) -> list[dict]:
    return [e for e in daemon.find("firing_skipped", agent="tick")
            if e["reason"].startswith("paused")]


def test_pause_on_one_host_stops_the_agent_on_every_host(tmp_path, schema):
    """`pause` sent to h1 keeps the agent from running on h2 and h3, and `resume` sent to h3
    lets it run again."""
    daemons = hosts(tmp_path, schema, {"tick": every(0.3, "pass")}, count=3,
                    breaker=MANY_LAUNCHES)
    try:
        start(daemons)
        wait_until(lambda: query(schema, "select count(*) from runs where agent = 'tick'")[0][0]
                   >= 2, 15, message="two runs before the pause")
        daemons[0].call("pause", agent="tick")
        for d in daemons:
            wait_until(lambda d=d: len(paused_skips(d)) >= 2, 15,
                       message=f"{d.root.name} refuses firings as paused")
        for d in daemons:
            assert after_first(d, "firing_skipped", "run_started", reason="paused") == []
        runs_paused = query(schema, "select count(*) from runs where agent = 'tick'")[0][0]
        daemons[2].call("resume", agent="tick")
        wait_until(lambda: query(schema, "select count(*) from runs where agent = 'tick'")[0][0]
                   > runs_paused, 15, message="runs after the resume")
    finally:
        stop_all(daemons)


def test_overlap_skip_holds_across_hosts(tmp_path, schema):
    """With `overlap: skip`, a long run on one host makes the other hosts skip the agent's
    firings, naming the host that runs it, and their `status` shows where it runs."""
    daemons = hosts(tmp_path, schema, {"long": every(0.3, FOREVER, overlap="skip")}, count=3,
                    breaker=MANY_LAUNCHES)
    try:
        start(daemons)
        wait_until(lambda: query(schema, "select host from agent_leases where agent = 'long'"),
                   15, message="one host runs it")
        (holder,), = query(schema, "select host from agent_leases where agent = 'long'")
        others = [d for d in daemons if d.root.name != holder]
        wait_until(lambda: all(len(d.find("firing_skipped", agent="long")) >= 3
                               for d in others), 15, message="the others fire and stand back")
        # Which host claims each slot depends on the schedulers' phases; a firing sent to
        # another host shows the overlap policy itself.
        replies = [d.call("start-now", agent="long")["result"] for d in others]
        started = sum(len(d.find("run_started", agent="long")) for d in daemons)
        running = query(schema, "select host from runs where agent = 'long' and ended is null")
        seen_elsewhere = [a["running_on"] for d in others for a in d.call("status")["agents"]]
    finally:
        stop_all(daemons)
    assert started == 1
    assert running == [(holder,)]
    assert replies == [f"already running on host {holder}"] * 2
    assert seen_elsewhere == [holder, holder]  # `status` on any host says where it runs


def test_always_job_runs_once_in_the_cluster_and_moves_when_its_host_dies(tmp_path, schema):
    """An unpinned `always` agent runs on exactly one of three hosts, and runs on another
    host within the lease time after its host is SIGKILLed with its agents."""
    daemons = hosts(tmp_path, schema, {"single": always()}, count=3, breaker=MANY_LAUNCHES)
    try:
        start(daemons)
        wait_until(lambda: sum(len(d.find("agent_output", agent="single")) for d in daemons)
                   >= 1, 15, message="the always agent is up")
        for d in daemons:  # every host tried and stood back, or runs it
            wait_until(lambda d=d: d.find("run_started", agent="single")
                       or d.find("firing_skipped", agent="single")
                       or d.find("run_refused", agent="single"), 10)
        up = [d for d in daemons if d.find("run_started", agent="single")]
        assert len(up) == 1
        victim = up[0]
        killed_at = time.monotonic()
        signal_tree(victim.proc.pid, signal.SIGKILL)
        victim.proc.wait()
        survivors = [d for d in daemons if d is not victim]
        wait_until(lambda: any(d.find("agent_output", agent="single") for d in survivors),
                   15, message="the always agent moved")
        moved_after_s = time.monotonic() - killed_at
        wait_until(lambda: query(schema, "select count(*) from runs where agent = 'single' "
                                 "and ended is null and host <> %s", (victim.root.name,)
                                 )[0][0] >= 1, 10)
        live = [d for d in survivors if d.find("run_started", agent="single")]
    finally:
        stop_all(daemons)
    assert len(live) == 1
    print(f"always job moved {moved_after_s:.2f}s after SIGKILL (lease_s 3)")


def test_frozen_host_stops_its_always_run_after_the_job_moved(tmp_path, schema):
    """A host frozen with SIGSTOP loses the `always` agent to another host, and once thawed
    stops its stale run with stop_reason lease_lost (fencing) instead of running it twice."""
    daemons = hosts(tmp_path, schema, {"single": always()}, count=2, breaker=MANY_LAUNCHES)
    try:
        start(daemons)
        wait_until(lambda: query(schema, "select host, run_id from agent_leases where agent = "
                                 "'single' and run_id <> ''"), 15, message="a holder")
        (holder_name, stale_run), = query(schema, "select host, run_id from agent_leases")
        holder = next(d for d in daemons if d.root.name == holder_name)
        other = next(d for d in daemons if d is not holder)
        tree = signal_tree(holder.proc.pid, signal.SIGSTOP)
        try:
            other.wait_event("agent_output", agent="single", line="up", timeout_s=15)
        finally:
            for pid in tree:
                psutil.Process(pid).send_signal(signal.SIGCONT)
        holder.wait_event("run_lease_lost", agent="single", timeout_s=10)
        ended = holder.wait_event("run_finished", run_id=stale_run, timeout_s=10)
        wait_until(lambda: query(schema, "select count(*) from runs where agent = 'single' "
                                 "and ended is null")[0][0] == 1, 10, message="one live run")
        open_runs = query(schema, "select host from runs where agent = 'single' and ended "
                          "is null")
    finally:
        stop_all(daemons)
    assert ended["stop_reason"] == "lease_lost"
    assert open_runs == [(other.root.name,)]


def test_after_chain_runs_downstream_on_its_pinned_host(tmp_path, schema):
    """An `after:` job pinned to h2 runs on h2 when its upstream succeeds on h1."""
    agents = {"up": every(3600, "pass", host="h1"),
              "down": {"jobs": [{"id": "d", "command": py("pass"), "host": "h2",
                                 "schedule": {"after": ["up"]}}]}}
    daemons = hosts(tmp_path, schema, agents, count=2)
    try:
        start(daemons)
        daemons[0].call("start-now", agent="up")
        daemons[0].wait_event("run_finished", agent="up", outcome="succeeded")
        daemons[0].wait_event("firing_skipped", agent="down", reason="handed to host h2")
        ran = daemons[1].wait_event("run_finished", agent="down", timeout_s=15)
    finally:
        stop_all(daemons)
    assert ran["outcome"] == "succeeded"
    assert not daemons[0].find("run_started", agent="down")


def test_crash_loop_cooldown_holds_on_every_host(tmp_path, schema):
    """After a crash loop on one host, the other hosts refuse the agent's firings for the
    cool-down instead of starting their own crash loop."""
    daemons = hosts(tmp_path, schema, {"crash": every(1.0, "raise SystemExit(1)")}, count=2,
                    breaker=MANY_LAUNCHES, crash_loop={"failures": 2, "cooldown_s": 600})
    try:
        start(daemons)
        wait_until(lambda: any(d.find("agent_crash_loop", agent="crash") for d in daemons),
                   20, message="a crash loop")
        looped = next(d for d in daemons if d.find("agent_crash_loop", agent="crash"))
        other = next(d for d in daemons if d is not looped)
        other.wait_event("firing_skipped", agent="crash", count=2, timeout_s=15,
                         reason=f"crash loop cool-down (after a crash loop on host "
                                f"{looped.root.name})")
        cooling = query(schema, "select cooldown_host from agent_flags where agent = 'crash'")
    finally:
        stop_all(daemons)
    assert cooling == [(looped.root.name,)]
    assert not other.find("agent_crash_loop", agent="crash")


def test_host_cut_off_from_the_database_stops_its_run_before_another_starts_it(tmp_path,
                                                                                schema):
    """A host that loses the database (its own link cut) stops its `always` run, saying the
    lease is lost, before the host that still reaches the database starts it."""
    import psycopg
    from pg_harness import PG_DSN
    from pg_instance import CuttableProxy

    params = psycopg.conninfo.conninfo_to_dict(PG_DSN)
    proxy = CuttableProxy(params.get("host", "127.0.0.1"), int(params.get("port", 5432)))
    cut_host, direct = hosts(tmp_path, schema, {"single": always()}, count=2,
                             breaker=MANY_LAUNCHES)
    cut_host.settings["storage"]["dsn"] = proxy.dsn(params["dbname"], params.get("user"))
    cut_host.write_config()
    try:
        start([cut_host])
        cut_host.wait_event("agent_output", agent="single", line="up", timeout_s=15)
        start([direct])
        direct.wait_event("firing_skipped", agent="single", reason="already running on host h1")
        proxy.cut()
        lost = cut_host.wait_event("run_lease_lost", agent="single", timeout_s=15)
        stopped = cut_host.wait_event("run_finished", agent="single", timeout_s=15)
        moved = direct.wait_event("run_started", agent="single", timeout_s=15)
        proxy.restore()
        cut_host.wait_event("storage_back", timeout_s=15)
        live = query(schema, "select host from agent_leases where agent = 'single'")
    finally:
        stop_all([cut_host, direct])
        proxy.close()
    assert lost["action"] == "stopping the run (fencing)"
    assert stopped["stop_reason"] == "lease_lost"
    assert stopped["timestamp"] < moved["timestamp"]  # one machine, one clock: stop, then start
    assert live == [("h2",)]
    assert len(cut_host.find("run_started", agent="single")) == 1


SLOW = "import time; print('begin', flush=True); time.sleep(3); print('end', flush=True)"


def test_overlap_queue_waits_for_the_run_on_another_host(tmp_path, schema):
    """With `overlap: queue`, a firing on h2 while the agent runs on h1 is queued and starts
    on h2 once the run on h1 has ended."""
    daemons = hosts(tmp_path, schema, {"q": every(3600, SLOW, overlap="queue")})
    try:
        start(daemons)
        daemons[0].call("start-now", agent="q")
        daemons[0].wait_event("agent_output", agent="q", line="begin")
        reply = daemons[1].call("start-now", agent="q")
        finished = daemons[0].wait_event("run_finished", agent="q", timeout_s=15)
        queued_start = daemons[1].wait_event("run_started", agent="q", timeout_s=15)
    finally:
        stop_all(daemons)
    assert reply["result"] == "queued behind the run on host h1"
    assert finished["outcome"] == "succeeded"
    assert finished["timestamp"] < queued_start["timestamp"]


def test_overlap_replace_stops_the_run_on_another_host(tmp_path, schema):
    """With `overlap: replace`, a firing on h2 stops the agent's run on h1 (reason replaced)
    and starts on h2 after it ended."""
    daemons = hosts(tmp_path, schema, {"r": every(3600, FOREVER, overlap="replace")})
    try:
        start(daemons)
        daemons[0].call("start-now", agent="r")
        daemons[0].wait_event("agent_output", agent="r", line="up")
        reply = daemons[1].call("start-now", agent="r")
        replaced = daemons[0].wait_event("run_finished", agent="r", timeout_s=15)
        started = daemons[1].wait_event("run_started", agent="r", timeout_s=15)
    finally:
        stop_all(daemons)
    assert reply["result"].startswith("replacing the run on host h1")
    assert replaced["stop_reason"] == "replaced"
    assert replaced["timestamp"] < started["timestamp"]


EMIT_ONE = ("from supervisor.sdk import Agent; a = Agent(); "
            "a.emit('post', f'from {a.run_id}')")


def test_outputs_on_any_host_lists_every_hosts_outputs(tmp_path, schema):
    """`outputs` sent to h1 lists the outputs emitted on h1 and on h2, each with its host."""
    agents = {"p1": every(3600, EMIT_ONE, host="h1"), "p2": every(3600, EMIT_ONE, host="h2")}
    daemons = hosts(tmp_path, schema, agents)
    try:
        start(daemons)
        daemons[0].call("start-now", agent="p1")
        daemons[1].call("start-now", agent="p2")
        daemons[0].wait_event("run_finished", agent="p1", outcome="succeeded")
        daemons[1].wait_event("run_finished", agent="p2", outcome="succeeded")
        listed = daemons[0].call("outputs")
    finally:
        stop_all(daemons)
    assert sorted((o["agent"], o["host"], o["allowed"]) for o in listed) == [
        ("p1", "h1", 1), ("p2", "h2", 1)]


def test_per_host_always_agent_runs_on_every_host(tmp_path, schema):
    """An `always` agent with `per_host: true` runs on each host, taking no run lease."""
    daemons = hosts(tmp_path, schema, {"local": always(per_host=True)}, count=2)
    try:
        start(daemons)
        for d in daemons:
            d.wait_event("agent_output", agent="local", line="up", timeout_s=15)
        leases = query(schema, "select count(*) from agent_leases")
    finally:
        stop_all(daemons)
    assert leases == [(0,)]
