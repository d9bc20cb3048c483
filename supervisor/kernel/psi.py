"""Memory pressure from the kernel: a PSI trigger the loop can wait on.

Linux >= 4.20 reports in /proc/pressure/memory (and in a v2 cgroup's memory.pressure) how
long tasks stalled waiting for memory. A process writes a trigger, "some <stall us>
<window us>", and the kernel wakes it when tasks stalled that long within the window: the
memory guard can then sleep instead of sampling /proc/meminfo, and still hear at once when
memory gets short.

The kernel signals a trigger with POLLPRI, which `selectors` cannot ask for (it maps
EVENT_READ to EPOLLIN only). So each trigger sits alone in an epoll object of its own,
with EPOLLPRI, and the daemon's selector waits for that epoll to become readable: a wakeup
means the trigger fired (the kernel's readiness check consumes the event, so the inner
epoll may report nothing by the time it is asked).
"""

from __future__ import annotations

import os
import select

import structlog

log = structlog.get_logger("watchkeeper.psi")

SYSTEM_MEMORY_PRESSURE = "/proc/pressure/memory"
# Without CAP_SYS_RESOURCE the kernel accepts only windows that are multiples of 2 s.
WINDOW_US = 2_000_000


class PressureTrigger:
    """One PSI trigger; `fileno()` becomes readable each time the kernel fires it."""

    def __init__(self, path: str, trigger_fd: int, epoll: select.epoll, stall_ms: float) -> None:
        self.path = path
        self.stall_ms = stall_ms
        self._fd = trigger_fd
        self._epoll = epoll
        self.fired = 0

    @classmethod
    def open(cls, path: str = SYSTEM_MEMORY_PRESSURE,
             stall_ms: float = 100.0) -> PressureTrigger | None:
        """The trigger "some <stall_ms> per 2 s" on `path`, or None (logged) where the
        kernel has no PSI or refuses the trigger."""
        stall_us = int(stall_ms * 1000)
        if not 0 < stall_us <= WINDOW_US:
            raise ValueError(f"PSI stall must be in (0, {WINDOW_US // 1000}] ms, got {stall_ms}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            log.info("psi_unavailable", path=path, error=exc.strerror)
            return None
        try:
            # The kernel parses the trigger as a C string: the NUL is required.
            os.write(fd, f"some {stall_us} {WINDOW_US}\0".encode())
            epoll = select.epoll()
            epoll.register(fd, select.EPOLLPRI)
        except OSError as exc:
            os.close(fd)
            log.info("psi_unavailable", path=path, error=exc.strerror)
            return None
        return cls(path, fd, epoll, stall_ms)

    def fileno(self) -> int:
        return self._epoll.fileno()

    def drain(self) -> None:
        """After a wakeup: clear what the epoll may still hold, count the firing."""
        self.fired += 1
        try:
            self._epoll.poll(0)
        except OSError:
            pass

    def close(self) -> None:
        self._epoll.close()
        os.close(self._fd)
