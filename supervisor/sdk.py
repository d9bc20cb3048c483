"""The agent SDK: what a Python agent uses to talk to the daemon that started it.

Everything comes from the environment the daemon sets (WATCHKEEPER_AGENT, _RUN_ID,
_RUN_TOKEN, _STATE_DIR, _SOCKET, _DEGRADED...), so an agent needs no configuration:

    from supervisor.sdk import Agent
    agent = Agent()
    agent.heartbeat()
    with agent.lock("article-42"):
        notes = agent.search("solar panels recycling", token_budget=1500)
        agent.emit("article", "Solar panel recycling in 2026", content=text)
        agent.memory.append("articles", "published", {"id": 42})

Agents in other languages use the same operations through the `watchkeeper` CLI.
"""

from __future__ import annotations

# Only what talking to the socket needs: every Python agent pays for what this module
# imports (tests/test_agent_cost.py holds the line). No dataclasses (inspect), pathlib,
# typing or threading at import time, and nothing from the daemon's side of the package.
import _thread
import os

from .control.client import ControlClient
from .errors import ControlError, LockBusy, WatchkeeperError


class OutputDenied(WatchkeeperError):
    """The output gate refused an output: the circuit breaker is open or would trip.
    A naive agent that does not catch this stops, which is the point."""


class NotInRun(WatchkeeperError):
    """An operation that acts as a run (heartbeat, lock, emit, usage, memory writes) was
    called outside a run the daemon started: WATCHKEEPER_RUN_ID is not set."""


class MemoryConflict(WatchkeeperError):
    """expect_version did not match; `current_version` is the version now stored."""

    def __init__(self, message: str, current_version: int | None) -> None:
        super().__init__(message)
        self.current_version = current_version


class MemoryRejected(WatchkeeperError):
    """The steward refused an update (too large, schema, forbidden namespace...)."""


class SearchResult:
    """The hits of a search, their token count, and the hits rendered for a prompt."""

    __slots__ = ("hits", "tokens", "text")

    def __init__(self, hits: list[dict], tokens: int, text: str) -> None:
        self.hits, self.tokens, self.text = hits, tokens, text

    def __repr__(self) -> str:
        return f"SearchResult(hits={len(self.hits)}, tokens={self.tokens})"


class Memory:
    """Shared memory through the steward: reads are direct, writes are acknowledged only
    once durable."""

    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def get(self, namespace: str, key: str):
        entry = self.entry(namespace, key)
        return entry["value"] if entry else None

    def entry(self, namespace: str, key: str) -> dict | None:
        return self._agent.call("memory-get", namespace=namespace, key=key)

    def list(self, namespace: str, prefix: str = "") -> list[dict]:
        return self._agent.call("memory-list", namespace=namespace, prefix=prefix)

    def history(self, **filters) -> list[dict]:
        return self._agent.call("memory-history", **filters)

    def put(self, namespace: str, key: str, value, **opts) -> int:
        return self._write("put", namespace, key, value, **opts)

    def merge(self, namespace: str, key: str, patch: dict, **opts) -> int:
        return self._write("merge", namespace, key, patch, **opts)

    def append(self, namespace: str, key: str, item, **opts) -> int:
        return self._write("append", namespace, key, item, **opts)

    def delete(self, namespace: str, key: str, **opts) -> int:
        return self._write("delete", namespace, key, None, **opts)

    def _write(self, op: str, namespace: str, key: str, value, *,
               expect_version: int | None = None, idempotency_key: str | None = None) -> int:
        args: dict = {"op": op, "namespace": namespace, "key": key}
        if op != "delete":
            args["value"] = value
        if expect_version is not None:
            args["expect_version"] = expect_version
        if idempotency_key is not None:
            args["idempotency_key"] = idempotency_key
        reply = self._agent.reply_as_run("memory", args)
        if reply.get("ok"):
            return reply["result"].get("version")
        result = reply.get("result") or {}
        if result.get("reason") == "version_conflict":
            raise MemoryConflict(reply["error"], result.get("current_version"))
        raise MemoryRejected(reply.get("error", "rejected"))


class DaemonLock:
    """A task lock the daemon holds for this run; released by release() or when the run ends."""

    def __init__(self, agent: Agent, task_id: str) -> None:
        self._agent = agent
        self.task_id = task_id

    def release(self) -> None:
        if self._agent is not None:
            self._agent.call_as_run("unlock", task=self.task_id)
            self._agent = None

    def __enter__(self) -> DaemonLock:
        return self

    def __exit__(self, *exc) -> None:
        self.release()


class Agent:
    def __init__(self, socket_path: str | None = None) -> None:
        env = os.environ
        self.name = env.get("WATCHKEEPER_AGENT", "")
        self.run_id = env.get("WATCHKEEPER_RUN_ID", "")
        self.job = env.get("WATCHKEEPER_JOB", "")
        self.state_dir_name = env.get("WATCHKEEPER_STATE_DIR", ".")
        self.attempt = int(env.get("WATCHKEEPER_ATTEMPT", "0") or 0)
        self.degraded = env.get("WATCHKEEPER_DEGRADED") == "1"
        self.degraded_upstreams = [u for u in env.get("WATCHKEEPER_DEGRADED_UPSTREAMS",
                                                      "").split(",") if u]
        self.heartbeat_interval_s = float(env.get("WATCHKEEPER_HEARTBEAT_INTERVAL_S", "300"))
        self.client = ControlClient(socket_path or env.get(
            "WATCHKEEPER_SOCKET", os.path.join(self.state_dir_name, "control.sock")))
        self.memory = Memory(self)
        self._beat_stop = None  # a threading.Event once start_heartbeat() runs
        self._lock = _thread.allocate_lock()

    @property
    def state_dir(self):
        """WATCHKEEPER_STATE_DIR as a Path (pathlib is imported on first use)."""
        from pathlib import Path

        return Path(self.state_dir_name)

    def call(self, cmd: str, **args):
        with self._lock:  # one connection, one request in flight
            return self.client.call(cmd, **args)

    def call_as_run(self, cmd: str, **args):
        """A request this process makes as its run; NotInRun outside one (the daemon
        would refuse it anyway, less clearly)."""
        self.require_run(cmd)
        return self.call(cmd, **args)

    def reply_as_run(self, cmd: str, args: dict) -> dict:
        """call_as_run's whole reply, error replies included (memory writes read them)."""
        self.require_run(cmd)
        with self._lock:
            return self.client.call_raw(cmd, args)

    def require_run(self, cmd: str) -> None:
        if not self.run_id:
            raise NotInRun(
                f"{cmd}: not inside a watchkeeper run (WATCHKEEPER_RUN_ID is not set); "
                "agents' operations work only in programs the daemon starts")

    # -- health ------------------------------------------------------------------------------
    def heartbeat(self) -> None:
        """Record that this agent is alive, through the daemon: the daemon alone writes
        heartbeat files, so an unreachable daemon raises DaemonNotRunning."""
        self.call_as_run("heartbeat")

    def start_heartbeat(self, interval_s: float | None = None) -> None:
        """Heartbeat now and then every interval_s from a background thread."""
        import threading

        interval = interval_s or self.heartbeat_interval_s
        self._beat_stop = stop = threading.Event()
        self.heartbeat()

        def beat() -> None:
            while not stop.wait(interval):
                try:
                    self.heartbeat()
                except (OSError, WatchkeeperError):
                    pass  # the next beat may find the daemon back
        threading.Thread(target=beat, name="watchkeeper-heartbeat", daemon=True).start()

    def stop_heartbeat(self) -> None:
        if self._beat_stop is not None:
            self._beat_stop.set()

    def upstream_ok(self, name: str) -> bool:
        """False when `name` was stale or failed as this run started (degraded mode)."""
        return name not in {chain.split("<-")[0] for chain in self.degraded_upstreams}

    def upstream_last_output(self, name: str, kind: str | None = None) -> dict | None:
        """The newest output `name` was allowed to publish (for degraded fallbacks)."""
        for out in self.call("outputs", agent=name, limit=50):
            if out["allowed"] and (kind is None or out["kind"] == kind):
                return out
        return None

    # -- locks ---------------------------------------------------------------------------------
    def lock(self, task_id: str) -> DaemonLock:
        """Take the task lock STATE_DIR/tasks/{task_id}.lock through the daemon (raises
        LockBusy); held until released or until this run ends. The daemon alone writes
        lock files (with shared storage, a leased row)."""
        try:
            self.call_as_run("lock", task=task_id)
        except ControlError as exc:
            if getattr(exc, "reply", {}).get("busy"):
                raise LockBusy(str(exc)) from None
            raise
        return DaemonLock(self, task_id)

    # -- outputs and spend ------------------------------------------------------------------------
    def emit(self, kind: str, summary: str, content: str | None = None) -> None:
        """Announce an output before publishing it; raises OutputDenied when refused."""
        args: dict = {"kind": kind, "summary": summary}
        if content is not None:
            args["content"] = content
        try:
            self.call_as_run("emit", **args)
        except ControlError as exc:
            if getattr(exc, "reply", {}).get("denied"):
                raise OutputDenied(str(exc)) from None
            raise

    def report_usage(self, tokens: int, cost: float = 0.0, model: str = "") -> None:
        """Report text-generation spend; raises OutputDenied when a budget is exhausted."""
        try:
            self.call_as_run("usage", tokens=int(tokens), cost=float(cost), model=model)
        except ControlError as exc:
            if getattr(exc, "reply", {}).get("denied"):
                raise OutputDenied(str(exc)) from None
            raise

    # -- context --------------------------------------------------------------------------------
    def search(self, query: str, k: int | None = None, token_budget: int | None = None,
               namespaces: list[str] | None = None,
               speakers: list[str] | None = None) -> SearchResult:
        """The memory entries most relevant to `query` that fill `token_budget` (k caps if set)."""
        args: dict = {"query": query}
        if k is not None:
            args["k"] = k
        if token_budget is not None:
            args["token_budget"] = token_budget
        if namespaces is not None:
            args["namespaces"] = namespaces
        if speakers is not None:
            args["speakers"] = speakers
        result = self.call("search", **args)
        return SearchResult(result["hits"], result["tokens"], result["text"])

    def close(self) -> None:
        self.stop_heartbeat()
        self.client.close()
