"""The PostgreSQL backend in the daemon's loop: one pipeline over several hosts.

A Feature (core/feature.py), started after the output gate and before the steward (daemon/features.py). It
- migrates the schema and registers this host;
- gives the steward its PostgreSQL store (pg/memory.py) and wraps the gate's breaker in a
  SharedBreaker (pg/breaker.py);
- decides through firing claims which host runs each scheduled firing (pg/claims.py);
- serves `lock`, `unlock`, `locks` and `runs` from shared tables, and renews this host's
  leases; a run whose task lock lease was lost (host frozen, database unreachable) is stopped;
- mirrors run records and heartbeats, so every host sees every host's;
- keeps or takes the leader lease; the leader closes the runs of dead hosts and prunes;
- makes agent state cluster-wide (pg/agent_sync.py over pg/agents.py): a run lease per
  running agent (overlap and `always` singletons across hosts, fencing), pause flags,
  crash-loop cool-downs, and `after:` firings handed to the host their downstream is
  pinned to;
- rides out a database outage: what needs the database is refused (retryably), running
  agents go on until their leases would expire, and everything resumes when it returns.
All of it runs on the loop's thread; peers' NOTIFYs arrive on a watched socket.
"""

from __future__ import annotations

import os
import selectors
import time

import psycopg
import structlog

from .. import __version__
from ..breaker.breaker import Breaker, BreakerState
from ..control.protocol import error, ok
from ..control.table import CommandTable, Handler
from ..core.feature import Feature, Services
from ..core.states import StopReason
from ..features.output_gate import OutputGate, merged_breaker_settings
from ..health.heartbeat import heartbeat_path, read_heartbeat, write_heartbeat
from ..runs.locks import validate_task_id
from . import agents as shared_agents
from .agent_sync import AgentSync
from .breaker import SharedBreaker
from .db import STORAGE_ERRORS, Database, Listener, one_line
from .leases import (
    Leadership,
    LeaseLost,
    acquire_lock,
    current_leader,
    host_stopped,
    list_hosts,
    list_locks,
    register_host,
    release_locks,
    renew,
)
from .lost_trip_alert import owe_lost_trip_alert
from .memory import PgMemoryStore, PgSearchBackend
from .migrations import migrate

log = structlog.get_logger("watchkeeper.pg.cluster")

LEADER_DUTY_INTERVAL_S = 30.0
CLAIMS_KEPT_S = 7 * 86400.0
BREAKER_EVENTS_KEPT_S = 2 * 86400.0
# Fencing: a host that has not renewed its leases for this share of lease_s stops its
# cluster-exclusive runs (SIGTERM), and kills what is left at the second share, so they are
# gone before the lease can expire and another host may start the agent.
FENCE_STOP_SHARE = 0.5
FENCE_KILL_SHARE = 0.75
GUARDED_COMMANDS = ("emit", "usage", "outputs", "runs", "locks", "lock", "unlock", "memory-get",
                    "memory-list", "memory-history", "search", "memory-revert",
                    "memory-export", "memory-import")
RUN_COLUMNS = ("run_id, agent, job, attempt, trigger, pid, started, ended, exit_code, signal, "
               "outcome, stop_reason, stop_signal, degraded, host")


class Cluster(Feature):
    name = "cluster"

    def __init__(self) -> None:
        self.services: Services | None = None
        self.settings = None
        self.host = ""
        self.db: Database | None = None
        self.listener: Listener | None = None
        self.leadership: Leadership | None = None
        self.breaker: SharedBreaker | None = None
        self.held: dict[str, set[str]] = {}     # run id -> task ids it holds
        self._last_renewal = time.monotonic()
        self._next = {"renew": 0.0, "poll": 0.0, "leader": 0.0, "duties": 0.0, "beats": 0.0}
        self._pushed_beats: dict[str, float] = {}
        self.run_leases: set[str] = set()        # agents whose run lease this host holds
        self.agents = AgentSync(self)
        self.down_since: float | None = None     # monotonic start of a database outage
        self._unsent: list[tuple[str, tuple]] = []  # records to write when it is back
        self._pulled_beat_ts = 0.0
        self._timer = None

    # -- lifecycle -------------------------------------------------------------------------------
    def start(self, services: Services) -> None:
        self.services = services
        self.settings = s = services.config.settings.storage
        self.host = s.host
        self.db = Database(s)
        applied = migrate(self.db)
        register_host(self.db, self.host, os.getpid(), __version__)
        self._close_own_dangling_runs()
        self.leadership = Leadership(self.db, self.host, s.leader_lease_s)
        self._share_breaker(services)
        self._timer = services.timers.call_later(0, self._on_timer)
        self._listen()
        self._elect()
        log.info("cluster_joined", host=self.host, schema=s.schema, migrations=applied,
                 leader=self.leadership.leading, listen=self.listener is not None)
        if s.transaction_pooling:
            log.info("transaction_pooling", hint="behind a transaction-mode pooler: no LISTEN "
                     "and no prepared statements; peers see changes within poll_s")

    # -- the hooks (core/feature.py) ----------------------------------------------------------------
    def open_memory(self, settings):
        """The steward's store and search backend: the shared tables."""
        return PgMemoryStore(self.db, settings), PgSearchBackend(self.db)

    def adjust_run_env(self, env: dict[str, str]) -> None:
        # Agents using the SDK take task locks through the daemon, not as local files.
        env["WATCHKEEPER_TASK_LOCKS"] = "daemon"

    def claim_firing(self, fire, spec, job) -> str:
        return self.agents.claim_firing(fire, spec, job)

    def claim_run(self, rt, job) -> str:
        return self.agents.claim_run(rt, job)

    def paused(self, names: list[str], paused: bool) -> None:
        self.agents.paused(names, paused)

    def crash_loop(self, rt) -> None:
        self.agents.crash_loop(rt)

    def run_started(self, run) -> None:
        self._run_started(run)

    def run_finished(self, run, record) -> None:
        self._run_finished(run, record)

    def extend_status(self, snapshot: dict) -> None:
        self._extend_status(snapshot)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.leadership is None:  # start failed before joining: nothing to leave
            if self.db is not None:
                self.db.close()
            return
        try:
            self.leadership.resign()
            for run_id in list(self.held):
                release_locks(self.db, self.host, run_id=run_id)
            for agent in list(self.run_leases):
                run = self._local_run(agent)
                shared_agents.release_run_lease(self.db, self.host, agent,
                                                run.run_id if run else "")
            host_stopped(self.db, self.host)
        except (psycopg.Error, ConnectionError) as exc:
            log.warning("cluster_leave_failed", error=str(exc),
                        hint="peers notice through the expiring leases")
        if self.listener is not None:
            self._drop_listener()
        self.db.close()

    def _share_breaker(self, services: Services) -> None:
        """Replace the gate's breaker (restored from this host's SQLite) by the shared one."""
        gate = services.features.find(OutputGate)
        inner = Breaker(merged_breaker_settings(services.config), persist=gate.persist_snapshot)
        self.breaker = SharedBreaker(inner, self.db, self.host, on_peer_change=self._peer_breaker)
        gate.use_breaker(self.breaker)
        self.breaker.replay_all()
        services.pipeline.halted = inner.state is BreakerState.OPEN
        if services.pipeline.halted:
            log.critical("pipeline_halted_at_start", shared=True,
                         hint="`watchkeeper breaker reset --reason ...` on any host resumes all")
            owe_lost_trip_alert(self.db, self.host, gate.alerter)

    def _peer_breaker(self, state: BreakerState) -> None:
        pipeline = self.services.pipeline
        if state is BreakerState.OPEN:
            trip = self.breaker.inner.last_trip
            log.critical("pipeline_halted_by_peer", agent=trip.agent if trip else None,
                         rule=trip.rule.value if trip else None,
                         hint="the host that tripped sent the alert")
            pipeline.halt()
        else:
            log.warning("pipeline_resumed_by_peer")
            pipeline.unhalt()

    def command_overrides(self, served: CommandTable) -> dict[str, Handler]:
        """`lock`, `unlock`, `locks`, `runs` and `outputs` are served from the shared tables;
        every command that reads or writes them answers a database outage with a retryable
        refusal: `emit` and `usage` (decided in the shared breaker) are never acknowledged,
        reads never end in an internal error and a traceback."""
        overrides: dict[str, Handler] = {"lock": self._lock, "unlock": self._unlock,
                                         "locks": self._locks, "runs": self._runs,
                                         "outputs": self._outputs}
        for cmd in GUARDED_COMMANDS:
            impl = overrides.get(cmd) or served.get(cmd)
            if impl is not None:
                overrides[cmd] = self._storage_guarded(cmd, impl)
        return overrides

    def _share_output(self, run) -> None:
        """Copy the output the gate just recorded here (same loop turn) for `outputs` on
        any host."""
        rows = self.services.store.recent_outputs(run.agent, 1)
        if rows and rows[0]["run_id"] == run.run_id:
            o = rows[0]
            self._write("insert into outputs (host, agent, run_id, kind, time, hash, summary, "
                        "allowed) values (%s, %s, %s, %s, %s, %s, %s, %s)",
                        (self.host, o["agent"], o["run_id"], o["kind"], o["time"], o["hash"],
                         o["summary"], bool(o["allowed"])))

    def _outputs(self, h, conn, req):
        agent, limit = req.args.get("agent"), req.args.get("limit", 50)
        if (agent is not None and not isinstance(agent, str)) or not isinstance(limit, int) \
                or not 0 < limit <= 1000:
            return error(req.id, "outputs takes optional `agent` (string) and `limit` (1-1000)")
        where, params = ("where agent = %s", (agent, limit)) if agent else ("", (limit,))
        with self.db.tx() as c:
            cur = c.execute("select id, agent, run_id, kind, time, hash, summary, "
                            f"allowed::int as allowed, host from outputs {where} "
                            "order by time desc, id desc limit %s", params)
            names = [col.name for col in cur.description]
            rows = cur.fetchall()
        return ok(req.id, [dict(zip(names, r, strict=True)) for r in rows])

    def _storage_guarded(self, cmd: str, impl):
        def serve(h, conn, req, *run):  # agent commands get the caller's run too
            try:
                reply = impl(h, conn, req, *run)
                if cmd == "emit":
                    self._share_output(run[0])
                return reply
            except STORAGE_ERRORS as exc:
                self._storage_failed(exc)
                log.warning("command_refused_storage_unreachable", cmd=cmd,
                            agent=run[0].agent if run else None)
                return error(req.id, f"not applied: shared storage unreachable ({one_line(exc)}); "
                                     "retry later", retry=True)
        return serve

    def _storage_failed(self, exc: Exception) -> None:
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.error("storage_unreachable", host=self.host, error=one_line(exc),
                      hint="running agents go on until their leases run out; firings, memory "
                           "writes and outputs are refused (retryable) until it returns")

    def _storage_ok(self) -> None:
        if self.down_since is not None:
            log.warning("storage_back", host=self.host,
                        down_s=round(time.monotonic() - self.down_since, 1),
                        records_to_write=len(self._unsent))
            self.down_since = None
        self._write_unsent()

    def _write_unsent(self) -> None:
        """Run records and lease releases that failed during the outage, in their order."""
        while self._unsent:
            sql, params = self._unsent[0]
            try:
                with self.db.tx() as conn:
                    conn.execute(sql, params)
            except STORAGE_ERRORS as exc:
                self._storage_failed(exc)
                return
            self._unsent.pop(0)

    # -- the loop's duties -------------------------------------------------------------------------
    def _on_timer(self) -> None:
        """The cluster keeps its own cadence (leases are renewed every few seconds), not
        the daemon's housekeeping tick, which may be much longer."""
        try:
            self._tick(time.monotonic())
        finally:
            kinds = ["renew", "leader", "poll", "beats"]
            if self.leadership.leading:
                kinds.append("duties")
            delay = min(self._next[k] for k in kinds) - time.monotonic()
            self._timer = self.services.timers.call_later(max(0.01, delay), self._on_timer)

    def _tick(self, now: float) -> None:
        s, due = self.settings, self._next
        if now >= due["renew"]:
            due["renew"] = now + min(s.lease_s / 3, s.poll_s)
            self._renew(now)
        if now >= due["leader"]:
            due["leader"] = now + min(s.leader_lease_s / 3, s.poll_s)
            self._elect()
        if now >= due["poll"]:
            due["poll"] = now + s.poll_s
            self._guarded(self.breaker.sync)
            self._guarded(self.agents.sync)
            if self.listener is None and not s.transaction_pooling and self.down_since is None:
                self._listen()
        if now >= due["beats"]:
            due["beats"] = now + 1.0
            self._sync_heartbeats()
        if self.leadership.leading and now >= due["duties"]:
            due["duties"] = now + min(LEADER_DUTY_INTERVAL_S, s.lease_s)
            self._leader_duties()

    def _guarded(self, duty) -> None:
        try:
            duty()
        except STORAGE_ERRORS as exc:
            self._storage_failed(exc)

    def _elect(self) -> None:
        try:
            change = self.leadership.renew_or_acquire()
        except STORAGE_ERRORS as exc:
            if self.down_since is None:
                log.warning("leader_lease_unreachable", error=str(exc))
            if self.leadership.leading:
                self.leadership.token = None  # it expires on the server's clock: act as lost
                log.warning("leader_lost", host=self.host, hint="database unreachable")
            return
        if change == "elected":
            log.warning("leader_elected", host=self.host, token=self.leadership.token)
            self._next["duties"] = 0.0
        elif change == "lost":
            log.warning("leader_lost", host=self.host,
                        hint="the lease expired before it was renewed (frozen or cut off)")

    def _renew(self, now: float) -> None:
        # Spawn failures and refused starts leave a lease without a run: give it back.
        for agent in [a for a in self.run_leases if self._local_run(a) is None]:
            self.run_leases.discard(agent)
            self._write(shared_agents.RELEASE_SQL, (agent, self.host, ""))
        started = time.monotonic()  # the lease runs from before the request reached the server
        try:
            still, agents = renew(self.db, self.host, self.settings.lease_s,
                                  sorted(self.run_leases))
        except STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            self._fence(now)
            return
        self._storage_ok()
        self._last_renewal = started
        lost = {}
        for run_id, tasks in self.held.items():
            gone = tasks - {t for r, t in still if r == run_id}
            if gone:
                lost[run_id] = gone
        if lost:
            self._leases_lost(lost)
        for agent in sorted(self.run_leases):
            if agent not in agents:
                self._run_lease_lost(agent, "the lease expired before it was renewed")
            elif agents[agent] is not None:
                run = self._local_run(agent)
                log.warning("run_replaced_by_peer", agent=agent, by_host=agents[agent],
                            run_id=run.run_id if run else None)
                if run is not None:
                    self.services.pipeline.stop_run(run, StopReason.REPLACED)

    def _local_run(self, agent: str):
        rt = self.services.pipeline.agents.get(agent)
        return rt.run if rt is not None else None

    def _fence(self, now: float) -> None:
        """Renewals fail: stop the runs this host may no longer hold before the leases can
        expire for the others (SIGTERM at half the lease, SIGKILL at three quarters)."""
        silent_s = now - self._last_renewal
        lease_s = self.settings.lease_s
        if silent_s >= lease_s * FENCE_STOP_SHARE:
            for agent in sorted(self.run_leases):
                self._run_lease_lost(agent, f"no renewal for {silent_s:.1f}s of a {lease_s:g}s "
                                            "lease")
            held = {run_id: set(tasks) for run_id, tasks in self.held.items() if tasks}
            if held:
                self._leases_lost(held)
        if silent_s >= lease_s * FENCE_KILL_SHARE:
            for run in list(self.services.pipeline.runs.values()):
                if run.stop_reason is StopReason.LEASE_LOST:
                    self.services.pipeline.kill_run(run)

    def _run_lease_lost(self, agent: str, why: str) -> None:
        """Another host may run this agent now (or soon): the local run must not go on."""
        self.run_leases.discard(agent)
        run = self._local_run(agent)
        log.error("run_lease_lost", agent=agent, host=self.host, reason=why,
                  run_id=run.run_id if run else None,
                  action="stopping the run (fencing)" if run else None)
        if run is not None:
            self.services.pipeline.stop_run(run, StopReason.LEASE_LOST)

    def _leases_lost(self, lost: dict[str, set[str]]) -> None:
        """Another host may hold these locks now: the runs that held them must not go on."""
        for run_id, tasks in lost.items():
            self.held[run_id] -= tasks
            run = self.services.pipeline.runs.get(run_id)
            if run is not None and run.stop_reason is StopReason.LEASE_LOST:
                continue  # already being stopped
            log.error("lock_lease_lost", run_id=run_id, tasks=sorted(tasks),
                      agent=run.agent if run else None, action="stopping the run" if run else None)
            if run is not None:
                self.services.pipeline.stop_run(run, StopReason.LEASE_LOST)

    def _leader_duties(self) -> None:
        s = self.settings
        try:
            with self.db.tx() as conn:
                self.leadership.fenced(conn)
                lost = conn.execute(
                    "update runs set ended = extract(epoch from now()), outcome = 'failed', "
                    "stop_reason = 'host_lost' where ended is null and host in (select name "
                    "from hosts where last_seen < now() - make_interval(secs => %s)) "
                    "returning run_id, agent, host", (s.lease_s,)).fetchall()
                conn.execute("delete from firing_claims where claimed_at < now() - "
                             "make_interval(secs => %s)", (CLAIMS_KEPT_S,))
                conn.execute("delete from breaker_events where at < extract(epoch from now()) - %s",
                             (BREAKER_EVENTS_KEPT_S,))
                conn.execute("delete from outputs where time < extract(epoch from now()) - %s",
                             (CLAIMS_KEPT_S,))
                # A hand-off whose host never came back to take it is stale after a day.
                conn.execute("delete from handoffs where created_at < now() - interval '1 day'")
        except STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            return
        except LeaseLost as exc:
            log.warning("leader_lost", host=self.host, error=str(exc))
            return
        for run_id, agent, host in lost:
            log.warning("run_lost_with_host", run_id=run_id, agent=agent, host=host)

    # -- run records ---------------------------------------------------------------------------------
    def _run_started(self, run) -> None:
        if run.agent in self.run_leases:
            self._guarded(lambda: shared_agents.record_run(self.db, self.host, run.agent,
                                                           run.run_id))
        self._write("insert into runs (run_id, agent, job, attempt, trigger, pid, started, "
                    "degraded, host) values (%s, %s, %s, %s, %s, %s, %s, %s, %s) "
                    "on conflict (run_id) do nothing",
                    (run.run_id, run.agent, run.job.id, run.attempt, run.trigger, run.pid,
                     run.started_wall, ",".join(run.degraded), self.host))

    def _run_finished(self, run, rec) -> None:
        self._write("update runs set ended = %s, exit_code = %s, signal = %s, outcome = %s, "
                    "stop_reason = %s, stop_signal = %s where run_id = %s",
                    (rec.ended, rec.exit_code, rec.signal, rec.outcome, rec.stop_reason,
                     rec.stop_signal, rec.run_id))
        if self.held.pop(run.run_id, None):
            self._write("delete from task_locks where host = %s and run_id = %s",
                        (self.host, run.run_id))
        if run.agent in self.run_leases:
            self.run_leases.discard(run.agent)
            self._write(shared_agents.RELEASE_SQL, (run.agent, self.host, run.run_id))

    def _write(self, sql: str, params: tuple) -> None:
        """A record the pipeline's hooks must not fail on: kept, in order, and written when
        the database is back (every such statement is idempotent)."""
        if self._unsent:
            self._unsent.append((sql, params))
            return
        try:
            with self.db.tx() as conn:
                conn.execute(sql, params)
        except STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            self._unsent.append((sql, params))
            log.warning("pg_write_deferred", error=str(exc).strip(),
                        statement=sql.split(" (")[0])

    def _close_own_dangling_runs(self) -> None:
        with self.db.tx() as conn:
            closed = conn.execute(
                "update runs set ended = extract(epoch from now()), outcome = 'failed', "
                "stop_reason = 'daemon_lost' where host = %s and ended is null", (self.host,)
            ).rowcount
        if closed:
            log.warning("runs_lost_with_previous_daemon", count=closed, shared=True)

    # -- heartbeats ------------------------------------------------------------------------------------
    def _sync_heartbeats(self) -> None:
        """Beats of this host's runs go up; newer beats of other hosts come down as files,
        so features/health.py judges upstreams on any host the same way as local ones."""
        state_dir = self.services.state_dir
        up = []
        for run in self.services.pipeline.runs.values():
            beat = read_heartbeat(heartbeat_path(state_dir, run.agent))
            if beat is not None and beat.ts > self._pushed_beats.get(run.agent, 0.0):
                up.append((run.agent, self.host, beat.ts, beat.pid, beat.run_id))
        try:
            with self.db.tx() as conn:
                for row in up:
                    conn.execute("insert into heartbeats values (%s, %s, %s, %s, %s) on conflict "
                                 "(agent) do update set host = excluded.host, ts = excluded.ts, "
                                 "pid = excluded.pid, run_id = excluded.run_id "
                                 "where heartbeats.ts < excluded.ts", row)
                down = conn.execute("select agent, ts, pid, run_id from heartbeats where host "
                                    "<> %s and ts > %s", (self.host, self._pulled_beat_ts)
                                    ).fetchall()
        except STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            return
        for agent, _host, ts, _pid, _run in up:
            self._pushed_beats[agent] = ts
        for agent, ts, pid, run_id in down:
            self._pulled_beat_ts = max(self._pulled_beat_ts, ts)
            local = read_heartbeat(heartbeat_path(state_dir, agent))
            if agent in self.services.pipeline.agents and (local is None or local.ts < ts):
                write_heartbeat(state_dir, agent, ts=ts, pid=pid, run_id=run_id)

    # -- LISTEN/NOTIFY ------------------------------------------------------------------------------------
    def _listen(self) -> None:
        if self.settings.transaction_pooling:
            return
        try:
            self.listener = Listener(self.db)
        except (psycopg.Error, ConnectionError) as exc:
            log.warning("listen_failed", error=str(exc), hint="polling every poll_s instead")
            return
        self.services.selector.register(self.listener.fileno(), selectors.EVENT_READ,
                                      self._on_notify)

    def _drop_listener(self) -> None:
        try:
            self.services.selector.unregister(self.listener.fileno())
        except (KeyError, ValueError, OSError):
            pass
        self.listener.close()
        self.listener = None

    def _on_notify(self, _mask: int) -> None:
        try:
            payloads = self.listener.drain()
        except psycopg.Error as exc:
            log.warning("listen_connection_lost", error=str(exc), hint="reconnecting at next poll")
            self._drop_listener()
            return
        if "breaker" in payloads:
            self._guarded(self.breaker.sync)
        if "agents" in payloads:
            self._guarded(self.agents.sync)
        if "leader" in payloads and not self.leadership.leading:
            self._elect()

    # -- control commands (served from the shared tables) ----------------------------------------------
    def _lock(self, h, conn, req, run):
        task = req.args.get("task")
        try:
            validate_task_id(task if isinstance(task, str) else "")
        except ValueError as exc:
            return error(req.id, str(exc))
        holder = acquire_lock(self.db, self.settings.lease_s, task, host=self.host,
                              agent=run.agent, run_id=run.run_id, pid=run.pid)
        if holder is not None:
            return error(req.id, f"task {task!r} is locked by {holder.describe()}", busy=True)
        self.held.setdefault(run.run_id, set()).add(task)
        log.info("lock_acquired", agent=run.agent, run_id=run.run_id, task=task, host=self.host)
        return ok(req.id, {"task": task, "lease_s": self.settings.lease_s})

    def _unlock(self, h, conn, req, run):
        task = req.args.get("task")
        if task not in self.held.get(run.run_id, set()):
            return error(req.id, f"run {run.run_id} does not hold task {task!r}")
        self.held[run.run_id].discard(task)
        release_locks(self.db, self.host, run_id=run.run_id, task_id=task)
        return ok(req.id, {"task": task})

    def _locks(self, h, conn, req):
        with self.db.tx() as c:
            holders = list_locks(c)
        return ok(req.id, [{"task": x.task_id, "held": True, "owner": {
            "pid": x.pid, "host": x.host, "run_id": x.run_id, "agent": x.agent,
            "started": x.acquired_at, "lease_ends_in_s": round(x.expires_in_s, 1)}}
            for x in holders])

    def _runs(self, h, conn, req):
        limit, agent = req.args.get("limit", 20), req.args.get("agent")
        if not isinstance(limit, int) or not 0 < limit <= 1000:
            return error(req.id, "limit must be an integer from 1 to 1000")
        where, params = ("where agent = %s", (agent, limit)) if agent else ("", (limit,))
        with self.db.tx() as c:
            rows = c.execute(f"select {RUN_COLUMNS} from runs {where} order by started desc "
                             "limit %s", params).fetchall()
        names = [n.strip() for n in RUN_COLUMNS.split(",")]
        return ok(req.id, [dict(zip(names, r, strict=True)) for r in rows])

    # -- status ---------------------------------------------------------------------------------------------
    def _extend_status(self, snapshot: dict) -> None:
        try:
            with self.db.tx() as conn:
                hosts = list_hosts(conn, self.settings.lease_s)
                leader = current_leader(conn)
                last = {a: (h, o, e) for a, h, o, e in conn.execute(
                    "select distinct on (agent) agent, host, outcome, ended from runs "
                    "order by agent, started desc")}
                running = {a: h for a, h in conn.execute(
                    "select agent, host from runs where ended is null")}
                # A live run lease is the truth for cluster-wide agents: an open run record
                # of a dead host stays open until the leader closes it.
                running.update(shared_agents.running_hosts(conn))
        except (psycopg.Error, ConnectionError) as exc:
            snapshot["cluster"] = {"host": self.host, "error": str(exc)}
            return
        for host in hosts:
            host["leader"] = host["host"] == leader["host"]
        snapshot["cluster"] = {"host": self.host, "leader": leader["host"],
                               "leader_token": leader["token"], "hosts": hosts}
        for agent in snapshot["agents"]:
            host, outcome, ended = last.get(agent["agent"], (None, None, None))
            agent["last_host"] = host
            agent["running_on"] = running.get(agent["agent"])
            if ended is not None and (agent["last_ended"] or 0) < ended:
                agent["last_outcome"], agent["last_ended"] = outcome, ended

    def status(self) -> dict:
        leading = self.leadership.leading if self.leadership else False
        return {"host": self.host, "leader": leading, "schema": self.settings.schema,
                "summary": f"cluster: host {self.host}" + (" (leader)" if leading else "")}
