"""Control commands: who may call them, and what they do to the daemon.

Three kinds of caller, told apart by what the kernel says (SO_PEERCRED, SO_PEERGROUPS, the
peer's run cgroup and parent chain; kernel/authz.py), never by what the caller says:
- admin: root, the daemon's own user or a member of `socket_group` (pause, reload, ...),
  and only from outside every run: a process the daemon started (an agent, or anything it
  spawned, re-parented or not) is refused admin verbs unless its agent's `permissions:`
  grants that verb;
- a run: carries run_id + token of a live run, and its peer pid belongs to that run (and,
  with per-agent users, runs as that agent's uid); it may act only as its own agent
  (heartbeat, lock, emit, memory writes);
- read-only commands (status, memory-get, ...) for admins and agents' runs; other local
  users who can open the socket get `ping` only.
"""

from __future__ import annotations

import grp
import os
import time

import structlog

from .. import __version__
from ..core.feature import Feature
from ..core.firing import Fire
from ..core.hashing import compare_digest
from ..errors import LockBusy
from ..kernel.authz import place
from ..kernel.peers import peer_groups
from ..runs.locks import acquire, list_locks, validate_task_id
from ..runs.runner import Run
from .commands import check_args
from .protocol import Request, error, ok
from .server import Connection
from .table import CommandTable, Handler, command

log = structlog.get_logger("watchkeeper.control")

# The core's own commands; each feature serves its own through Feature.commands().
CORE = CommandTable()
READ_ONLY, ADMIN, AGENT = CORE.read_only, CORE.admin, CORE.agent


class Handlers(Feature):
    """The control commands' dispatcher, and the first feature: it releases the task locks
    it took for a run when the run ends."""

    name = "control"

    def __init__(self, daemon) -> None:
        self.daemon = daemon
        self.held_locks: dict[str, list] = {}  # run id -> locks held on the run's behalf
        self.served = CommandTable()
        self.overrides: dict[str, Handler] = {}

    def serve(self, features) -> None:
        """Build the command table from the core's and every feature's commands; called
        once the features have started, before the loop reads the first request."""
        served = CommandTable()
        served.merge(CORE)
        for feature in features:
            table = feature.commands()
            if table is not None:
                served.merge(table)
        overrides: dict[str, Handler] = {}
        for feature in features:
            overrides.update(feature.command_overrides(served))
        self.served, self.overrides = served, overrides

    def run_finished(self, run: Run, record) -> None:
        self.run_ended(run)

    # -- dispatch -----------------------------------------------------------------------------
    def dispatch(self, conn: Connection, req: Request) -> bytes | None:
        if (invalid := check_args(req)) is not None:
            return invalid
        # A storage backend may serve a command differently (task locks in PostgreSQL);
        # who may call it is still decided by the table the command is in.
        impl = self.overrides.get(req.cmd)
        served = self.served
        if req.cmd in served.read_only:
            if req.cmd != "ping" and not self.may_read(conn):
                log.warning("control_denied", cmd=req.cmd, peer_uid=conn.peer.uid,
                            peer_pid=conn.peer.pid, reason="not a known caller")
                return error(req.id, f"permission denied: {req.cmd!r} needs root, the "
                                     "daemon's user or group, the socket group or an "
                                     "agent's run")
            return (impl or served.read_only[req.cmd])(self, conn, req)
        if req.cmd in served.agent:
            run = self.authenticate_run(conn, req)
            if isinstance(run, bytes):
                return run
            return (impl or served.agent[req.cmd])(self, conn, req, run)
        if req.cmd in served.admin:
            refusal = self.admin_refusal(conn, req.cmd)
            if refusal:
                log.warning("control_denied", cmd=req.cmd, peer_uid=conn.peer.uid,
                            peer_pid=conn.peer.pid, reason=refusal)
                return error(req.id, f"permission denied: {req.cmd!r} {refusal}")
            return (impl or served.admin[req.cmd])(self, conn, req)
        known = ", ".join(sorted(served.names()))
        return error(req.id, f"unknown command {req.cmd!r} (known: {known})")

    def admin_refusal(self, conn: Connection, cmd: str) -> str:
        """Why this peer may not run admin verb `cmd` ("" when it may). Inside a run the
        answer is the agent's `permissions:`, whatever the peer's uid: agents may run as
        the daemon's user (the demo) and an agent must not switch its supervisor off."""
        where = place(conn.peer.pid, self.daemon.pipeline, self.daemon.cgroups)
        inside = where.inside
        if inside is None:  # /proc hides the peer from us: its uid decides
            inside = conn.peer.uid in self.daemon.agent_uids
        if inside:
            spec = self._spec_of(where.run)
            if spec is not None and cmd in spec.permissions:
                return ""
            agent = f"agent {spec.name!r}" if spec is not None else "an agent"
            return (f"is refused from inside a run (the caller was started by {agent}); "
                    f"grant it with `permissions: [{cmd}]` in that agent's file")
        if self.is_admin(conn):
            return ""
        return "needs root, the daemon's user or the socket group"

    def may_read(self, conn: Connection) -> bool:
        """Read-only commands are for the operator and the agents, not for every local
        user who can open the socket (0666 when agents have uids of their own): status,
        outputs and memory say what the agents are doing."""
        if self.is_admin(conn) or conn.peer.uid in self.daemon.agent_uids:
            return True
        if self.in_daemons_group(conn):
            return True
        return bool(place(conn.peer.pid, self.daemon.pipeline, self.daemon.cgroups).inside)

    def in_daemons_group(self, conn: Connection) -> bool:
        """A member of the daemon's own group (`watchkeeper` under the unit), primary or
        supplementary: the operators `install-systemd` makes may read without
        `socket_group`; agents run with no supplementary group, so never by this."""
        gid = os.getgid()
        return conn.peer.gid == gid or gid in peer_groups(conn.sock, conn.peer.pid)

    def _spec_of(self, run: Run | None):
        if run is None:
            return None
        rt = self.daemon.pipeline.agents.get(run.agent)
        return rt.spec if rt is not None else None

    def is_admin(self, conn: Connection) -> bool:
        peer = conn.peer
        if peer.uid in (0, os.getuid()):
            return True
        if peer.uid in self.daemon.agent_uids:
            return False  # an agent's uid, even from a process that left the daemon's tree
        group = self.daemon.config.settings.socket_group
        if not group:
            return False
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            return False
        return peer.gid == gid or gid in peer_groups(conn.sock, peer.pid)

    def authenticate_run(self, conn: Connection, req: Request) -> Run | bytes:
        """The run named by run_id, if the token matches and the kernel places the peer in
        that run (its cgroup or parent chain, and its uid when agents have their own); an
        error reply otherwise."""
        run = self.daemon.pipeline.runs.get(req.run_id or "")
        if run is None or not req.token or not compare_digest(run.token, req.token):
            return error(req.id, "not a live run: this command needs WATCHKEEPER_RUN_ID and "
                                 "WATCHKEEPER_RUN_TOKEN of a running agent")
        # The peer pid is fixed for the life of the connection (SO_PEERCRED at connect), so
        # proving it belongs to the run once is enough; a high-rate writer skips /proc reads.
        if conn.verified_run != run.run_id and not self._peer_belongs_to(conn, run):
            log.warning("control_impersonation_refused", run_id=run.run_id,
                        peer_pid=conn.peer.pid, peer_uid=conn.peer.uid)
            return error(req.id, "permission denied: the calling process is not part of "
                                 f"run {run.run_id}")
        conn.verified_run = run.run_id
        return run

    def _peer_belongs_to(self, conn: Connection, run: Run) -> bool:
        """The kernel places the peer in the run: in its cgroup, or below its root process.
        A process that left the run's tree (re-parented to the daemon) is accepted only when
        its uid is the run's own agent uid, which no other agent has: its environment
        proves nothing, anyone can set WATCHKEEPER_RUN_ID and copy a token."""
        run_uid = run.uid
        if run_uid is not None and conn.peer.uid != run_uid:
            return False
        where = place(conn.peer.pid, self.daemon.pipeline, self.daemon.cgroups)
        if where.run is run:
            return True
        return bool(where.orphan and run_uid is not None)

    def run_ended(self, run: Run) -> None:
        for held in self.held_locks.pop(run.run_id, []):
            held.release()


def _agent_names(h: Handlers, req: Request) -> list[str] | bytes:
    name = req.args.get("agent")
    agents = h.daemon.pipeline.agents
    if name is None:
        return list(agents)
    if name not in agents:
        return error(req.id, f"unknown agent {name!r} (known: {', '.join(sorted(agents))})")
    return [name]


# -- read-only -------------------------------------------------------------------------------
@command(READ_ONLY, "ping")
def _ping(h: Handlers, conn, req):
    return ok(req.id, {"pid": os.getpid(), "version": __version__})


@command(READ_ONLY, "status")
def _status(h: Handlers, conn, req):
    return ok(req.id, status_snapshot(h.daemon))


@command(READ_ONLY, "runs")
def _runs(h: Handlers, conn, req):
    limit = req.args.get("limit", 20)
    if not isinstance(limit, int) or not 0 < limit <= 1000:
        return error(req.id, "limit must be an integer from 1 to 1000")
    records = h.daemon.store.recent_runs(req.args.get("agent"), limit)
    return ok(req.id, [r.__dict__ for r in records])


@command(READ_ONLY, "locks")
def _locks(h: Handlers, conn, req):
    return ok(req.id, [{"task": t, "held": held, "owner": o.__dict__ if o else None}
                       for t, o, held in list_locks(h.daemon.state_dir)])


def status_snapshot(daemon) -> dict:
    agents = []
    for name, rt in sorted(daemon.pipeline.agents.items()):
        nexts = [daemon.scheduler.next_fire(name, j.id) for j in rt.spec.jobs]
        nexts = [n for n in nexts if n is not None]
        agents.append({
            "agent": name,
            "state": rt.state.value,
            "paused": rt.paused,
            "degraded": rt.degraded,
            "run_id": rt.run.run_id if rt.run else None,
            "pid": rt.run.pid if rt.run else None,
            "job": rt.run.job.id if rt.run else None,
            "failures": rt.failures,
            "last_outcome": rt.last_outcome,
            "last_exit": rt.last_exit,
            "last_ended": rt.last_ended,
            "next_run": min(nexts).timestamp() if nexts else None,
        })
    snapshot = {
        "daemon": {"pid": os.getpid(), "version": __version__, "state": daemon.state.value,
                   "uptime_s": round(daemon.uptime_s(), 1), "state_dir": str(daemon.state_dir),
                   "halted": daemon.pipeline.halted,
                   "cgroups": str(daemon.cgroups.base) if daemon.cgroups else None},
        "agents": agents,
        "extensions": daemon.features.status(),
    }
    daemon.features.extend_status(snapshot)  # e.g. every host, on PostgreSQL
    return snapshot


# -- admin ---------------------------------------------------------------------------------
@command(ADMIN, "start-now")
def _start_now(h: Handlers, conn, req):
    names = _agent_names(h, req)
    if isinstance(names, bytes):
        return names
    if req.args.get("agent") is None:
        return error(req.id, "start-now needs an agent")
    rt = h.daemon.pipeline.agents[names[0]]
    job_id = req.args.get("job") or rt.spec.jobs[0].id
    if rt.job(job_id) is None:
        return error(req.id, f"agent {rt.name!r} has no job {job_id!r} "
                             f"(jobs: {', '.join(j.id for j in rt.spec.jobs)})")
    result = h.daemon.pipeline.fire(Fire(rt.name, job_id, "manual", time.time()))
    run = rt.run
    if result in START_REFUSALS or result.startswith("refused: "):
        # An error reply, so that `watchkeeper start-now` exits non-zero with the reason.
        reason = result.removeprefix("refused: ")
        return error(req.id, f"start-now {rt.name}: refused: {reason}", refused=True,
                     result=result, run_id=None)
    return ok(req.id, {"result": result, "run_id": run.run_id if run else None})


START_REFUSALS = frozenset({"shutting down", "pipeline halted by the circuit breaker",
                            "unknown"})


@command(ADMIN, "pause")
def _pause(h: Handlers, conn, req):
    names = _agent_names(h, req)
    if isinstance(names, bytes):
        return names
    return ok(req.id, {"paused": h.daemon.pipeline.set_paused(names, True)})


@command(ADMIN, "resume")
def _resume(h: Handlers, conn, req):
    names = _agent_names(h, req)
    if isinstance(names, bytes):
        return names
    if h.daemon.pipeline.halted:
        return error(req.id, "resume refused: the pipeline is halted by the circuit breaker, "
                     "so nothing would run; `watchkeeper breaker reset --reason TEXT` resumes it",
                     refused=True)
    return ok(req.id, {"resumed": h.daemon.pipeline.set_paused(names, False)})


@command(ADMIN, "reload")
def _reload(h: Handlers, conn, req):
    errors = h.daemon.reload()
    if errors:
        return error(req.id, "reload rejected; still running the previous configuration",
                     errors=errors)
    return ok(req.id, {"agents": len(h.daemon.config.agents)})


@command(ADMIN, "stop")
def _stop(h: Handlers, conn, req):
    h.daemon.request_stop("control")
    return ok(req.id, {"stopping": True})


# -- agents, as themselves ----------------------------------------------------------------------
@command(AGENT, "lock")
def _lock(h: Handlers, conn, req, run: Run):
    task = req.args.get("task")
    try:
        validate_task_id(task if isinstance(task, str) else "")
        held = acquire(h.daemon.state_dir, task, agent=run.agent, run_id=run.run_id,
                       pid=run.pid)
    except ValueError as exc:
        return error(req.id, str(exc))
    except LockBusy as exc:
        return error(req.id, str(exc), busy=True)
    h.held_locks.setdefault(run.run_id, []).append(held)
    log.info("lock_acquired", agent=run.agent, run_id=run.run_id, task=task)
    return ok(req.id, {"task": task})


@command(AGENT, "unlock")
def _unlock(h: Handlers, conn, req, run: Run):
    task = req.args.get("task")
    held = h.held_locks.get(run.run_id, [])
    for lock in held:
        if lock.path.name == f"{task}.lock":
            lock.release()
            held.remove(lock)
            return ok(req.id, {"task": task})
    return error(req.id, f"run {run.run_id} does not hold task {task!r}")
