"""Supervision of every agent: firings become runs, exits become retries, backoffs, crash
loops and downstream firings. Driven only by the daemon's loop (the single writer).
"""

from __future__ import annotations

import functools
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from ..config.schema import AgentSpec, Job, Overlap, Settings
from ..core.feature import Features
from ..core.firing import Fire
from ..core.states import AgentState, Outcome, RunState, StopReason
from ..core.timers import Timers
from ..kernel.cgroups import RunCgroups
from ..kernel.identity import AgentIdentity, prepare_work_dir
from ..kernel.proctree import (
    attribute_tree,
    describe_status,
    direct_children,
    group_has_members,
    send_group_signal,
    signal_name,
    tree_children,
)
from ..scheduling.scheduler import Scheduler
from ..storage.store import RunRecord, Store
from .agents import AgentRuntime, backoff_delay_s, cooldown_s
from .runner import LineRateLimiter, Run, Spawner, build_env, read_pipe, spawn

log = structlog.get_logger("watchkeeper.pipeline")

# Rounds of SIGKILL, LEFTOVER_RECHECK_S apart, before survivors are reported: a bomb that
# forks outside its process group is caught in a few rounds.
LEFTOVER_KILL_ROUNDS = 50
LEFTOVER_RECHECK_S = 0.1
# pids.max counts threads, not processes (Chrome runs ~30 per process): the kernel limit is
# a backstop a bomb cannot outrun, the exact process cap stays the daemon's check.
THREADS_PER_PROCESS = 64
DEFAULT_MAX_PROCESSES = 256  # an agent removed while its run ended: AgentSpec's default
# Runs of a batch prepared, then spawned together (fire_batch): two per spawn thread.
SPAWN_CHUNK = 16
NO_RESTART_REASONS = {StopReason.SHUTDOWN, StopReason.REMOVED, StopReason.BREAKER,
                      StopReason.REPLACED, StopReason.MANUAL, StopReason.LEASE_LOST}


class Pipeline:
    def __init__(self, *, settings: Settings, state_dir: Path, socket_path: Path, store: Store,
                 timers: Timers, scheduler: Scheduler, cgroups: RunCgroups | None,
                 watch_fd: Callable[[int, Callable[[int], None]], None],
                 unwatch_fd: Callable[[int], None], features: Features | None = None) -> None:
        self.settings = settings
        self.state_dir = state_dir
        self.socket_path = socket_path
        self.store = store
        self.timers = timers
        self.scheduler = scheduler
        self.cgroups = cgroups
        self._watch_fd = watch_fd
        self._unwatch_fd = unwatch_fd
        # The daemon's features, called at each step of a run (core/feature.py).
        self.features = features if features is not None else Features()
        self.agents: dict[str, AgentRuntime] = {}
        self.runs: dict[str, Run] = {}          # live runs by run id
        self.runs_by_pid: dict[int, Run] = {}
        self.owners: dict[int, str] = {}        # descendant pid -> run id it came from
        self.ended_runs: dict[str, Run] = {}    # ended runs whose leftovers are being stopped
        self._killing_leftovers: set[str] = set()  # ... and of those, the ones in SIGKILL rounds
        self.limiters: dict[str, LineRateLimiter] = {}
        self.downstream: dict[str, list[tuple[str, str]]] = {}  # upstream -> after: jobs
        self.halted = False                     # the breaker stopped the pipeline
        self.accepting = True                   # False once shutdown began
        self.last_refusal = ""  # why a feature refused the last start_run
        # A batch's runs ready to spawn, and those spawned, announced after the last one
        # (fire_batch).
        self._launches: list[tuple[AgentRuntime, Run, RunRecord, Callable[[], None]]] | None
        self._launches = None
        self._unannounced: list[tuple[Run, RunRecord]] | None = None
        self.base_env = dict(os.environ)
        # Who each agent's runs run as (kernel/identity.py); None: the daemon's own user.
        self.identity_of: Callable[[AgentSpec], AgentIdentity | None] = lambda spec: None

    # -- configuration --------------------------------------------------------------------
    def set_agents(self, specs: dict[str, AgentSpec]) -> None:
        """Apply a (re)loaded set of agents: add, update and remove without touching the
        running runs of agents that did not change."""
        for name in [n for n in self.agents if n not in specs]:
            self._remove_agent(name)
        paused = self.store.paused_agents()
        for name, spec in specs.items():
            rt = self.agents.get(name)
            if rt is None:
                rt = self.agents[name] = AgentRuntime(spec)
                rt.paused = name in paused
                last = self.store.last_run(name)
                if last is not None and last.ended is not None:
                    rt.last_outcome, rt.last_ended = last.outcome, last.ended
                    rt.last_exit = _exit_text(last.exit_code, last.signal)
                log.info("agent_added", agent=name, jobs=len(spec.jobs))
            elif rt.pending_removal or rt.spec != spec:
                rt.pending_removal = False
                old_always = rt.always_jobs()
                rt.spec = spec
                log.info("agent_changed", agent=name)
                if rt.run is not None and rt.run.job.schedule.always and rt.always_jobs() != old_always:
                    self.stop_run(rt.run, StopReason.REMOVED)
                    rt.queued = None
            self.scheduler.set_agent(spec)
            if self.accepting:
                self._ensure_always(rt)
        self.downstream = {}
        for name, spec in specs.items():
            for job in spec.jobs:
                for upstream in (job.schedule.after or []) if job.enabled else []:
                    self.downstream.setdefault(upstream, []).append((name, job.id))

    def _remove_agent(self, name: str) -> None:
        rt = self.agents[name]
        self.scheduler.remove_agent(name)
        rt.cancel_retry()
        rt.queued = None
        log.info("agent_removed", agent=name)
        if rt.run is not None:
            rt.pending_removal = True
            self.stop_run(rt.run, StopReason.REMOVED)  # finished in _finish_run
        else:
            rt.transition(AgentState.REMOVED)
            del self.agents[name]

    # -- firings ----------------------------------------------------------------------------
    def fire(self, fire: Fire) -> str:
        """Handle one firing; return what happened (for logs, tests and `start-now`)."""
        rt = self.agents.get(fire.agent)
        job = rt.job(fire.job) if rt else None
        if rt is None or job is None or rt.state == AgentState.REMOVED:
            return "unknown"
        if fire.trigger in ("cron", "every"):
            self.store.record_fire(rt.name, job.id, fire.at)
        verdict = self._blocked(rt, fire) or self.features.claim_firing(fire, rt.spec, job)
        if verdict:
            log.info("firing_skipped", agent=rt.name, job=job.id, trigger=fire.trigger,
                     reason=verdict)
            return verdict
        if rt.run is not None:
            return self._overlap(rt, job, fire)
        rt.cancel_retry()
        self.last_refusal = ""
        if self.start_run(rt, job, trigger=fire.trigger, attempt=0) is None:
            return f"refused: {self.last_refusal}" if self.last_refusal else "spawn failed"
        return "started"

    def fire_batch(self, fires: list[Fire],
                   call: Callable[..., object] = lambda fn, *args: fn(*args)) -> None:
        """Firings due in the same loop turn, each handled as fire() handles it, except that
        the runs of the batch are spawned together, several at once (runner.Spawner),
        and announced (row, output watched, log line, hooks) only after the last spawn,
        the rows in one transaction: a thousand jobs due at once wait only for the spawns
        before theirs. A spawn that fails fails its run only. A second firing of an agent
        in the batch is handled after the others' runs exist (it may overlap one of them).
        `call` may guard each step."""
        first, again, agents = [], [], set()
        for fire in fires:
            (again if fire.agent in agents else first).append(fire)
            agents.add(fire.agent)
        self._unannounced = []
        try:
            with Spawner() as spawner:
                # In chunks: the first children do not wait for the whole batch's preparation.
                for i in range(0, len(first), SPAWN_CHUNK):
                    self._launches = []
                    for fire in first[i:i + SPAWN_CHUNK]:
                        call(self.fire, fire)
                    launches, self._launches = self._launches, None
                    self._launch_all(launches, spawner, call)
            for fire in again:
                call(self.fire, fire)
        finally:
            self._launches = None
            started, self._unannounced = self._unannounced, None
            if started:
                with self.store.transaction():
                    for _run, record in started:
                        self.store.run_started(record)
                for run, record in started:
                    call(self._announce, run, record)

    def _launch_all(self, launches: list, spawner: Spawner,
                    call: Callable[..., object]) -> None:
        if self.halted or not self.accepting:
            # The breaker tripped on a launch of this batch (or shutdown began): none of
            # the runs prepared before it starts.
            reason = "pipeline halted by the circuit breaker" if self.halted else "shutting down"
            for rt, run, _record, _spawn in launches:
                log.warning("run_refused", agent=rt.name, job=run.job.id, reason=reason)
            return
        errors = spawner.spawn_all([launch for *_, launch in launches])
        for (rt, run, record, _spawn), error in zip(launches, errors, strict=True):
            if error is None:
                call(self._spawned, rt, run, record)
            elif isinstance(error, (OSError, KeyError)):
                call(self._spawn_failed, rt, run, record, error)
            else:
                call(_reraise, error)  # what start_run would have raised: the guard logs it

    def _blocked(self, rt: AgentRuntime, fire: Fire) -> str:
        if not self.accepting:
            return "shutting down"
        if self.halted:
            return "pipeline halted by the circuit breaker"
        if rt.paused and fire.trigger != "manual":
            return "paused"
        if rt.state == AgentState.FAILED and fire.trigger != "manual":
            return "crash loop cool-down"
        if rt.state == AgentState.BACKOFF and fire.trigger != "manual":
            return "retry pending"
        return ""

    def _overlap(self, rt: AgentRuntime, job: Job, fire: Fire) -> str:
        if job.overlap == Overlap.QUEUE:
            rt.queued = fire
            log.info("firing_queued", agent=rt.name, job=job.id, run_id=rt.run.run_id)
            return "queued"
        if job.overlap == Overlap.REPLACE:
            rt.queued = fire
            self.stop_run(rt.run, StopReason.REPLACED)
            return "replacing"
        log.info("firing_skipped", agent=rt.name, job=job.id, reason="already running",
                 run_id=rt.run.run_id)
        return "already running"

    def _ensure_always(self, rt: AgentRuntime) -> None:
        jobs = rt.always_jobs()
        if jobs and rt.run is None and rt.state == AgentState.IDLE:
            self.fire(Fire(rt.name, jobs[0].id, "always", time.time()))

    # -- runs -------------------------------------------------------------------------------
    def start_run(self, rt: AgentRuntime, job: Job, *, trigger: str, attempt: int) -> Run | None:
        # The claim first: a host that loses the race must not count a launch in the breaker.
        refusal = self.features.claim_run(rt, job) or self.features.may_launch(rt.name, trigger)
        if refusal:
            log.warning("run_refused", agent=rt.name, job=job.id, reason=refusal)
            self.last_refusal = refusal  # for `start-now`'s error reply
            return None
        degraded = self._degraded_upstreams(rt.spec)
        run = Run(rt.spec, job, attempt=attempt, trigger=trigger, degraded=degraded)
        env = build_env(run, rt.spec, job, state_dir=self.state_dir,
                        socket_path=self.socket_path, base_env=self.base_env)
        record = RunRecord(run_id=run.run_id, agent=rt.name, job=job.id, attempt=attempt,
                           trigger=trigger, pid=None, started=run.started_wall,
                           degraded=",".join(degraded), host=os.uname().nodename)
        try:
            identity = self.identity_of(rt.spec)
            work = prepare_work_dir(self.state_dir, rt.name, identity)
            env["WATCHKEEPER_WORK_DIR"] = str(work)
            if identity is not None:
                env["HOME"] = str(work)  # the daemon's HOME is not the agent's to write
                # tasks/ is the daemon's (0700): the daemon takes the agent's locks for it.
                env["WATCHKEEPER_TASK_LOCKS"] = "daemon"
            launch = functools.partial(self._spawn_placed, run, rt.spec, env=env,
                                       identity=identity, cwd=self.settings.working_dir or ".")
            if self._launches is not None:
                self._launches.append((rt, run, record, launch))  # fire_batch spawns it
                return run
            launch()
        except (OSError, KeyError) as exc:
            self._spawn_failed(rt, run, record, exc)
            return None
        self._spawned(rt, run, record)
        return run

    def _spawn_failed(self, rt: AgentRuntime, run: Run, record: RunRecord,
                      exc: OSError | KeyError) -> None:
        log.error("run_spawn_failed", agent=rt.name, job=run.job.id, run_id=run.run_id,
                  error=str(exc), command=_head(run.job))
        record.ended, record.outcome = time.time(), Outcome.SPAWN_FAILED.value
        self.store.run_started(record)
        rt.transition(AgentState.RUNNING)
        self._after_failure(rt, run, record)

    def _spawn_placed(self, run: Run, spec: AgentSpec, **how) -> None:
        """Spawn the run's child and put it in its own cgroup at once, as close to its
        exec as the spawn allows. Also called from a Spawner helper: it touches only the
        new run, its child and its cgroup's files."""
        spawn(run, spec, **how)
        if self.cgroups is not None:
            try:
                run.cgroup = self.cgroups.create(
                    run.run_id, max_pids=spec.max_processes * THREADS_PER_PROCESS)
            except OSError as exc:  # the run goes on, tracked by its process group
                run.cgroup_error = str(exc)
                return
            self.cgroups.add(run.cgroup, run.pid)
            self.cgroups.adopt_session(run.cgroup, run.pid)

    def _spawned(self, rt: AgentRuntime, run: Run, record: RunRecord) -> None:
        """A run whose child exists: its place in the pipeline, its timeout."""
        job = run.job
        if run.cgroup_error:
            log.warning("run_cgroup_failed", agent=rt.name, run_id=run.run_id,
                        error=run.cgroup_error, hint="the run is tracked by its process "
                        "group and descendants instead")
        record.pid = run.pid
        self.runs[run.run_id] = run
        self.runs_by_pid[run.pid] = run
        rt.run = run
        rt.degraded = run.degraded
        rt.transition(AgentState.RUNNING, run_id=run.run_id)
        if job.timeout_s is not None:
            run.timers.append(self.timers.call_later(
                job.timeout_s, lambda r=run: self.stop_run(r, StopReason.TIMEOUT)))
        if self._unannounced is not None:
            self._unannounced.append((run, record))  # fire_batch announces it
        else:
            self.store.run_started(record)
            self._announce(run, record)

    def _announce(self, run: Run, record: RunRecord) -> None:
        """A started run's output watched, its log line and the hooks, once its row is
        stored. None of it has to come before the next spawn of a batch: the run's child
        cannot be reaped, nor its output read, before the loop's next turn."""
        for fd in run.pipes:
            self._watch_fd(fd, lambda mask, r=run, f=fd: self._on_output(r, f))
        log.info("run_started", agent=run.agent, job=run.job.id, run_id=run.run_id,
                 pid=run.pid, trigger=run.trigger, attempt=run.attempt,
                 degraded=record.degraded or None)
        self.features.run_started(run)

    def stop_run(self, run: Run, reason: StopReason, *, refresh: bool = True) -> None:
        """SIGTERM the run's processes, then SIGKILL after its grace period. A second stop
        while the first is in its grace period escalates to SIGKILL at once. `refresh=False`
        trusts an ownership map the caller has just refreshed."""
        if run.state == RunState.EXITED:
            return
        if run.state == RunState.RUNNING:
            run.stop_reason = reason
            run.transition(RunState.STOPPING)
            run.stop_signal = "SIGTERM"
            run.signal(signal.SIGTERM, self._tracked(run, refresh))
            grace = run.grace_s if run.grace_s is not None else self.settings.stop_grace_s
            log.info("run_stopping", agent=run.agent, run_id=run.run_id, reason=reason.value,
                     grace_s=grace)
            run.timers.append(self.timers.call_later(grace, lambda: self.kill_run(run)))
            rt = self.agents.get(run.agent)
            if rt is not None and rt.state == AgentState.RUNNING:
                rt.transition(AgentState.STOPPING, reason=reason.value)
        elif run.state == RunState.STOPPING:
            self.kill_run(run)

    def kill_run(self, run: Run) -> None:
        if run.state in (RunState.EXITED, RunState.KILLING):
            return
        run.transition(RunState.KILLING)
        run.stop_signal = "SIGKILL"
        log.warning("run_killed", agent=run.agent, run_id=run.run_id,
                    reason=(run.stop_reason or StopReason.MANUAL).value,
                    hint="did not exit within its grace period after SIGTERM")
        run.signal(signal.SIGKILL, self._tracked(run))

    def _tracked(self, run: Run, refresh: bool = True) -> list[int]:
        """Descendants attributed to this run (refreshing the ownership map first)."""
        if refresh:
            self.refresh_owners()
        return [pid for pid, rid in self.owners.items() if rid == run.run_id and pid != run.pid]

    def _may_have_leftovers(self) -> bool:
        """A run's survivors are reparented to us (subreaper), so when our only children
        are live runs' roots nothing was left behind and the /proc scan can be skipped."""
        children = direct_children()
        if children is None:
            return True
        return bool(children - set(self.runs_by_pid))

    def refresh_owners(self, children: dict[int, list[int]] | None = None) -> None:
        """Attribute every descendant to its run; `children` is a tree just walked."""
        roots = {r.pid: r.run_id for r in self.runs.values()}
        roots.update({r.pid: r.run_id for r in self.ended_runs.values()})
        if children is None:
            children = tree_children(os.getpid())
        self.owners = attribute_tree(children, os.getpid(), roots, self.owners)

    def _on_output(self, run: Run, fd: int) -> None:
        lines, eof = read_pipe(run, fd, self.settings.log_line_max_bytes)
        stream = run.pipes[fd][0]
        limiter = self.limiters.setdefault(run.agent,
                                           LineRateLimiter(self.settings.log_lines_per_s))
        now = time.monotonic()
        for line in lines:
            allowed, suppressed = limiter.allow(now)
            if suppressed:
                log.warning("agent_output_suppressed", agent=run.agent, run_id=run.run_id,
                            lines=suppressed, limit_per_s=limiter.per_s)
            if allowed:
                log.info("agent_output", agent=run.agent, run_id=run.run_id, stream=stream,
                         line=line)
        if eof:
            self._unwatch_fd(fd)
            del run.pipes[fd]
            os.close(fd)

    def child_exited(self, pid: int, status: int) -> bool:
        """A reaped child: finish its run if it was a run's root. False for orphans."""
        self.owners.pop(pid, None)
        run = self.runs_by_pid.pop(pid, None)
        if run is None:
            return False
        run.exit_status = status
        if run.popen is not None:
            run.popen.returncode = status  # we reaped it; Popen must never wait on it
        self._finish_run(run)
        return True

    def _finish_run(self, run: Run) -> None:
        run.cancel_timers()
        run.transition(RunState.EXITED)
        self.runs.pop(run.run_id, None)
        exit_code, sig = describe_status(run.exit_status)
        outcome = _outcome(run, exit_code)
        record = RunRecord(run_id=run.run_id, agent=run.agent, job=run.job.id,
                           attempt=run.attempt, trigger=run.trigger, pid=run.pid,
                           started=run.started_wall, ended=time.time(), exit_code=exit_code,
                           signal=sig, outcome=outcome.value,
                           stop_reason=run.stop_reason.value if run.stop_reason else "",
                           stop_signal=run.stop_signal)
        self.store.run_ended(record)
        duration_s = time.monotonic() - run.started_mono
        hint = " (perhaps out of memory?)" if sig == signal.SIGKILL and not run.stop_signal else ""
        log_fn = log.warning if outcome in (Outcome.FAILED, Outcome.TIMED_OUT) else log.info
        log_fn("run_finished", agent=run.agent, job=run.job.id, run_id=run.run_id,
               outcome=outcome.value, exit=_exit_text(exit_code, sig) + hint,
               duration_s=round(duration_s, 3), stop_reason=record.stop_reason or None,
               stop_signal=run.stop_signal or None)
        self._stop_leftovers(run)
        self.features.run_finished(run, record)
        rt = self.agents.get(run.agent)
        if rt is None or rt.run is not run:
            return
        rt.run = None
        rt.last_outcome, rt.last_ended = outcome.value, record.ended
        rt.last_exit = _exit_text(exit_code, sig)
        if rt.pending_removal:
            rt.transition(AgentState.REMOVED)
            del self.agents[run.agent]
            return
        if outcome == Outcome.SUCCEEDED or (run.job.schedule.always and
                                            duration_s >= rt.spec.healthy_after_s and
                                            run.stop_reason is None):
            self._after_success(rt, run)
        elif run.stop_reason in NO_RESTART_REASONS:
            rt.transition(AgentState.IDLE)
            self._start_queued(rt)
        else:
            self._after_failure(rt, run, record)

    def _after_success(self, rt: AgentRuntime, run: Run) -> None:
        rt.failures = 0
        rt.cooldowns = 0
        rt.transition(AgentState.IDLE)
        if self.accepting and not self.halted:
            for agent, job_id in self.downstream.get(rt.name, ()):
                self.fire(Fire(agent, job_id, f"after:{rt.name}", time.time()))
        if rt.queued is not None:
            self._start_queued(rt)
        elif run.job.schedule.always:
            self._ensure_always(rt)  # a healthy `always` run that exits restarts at once

    def _after_failure(self, rt: AgentRuntime, run: Run, record: RunRecord) -> None:
        rt.failures += 1
        threshold = self.settings.crash_loop.failures
        if rt.failures >= threshold:
            rt.cooldowns += 1
            delay = cooldown_s(self.settings.crash_loop, rt.cooldowns)
            rt.transition(AgentState.FAILED, failures=rt.failures, cooldown_s=delay)
            log.error("agent_crash_loop", agent=rt.name, failures=rt.failures,
                      cooldown_s=delay, last_exit=_exit_text(record.exit_code, record.signal))
            rt.queued = None
            rt.retry_timer = self.timers.call_later(delay, lambda: self._cooled_down(rt))
            self.features.crash_loop(rt)
            return
        retries = run.job.retries
        if run.attempt < retries.max_attempts or run.job.schedule.always:
            delay = backoff_delay_s(retries, min(run.attempt, 20))
            rt.transition(AgentState.BACKOFF, retry_in_s=round(delay, 2))
            attempt = run.attempt + 1
            rt.retry_timer = self.timers.call_later(
                delay, lambda: self._retry(rt, run.job.id, attempt))
            return
        rt.transition(AgentState.IDLE)
        self._start_queued(rt)

    def _retry(self, rt: AgentRuntime, job_id: str, attempt: int) -> None:
        rt.retry_timer = None
        job = rt.job(job_id)
        if rt.state != AgentState.BACKOFF:
            return
        if job is None or not self.accepting or self.halted or rt.paused:
            rt.transition(AgentState.IDLE)
            return
        self.start_run(rt, job, trigger="retry", attempt=attempt)
        if rt.run is None and rt.state == AgentState.BACKOFF:
            rt.transition(AgentState.IDLE)

    def _cooled_down(self, rt: AgentRuntime) -> None:
        rt.retry_timer = None
        if rt.state != AgentState.FAILED:
            return
        rt.failures = 0
        rt.transition(AgentState.IDLE, reason="cool-down over")
        if self.accepting and not self.halted:
            self._ensure_always(rt)

    def _start_queued(self, rt: AgentRuntime) -> None:
        fire, rt.queued = rt.queued, None
        if fire is not None and rt.state == AgentState.IDLE:
            self.fire(fire)

    def _stop_leftovers(self, run: Run) -> None:
        """Whatever the run left behind is stopped too (like systemd for a finished service),
        unless the job says `leftovers: keep`. More than max_processes left (a fork bomb
        whose first process exited at once) is killed at once, without a grace period."""
        if run.job.leftovers.value == "keep":
            return
        left = self._tracked(run) if self._may_have_leftovers() else []
        cg_left = self.cgroups.pids(run.cgroup) if run.cgroup else []
        if not left and not cg_left:
            self._release_cgroup(run)
            return
        self.ended_runs[run.run_id] = run
        rt = self.agents.get(run.agent)
        cap = rt.spec.max_processes if rt is not None else DEFAULT_MAX_PROCESSES
        if len(left) > cap:
            log.warning("run_process_cap", agent=run.agent, run_id=run.run_id,
                        processes=len(left), max_processes=cap, after_exit=True)
            self._kill_leftovers(run)
            return
        log.info("run_leftovers_stopping", agent=run.agent, run_id=run.run_id,
                 pids=sorted(set(left) | set(cg_left))[:20])
        self._signal_leftovers(run, signal.SIGTERM, left)
        grace = run.grace_s if run.grace_s is not None else self.settings.stop_grace_s
        self.timers.call_later(grace, lambda: self._kill_leftovers(run))

    def _signal_leftovers(self, run: Run, sig: int, left: list[int]) -> None:
        """Its cgroup, or every tracked pid and, while one of them is still in it, the run's
        process group: a signal to a group reaches every member, even one forked meanwhile."""
        if run.exit_status is not None and group_has_members(run.pid, left):
            send_group_signal(run.pid, sig)
        run.signal(sig, left)

    def kill_leftovers_now(self, run: Run) -> bool:
        """Skip the rest of the grace period (the leftovers passed the cap); False when
        they are already being killed."""
        if run.run_id in self._killing_leftovers:
            return False
        self._kill_leftovers(run)
        return True

    def _kill_leftovers(self, run: Run, round_: int = 0) -> None:
        """SIGKILL what is left; look again shortly while anything was found, since a fork
        bomb outside the group forks between our listing and our signal."""
        if round_ == 0:
            if run.run_id in self._killing_leftovers or run.run_id not in self.ended_runs:
                return  # already under way (the cap check skipped the grace period)
            self._killing_leftovers.add(run.run_id)
        left = self._tracked(run)
        if left or (run.cgroup and self.cgroups.pids(run.cgroup)):
            if round_ == 0:
                log.warning("run_leftovers_killed", agent=run.agent, run_id=run.run_id,
                            pids=left[:20], count=len(left))
            self._signal_leftovers(run, signal.SIGKILL, left)
            if round_ < LEFTOVER_KILL_ROUNDS:
                self.timers.call_later(LEFTOVER_RECHECK_S,
                                       lambda: self._kill_leftovers(run, round_ + 1))
                return
            log.error("run_leftovers_survived", agent=run.agent, run_id=run.run_id,
                      pids=left[:20], count=len(left))
        self.ended_runs.pop(run.run_id, None)
        self._killing_leftovers.discard(run.run_id)
        self._release_cgroup(run)

    def _release_cgroup(self, run: Run) -> None:
        if run.cgroup is not None and self.cgroups is not None:
            if not self.cgroups.remove(run.cgroup):
                self.timers.call_later(1.0, lambda: self.cgroups.remove(run.cgroup))

    # -- control ---------------------------------------------------------------------------
    def set_paused(self, names: list[str], paused: bool) -> list[str]:
        changed = []
        for name in names:
            rt = self.agents[name]
            if rt.paused != paused:
                rt.paused = paused
                self.store.set_paused(name, paused)
                changed.append(name)
                log.info("agent_paused" if paused else "agent_resumed", agent=name)
            if not paused:
                self._ensure_always(rt)
        self.features.paused(names, paused)
        return changed

    def stop_all(self, reason: StopReason) -> None:
        # One /proc scan for all runs: a scan per run (20-35 ms each on a busy host) put the
        # last run's SIGTERM 100-150 ms after a breaker trip with five agents running.
        self.refresh_owners()
        for run in list(self.runs.values()):
            self.stop_run(run, reason, refresh=False)

    def kill_all(self) -> None:
        for run in list(self.runs.values()):
            self.kill_run(run)

    def halt(self) -> None:
        """The breaker tripped: no new run starts, every run is stopped."""
        self.halted = True
        for rt in self.agents.values():
            rt.cancel_retry()
            rt.queued = None
            if rt.state == AgentState.BACKOFF:
                rt.transition(AgentState.IDLE)
        self.stop_all(StopReason.BREAKER)

    def unhalt(self) -> None:
        self.halted = False
        for rt in self.agents.values():
            if not rt.paused:
                self._ensure_always(rt)

    # -- degraded upstreams ------------------------------------------------------------------
    def _degraded_upstreams(self, spec: AgentSpec) -> list[str]:
        """A feature's answer (features/health.py's heartbeats), else the upstreams that failed."""
        found = self.features.degraded_upstreams(spec)
        return found if found is not None else self._failed_upstreams(spec)

    def _failed_upstreams(self, spec: AgentSpec) -> list[str]:
        bad = []
        for upstream in spec.depends_on:
            rt = self.agents.get(upstream)
            if rt is None or rt.state == AgentState.FAILED or rt.last_outcome not in (
                    None, Outcome.SUCCEEDED.value):
                bad.append(upstream)
        return bad


def _reraise(error: BaseException) -> None:
    raise error


def _outcome(run: Run, exit_code: int | None) -> Outcome:
    if run.stop_reason == StopReason.TIMEOUT:
        return Outcome.TIMED_OUT
    if run.stop_reason is not None:
        return Outcome.STOPPED
    return Outcome.SUCCEEDED if exit_code == 0 else Outcome.FAILED


def _exit_text(exit_code: int | None, sig: int | None) -> str:
    if sig is not None:
        return f"signal {signal_name(sig)}"
    return "" if exit_code is None else f"exit {exit_code}"


def _head(job: Job) -> str:
    cmd = job.command if isinstance(job.command, str) else " ".join(job.command)
    return cmd[:120]
