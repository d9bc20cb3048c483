"""Memory usage thresholds of a cgroup v1, signalled by the kernel through an eventfd.

When the guard measures a cgroup (`memory_guard.scope_cgroup`, say the slice whose limit
the daemon will hit), a climb that does not stall anybody yet is invisible to PSI. cgroup
v1 can say so itself: "<eventfd> <fd of memory.usage_in_bytes> <bytes>" written to
cgroup.event_control makes the kernel signal the eventfd each time the usage crosses
<bytes>, up or down. cgroup v2 has no such notification (only PSI, see psi.py).
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog

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
