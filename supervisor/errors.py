"""One rooted error hierarchy: callers catch WatchkeeperError, or a precise subclass."""

from __future__ import annotations


class WatchkeeperError(Exception):
    """Base of every error watchkeeper raises on purpose."""


class ConfigError(WatchkeeperError):
    """One or more problems in the YAML configuration; `issues` holds every one found."""

    def __init__(self, issues: list) -> None:
        self.issues = list(issues)
        super().__init__("\n".join(str(i) for i in self.issues))


class AlreadyRunning(WatchkeeperError):
    """Another daemon already owns this state directory."""


class DaemonNotRunning(WatchkeeperError):
    """The control socket is absent or nobody answers on it."""


class ControlError(WatchkeeperError):
    """The daemon answered a control request with an error."""


class LockBusy(WatchkeeperError):
    """A task lock is held by someone else."""
