"""The daemon as a systemd service: READY, STATUS, WATCHDOG, RELOADING and STOPPING.

WATCHDOG=1 is sent from the loop itself and only while the daemon's own liveness checks
pass, so a wedged loop or a dead scheduler thread stops the pings and systemd restarts
the daemon. Everything here is a no-op when NOTIFY_SOCKET is unset.
"""

from __future__ import annotations

import structlog

from .notify import NOTIFY_ENV_VARS, SystemdNotifier
from .states import AgentState, DaemonState

log = structlog.get_logger("watchkeeper.systemd")


class SystemdService:
    name = "systemd"

    def __init__(self, notifier: SystemdNotifier | None = None) -> None:
        self.notifier = notifier or SystemdNotifier()
        self.daemon = None
        self._timer = None
        self.pings = 0

    def start(self, daemon) -> None:
        self.daemon = daemon
        for var in (*NOTIFY_ENV_VARS, "JOURNAL_STREAM", "INVOCATION_ID"):
            daemon.pipeline.base_env.pop(var, None)  # agents must not speak for the unit
        daemon.on_state.append(self._on_state)
        daemon.on_tick.append(lambda now: self.notifier.status(self.status_line()))
        interval = self.notifier.watchdog_interval_s()
        if interval:
            self._schedule_ping(interval)
            log.info("systemd_watchdog", interval_s=interval)

    def stop(self, daemon) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _on_state(self) -> None:
        state = self.daemon.state
        if state == DaemonState.RUNNING:
            self.notifier.status(self.status_line())
            self.notifier.ready()
        elif state == DaemonState.RELOADING:
            self.notifier.reloading()
        elif state == DaemonState.STOPPING:
            self.notifier.stopping()
            self.notifier.status("stopping: agents are being stopped")

    def _schedule_ping(self, interval_s: float) -> None:
        def ping() -> None:
            problem = self.liveness_problem()
            if problem is None:
                self.notifier.watchdog_ping()
                self.pings += 1
            else:
                log.error("watchdog_withheld", problem=problem,
                          hint="systemd will restart the daemon if this persists")
            self._schedule_ping(interval_s)
        self._timer = self.daemon.timers.call_later(interval_s, ping)

    def liveness_problem(self) -> str | None:
        """Why the daemon is not healthy, or None. The loop is alive by construction (this
        runs in it); the scheduler runs in a thread of its own that could die unnoticed."""
        scheduler = self.daemon.scheduler
        if self.daemon.state in (DaemonState.RUNNING, DaemonState.RELOADING) and \
                not scheduler.alive():
            return "the scheduler thread is not running"
        return None

    def status_line(self) -> str:
        agents = self.daemon.pipeline.agents.values()
        running = sum(1 for a in agents if a.state == AgentState.RUNNING)
        failed = sum(1 for a in agents if a.state == AgentState.FAILED)
        degraded = sum(1 for a in agents if a.degraded)
        parts = [f"{len(agents)} agents: {running} running, {failed} failed, "
                 f"{degraded} degraded"]
        for ext in self.daemon.extensions:
            summary = ext.status().get("summary") if hasattr(ext, "status") else None
            if summary:
                parts.append(summary)
        if self.daemon.pipeline.halted:
            parts.insert(0, "HALTED")
        return "; ".join(parts)
