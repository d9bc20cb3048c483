"""One rooted error hierarchy: callers catch WatchkeeperError, or a precise subclass."""

from __future__ import annotations

# The `watchkeeper` command's exit codes, one table for every verb (docs/cli.md "Exit codes").
EXIT_OK = 0
EXIT_ERROR = 1         # the daemon refused, a broken configuration, an agent verb outside a run
EXIT_USAGE = 2         # unknown verb or option, a missing argument
EXIT_NOT_RUNNING = 3   # nothing answers on the socket, or no configuration found
EXIT_BUSY = 4          # `lock`: the task is locked by another run
EXIT_DENIED = 5        # `emit`, `usage`: the output gate or a budget said no
EXIT_CONFLICT = 6      # `memory put/...`: --expect-version did not match
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer killed by one


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
