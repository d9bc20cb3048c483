"""Who is calling: the operator, or something an agent run started.

Every process the daemon starts is an agent's (or a descendant of one), whatever uid it
runs under; the kernel tells us which by the peer's cgroup (one per run, when delegated)
and by its parent chain (the daemon is the subreaper, so a process that setsid+double-forked
out of its run is re-parented to the daemon and still below it). An environment variable
or a token never decides this.
"""

from __future__ import annotations

import dataclasses
import enum
import os

from .lineage import ancestry
from .peers import cgroup_of


class Permission(enum.StrEnum):
    """Admin verbs an agent's runs may be granted (`permissions:` in its file)."""

    START_NOW = "start-now"
    PAUSE = "pause"
    RESUME = "resume"
    RELOAD = "reload"
    STOP = "stop"
    BREAKER_RESET = "breaker-reset"
    MEMORY_REVERT = "memory-revert"
    MEMORY_EXPORT = "memory-export"
    MEMORY_IMPORT = "memory-import"


@dataclasses.dataclass(frozen=True)
class Placement:
    """Where a peer process sits relative to the daemon's runs."""

    inside: bool | None   # started by the daemon (a run or its descendant); None: unknown
    run: object | None    # the live run it provably belongs to (cgroup or ancestry)
    orphan: bool = False  # below the daemon, but no longer below any run's root


def place(pid: int, pipeline, cgroups) -> Placement:
    """Locate `pid` from kernel facts only: its run cgroup first, then its parent chain."""
    if cgroups is not None:
        found = _by_cgroup(pid, pipeline, cgroups)
        if found is not None:
            return found
    chain = ancestry(pid)
    if not chain:
        return Placement(None, None)
    me = os.getpid()
    if me not in chain[1:]:
        return Placement(False, None)
    for link in chain[:chain.index(me)]:
        run = pipeline.runs_by_pid.get(link)
        if run is not None:
            return Placement(True, run)
    return Placement(True, None, orphan=True)


def _by_cgroup(pid: int, pipeline, cgroups) -> Placement | None:
    path = cgroup_of(pid)
    if path is None:  # /proc hides another uid's process (ProtectProc=invisible)
        return _by_cgroup_procs(pid, pipeline, cgroups)
    runs_dir = _relative(cgroups.runs_dir)
    if runs_dir is None or not path.startswith(runs_dir + "/"):
        return None
    run_id = path[len(runs_dir) + 1:].split("/", 1)[0]
    return Placement(True, pipeline.runs.get(run_id))


def _by_cgroup_procs(pid: int, pipeline, cgroups) -> Placement | None:
    """The run whose cgroup.procs lists `pid`: the cgroup files are the daemon's to read
    even when /proc/PID is not."""
    try:
        run_dirs = list(cgroups.runs_dir.iterdir())
    except OSError:
        return None
    for run_dir in run_dirs:
        if pid in cgroups.pids(run_dir):
            return Placement(True, pipeline.runs.get(run_dir.name))
    return None


def _relative(path) -> str | None:
    """/sys/fs/cgroup/a/b -> /a/b (the form /proc/PID/cgroup uses)."""
    from .cgroups import V2_MOUNTS

    for mount in sorted(V2_MOUNTS, key=lambda m: -len(str(m))):  # unified/ before its parent
        try:
            return "/" + str(path.relative_to(mount)).lstrip(".").lstrip("/")
        except ValueError:
            continue
    return None
