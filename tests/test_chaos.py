"""Chaos: SIGKILL the daemon at random instants under a busy pipeline and restart it at once,
as systemd's Restart=always would, then check that nothing promised was lost.

The seed is printed; replay a failure with WATCHKEEPER_CHAOS_SEED=<seed>. The number of kills
is WATCHKEEPER_CHAOS_KILLS (50 by default, as in CI).
"""

from __future__ import annotations

import math
import os
import random
import time
from pathlib import Path

import psutil
import pytest
from harness import DaemonProc, py
from hostile import AGENT_ENV, ROOMY_BREAKER, alive, integrity, kill_all, processes_for, query
from support import wait_until

from supervisor.runs.locks import list_locks

pytestmark = pytest.mark.slow

# Writes memory as fast as the steward acknowledges, logging each acknowledged key to a file
# of its own run only after the ack; heartbeats, takes daemon-held locks, emits outputs, and
# leaves a grandchild in a session of its own.
WRITER = r"""
import os, subprocess
from pathlib import Path
from supervisor.sdk import Agent
a = Agent()
subprocess.Popen(["sleep", "600"], start_new_session=True)
acked = open(Path(os.environ["ACK_DIR"]) / f"{a.run_id}.log", "a", buffering=1)
i = 0
while True:
    key = f"{a.run_id}:{i}"
    a.memory.put("writer", key, {"i": i})
    acked.write(key + "\n")
    if i % 5 == 0:
        a.heartbeat()
        a.call("lock", task=f"w{i % 3}")
        a.emit("note", key, content=key)
        a.call("unlock", task=f"w{i % 3}")
    i += 1
"""

# Holds one task lock in its own process for the whole run; prints once it has it.
LOCKER = r"""
import time
from supervisor.errors import LockBusy
from supervisor.sdk import Agent
a = Agent()
started = time.monotonic()
while True:
    try:
        held = a.lock("shared")
        break
    except LockBusy:
        time.sleep(0.05)
print(f"locked after {time.monotonic() - started:.2f}s", flush=True)
time.sleep(600)
"""

TRIPPER = r"""
from supervisor.sdk import Agent, OutputDenied
a = Agent()
try:
    a.emit("post", "first", content="one")
    a.emit("post", "second", content="two")
except OutputDenied:
    pass
"""

SLOT_S = 2  # the ticker's cron fires on every even second


def pipeline(ack_dir: Path) -> dict[str, dict]:
    always = {"always": True}
    return {
        "writer": {"jobs": [{"id": "main", "command": py(WRITER), "schedule": always,
                             "env": {"ACK_DIR": str(ack_dir)}}],
                   "heartbeat": {"interval_s": 1, "stale_multiple": 30}},
        "locker": {"jobs": [{"id": "main", "command": py(LOCKER), "schedule": always}]},
        "ticker": {"jobs": [{"id": "tick", "command": ["true"], "catch_up": True,
                             "schedule": {"cron": f"*/{SLOT_S} * * * * *"}}]},
        "tripper": {"jobs": [{"id": "main", "command": py(TRIPPER),
                              "schedule": {"every_s": 86400}}],
                    "limits": {"outputs": {"max_outputs": 1, "window_s": 3600}}},
    }


class Chaos:
    """One daemon under repeated SIGKILL, with the checks made after every kill and restart."""

    def __init__(self, root: Path, rng: random.Random) -> None:
        self.rng = rng
        self.ack_dir = root / "acked"
        self.ack_dir.mkdir()
        self.d = DaemonProc(root, pipeline(self.ack_dir), tick_s=0.2, stop_grace_s=1,
                            locks={"check_interval_s": 0.5, "stale_after_s": 60},
                            breaker=ROOMY_BREAKER)
        self.orphans: set[int] = set()
        self.generations: list[float] = []  # wall-clock start of each daemon
        self.breaker_open = False
        self.acked_checked = 0

    def start(self) -> int:
        """Start a daemon; return how many `running` states were seen before it."""
        seen = len(self.d.find("daemon_state", new="running"))
        self.generations.append(time.time())
        self.d.start(wait_ready=False, extra_env=AGENT_ENV)
        return seen

    def wait_running(self, seen: int) -> None:
        self.d.wait_event("daemon_state", new="running", count=seen + 1, timeout_s=30)

    def kill(self) -> None:
        self.d.kill()
        self.orphans.update(processes_for(self.d.state_dir))

    # -- the promises ------------------------------------------------------------------------
    def check_no_orphan_survives_start(self) -> None:
        """Run once the new daemon is running: its start-up stopped every earlier process."""
        born = psutil.Process(self.d.proc.pid).create_time()
        older = [p for p in processes_for(self.d.state_dir)
                 if _created(p) is not None and _created(p) <= born]
        survivors = sorted({p for p in self.orphans if alive(p)} | set(older))
        assert not survivors, f"processes from before the restart still alive: {survivors}"
        self.orphans.clear()

    def check_databases(self) -> None:
        for db in ("state.db", "memory.sqlite3"):
            path = self.d.state_dir / db
            if path.exists():
                assert integrity(path) == "ok", f"{db} failed integrity_check"

    def check_acknowledged_updates(self) -> None:
        acked: set[str] = set()
        for log in self.ack_dir.glob("*.log"):
            text = log.read_text()
            lines = text.split("\n")[:-1]  # a line without its newline was being written
            acked.update(lines)
        if not acked:
            return
        stored = {k for (k,) in query(self.d.state_dir / "memory.sqlite3",
                                      "SELECT key FROM entries WHERE namespace='writer'")}
        missing = sorted(acked - stored)
        assert not missing, f"{len(missing)} acknowledged updates lost, e.g. {missing[:5]}"
        self.acked_checked = len(acked)

    def check_no_stale_lock_blocks(self, timeout_s: float) -> None:
        """Locks whose owner died with the old daemon are gone within the check interval."""
        def no_dead_locks() -> bool:
            return all(held for _, _, held in list_locks(self.d.state_dir))
        wait_until(no_dead_locks, timeout_s,
                   message=f"unheld locks: {list_locks(self.d.state_dir)}")

    def check_locker_gets_its_lock(self, since: int, timeout_s: float) -> None:
        def locked() -> bool:
            return any(e.get("event") == "agent_output" and e.get("agent") == "locker" and
                       str(e.get("line", "")).startswith("locked") for e in self.d.events[since:])
        wait_until(locked, timeout_s, message=f"locker never got its lock: {self.d.tail()}")

    def check_breaker(self, since: int) -> None:
        state = self.d.call("breaker-status")["state"]
        halted = self.d.call("status")["daemon"]["halted"]
        if self.breaker_open:
            assert (state, halted) == ("open", True)
            started = [e for e in self.d.events[since:] if e.get("event") == "run_started"]
            assert not started, f"runs started while the breaker is open: {started}"
        else:
            assert (state, halted) == ("closed", False)

    def trip_breaker(self) -> None:
        tripped = len(self.d.find("breaker_tripped"))
        self.d.call("start-now", agent="tripper")
        self.d.wait_event("breaker_tripped", agent="tripper", count=tripped + 1, timeout_s=20)
        self.breaker_open = True

    def reset_breaker(self) -> None:
        runs = len(self.d.find("run_started", agent="writer"))
        assert self.d.call("breaker-reset", reason="chaos test")["was_open"] is True
        self.breaker_open = False
        self.d.wait_event("run_started", agent="writer", count=runs + 1)

    def check_schedule_ran_once_per_window(self) -> None:
        rows = query(self.d.state_dir / "state.db",
                     "SELECT trigger, started FROM runs WHERE agent='ticker' ORDER BY started")
        windows: dict[int, list[str]] = {}
        for trigger, started in rows:
            windows.setdefault(math.floor(started / SLOT_S), []).append(trigger)
        doubled = {w * SLOT_S: t for w, t in windows.items() if len(t) > 1}
        assert not doubled, f"windows that ran more than once: {doubled}"
        bounds = [*self.generations, math.inf]
        for lo, hi in zip(bounds, bounds[1:], strict=False):
            catch_ups = [s for t, s in rows if t == "catch_up" and lo <= s < hi]
            assert len(catch_ups) <= 1, f"several catch-up runs for one restart: {catch_ups}"
        assert any(t == "cron" for t, _ in rows), "the ticker never ran"


def _created(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def test_sigkill_at_random_instants_keeps_every_promise(tmp_path):
    """SIGKILLed at random instants and restarted, the daemon loses no acknowledged update,
    corrupts no database, leaves no stale lock or orphan, keeps the breaker open until reset
    and never runs a scheduled window twice."""
    seed = int(os.environ.get("WATCHKEEPER_CHAOS_SEED") or random.randrange(2**32))
    kills = int(os.environ.get("WATCHKEEPER_CHAOS_KILLS", "50"))
    print(f"\nchaos: seed {seed}, {kills} kills (replay: WATCHKEEPER_CHAOS_SEED={seed})")
    rng = random.Random(seed)
    chaos = Chaos(tmp_path, rng)
    trip_at, reset_at = int(kills * 0.6), int(kills * 0.8)
    early_kills = 0
    started_at = time.monotonic()
    try:
        for cycle in range(kills):
            since = len(chaos.d.events)
            seen = chaos.start()
            if rng.random() < 0.15 and cycle not in (trip_at, reset_at):
                # Killed somewhere in start-up: leftover stopping, catch-up, first runs.
                time.sleep(rng.uniform(0.0, 0.8))  # the chaos: a random instant
                chaos.kill()
                early_kills += 1
                chaos.check_databases()
                continue
            chaos.wait_running(seen)
            chaos.check_no_orphan_survives_start()
            chaos.check_breaker(since)
            if cycle == trip_at:
                chaos.trip_breaker()
            elif cycle == reset_at:
                chaos.reset_breaker()
            if not chaos.breaker_open:
                chaos.check_no_stale_lock_blocks(timeout_s=0.5 + 0.2 + 3)
                if cycle % 5 == 0:
                    chaos.check_locker_gets_its_lock(since, timeout_s=10)
            time.sleep(rng.uniform(0.05, 1.5))  # the chaos: a random instant
            chaos.kill()
            chaos.check_databases()
            chaos.check_acknowledged_updates()
        seen = chaos.start()
        chaos.wait_running(seen)
        chaos.check_no_orphan_survives_start()
        chaos.check_breaker(len(chaos.d.events))
    finally:
        chaos.d.stop()
        kill_all(processes_for(chaos.d.state_dir))
    chaos.check_databases()
    chaos.check_acknowledged_updates()
    chaos.check_schedule_ran_once_per_window()
    print(f"chaos: {kills} kills ({early_kills} during start-up), "
          f"{chaos.acked_checked} acknowledged updates all present, "
          f"{time.monotonic() - started_at:.0f}s")


def test_catch_up_runs_once_for_many_missed_windows(tmp_path):
    """A catch_up job whose daemon was down across several windows runs once at start-up,
    not once per window."""
    spec = {"jobs": [{"id": "tick", "command": ["true"], "catch_up": True,
                      "schedule": {"cron": "* * * * * *"}}]}
    d = DaemonProc(tmp_path, {"ticker": spec}, breaker=ROOMY_BREAKER)
    try:
        d.start(extra_env=AGENT_ENV)
        d.wait_event("run_finished", agent="ticker")
        d.kill()
        down_since = time.time()
        wait_until(lambda: time.time() - down_since > 3.5, timeout_s=5)  # three windows
        restarted = time.time()
        d.start(extra_env=AGENT_ENV)
        d.wait_event("run_started", agent="ticker", trigger="catch_up")
        d.wait_event("run_started", agent="ticker", trigger="cron",
                     count=len(d.find("run_started", agent="ticker", trigger="cron")) + 1)
    finally:
        d.stop()
    rows = query(d.state_dir / "state.db", "SELECT trigger FROM runs WHERE agent='ticker' "
                 "AND started >= ?", restarted)
    assert [t for (t,) in rows].count("catch_up") == 1
