"""The breaker's windows survive SIGKILL: a real daemon killed at random instants while an
agent floods outputs never accepts more than N outputs in the window."""

from __future__ import annotations

import os
import random
from pathlib import Path

from harness import DaemonProc, py
from support import wait_until

ROOT = Path(__file__).resolve().parent.parent
AGENT_ENV = {"PYTHONPATH": str(ROOT)}
N = 6

FLOODER = """
import sys
from supervisor.sdk import Agent, OutputDenied
a = Agent()
i = 0
while True:
    i += 1
    try:
        a.emit("post", f"{a.run_id} post {i}")
    except OutputDenied:
        break
    with open(sys.argv[1], "a") as accepted:
        accepted.write(f"{a.run_id} {i}\\n")
"""


def accepted(record: Path) -> int:
    return len(record.read_text().splitlines()) if record.exists() else 0


def flooding_daemon(root: Path, record: Path) -> DaemonProc:
    agents = {"flood": {"jobs": [{"id": "main", "command": [*py(FLOODER), str(record)],
                                  "schedule": {"every_s": 3600}}],
                        "limits": {"outputs": {"max_outputs": N, "window_s": 600}}}}
    return DaemonProc(root, agents)


def test_sigkill_between_outputs_never_gives_a_fresh_window(tmp_path):
    """After SIGKILLs at random instants of a flood, the (N+1)th output in the window is still
    the one denied: the accepted outputs over every daemon never exceed N."""
    seed = int(os.environ.get("WATCHKEEPER_DURABLE_SEED", random.randrange(1 << 30)))
    print(f"WATCHKEEPER_DURABLE_SEED={seed}")
    rng = random.Random(seed)
    record = tmp_path / "accepted.txt"
    for _ in range(2):
        target = min(N, accepted(record) + rng.randint(1, 2))
        d = flooding_daemon(tmp_path, record).start(extra_env=AGENT_ENV)
        try:
            if d.call("breaker-status")["state"] == "open":  # the flood already tripped it
                break
            d.call("start-now", agent="flood")
            wait_until(lambda t=target, d=d: accepted(record) >= t or d.find("breaker_tripped"),
                       20,
                       message="the flood never reached its kill point")
            d.kill()
        finally:
            d.stop()
    with flooding_daemon(tmp_path, record).start(extra_env=AGENT_ENV) as d:
        if d.call("breaker-status")["state"] != "open":
            d.call("start-now", agent="flood")
            d.wait_event("breaker_tripped", timeout_s=20)
        trip = d.call("breaker-status")["last_trip"]
        assert trip["rule"] == "outputs" and trip["count"] == N + 1
    assert accepted(record) <= N


def test_recount_from_the_store_restores_every_window_since_the_last_reset(tmp_path):
    """Launches, identical outputs and spend stored before a crash count again after it;
    restarts (retry, always) and everything before the last reset do not."""
    from supervisor.breaker.breaker import (
        AgentLimits,
        Breaker,
        BreakerSettings,
        DuplicateLimit,
        LaunchLimit,
        SpendBudget,
    )
    from supervisor.breaker.defaults import RESTART_TRIGGERS
    from supervisor.storage.store import RunRecord, Store

    wall = [1_000_000.0]
    limits = AgentLimits(launches=LaunchLimit(max_runs=3, window_s=600),
                         duplicates=DuplicateLimit(max_repeats=2, window_s=600),
                         spend=SpendBudget(max_tokens=100, window_s=600))
    settings = BreakerSettings(agents={"a": limits})
    store = Store(tmp_path / "state.db")
    try:
        for i, trigger in enumerate(["every", "retry", "always", "every"]):
            store.run_started(RunRecord(f"r{i}", "a", "main", 0, trigger, 1, wall[0] - 10 + i))
        store.record_output("a", "r0", "post", wall[0] - 5, "h1", "same", True)
        store.record_output("a", "r0", "post", wall[0] - 4, "h1", "same", True)
        store.record_output("a", "r0", "post", wall[0] - 900, "h1", "too old", True)
        store.record_usage("a", "r0", wall[0] - 3, 100, 0.0, "m")
        events = store.breaker_events(wall[0] - 600, RESTART_TRIGGERS)

        def fresh_breaker(windows_since: float = 0.0) -> Breaker:
            breaker = Breaker(settings, clock=lambda: 50.0, wall_clock=lambda: wall[0])
            breaker.windows_since_wall = windows_since
            breaker.recount(events)
            return breaker

        launches = fresh_breaker()  # two scheduled launches count, the two restarts do not
        assert launches.check_launch("a").allowed
        assert launches.check_launch("a").trip.rule.value == "launches"
        assert fresh_breaker().check_output("a", "post", "h1").trip.rule.value == "duplicates"
        assert fresh_breaker().report_usage("a", tokens=1).trip.rule.value == "agent_spend"
        after_reset = fresh_breaker(windows_since=wall[0] - 1)
        assert after_reset.check_launch("a").allowed
        assert after_reset.check_output("a", "post", "h1").allowed
    finally:
        store.close()
