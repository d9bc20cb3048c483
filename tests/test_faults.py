"""Resource faults: a full disk under STATE_DIR, clock jumps, a fork bomb, an agent that runs
out of file descriptors."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import os
import subprocess
from pathlib import Path

import psutil
import pytest
from apscheduler.executors import base as aps_executors
from apscheduler.schedulers import base as aps_base
from harness import DaemonProc, py
from hostile import AGENT_ENV, ROOMY_BREAKER, integrity, processes_for, query
from support import require, wait_until

from supervisor.config import Job, Schedule
from supervisor.scheduler import Fire, Scheduler, missed_firing

# -- a full disk --------------------------------------------------------------------------------

WRITER = r"""
import os
from supervisor.sdk import Agent, MemoryRejected
a = Agent()
acked = open(os.environ["ACK_LOG"], "a", buffering=1)
i = 0
while True:
    key = f"{a.run_id}:{i}"
    try:
        a.memory.put("writer", key, {"i": i, "pad": "x" * 200})
        acked.write(key + "\n")
    except MemoryRejected as exc:
        print("write refused:", exc, flush=True)
    i += 1
"""


@contextlib.contextmanager
def tmpfs(path: Path, size: str):
    require(os.geteuid() == 0, "needs root to mount a tmpfs")
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    require(mounted.returncode == 0, f"cannot mount a tmpfs: {mounted.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill(directory: Path) -> Path:
    """Write a file until the file system is full."""
    filler = directory / "filler"
    # Unbuffered: a buffered file would flush its rest again at close and raise ENOSPC there.
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 65536)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    return filler


@pytest.mark.slow
def test_full_disk_keeps_supervising_and_recovers(tmp_path):
    """With STATE_DIR full, the daemon keeps running agents, refuses memory writes with an
    error instead of acknowledging them, corrupts no database, and writes again once space
    returns."""
    ack_log = tmp_path / "acked.log"
    agents = {"writer": {"jobs": [{"id": "main", "command": py(WRITER),
                                   "schedule": {"always": True}, "env": {"ACK_LOG": str(ack_log)}}]},
              "ticker": {"jobs": [{"id": "t", "command": ["true"],
                                   "schedule": {"every_s": 0.5}}]}}
    with tmpfs(tmp_path / "state", "6m") as state:
        d = DaemonProc(tmp_path, agents, breaker=ROOMY_BREAKER)
        try:
            d.start(extra_env=AGENT_ENV)
            wait_until(lambda: ack_log.exists() and ack_log.stat().st_size > 1000, 20)
            filler = fill(state)
            d.wait_event("steward_batch_failed", timeout_s=20)
            d.wait_event("agent_output", agent="writer", timeout_s=20)
            ticks = len(d.find("run_finished", agent="ticker"))
            d.wait_event("run_finished", agent="ticker", count=ticks + 3, timeout_s=20)
            assert d.call("ping")["pid"] == d.proc.pid
            filler.unlink()
            acked = ack_log.stat().st_size
            wait_until(lambda: ack_log.stat().st_size > acked + 1000, 20,
                       message="memory writes did not resume once space returned")
        finally:
            d.stop()
        assert d.proc.returncode == 0
        for db in ("state.db", "memory.sqlite3"):
            assert integrity(state / db) == "ok"
        keys = {k for (k,) in query(state / "memory.sqlite3",
                                    "SELECT key FROM entries WHERE namespace='writer'")}
        lines = ack_log.read_text().split("\n")[:-1]
        assert set(lines) <= keys, "an acknowledged write is missing"


# -- clock jumps ---------------------------------------------------------------------------------

class FakeNow:
    """A wall clock for APScheduler that the test moves; monotonic time is untouched."""

    def __init__(self, start: dt.datetime) -> None:
        self.now = start
        clock = self

        class FakeDatetime(dt.datetime):
            @classmethod
            def now(cls, tz=None):
                return clock.now.astimezone(tz) if tz else clock.now

        self.datetime = FakeDatetime


@pytest.fixture
def fake_wall_clock(monkeypatch):
    start = dt.datetime(2026, 3, 1, 12, 0, 30, tzinfo=dt.UTC)
    clock = FakeNow(start)
    monkeypatch.setattr(aps_base, "datetime", clock.datetime)
    monkeypatch.setattr(aps_executors, "datetime", clock.datetime)
    return clock


def _every_minute() -> Job:
    return Job(id="j", command=["true"], schedule=Schedule(cron="* * * * *"))


def _agent_with(job: Job):
    from supervisor.config import AgentSpec
    return AgentSpec(agent="a", jobs=[job])


def test_clock_jump_forward_fires_once_not_per_missed_slot(fake_wall_clock):
    """When the wall clock jumps ten minutes forward, a minutely cron job fires once
    (coalesced), not ten times, on the next scheduler wakeup."""
    fires: list[Fire] = []
    sched = Scheduler(fires.append, lambda: fake_wall_clock.now.timestamp())
    sched.start()
    try:
        sched.set_agent(_agent_with(_every_minute()))
        before = sched.next_fire("a", "j")
        fake_wall_clock.now += dt.timedelta(minutes=10, seconds=5)
        assert sched.wakeup_on_clock_jump()  # what the daemon's tick calls
        assert not sched.wakeup_on_clock_jump()  # the clock runs steadily again
        wait_until(lambda: sched.next_fire("a", "j") > fake_wall_clock.now, 5)
        wait_until(lambda: fires, 5)
        assert len(fires) == 1 and before < sched.next_fire("a", "j")
    finally:
        sched.shutdown()


def test_clock_jump_backward_delays_but_never_repeats(fake_wall_clock):
    """When the wall clock jumps an hour back, a cron job that already fired does not fire
    again for the repeated hour: its next firing stays where it was."""
    fires: list[Fire] = []
    sched = Scheduler(fires.append, lambda: fake_wall_clock.now.timestamp())
    sched.start()
    try:
        sched.set_agent(_agent_with(_every_minute()))
        fake_wall_clock.now += dt.timedelta(minutes=1)
        sched.wakeup()
        wait_until(lambda: fires, 5)
        planned = sched.next_fire("a", "j")
        fake_wall_clock.now -= dt.timedelta(hours=1)
        assert sched.wakeup_on_clock_jump()
        assert sched._aps._process_jobs() > 3000  # noqa: SLF001 - sleeps until the planned slot
        assert len(fires) == 1 and sched.next_fire("a", "j") == planned
    finally:
        sched.shutdown()


def test_catch_up_after_clock_jumps():
    """Catch-up runs once after a forward jump across slots and never after a backward jump
    that puts the last firing in the future."""
    job = Job(id="j", command=["true"], schedule=Schedule(cron="*/5 * * * *"), catch_up=True)
    last = dt.datetime(2026, 3, 1, 12, 0, 1, tzinfo=dt.UTC).timestamp()
    assert missed_firing(job, last, last + 3600)           # jumped an hour forward
    assert not missed_firing(job, last, last + 60)          # no slot passed
    assert not missed_firing(job, last, last - 3600)        # jumped an hour back


# -- a fork bomb ---------------------------------------------------------------------------------

BOMB = "for i in $(seq 400); do sleep 60 & setsid sleep 60 & done; wait"


def test_fork_bomb_is_killed_at_its_process_cap(tmp_path):
    """A run that forks past its agent's max_processes is killed without a grace period,
    every process it made is gone, and the daemon keeps serving."""
    spec = {"max_processes": 40, "jobs": [{"id": "main", "command": ["bash", "-c", BOMB],
                                           "schedule": {"every_s": 3600}}]}
    with DaemonProc(tmp_path, {"bomb": spec}, stop_grace_s=30).start(extra_env=AGENT_ENV) as d:
        d.call("start-now", agent="bomb")
        cap = d.wait_event("run_process_cap", agent="bomb", timeout_s=20)
        assert cap["processes"] > 40
        end = d.wait_event("run_finished", agent="bomb", timeout_s=20)
        assert end["stop_reason"] == "process_cap" and end["stop_signal"] == "SIGKILL"
        wait_until(lambda: not processes_for(d.state_dir), 20,
                   message=f"bomb processes left: {len(processes_for(d.state_dir))}")
        assert d.call("ping")["pid"] == d.proc.pid


# -- file descriptors ----------------------------------------------------------------------------

HOARDER = r"""
import os, resource, socket
resource.setrlimit(resource.RLIMIT_NOFILE, (200, 200))
held = []
while True:
    s = socket.socket(socket.AF_UNIX)
    s.connect(os.environ["WATCHKEEPER_SOCKET"])
    held.append(s)
"""


def test_agent_out_of_file_descriptors_fails_cleanly(tmp_path):
    """An agent that opens connections until it runs out of descriptors fails on its own;
    the daemon keeps serving, gets its descriptors back and runs the next agent."""
    agents = {"hoarder": {"jobs": [{"id": "main", "command": py(HOARDER),
                                    "schedule": {"every_s": 3600}}]},
              "after": {"jobs": [{"id": "main", "command": ["true"],
                                  "schedule": {"every_s": 3600}}]}}
    with DaemonProc(tmp_path, agents).start(extra_env=AGENT_ENV) as d:
        daemon = psutil.Process(d.proc.pid)
        baseline = daemon.num_fds()
        d.call("start-now", agent="hoarder")
        end = d.wait_event("run_finished", agent="hoarder", timeout_s=20)
        assert end["outcome"] == "failed"
        assert any("Too many open files" in e.get("line", "")
                   for e in d.find("agent_output", agent="hoarder"))
        assert d.call("ping")["pid"] == d.proc.pid
        wait_until(lambda: daemon.num_fds() <= baseline + 2, 10,
                   message=f"daemon fds {daemon.num_fds()} (baseline {baseline})")
        d.call("start-now", agent="after")
        assert d.wait_event("run_finished", agent="after")["outcome"] == "succeeded"
