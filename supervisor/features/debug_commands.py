"""Control commands that harm the daemon on purpose, for tests of its liveness checks.

Served only when the daemon starts with WATCHKEEPER_DEBUG_COMMANDS=1 (daemon/features.py),
and then only for admins. `debug-block` holds the loop, as a wedged callback would, so a
test can watch the systemd watchdog pings stop and resume; `debug-stop-scheduler` shuts
the scheduler down (its timers disarmed) while the daemon runs on, as a failure would.
"""

from __future__ import annotations

import time

import structlog

from ..control.protocol import error, ok
from ..control.table import CommandTable
from ..core.feature import Feature

log = structlog.get_logger("watchkeeper.debug")

MAX_BLOCK_S = 60.0


class DebugCommands(Feature):
    """Serves the debug commands to admins (a feature the daemon has only when armed, so
    that importing this module never arms them)."""

    name = "debug"

    def commands(self) -> CommandTable:
        table = CommandTable()
        table.admin["debug-block"] = _block
        table.admin["debug-stop-scheduler"] = _stop_scheduler
        log.warning("debug_commands_enabled", commands=sorted(table.admin),
                    hint="unset WATCHKEEPER_DEBUG_COMMANDS outside tests")
        return table


def _block(h, conn, req):
    seconds = req.args.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) \
            or not 0 < seconds <= MAX_BLOCK_S:
        return error(req.id, f"debug-block needs seconds: a number from 0 to {MAX_BLOCK_S:g}")
    log.warning("debug_block_started", seconds=seconds)
    time.sleep(seconds)  # the point: nothing else in the loop runs meanwhile
    log.warning("debug_block_ended", seconds=seconds)
    return ok(req.id, {"blocked_s": seconds})


def _stop_scheduler(h, conn, req):
    h.daemon.scheduler.shutdown()
    log.warning("debug_scheduler_stopped")
    return ok(req.id, {"scheduler_alive": h.daemon.scheduler.alive()})
