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

from ..control.protocol import encode, error, ok
from ..control.table import CommandTable, command
from ..core.feature import Feature, Services
from ..memory.backup import DEFAULT_PAGE_BYTES, export_page, import_page
from ..memory.context import ContextRetriever, Fts5Backend, render_hits, total_tokens
from ..memory.embeddings import load_embedder, model_files
from ..memory.store import MalformedUpdate, MemoryStore, parse_update

log = structlog.get_logger("watchkeeper.steward")

PRUNE_INTERVAL_S = 3600.0
MAX_BATCH = 5000
COMMANDS = CommandTable()


class Steward(Feature):
    name = "steward"

    def __init__(self) -> None:
        self.services: Services | None = None
        self.store: MemoryStore | None = None
        self.retriever: ContextRetriever | None = None
        self.indexer = None  # SemanticIndexer, with the [semantic] extra and a local store
        self._backend: Fts5Backend | None = None
        self._semantic_waiting = False  # extra present, model not loaded until memory has entries
        self._maybe_entries = True  # worth asking the store whether it has entries now
        self.pending: list = []  # (connection, request id, Update)
        self._next_prune = 0.0
        self.applied = 0

    def start(self, services: Services) -> None:
        self.services = services
        settings = services.config.settings.steward
        # Shared storage (PostgreSQL) supplies its own store and search backend.
        shared = services.features.open_memory(settings)
        if shared is not None:
            self.store, backend = shared
            self.retriever = ContextRetriever(backend, semantic_off="not available with "
                                                                    "shared (PostgreSQL) storage")
        else:
            self.store = MemoryStore(services.state_dir, settings)
            backend = Fts5Backend.open(self.store.path, settings)
            self._backend = backend
            package_dir, why = model_files()
            self._semantic_waiting = package_dir is not None
            self.retriever = ContextRetriever(backend, semantic_off=why if package_dir is None
                                              else "waiting: the model loads once memory has "
                                                   "an entry")

    def after_batch(self) -> None:
        """Group commit of the turn's updates, then embedding of what needs it."""
        self.flush()
        self.embed_pending()

    def _hybrid_or_lexical(self, backend: Fts5Backend) -> ContextRetriever:
        """Hybrid search when the packaged model loads; lexical, saying why, when not."""
        from ..memory.semantic_index import SemanticIndex, SemanticIndexer

        embedder, why = load_embedder()
        if embedder is None:
            log.warning("semantic_search_off", reason=why)
            return ContextRetriever(backend, semantic_off=why)
        index = SemanticIndex(embedder)
        self.indexer = SemanticIndexer.open(self.store.path, self.services.config.settings.steward,
                                            index)
        # Entries acknowledged but never embedded (the daemon died in between) are found here
        # and embedded over the next loop turns, off the start path.
        self.indexer.start()
        return ContextRetriever(backend, index)

    def embed_pending(self) -> None:
        """Embed a batch of written entries, after their writes were acknowledged.

        The model (47 MiB) loads here, on the loop's first turn with an entry in memory, so a
        daemon with an empty memory never pays for it and start-up never waits on it.
        """
        if self._semantic_waiting and self._maybe_entries:
            self._maybe_entries = False
            if self.store.has_live_entries():
                self._semantic_waiting = False
                try:
                    self.retriever = self._hybrid_or_lexical(self._backend)
                except Exception as exc:  # noqa: BLE001 - disk, lock: search stays lexical
                    log.error("semantic_search_off", reason=str(exc))
                    self.retriever = ContextRetriever(self._backend,
                                                      semantic_off=f"failed to start: {exc}")
                    if self.indexer is not None:
                        self.indexer.close()
                        self.indexer = None
        if self.indexer is None:
            return
        try:
            self.indexer.embed_pending()
        except Exception as exc:  # noqa: BLE001 - disk full, I/O error: search stays lexical
            log.error("embedding_failed", error=str(exc))

    def wrote(self) -> None:
        """Entries were written (a flush, revert, import): embed what needs it."""
        self._maybe_entries = True
        if self.indexer is not None:
            self.indexer.mark_dirty()

    def stop(self) -> None:
        self.flush()
        if self.indexer is not None:
            self.indexer.close()
        self.store.close()

    def queue_depth(self) -> int:
        return len(self.pending)

    def grants(self) -> dict[str, list[str]]:
        return {name: (rt.spec.memory_write if rt.spec.memory_write is not None else [name])
                for name, rt in self.services.pipeline.agents.items()}

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
        self.wrote()
        for (conn, request_id, _), result in zip(batch, results, strict=True):
            body = msgspec.to_builtins(result)
            if result.ok:
                conn.send(ok(request_id, body))
            else:
                conn.send(encode({"id": request_id, "ok": False, "error": f"rejected: "
                                  f"{result.reason} {result.detail}".strip(), "result": body}))

    def tick(self, now_mono: float) -> None:
        if now_mono >= self._next_prune:
            self._next_prune = now_mono + PRUNE_INTERVAL_S
            self.store.prune()

    def status(self) -> dict:
        status = {"applied": self.applied, "pending": len(self.pending)}
        if self.indexer is not None:
            status["embedded"] = self.indexer.embedded
        return status

    def commands(self) -> CommandTable:
        return COMMANDS


def _steward(h) -> Steward:
    return h.daemon.features.find(Steward)


@command(COMMANDS.agent, "memory")
def _memory_write(h, conn, req, run):
    try:
        update = parse_update(req.args, agent=run.agent, run_id=run.run_id)
    except MalformedUpdate as exc:
        return error(req.id, f"malformed update: {exc}")
    _steward(h).submit(conn, req.id, update)
    return None  # answered by flush(), once durable


@command(COMMANDS.read_only, "memory-get")
def _memory_get(h, conn, req):
    ns, key = req.args.get("namespace"), req.args.get("key")
    if not isinstance(ns, str) or not isinstance(key, str):
        return error(req.id, "memory-get needs `namespace` and `key` strings")
    entry = _steward(h).store.get(ns, key)
    return ok(req.id, msgspec.to_builtins(entry) if entry else None)


@command(COMMANDS.read_only, "memory-list")
def _memory_list(h, conn, req):
    ns, prefix = req.args.get("namespace"), req.args.get("prefix", "")
    if not isinstance(ns, str) or not isinstance(prefix, str):
        return error(req.id, "memory-list needs a `namespace` string (and optional `prefix`)")
    return ok(req.id, msgspec.to_builtins(_steward(h).store.list(ns, prefix)))


@command(COMMANDS.read_only, "memory-history")
def _memory_history(h, conn, req):
    a = req.args
    limit = a.get("limit", 100)
    if not isinstance(limit, int) or not 0 < limit <= 10000:
        return error(req.id, "limit must be an integer from 1 to 10000")
    records = _steward(h).store.history(namespace=a.get("namespace"), key=a.get("key"),
                                        agent=a.get("agent"), run_id=a.get("run_id"),
                                        limit=limit)
    return ok(req.id, msgspec.to_builtins(records))


@command(COMMANDS.read_only, "search")
def _search(h, conn, req):
    a = req.args
    query, k, budget, namespaces = a.get("query"), a.get("k"), a.get("token_budget"), \
        a.get("namespaces")
    speakers = a.get("speakers")
    problem = search_args_problem(query, k, budget, namespaces) or (
        None if speakers is None or (isinstance(speakers, list)
                                     and all(isinstance(n, str) for n in speakers))
        else f"`speakers` is {speakers!r}")
    if problem:
        return error(req.id, f"search: {problem}; it takes `query` (string), optional `k` "
                             f"(1-{MAX_SEARCH_K}), `token_budget` (0-{MAX_TOKEN_BUDGET}), "
                             f"`namespaces` (list of glob strings), `speakers` (list of "
                             f"strings), `explain` (true or false)")
    explain = a.get("explain", False)
    if not isinstance(explain, bool):
        return error(req.id, f"search: `explain` is {explain!r}; it must be true or false")
    started = time.monotonic()
    retriever = _steward(h).retriever
    hits = retriever.search(query, k=k, token_budget=budget, namespaces=namespaces,
                            speakers=speakers)
    result = {"hits": msgspec.to_builtins(hits), "tokens": total_tokens(hits),
              "text": render_hits(hits),
              "elapsed_ms": round((time.monotonic() - started) * 1000, 2)}
    if explain:
        result["explain"] = retriever.explain()
    return ok(req.id, result)


MAX_SEARCH_K = 1000
MAX_TOKEN_BUDGET = 1_000_000


def search_args_problem(query, k, budget, namespaces) -> str | None:
    """What is wrong with a search request's arguments, or None."""
    def is_int(x) -> bool:
        return isinstance(x, int) and not isinstance(x, bool)
    if not isinstance(query, str):
        return "`query` must be a string"
    if k is not None and not (is_int(k) and 0 < k <= MAX_SEARCH_K):
        return f"`k` is {k!r}"
    if budget is not None and not (is_int(budget) and 0 <= budget <= MAX_TOKEN_BUDGET):
        return f"`token_budget` is {budget!r}"
    if namespaces is not None and not (isinstance(namespaces, list)
                                       and all(isinstance(n, str) for n in namespaces)):
        return f"`namespaces` is {namespaces!r}"
    return None


@command(COMMANDS.admin, "memory-revert")
def _memory_revert(h, conn, req):
    a = req.args
    if sum(x is not None for x in (a.get("seq"), a.get("agent"), a.get("run_id"))) != 1:
        return error(req.id, "memory-revert needs exactly one of `seq`, `agent`, `run_id`")
    _steward(h).flush()
    results = _steward(h).store.revert(seq=a.get("seq"), agent=a.get("agent"),
                                       run_id=a.get("run_id"), force=bool(a.get("force")))
    _steward(h).wrote()
    log.warning("memory_reverted", by_uid=conn.peer.uid, seq=a.get("seq"), agent=a.get("agent"),
                run_id=a.get("run_id"), updates=len(results))
    return ok(req.id, msgspec.to_builtins(results))


@command(COMMANDS.admin, "memory-export")
def _memory_export(h, conn, req):
    """One page (memory/backup.py): the CLI follows `next` until it is null."""
    a = req.args
    _steward(h).flush()
    return ok(req.id, export_page(_steward(h).store, a.get("part", "entries"),
                                  a.get("after", 0), a.get("max_bytes", DEFAULT_PAGE_BYTES)))


@command(COMMANDS.admin, "memory-import")
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
    _steward(h).wrote()
    return ok(req.id, counts)
