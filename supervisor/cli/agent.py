"""`watchkeeper` subcommands for agents in any language, and for the steward and breaker.

Exit codes an agent script can rely on: 0 done; 1 error (also: called outside a run);
3 daemon not running; 4 busy (task locked by someone else); 5 denied (the output gate or a
budget said no: stop); 6 conflict (memory expect_version did not match).

Every bash agent runs these verbs several times per run, so `run_agent_verb` serves them
without argparse and without the daemon's modules (supervisor/entry.py calls it first):
this module imports only sys, wire.py (JSON without re) and the SDK, which imports only
_socket and os; the json package only for output meant for people.
"""

from __future__ import annotations

import os
import sys

from .. import wire
from ..errors import (
    EXIT_BUSY,
    EXIT_CONFLICT,
    EXIT_DENIED,
    EXIT_ERROR,
    EXIT_NOT_RUNNING,
    ControlError,
    DaemonNotRunning,
    LockBusy,
    WatchkeeperError,
)


def _json_arg(text: str):
    try:
        return wire.loads(text)
    except ValueError:
        return text  # a bare word is stored as a string


def _json():
    """The json package, for output meant for people (indent=2) and export files: it
    imports re, which the agents' frequent verbs do without (wire.py)."""
    import json

    return json


def _sdk(args):
    from ..sdk import Agent

    socket = getattr(args, "socket", None)
    if not socket and (getattr(args, "config", None) or "WATCHKEEPER_SOCKET" not in os.environ):
        from .discovery import find_socket  # outside a run: the one discovery order

        socket = str(find_socket(None, getattr(args, "config", None)))
    return Agent(socket)


def cmd_heartbeat(args) -> int:
    _sdk(args).heartbeat()
    return 0


def cmd_emit(args) -> int:
    from ..sdk import OutputDenied

    content = None
    if args.content_file:
        content = sys.stdin.read() if args.content_file == "-" else open(args.content_file).read()
    try:
        _sdk(args).emit(args.kind, args.summary, content)
    except OutputDenied as exc:
        print(f"watchkeeper emit: {exc}", file=sys.stderr)
        return EXIT_DENIED
    return 0


def cmd_usage(args) -> int:
    from ..sdk import OutputDenied

    try:
        _sdk(args).report_usage(args.tokens, args.cost, args.model or "")
    except OutputDenied as exc:
        print(f"watchkeeper usage: {exc}", file=sys.stderr)
        return EXIT_DENIED
    return 0


def cmd_memory(args) -> int:
    from ..sdk import MemoryConflict

    agent = _sdk(args)
    op = args.op
    if op == "get":
        value = agent.memory.entry(args.namespace, args.key)
        print(wire.dumps(value["value"] if value else None, ensure_ascii=True))
        return 0 if value else 1
    if op in ("list", "history"):
        from . import views as cli_views

        if op == "list":
            result = agent.memory.list(args.namespace, args.prefix or "")
        else:
            filters = {k: v for k, v in (("namespace", args.namespace), ("key", args.key),
                                         ("agent", args.agent), ("run_id", args.run_id)) if v}
            result = agent.memory.history(limit=args.limit, **filters)
        if args.json:
            cli_views.print_json(result)
        else:
            (cli_views.show_memory_list if op == "list" else cli_views.show_memory_history)(result)
        return 0
    if op == "revert":
        target = {k: v for k, v in (("seq", args.seq), ("agent", args.agent),
                                    ("run_id", args.run_id)) if v is not None}
        print(_json().dumps(agent.call("memory-revert", force=args.force, **target), indent=2))
        return 0
    if op == "export":
        from .backup_client import export_document

        _json().dump(export_document(agent.call), sys.stdout, separators=(",", ":"),
                  ensure_ascii=False)
        print()
        return 0
    if op == "import":
        from .backup_client import BadExportFile, import_document, read_export_file

        try:
            doc = read_export_file(args.file)
        except BadExportFile as exc:
            print(f"watchkeeper memory import: {exc}", file=sys.stderr)
            return 2
        print(_json().dumps(import_document(agent.call, doc)))
        return 0
    opts = {"expect_version": args.expect_version, "idempotency_key": args.idempotency_key}
    try:
        if op == "delete":
            version = agent.memory.delete(args.namespace, args.key, **opts)
        else:
            write = getattr(agent.memory, op)
            version = write(args.namespace, args.key, _json_arg(args.value), **opts)
    except MemoryConflict as exc:
        print(f"watchkeeper memory {op}: {exc} (current version {exc.current_version})",
              file=sys.stderr)
        return EXIT_CONFLICT
    print(version)
    return 0


def cmd_search(args) -> int:
    if args.explain:
        return _search_explained(args)
    result = _sdk(args).search(args.query, k=args.k, token_budget=args.budget,
                               namespaces=args.namespace or None, speakers=args.speaker)
    if args.json:
        print(_json().dumps({"hits": result.hits, "tokens": result.tokens}, indent=2))
    else:
        print(result.text)
    return 0


def _search_explained(args) -> int:
    """The hits with why each ranked, after how search ranks (lexical or hybrid, and why)."""
    request = {"query": args.query, "explain": True,
               **({"k": args.k} if args.k is not None else {}),
               **({"token_budget": args.budget} if args.budget is not None else {}),
               **({"namespaces": args.namespace} if args.namespace else {}),
               **({"speakers": args.speaker} if args.speaker else {})}
    result = _sdk(args).call("search", **request)
    if args.json:
        print(_json().dumps({k: result[k] for k in ("explain", "hits", "tokens")}, indent=2))
        return 0
    for name, value in result["explain"].items():
        print(f"{name}: {value}")
    print(f"{len(result['hits'])} hits, {result['tokens']} tokens, {result['elapsed_ms']} ms")
    for place, hit in enumerate(result["hits"], 1):
        why = [f"lexical #{hit['lexical_rank']}" if hit.get("lexical_rank") else "",
               f"semantic #{hit['semantic_rank']}" if hit.get("semantic_rank") else "",
               f"beside {hit['neighbour_of']}" if hit.get("neighbour_of") else ""]
        print(f"{place:3d}. {hit['namespace']}/{hit['key']}  score {hit['score']:.4f}  "
              f"{hit['tokens']} tokens  ({', '.join(w for w in why if w)})")
def cmd_task_lock(args) -> int:
    """`lock TASK` / `unlock TASK` for the calling run; exit 4 when the task is busy."""
    from ..sdk import DaemonLock

    agent = _sdk(args)
    try:
        if args.command == "lock":
            agent.lock(args.task)
        else:
            DaemonLock(agent, args.task).release()
    except LockBusy as exc:
        print(f"watchkeeper lock: {exc}", file=sys.stderr)
        return EXIT_BUSY
    return 0


def cmd_upstream_ok(args) -> int:
    agent = _sdk(args)
    agent.require_run("upstream-ok")
    return 0 if agent.upstream_ok(args.name) else 1


def cmd_outputs(args) -> int:
    from . import views as cli_views

    outputs = _sdk(args).call("outputs", **({"agent": args.agent} if args.agent else {}),
                              limit=args.limit)
    if args.json:
        cli_views.print_json(outputs)
    else:
        cli_views.show_outputs(outputs)
    return 0


def cmd_breaker(args) -> int:
    agent = _sdk(args)
    if args.action == "status":
        status = agent.call("breaker-status")
        if args.json:
            print(_json().dumps(status, indent=2))
        else:
            print(f"breaker {status['state']} (trips: {status['trips_total']})")
            trip = status.get("last_trip")
            if trip:
                print(f"last trip: {trip['agent']}: {trip['limit']} ({trip['rule']}), "
                      f"count {trip['count']}")
        return 0
    if not args.reason:
        print("watchkeeper breaker reset: --reason is required (it is logged)", file=sys.stderr)
        return 2
    try:
        result = agent.call("breaker-reset", reason=args.reason)
    except ControlError as exc:
        print(f"watchkeeper breaker reset: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(_json().dumps(result, indent=2))
    else:
        print("breaker reset" + ("" if result["was_open"] else " (it was not open)"))
    return 0


def add_agent_commands(sub) -> None:
    sub.add_parser("heartbeat", help="(agents) record that this agent is alive"
                   ).set_defaults(func=cmd_heartbeat)
    p = sub.add_parser("emit", help="(agents) announce an output; exit 5 when denied")
    p.add_argument("kind")
    p.add_argument("summary")
    p.add_argument("--content-file", help="file with the full content ('-' for stdin)")
    p.set_defaults(func=cmd_emit)
    p = sub.add_parser("usage", help="(agents) report tokens and cost; exit 5 when over budget")
    p.add_argument("--tokens", type=int, required=True)
    p.add_argument("--cost", type=float, default=0.0)
    p.add_argument("--model")
    p.set_defaults(func=cmd_usage)

    p = sub.add_parser("memory", help="shared memory through the steward")
    ops = p.add_subparsers(dest="op", required=True, metavar="OP")
    for op in ("put", "merge", "append"):
        q = ops.add_parser(op, help=f"{op} a JSON value")
        q.add_argument("namespace")
        q.add_argument("key")
        q.add_argument("value", help="JSON (a bare word is a string)")
        q.add_argument("--expect-version", type=int)
        q.add_argument("--idempotency-key")
    q = ops.add_parser("delete")
    q.add_argument("namespace")
    q.add_argument("key")
    q.add_argument("--expect-version", type=int)
    q.add_argument("--idempotency-key")
    q = ops.add_parser("get")
    q.add_argument("namespace")
    q.add_argument("key")
    q = ops.add_parser("list")
    q.add_argument("namespace")
    q.add_argument("prefix", nargs="?")
    q = ops.add_parser("history")
    for flag in ("--namespace", "--key", "--agent", "--run-id"):
        q.add_argument(flag)
    q.add_argument("--limit", type=int, default=100)
    q = ops.add_parser("revert", help="undo writes: of one history entry, a run, or an agent")
    q.add_argument("--seq", type=int)
    q.add_argument("--agent")
    q.add_argument("--run-id")
    q.add_argument("--force", action="store_true", help="even keys changed since by others")
    ops.add_parser("export", help="every entry as JSON on stdout")
    q = ops.add_parser("import", help="load an export document")
    q.add_argument("file")
    p.set_defaults(func=cmd_memory)

    p = sub.add_parser("search", help="memory entries relevant to a query (lazy context)")
    p.add_argument("query")
    p.add_argument("--k", type=int, help="at most this many entries (default: fill the budget, "
                                          "or 8 without one)")
    p.add_argument("--budget", type=int, help="token budget")
    p.add_argument("--namespace", action="append", help="restrict to a namespace (repeatable)")
    p.add_argument("--speaker", action="append",
                   help="only entries whose value's `speaker` is this (repeatable)")
    p.add_argument("--explain", action="store_true",
                   help="say how search ranks (hybrid or lexical only) and why each hit ranked")
    p.set_defaults(func=cmd_search)
    p = sub.add_parser("upstream-ok", help="(agents) exit 0 if the upstream was healthy at start")
    p.add_argument("name")
    p.set_defaults(func=cmd_upstream_ok)
    p = sub.add_parser("outputs", help="recent outputs (all agents or one)")
    p.add_argument("agent", nargs="?")
    p.add_argument("--limit", type=int, default=20)
    p.set_defaults(func=cmd_outputs)
    p = sub.add_parser("breaker", help="circuit breaker status, or reset it")
    p.add_argument("action", choices=["status", "reset"])
    p.add_argument("--reason")
    p.set_defaults(func=cmd_breaker)


# -- the fast path --------------------------------------------------------------------------------
# verb -> (handler, positional names, {option: (dest, type)}). Only well-formed calls are
# served here; anything else (--help, a typo, --config) goes to the full argparse parser,
# which prints the usual usage and errors.
_WRITE_OPTIONS = {"--expect-version": ("expect_version", int),
                  "--idempotency-key": ("idempotency_key", str)}
_FAST_VERBS = {
    "heartbeat": (cmd_heartbeat, (), {}),
    "lock": (cmd_task_lock, ("task",), {}),
    "unlock": (cmd_task_lock, ("task",), {}),
    "emit": (cmd_emit, ("kind", "summary"), {"--content-file": ("content_file", str)}),
    "usage": (cmd_usage, (), {"--tokens": ("tokens", int), "--cost": ("cost", float),
                              "--model": ("model", str)}),
    "upstream-ok": (cmd_upstream_ok, ("name",), {}),
    "search": (cmd_search, ("query",), {"--k": ("k", int), "--budget": ("budget", int),
                                        "--namespace": ("namespace", list),
                                        "--json": ("json", bool)}),
    "memory get": (cmd_memory, ("namespace", "key"), {}),
    "memory put": (cmd_memory, ("namespace", "key", "value"), _WRITE_OPTIONS),
    "memory merge": (cmd_memory, ("namespace", "key", "value"), _WRITE_OPTIONS),
    "memory append": (cmd_memory, ("namespace", "key", "value"), _WRITE_OPTIONS),
    "memory delete": (cmd_memory, ("namespace", "key"), _WRITE_OPTIONS),
}
_DEFAULTS = {"content_file": None, "tokens": None, "cost": 0.0, "model": None, "k": None,
             "budget": None, "namespace": None, "speaker": None, "explain": False,
             "json": False, "expect_version": None,
             "idempotency_key": None, "socket": None, "config": None}
# Reads an operator may also run outside a run, with the config naming the socket.
_READS = ("memory get", "search")


def parse_agent_verb(argv: list[str]):
    """(handler, args) for a well-formed agent verb (optionally after `--socket PATH`),
    else None."""
    import types

    values = dict(_DEFAULTS)
    if argv[:1] == ["--socket"] and len(argv) > 2:
        values["socket"], argv = argv[1], argv[2:]
    verb, rest = (" ".join(argv[:2]), argv[2:]) if argv[:1] == ["memory"] else \
        (argv[0] if argv else "", argv[1:])
    if verb not in _FAST_VERBS:
        return None
    handler, positional, options = _FAST_VERBS[verb]
    words = _parse_words(rest, options, values)
    if words is None or len(words) != len(positional):
        return None
    if verb == "usage" and values["tokens"] is None:
        return None  # argparse says that --tokens is required
    values.update(zip(positional, words, strict=True))
    values["command"], _, values["op"] = verb.partition(" ")
    return handler, types.SimpleNamespace(**values)


def _parse_words(rest: list[str], options: dict, values: dict) -> list[str] | None:
    words: list[str] = []
    items = iter(rest)
    for item in items:
        if not item.startswith("--") or item == "--":
            words.append(item)
            continue
        flag, has_value, value = item.partition("=")
        if flag not in options:
            return None
        dest, kind = options[flag]
        if kind is bool:
            values[dest] = True
            continue
        value = value if has_value else next(items, None)
        if value is None:
            return None
        try:
            values[dest] = (values[dest] or []) + [value] if kind is list else kind(value)
        except ValueError:
            return None
    return words


def run_agent_verb(argv: list[str]) -> int | None:
    """Serve one agent verb and return its exit code; None when the full parser should."""
    if "-h" in argv or "--help" in argv:
        return None
    parsed = parse_agent_verb(argv)
    if parsed is None:
        return None
    handler, args = parsed
    verb = f"{args.command} {args.op}".strip()
    from ..sdk import Agent, NotInRun

    try:
        if verb not in _READS:
            # Before discovery: outside a run the answer is exit 1 whether a daemon is found
            # or not (it was exit 3 "no configuration found" in an empty directory).
            Agent().require_run(verb)
        return handler(args)
    except NotInRun as exc:
        print(f"watchkeeper {exc}", file=sys.stderr)
        return EXIT_ERROR
    except DaemonNotRunning as exc:
        print(f"watchkeeper: {exc}", file=sys.stderr)
        return EXIT_NOT_RUNNING
    except ControlError as exc:
        print(f"watchkeeper {args.command}: {exc}", file=sys.stderr)
        for line in getattr(exc, "reply", {}).get("errors", []):
            print(f"  {line}", file=sys.stderr)
        return EXIT_ERROR
    except WatchkeeperError as exc:
        print(f"watchkeeper: {exc}", file=sys.stderr)
        return EXIT_ERROR
