"""The output gate: every output an agent publishes is announced here first.

Each `emit` is recorded and checked by the circuit breaker (breaker/breaker.py). The (N+1)th output
in the window is denied and trips the breaker: the whole pipeline halts (no run starts,
every run is stopped) and exactly one alert goes out (alerts/sender.py). The breaker's state
and the trip's alert commit in one transaction, so a restarted daemon comes back halted and
still owes (and sends) the alert.
"""

from __future__ import annotations

import time

import msgspec
import structlog

from ..alerts.alerts import Alert, AlertKind, alert_command_sessions, trip_alert
from ..alerts.sender import AlertSender
from ..breaker.breaker import (
    Breaker,
    BreakerSettings,
    BreakerState,
    Decision,
    SnapshotError,
    content_hash,
    longest_window_s,
)
from ..breaker.defaults import RESTART_TRIGGERS, derived_limits
from ..breaker.rules import launch_limit
from ..control.protocol import error, ok
from ..control.table import CommandTable, command
from ..core.feature import Feature, Services

log = structlog.get_logger("watchkeeper.outputs")

MAX_SUMMARY_CHARS = 500
SNAPSHOT_KEY = "breaker"
COMMANDS = CommandTable()


def merged_breaker_settings(config) -> BreakerSettings:
    """The main file's breaker section with each agent file's `limits:` folded in, and every
    limit left unset derived from that agent's schedule (breaker/defaults.py)."""
    settings = config.settings.breaker
    agents = dict(settings.agents)
    for name, spec in config.agents.items():
        if spec.limits is not None:
            agents[name] = spec.limits
    explicit = msgspec.structs.replace(settings, agents=agents)
    derived = {name: derived_limits(explicit, config.agents, name) for name in config.agents}
    return msgspec.structs.replace(settings, agents={**agents, **derived})


class OutputGate(Feature):
    name = "breaker"

    def __init__(self) -> None:
        self.services: Services | None = None
        self.breaker: Breaker | None = None
        self.alerter: AlertSender | None = None
        self._next_outbox_prune = 0.0

    def start(self, services: Services) -> None:
        self.services = services
        self.alerter = AlertSender(services.config.settings.alerts, services.store,
                                   services.timers)
        self.breaker = Breaker(merged_breaker_settings(services.config),
                               persist=self.persist_snapshot)
        snapshot = services.store.get_value(SNAPSHOT_KEY)
        if snapshot:
            try:
                self.breaker.restore(snapshot)
            except SnapshotError as exc:
                log.error("breaker_snapshot_unreadable", error=str(exc),
                          hint="starting with a closed breaker")
        self._recount()
        if self.breaker.state == BreakerState.OPEN:
            trip = self.breaker.last_trip
            log.critical("pipeline_halted_at_start", agent=trip.agent if trip else None,
                         hint="`watchkeeper breaker reset --reason ...` resumes the pipeline")
            services.pipeline.halted = True
        # After the halt is restored: an alert its predecessor still owed goes out now.
        self.alerter.attach(services.selector)

    def reload(self, config) -> None:
        self.breaker.apply_settings(merged_breaker_settings(config))

    def stop(self) -> None:
        self.persist_snapshot(self.breaker.snapshot())
        self.alerter.close(timeout_s=5.0)

    def own_sessions(self) -> frozenset[int]:
        return alert_command_sessions()

    def _recount(self) -> None:
        """Windows from the store's rows, not the snapshot's: the snapshot may predate a
        SIGKILL by many accepted outputs."""
        breaker = self.breaker
        since = max(breaker.windows_since_wall, time.time() - longest_window_s(breaker.settings))
        uncounted = () if breaker.settings.launches.count_restarts else RESTART_TRIGGERS
        counted = breaker.recount(self.services.store.breaker_events(since, uncounted))
        if counted:
            log.info("breaker_windows_recounted", events=counted)

    def persist_snapshot(self, snapshot: dict) -> None:
        """Where the breaker keeps its state: this host's SQLite store."""
        self.services.store.put_value(SNAPSHOT_KEY, snapshot)

    def use_breaker(self, breaker) -> None:
        """Decide with another breaker from now on (shared storage's, pg/breaker.py)."""
        self.breaker = breaker

    # -- decisions -------------------------------------------------------------------------
    def decide(self, check, *args) -> Decision:
        """Run one breaker check and act on it in one transaction: the new state and its
        alert commit together."""
        with self.services.store.transaction():
            return self.handle(check(*args))

    def handle(self, decision: Decision) -> Decision:
        """Act on a decision: a trip halts the pipeline and sends the one alert."""
        if decision.trip is not None:
            trip = decision.trip
            log.critical("breaker_tripped", agent=trip.agent, rule=trip.rule.value,
                         limit=trip.limit, count=trip.count, window_s=trip.window_s,
                         setting=trip.setting)
            self.services.pipeline.halt()
            self.alerter.send(trip_alert(trip))
        return decision

    def may_launch(self, agent: str, trigger: str = "") -> str | None:
        if trigger in RESTART_TRIGGERS and not launch_limit(self.breaker.settings,
                                                            agent).count_restarts:
            # The crash-loop policy contains restarts; counting them halted every healthy
            # agent because one `always` agent crash-looped.
            return "breaker open" if self.breaker.state == BreakerState.OPEN else None
        decision = self.decide(self.breaker.check_launch, agent)
        return None if decision.allowed else decision.reason

    def tick(self, now_mono: float) -> None:
        if now_mono >= self._next_outbox_prune:
            self._next_outbox_prune = now_mono + 3600.0
            self.alerter.prune()
        changed = self.breaker.tick()
        if changed == BreakerState.HALF_OPEN:
            log.warning("breaker_half_open", hint="scheduling resumes with a probe budget")
            self.services.pipeline.unhalt()

    def crash_loop(self, rt) -> None:
        # One alert per crash-loop episode (until the agent succeeds again): its further
        # cool-downs are in `status` (state failed, failures), not a page every cool-down.
        if rt.cooldowns > 1:
            return
        policy = self.services.config.settings.crash_loop
        self.alerter.send(Alert(
            kind=AlertKind.CRASH_LOOP, agent=rt.name,
            title=f"watchkeeper: {rt.name} is crash looping",
            text=(f"{rt.failures} consecutive failures; last {rt.last_exit}. It cools down "
                  f"({policy.cooldown_s:g}s, doubling up to {policy.cooldown_max_s:g}s) and "
                  "retries; the rest of the pipeline keeps running. No further alert until "
                  "it succeeds again.")))

    def reset(self, by: str, reason: str) -> bool:
        with self.services.store.transaction():
            was_open = self.breaker.reset(by, reason)
            log.warning("breaker_reset", by=by, reason=reason, was_open=was_open)
            if was_open:
                self.alerter.send(Alert(kind=AlertKind.BREAKER_RESET, title="watchkeeper: "
                                        "breaker reset", text=f"reset by {by}: {reason}"))
        self.services.pipeline.unhalt()
        return was_open

    def status(self) -> dict:
        trip = self.breaker.last_trip
        owed = self.alerter.undelivered()
        summary = f"breaker {self.breaker.state.value}"
        if owed.count:
            summary += (f"; {owed.count} alert(s) undelivered, oldest {owed.oldest_age_s:.0f}s"
                        + (f" ({owed.last_error[:80]})" if owed.last_error else ""))
        return {"state": self.breaker.state.value, "trips_total": self.breaker.trips_total,
                "last_trip": msgspec.to_builtins(trip) if trip else None,
                "alerts": owed.as_dict(), "summary": summary}

    def commands(self) -> CommandTable:
        return COMMANDS


def _gate(h) -> OutputGate:
    return h.daemon.features.find(OutputGate)


@command(COMMANDS.agent, "emit")
def _emit(h, conn, req, run):
    args = req.args
    kind = args.get("kind")
    summary = args.get("summary", "")
    content = args.get("content")
    if not isinstance(kind, str) or not kind or len(kind) > 64:
        return error(req.id, "emit needs `kind`: a string of 1 to 64 characters")
    if not isinstance(summary, str) or (content is not None and not isinstance(content, str)):
        return error(req.id, "`summary` and `content` must be strings")
    digest = args.get("content_hash") or content_hash(content if content is not None else summary)
    gate = _gate(h)
    # The output is stored in the transaction of its verdict, before the agent hears
    # `allowed`: the windows are rebuilt from these rows after a crash.
    with h.daemon.store.transaction():
        decision = gate.handle(gate.breaker.check_output(run.agent, kind, digest,
                                                         summary[:MAX_SUMMARY_CHARS]))
        h.daemon.store.record_output(run.agent, run.run_id, kind, time.time(), digest,
                                     summary[:MAX_SUMMARY_CHARS], decision.allowed)
    log.info("output_emitted" if decision.allowed else "output_denied", agent=run.agent,
             run_id=run.run_id, kind=kind, summary=summary[:120], reason=decision.reason or None)
    if not decision.allowed:
        return error(req.id, f"denied: {decision.reason}", denied=True, reason=decision.reason)
    return ok(req.id, {"allowed": True})


@command(COMMANDS.agent, "usage")
def _usage(h, conn, req, run):
    tokens, cost = req.args.get("tokens", 0), req.args.get("cost", 0.0)
    if not isinstance(tokens, int) or not isinstance(cost, int | float):
        return error(req.id, "usage needs integer `tokens` and numeric `cost`")
    gate = _gate(h)
    with h.daemon.store.transaction():
        decision = gate.handle(gate.breaker.report_usage(run.agent, tokens, float(cost)))
        h.daemon.store.record_usage(run.agent, run.run_id, time.time(), tokens, float(cost),
                                    str(req.args.get("model", ""))[:64])
    if not decision.allowed:
        return error(req.id, f"denied: {decision.reason}", denied=True, reason=decision.reason)
    return ok(req.id, {"allowed": True})


@command(COMMANDS.read_only, "outputs")
def _outputs(h, conn, req):
    agent, limit = req.args.get("agent"), req.args.get("limit", 50)
    if (agent is not None and not isinstance(agent, str)) or not isinstance(limit, int) or \
            not 0 < limit <= 1000:
        return error(req.id, "outputs takes optional `agent` (string) and `limit` (1-1000)")
    return ok(req.id, h.daemon.store.recent_outputs(agent, limit))


@command(COMMANDS.read_only, "breaker-status")
def _breaker_status(h, conn, req):
    return ok(req.id, _gate(h).status())


@command(COMMANDS.admin, "breaker-reset")
def _breaker_reset(h, conn, req):
    reason = req.args.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        return error(req.id, "breaker reset needs a --reason (it is logged and alerted)")
    who = f"uid {conn.peer.uid} pid {conn.peer.pid}"
    return ok(req.id, {"was_open": _gate(h).reset(who, reason.strip())})
