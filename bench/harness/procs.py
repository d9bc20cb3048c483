"""Processes seen from the harness: the marker channel every program reports on, exits
timed through pidfds, and the janitor that leaves nothing behind.

Every program the daemons start is a small sh script that writes "NAME PID" to one FIFO
the moment it runs, then execs `sleep` (so the pid stays the same). The harness stamps each
line as it reads it: "runs" means the same thing, at the same cost, under both daemons.
"""

from __future__ import annotations

import ctypes
import os
import select
import signal
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil

PR_SET_CHILD_SUBREAPER = 36
TAG_ENV = "WK_BENCH_TAG"
TAG = uuid.uuid4().hex  # every process this run starts inherits it

SCRIPTS = {
    # A long-running program: report, then sleep with the same pid.
    "sleeper.sh": 'echo "$1 $$" > "$2"\nexec sleep 100000\n',
    # The same, deaf to SIGTERM (SIG_IGN survives exec): only SIGKILL stops it.
    "ignores_term.sh": "trap '' TERM\necho \"$1 $$\" > \"$2\"\nexec sleep 100000\n",
    # A program that leaves a grandchild in a session of its own, out of its process group.
    "with_grandchild.sh": ('setsid /bin/sh "$(dirname "$0")/sleeper.sh" "$1-grandchild" "$2" &\n'
                           'echo "$1 $$" > "$2"\nexec sleep 100000\n'),
    # A scheduled job: report and exit.
    "once.sh": 'echo "$1 $$" > "$2"\n',
}


def become_subreaper() -> None:
    """Orphans of everything we start are reparented to us, not to init, so the janitor
    finds them (supervisord's grandchildren would otherwise vanish from our tree)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def write_scripts(directory: Path) -> dict[str, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, text in SCRIPTS.items():
        path = directory / name
        path.write_text(text)
        paths[name] = path
    return paths


@dataclass(frozen=True)
class Mark:
    name: str
    pid: int
    mono: float   # time.monotonic() when the harness read the line
    wall: float   # time.time() at the same moment


class Markers:
    """The FIFO the programs report on, read by a thread that stamps every line."""

    def __init__(self, path: Path) -> None:
        self.path = path
        os.mkfifo(path)
        # O_RDWR: we hold a writer too, so a program's open() never blocks and we never
        # see end-of-file between programs.
        self._fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        self.marks: list[Mark] = []
        self._cond = threading.Condition()
        self._closed = False
        threading.Thread(target=self._read, name="markers", daemon=True).start()

    def _read(self) -> None:
        pending = b""
        while True:
            try:
                data = os.read(self._fd, 65536)
            except OSError:
                return
            mono, wall = time.monotonic(), time.time()
            pending += data
            *lines, pending = pending.split(b"\n")
            new = []
            for line in lines:
                name, _, pid = line.decode(errors="replace").partition(" ")
                if pid.isdigit():
                    new.append(Mark(name, int(pid), mono, wall))
            with self._cond:
                self.marks.extend(new)
                self._cond.notify_all()

    def wait_for(self, condition, timeout_s: float, abort=None) -> bool:
        """Wait until condition(marks) is true; False on time-out, or as soon as abort()
        is true (checked every 100 ms: a daemon that died will not report anything)."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not condition(self.marks):
                left = deadline - time.monotonic()
                if left <= 0 or (abort is not None and abort()):
                    return False
                self._cond.wait(min(left, 0.1))
            return True

    def latest(self) -> dict[str, Mark]:
        """The last report of every name: the instance that runs now."""
        with self._cond:
            return {m.name: m for m in self.marks}

    def close(self) -> None:
        os.close(self._fd)


def wait_exits(pids: list[int], deadline_mono: float, linger_after: int | None = None,
               linger_s: float = 0.0) -> dict[int, float]:
    """Wait on pidfds until every pid has exited or the deadline passes: {pid: monotonic
    time its exit was seen}. A zombie counts as gone; a pid already gone counts as now.
    Once `linger_after` has exited, the others get `linger_s` more, then the wait ends."""
    gone: dict[int, float] = {}
    fds: dict[int, int] = {}
    for pid in pids:
        try:
            fds[os.pidfd_open(pid)] = pid
        except ProcessLookupError:
            gone[pid] = time.monotonic()
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    try:
        while fds:
            end = deadline_mono
            if linger_after in gone:
                end = min(end, gone[linger_after] + linger_s)
            left_ms = (end - time.monotonic()) * 1000
            if left_ms <= 0:
                break
            for fd, _ in poller.poll(left_ms):
                gone[fds.pop(fd)] = time.monotonic()
                poller.unregister(fd)
                os.close(fd)
    finally:
        for fd in fds:
            os.close(fd)
    return gone


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def tagged_processes() -> list[psutil.Process]:
    """Every live process on the machine carrying this run's tag, wherever it was
    reparented to."""
    found = []
    me = os.getpid()
    for proc in psutil.process_iter():
        if proc.pid == me:
            continue
        try:
            if proc.environ().get(TAG_ENV) == TAG and proc.status() != psutil.STATUS_ZOMBIE:
                found.append(proc)
        except psutil.Error:
            continue
    return found


def reap_all() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def kill_everything() -> int:
    """SIGKILL every descendant of the harness and every tagged process; return how many
    were still alive. Repeated until none is left (a dying daemon may still fork)."""
    killed = 0
    for _ in range(50):
        victims = {p.pid: p for p in psutil.Process().children(recursive=True)}
        victims.update({p.pid: p for p in tagged_processes()})
        victims = {pid: p for pid, p in victims.items() if alive(pid)}
        if not victims:
            break
        for proc in victims.values():
            try:
                proc.send_signal(signal.SIGKILL)
                killed += 1
            except psutil.Error:
                pass
        time.sleep(0.05)
        reap_all()
    reap_all()
    return killed
