"""Spawn, signal and read one run: a child process in its own session.

The loop owns reaping (proctree.reap_children) and timers; this module only starts the
process, carries its bookkeeping and turns its output into bounded log lines.
"""

from __future__ import annotations

import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from ..config.schema import AgentSpec, Job
from ..core.states import RUN_TRANSITIONS, RunState, StopReason, check_transition
from ..kernel import no_network
from ..kernel.cgroups import RunCgroups
from ..kernel.identity import AgentIdentity
from ..kernel.proctree import send_group_signal, send_signal

log = structlog.get_logger("watchkeeper.runner")

READ_CHUNK = 65536
# Threads spawning a batch's runs at once (Spawner): 8 beat 2 and 4 on 2 cores.
SPAWN_THREADS = 8


def new_run_id(agent: str) -> str:
    return f"{agent}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{os.urandom(3).hex()}"


class LineBuffer:
    """Splits a byte stream into lines, never holding more than `max_line_bytes`: a child
    writing 100 MB without a newline costs the daemon one line's worth of memory."""

    __slots__ = ("max_line_bytes", "_partial", "_truncated")

    def __init__(self, max_line_bytes: int) -> None:
        self.max_line_bytes = max_line_bytes
        self._partial = bytearray()
        self._truncated = False

    def feed(self, data: bytes) -> list[str]:
        lines = []
        start = 0
        while True:
            nl = data.find(b"\n", start)
            chunk = data[start:] if nl < 0 else data[start:nl]
            room = self.max_line_bytes - len(self._partial)
            if len(chunk) > room:
                self._partial += chunk[:max(0, room)]
                self._truncated = True
            else:
                self._partial += chunk
            if nl < 0:
                return lines
            lines.append(self._take())
            start = nl + 1

    def flush(self) -> list[str]:
        return [self._take()] if self._partial or self._truncated else []

    def _take(self) -> str:
        line = self._partial.decode(errors="replace")
        if self._truncated:
            line += " …[truncated]"
        self._partial = bytearray()
        self._truncated = False
        return line


class LineRateLimiter:
    """At most `per_s` lines a second per agent reach the log; the rest are counted and
    reported once a second, so one flooding agent cannot push the daemon's own events out
    of journald's rate limit."""

    __slots__ = ("per_s", "window_start", "count", "suppressed")

    def __init__(self, per_s: int) -> None:
        self.per_s = per_s
        self.window_start = 0.0
        self.count = 0
        self.suppressed = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """(log this line?, lines suppressed in the window that just closed)."""
        closed = 0
        if now - self.window_start >= 1.0:
            closed, self.suppressed = self.suppressed, 0
            self.window_start, self.count = now, 0
        self.count += 1
        if self.count > self.per_s:
            self.suppressed += 1
            return False, closed
        return True, closed


class Run:
    """One execution of one job of one agent."""

    def __init__(self, agent: AgentSpec, job: Job, *, attempt: int, trigger: str,
                 degraded: list[str]) -> None:
        self.agent = agent.name
        self.job = job
        self.run_id = new_run_id(agent.name)
        self.token = os.urandom(16).hex()
        self.attempt = attempt
        self.trigger = trigger
        self.degraded = degraded
        self.state = RunState.RUNNING
        self.stop_reason: StopReason | None = None
        self.stop_signal = ""
        self.pid = 0
        self.popen: subprocess.Popen | None = None
        self.cgroup: Path | None = None
        self.cgroup_error = ""  # why its cgroup could not be made (it runs without)
        self.started_mono = time.monotonic()
        self.started_wall = time.time()
        self.timers: list = []
        self.pipes: dict[int, tuple[str, LineBuffer]] = {}
        self.exit_status: int | None = None
        self.uid: int | None = None  # the agent's own uid, when it runs under one

    def transition(self, target: RunState) -> None:
        check_transition(RUN_TRANSITIONS, self.state, target)
        log.debug("run_state", agent=self.agent, run_id=self.run_id, old=self.state.value,
                  new=target.value)
        self.state = target

    def cancel_timers(self) -> None:
        for timer in self.timers:
            timer.cancel()
        self.timers.clear()

    @property
    def grace_s(self) -> float | None:
        return self.job.stop_grace_s

    def signal(self, sig: int, tracked: list[int]) -> None:
        """Deliver `sig` to everything of this run: its cgroup, or its process group plus
        every descendant attributed to it (those that left the group)."""
        if self.cgroup is not None:
            RunCgroups.signal(self.cgroup, sig)
        if self.exit_status is None:
            send_group_signal(self.pid, sig)
        for pid in tracked:
            send_signal(pid, sig)


def build_env(run: Run, agent: AgentSpec, job: Job, *, state_dir: Path, socket_path: Path,
              base_env: dict[str, str]) -> dict[str, str]:
    env = dict(base_env)
    env.update(job.env)
    if "PATH" not in job.env:
        env["PATH"] = with_own_bin(env.get("PATH", os.defpath))
    env.update({
        "WATCHKEEPER_AGENT": run.agent,
        "WATCHKEEPER_JOB": job.id,
        "WATCHKEEPER_RUN_ID": run.run_id,
        "WATCHKEEPER_RUN_TOKEN": run.token,
        "WATCHKEEPER_STATE_DIR": str(state_dir),
        "WATCHKEEPER_SOCKET": str(socket_path),
        "WATCHKEEPER_ATTEMPT": str(run.attempt),
        "WATCHKEEPER_HOST": socket.gethostname(),
        "WATCHKEEPER_HEARTBEAT_INTERVAL_S": str(agent.heartbeat.interval_s),
    })
    if run.degraded:
        env["WATCHKEEPER_DEGRADED"] = "1"
        env["WATCHKEEPER_DEGRADED_UPSTREAMS"] = ",".join(run.degraded)
    else:
        env.pop("WATCHKEEPER_DEGRADED", None)
        env.pop("WATCHKEEPER_DEGRADED_UPSTREAMS", None)
    return env


def with_own_bin(path: str) -> str:
    """`path` with the daemon's own bin directory added last, so that an agent finds the
    `watchkeeper` CLI of the daemon that started it: under systemd, or started as
    `.venv/bin/watchkeeper`, that directory is not on PATH and a bash agent's first
    `watchkeeper heartbeat` failed with "command not found". Last, so that no tool an
    agent already finds on PATH changes."""
    own = os.path.dirname(sys.executable)
    parts = [p for p in path.split(os.pathsep) if p]
    return path if not own or own in parts else os.pathsep.join([*parts, own])


def build_argv(job: Job) -> list[str] | str:
    if isinstance(job.command, str):
        return job.command  # only reachable with shell: true (configload enforces it)
    argv = list(job.command)
    if argv and argv[0] == "{python}":
        argv[0] = sys.executable
    return argv


def spawn(run: Run, agent: AgentSpec, *, cwd: str, env: dict[str, str],
          identity: AgentIdentity | None = None) -> None:
    """Start the run's process in a session of its own with piped, non-blocking output;
    under `identity`'s uid and gid with no supplementary group (not the daemon's, not the
    socket group's) when given."""
    job = run.job
    as_user = {} if identity is None else {
        "user": identity.uid, "group": identity.gid, "extra_groups": []}
    argv, shell = build_argv(job), job.shell
    if not agent.network:  # under the agent's uid: the namespace is the agent's own
        argv = no_network.argv_for(["/bin/sh", "-c", argv] if shell else argv)
        shell = False
    # Our own pipes, not Popen's file objects: those close their fd when the Popen is
    # collected, and a reused fd number would then alias a pipe the selector still watches.
    out_r, out_w = os.pipe2(os.O_CLOEXEC)
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    try:
        popen = subprocess.Popen(
            argv,
            cwd=job.cwd and os.path.join(cwd, job.cwd) or cwd,
            env=env,
            shell=shell,  # noqa: S602 - only when the job file says `shell: true`
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            start_new_session=True,
            close_fds=True,
            **as_user,
        )
    except BaseException:
        for fd in (out_r, err_r):
            os.close(fd)
        raise
    finally:
        os.close(out_w)
        os.close(err_w)
    run.popen = popen
    run.pid = popen.pid
    run.uid = identity.uid if identity is not None else None
    for stream, fd in (("stdout", out_r), ("stderr", err_r)):
        os.set_blocking(fd, False)
        run.pipes[fd] = (stream, LineBuffer(0))


class Spawner:
    """Calls spawns several at once, from helper threads that live as long as one batch
    (a context manager; the helpers end on exit).

    A spawn returns only once its child has exec'd (vfork), and on a busy machine the
    parent then waits for a CPU behind the child it just started: a thousand spawns in a
    row cost ~2 ms each. From several threads these waits overlap (~2x the spawns a second
    on 2 cores). The helpers only run the spawns of runs the loop has not published yet;
    the loop's thread takes part and waits for all of them, so it stays the one writer."""

    def __init__(self, threads: int = SPAWN_THREADS) -> None:
        self._threads = threads
        self._helpers: list[threading.Thread] = []
        self._tasks: queue.SimpleQueue = queue.SimpleQueue()
        self._done = threading.Condition()
        self._pending = 0

    def __enter__(self) -> Spawner:
        return self

    def __exit__(self, *exc) -> None:
        for _ in self._helpers:
            self._tasks.put(None)
        for helper in self._helpers:
            helper.join()

    def spawn_all(self, spawns: list[Callable[[], None]]) -> list[BaseException | None]:
        """Call every spawn; what each raised, in order (None: it spawned)."""
        errors: list[BaseException | None] = [None] * len(spawns)
        while len(self._helpers) < min(self._threads, len(spawns)) - 1:
            helper = threading.Thread(target=self._help, name="spawn", daemon=True)
            helper.start()
            self._helpers.append(helper)
        with self._done:
            self._pending = len(spawns)
        for i, spawn_one in enumerate(spawns):
            self._tasks.put((spawn_one, errors, i))
        while self._take_one(block=False):
            pass
        with self._done:
            self._done.wait_for(lambda: self._pending == 0)
        return errors

    def _help(self) -> None:
        while self._take_one(block=True):
            pass

    def _take_one(self, block: bool) -> bool:
        try:
            task = self._tasks.get(block=block)
        except queue.Empty:
            return False
        if task is None:
            return False
        spawn_one, errors, i = task
        try:
            spawn_one()
        except BaseException as exc:  # noqa: BLE001 - handed back to the loop
            errors[i] = exc
        with self._done:
            self._pending -= 1
            if self._pending == 0:
                self._done.notify_all()
        return True


def read_pipe(run: Run, fd: int, max_line_bytes: int) -> tuple[list[str], bool]:
    """Read what is available on one of the run's pipes: (lines, reached end of file)."""
    stream, buf = run.pipes[fd]
    buf.max_line_bytes = max_line_bytes
    try:
        data = os.read(fd, READ_CHUNK)
    except BlockingIOError:
        return [], False
    except OSError:
        data = b""
    if not data:
        return buf.flush(), True
    return buf.feed(data), False


