"""Task lockfiles: `STATE_DIR/tasks/{task_id}.lock`, the first to create it wins.

A holder keeps an flock on the file for as long as it holds the lock, so "the owner is
dead" is proved by the kernel having released the flock, not guessed from a pid that may
have been reused. A lock whose owner is provably dead is removed at once; any other lock
is removed once older than the staleness limit (30 min by default).

Two races are closed here (lock libraries have had both):
- A new lock file is written and flocked under a temporary name and only then link()ed
  into place, so nobody can see a lock file that is not yet flocked and take it for stale.
- Breakers hold `tasks/.breaker` exclusively and break a lock only while the path still
  names the inode they inspected, so a breaker never unlinks a newer holder's file.

An acquirer killed inside acquire() leaves its temporary file behind. The breaker removes it
at once when the pid in its name is provably no longer that acquirer (no such process, a
zombie, or a process started after the file was written) and no flock is on it; otherwise
once it is older than the staleness limit. A file still flocked is never removed: its owner
is between flock() and the link(), which would fail without it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import math
import os
import re
import socket
import time
from pathlib import Path

import psutil
import structlog

from ..core.safefile import UnsafeFile, is_real_dir, open_regular, read_capped
from ..errors import LockBusy

log = structlog.get_logger("watchkeeper.locks")

# fullmatch and \Z: `$` also matches before a trailing newline, which let "task\n" through.
TASK_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
# `.{task_id}.{pid}.{random}.tmp`, the name acquire() gives a lock file before its link().
TEMP_RE = re.compile(r"\.(?P<task>.+)\.(?P<pid>\d+)\.[0-9a-f]{8}\.tmp\Z")
# A process's start time is known to about a second (/proc/stat's boot time is whole
# seconds): only a start later than a file's time by more than this proves another process.
PID_START_SLACK_S = 2.0
# A lock file holds one JSON line of owner details; anything bigger is not a lock.
MAX_LOCK_FILE_BYTES = 4096


def validate_task_id(task_id: str) -> str:
    if not TASK_ID_RE.fullmatch(task_id) or ".." in task_id:
        raise ValueError(f"invalid task id {task_id!r}: letters, digits, '.', '_' and '-', "
                         "at most 128, no '..'")
    return task_id


@dataclasses.dataclass(frozen=True)
class LockOwner:
    pid: int
    host: str
    run_id: str
    agent: str
    started: float  # wall clock, for people and for the age rule


class HeldLock:
    """A lock this process holds; release() (or process death) frees it."""

    def __init__(self, path: Path, fd: int, owner: LockOwner) -> None:
        self.path = path
        self.fd = fd
        self.owner = owner

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            # Unlink while still holding the flock: a breaker that opened the old inode
            # sees it is no longer the file at `path` and leaves the path alone.
            if _same_inode(self.path, self.fd):
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> HeldLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _same_inode(path: Path, fd: int) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    fst = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino)


def lock_path(state_dir: Path, task_id: str) -> Path:
    return Path(state_dir) / "tasks" / f"{validate_task_id(task_id)}.lock"


def temp_name(task_id: str, pid: int) -> str:
    return f".{task_id}.{pid}.{os.urandom(4).hex()}.tmp"


def acquire(state_dir: Path, task_id: str, *, agent: str = "", run_id: str = "",
            pid: int | None = None) -> HeldLock:
    """Take the lock or raise LockBusy naming its holder."""
    path = lock_path(state_dir, task_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    owner = LockOwner(pid=pid or os.getpid(), host=socket.gethostname(), run_id=run_id,
                      agent=agent, started=time.time())
    tmp = path.parent / temp_name(task_id, os.getpid())
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, json.dumps(dataclasses.asdict(owner)).encode() + b"\n")
        try:
            os.link(tmp, path)  # atomic: fails if the lock exists
        except FileExistsError:
            os.close(fd)
            fd = -1
            raise LockBusy(f"task {task_id!r} is locked by {describe(read_owner(path))}") from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    return HeldLock(path, fd, owner)


def read_owner(path: Path) -> LockOwner | None:
    """The owner written in a lock file; None for garbage (e.g. a lock made with `touch`)."""
    try:
        data = json.loads(read_capped(path, MAX_LOCK_FILE_BYTES))
        return LockOwner(pid=int(data["pid"]), host=str(data["host"]),
                         run_id=str(data.get("run_id", "")), agent=str(data.get("agent", "")),
                         started=float(data["started"]))
    # RecursionError: a file of deeply nested JSON (`[[[[...`) must not crash the daemon's
    # lock check, which reads every lock file on its tick; OverflowError: "pid": Infinity.
    except (OSError, ValueError, KeyError, TypeError, RecursionError, OverflowError):
        return None


def describe(owner: LockOwner | None) -> str:
    if owner is None:
        return "an unknown owner"
    return f"agent {owner.agent or '?'} (pid {owner.pid} on {owner.host}, run {owner.run_id or '?'})"


@dataclasses.dataclass(frozen=True)
class BrokenLock:
    task_id: str
    owner: LockOwner | None
    reason: str  # "owner_dead" or "stale"
    age_s: float
    leftover: str | None = None  # the temporary file removed, when it is not the lock itself


def break_stale(state_dir: Path, stale_after_s: float, now: float | None = None) -> list[BrokenLock]:
    """Remove locks, and temporary files of interrupted acquires, whose owner is provably
    dead or that are older than `stale_after_s`."""
    tasks = Path(state_dir) / "tasks"
    if not is_real_dir(tasks):
        return []
    now = time.time() if now is None else now
    broken: list[BrokenLock] = []
    guard = _open_breaker_guard(tasks / ".breaker")
    if guard is None:
        return []
    try:
        fcntl.flock(guard, fcntl.LOCK_EX)
        for path in tasks.glob("*.lock"):
            result = _maybe_break(path, stale_after_s, now)
            if result is not None:
                broken.append(result)
                log.warning("lock_broken", task=result.task_id, reason=result.reason,
                            age_s=round(result.age_s, 1), owner=describe(result.owner))
        for path in tasks.glob(".*.tmp"):
            result = _maybe_remove_leftover(path, stale_after_s, now)
            if result is not None:
                broken.append(result)
                log.warning("lock_leftover_removed", task=result.task_id, file=result.leftover,
                            reason=result.reason, age_s=round(result.age_s, 1))
    finally:
        os.close(guard)
    return broken


def _open_breaker_guard(path: Path) -> int | None:
    """The breakers' guard file; something planted in its place (a link made the check
    create the link's target) is removed once and the guard made anew."""
    for _attempt in range(2):
        try:
            return open_regular(path, os.O_RDWR | os.O_CREAT, 0o600)
        except UnsafeFile as exc:
            log.warning("lock_file_refused", path=exc.path, problem=exc.problem)
            with contextlib.suppress(OSError):
                path.unlink()
    return None


def _maybe_break(path: Path, stale_after_s: float, now: float) -> BrokenLock | None:
    try:
        fd = open_regular(path)
    except FileNotFoundError:
        return None
    except UnsafeFile as exc:
        # Not a lock any acquire() made (a FIFO, link, socket...): it would block the task
        # for ever, so it goes; a link is removed, never its target.
        log.warning("lock_file_refused", path=exc.path, problem=exc.problem)
        with contextlib.suppress(OSError):
            path.unlink()
        return None
    try:
        owner = read_owner(path)
        mtime = os.fstat(fd).st_mtime
        started = owner.started if owner and math.isfinite(owner.started) else mtime
        # The file's mtime bounds a claimed start in the future (garbage, or a hand-written
        # file): otherwise such a lock would never grow old enough to be broken.
        age_s = now - min(started, mtime)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            unheld = True
        except BlockingIOError:
            unheld = False
        # Dead is proved only for a lock written by a flock-holding owner on this host:
        # a `touch`ed lock never had an flock, so it only ages out.
        dead = unheld and owner is not None and owner.host == socket.gethostname()
        if not dead and age_s < stale_after_s:
            return None
        if not _same_inode(path, fd):
            return None
        path.unlink()
        return BrokenLock(path.name[:-len(".lock")], owner,
                          "owner_dead" if dead else "stale", age_s)
    finally:
        os.close(fd)


def _maybe_remove_leftover(path: Path, stale_after_s: float, now: float) -> BrokenLock | None:
    match = TEMP_RE.fullmatch(path.name)
    if match is None:
        return None
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    written = min(st.st_mtime, st.st_ctime)  # ctime too: an mtime set in the future
    age_s = now - written
    dead = not _same_process_alive(int(match["pid"]), written)
    # The pid goes first: a live acquirer may be between its open() and its flock(), and a
    # probe holding the flock then would make its own flock() fail.
    if not dead and age_s < stale_after_s:
        return None
    try:
        fd = open_regular(path)
    except OSError:  # gone, or not a file acquire() made: not ours to judge
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None  # an acquirer still holds it: it is between flock() and link()
        if not _same_inode(path, fd):
            return None
        owner = read_owner(path)
        path.unlink()
        return BrokenLock(match["task"], owner, "owner_dead" if dead else "stale", age_s,
                          leftover=path.name)
    finally:
        os.close(fd)


def _same_process_alive(pid: int, since: float) -> bool:
    """Whether `pid` is alive and is the process that existed at wall time `since`: a pid
    reused by a process started later is another process."""
    try:
        proc = psutil.Process(pid)
        return (proc.status() != psutil.STATUS_ZOMBIE
                and proc.create_time() <= since + PID_START_SLACK_S)
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def list_locks(state_dir: Path) -> list[tuple[str, LockOwner | None, bool]]:
    """Every lock as (task_id, owner, held): held means an flock is still on it."""
    tasks = Path(state_dir) / "tasks"
    out = []
    for path in sorted(tasks.glob("*.lock")) if is_real_dir(tasks) else []:
        try:
            fd = open_regular(path)
        except OSError:  # gone, or planted (refused and removed by the next stale check)
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                held = False
            except BlockingIOError:
                held = True
        finally:
            os.close(fd)
        out.append((path.name[:-len(".lock")], read_owner(path), held))
    return out
