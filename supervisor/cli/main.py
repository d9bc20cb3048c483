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

from ..errors import (
    EXIT_BROKEN_PIPE,
    EXIT_BUSY,
    EXIT_ERROR,
    EXIT_NOT_RUNNING,
    EXIT_OK,
    EXIT_USAGE,
    ConfigError,
    ControlError,
    DaemonNotRunning,
    WatchkeeperError,
)


def _socket_path(args) -> Path:
    """The daemon's socket, found the one way every verb uses (supervisor/cli/discovery.py)."""
    from .discovery import find_socket

    return find_socket(getattr(args, "socket", None), getattr(args, "config", None))


def _config_path(args) -> Path:
    from .discovery import find_config

    return find_config(getattr(args, "config", None))


def _client(args):
    from ..control.client import ControlClient

    return ControlClient(_socket_path(args))


def _print(obj, as_json: bool) -> None:
    if as_json:
        print(json.dumps(obj, indent=2, default=str))


# -- daemon -------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    from .deferred import defer

    # Before anything imports them: see supervisor/cli/deferred.py. structlog imports asyncio
    # and never uses it here; psutil is needed only when the daemon acts on processes.
    defer("asyncio")
    defer("psutil")
    from ..config.load import load_config
    from ..daemon.features import features_for
    from ..daemon.loop import Daemon
    from ..log.setup import configure

    config = load_config(_config_path(args))
    configure(args.log_format or config.settings.log_format, config.settings.log_level,
              verbose=args.verbose)
    Daemon(config, features_for(config)).run()
    return EXIT_OK


def cmd_migrate(args) -> int:
    from ..config.load import load_config
    from ..pg.db import Database
    from ..pg.migrations import LATEST, migrate

    storage = load_config(_config_path(args)).settings.storage
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
    from ..config.load import load_config

    path = _config_path(args)
    try:
        config = load_config(path)
    except ConfigError as exc:
        if args.json:
            _print({"path": str(path), "ok": False, "agents": None, "jobs": None,
                    "errors": [str(i) for i in exc.issues]}, True)
            return EXIT_ERROR
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{len(exc.issues)} error(s)", file=sys.stderr)
        return EXIT_ERROR
    from ..breaker.defaults import limits_below_schedule

    for file, line, field, problem in limits_below_schedule(config):  # warnings, not errors
        print(f"{file}:{line or 1}: {field}: warning: {problem}", file=sys.stderr)
    jobs = sum(len(a.jobs) for a in config.agents.values())
    if args.json:
        _print({"path": str(config.path), "ok": True, "agents": len(config.agents),
                "jobs": jobs, "errors": []}, True)
        return EXIT_OK
    print(f"{config.path}: OK ({len(config.agents)} agents, {jobs} jobs)")
    return EXIT_OK


# -- control ------------------------------------------------------------------------------------
def cmd_status(args) -> int:
    status = _client(args).call("status")
    if args.json:
        _print(status, True)
        return EXIT_OK
    from .views import show_status

    prefix = "watchkeeper" + (f" --config {args.config}" if args.config else "")
    cluster = status.get("cluster")
    show_status(status, prefix, _where if cluster else None)
    if cluster:
        _print_hosts(cluster)
    for name, ext in status.get("extensions", {}).items():
        summary = ext.get("summary") if isinstance(ext, dict) else None
        if summary and name not in ("breaker", "health"):  # shown above
            print(f"{name}: {summary}")
    return EXIT_OK


def cmd_top(args) -> int:
    client = _client(args)
    if args.json:  # one snapshot of what the screen shows
        _print({"status": client.call("status"), "runs": client.call("runs", limit=500),
                "outputs": client.call("outputs", limit=20)}, True)
        return EXIT_OK
    if not sys.stdout.isatty():
        print("watchkeeper top: needs a terminal; `watchkeeper status` or `top --json` for a "
              "pipe", file=sys.stderr)
        return EXIT_USAGE
    from .top import main as top_main

    command = "watchkeeper" + (f" --config {args.config}" if args.config else "")
    return top_main(client, args.interval_s, args.hours, command)


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
    from ..config.docs import render

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
            from .views import show_control_result

            show_control_result(name, result)
        return EXIT_OK
    return run


def cmd_runs(args) -> int:
    runs = _client(args).call("runs", agent=args.agent, limit=args.limit)
    if args.json:
        _print(runs, True)
        return EXIT_OK
    from .views import show_runs

    show_runs(runs)
    return EXIT_OK


def cmd_locks(args) -> int:
    locks = _client(args).call("locks")
    if args.json:
        _print(locks, True)
        return EXIT_OK
    from .views import show_locks

    show_locks(locks)
    return EXIT_OK


def cmd_lock(args) -> int:
    client = _client(args)
    try:
        client.call(args.command, task=args.task)
    except ControlError as exc:
        print(f"watchkeeper {args.command}: {exc}", file=sys.stderr)
        return EXIT_BUSY if getattr(exc, "reply", {}).get("busy") else EXIT_ERROR
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
    parser.add_argument("--config", "-c", help="main config file (default: $WATCHKEEPER_CONFIG, "
                        "/etc/watchkeeper/watchkeeper.yaml if present, config/watchkeeper.yaml)")
    parser.add_argument("--socket", help="control socket (default: $WATCHKEEPER_SOCKET inside a "
                        "run, else from the config)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument("--log-format", choices=["auto", "console", "json", "journal"])
    p.add_argument("-v", "--verbose", action="store_true",
                   help="in a terminal, also show bookkeeping events (run_started, ...)")
    p.set_defaults(func=cmd_run)
    sub.add_parser("check-config", help="validate the configuration, print every error"
                   ).set_defaults(func=cmd_check_config)
    sub.add_parser("migrate", help="apply the PostgreSQL schema migrations (storage backend)"
                   ).set_defaults(func=cmd_migrate)
    sub.add_parser("config-reference", help="print the configuration reference (Markdown)"
                   ).set_defaults(func=lambda a: (print(_config_reference()), EXIT_OK)[1])
    sub.add_parser("status", help="agents, their state, last and next run"
                   ).set_defaults(func=cmd_status)
    p = sub.add_parser("top", help="the pipeline live, full-screen: agents, timelines, events")
    p.add_argument("--interval-s", type=float, default=2.0, help="refresh every N seconds")
    p.add_argument("--hours", type=float, default=3.0, help="the timeline's span")
    p.set_defaults(func=cmd_top)
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
    sub.add_parser("locks", help="task locks and their owners").set_defaults(func=cmd_locks)
    for name in ("lock", "unlock"):
        p = sub.add_parser(name, help=f"{name} a task for the calling run (agents)")
        p.add_argument("task")
        p.set_defaults(func=cmd_lock)
    from .agent import add_agent_commands

    add_agent_commands(sub)
    from .ops import add_ops_commands

    add_ops_commands(sub)
    for subparser in sub.choices.values():
        _accept_global_options(subparser)
    return parser


def _accept_global_options(parser: argparse.ArgumentParser) -> None:
    """`--config`, `--socket` and `--json` may also follow the verb (`watchkeeper status
    --json`), at any depth (`memory list NS --json`); SUPPRESS keeps a value given before
    the verb."""
    for flags, kwargs in ((("--config", "-c"), {"help": "main config file"}),
                          (("--socket",), {"help": "control socket"}),
                          (("--json",), {"action": "store_true",
                                         "help": "machine-readable output"})):
        if flags[0] not in parser._option_string_actions:
            parser.add_argument(*flags, default=argparse.SUPPRESS, **kwargs)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _accept_global_options(child)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # `watchkeeper status | head -1`: the reader left; say nothing more, and keep the
        # interpreter's final flush from raising again on the same closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
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
