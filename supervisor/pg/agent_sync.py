"""Agent state kept the same on every host, seen from this daemon: which host runs a firing
(slot claims), where an agent runs (run leases, overlap across hosts), pause flags,
crash-loop cool-downs and `after:` hand-offs (pg/agents.py has the SQL). The pipeline calls
`claim_firing` and `claim_run` before it starts anything; the cluster's poll calls `sync`.
"""

from __future__ import annotations

import time

import structlog

from ..config.schema import Overlap
from ..core.firing import Fire
from ..core.states import AgentState
from ..runs.agents import cooldown_s
from . import agents as shared_agents
from .claims import CLAIMED_TRIGGERS, claim_firing, pinned_host
from .db import STORAGE_ERRORS, one_line

log = structlog.get_logger("watchkeeper.pg.cluster")

CLAIMS_REMEMBERED = 1000


class AgentSync:
    """Owned by the Cluster, whose connection, host name, settings and outage handling it
    uses; all of it runs on the loop's thread."""

    def __init__(self, cluster) -> None:
        self.cluster = cluster
        self.waiting: dict[str, Fire] = {}       # queue/replace behind another host's run
        self._flags_seq = 0                       # agent_flags changes seen up to here
        self._applying_flags = False
        self._unshared_pauses: dict[str, bool] = {}
        self._claimed: dict[tuple, Fire] = {}    # slot -> the Fire that claimed it here

    @property
    def db(self):
        return self.cluster.db

    @property
    def host(self) -> str:
        return self.cluster.host

    @property
    def settings(self):
        return self.cluster.settings

    @property
    def services(self):
        return self.cluster.services

    def _storage_failed(self, exc: Exception) -> None:
        self.cluster._storage_failed(exc)

    def _storage_ok(self) -> None:
        self.cluster._storage_ok()

    def _guarded(self, duty) -> None:
        self.cluster._guarded(duty)

    def claim_firing(self, fire, spec, job) -> str:
        """Empty when this host runs the firing, else why another host does (or none)."""
        pin = pinned_host(spec, job)
        if pin is not None and pin != self.host and fire.trigger != "manual":
            if fire.trigger.startswith("after:"):
                return self._hand_off(pin, fire)
            return f"pinned to host {pin}"
        try:
            seen = shared_agents.view(self.db, fire.agent)
            if fire.trigger != "manual" and seen.paused_by is not None:
                return f"paused (on host {seen.paused_by})"
            if fire.trigger != "manual" and seen.cooldown_host is not None:
                return f"crash loop cool-down (after a crash loop on host {seen.cooldown_host})"
            winner = None
            if fire.trigger in CLAIMED_TRIGGERS:
                winner, slot = claim_firing(self.db, self.host, fire.agent, job, fire.at)
        except STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            return f"shared storage unreachable, not claimed: {one_line(exc)}"
        if winner == self.host:
            # The same Fire coming back from a queue may run; a second firing into a slot
            # this host already ran (a late scheduler catching up) may not.
            if self._claimed.get((fire.agent, job.id, slot)) is not fire:
                return "slot already run on this host"
        elif winner:
            return f"claimed by host {winner}"
        elif fire.trigger in CLAIMED_TRIGGERS:
            self._remember_claim((fire.agent, job.id, slot), fire)
        if seen.holder not in (None, self.host) and not spec.per_host:
            return self._overlap_elsewhere(fire, job, seen.holder)
        return ""

    def _remember_claim(self, key: tuple, fire) -> None:
        self._claimed[key] = fire
        while len(self._claimed) > CLAIMS_REMEMBERED:
            del self._claimed[next(iter(self._claimed))]

    def _overlap_elsewhere(self, fire, job, holder: str) -> str:
        """The job's overlap policy, when its agent runs on another host."""
        if job.overlap == Overlap.SKIP:
            return f"already running on host {holder}"
        self.waiting[fire.agent] = fire
        if job.overlap == Overlap.REPLACE:
            self._guarded(lambda: shared_agents.request_stop(self.db, self.host, fire.agent))
            log.info("firing_replacing_peer_run", agent=fire.agent, job=job.id, host=holder)
            return f"replacing the run on host {holder} (starts here when it ends)"
        log.info("firing_queued", agent=fire.agent, job=job.id, host=holder)
        return f"queued behind the run on host {holder}"

    def _hand_off(self, pin: str, fire) -> str:
        try:
            shared_agents.hand_off(self.db, pin, fire.agent, fire.job, fire.trigger)
        except STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            return f"pinned to host {pin}; shared storage unreachable, not handed off: {exc}"
        return f"handed to host {pin}"

    def claim_run(self, rt, job) -> str:
        """Take the agent's run lease before a start: empty when taken, else where it runs."""
        if rt.spec.per_host:
            return ""
        try:
            holder = shared_agents.take_run_lease(self.db, self.host, rt.name,
                                                  self.settings.lease_s)
        except STORAGE_ERRORS as exc:
            self._storage_failed(exc)
            return f"shared storage unreachable, cannot take the run lease: {one_line(exc)}"
        if holder is not None:
            return f"running on host {holder}"
        self.cluster.run_leases.add(rt.name)
        return ""

    def sync(self) -> None:
        """Adopt peers' pause changes, take hand-offs, and start what waited for a free lease:
        queued firings, and `always` jobs whose instance is gone (its host died or froze)."""
        pipeline = self.services.pipeline
        self._push_unshared_pauses()
        with self.db.tx() as conn:
            changes, self._flags_seq = shared_agents.paused_changes(conn, self._flags_seq)
            handed = shared_agents.take_handoffs(conn, self.host)
            seen = shared_agents._views(conn, tuple(pipeline.agents))
        self._storage_ok()
        for agent, paused in changes.items():
            rt = pipeline.agents.get(agent)
            if rt is not None and rt.paused != paused:
                self._applying_flags = True
                try:
                    pipeline.set_paused([agent], paused)
                finally:
                    self._applying_flags = False
        for agent, job, trigger in handed:
            log.info("firing_handed_over", agent=agent, job=job, trigger=trigger)
            pipeline.fire(Fire(agent, job, trigger, time.time()))
        if not pipeline.accepting or pipeline.halted:
            return
        for agent, fire in list(self.waiting.items()):
            if seen.get(agent) is not None and seen[agent].holder is None:
                del self.waiting[agent]
                pipeline.fire(fire)
        for name, rt in list(pipeline.agents.items()):
            view = seen.get(name)
            if view is None or rt.spec.per_host or rt.run is not None or rt.paused:
                continue
            jobs = [j for j in rt.always_jobs() if pinned_host(rt.spec, j) in (None, self.host)]
            if (jobs and rt.state == AgentState.IDLE and view.holder is None
                    and view.paused_by is None and view.cooldown_host is None):
                pipeline.fire(Fire(name, jobs[0].id, "always", time.time()))

    def paused(self, names: list[str], paused: bool) -> None:
        """`pause`/`resume` on this host act on the cluster."""
        if self._applying_flags:
            return
        for name in names:
            self._unshared_pauses[name] = paused
        self._guarded(self._push_unshared_pauses)

    def _push_unshared_pauses(self) -> None:
        for paused in (True, False):
            names = [n for n, p in self._unshared_pauses.items() if p is paused]
            if names:
                shared_agents.set_paused(self.db, self.host, names, paused)
                for name in names:
                    self._unshared_pauses.pop(name, None)

    def crash_loop(self, rt) -> None:
        """A crash loop's cool-down holds on every host (on the server's clock)."""
        if rt.spec.per_host:
            return
        delay = cooldown_s(self.services.config.settings.crash_loop, rt.cooldowns)
        self._guarded(lambda: shared_agents.start_cooldown(self.db, self.host, rt.name, delay))
