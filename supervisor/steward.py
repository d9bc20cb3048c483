"""The memory steward, in-process: the single writer of the agents' shared memory.

Agents submit updates over the control socket (`memory` command). The loop gathers every
update that arrived during one turn and applies them in one transaction (group commit),
then answers each: an update is acknowledged only once its transaction is durable. Reads
(`memory-get`, `memory-list`, `search`) are served from the store directly.
"""

from __future__ import annotations

import time

import msgspec
import structlog

from .context import ContextRetriever, Fts5Backend, render_hits, total_tokens
from .control.handlers import ADMIN, AGENT, READ_ONLY, command
from .control.protocol import encode, error, ok
from .memory_backup import DEFAULT_PAGE_BYTES, export_page, import_page
from .memory_store import MalformedUpdate, MemoryStore, parse_update

log = structlog.get_logger("watchkeeper.steward")

PRUNE_INTERVAL_S = 3600.0
MAX_BATCH = 5000


class Steward:
    name = "steward"

    def __init__(self) -> None:
        self.daemon = None
        self.store: MemoryStore | None = None
        self.retriever: ContextRetriever | None = None
        self.pending: list = []  # (connection, request id, Update)
        self._next_prune = 0.0
        self.applied = 0

    def start(self, daemon) -> None:
        self.daemon = daemon
        daemon.steward = self
        # Shared storage (PostgreSQL) supplies its own store and search backend.
        open_shared = getattr(daemon, "open_memory", None)
        if open_shared is not None:
            self.store, backend = open_shared(daemon.config.settings.steward)
        else:
            self.store = MemoryStore(daemon.state_dir, daemon.config.settings.steward)
            backend = Fts5Backend.open(self.store.path, daemon.config.settings.steward)
        self.retriever = ContextRetriever(backend)
        daemon.after_batch.append(self.flush)
        daemon.on_tick.append(self._tick)

    def stop(self, daemon) -> None:
        self.flush()
        self.store.close()

    def queue_depth(self) -> int:
        return len(self.pending)

    def grants(self) -> dict[str, list[str]]:
        return {name: (rt.spec.memory_write if rt.spec.memory_write is not None else [name])
                for name, rt in self.daemon.pipeline.agents.items()}

    def submit(self, conn, request_id, update) -> None:
        self.pending.append((conn, request_id, update))
        if len(self.pending) >= MAX_BATCH:
            self.flush()

    def flush(self) -> None:
        """Apply every pending update in one transaction, then acknowledge each."""
        if not self.pending:
            return
        batch, self.pending = self.pending, []
        try:
            results = self.store.apply_batch([u for _, _, u in batch], self.grants())
        except Exception as exc:  # noqa: BLE001 - disk full, I/O error: nothing was applied
            log.error("steward_batch_failed", updates=len(batch), error=str(exc))
            for conn, request_id, _ in batch:
                conn.send(error(request_id, f"not applied: {exc}", retry=True))
            return
        self.applied += sum(1 for r in results if r.ok)
        for (conn, request_id, _), result in zip(batch, results, strict=True):
            body = msgspec.to_builtins(result)
            if result.ok:
                conn.send(ok(request_id, body))
            else:
                conn.send(encode({"id": request_id, "ok": False, "error": f"rejected: "
                                  f"{result.reason} {result.detail}".strip(), "result": body}))

    def _tick(self, now_mono: float) -> None:
        if now_mono >= self._next_prune:
            self._next_prune = now_mono + PRUNE_INTERVAL_S
            self.store.prune()

    def status(self) -> dict:
        return {"applied": self.applied, "pending": len(self.pending)}


def _steward(h) -> Steward:
    return h.daemon.steward


@command(AGENT, "memory")
def _memory_write(h, conn, req, run):
    try:
        update = parse_update(req.args, agent=run.agent, run_id=run.run_id)
    except MalformedUpdate as exc:
        return error(req.id, f"malformed update: {exc}")
    _steward(h).submit(conn, req.id, update)
    return None  # answered by flush(), once durable


@command(READ_ONLY, "memory-get")
def _memory_get(h, conn, req):
    ns, key = req.args.get("namespace"), req.args.get("key")
    if not isinstance(ns, str) or not isinstance(key, str):
        return error(req.id, "memory-get needs `namespace` and `key` strings")
    entry = _steward(h).store.get(ns, key)
    return ok(req.id, msgspec.to_builtins(entry) if entry else None)


@command(READ_ONLY, "memory-list")
def _memory_list(h, conn, req):
    ns, prefix = req.args.get("namespace"), req.args.get("prefix", "")
    if not isinstance(ns, str) or not isinstance(prefix, str):
        return error(req.id, "memory-list needs a `namespace` string (and optional `prefix`)")
    return ok(req.id, msgspec.to_builtins(_steward(h).store.list(ns, prefix)))


@command(READ_ONLY, "memory-history")
def _memory_history(h, conn, req):
    a = req.args
    limit = a.get("limit", 100)
    if not isinstance(limit, int) or not 0 < limit <= 10000:
        return error(req.id, "limit must be an integer from 1 to 10000")
    records = _steward(h).store.history(namespace=a.get("namespace"), key=a.get("key"),
                                        agent=a.get("agent"), run_id=a.get("run_id"),
                                        limit=limit)
    return ok(req.id, msgspec.to_builtins(records))


@command(READ_ONLY, "search")
def _search(h, conn, req):
    a = req.args
    query, k, budget, namespaces = a.get("query"), a.get("k", 8), a.get("token_budget"), \
        a.get("namespaces")
    if not isinstance(query, str) or not isinstance(k, int) or not 0 < k <= 100 or \
            (budget is not None and not isinstance(budget, int)) or \
            (namespaces is not None and not isinstance(namespaces, list)):
        return error(req.id, "search needs `query` (string), optional `k` (1-100), "
                             "`token_budget` (int), `namespaces` (list)")
    started = time.monotonic()
    hits = _steward(h).retriever.search(query, k=k, token_budget=budget, namespaces=namespaces)
    return ok(req.id, {"hits": msgspec.to_builtins(hits), "tokens": total_tokens(hits),
                       "text": render_hits(hits),
                       "elapsed_ms": round((time.monotonic() - started) * 1000, 2)})


@command(ADMIN, "memory-revert")
def _memory_revert(h, conn, req):
    a = req.args
    if sum(x is not None for x in (a.get("seq"), a.get("agent"), a.get("run_id"))) != 1:
        return error(req.id, "memory-revert needs exactly one of `seq`, `agent`, `run_id`")
    _steward(h).flush()
    results = _steward(h).store.revert(seq=a.get("seq"), agent=a.get("agent"),
                                       run_id=a.get("run_id"), force=bool(a.get("force")))
    log.warning("memory_reverted", by_uid=conn.peer.uid, seq=a.get("seq"), agent=a.get("agent"),
                run_id=a.get("run_id"), updates=len(results))
    return ok(req.id, msgspec.to_builtins(results))


@command(ADMIN, "memory-export")
def _memory_export(h, conn, req):
    """One page (memory_backup.py): the CLI follows `next` until it is null."""
    a = req.args
    _steward(h).flush()
    return ok(req.id, export_page(_steward(h).store, a.get("part", "entries"),
                                  a.get("after", 0), a.get("max_bytes", DEFAULT_PAGE_BYTES)))


@command(ADMIN, "memory-import")
def _memory_import(h, conn, req):
    data = req.args.get("data")
    if not isinstance(data, dict):
        return error(req.id, "memory-import needs `data`: an export document")
    _steward(h).flush()
    try:
        counts = import_page(_steward(h).store, data,
                             restored_history=bool(req.args.get("restored_history")))
    except (ValueError, msgspec.ValidationError) as exc:
        return error(req.id, f"import rejected: {exc}")
    return ok(req.id, counts)
