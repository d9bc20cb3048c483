"""The features plugged into the daemon, in the order they start (and the reverse they stop).

Each is a Feature (core/feature.py): it overrides the hooks it needs and reaches the core and the
other features only through the Services it is started with. The order is the dependencies.
"""

from __future__ import annotations

import os

from ..core.feature import Feature

# Set to 1 to arm the control commands that harm the daemon on purpose (tests only).
DEBUG_COMMANDS_ENV = "WATCHKEEPER_DEBUG_COMMANDS"


def features_for(config) -> list[Feature]:
    """Every feature of a daemon with this configuration, in start order."""
    from ..features.health import Health
    from ..features.metrics import Metrics
    from ..features.output_gate import OutputGate
    from ..features.status_details import StatusDetails
    from ..features.steward import Steward
    from ..systemd.service import SystemdService

    features: list[Feature] = [OutputGate()]  # first: its alerter is what the others send through
    if config.settings.storage.backend == "postgresql":
        from ..pg.cluster import Cluster

        features.append(Cluster())  # wraps the gate's breaker; opens the steward's store
    features += [
        Steward(),         # after the cluster: it asks the features for a memory store
        Health(),          # its alerts go through the gate's alerter
        Metrics(),         # reads the gate and the steward
        SystemdService(),  # its status line sums up every feature before it
        StatusDetails(),   # last: its status additions read what the others set up
    ]
    if os.environ.get(DEBUG_COMMANDS_ENV) == "1":
        from ..features.debug_commands import DebugCommands

        features.append(DebugCommands())
    return features
