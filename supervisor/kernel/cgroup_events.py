"""Memory usage thresholds of a cgroup v1, signalled by the kernel through an eventfd.

When the guard measures a cgroup (`memory_guard.scope_cgroup`, say the slice whose limit
the daemon will hit), a climb that does not stall anybody yet is invisible to PSI. cgroup
v1 can say so itself: "<eventfd> <fd of memory.usage_in_bytes> <bytes>" written to
cgroup.event_control makes the kernel signal the eventfd each time the usage crosses
<bytes>, up or down. cgroup v2 has no such notification (only PSI, see kernel/psi.py).

The guard measures usage less inactive file cache (reclaimed before any OOM kill), the
kernel's threshold counts raw usage: a threshold at act_percent of the raw usage fires
early, and the guard, finding itself below act_percent, sampled every fast_interval_s until
it was not (~250 ms of a 300 ms kill in bench/memguard_pressure.py). `TrackedThreshold`
adds a threshold at act_percent of the guard's own measure: raw usage at act_percent plus
the inactive cache of the moment, armed again as the cache moves.
"""

from __future__ import annotations

import os
import select
from pathlib import Path

import structlog

from .procscan import cgroup_inactive_file

log = structlog.get_logger("watchkeeper.cgroup_events")


class UsageThreshold:
    """One threshold; `fileno()` becomes readable each time the usage crosses it."""

    def __init__(self, path: str, event_fd: int, usage_fd: int, threshold_bytes: int) -> None:
        self.path = path
        self.threshold_bytes = threshold_bytes
        self._event_fd = event_fd
        self._usage_fd = usage_fd

    @classmethod
    def open_percents(cls, cgroup: str, percents: list[float]) -> list[UsageThreshold]:
        """Thresholds at these percents of the cgroup's limit; [] (logged) where it is not
        a cgroup v1 memory cgroup with a limit, or the kernel refuses."""
        base = Path(cgroup)
        try:
            limit = int((base / "memory.limit_in_bytes").read_text())
        except (OSError, ValueError):
            return []  # not v1 (or not there): PSI alone
        if limit >= 1 << 60:
            return []  # unlimited: usage never nears it
        found = []
        for percent in percents:
            threshold = cls.open(str(base), int(limit * percent / 100))
            if threshold is not None:
                found.append(threshold)
        return found

    @classmethod
    def open(cls, cgroup: str, threshold_bytes: int) -> UsageThreshold | None:
        event_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        try:
            usage_fd = os.open(f"{cgroup}/memory.usage_in_bytes", os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            os.close(event_fd)
            log.info("cgroup_threshold_unavailable", cgroup=cgroup, error=exc.strerror)
            return None
        try:
            with open(f"{cgroup}/cgroup.event_control", "w") as control:
                control.write(f"{event_fd} {usage_fd} {threshold_bytes}")
        except OSError as exc:
            os.close(event_fd)
            os.close(usage_fd)
            log.info("cgroup_threshold_unavailable", cgroup=cgroup, error=exc.strerror)
            return None
        return cls(f"{cgroup}/memory.usage_in_bytes", event_fd, usage_fd, threshold_bytes)

    def fileno(self) -> int:
        return self._event_fd

    def drain(self) -> None:
        try:
            os.eventfd_read(self._event_fd)
        except BlockingIOError:
            pass

    def close(self) -> None:
        os.close(self._event_fd)
        os.close(self._usage_fd)


class TrackedThreshold:
    """A threshold at `percent` of the limit in the guard's measure (usage less inactive
    file cache); `fileno()` (an epoll holding the current eventfd) stays the same when
    `retarget()` arms it again. The plain threshold at the same percent stays beside it:
    should the cache shrink between two retargets, that one still fires first."""

    def __init__(self, cgroup: str, percent: float, limit_bytes: int) -> None:
        self.path = f"{cgroup}/memory.usage_in_bytes (tracked)"
        self._cgroup = cgroup
        self._target_bytes = int(limit_bytes * percent / 100)
        self._limit_bytes = limit_bytes
        self._epoll = select.epoll()
        self._current: UsageThreshold | None = None

    @classmethod
    def open(cls, cgroup: str, percent: float) -> TrackedThreshold | None:
        try:
            limit = int((Path(cgroup) / "memory.limit_in_bytes").read_text())
        except (OSError, ValueError):
            return None  # not v1: PSI alone
        if limit >= 1 << 60:
            return None
        tracked = cls(cgroup, percent, limit)
        tracked.retarget()
        if tracked._current is None:
            tracked.close()
            return None
        return tracked

    @property
    def threshold_bytes(self) -> int | None:
        return None if self._current is None else self._current.threshold_bytes

    def retarget(self) -> None:
        """Arm again at the target plus today's inactive cache, if that moved by more than
        1 % of the limit (each arming costs an eventfd and a write to event_control), or if
        usage passed the threshold while the guard's measure is still short of the target
        (the cache grew meanwhile): else the next signal would be the way down."""
        base = Path(self._cgroup)
        wanted = self._target_bytes + cgroup_inactive_file(base)
        if wanted >= self._limit_bytes:
            wanted = self._target_bytes  # the cache alone would put it out of reach
        current = self._current
        if current is not None and \
                abs(current.threshold_bytes - wanted) < self._limit_bytes // 100 and \
                not current.threshold_bytes <= _usage_bytes(base) < wanted:
            return
        fresh = UsageThreshold.open(self._cgroup, wanted)
        if fresh is None:
            return
        self._epoll.register(fresh.fileno(), select.EPOLLIN)
        if current is not None:
            self._epoll.unregister(current.fileno())
            current.close()  # closing the eventfd removes the kernel's threshold
        self._current = fresh

    def fileno(self) -> int:
        return self._epoll.fileno()

    def drain(self) -> None:
        if self._current is not None:
            self._current.drain()

    def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        self._epoll.close()


def _usage_bytes(cgroup: Path) -> int:
    try:
        return int((cgroup / "memory.usage_in_bytes").read_text())
    except (OSError, ValueError):
        return 0
