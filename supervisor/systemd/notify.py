"""Tell systemd about the daemon's life: ready, status, reloading, stopping, watchdog pings.

A thin layer over the `sdnotify` package. Outside systemd (NOTIFY_SOCKET unset) every call is a
no-op, so the daemon runs the same from a terminal, a test, or a unit.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

import sdnotify
import structlog

log = structlog.get_logger("watchkeeper.notify")

# Variables systemd hands to the main process only. The runner strips them from agents'
# environments: an agent that inherits them could ping the watchdog on the daemon's behalf.
NOTIFY_ENV_VARS = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd expects in MONOTONIC_USEC=."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _watchdog_interval_s(environ: Mapping[str, str]) -> float | None:
    """Half the watchdog timeout systemd granted us, or None when there is no watchdog for us."""
    watchdog_pid = environ.get("WATCHDOG_PID")
    if watchdog_pid and watchdog_pid != str(os.getpid()):
        return None  # inherited from a parent: the watchdog belongs to someone else
    try:
        timeout_usec = int(environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if timeout_usec <= 0:
        return None
    return timeout_usec / 2 / 1_000_000


class SystemdNotifier:
    """sd_notify for the daemon's main loop; every method returns whether a message was sent."""

    __slots__ = ("_address", "_notifier", "_last_status", "_watchdog_interval_s")

    def __init__(self) -> None:
        self._address = os.environ.get("NOTIFY_SOCKET") or None
        self._notifier: sdnotify.SystemdNotifier | None = None
        self._last_status: str | None = None
        self._watchdog_interval_s = _watchdog_interval_s(os.environ)

    @property
    def enabled(self) -> bool:
        """True when systemd gave us a notify socket."""
        return self._address is not None

    def watchdog_interval_s(self) -> float | None:
        """How often to call watchdog_ping(): half of WATCHDOG_USEC, None without a watchdog."""
        return self._watchdog_interval_s

    def ready(self) -> bool:
        """Startup (or a reload) is complete; `systemctl start` returns once this arrives."""
        return self._send("READY=1")

    def status(self, text: str) -> bool:
        """Show `text` as the unit's status line; a repeat of the last text is not sent."""
        if text == self._last_status:
            return False
        sent = self._send(f"STATUS={text}")
        if sent:
            self._last_status = text
        return sent

    def reloading(self) -> bool:
        """A reload began; systemd waits for ready() again (MONOTONIC_USEC dates the request)."""
        return self._send(f"RELOADING=1\nMONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> bool:
        """Shutdown began, so systemd shows `deactivating` rather than a hung service."""
        return self._send("STOPPING=1")

    def watchdog_ping(self) -> bool:
        """Reset the watchdog timer; call every watchdog_interval_s()."""
        return self._send("WATCHDOG=1")

    def extend_timeout(self, timeout_s: float) -> bool:
        """Ask for `timeout_s` more before systemd gives up on the current start or stop."""
        return self._send(f"EXTEND_TIMEOUT_USEC={int(timeout_s * 1_000_000)}")

    def _send(self, message: str) -> bool:
        if self._address is None:
            return False
        try:
            self._connected().notify(message)
            return True
        except OSError:
            # The socket is connected once; after `systemctl daemon-reexec` (an upgrade of
            # systemd) the path names a new socket and the old connection is refused. Without
            # one reconnect the watchdog would kill a healthy daemon.
            self._notifier = None
        try:
            self._connected().notify(message)
            return True
        except OSError as exc:
            self._notifier = None
            log.warning("sd_notify_failed", address=self._address, message=message,
                        error=str(exc))
            return False

    def _connected(self) -> sdnotify.SystemdNotifier:
        if self._notifier is None:
            # debug=True: let OSError reach us instead of sdnotify swallowing it.
            self._notifier = sdnotify.SystemdNotifier(debug=True)
        return self._notifier
