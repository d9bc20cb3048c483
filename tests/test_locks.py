"""Task lockfiles: first creator wins, dead owners are proved by the kernel, and breaking
stale locks never admits two holders."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from supervisor import locks
from supervisor.errors import LockBusy

HOLDER = """
import sys, time
from supervisor import locks
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


CONTENDER = """
import os, sys, time
from supervisor import locks
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
from supervisor import locks
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
