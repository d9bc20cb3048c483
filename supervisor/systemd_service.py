"""The daemon as a systemd service: READY, STATUS, WATCHDOG, RELOADING and STOPPING.

READY=1 follows the daemon's transition to `running`, which comes after the configuration
is loaded, the state directory is locked and open, the scheduler is started and the
agents are scheduled. WATCHDOG=1 is sent from the loop itself and only while the daemon's
own liveness checks pass, so a wedged loop or a scheduler that was shut down stops the pings
and systemd restarts the daemon. Everything here is a no-op when NOTIFY_SOCKET is unset.
"""

from __future__ import annotations

import structlog

from .notify import NOTIFY_ENV_VARS, SystemdNotifier
from .states import AgentState, DaemonState

log = structlog.get_logger("watchkeeper.systemd")

# The states in which the scheduler must be live; while stopping it is shut down.
SCHEDULING_STATES = frozenset({DaemonState.RUNNING, DaemonState.RELOADING})


class SystemdService:
    name = "systemd"

    def __init__(self, notifier: SystemdNotifier | None = None) -> None:
        self.notifier = notifier or SystemdNotifier()
        self.daemon = None
        self._timer = None
        self.pings = 0
        self._withheld = False

    def start(self, daemon) -> None:
        self.daemon = daemon
        for var in (*NOTIFY_ENV_VARS, "JOURNAL_STREAM", "INVOCATION_ID"):
            daemon.pipeline.base_env.pop(var, None)  # agents must not speak for the unit
        if not self.notifier.enabled:
            return
        daemon.on_state.append(self._on_state)
        daemon.on_tick.append(lambda now: self.update_status())
        daemon.pipeline.on_run_started.append(lambda run: self.update_status())
        daemon.pipeline.on_run_finished.append(lambda run, record: self.update_status())
        interval = self.notifier.watchdog_interval_s()
        if interval:
            self._schedule_ping(interval)
            log.info("systemd_watchdog", interval_s=interval)

    def stop(self, daemon) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def update_status(self) -> None:
        """Send the status line if it changed (the notifier drops repeats)."""
        self.notifier.status(self.status_line())

    def _on_state(self) -> None:
        state = self.daemon.state
        if state == DaemonState.RUNNING:
            # Also the end of a reload, rejected or applied: systemd waits for READY=1.
            self.update_status()
            self.notifier.ready()
        elif state == DaemonState.RELOADING:
            self.notifier.reloading()
            self.update_status()
        elif state == DaemonState.STOPPING:
            self.notifier.stopping()
            self.update_status()

    def _schedule_ping(self, interval_s: float) -> None:
        # A loop timer, not a thread: a loop that stops turning stops the pings with it.
        self._timer = self.daemon.timers.call_later(interval_s, lambda: self._ping(interval_s))

    def _ping(self, interval_s: float) -> None:
        try:
            problem = self.liveness_problem()
            if problem is None:
                self.notifier.watchdog_ping()
                self.pings += 1
                if self._withheld:
                    log.info("watchdog_resumed")
                self._withheld = False
            else:
                log.error("watchdog_withheld", problem=problem,
                          hint="systemd will restart the daemon if this persists")
                self._withheld = True
        finally:
            self._schedule_ping(interval_s)

    def liveness_problem(self) -> str | None:
        """Why the daemon is not healthy, or None. The loop is alive by construction (this
        runs in it); the scheduler's timers live on that loop, but a scheduler shut down
        while the daemon still runs would never fire a timed job again."""
        if self.daemon.state in SCHEDULING_STATES and not self.daemon.scheduler.alive():
            return "the scheduler is shut down: no timed job will fire"
        return None

    def status_line(self) -> str:
        """One line for `systemctl status`: the daemon's state when not plain running, the
        agents, then each extension's summary."""
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
        if self.daemon.state != DaemonState.RUNNING:
            parts.insert(0, self.daemon.state.value)
        return "; ".join(parts)
