"""Randomized replay: seeded histories fed through the pure decision logic, every decision kept.

A refactor that claims "behaviour unchanged" is checked against a golden file recorded from
the code before it: the breaker (outputs, launches, spend, clock advances, resets, restarts
through a snapshot), the crash-loop policy (backoff and cool-down), heartbeat verdicts, the
memory guard (pressure levels, ownership of a scripted process table, orphan kills, run
stops), the alert and log-line rate limiters, the transition tables, schedule slots and the
catch-up rule. Every seam here is a fake clock or a scripted source: no process, no sleep.

    python tests/replay.py --record   # write tests/data/replay_golden.jsonl.gz from this code
    python tests/replay.py --check    # compare; tests/test_replay.py does the same
"""

from __future__ import annotations

import argparse
import datetime as dt
import gzip
import json
import os
import random
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import msgspec  # noqa: E402
import structlog  # noqa: E402

from supervisor.alerts.alerts import Alert, AlertKind, AlertRateLimiter, RateLimitSettings  # noqa: E402
from supervisor.breaker import breaker as breaker_mod  # noqa: E402
from supervisor.breaker.breaker import Breaker, BreakerSettings, StoredEvent  # noqa: E402
from supervisor.breaker.settings import (  # noqa: E402
    AgentLimits,
    DuplicateLimit,
    LaunchLimit,
    OutputLimit,
    SpendBudget,
)
from supervisor.config.schema import CrashLoopSettings, Job, Retries, Schedule  # noqa: E402
from supervisor.core.states import (  # noqa: E402
    AGENT_TRANSITIONS,
    DAEMON_TRANSITIONS,
    RUN_TRANSITIONS,
    check_transition,
)
from supervisor.health.heartbeat import (  # noqa: E402
    Heartbeat,
    HeartbeatSettings,
    OnStale,
    heartbeat_verdict,
    stale_response,
)
from supervisor.health.memguard import (  # noqa: E402
    AgentMemorySettings,
    MemoryGuard,
    MemoryGuardSettings,
    MemoryPriority,
    StopRun,
    interval_for,
    next_level,
)
from supervisor.kernel.lineage import tree_of  # noqa: E402
from supervisor.kernel.procscan import (  # noqa: E402
    LiveRun,
    ProcInfo,
    SystemMemory,
    chrome_role,
    classify,
)
from supervisor.runs.agents import backoff_delay_s, cooldown_s  # noqa: E402
from supervisor.runs.runner import LineRateLimiter  # noqa: E402
from supervisor.scheduling.catch_up import catch_up_due  # noqa: E402
from supervisor.scheduling.scheduler import make_trigger, missed_firing  # noqa: E402

GOLDEN = Path(__file__).resolve().parent / "data" / "replay_golden.jsonl.gz"
SEED = 20261201
AGENTS = ("scout", "writer", "poster")
KINDS = ("article", "discord_post", "tweet")


def _r(x: float) -> float:
    return round(float(x), 6)


# -- breaker -------------------------------------------------------------------------------------


def _breaker_settings(rng: random.Random) -> BreakerSettings:
    def maybe(make):
        return make() if rng.random() < 0.5 else None

    budget = lambda: SpendBudget(max_tokens=maybe(lambda: rng.randint(200, 3000)),  # noqa: E731
                                 max_cost=maybe(lambda: rng.choice([0.5, 1.0, 2.5])),
                                 window_s=rng.choice([60.0, 300.0, 900.0]))
    agents = {}
    for name in AGENTS:
        if rng.random() < 0.4:
            agents[name] = AgentLimits(
                outputs=maybe(lambda: OutputLimit(max_outputs=rng.randint(2, 8),
                                                  window_s=rng.choice([30.0, 120.0]))),
                kinds={k: OutputLimit(max_outputs=rng.randint(1, 4), window_s=60.0)
                       for k in KINDS if rng.random() < 0.3},
                launches=maybe(lambda: LaunchLimit(max_runs=rng.randint(2, 6),
                                                   window_s=rng.choice([60.0, 600.0]))),
                duplicates=maybe(lambda: DuplicateLimit(max_repeats=rng.randint(1, 3),
                                                        window_s=300.0)),
                spend=maybe(budget))
    return BreakerSettings(
        outputs=OutputLimit(max_outputs=maybe(lambda: rng.randint(3, 12)),
                            window_s=rng.choice([60.0, 300.0, 600.0])),
        kinds={k: OutputLimit(max_outputs=rng.randint(2, 6), window_s=120.0)
               for k in KINDS if rng.random() < 0.3},
        launches=LaunchLimit(max_runs=maybe(lambda: rng.randint(3, 10)),
                             window_s=rng.choice([120.0, 3600.0])),
        duplicates=DuplicateLimit(max_repeats=maybe(lambda: rng.randint(1, 4)),
                                  window_s=rng.choice([300.0, 3600.0])),
        agent_spend=budget(), pipeline_spend=budget(), agents=agents,
        auto_reset_after_s=maybe(lambda: rng.choice([30.0, 120.0, 600.0])),
        probe_outputs=rng.randint(1, 4), probe_window_s=rng.choice([30.0, 120.0]),
        summaries_kept=rng.randint(1, 4), max_tracked_hashes=rng.choice([2, 8, 4096]))


def _decision(d) -> dict:
    out = {"allowed": d.allowed, "reason": d.reason} if d.reason else {"allowed": d.allowed}
    if d.trip is not None:
        t = d.trip
        out["trip"] = [t.rule.value, t.agent, t.limit, _r(t.count), _r(t.window_s),
                       t.summaries, _r(t.time), t.kind, t.setting]
    return out


def breaker_history(rng: random.Random, case: int, steps: int) -> list[dict]:
    clock = {"mono": 1000.0, "wall": 1.7e9}
    saved: list[dict] = []
    settings = _breaker_settings(rng)
    make = lambda: Breaker(settings, clock=lambda: clock["mono"],  # noqa: E731
                           wall_clock=lambda: clock["wall"], persist=saved.append)
    b, stored, records = make(), [], []
    for i in range(steps):
        op = rng.choices(["output", "launch", "usage", "advance", "tick", "reset",
                          "restart", "recount", "fill"],
                         [40, 15, 12, 15, 8, 2, 3, 2, 3])[0]
        agent, kind = rng.choice(AGENTS), rng.choice(KINDS)
        rec: dict = {"s": "breaker", "case": case, "i": i, "op": op}
        if op == "output":
            text = rng.choice(["same post", "Same  POST", f"post {rng.randint(0, 5)}",
                               f"unique {i}"])
            h = breaker_mod.content_hash(text) if rng.random() < 0.8 else None
            d = b.check_output(agent, kind, h, summary=text)
            rec |= {"agent": agent, "kind": kind, **_decision(d)}
            if d.allowed:
                stored.append(StoredEvent(clock["wall"], agent, "output", kind, h or ""))
        elif op == "launch":
            d = b.check_launch(agent)
            rec |= {"agent": agent, **_decision(d)}
            if d.allowed:
                stored.append(StoredEvent(clock["wall"], agent, "launch"))
        elif op == "usage":
            tokens = rng.choice([0, 50, 400, 1200, -3, float("nan")])
            cost = rng.choice([0.0, 0.1, 0.6, float("inf"), True])
            d = b.report_usage(agent, tokens, cost)
            rec |= {"agent": agent, **_decision(d)}
            if d.allowed and isinstance(tokens, int) and tokens >= 0:
                stored.append(StoredEvent(clock["wall"], agent, "usage",
                                          tokens=tokens, cost=float(cost) if cost in
                                          (0.0, 0.1, 0.6) else 0.0))
        elif op == "advance":
            step = rng.choice([0.5, 5.0, 31.0, 125.0, 700.0])
            clock["mono"] += step
            clock["wall"] += step if rng.random() < 0.9 else -step / 2  # an NTP step back
            rec["by"] = step
        elif op == "tick":
            new = b.tick()
            rec["new_state"] = new.value if new is not None else None
        elif op == "reset":
            rec["was_open"] = b.reset("operator", "replay")
        elif op == "restart":
            snap = b.snapshot()
            b = make()
            b.restore(json.loads(json.dumps(snap)))
        elif op == "recount":
            rec["counted"] = b.recount(stored)
        elif op == "fill":
            rec["fill"] = b.output_window_fill(agent)
        rec["after"] = [b.state.value, _r(b.since), b.trips_total,
                        *b.memory_footprint().values()]
        records.append(rec)
    records.append({"s": "breaker_end", "case": case, "saves": len(saved),
                    "last_save_state": saved[-1]["state"] if saved else None})
    return records


# -- crash loop, transitions, rate limiters ----------------------------------------------------


def crash_loop_history(rng: random.Random, case: int) -> list[dict]:
    """The pipeline's crash-loop arithmetic over a run of exits: failures count up to the
    threshold, then a doubling cool-down; a success resets both counters."""
    settings = CrashLoopSettings(failures=rng.randint(1, 5), cooldown_s=rng.choice([1.0, 30.0]),
                                 cooldown_max_s=rng.choice([60.0, 3600.0]))
    retries = Retries(max_attempts=rng.randint(0, 4), backoff_s=rng.choice([0.5, 5.0]),
                      backoff_max_s=rng.choice([10.0, 300.0]), jitter=rng.choice([0.0, 0.2]))
    jitter_rng = random.Random(case)
    failures = cooldowns = attempt = 0
    records = []
    for i in range(40):
        ok = rng.random() < 0.3
        rec: dict = {"s": "crash_loop", "case": case, "i": i, "ok": ok}
        if ok:
            failures = cooldowns = attempt = 0
            rec["then"] = "idle"
        else:
            failures += 1
            if failures >= settings.failures:
                cooldowns += 1
                rec |= {"then": "failed", "cooldown_s": _r(cooldown_s(settings, cooldowns))}
                failures = attempt = 0
            elif attempt < retries.max_attempts:
                rec |= {"then": "backoff",
                        "delay_s": _r(backoff_delay_s(retries, min(attempt, 20), jitter_rng))}
                attempt += 1
            else:
                rec["then"] = "idle"
                attempt = 0
        records.append(rec)
    return records


def transition_table() -> list[dict]:
    records = []
    for name, table in (("agent", AGENT_TRANSITIONS), ("run", RUN_TRANSITIONS),
                        ("daemon", DAEMON_TRANSITIONS),
                        ("breaker", breaker_mod.TRANSITIONS)):
        for current in table:
            for target in table:
                try:
                    check_transition(table, current, target)
                    allowed = True
                except RuntimeError:
                    allowed = False
                records.append({"s": "transition", "table": name, "from": current.value,
                                "to": target.value, "allowed": allowed})
    return records


def rate_limit_history(rng: random.Random, case: int) -> list[dict]:
    now = {"t": 0.0}
    limiter = AlertRateLimiter(RateLimitSettings(per_key_interval_s=rng.choice([10.0, 300.0]),
                                                 global_max_per_hour=rng.randint(2, 20)),
                               lambda: now["t"])
    lines = LineRateLimiter(rng.randint(1, 5))
    kinds = list(AlertKind)
    records = []
    for i in range(60):
        now["t"] += rng.choice([0.1, 0.9, 4.0, 60.0, 400.0])
        alert = Alert(kind=rng.choice(kinds), agent=rng.choice([None, *AGENTS]), title="t",
                      text="x", time=0.0)
        sent, suppressed = limiter.admit(alert)
        logged, closed = lines.allow(now["t"])
        records.append({"s": "rate", "case": case, "i": i, "kind": alert.kind.value,
                        "sent": sent, "suppressed": suppressed, "line": logged,
                        "closed": closed})
    return records


# -- heartbeats ----------------------------------------------------------------------------------


def heartbeat_history(rng: random.Random, case: int) -> list[dict]:
    settings = HeartbeatSettings(interval_s=rng.choice([5.0, 60.0, 300.0]),
                                 stale_multiple=rng.choice([1.0, 3.0]),
                                 on_stale=rng.choice(list(OnStale)),
                                 first_beat_grace_s=rng.choice([0.0, 30.0]))
    records = []
    now = 1.7e9
    for i in range(30):
        now += rng.choice([1.0, 30.0, 200.0, 1000.0])
        ts = None if rng.random() < 0.2 else now - rng.choice([-50.0, 0.0, 10.0, 400.0, 5000.0])
        hb = None if ts is None else Heartbeat(ts=ts, pid=1, run_id="r")
        started = None if rng.random() < 0.4 else now - rng.choice([0.0, 20.0, 100.0, 3000.0])
        verdict = heartbeat_verdict(hb, settings, now, started_at=started)
        response = stale_response(verdict, settings)
        records.append({"s": "heartbeat", "case": case, "i": i, "verdict": verdict.value,
                        "response": response.value if response else None})
    return records


# -- memory guard --------------------------------------------------------------------------------

DAEMON_PID = 100
STATE_DIR = "/var/lib/wk"
CHROME = "/usr/lib/chromium/chromium"


class ScriptedSource:
    """Memory numbers and a process table the replay sets; precise and cgroup readings too."""

    def __init__(self) -> None:
        self.percent = 50.0
        self.table: dict[int, ProcInfo] = {}

    def system(self) -> SystemMemory:
        return SystemMemory(total_mb=1000.0, available_mb=1000.0 * (1 - self.percent / 100))

    def process_table(self, under_pid=None):
        if under_pid is None:
            return dict(self.table)
        keep = tree_of({p: i.ppid for p, i in self.table.items()}, under_pid)
        return {p: i for p, i in self.table.items() if p in keep}

    def precise_mb(self, pids):
        return sum(self.table[p].rss_mb * 0.8 for p in pids if p in self.table)

    def cgroup_mb(self, cgroup):
        return None


class ScriptedSignaller:
    """Records signals; a process dies on SIGKILL always and on SIGTERM when it is willing."""

    def __init__(self, source: ScriptedSource, rng: random.Random) -> None:
        self.source, self.rng, self.sent = source, rng, []

    def signal(self, pid, create_time, sig):
        if pid not in self.source.table:
            return False
        self.sent.append((pid, int(sig)))
        if sig == signal.SIGKILL or self.rng.random() < 0.5:
            del self.source.table[pid]
        return True

    def alive(self, pid, create_time):
        return pid in self.source.table


def _random_table(rng: random.Random, live: dict[str, LiveRun]) -> dict[int, ProcInfo]:
    """A daemon, live runs' trees, dead runs' orphans (under the daemon or init), foreign
    processes, Chrome trees whose zygotes lost their markers, and markers that lie."""
    table = {DAEMON_PID: ProcInfo(pid=DAEMON_PID, ppid=1, name="watchkeeper",
                                  cmdline=("watchkeeper",), create_time=1.0, rss_mb=30.0)}
    pid = 200
    run_ids = [*live, "dead-1", "dead-2", "other-host"]
    roots = {run.root_pid: run_id for run_id, run in live.items()}
    for root, run_id in roots.items():
        table[root] = ProcInfo(pid=root, ppid=DAEMON_PID, name="python", cmdline=("python",),
                               create_time=1.0, rss_mb=rng.choice([10.0, 80.0]),
                               run_id=run_id, state_dir=STATE_DIR)
    parents = [DAEMON_PID, 1, *roots]
    for _ in range(rng.randint(3, 14)):
        pid += rng.randint(1, 7)
        while pid in table:
            pid += 1
        parent = rng.choice(parents)
        chrome = rng.random() < 0.5
        cmd = (CHROME, rng.choice(["--headless", "--type=zygote", "--type=renderer",
                                   "--type=gpu-process"])) if chrome else ("node", "x.js")
        marker = rng.random()
        run_id = (rng.choice(run_ids) if marker < 0.35 else None)
        state = STATE_DIR if run_id and rng.random() < 0.8 else (
            "/other/state" if run_id else None)
        table[pid] = ProcInfo(pid=pid, ppid=parent, name=os.path.basename(cmd[0])[:15],
                              cmdline=cmd, create_time=float(pid),
                              rss_mb=rng.choice([5.0, 60.0, 200.0]), run_id=run_id,
                              state_dir=state)
        parents.append(pid)
    return table


def memguard_history(rng: random.Random, case: int) -> list[dict]:
    source = ScriptedSource()
    signaller = ScriptedSignaller(source, rng)
    live = {f"run-{n}": LiveRun(agent=rng.choice(AGENTS), root_pid=150 + n)
            for n in range(rng.randint(0, 3))}
    source.table = _random_table(rng, live)
    agent_settings = {a: AgentMemorySettings(
        memory_priority=rng.choice(list(MemoryPriority)),
        memory_max_mb=rng.choice([None, 50.0, 150.0, 400.0])) for a in AGENTS}
    settings = MemoryGuardSettings(warn_percent=rng.choice([70.0, 80.0]),
                                   act_percent=rng.choice([85.0, 90.0]),
                                   clear_percent=rng.choice([50.0, 65.0]))
    guard = MemoryGuard(settings, daemon_pid=DAEMON_PID, state_dir=STATE_DIR,
                        live_runs=lambda: live, agent_settings=agent_settings.__getitem__,
                        source=source, signaller=signaller)
    roots = {run.root_pid: run_id for run_id, run in live.items()}
    records = [{"s": "ownership", "case": case, "include_foreign": foreign,
                "owners": {str(p): [o.owner.value, o.run_id] for p, o in sorted(
                    classify(source.table, daemon_pid=DAEMON_PID, state_dir=STATE_DIR,
                             live_runs=live, include_foreign=foreign).items())},
                "roles": {str(p): chrome_role(i, ("chrom",)) for p, i in
                          sorted(source.table.items())},
                "under_daemon": sorted(tree_of(
                    {p: i.ppid for p, i in source.table.items()}, DAEMON_PID)),
                "roots": sorted(roots)}
               for foreign in (False, True)]
    now, level = 5000.0, guard.level
    for i in range(25):
        now += rng.choice([0.5, 2.0, 10.0, 60.0])
        source.percent = rng.choice([40.0, 60.0, 72.0, 82.0, 88.0, 95.0])
        op = rng.choices(["tick", "sweep", "end_run"], [8, 1, 1])[0]
        rec: dict = {"s": "memguard", "case": case, "i": i, "op": op,
                     "percent": source.percent}
        if op == "tick":
            actions = guard.tick(now)
            # By role, not class name: a renamed action class is no changed decision.
            rec["actions"] = [["stop_run" if isinstance(a, StopRun) else "alert",
                               msgspec.to_builtins(a)] for a in actions]
        elif op == "sweep":
            rec["kills"] = guard.sweep(now)
        elif live:
            del live[sorted(live)[0]]
        level = next_level(level, source.percent, settings)
        rec |= {"level": guard.level.value, "pure_level": level.value,
                "next_tick_at": _r(guard.next_tick_at), "in_flight": guard.kills_in_flight,
                "interval": _r(interval_for(level, settings, source.system())),
                "signals": list(signaller.sent)}
        signaller.sent.clear()
        records.append(rec)
    return records


# -- schedules -----------------------------------------------------------------------------------

CRONS = ("*/5 * * * *", "0 3 * * *", "30 9 * * mon-fri", "0 */6 * * *", "15 14 1 * *",
         "0 0 * * sun", "*/15 8-18 * * *")


def schedule_history(rng: random.Random, case: int) -> list[dict]:
    if rng.random() < 0.7:
        sched = Schedule(cron=rng.choice(CRONS),
                         timezone=rng.choice(["UTC", "Europe/Paris", "America/New_York"]))
    else:
        sched = Schedule(every_s=rng.choice([30.0, 600.0, 3600.0, 86400.0]))
    job = Job(id="j", command=["true"], schedule=sched, catch_up=rng.random() < 0.7,
              enabled=rng.random() < 0.9)
    trigger = make_trigger(job)
    records = []
    now = 1.7e9 + rng.randint(0, 10**7)
    for i in range(12):
        now += rng.choice([7.0, 300.0, 3600.0, 86400.0 * 3])
        when = dt.datetime.fromtimestamp(now, dt.UTC)
        # An interval trigger's first slot counts from the moment it was made: replay the
        # slots after a previous firing only, which depend on nothing but the history.
        prev = None if sched.every_s is None else (
            when - dt.timedelta(seconds=rng.choice([10.0, 5000.0])))
        nxt = trigger.get_next_fire_time(prev, when)
        last_fire = None if rng.random() < 0.2 else now - rng.choice([60.0, 4000.0, 90000.0])
        planned = None if rng.random() < 0.3 else now + rng.choice([-5.0, 0.0, 30.0])
        records.append({"s": "schedule", "case": case, "i": i,
                        "cron": sched.cron, "every_s": sched.every_s,
                        "next": nxt.timestamp() if nxt else None,
                        "missed": missed_firing(job, last_fire, now),
                        "catch_up": catch_up_due(job, last_fire, planned, now)})
    return records


# -- the whole replay ----------------------------------------------------------------------------


def replay(seed: int = SEED) -> list[dict]:
    """Every decision of every seeded history, in a stable order."""
    rng = random.Random(seed)
    records = transition_table()
    for case in range(60):
        records += breaker_history(random.Random(rng.random()), case, 120)
    for case in range(20):
        records += crash_loop_history(random.Random(rng.random()), case)
        records += rate_limit_history(random.Random(rng.random()), case)
        records += heartbeat_history(random.Random(rng.random()), case)
    for case in range(40):
        records += memguard_history(random.Random(rng.random()), case)
    for case in range(25):
        records += schedule_history(random.Random(rng.random()), case)
    return records


def load_golden() -> list[str]:
    return gzip.decompress(GOLDEN.read_bytes()).decode().splitlines()


def dumps(record: dict) -> str:
    return json.dumps(record, sort_keys=True, separators=(",", ":"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--record", action="store_true", help="write the golden file")
    mode.add_argument("--check", action="store_true", help="compare with the golden file")
    args = parser.parse_args()
    structlog.configure(logger_factory=structlog.ReturnLoggerFactory())
    lines = [dumps(r) for r in replay()]
    if args.record:
        GOLDEN.parent.mkdir(exist_ok=True)
        # mtime=0: recording the same decisions twice gives the same bytes.
        GOLDEN.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode(), mtime=0))
        print(f"{len(lines)} decisions written to {GOLDEN}")
        return 0
    golden = load_golden()
    for n, (want, got) in enumerate(zip(golden, lines, strict=False), 1):
        if want != got:
            print(f"line {n} differs:\n  golden: {want}\n  now:    {got}")
            return 1
    if len(golden) != len(lines):
        print(f"{len(lines)} decisions now, {len(golden)} in the golden file")
        return 1
    print(f"{len(lines)} decisions identical")
    return 0


if __name__ == "__main__":
    sys.exit(main())
