"""The `watchkeeper` command: the daemon, its control client, and the agents' CLI.

argparse (standard library) rather than click or typer: the same command runs inside
every bash agent, many times per run, so its start-up time and footprint matter more than
decorator sugar, and it adds no dependency.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
from pathlib import Path

from .errors import ConfigError, ControlError, DaemonNotRunning, WatchkeeperError

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_NOT_RUNNING, EXIT_DENIED = 0, 1, 2, 3, 4


def _socket_path(args) -> Path:
    """--socket, then WATCHKEEPER_SOCKET (set for agents), then the config's setting."""
    if getattr(args, "socket", None):
        return Path(args.socket)
    if os.environ.get("WATCHKEEPER_SOCKET"):
        return Path(os.environ["WATCHKEEPER_SOCKET"])
    import yaml

    from .configload import default_config_path

    path = Path(args.config) if args.config else default_config_path()
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise DaemonNotRunning(f"cannot find the control socket: {path}: {exc}") from None
    base = path.resolve().parent
    if data.get("control_socket"):
        return (base / os.path.expanduser(data["control_socket"])).resolve()
    state_dir = Path(os.path.expanduser(data.get("state_dir", "/var/lib/watchkeeper")))
    return (base / state_dir).resolve() / "control.sock"


def _client(args):
    from .control.client import ControlClient

    return ControlClient(_socket_path(args))


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))


# -- daemon -------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from .deferred import defer

    # Before anything imports them: see supervisor/deferred.py. structlog imports asyncio
    # and never uses it here; psutil is needed only when the daemon acts on processes.
    defer("asyncio")
    defer("psutil")
    from .configload import load_config
    from .daemon import Daemon
    from .features import install_features
    from .logs import configure

    config = load_config(args.config)
    configure(args.log_format or config.settings.log_format, config.settings.log_level)
    daemon = Daemon(config)
    install_features(daemon)
    return daemon.run()


def cmd_migrate(args) -> int:
    from .configload import load_config
    from .pg.db import Database
    from .pg.migrations import LATEST, migrate

    storage = load_config(args.config).settings.storage
    if storage.backend != "postgresql":
        print("watchkeeper migrate: storage.backend is sqlite; migrations are for "
              "`storage: {backend: postgresql, dsn: ...}`", file=sys.stderr)
        return EXIT_USAGE
    db = Database(storage, role="migrate")
    try:
        applied = migrate(db)
    except ConnectionError as exc:
        print(f"watchkeeper migrate: {exc}", file=sys.stderr)
        return EXIT_ERROR
    finally:
        db.close()
    done = ", ".join(map(str, applied)) if applied else "nothing to apply"
    print(f"schema {storage.schema}: at version {LATEST} ({done})")
    return EXIT_OK


def cmd_check_config(args) -> int:
    from .configload import load_config

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{len(exc.issues)} error(s)", file=sys.stderr)
        return EXIT_ERROR
    from .breaker_defaults import limits_below_schedule

    for file, line, field, problem in limits_below_schedule(config):  # warnings, not errors
        print(f"{file}:{line or 1}: {field}: warning: {problem}", file=sys.stderr)
    jobs = sum(len(a.jobs) for a in config.agents.values())
    print(f"{config.path}: OK ({len(config.agents)} agents, {jobs} jobs)")
    return EXIT_OK


# -- control ------------------------------------------------------------------------------------
def cmd_status(args) -> int:
    status = _client(args).call("status")
    if args.json:
        _print(status, True)
        return EXIT_OK
    d = status["daemon"]
    flags = " HALTED by the circuit breaker" if d.get("halted") else ""
    print(f"watchkeeper {d['version']} pid {d['pid']} {d['state']} up {d['uptime_s']:.0f}s"
          f"{flags}")
    cluster = status.get("cluster")
    rows = [("AGENT", "STATE", "RUN", "LAST", "EXIT", "NEXT") + (("HOST",) if cluster else ())]
    for a in status["agents"]:
        state = a["state"] + (" paused" if a["paused"] else "") + (
            f" degraded({','.join(a['degraded'])})" if a["degraded"] else "")
        rows.append((a["agent"], state, a["run_id"] or "-",
                     _when(a["last_ended"]) + (f" {a['last_outcome']}" if a["last_outcome"] else ""),
                     a["last_exit"] or "-", _when(a["next_run"]))
                    + ((_where(a),) if cluster else ()))
    if cluster:
        _print_hosts(cluster)
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)).rstrip())
    for name, ext in status.get("extensions", {}).items():
        summary = ext.get("summary") if isinstance(ext, dict) else None
        if summary:
            print(f"{name}: {summary}")
    return EXIT_OK


def _where(agent: dict) -> str:
    if agent.get("running_on"):
        return f"running on {agent['running_on']}"
    return f"last on {agent['last_host']}" if agent.get("last_host") else "-"


def _print_hosts(cluster: dict) -> None:
    if "error" in cluster:
        print(f"hosts: unknown, shared storage unreachable: {cluster['error']}")
        return
    for h in cluster["hosts"]:
        state = "stopped" if h["stopped"] else "up" if h["alive"] else "LOST"
        print(f"host {h['host']:<16} {state:<8} pid {h['pid']:<8} seen {_when(h['last_seen'])}"
              + ("  leader" if h["leader"] else "") + ("  (this)" if h["host"] == cluster["host"]
                                                       else ""))


def _config_reference() -> str:
    from .config_docs import render

    return render()


def _when(ts) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%H:%M:%S")


def cmd_simple(name: str):
    def run(args) -> int:
        params = {k: v for k, v in (("agent", getattr(args, "agent", None)),
                                    ("job", getattr(args, "job", None))) if v}
        result = _client(args).call(name, **params)
        if args.json:
            _print(result, True)
        else:
            print(f"{name}: " + ", ".join(f"{k}={v}" for k, v in (result or {}).items()))
        return EXIT_OK
    return run


def cmd_runs(args) -> int:
    runs = _client(args).call("runs", agent=args.agent, limit=args.limit)
    if args.json:
        _print(runs, True)
        return EXIT_OK
    for r in runs:
        ended = _when(r["ended"]) if r["ended"] else "running"
        exit_text = f"signal {r['signal']}" if r["signal"] else f"exit {r['exit_code']}"
        print(f"{r['run_id']}  {r['job']:<12} {_when(r['started'])} -> {ended:<8} "
              f"{r['outcome'] or '-':<12} {exit_text if r['ended'] else ''} "
              f"{r['stop_reason'] or ''} {r['stop_signal'] or ''}".rstrip())
    return EXIT_OK


def cmd_lock(args) -> int:
    client = _client(args)
    try:
        client.call(args.command, task=args.task)
    except ControlError as exc:
        print(f"watchkeeper {args.command}: {exc}", file=sys.stderr)
        return EXIT_DENIED if getattr(exc, "reply", {}).get("busy") else EXIT_ERROR
    return EXIT_OK


# -- parser -------------------------------------------------------------------------------------
class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, sized without importing shutil: argparse builds one for every
    argument it adds, and shutil (with bz2 and lzma) would stay in the daemon's memory."""

    def __init__(self, prog: str, **kwargs) -> None:
        kwargs.setdefault("width", _terminal_columns() - 2)
        super().__init__(prog, **kwargs)


def _terminal_columns() -> int:
    try:
        return int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        pass
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns
    except (AttributeError, ValueError, OSError):
        return 80


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose subcommands' parsers use _HelpFormatter too."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="watchkeeper", description=__doc__.splitlines()[0])
    parser.add_argument("--config", "-c", help="main config file (default: $WATCHKEEPER_CONFIG "
                        "or /etc/watchkeeper/watchkeeper.yaml)")
    parser.add_argument("--socket", help="control socket (default: from the config)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument("--log-format", choices=["auto", "console", "json", "journal"])
    p.set_defaults(func=cmd_run)
    sub.add_parser("check-config", help="validate the configuration, print every error"
                   ).set_defaults(func=cmd_check_config)
    sub.add_parser("migrate", help="apply the PostgreSQL schema migrations (storage backend)"
                   ).set_defaults(func=cmd_migrate)
    sub.add_parser("config-reference", help="print the configuration reference (Markdown)"
                   ).set_defaults(func=lambda a: (print(_config_reference()), EXIT_OK)[1])
    sub.add_parser("status", help="agents, their state, last and next run"
                   ).set_defaults(func=cmd_status)
    p = sub.add_parser("start-now", help="fire an agent's job now")
    p.add_argument("agent")
    p.add_argument("--job")
    p.set_defaults(func=cmd_simple("start-now"))
    for name in ("pause", "resume"):
        p = sub.add_parser(name, help=f"{name} scheduling of one agent or all")
        p.add_argument("agent", nargs="?")
        p.set_defaults(func=cmd_simple(name))
    sub.add_parser("reload", help="reload the configuration (like SIGHUP)"
                   ).set_defaults(func=cmd_simple("reload"))
    p = sub.add_parser("runs", help="recent run records")
    p.add_argument("agent", nargs="?")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_runs)
    sub.add_parser("locks", help="task locks and their owners").set_defaults(
        func=lambda a: (_print(_client(a).call("locks"), True), EXIT_OK)[1])
    for name in ("lock", "unlock"):
        p = sub.add_parser(name, help=f"{name} a task for the calling run (agents)")
        p.add_argument("task")
        p.set_defaults(func=cmd_lock)
    from .cli_agent import add_agent_commands

    add_agent_commands(sub)
    from .cli_ops import add_ops_commands

    add_ops_commands(sub)
    for subparser in sub.choices.values():
        # `--json` may also follow the command: `watchkeeper status --json`.
        if "--json" not in subparser._option_string_actions:
            subparser.add_argument("--json", action="store_true", default=argparse.SUPPRESS,
                                   help="machine-readable output")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except DaemonNotRunning as exc:
        print(f"watchkeeper: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        return EXIT_ERROR
    except ControlError as exc:
        print(f"watchkeeper {args.command}: {exc}", file=sys.stderr)
        for line in getattr(exc, "reply", {}).get("errors", []):
            print(f"  {line}", file=sys.stderr)
        return EXIT_ERROR
    except WatchkeeperError as exc:
        print(f"watchkeeper: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
