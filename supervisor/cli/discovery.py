"""Where the daemon is: the one answer every `watchkeeper` verb uses.

The order, first match wins:

1. `--socket PATH`
2. `--config PATH` (its `control_socket`, else `state_dir/control.sock`)
3. `WATCHKEEPER_SOCKET` (set in every run's environment)
4. `WATCHKEEPER_CONFIG`
5. `/etc/watchkeeper/watchkeeper.yaml`, when it exists (an `install-systemd` host)
6. `config/watchkeeper.yaml` in the current directory (a source checkout: the demo)

Agents import this on every call of the agent verbs, so it imports only os and pathlib;
YAML is read (and PyYAML imported) only when no socket was named.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import DaemonNotRunning

SOCKET_ENV = "WATCHKEEPER_SOCKET"
CONFIG_ENV = "WATCHKEEPER_CONFIG"
INSTALLED_CONFIG = Path("/etc/watchkeeper/watchkeeper.yaml")
LOCAL_CONFIG = Path("config/watchkeeper.yaml")
DEFAULT_STATE_DIR = "/var/lib/watchkeeper"  # Settings.state_dir's default


class DaemonNotFound(DaemonNotRunning):
    """No configuration or socket names the daemon; the message lists what was tried."""


def find_config(config: str | os.PathLike | None = None) -> Path:
    """The main configuration file: `config`, $WATCHKEEPER_CONFIG, the installed file,
    then the local one; raise DaemonNotFound naming every place tried."""
    if config:
        return Path(config)
    if os.environ.get(CONFIG_ENV):
        return Path(os.environ[CONFIG_ENV])
    for candidate in (INSTALLED_CONFIG, LOCAL_CONFIG):
        if candidate.is_file():
            return candidate
    raise DaemonNotFound(
        f"no configuration found: tried --config (not given), ${CONFIG_ENV} (not set), "
        f"{INSTALLED_CONFIG} (missing), {Path.cwd() / LOCAL_CONFIG} (missing); "
        "pass --config PATH or --socket PATH")


def find_socket(socket: str | os.PathLike | None = None,
                config: str | os.PathLike | None = None) -> Path:
    """The control socket, by the order in this module's docstring."""
    if socket:
        return Path(socket)
    if not config and os.environ.get(SOCKET_ENV):
        return Path(os.environ[SOCKET_ENV])
    return socket_of_config(find_config(config))


def socket_of_config(path: Path) -> Path:
    """The socket a configuration file names, with its relative paths taken from the
    file's directory as the daemon takes them."""
    import yaml  # only here: agents inside a run never get this far

    from ..config.env import EnvReferenceError, expand_string

    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise DaemonNotFound(f"cannot read the configuration {path}: {reason}; pass "
                             "--config PATH or --socket PATH") from None
    data = data if isinstance(data, dict) else {}
    try:  # the daemon expands ${VAR} references in the main file (config/env.py); so must we
        data = {k: expand_string(v, os.environ) if isinstance(v, str) else v
                for k, v in data.items() if k in ("control_socket", "state_dir")}
    except EnvReferenceError as exc:
        raise DaemonNotFound(f"{path}: {exc}") from None
    base = path.resolve().parent
    if isinstance(data.get("control_socket"), str):
        return _relative_to(base, data["control_socket"])
    state_dir = data.get("state_dir")
    return _relative_to(base, state_dir if isinstance(state_dir, str) else DEFAULT_STATE_DIR
                        ) / "control.sock"


def _relative_to(base: Path, value: str) -> Path:
    path = Path(os.path.expanduser(value))
    return path if path.is_absolute() else (base / path).resolve()
