"""Process table snapshots, memory readings and ownership: which process belongs to which run.

Reading is split from judging: `HostMemorySource` reads /proc, psutil and cgroups; `classify`
is a pure function over a `ProcessTable`, so ownership rules are tested on scripted tables and
on real processes alike.

Which run a process belongs to follows the one rule in kernel/lineage.py (it also says why Chrome's
zygotes and renderers inherit their marker from the browser above them).
"""

from __future__ import annotations

import enum
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple, Protocol

import msgspec
import psutil

from .lineage import (
    INIT_PID,
    MARKER_AGENT,
    MARKER_RUN_ID,
    MARKER_STATE_DIR,
    Lineage,
    read_markers,
    tree_of,
)

MB = 1024 * 1024


class ProcInfo(msgspec.Struct, frozen=True, kw_only=True):
    """What the guard needs to know about one process, read once per snapshot."""

    pid: int
    ppid: int
    name: str = ""
    cmdline: tuple[str, ...] = ()
    create_time: float = 0.0
    rss_mb: float = 0.0
    run_id: str | None = None
    agent: str | None = None
    state_dir: str | None = None

    def cmdline_head(self, limit: int = 120) -> str:
        text = " ".join(" ".join(self.cmdline).split()) or f"[{self.name}]"
        return text if len(text) <= limit else text[: limit - 3] + "..."


ProcessTable = Mapping[int, ProcInfo]


class LiveRun(NamedTuple):
    """A run the daemon is supervising right now; `cgroup` is its cgroup dir if it has one."""

    agent: str
    root_pid: int
    cgroup: str | None = None


class SystemMemory(NamedTuple):
    total_mb: float
    available_mb: float

    @property
    def percent_used(self) -> float:
        # (total - available), not psutil's `used`: available counts reclaimable cache,
        # which is what decides whether the next allocation triggers the OOM killer.
        if self.total_mb <= 0:
            return 0.0
        return 100.0 * (self.total_mb - self.available_mb) / self.total_mb


class MemorySource(Protocol):
    """Where the memory guard gets its numbers; scripted in tests, `HostMemorySource` in life."""

    def system(self) -> SystemMemory: ...

    def process_table(self, under_pid: int | None = None) -> ProcessTable:
        """All processes, or only `under_pid` and its descendants."""

    def precise_mb(self, pids: Iterable[int]) -> float:
        """Proportional (PSS) memory of these processes: shared pages counted once overall."""

    def cgroup_mb(self, cgroup: str) -> float | None: ...


# ---------------------------------------------------------------------------------------------
# Pure helpers over tables


class Owner(enum.StrEnum):
    FOREIGN = "foreign"  # not ours: never touched
    DAEMON = "daemon"  # the daemon process itself
    RUN = "run"  # belongs to a live run
    ORPHAN = "orphan"  # ours, but no live run claims it


class Ownership(NamedTuple):
    owner: Owner
    run_id: str | None = None


class _Line(NamedTuple):
    """Facts a process inherits from its ancestors."""

    lineage: Lineage
    state_dir: str | None
    under_daemon: bool
    marker_parent: int | None  # ppid of the nearest process that carries a run marker


_NO_LINE = _Line(Lineage(), None, False, None)


def _lineages(table: ProcessTable, daemon_pid: int,
              root_runs: Mapping[int, str]) -> dict[int, _Line]:
    lines: dict[int, _Line] = {}
    for start in table:
        chain, seen, pid = [], set(), start
        while pid in table and pid not in lines and pid not in seen:
            seen.add(pid)
            chain.append(pid)
            pid = table[pid].ppid
        line = lines.get(pid, _NO_LINE)
        for p in reversed(chain):
            info = table[p]
            # The daemon's runs all start below it: what sits above it is no run of ours.
            lineage = Lineage() if p == daemon_pid else line.lineage
            line = _Line(
                lineage=lineage.child(root_runs.get(p), info.run_id),
                state_dir=info.state_dir or line.state_dir,
                under_daemon=line.under_daemon or info.ppid == daemon_pid,
                marker_parent=info.ppid if info.run_id else line.marker_parent,
            )
            lines[p] = line
    return lines


def classify(table: ProcessTable, *, daemon_pid: int, state_dir: str,
             live_runs: Mapping[str, LiveRun], include_foreign: bool = False
             ) -> dict[int, Ownership]:
    """Decide for every process in `table` whether it is foreign, the daemon, a live run's, or an
    orphan.

    Ours: a descendant of the daemon (its subreaper role makes orphans land there), or carrying
    our WATCHKEEPER_STATE_DIR (leftovers of a previous daemon, reparented to init). A process of
    ours belongs to the run named by the nearest live root pid or run marker up its chain; it
    is an orphan when that run is not live or there is none. With `include_foreign`, a process
    of another watchkeeper whose marked ancestor was reparented to init counts as an orphan too.
    """
    root_runs = {run.root_pid: run_id for run_id, run in live_runs.items()}
    ours_dir = os.path.normpath(state_dir)
    result = {}
    for pid, line in _lineages(table, daemon_pid, root_runs).items():
        run_id = line.lineage.run_id
        if pid == daemon_pid:
            result[pid] = Ownership(Owner.DAEMON)
        elif line.under_daemon or (line.state_dir and os.path.normpath(line.state_dir) == ours_dir):
            live = run_id in live_runs
            result[pid] = Ownership(Owner.RUN if live else Owner.ORPHAN, run_id)
        elif (include_foreign and run_id and run_id not in live_runs
              and line.marker_parent == INIT_PID):
            result[pid] = Ownership(Owner.ORPHAN, run_id)
        else:
            result[pid] = Ownership(Owner.FOREIGN, run_id)
    return result


_TYPE_FLAG = re.compile(r"--type=([\w-]+)")


def chrome_role(info: ProcInfo, names: Iterable[str]) -> str | None:
    """The Chrome process role (`renderer`, `zygote`, ..., `browser`), or None if not Chrome."""
    exe = os.path.basename(info.cmdline[0]) if info.cmdline else ""
    if not any(n in exe or n in info.name for n in names):
        return None
    for arg in info.cmdline:
        if arg.startswith("--type="):
            return arg[len("--type="):]
    if len(info.cmdline) == 1:  # some titles arrive as one space-joined string
        m = _TYPE_FLAG.search(info.cmdline[0])
        if m:
            return m.group(1)
    if "crashpad" in exe or "crashpad" in info.name:
        return "crashpad-handler"
    return "browser"


# ---------------------------------------------------------------------------------------------
# Reading the host


def read_ppids(proc: str = "/proc") -> dict[int, int]:
    """pid → ppid for every process, from /proc/PID/stat (cheaper than psutil objects)."""
    ppids = {}
    for entry in os.scandir(proc):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"{proc}/{entry.name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # exited since scandir
        # comm may hold spaces and parentheses; the fields after the last ')' do not.
        fields = stat[stat.rfind(b")") + 2:].split()
        ppids[int(entry.name)] = int(fields[1])
    return ppids


def read_meminfo() -> tuple[int, int]:
    """(MemTotal, MemAvailable) in KiB. The memory guard samples every second, so this
    reads the first 256 bytes of /proc/meminfo, where the kernel puts both, and parses
    only those two: a quarter of the cost of psutil.virtual_memory(), which parses all."""
    with open("/proc/meminfo", "rb", buffering=0) as f:
        head = f.read(256)
    try:
        return _meminfo_kb(head, b"MemTotal:"), _meminfo_kb(head, b"MemAvailable:")
    except ValueError:  # a layout this does not know: let psutil work it out
        vm = psutil.virtual_memory()
        return vm.total // 1024, vm.available // 1024


def _meminfo_kb(head: bytes, key: bytes) -> int:
    start = head.index(key) + len(key)
    return int(head[start:head.index(b"kB", start)])


def read_process(pid: int, ppid: int) -> ProcInfo | None:
    """One process's details, or None if it vanished or is a zombie."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() == psutil.STATUS_ZOMBIE:
                return None
            info = ProcInfo(pid=pid, ppid=ppid, name=proc.name(),
                            cmdline=tuple(proc.cmdline()), create_time=proc.create_time(),
                            rss_mb=proc.memory_info().rss / MB)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return None
    markers = read_markers(pid)
    if not markers:
        return info
    return msgspec.structs.replace(info, run_id=markers.get(MARKER_RUN_ID) or None,
                                   agent=markers.get(MARKER_AGENT) or None,
                                   state_dir=markers.get(MARKER_STATE_DIR) or None)


def _cgroup_read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def cgroup_inactive_file(cgroup: Path) -> int:
    """Bytes of inactive file cache charged to a v2 or v1 memory cgroup (0 if unreadable)."""
    try:
        lines = (cgroup / "memory.stat").read_text().splitlines()
    except OSError:
        return 0
    for line in lines:
        key, _, value = line.partition(" ")
        if key in ("inactive_file", "total_inactive_file"):  # v2, v1
            return int(value)
    return 0


def cgroup_memory(cgroup: str) -> tuple[float, float | None] | None:
    """(used_mb, limit_mb or None) of a v2 or v1 memory cgroup, None if unreadable.

    Used excludes inactive file cache, which the kernel reclaims before it OOM-kills.
    """
    path = Path(cgroup)
    usage = _cgroup_read_int(path / "memory.current")
    limit_file = path / "memory.max"
    if usage is None:  # cgroup v1
        usage = _cgroup_read_int(path / "memory.usage_in_bytes")
        limit_file = path / "memory.limit_in_bytes"
    if usage is None:
        return None
    limit = _cgroup_read_int(limit_file)
    if limit is not None and limit >= 1 << 60:  # v1 spells "unlimited" as a huge number
        limit = None
    used = max(0, usage - cgroup_inactive_file(path))
    return used / MB, None if limit is None else limit / MB


class HostMemorySource:
    """The real memory source: the whole machine, or one cgroup's limit when `scope_cgroup`
    is set (the daemon may run in a systemd slice whose MemoryMax is what it will hit)."""

    __slots__ = ("_scope_cgroup",)

    def __init__(self, scope_cgroup: str | None = None) -> None:
        self._scope_cgroup = scope_cgroup

    def system(self) -> SystemMemory:
        if self._scope_cgroup:
            reading = cgroup_memory(self._scope_cgroup)
            if reading and reading[1]:
                used, limit = reading
                return SystemMemory(total_mb=limit, available_mb=max(0.0, limit - used))
        total_kb, available_kb = read_meminfo()
        return SystemMemory(total_mb=total_kb / 1024, available_mb=available_kb / 1024)

    def process_table(self, under_pid: int | None = None) -> dict[int, ProcInfo]:
        ppids = read_ppids()
        pids = ppids.keys() if under_pid is None else tree_of(ppids, under_pid)
        table = {}
        for pid in pids:
            info = read_process(pid, ppids.get(pid, 0))
            if info is not None:
                table[pid] = info
        return table

    def precise_mb(self, pids: Iterable[int]) -> float:
        total = 0
        for pid in pids:
            try:
                total += psutil.Process(pid).memory_full_info().pss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        return total / MB

    def cgroup_mb(self, cgroup: str) -> float | None:
        reading = cgroup_memory(cgroup)
        return None if reading is None else reading[0]
