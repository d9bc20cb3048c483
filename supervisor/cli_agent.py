"""`watchkeeper` subcommands for agents in any language, and for the steward and breaker.

Exit codes an agent script can rely on: 0 done; 1 error; 3 daemon not running; 4 busy
(task locked by someone else); 5 denied (the output gate or a budget said no: stop);
6 conflict (memory expect_version did not match).
"""

from __future__ import annotations

import json
import sys

from .errors import ControlError

EXIT_DENIED_OUTPUT, EXIT_CONFLICT = 5, 6


def _json_arg(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text  # a bare word is stored as a string


def _sdk(args):
    from .cli import _socket_path
    from .sdk import Agent

    return Agent(str(_socket_path(args)))


def cmd_heartbeat(args) -> int:
    _sdk(args).heartbeat()
    return 0


def cmd_emit(args) -> int:
    from .sdk import OutputDenied

    content = None
    if args.content_file:
        content = sys.stdin.read() if args.content_file == "-" else open(args.content_file).read()
    try:
        _sdk(args).emit(args.kind, args.summary, content)
    except OutputDenied as exc:
        print(f"watchkeeper emit: {exc}", file=sys.stderr)
        return EXIT_DENIED_OUTPUT
    return 0


def cmd_usage(args) -> int:
    from .sdk import OutputDenied

    try:
        _sdk(args).report_usage(args.tokens, args.cost, args.model or "")
    except OutputDenied as exc:
        print(f"watchkeeper usage: {exc}", file=sys.stderr)
        return EXIT_DENIED_OUTPUT
    return 0


def cmd_memory(args) -> int:
    from .sdk import MemoryConflict

    agent = _sdk(args)
    op = args.op
    if op == "get":
        value = agent.memory.entry(args.namespace, args.key)
        print(json.dumps(value["value"] if value else None))
        return 0 if value else 1
    if op in ("list", "history"):
        from . import cli_views

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
        print(json.dumps(agent.call("memory-revert", force=args.force, **target), indent=2))
        return 0
    if op == "export":
        from .backup_client import export_document

        json.dump(export_document(agent.call), sys.stdout, separators=(",", ":"),
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
        print(json.dumps(import_document(agent.call, doc)))
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
        print(json.dumps({"hits": result.hits, "tokens": result.tokens}, indent=2))
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
        print(json.dumps({k: result[k] for k in ("explain", "hits", "tokens")}, indent=2))
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
    return 0


def cmd_upstream_ok(args) -> int:
    return 0 if _sdk(args).upstream_ok(args.name) else 1


def cmd_outputs(args) -> int:
    from . import cli_views

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
            print(json.dumps(status, indent=2))
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
        print(json.dumps(result, indent=2))
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
