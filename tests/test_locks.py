"""Task lockfiles: first creator wins, dead owners are proved by the kernel, and breaking
stale locks never admits two holders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from harness import DaemonProc, py

from supervisor.errors import LockBusy
from supervisor.runs import locks

HOLDER = """
import sys, time
from supervisor.runs import locks
held = locks.acquire(sys.argv[1], sys.argv[2], agent="holder")
print("held", flush=True)
time.sleep(120)
"""


def hold_in_child(state_dir, task) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(state_dir), task],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_first_to_create_wins_and_release_frees(tmp_path):
    """A second acquire of a held task raises LockBusy naming the holder; release frees it."""
    first = locks.acquire(tmp_path, "article-1", agent="content", run_id="r1")
    with pytest.raises(LockBusy, match="agent content"):
        locks.acquire(tmp_path, "article-1", agent="seo")
    first.release()
    locks.acquire(tmp_path, "article-1", agent="seo").release()
    assert not (tmp_path / "tasks" / "article-1.lock").exists()


def test_lock_file_records_owner(tmp_path):
    """The lock file holds pid, host, run id and start time as JSON."""
    with locks.acquire(tmp_path, "t", agent="a", run_id="run-9") as held:
        data = json.loads(held.path.read_text())
        assert data["pid"] == os.getpid() and data["run_id"] == "run-9"
        assert abs(data["started"] - time.time()) < 60


def test_invalid_task_ids_are_refused(tmp_path):
    """Task ids that could escape tasks/ are refused."""
    for bad in ("../x", "a/b", "", ".hidden", "x" * 200):
        with pytest.raises(ValueError):
            locks.acquire(tmp_path, bad)


def test_dead_owner_lock_is_broken_at_once(tmp_path):
    """A lock whose holder was SIGKILLed is removed immediately (the flock is gone)."""
    proc = hold_in_child(tmp_path, "job")
    assert locks.break_stale(tmp_path, stale_after_s=1800) == []  # alive: kept
    proc.kill()
    proc.wait()
    broken = locks.break_stale(tmp_path, stale_after_s=1800)
    assert [(b.task_id, b.reason) for b in broken] == [("job", "owner_dead")]


def test_touched_lock_ages_out_only(tmp_path):
    """A lock made with plain `touch` (no flock, no owner) is removed only once stale."""
    (tmp_path / "tasks").mkdir()
    path = tmp_path / "tasks" / "legacy.lock"
    path.touch()
    assert locks.break_stale(tmp_path, stale_after_s=1800) == []
    old = time.time() - 3600
    os.utime(path, (old, old))
    broken = locks.break_stale(tmp_path, stale_after_s=1800)
    assert [(b.task_id, b.reason) for b in broken] == [("legacy", "stale")]


def test_live_owner_past_staleness_is_broken_by_age(tmp_path):
    """A held lock older than the staleness limit is broken (the seed's 30 minutes)."""
    proc = hold_in_child(tmp_path, "slow")
    try:
        broken = locks.break_stale(tmp_path, stale_after_s=0, now=time.time() + 1)
        assert [(b.task_id, b.reason) for b in broken] == [("slow", "stale")]
    finally:
        proc.kill()
        proc.wait()


PAUSED_ACQUIRER = """
import fcntl, os, sys
from supervisor.runs import locks
state, task, step = sys.argv[1:4]
module = fcntl if step == "flock" else os
real = getattr(module, step)
def paused(*args):
    print("paused", flush=True)
    sys.stdin.readline()
    return real(*args)
setattr(module, step, paused)
locks.acquire(state, task)
print("held", flush=True)
sys.stdin.readline()
"""


def paused_acquirer(state_dir, task, step: str) -> subprocess.Popen:
    """A child inside the real acquire(), stopped just before it calls `step` (flock or link);
    a line on its stdin lets it go on."""
    proc = subprocess.Popen([sys.executable, "-c", PAUSED_ACQUIRER, str(state_dir), task, step],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "paused"
    return proc


def resume(proc: subprocess.Popen) -> str:
    proc.stdin.write("\n")
    proc.stdin.flush()
    return proc.stdout.readline().strip()


def leftovers(state_dir) -> list[str]:
    return sorted(p.name for p in (state_dir / "tasks").glob(".*.tmp"))


def test_leftover_of_killed_acquirer_is_removed_at_once(tmp_path):
    """The temporary file of an acquirer SIGKILLed before its link() is removed on the next
    check, however young."""
    proc = paused_acquirer(tmp_path, "job", "link")
    [name] = leftovers(tmp_path)
    assert name.startswith(f".job.{proc.pid}.")
    proc.kill()
    proc.wait()
    broken = locks.break_stale(tmp_path, stale_after_s=1800)
    assert [(b.task_id, b.reason, b.leftover) for b in broken] == [("job", "owner_dead", name)]
    assert leftovers(tmp_path) == []
    locks.acquire(tmp_path, "job").release()


def test_daemon_lock_check_removes_killed_acquirers_leftover(tmp_path):
    """The daemon's periodic lock check removes the leftover of an acquirer SIGKILLed
    inside acquire() and logs it."""
    agents = {"a": {"jobs": [{"id": "main", "command": py("pass"),
                              "schedule": {"every_s": 3600}}]}}
    with DaemonProc(tmp_path, agents, locks={"check_interval_s": 0.2}).start() as d:
        proc = paused_acquirer(d.state_dir, "job", "link")
        [name] = leftovers(d.state_dir)
        proc.kill()
        proc.wait()
        ev = d.wait_event("lock_leftover_removed", file=name)
        assert ev["task"] == "job" and ev["reason"] == "owner_dead"
        assert leftovers(d.state_dir) == []


def test_acquirer_before_its_flock_keeps_its_leftover(tmp_path):
    """A live acquirer's temporary file that has no flock yet is kept, and its acquire
    then succeeds."""
    proc = paused_acquirer(tmp_path, "job", "flock")
    try:
        assert locks.break_stale(tmp_path, stale_after_s=1800) == []
        assert len(leftovers(tmp_path)) == 1
        assert resume(proc) == "held"
    finally:
        proc.kill()
        proc.wait()


def test_acquirer_holding_its_flock_keeps_its_leftover_past_staleness(tmp_path):
    """A temporary file its live acquirer holds an flock on is kept even past the staleness
    limit, and the acquire then succeeds."""
    proc = paused_acquirer(tmp_path, "job", "link")
    try:
        assert locks.break_stale(tmp_path, stale_after_s=0, now=time.time() + 3600) == []
        assert len(leftovers(tmp_path)) == 1
        assert resume(proc) == "held"
    finally:
        proc.kill()
        proc.wait()


def write_leftover(state_dir, task: str, pid: int, age_s: float = 0.0) -> str:
    """A temporary file in acquire()'s name format, as `pid` would have left it `age_s` ago."""
    (state_dir / "tasks").mkdir(exist_ok=True)
    path = state_dir / "tasks" / locks.temp_name(task, pid)
    path.write_text("")
    written = time.time() - age_s
    os.utime(path, (written, written))
    return path.name


def test_leftover_of_a_reused_pid_is_removed_at_once(tmp_path):
    """A temporary file whose pid now names a process started after the file was written is
    removed at once: that process is not the acquirer."""
    later = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        name = write_leftover(tmp_path, "job", later.pid, age_s=60)
        broken = locks.break_stale(tmp_path, stale_after_s=1800)
        assert [(b.reason, b.leftover) for b in broken] == [("owner_dead", name)]
    finally:
        later.kill()
        later.wait()


def test_leftover_of_a_live_pid_ages_out(tmp_path):
    """A temporary file without an flock whose pid is still its live writer is removed only
    once older than the staleness limit."""
    name = write_leftover(tmp_path, "job", os.getpid())
    assert locks.break_stale(tmp_path, stale_after_s=1800) == []
    broken = locks.break_stale(tmp_path, stale_after_s=1800, now=time.time() + 3600)
    assert [(b.reason, b.leftover) for b in broken] == [("stale", name)]
    assert leftovers(tmp_path) == []


CONTENDER = """
import os, sys, time
from supervisor.runs import locks
from supervisor.errors import LockBusy
state, inside, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
wins = violations = breaks = 0
for i in range(rounds):
    try:
        held = locks.acquire(state, "hot")
    except LockBusy:
        breaks += len(locks.break_stale(state, stale_after_s=1800))
        continue
    try:
        os.mkdir(inside)          # exclusive: fails if another holder is inside
    except FileExistsError:
        violations += 1
        held.release()
        continue
    wins += 1
    time.sleep(0.0005)
    os.rmdir(inside)
    held.release()
print(wins, violations, breaks, flush=True)
"""

DYING_HOLDER = """
import os, sys
from supervisor.runs import locks
state, n = sys.argv[1], int(sys.argv[2])
for _ in range(n):
    try:
        held = locks.acquire(state, "hot")
    except Exception:
        continue
    os._exit(0)       # die holding the lock: only the kernel releases it
"""


def test_breaking_stale_locks_never_admits_two_holders(tmp_path):
    """Contenders that acquire, break dead owners' locks and release concurrently are never
    inside the critical section together."""
    inside = tmp_path / "inside"
    # One holder dies holding the lock before any contender starts, so some lock is surely
    # broken: the dying holders below can all lose their one try to busy contenders.
    subprocess.run([sys.executable, "-c", DYING_HOLDER, str(tmp_path), "1"], timeout=60,
                   check=True)
    assert [(task, held) for task, _, held in locks.list_locks(tmp_path)] == [("hot", False)]
    procs = [subprocess.Popen([sys.executable, "-c", CONTENDER, str(tmp_path), str(inside), "400"],
                              stdout=subprocess.PIPE, text=True) for _ in range(4)]
    # Holders that die with the lock held make the contenders break locks all the time.
    dying = [subprocess.Popen([sys.executable, "-c", DYING_HOLDER, str(tmp_path), "1"])
             for _ in range(20)]
    for proc in dying:
        proc.wait(60)
    totals = [tuple(map(int, p.communicate(timeout=120)[0].splitlines()[-1].split()))
              for p in procs]
    assert sum(v for _, v, _ in totals) == 0, totals
    assert sum(w for w, _, _ in totals) > 0
    assert sum(b for _, _, b in totals) > 0  # dead holders' locks were really broken


def test_list_locks_reports_holders(tmp_path):
    """list_locks shows each lock with its owner and whether an flock is still on it."""
    with locks.acquire(tmp_path, "a", agent="x"):
        (tmp_path / "tasks" / "b.lock").write_text("garbage")
        listed = {t: (o.agent if o else None, held) for t, o, held in locks.list_locks(tmp_path)}
    assert listed == {"a": ("x", True), "b": (None, False)}
