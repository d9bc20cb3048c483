"""The memory guard: watch memory, kill orphaned Chrome, ask the daemon to stop runs.

Under pressure (used >= act_percent) it escalates one step per tick, waiting for each step
to take effect before the next:
  1. orphaned Chrome processes (ours, no live run): SIGTERM, then SIGKILL after kill_grace_s;
  2. a `StopRun` action for the largest run of a `memory_priority: low` agent;
  3. a `Unrelieved` action (the daemon alerts a human) when nothing is left to stop.
Independently, a run whose tree exceeds its agent's `memory_max_mb` gets `StopRun(reason=memory)`.

The guard never sleeps: `tick(now)` does one bounded step and `next_tick_at` tells the loop
when to call again (sooner while kills are in flight or memory is tight; seldom when
`kernel_notifies`, because a PSI trigger then calls it on pressure: kernel/psi.py, features/health.py). It kills orphans
itself because they belong to no run; runs are stopped by the daemon, which owns them.
"""

from __future__ import annotations

import enum
import os
import signal
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Protocol

import msgspec
import psutil
import structlog

from supervisor.core.ranges import Duration, Megabytes, Percent, PositiveDuration
from supervisor.kernel.procscan import (
    HostMemorySource,
    LiveRun,
    MemorySource,
    Owner,
    ProcessTable,
    ProcInfo,
    SystemMemory,
    chrome_role,
    classify,
    read_process,
)

log = structlog.get_logger("watchkeeper.memguard")


class MemoryPriority(enum.StrEnum):
    LOW = "low"  # first to be stopped under memory pressure
    NORMAL = "normal"


class AgentMemorySettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Per-agent memory keys: `memory_priority` and `memory_max_mb`."""

    memory_priority: MemoryPriority = MemoryPriority.NORMAL
    memory_max_mb: Megabytes | None = None


class MemoryGuardSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Config section `memory`; defaults suit a 4 GB VPS.

    configload checks clear_percent <= warn_percent <= act_percent and fast_interval_s <=
    slow_interval_s (relations a per-field range cannot state)."""

    warn_percent: Percent = 80.0
    """Memory used (of total, counting reclaimable cache as free) that logs a warning and
    speeds sampling up."""
    act_percent: Percent = 87.0
    """Memory used that makes the guard act: orphaned Chrome first, then low-priority runs,
    then an alert."""
    # Leave pressure only below this, so usage hovering at the threshold does not flap.
    clear_percent: Percent = 75.0
    # Far from the threshold the guard samples as rarely as a climb at fill_rate_mb_s allows:
    # each wakeup of an idle daemon costs ~0.3 ms of CPU, ten times the reading itself.
    slow_interval_s: PositiveDuration = 10.0
    """Longest interval between two memory readings (below warn_percent)."""
    fast_interval_s: PositiveDuration = 0.25
    """Sampling interval near the threshold."""
    fill_rate_mb_s: Annotated[float, msgspec.Meta(gt=0, le=1_000_000)] = 1000.0  # 1 TB/s
    """The fastest climb of memory use the guard plans for: below warn_percent it reads
    again before a climb this fast could reach warn_percent, then samples at
    fast_interval_s. A faster jump is seen within slow_interval_s."""
    # At most the kernel's 2 s PSI window.
    pressure_stall_ms: Annotated[float, msgspec.Meta(ge=0, le=2000)] = 100.0
    """Where the kernel has PSI (/proc/pressure/memory), it wakes the guard when tasks
    stalled on memory this long within 2 s; below warn_percent the guard then reads memory
    only every slow_interval_s. A cgroup v1 scope_cgroup also wakes it when its usage
    crosses warn_percent or act_percent. 0 turns kernel notifications off (adaptive
    sampling only)."""
    # Per-run memory_max_mb checks walk the daemon's process tree; they need not run each tick.
    run_check_interval_s: PositiveDuration = 5.0
    kill_grace_s: Duration = 2.0
    """SIGTERM to SIGKILL for orphaned processes."""
    # A requested run stop gets this long to free memory before the guard escalates past it.
    stop_wait_s: Duration = 30.0
    realert_interval_s: PositiveDuration = 900.0
    """Alert again about lasting pressure at most this often."""
    chrome_names: tuple[str, ...] = ("chrome", "chromium", "headless_shell")
    """Process names taken for Chrome."""
    # "browser" is a Chrome process without --type; it is only killed once its run has ended.
    chrome_types: tuple[str, ...] = ("renderer", "gpu-process", "utility", "zygote", "browser",
                                     "crashpad-handler")
    include_foreign: bool = False
    """Also kill Chrome orphans of other watchkeepers whose marked ancestor was reparented to
    init."""
    # Measure pressure against this cgroup's limit instead of the whole machine.
    scope_cgroup: str | None = None


class Level(enum.StrEnum):
    NORMAL = "normal"
    WARNING = "warning"
    CRITICAL = "critical"


def next_level(level: Level, percent: float, settings: MemoryGuardSettings) -> Level:
    """The pressure level after a reading; once raised, a level holds until below clear_percent."""
    if percent >= settings.act_percent:
        return Level.CRITICAL
    if level is not Level.NORMAL and percent >= settings.clear_percent:
        return level
    return Level.WARNING if percent >= settings.warn_percent else Level.NORMAL


def interval_for(level: Level, settings: MemoryGuardSettings, reading: SystemMemory,
                 kernel_notifies: bool = False) -> float:
    """Fast at warning and above; below, slow_interval_s when the kernel wakes the guard on
    pressure, else the time a climb at fill_rate_mb_s needs to reach warn_percent, kept
    between the fast and the slow interval."""
    if level is not Level.NORMAL:
        return settings.fast_interval_s
    if kernel_notifies:
        return settings.slow_interval_s
    headroom_mb = (settings.warn_percent - reading.percent_used) / 100 * reading.total_mb
    return min(settings.slow_interval_s,
               max(settings.fast_interval_s, headroom_mb / settings.fill_rate_mb_s))


class MemoryCause(enum.StrEnum):
    """Why the guard asks for a run's stop; the run's record says StopReason.MEMORY for both."""

    MEMORY = "memory"  # the run exceeded its agent's memory_max_mb
    MEMORY_PRESSURE = "memory_pressure"  # the machine is short; this was the largest low run


class StopRun(msgspec.Struct, frozen=True, kw_only=True):
    """Action for the daemon: stop this run (its usual graceful stop)."""

    run_id: str
    agent: str
    reason: MemoryCause
    memory_mb: float
    limit_mb: float | None = None


class Unrelieved(msgspec.Struct, frozen=True, kw_only=True):
    """Action for the daemon: tell a human (an alerts.Alert); the guard has nothing left to
    free."""

    reason: str
    percent_used: float
    message: str


Action = StopRun | Unrelieved


class Signaller(Protocol):
    """Sends signals to a process identified by pid and start time (so a reused pid is safe)."""

    def signal(self, pid: int, create_time: float, sig: int) -> bool: ...

    def alive(self, pid: int, create_time: float) -> bool: ...


class HostSignaller:
    __slots__ = ()

    @staticmethod
    def _same(pid: int, create_time: float) -> psutil.Process | None:
        try:
            proc = psutil.Process(pid)
            if abs(proc.create_time() - create_time) > 0.01:
                return None  # the pid was reused by another process
            return None if proc.status() == psutil.STATUS_ZOMBIE else proc
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return None

    def signal(self, pid: int, create_time: float, sig: int) -> bool:
        proc = self._same(pid, create_time)
        if proc is None:
            return False
        try:
            proc.send_signal(sig)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return True

    def alive(self, pid: int, create_time: float) -> bool:
        return self._same(pid, create_time) is not None


class _Usage(msgspec.Struct, kw_only=True):
    mb: float
    exact: bool = False  # False: an RSS sum, an upper bound
    pids: list[int] = []
    head: str = ""


class _Kill(msgspec.Struct, kw_only=True):
    info: ProcInfo
    role: str
    run_id: str | None
    reason: str
    started_at: float
    deadline: float
    sig: int = signal.SIGTERM


class MemoryGuard:
    """Call `tick(now)` (monotonic seconds) at or after `next_tick_at`; perform returned actions."""

    def __init__(self, settings: MemoryGuardSettings, *, daemon_pid: int, state_dir: str,
                 live_runs: Callable[[], Mapping[str, LiveRun]],
                 agent_settings: Callable[[str], AgentMemorySettings],
                 source: MemorySource | None = None, signaller: Signaller | None = None,
                 run_pids: Callable[[str, LiveRun], Iterable[int]] | None = None) -> None:
        self.settings = settings
        # A run's known processes (its tree and what the pipeline attributed to it): with
        # it, a run without a cgroup is measured without scanning the whole process table.
        self._run_pids = run_pids
        self._daemon_pid = daemon_pid
        self._state_dir = state_dir
        self._live_runs = live_runs
        self._agent_settings = agent_settings
        self._source = source or HostMemorySource(settings.scope_cgroup)
        self._signaller = signaller or HostSignaller()
        self.level = Level.NORMAL
        self.next_tick_at = 0.0
        self._next_run_check_at = 0.0
        self._kills: dict[int, _Kill] = {}
        self._stopping: dict[str, float] = {}
        self._last_alert_at: float | None = None
        # Set by whoever waits on a PSI trigger (features/health.py) and calls tick() when it fires.
        self.kernel_notifies = False
        self.samples = 0  # readings of system memory taken

    @property
    def kills_in_flight(self) -> int:
        return len(self._kills)

    def system_reading(self) -> SystemMemory:
        """System memory now, from the guard's own source (so `scope_cgroup` is honoured)."""
        return self._source.system()

    def tick(self, now: float) -> list[Action]:
        self._advance_kills(now)
        reading = self._source.system()
        self.samples += 1
        percent = reading.percent_used
        self._set_level(next_level(self.level, percent, self.settings), percent)
        live = self._live_runs()
        self._stopping = {r: t for r, t in self._stopping.items() if r in live}
        actions: list[Action] = []
        if now >= self._next_run_check_at:
            self._next_run_check_at = now + self.settings.run_check_interval_s
            actions.extend(self._check_run_limits(now, live))
        if self.level is Level.CRITICAL and percent >= self.settings.act_percent:
            actions.extend(self._relieve(now, percent, live))
        self.next_tick_at = now + interval_for(self.level, self.settings, reading,
                                               self.kernel_notifies)
        if any(self._agent_settings(run.agent).memory_max_mb for run in live.values()):
            self.next_tick_at = min(self.next_tick_at, self._next_run_check_at)
        if self._kills:
            self.next_tick_at = min(self.next_tick_at, now + self.settings.fast_interval_s)
        return actions

    def sweep(self, now: float, reason: str = "orphan_sweep") -> int:
        """Kill orphaned Chrome regardless of pressure (at startup, after a run ends);
        returns how many kills were started. Finish them by calling `tick` as scheduled."""
        orphans = self._chrome_orphans(self._source.process_table(), self._live_runs())
        self._start_kills(orphans, now, reason)
        if self._kills:
            self.next_tick_at = min(self.next_tick_at, now + self.settings.fast_interval_s)
        return len(orphans)

    def _set_level(self, level: Level, percent: float) -> None:
        if level is self.level:
            return
        event = log.warning if level is not Level.NORMAL else log.info
        # `memory_level`, not `level`: the logger's own `level` key (warning) overwrote it.
        event("memory_level_changed", previous=self.level.value, memory_level=level.value,
              percent_used=round(percent, 1), samples=self.samples)
        self.level = level
        if level is not Level.CRITICAL:
            self._last_alert_at = None

    # -- escalation under pressure ------------------------------------------------------------

    def _relieve(self, now: float, percent: float, live: Mapping[str, LiveRun]) -> list[Action]:
        if self._kills:
            return []  # let the orphans we are killing free their memory first
        orphans = self._chrome_orphans(self._source.process_table(), live)
        if orphans:
            self._start_kills(orphans, now, "memory_pressure")
            return []
        if any(now - t < self.settings.stop_wait_s for t in self._stopping.values()):
            return []
        stop = self._largest_low_priority(live, percent)
        if stop is not None:
            self._stopping[stop.run_id] = now
            return [stop]
        if self._last_alert_at is not None and \
                now - self._last_alert_at < self.settings.realert_interval_s:
            return []
        self._last_alert_at = now
        message = (f"memory {percent:.1f}% used >= act_percent {self.settings.act_percent}%;"
                   " no orphaned Chrome and no memory_priority: low run left to stop")
        log.error("memory_alert", percent_used=round(percent, 1), message=message)
        return [Unrelieved(reason="memory_pressure_unrelieved", percent_used=percent,
                      message=message)]

    def _largest_low_priority(self, live: Mapping[str, LiveRun],
                              percent: float) -> StopRun | None:
        candidates = {rid: run for rid, run in live.items() if rid not in self._stopping and
                      self._agent_settings(run.agent).memory_priority is MemoryPriority.LOW}
        if not candidates:
            return None
        usage = self._measure(candidates, live)
        rid = max(usage, key=lambda r: self._precise(usage[r]))
        used_mb, run = usage[rid].mb, candidates[rid]
        log.warning("run_stop_requested", run_id=rid, agent=run.agent, pid=run.root_pid,
                    cmdline=usage[rid].head, memory_mb=round(used_mb, 1),
                    reason=MemoryCause.MEMORY_PRESSURE.value, percent_used=round(percent, 1))
        return StopRun(run_id=rid, agent=run.agent, reason=MemoryCause.MEMORY_PRESSURE,
                       memory_mb=used_mb)

    # -- per-run limits -----------------------------------------------------------------------

    def _check_run_limits(self, now: float, live: Mapping[str, LiveRun]) -> list[Action]:
        limits = {rid: self._agent_settings(run.agent).memory_max_mb for rid, run in live.items()
                  if rid not in self._stopping}
        limited = {rid: live[rid] for rid, lim in limits.items() if lim}
        if not limited:
            return []
        actions: list[Action] = []
        for rid, usage in self._measure(limited, live).items():
            # RSS over-counts shared pages, so it is an upper bound: only a run whose RSS
            # exceeds its limit pays for a PSS reading.
            if usage.mb <= limits[rid] or self._precise(usage) <= limits[rid]:
                continue
            run = limited[rid]
            used_mb = self._precise(usage)
            self._stopping[rid] = now
            log.warning("run_stop_requested", run_id=rid, agent=run.agent, pid=run.root_pid,
                        cmdline=usage.head, memory_mb=round(used_mb, 1),
                        limit_mb=limits[rid], reason=MemoryCause.MEMORY.value)
            actions.append(StopRun(run_id=rid, agent=run.agent, reason=MemoryCause.MEMORY,
                                   memory_mb=used_mb, limit_mb=limits[rid]))
        return actions

    def _measure(self, runs: Mapping[str, LiveRun],
                 live: Mapping[str, LiveRun]) -> dict[str, _Usage]:
        """Each run's memory: its cgroup if it has one (exact), else its tree's RSS sum."""
        usage: dict[str, _Usage] = {}
        tree_runs = {}
        for rid, run in runs.items():
            cg = self._source.cgroup_mb(run.cgroup) if run.cgroup else None
            if cg is None:
                tree_runs[rid] = run
            else:
                usage[rid] = _Usage(mb=cg, exact=True)
        if not tree_runs:
            return usage
        if self._run_pids is not None:
            usage.update({rid: self._known_pids_usage(rid, run) for rid, run in tree_runs.items()})
            return usage
        table = self._source.process_table(under_pid=self._daemon_pid)
        owners = classify(table, daemon_pid=self._daemon_pid, state_dir=self._state_dir,
                          live_runs=live)
        members: dict[str, list[int]] = {rid: [] for rid in tree_runs}
        for pid, own in owners.items():
            if own.owner is Owner.RUN and own.run_id in members:
                members[own.run_id].append(pid)
        for rid, pids in members.items():
            root = table.get(tree_runs[rid].root_pid)
            usage[rid] = _Usage(mb=sum(table[p].rss_mb for p in pids), pids=pids,
                                head=root.cmdline_head() if root else "")
        return usage

    def _known_pids_usage(self, run_id: str, run: LiveRun) -> _Usage:
        """The RSS sum of the run's known processes only (an upper bound, like the scan's)."""
        infos = [info for info in (read_process(pid, 0) for pid in
                                   dict.fromkeys(self._run_pids(run_id, run))) if info]
        head = next((info.cmdline_head() for info in infos if info.pid == run.root_pid), "")
        return _Usage(mb=sum(info.rss_mb for info in infos), pids=[i.pid for i in infos],
                      head=head)

    def _precise(self, usage: _Usage) -> float:
        if not usage.exact:
            usage.mb, usage.exact = self._source.precise_mb(usage.pids), True
        return usage.mb

    # -- killing orphans ----------------------------------------------------------------------

    def _chrome_orphans(self, table: ProcessTable, live: Mapping[str, LiveRun]) -> list[_Kill]:
        owners = classify(table, daemon_pid=self._daemon_pid, state_dir=self._state_dir,
                          live_runs=live, include_foreign=self.settings.include_foreign)
        untouchable = {self._daemon_pid, os.getpid(), 1, 0}
        found = []
        for pid, own in owners.items():
            if own.owner is not Owner.ORPHAN or pid in untouchable or pid in self._kills:
                continue
            role = chrome_role(table[pid], self.settings.chrome_names)
            if role in self.settings.chrome_types:
                found.append(_Kill(info=table[pid], role=role, run_id=own.run_id, reason="",
                                   started_at=0.0, deadline=0.0))
        return found

    def _start_kills(self, orphans: list[_Kill], now: float, reason: str) -> None:
        for kill in orphans:
            if self._signaller.signal(kill.info.pid, kill.info.create_time, signal.SIGTERM):
                kill.reason, kill.started_at = reason, now
                kill.deadline = now + self.settings.kill_grace_s
                self._kills[kill.info.pid] = kill

    def _advance_kills(self, now: float) -> None:
        for pid, kill in list(self._kills.items()):
            info = kill.info
            if not self._signaller.alive(pid, info.create_time):
                del self._kills[pid]
                log.info("orphan_killed", pid=pid, cmdline=info.cmdline_head(),
                         rss_freed_mb=round(info.rss_mb, 1), reason=kill.reason, role=kill.role,
                         run_id=kill.run_id, signal=signal.Signals(kill.sig).name,
                         elapsed_s=round(now - kill.started_at, 3))
            elif now >= kill.deadline and kill.sig == signal.SIGTERM:
                kill.sig = signal.SIGKILL
                kill.deadline = now + self.settings.kill_grace_s
                self._signaller.signal(pid, info.create_time, signal.SIGKILL)
            elif now >= kill.deadline:
                del self._kills[pid]  # unkillable (uninterruptible sleep); do not retry forever
                log.error("orphan_kill_failed", pid=pid, cmdline=info.cmdline_head(),
                          rss_mb=round(info.rss_mb, 1), reason=kill.reason, role=kill.role)
