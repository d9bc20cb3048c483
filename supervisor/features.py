"""The features plugged into the daemon's loop, in the order they start.

An extension is an object with `name`, `start(daemon)` and `stop(daemon)`, and optionally
`reload(daemon)` and `status() -> dict`. It hooks itself into the loop through
daemon.on_tick, daemon.after_batch, daemon.on_state and the pipeline's hooks, and adds
control commands to the tables in control/handlers.py. A storage backend may also set
daemon.open_memory (the steward's store), daemon.command_overrides (commands it serves
itself) and daemon.status_extenders (additions to the status snapshot).
"""

from __future__ import annotations

import os

# Set to 1 to arm the control commands that harm the daemon on purpose (tests only).
DEBUG_COMMANDS_ENV = "WATCHKEEPER_DEBUG_COMMANDS"


def install_features(daemon) -> None:
    """Attach every feature to a daemon that has not started yet."""
    from .health import Health
    from .metrics import Metrics
    from .output_gate import OutputGate
    from .steward import Steward
    from .systemd_service import SystemdService

    # The output gate first: it creates the alerter the others send through. Shared storage
    # next: it wraps the gate's breaker and must be ready before the steward opens its store.
    shared = []
    if daemon.config.settings.storage.backend == "postgresql":
        from .pg.cluster import Cluster

        shared.append(Cluster())
    daemon.extensions.extend([OutputGate(), *shared, Steward(), Health(), Metrics(),
                              SystemdService()])
    from .status_details import StatusDetails

    daemon.extensions.append(StatusDetails())  # last: it reads what the others set up
    if os.environ.get(DEBUG_COMMANDS_ENV) == "1":
        from .debug_commands import install_debug_commands

        install_debug_commands()
