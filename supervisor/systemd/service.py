"""The daemon as a systemd service: READY, STATUS, WATCHDOG, RELOADING and STOPPING.

READY=1 follows the daemon's transition to `running`, which comes after the configuration
is loaded, the state directory is locked and open, the scheduler is started and the
agents are scheduled. WATCHDOG=1 is sent from the loop itself and only while the daemon's
own liveness checks pass, so a wedged loop or a scheduler that was shut down stops the pings
and systemd restarts the daemon. Everything here is a no-op when NOTIFY_SOCKET is unset.
"""

from __future__ import annotations

import structlog

from ..core.feature import Feature, Services
from ..core.states import AgentState, DaemonState
from .notify import NOTIFY_ENV_VARS, SystemdNotifier

log = structlog.get_logger("watchkeeper.systemd")

# The states in which the scheduler must be live; while stopping it is shut down.
SCHEDULING_STATES = frozenset({DaemonState.RUNNING, DaemonState.RELOADING})


class SystemdService(Feature):
    name = "systemd"

    def __init__(self, notifier: SystemdNotifier | None = None) -> None:
        self.notifier = notifier or SystemdNotifier()
        self.services: Services | None = None
        self._timer = None
        self.pings = 0
        self._withheld = False

    def start(self, services: Services) -> None:
        self.services = services
        if not self.notifier.enabled:
            return
        interval = self.notifier.watchdog_interval_s()
        if interval:
            self._schedule_ping(interval)
            log.info("systemd_watchdog", interval_s=interval)

    def adjust_run_env(self, env: dict[str, str]) -> None:
        for var in (*NOTIFY_ENV_VARS, "JOURNAL_STREAM", "INVOCATION_ID"):
            env.pop(var, None)  # agents must not speak for the unit

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def tick(self, now_mono: float) -> None:
        self.update_status()

    def run_started(self, run) -> None:
        self.update_status()

    def run_finished(self, run, record) -> None:
        self.update_status()

    def update_status(self) -> None:
        """Send the status line if it changed (the notifier drops repeats)."""
        if not self.notifier.enabled:
            return
        self.notifier.status(self.status_line())

    def state_changed(self, state: DaemonState) -> None:
        if not self.notifier.enabled:
            return
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
        self._timer = self.services.timers.call_later(interval_s, lambda: self._ping(interval_s))

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
        if self.services.daemon_state in SCHEDULING_STATES and \
                not self.services.scheduler.alive():
            return "the scheduler is shut down: no timed job will fire"
        return None

    def status_line(self) -> str:
        """One line for `systemctl status`: the daemon's state when not plain running, the
        agents, then each feature's summary."""
        agents = self.services.pipeline.agents.values()
        running = sum(1 for a in agents if a.state == AgentState.RUNNING)
        failed = sum(1 for a in agents if a.state == AgentState.FAILED)
        degraded = sum(1 for a in agents if a.degraded)
        parts = [f"{len(agents)} agents: {running} running, {failed} failed, "
                 f"{degraded} degraded"]
        for feature in self.services.features:
            summary = (feature.status() or {}).get("summary")
            if summary:
                parts.append(summary)
        if self.services.pipeline.halted:
            parts.insert(0, "HALTED")
        state = self.services.daemon_state
        if state != DaemonState.RUNNING:
            parts.insert(0, state.value)
        return "; ".join(parts)
