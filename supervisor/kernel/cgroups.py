"""Per-run cgroups (v2) when the daemon owns a delegated cgroup; nothing escapes cgroup.kill.

Layout under the daemon's own cgroup D (systemd `Delegate=yes` gives the service D):
    D/supervisor/    the daemon itself (v2 forbids processes in a cgroup with children)
    D/runs/<run_id>  one per run
Where no writable v2 cgroup is found, the daemon falls back to process groups plus
subreaper tracking (kernel/proctree.py), and this module is not used.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import structlog

log = structlog.get_logger("watchkeeper.cgroups")

V2_MOUNTS = (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
# Tasks (processes and threads) a run may never take from the service's own pids.max
# (TasksMax=512 in the shipped unit): a bomb in one run must leave the daemon room to
# start threads, kill it and start other runs.
RESERVED_TASKS = 64


def _v2_mount() -> Path | None:
    for mount in V2_MOUNTS:
        if (mount / "cgroup.procs").exists() and (mount / "cgroup.controllers").exists():
            return mount
    return None


def own_cgroup() -> str | None:
    """This process's path in the v2 hierarchy ("0::/path" in /proc/self/cgroup)."""
    try:
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:] or "/"
    except OSError:
        pass
    return None


def _enable_pids_controller(base: Path) -> None:
    """Hand the pids controller down to D/runs/*, if it was delegated to D: best effort."""
    for parent in (base, base / "runs"):
        try:
            (parent / "cgroup.subtree_control").write_text("+pids")
        except OSError as exc:
            log.info("cgroups_pids_unavailable", cgroup=str(parent), error=str(exc))
            return


def _read_pids_max(cgroup: Path) -> int | None:
    """A cgroup's pids.max as a number; None for "max", no pids controller or unreadable."""
    try:
        return int((cgroup / "pids.max").read_text().strip())
    except (OSError, ValueError):
        return None


class RunCgroups:
    def __init__(self, base: Path, created_base: bool) -> None:
        self.base = base
        self.created_base = created_base
        self.runs_dir = base / "runs"

    @classmethod
    def setup(cls, mode: str, name: str) -> RunCgroups | None:
        """Return a manager if cgroups are usable under `mode` (auto|on|off), else None.

        `auto` uses the daemon's own cgroup only when it is delegated (writable and not
        the root). `on` also creates a cgroup named `name` below the root when the daemon
        sits in the root cgroup, which is what a daemon outside systemd gets.
        """
        if mode == "off":
            return None
        mount, path = _v2_mount(), own_cgroup()
        if mount is None or path is None:
            return None
        created = False
        base = mount / path.lstrip("/")
        if path == "/" or not os.access(base / "cgroup.procs", os.W_OK):
            if mode != "on" or not os.access(mount / "cgroup.procs", os.W_OK):
                return None
            base = mount / name
            created = True
        try:
            (base / "supervisor").mkdir(parents=True, exist_ok=True)
            (base / "runs").mkdir(exist_ok=True)
            (base / "supervisor" / "cgroup.procs").write_text(str(os.getpid()))
        except OSError as exc:
            log.info("cgroups_unavailable", base=str(base), error=str(exc))
            return None
        if not (base / "runs" / "cgroup.kill").exists():
            log.info("cgroups_unavailable", base=str(base), error="no cgroup.kill (kernel < 5.14)")
            return None
        _enable_pids_controller(base)
        return cls(base, created)

    def create(self, run_id: str, max_pids: int | None = None) -> Path:
        """The run's cgroup; with `max_pids`, the kernel refuses its fork number max_pids+1
        (pids.max), where the pids controller was delegated to us."""
        path = self.runs_dir / run_id
        path.mkdir(exist_ok=True)
        if max_pids is not None:
            try:
                (path / "pids.max").write_text(str(self.run_pids_limit(max_pids)))
            except OSError:
                pass  # no pids controller here: the daemon's own process cap still holds
        return path

    def run_pids_limit(self, max_pids: int) -> int:
        """max_pids, but never more than the base's own pids.max less RESERVED_TASKS: past
        the base's limit a run's pids.max would never bite, and the service would hit its
        limit (every fork and thread of the daemon refused) before the run hit its own."""
        base_limit = _read_pids_max(self.base)
        if base_limit is None:
            return max_pids
        return max(1, min(max_pids, base_limit - RESERVED_TASKS))

    @staticmethod
    def add(path: Path, pid: int) -> bool:
        try:
            (path / "cgroup.procs").write_text(str(pid))
            return True
        except OSError:
            return False

    def adopt_session(self, path: Path, sid: int) -> None:
        """Move processes of session `sid` still in the daemon's leaf into the run cgroup:
        a child that forked before it was moved leaves them behind there."""
        for pid in self.pids(self.base / "supervisor"):
            try:
                if pid != os.getpid() and os.getsid(pid) == sid:
                    self.add(path, pid)
            except OSError:
                continue

    @staticmethod
    def pids(path: Path) -> list[int]:
        try:
            return [int(p) for p in (path / "cgroup.procs").read_text().split()]
        except (OSError, ValueError):
            return []

    @staticmethod
    def signal(path: Path, sig: int) -> None:
        if sig == signal.SIGKILL:
            try:
                (path / "cgroup.kill").write_text("1")
                return
            except OSError:
                pass
        for pid in RunCgroups.pids(path):
            try:
                os.kill(pid, sig)
            except OSError:
                pass

    @staticmethod
    def remove(path: Path) -> bool:
        try:
            path.rmdir()
            return True
        except OSError:
            return False

    def close(self) -> None:
        """Give the base back: move ourselves up and remove what we created."""
        for child in list(self.runs_dir.glob("*")) if self.runs_dir.exists() else []:
            if child.is_dir():
                self.remove(child)
        if self.created_base:
            parent = self.base.parent
            try:
                (parent / "cgroup.procs").write_text(str(os.getpid()))
            except OSError:
                return
            for sub in (self.runs_dir, self.base / "supervisor", self.base):
                self.remove(sub)
