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
from harness import DaemonProc, py
from hostile import AGENT_ENV, ROOMY_BREAKER, integrity, processes_for, query
from support import require, wait_until

from supervisor.config.schema import Job, Schedule
from supervisor.core.firing import Fire
from supervisor.core.timers import Timers
from supervisor.scheduling.scheduler import Scheduler, missed_firing

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

class FakeClocks:
    """A wall clock and a monotonic clock that the test moves, separately."""

    def __init__(self, start: dt.datetime) -> None:
        self.wall = start.timestamp()
        self.mono = 1000.0

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds

    @property
    def now(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.wall, dt.UTC)


@pytest.fixture
def clocks():
    return FakeClocks(dt.datetime(2026, 3, 1, 12, 0, 30, tzinfo=dt.UTC))


def _scheduler(clocks: FakeClocks, fires: list) -> tuple[Scheduler, Timers]:
    timers = Timers(clock=lambda: clocks.mono)
    sched = Scheduler(fires.append, lambda: clocks.wall, timers)
    sched.start()
    return sched, timers


def _every_minute() -> Job:
    return Job(id="j", command=["true"], schedule=Schedule(cron="* * * * *"))


def _agent_with(job: Job):
    from supervisor.config.schema import AgentSpec
    return AgentSpec(agent="a", jobs=[job])


def test_clock_jump_forward_fires_once_not_per_missed_slot(clocks):
    """When the wall clock jumps ten minutes forward (a step, or a resume from suspend that
    the monotonic clock did not see), the next tick fires a minutely job once, coalesced."""
    fires: list[Fire] = []
    sched, timers = _scheduler(clocks, fires)
    sched.set_agent(_agent_with(_every_minute()))
    before = sched.next_fire("a", "j")
    clocks.wall += 10 * 60 + 5
    assert timers.run_due() == 0  # the heap's monotonic deadline is still 30 s away
    assert sched.recheck_wall_clock()  # what the daemon's tick calls
    assert not sched.recheck_wall_clock()  # the clock runs steadily again
    timers.run_due()
    assert len(fires) == 1 and fires[0].at == clocks.wall
    assert before < sched.next_fire("a", "j") and sched.next_fire("a", "j") > clocks.now


def test_clock_jump_backward_delays_but_never_repeats(clocks):
    """When the wall clock jumps an hour back, a cron job that already fired does not fire
    again for the repeated hour: its timer comes due early by the wall clock and waits on."""
    fires: list[Fire] = []
    sched, timers = _scheduler(clocks, fires)
    sched.set_agent(_agent_with(_every_minute()))
    clocks.advance(30)
    timers.run_due()
    assert len(fires) == 1
    planned = sched.next_fire("a", "j")
    clocks.wall -= 3600
    clocks.advance(60)  # the monotonic deadline passes; by the wall clock it is 11:02
    timers.run_due()
    assert sched.recheck_wall_clock()
    clocks.advance(600)
    timers.run_due()
    assert len(fires) == 1 and sched.next_fire("a", "j") == planned
    assert timers.time_until_next() == pytest.approx(3600 - 600)  # the 12:02 slot, by the wall clock


def test_clock_steps_forward_and_back_are_noticed_within_one_tick(clocks):
    """A wall-clock step is seen by the first recheck after it, and the job fires on its
    wall-clock slot after a step back and then forward again."""
    fires: list[Fire] = []
    sched, timers = _scheduler(clocks, fires)
    sched.set_agent(_agent_with(_every_minute()))
    clocks.wall -= 120  # 11:58:30: the 12:01 slot is now 150 s away by the wall clock
    assert sched.recheck_wall_clock()
    assert timers.time_until_next() == pytest.approx(150)
    clocks.wall += 120 + 45  # 12:01:15: the slot has passed
    assert sched.recheck_wall_clock()
    timers.run_due()
    assert [f.job for f in fires] == ["j"]
    assert sched.next_fire("a", "j") == dt.datetime(2026, 3, 1, 12, 2, tzinfo=dt.UTC)


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
