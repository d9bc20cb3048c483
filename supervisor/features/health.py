"""Health in the loop: heartbeats (stale policy, degraded downstreams) and the memory guard.

The pure parts live in health/heartbeat.py and health/memguard.py; this module connects them to the
pipeline: it decides a run's degraded upstreams before it starts, applies the stale policy
to running agents, performs the guard's actions, and serves the `heartbeat` command.
"""

from __future__ import annotations

import functools
import os
import selectors
import time

import structlog

from ..alerts.alerts import Alert, AlertKind
from ..config.schema import AgentSpec
from ..control.protocol import error, ok
from ..control.table import CommandTable, command
from ..core.feature import Feature, Services
from ..core.firing import Fire
from ..core.states import Outcome, RunState, StopReason
from ..health.heartbeat import (
    DegradationTracker,
    OnStale,
    Verdict,
    first_beat_due_s,
    heartbeat_path,
    heartbeat_verdict,
    load_heartbeat,
    stale_response,
    upstream_status,
    write_heartbeat,
)
from ..health.memguard import AgentMemorySettings, MemoryGuard, StopRun, Unrelieved
from ..kernel.cgroup_events import TrackedThreshold, UsageThreshold
from ..kernel.cgroups import RunCgroups
from ..kernel.forkwatch import ForkWatch
from ..kernel.lineage import subtree
from ..kernel.procscan import LiveRun
from ..kernel.proctree import last_pid_created, tree_children
from ..kernel.psi import SYSTEM_MEMORY_PRESSURE, PressureTrigger
from .output_gate import OutputGate

log = structlog.get_logger("watchkeeper.health")

DEGRADED_CHECK_INTERVAL_S = 5.0
# Process caps are checked this soon after our tree grew (kernel/forkwatch.py), or this often
# while a run is live where the kernel does not tell us of forks; not only on the tick (10 s
# by default): a fork bomb makes thousands of processes in that time.
CAP_CHECK_INTERVAL_S = 0.25
COMMANDS = CommandTable()


class Health(Feature):
    name = "health"

    def __init__(self) -> None:
        self.services: Services | None = None
        self.tracker = DegradationTracker()
        self.guard: MemoryGuard | None = None
        self._guard_timer = None
        self._pressure: list[PressureTrigger | UsageThreshold | TrackedThreshold] = []
        self._stale_runs: set[str] = set()  # runs whose stale heartbeat was already handled
        # run id -> wall-clock time its heartbeat can first turn stale: the file is read then,
        # not every tick (a beat only moves that time later).
        self._beat_due: dict[str, float] = {}
        self._next_degraded_check = 0.0
        self._caps_checked_at_pid: int | None = None
        self._inherited_agents: set[str] = set()  # degraded only through an upstream
        self._cap_timer = None
        self._forks: ForkWatch | None = None  # None: caps are polled while runs live

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self, services: Services) -> None:
        self.services = services
        self._forks = ForkWatch.open({os.getpid()})
        if self._forks is not None:
            services.selector.register(self._forks.fileno(), selectors.EVENT_READ,
                                       self._on_forks)
        self._make_guard()

    def reload(self, config) -> None:
        self._make_guard()

    def run_started(self, run) -> None:
        self._arm_cap_checks()

    def orphans_reaped(self) -> None:
        self._enforce_process_caps()

    def stop(self) -> None:
        if self._guard_timer is not None:
            self._guard_timer.cancel()
        self._close_pressure_trigger()
        if self._forks is not None:
            self._unwatch_forks()
            self._forks.close()

    def _make_guard(self) -> None:
        services = self.services
        if self._guard_timer is not None:
            self._guard_timer.cancel()
        self.guard = MemoryGuard(
            services.config.settings.memory_guard, daemon_pid=os.getpid(),
            state_dir=str(services.state_dir),
            live_runs=self._live_runs, agent_settings=self._agent_memory,
            run_pids=self._run_pids)
        self._arm_pressure_trigger()
        self._guard_timer = services.timers.call_later(0, self._guard_tick)

    def _arm_pressure_trigger(self) -> None:
        """Where the kernel can tell, it wakes the guard on memory pressure: PSI triggers
        (kernel/psi.py) on the machine and on the runs' cgroups when the daemon owns them, and
        usage thresholds at warn and act percent of a cgroup v1 `scope_cgroup`
        (kernel/cgroup_events.py). With the machine's PSI trigger the guard samples only slowly."""
        self._close_pressure_trigger()
        settings = self.services.config.settings.memory_guard
        if not settings.pressure_stall_ms:
            return
        paths = [SYSTEM_MEMORY_PRESSURE]
        cgroups = self.services.cgroups
        if cgroups is not None and (cgroups.base / "memory.pressure").exists():
            paths.append(str(cgroups.base / "memory.pressure"))
        triggers = [PressureTrigger.open(path, stall_ms=settings.pressure_stall_ms)
                    for path in paths]
        self.guard.kernel_notifies = triggers[0] is not None
        if settings.scope_cgroup:
            triggers += UsageThreshold.open_percents(
                settings.scope_cgroup, [settings.warn_percent, settings.act_percent])
            triggers.append(TrackedThreshold.open(settings.scope_cgroup, settings.act_percent))
        for trigger in filter(None, triggers):
            self._pressure.append(trigger)
            self.services.selector.register(trigger.fileno(), selectors.EVENT_READ,
                                          functools.partial(self._on_pressure, trigger))

    def _close_pressure_trigger(self) -> None:
        for trigger in self._pressure:
            self.services.selector.unregister(trigger.fileno())
            trigger.close()
        self._pressure = []

    def _on_pressure(self, trigger: PressureTrigger | UsageThreshold | TrackedThreshold,
                     _mask: int) -> None:
        trigger.drain()
        if self._guard_timer is not None:
            self._guard_timer.cancel()
        self._guard_tick()
        log.info("memory_pressure_notified", path=trigger.path,
                 memory_level=self.guard.level.value, samples=self.guard.samples)

    def _live_runs(self) -> dict[str, LiveRun]:
        return {r.run_id: LiveRun(r.agent, r.pid, str(r.cgroup) if r.cgroup else None)
                for r in self.services.pipeline.runs.values()}

    def _run_pids(self, run_id: str, live: LiveRun) -> list[int]:
        """A run's known processes: its own tree, and the descendants the pipeline
        attributed to it (those that left the tree); never the whole process table."""
        known = [pid for pid, rid in self.services.pipeline.owners.items() if rid == run_id]
        return [live.root_pid, *subtree(tree_children(live.root_pid), live.root_pid), *known]

    def _agent_memory(self, agent: str) -> AgentMemorySettings:
        rt = self.services.pipeline.agents.get(agent)
        if rt is None:
            return AgentMemorySettings()
        return AgentMemorySettings(memory_priority=rt.spec.memory_priority,
                                   memory_max_mb=rt.spec.memory_max_mb)

    # -- the memory guard ----------------------------------------------------------------------
    def _guard_tick(self) -> None:
        now = time.monotonic()
        try:
            actions = self.guard.tick(now)
        finally:
            delay = max(0.0, self.guard.next_tick_at - time.monotonic())
            self._guard_timer = self.services.timers.call_later(delay, self._guard_tick)
            for trigger in self._pressure:
                if isinstance(trigger, TrackedThreshold):
                    trigger.retarget()  # follows the cache at the guard's own readings
        for action in actions:
            if isinstance(action, StopRun):
                run = self.services.pipeline.runs.get(action.run_id)
                if run is not None:
                    log.warning("memory_stop_run", agent=action.agent, run_id=action.run_id,
                                memory_mb=round(action.memory_mb, 1), limit_mb=action.limit_mb,
                                reason=action.reason.value)
                    self.services.pipeline.stop_run(run, StopReason.MEMORY)
                    self._alert(AlertKind.MEMORY_KILL, action.agent,
                                f"run {action.run_id} stopped: {action.memory_mb:.0f} MB "
                                f"({action.reason.value})")
            elif isinstance(action, Unrelieved):
                self._alert(AlertKind.MEMORY_KILL, None, action.message)

    def _alert(self, kind: AlertKind, agent: str | None, text: str) -> None:
        gate = self.services.features.find(OutputGate)
        alerter = gate.alerter if gate is not None else None
        if alerter is not None:
            alerter.send(Alert(kind=kind, title=f"watchkeeper: {kind.value}", text=text,
                               agent=agent))

    # -- heartbeats --------------------------------------------------------------------------
    def degraded_upstreams(self, spec: AgentSpec) -> list[str]:
        """Upstreams of `spec` that are stale, missing or whose last run failed ("research"),
        and upstreams degraded themselves, with their chain ("content<-research")."""
        statuses = self._upstreams(spec)
        self.tracker.observe(spec.name, statuses)
        direct = sorted(name for name, st in statuses.items() if st.degraded)
        chains = [*direct, *self._inherited(spec, set(direct))]
        self._note_inherited(spec.name, direct, chains)
        rt = self.services.pipeline.agents.get(spec.name)
        if rt is not None:
            rt.degraded = chains  # what its own downstreams inherit
        return chains

    def _inherited(self, spec: AgentSpec, direct: set[str]) -> list[str]:
        """The chains of upstreams that are degraded themselves: seo, downstream of a
        degraded content, runs on drafts made without fresh notes."""
        agents = self.services.pipeline.agents
        chains = []
        for name in spec.depends_on:
            if name in direct or name not in agents:
                continue
            for chain in agents[name].degraded:
                if spec.name not in chain.split("<-"):  # a cycle would grow without end
                    chains.append(f"{name}<-{chain}")
        return sorted(chains)

    def _note_inherited(self, agent: str, direct: list[str], chains: list[str]) -> None:
        """Log entering and leaving a degradation that is only inherited (the tracker logs
        the direct ones)."""
        inherited = not direct and bool(chains)
        if inherited and agent not in self._inherited_agents:
            self._inherited_agents.add(agent)
            log.warning("agent_degraded", agent=agent, upstreams=chains,
                        reasons={c: "upstream degraded" for c in chains})
        elif not inherited and agent in self._inherited_agents:
            self._inherited_agents.discard(agent)
            if not direct:
                log.info("agent_recovered", agent=agent, upstreams=[])

    def _upstreams(self, spec: AgentSpec):
        agents = self.services.pipeline.agents
        settings = {n: agents[n].spec.heartbeat for n in spec.depends_on if n in agents}
        last_ok = {n: (None if agents[n].last_outcome is None else
                       agents[n].last_outcome == Outcome.SUCCEEDED.value)
                   for n in spec.depends_on if n in agents}
        statuses = upstream_status(self.services.state_dir, spec.depends_on, settings, last_ok,
                                   time.time())
        return {n: st for n, st in statuses.items() if not self._still_starting(n, st)}

    def _still_starting(self, name: str, status) -> bool:
        """An upstream with no heartbeat file that has not run since the daemon started,
        younger than its stale_after_s, is starting, not down: a clean start must not
        warn that every downstream is degraded before any agent could beat."""
        rt = self.services.pipeline.agents.get(name)
        return (status.verdict is Verdict.MISSING and rt is not None
                and rt.last_outcome is None
                and self.services.uptime_s() < rt.spec.heartbeat.stale_after_s)

    def tick(self, now_mono: float) -> None:
        self._check_heartbeats(time.time())
        self._enforce_process_caps()
        if now_mono >= self._next_degraded_check:
            self._next_degraded_check = now_mono + DEGRADED_CHECK_INTERVAL_S
            # Upstreams first, so a chain reaches the end of the pipeline in one check.
            for rt in _upstreams_first(self.services.pipeline.agents):
                if rt.spec.depends_on:
                    rt.degraded = self.degraded_upstreams(rt.spec)

    def _check_heartbeats(self, now: float) -> None:
        pipeline = self.services.pipeline
        for run in list(pipeline.runs.values()):
            rt = pipeline.agents.get(run.agent)
            if rt is None or run.run_id in self._stale_runs:
                continue
            settings = rt.spec.heartbeat
            due = self._beat_due.get(run.run_id)
            if due is None:
                due = self._beat_due[run.run_id] = run.started_wall + settings.stale_after_s
            if now < due:
                continue  # no beat can have gone stale yet
            reading = load_heartbeat(heartbeat_path(self.services.state_dir, run.agent))
            verdict = heartbeat_verdict(reading, settings, now, started_at=run.started_wall)
            response = stale_response(verdict, settings)
            if response is None:
                beat = reading.heartbeat
                if beat is not None and beat.ts >= run.started_wall:
                    stale_at = beat.ts + settings.stale_after_s
                else:  # in its first-beat grace: look again for the first beat
                    stale_at = min(run.started_wall + first_beat_due_s(settings),
                                   now + settings.stale_after_s)
                # Read again when this beat can first be stale, but never on the very next
                # tick: a beat exactly at the edge would otherwise be read twice.
                self._beat_due[run.run_id] = max(stale_at,
                                                 now + min(1.0, settings.stale_after_s))
                continue
            self._stale_runs.add(run.run_id)
            self._on_stale(rt, run, verdict, response)
        self._stale_runs &= set(pipeline.runs)
        for run_id in self._beat_due.keys() - pipeline.runs.keys():
            del self._beat_due[run_id]

    def _arm_cap_checks(self, _run=None) -> None:
        if self._cap_timer is None:
            self._cap_timer = self.services.timers.call_later(CAP_CHECK_INTERVAL_S,
                                                            self._cap_check_due)

    def _cap_check_due(self) -> None:
        self._cap_timer = None
        try:
            self._enforce_process_caps()
        finally:  # a failed check must not leave the caps without a watch or a poll
            if self._forks is not None:
                self._rewatch_forks()
            elif self.services.pipeline.runs or self.services.pipeline.ended_runs:
                self._arm_cap_checks()

    def _on_forks(self, _mask: int) -> None:
        """A watched process forked: check the caps once CAP_CHECK_INTERVAL_S has gathered
        the burst; until then the watch is off the selector (a bomb is one wakeup)."""
        self._forks.drain()
        self._unwatch_forks()
        self._arm_cap_checks()

    def _unwatch_forks(self) -> None:
        try:
            self.services.selector.unregister(self._forks.fileno())
        except (KeyError, ValueError):
            pass

    def _rewatch_forks(self) -> None:
        # Not drained: forks queued since the walk are news (a wakeup, another check).
        if self._forks.fileno() not in self.services.selector.get_map():
            self.services.selector.register(self._forks.fileno(), selectors.EVENT_READ,
                                          self._on_forks)

    def _watch_tree(self, alive: set[int]) -> None:
        """Watch forks of the tree just walked. A pid not watched before may have forked
        between the walk and the new filter unseen: walk again soon, until the tree holds
        still (every fork after that is seen)."""
        if self._forks is None:
            return
        grew = not alive <= self._forks.watched
        self._forks.watch(alive | {os.getpid()})
        if grew:
            self._arm_cap_checks()

    def _enforce_process_caps(self) -> None:
        """Kill, without a grace period, every run with more processes than its agent's
        max_processes: a fork bomb would spend a grace period exhausting the pid space.
        Runs on the cap timer and whenever an orphan is reaped: a reaped middle process of
        a setsid + double fork means its child was just reparented to us, so the escape is
        attributed (by its inherited run id) and counted then, not at the next check."""
        pipeline = self.services.pipeline
        live = [r for r in pipeline.runs.values() if r.state != RunState.KILLING]
        if not live and not pipeline.ended_runs:
            return
        # Walking our tree costs ~0.2 ms; an idle daemon need not pay it every tick.
        last_pid = last_pid_created()
        if last_pid is not None and last_pid == self._caps_checked_at_pid:
            return
        self._caps_checked_at_pid = last_pid
        children = tree_children(os.getpid())
        # Processes that left the run's tree (setsid and a double fork, reparented to us)
        # count against its cap too: attributed by their inherited run id.
        pipeline.refresh_owners(children)
        alive = {pid for kids in children.values() for pid in kids}
        for run in live:
            rt = pipeline.agents.get(run.agent)
            if rt is None:
                continue
            tree = set(subtree(children, run.pid))
            tree.update(p for p, rid in pipeline.owners.items() if rid == run.run_id and p in alive)
            count = len(tree) + 1
            if run.cgroup is not None:  # /proc hides an agent of another uid; its cgroup not
                count = max(count, len(RunCgroups.pids(run.cgroup)))
            if count > rt.spec.max_processes:
                log.warning("run_process_cap", agent=run.agent, run_id=run.run_id,
                            processes=count, max_processes=rt.spec.max_processes)
                self._alert(AlertKind.RUN_FAILED, run.agent, f"run {run.run_id} killed: "
                            f"{count} processes (max_processes {rt.spec.max_processes})")
                pipeline.stop_run(run, StopReason.PROCESS_CAP)
                pipeline.kill_run(run)
        self._cap_leftovers(alive)
        self._watch_tree(alive)

    def _cap_leftovers(self, alive: set[int]) -> None:
        """An ended run's leftovers in their grace period hold to the cap as well: a bomb
        whose first process exited (and ignores SIGTERM) would grow all through it."""
        pipeline = self.services.pipeline
        for run in list(pipeline.ended_runs.values()):
            rt = pipeline.agents.get(run.agent)
            cap = rt.spec.max_processes if rt is not None else None
            count = sum(1 for p, rid in pipeline.owners.items()
                        if rid == run.run_id and p in alive)
            if cap is not None and count > cap and pipeline.kill_leftovers_now(run):
                log.warning("run_process_cap", agent=run.agent, run_id=run.run_id,
                            processes=count, max_processes=cap, after_exit=True)

    def _on_stale(self, rt, run, verdict: Verdict, policy: OnStale) -> None:
        log.warning("heartbeat_stale", agent=run.agent, run_id=run.run_id,
                    verdict=verdict.value, policy=policy.value)
        self._alert(AlertKind.STALE_HEARTBEAT, run.agent,
                    f"run {run.run_id}: heartbeat {verdict.value}; policy {policy.value}")
        if policy == OnStale.LOG:
            return
        if policy == OnStale.RESTART:
            rt.queued = Fire(rt.name, run.job.id, "restart", time.time())
        self.services.pipeline.stop_run(run, StopReason.STALE_HEARTBEAT)

    def status(self) -> dict:
        degraded = sorted(a for a, rt in self.services.pipeline.agents.items() if rt.degraded)
        guard = self.guard
        return {"degraded": degraded, "memory_level": guard.level.value if guard else None,
                "summary": f"memory {guard.level.value}" if guard else None}


    def commands(self) -> CommandTable:
        return COMMANDS


def _upstreams_first(agents: dict) -> list:
    """The agents ordered so that each comes after the upstreams it depends on."""
    ordered, seen = [], set()

    def visit(name: str, path: frozenset) -> None:
        if name in seen or name in path or name not in agents:
            return
        for upstream in agents[name].spec.depends_on:
            visit(upstream, path | {name})
        seen.add(name)
        ordered.append(agents[name])

    for name in sorted(agents):
        visit(name, frozenset())
    return ordered


@command(COMMANDS.agent, "heartbeat")
def _heartbeat(h, conn, req, run):
    """Write the calling run's heartbeat (a run can heartbeat only as its own agent)."""
    try:
        path = write_heartbeat(h.daemon.state_dir, run.agent, pid=conn.peer.pid,
                               run_id=run.run_id)
    except OSError as exc:
        return error(req.id, f"cannot write heartbeat: {exc}")
    return ok(req.id, {"path": str(path)})
