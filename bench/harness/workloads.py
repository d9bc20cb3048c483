"""The measurements taken the same way of both daemons: start-up, idle memory and CPU,
restart after SIGKILL, and stop (with children deaf to SIGTERM and escaped grandchildren)."""

from __future__ import annotations

import os
import signal
import tempfile
import time
from pathlib import Path

import psutil

from .daemons import Daemon, Program
from .procs import Markers, kill_everything, wait_exits, write_scripts

MIB = 1024 * 1024
START_TIMEOUT_S = 60.0
# A program is killed only after it has been up longer than watchkeeper's default
# healthy_after_s (10 s) and supervisord's default startsecs (1 s): both then take the
# exit for the crash of a healthy program and restart it without backoff.
MIN_UPTIME_S = 11.0
KILL_GAP_S = 0.3      # after a replacement runs, before the next kill
LINGER_S = 1.0        # after the daemon exited, how long its programs may take to go


class MeasurementError(RuntimeError):
    """A figure could not be taken at all (a daemon did not start, a program never ran)."""


def thread_cpu_s(pid: int) -> dict[int, float]:
    """CPU seconds of each thread of `pid`: the scheduler's exact runtime where the kernel
    shows it (/proc/PID/task/TID/sched), else user + system in 10 ms clock ticks, too
    coarse for an idle daemon."""
    out: dict[int, float] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/sched") as f:
                for line in f:
                    if line.startswith("se.sum_exec_runtime"):
                        out[int(tid)] = float(line.split(":")[1]) / 1000  # ms
                        break
        except (OSError, ValueError):
            pass
    if not out:
        times = psutil.Process(pid).cpu_times()
        out[pid] = times.user + times.system
    return out


class Session:
    """One daemon supervising `programs` in a temporary directory; on exit the daemon and
    everything it started are killed, whatever happened."""

    def __init__(self, kind: type[Daemon], python: Path, script: str, names: list[str],
                 also_report: list[str] = (), extra_jobs: list[dict] | None = None) -> None:
        """`names` are the programs; `also_report`, the names their own children report
        under (start-up waits for those too); `extra_jobs`, watchkeeper agents beside them."""
        self.kind, self.python, self.script, self.names = kind, python, script, names
        self.also_report = list(also_report)
        self.extra_jobs = extra_jobs
        self._tmp: tempfile.TemporaryDirectory | None = None
        self.daemon: Daemon
        self.markers: Markers

    def __enter__(self) -> Session:
        self._tmp = tempfile.TemporaryDirectory(prefix=f"wk-bench-{self.kind.label}-")
        root = Path(self._tmp.name)
        scripts = write_scripts(root / "programs")
        self.markers = Markers(root / "markers.fifo")
        programs = [Program(n, ["/bin/sh", str(scripts[self.script]), n, str(self.markers.path)])
                    for n in self.names]
        self.daemon = self.kind(root, self.python)
        if self.extra_jobs:
            self.daemon.configure(programs, self.extra_jobs)
        else:
            self.daemon.configure(programs)
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.daemon.kill()
            kill_everything()
            self.markers.close()
        finally:
            self._tmp.cleanup()

    def fail(self, what: str) -> MeasurementError:
        return MeasurementError(f"{self.kind.label}: {what}\n--- its log ---\n"
                                f"{self.daemon.log_tail()}")

    # -- measurements -------------------------------------------------------------------
    def start_until_running(self) -> float:
        """Seconds from starting the daemon until every program has reported."""
        t0 = self.daemon.start()
        wanted = set(self.names) | set(self.also_report)
        if not self.markers.wait_for(lambda marks: wanted <= {m.name for m in marks},
                                     START_TIMEOUT_S, abort=self.daemon.exited):
            seen = {m.name for m in self.markers.marks}
            why = (f"exited with status {self.daemon.proc.returncode}" if self.daemon.exited()
                   else f"did not run them within {START_TIMEOUT_S:.0f} s")
            raise self.fail(f"{len(wanted - seen)} of {len(wanted)} programs never ran: "
                            f"the daemon {why}")
        firsts: dict[str, float] = {}
        for m in self.markers.marks:
            firsts.setdefault(m.name, m.mono)
        return max(firsts[n] for n in wanted) - t0

    def memory_mib(self) -> tuple[float, float]:
        info = psutil.Process(self.daemon.pid).memory_full_info()
        return info.rss / MIB, info.uss / MIB

    def cpu_s(self, window_s: float) -> float:
        """The daemon's own CPU seconds (all threads) over an idle window."""
        before = thread_cpu_s(self.daemon.pid)
        time.sleep(window_s)
        after = thread_cpu_s(self.daemon.pid)
        return sum(t - before.get(tid, 0.0) for tid, t in after.items())

    def restart_latencies_ms(self, kills: int) -> list[float]:
        """SIGKILL a program, time until its replacement reports; the program killed is
        always the one whose instance has been up longest."""
        latencies = []
        for _ in range(kills):
            latest = self.markers.latest()
            name = min(self.names, key=lambda n: latest[n].mono)
            victim = latest[name]
            wait_s = max(victim.mono + MIN_UPTIME_S - time.monotonic(), KILL_GAP_S)
            time.sleep(wait_s)
            seen = len(self.markers.marks)
            t0 = time.monotonic()
            os.kill(victim.pid, signal.SIGKILL)

            def replaced(marks, name=name, old=victim.pid, seen=seen):
                return any(m.name == name and m.pid != old for m in marks[seen:])

            if not self.markers.wait_for(replaced, 60, abort=self.daemon.exited):
                raise self.fail(f"{name} was not restarted within 60 s of SIGKILL")
            new = next(m for m in self.markers.marks[seen:] if m.name == name)
            latencies.append((new.mono - t0) * 1000)
        return latencies

    def stop(self) -> dict[str, float | None]:
        """SIGTERM the daemon; time until it exits and until every program (grandchildren
        included) is gone; count what is still alive LINGER_S after the daemon exited."""
        pids = [m.pid for m in self.markers.latest().values()]
        t0 = time.monotonic()
        self.daemon.terminate()
        gone = wait_exits([self.daemon.pid, *pids], t0 + 120, linger_after=self.daemon.pid,
                          linger_s=LINGER_S)
        if self.daemon.pid not in gone:
            raise self.fail("did not exit within 120 s of SIGTERM")
        self.daemon.proc.wait()
        left = [p for p in pids if p not in gone]
        return {"daemon_exit_s": gone[self.daemon.pid] - t0,
                "all_gone_s": None if left else max(gone.values()) - t0,
                "left_behind": float(len(left))}
