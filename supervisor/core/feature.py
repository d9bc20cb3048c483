"""The seam between the daemon's core and its features, in the spirit of dramatiq's Middleware.

A feature is a `Feature` subclass that overrides the few hooks it needs; every hook of the
base class does nothing. The daemon builds one `Services` object after its core is up and
hands it to each feature's `start`; the loop, the pipeline and the control server call the
hooks through `Features`, in the features' start order. Every way a feature touches the
core is a method of its class: nothing is set on the daemon or the pipeline from outside.

Failures keep the semantics each hook had before this seam existed: a failing `tick`,
`reload` or `stop` is logged and the other features go on; every other hook's exception
reaches its caller (the loop logs a failing firing; a failing `claim_firing`, `claim_run`
or `may_launch` means the run does not start).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import structlog

if TYPE_CHECKING:
    import selectors

    from ..config.load import Config
    from ..config.schema import AgentSpec, Job
    from ..control.table import CommandTable, Handler
    from ..kernel.cgroups import RunCgroups
    from ..memory.settings import StewardSettings
    from ..runs.agents import AgentRuntime
    from ..runs.pipeline import Pipeline
    from ..runs.runner import Run
    from ..scheduling.scheduler import Scheduler
    from ..storage.store import RunRecord, Store
    from .firing import Fire
    from .states import DaemonState
    from .timers import Timers

log = structlog.get_logger("watchkeeper.daemon")

F = TypeVar("F", bound="Feature")


class Feature:
    """A feature of the daemon; override the hooks it needs, the others do nothing."""

    name = "feature"

    # -- lifecycle (the loop) --------------------------------------------------------------
    def start(self, services: Services) -> None:
        """Called once, in start order, after the core is up and before agents are set."""

    def stop(self) -> None:
        """Called at exit, in reverse start order, only if `start` returned."""

    def reload(self, config: Config) -> None:
        """The configuration was reloaded (validated completely) and is now `config`."""

    def tick(self, now_mono: float) -> None:
        """The loop's periodic duties (every tick_s)."""

    def after_batch(self) -> None:
        """At the end of every loop turn (group commits)."""

    def state_changed(self, state: DaemonState) -> None:
        """The daemon entered `state`."""

    def orphans_reaped(self) -> None:
        """A SIGCHLD batch reaped a process that was not a run's root (a reparented orphan)."""

    def adjust_run_env(self, env: dict[str, str]) -> None:
        """Edit the environment every run starts from (called once, right after `start`)."""

    def own_sessions(self) -> frozenset[int]:
        """Sessions of processes the feature runs itself (an alert command in flight): a
        stopping daemon leaves them to the feature's `stop` instead of signalling them."""
        return frozenset()

    # -- the pipeline ----------------------------------------------------------------------
    def claim_firing(self, fire: Fire, spec: AgentSpec, job: Job) -> str:
        """Empty when this daemon may handle the firing, else why not (shared storage)."""
        return ""

    def claim_run(self, rt: AgentRuntime, job: Job) -> str:
        """Empty when this daemon may start the run, else where it runs instead."""
        return ""

    def may_launch(self, agent: str, trigger: str) -> str | None:
        """None when the run may start, else why not (the circuit breaker)."""
        return None

    def degraded_upstreams(self, spec: AgentSpec) -> list[str] | None:
        """The upstreams of `spec` that are degraded, or None for no opinion (the pipeline
        then counts upstreams whose last run failed)."""
        return None

    def run_started(self, run: Run) -> None:
        """A run was spawned."""

    def run_finished(self, run: Run, record: RunRecord) -> None:
        """A run ended and its record is written."""

    def crash_loop(self, rt: AgentRuntime) -> None:
        """An agent entered a crash-loop cool-down."""

    def paused(self, names: list[str], paused: bool) -> None:
        """Agents were paused or resumed by an operator."""

    # -- shared parts another feature may use ----------------------------------------------
    def open_memory(self, settings: StewardSettings) -> tuple[Any, Any] | None:
        """The steward's (store, search backend) when this feature provides them."""
        return None

    # -- status and control ----------------------------------------------------------------
    def status(self) -> dict | None:
        """This feature's entry in the status snapshot's `extensions` (None: no entry)."""
        return None

    def extend_status(self, snapshot: dict) -> None:
        """Add to the whole status snapshot (after every feature's `status`)."""

    def commands(self) -> CommandTable | None:
        """The control commands this feature serves (read when the control server starts)."""
        return None

    def command_overrides(self, served: CommandTable) -> dict[str, Handler]:
        """Commands this feature serves differently from `served` (who may call them is
        still decided by the table they are in)."""
        return {}


@dataclasses.dataclass(frozen=True, slots=True)
class Services:
    """What the daemon hands every feature: built once, after the core is up."""

    state_dir: Path
    store: Store
    timers: Timers
    selector: selectors.BaseSelector
    pipeline: Pipeline
    scheduler: Scheduler
    cgroups: RunCgroups | None
    features: Features
    current_config: Callable[[], Config]  # the configuration changes on reload
    current_state: Callable[[], DaemonState]
    uptime_s: Callable[[], float]

    @property
    def config(self) -> Config:
        return self.current_config()

    @property
    def daemon_state(self) -> DaemonState:
        return self.current_state()


class Features:
    """The daemon's features in start order, and the calls of each hook over all of them."""

    __slots__ = ("_all",)

    def __init__(self, features: Sequence[Feature] = ()) -> None:
        self._all = tuple(features)

    def __iter__(self) -> Iterator[Feature]:
        return iter(self._all)

    def find(self, kind: type[F]) -> F | None:
        """The feature of this class, if the daemon has it (the output gate, the health...)."""
        return next((f for f in self._all if isinstance(f, kind)), None)

    # -- the loop ----------------------------------------------------------------------------
    def tick(self, now_mono: float) -> None:
        for feature in self._all:
            try:
                feature.tick(now_mono)
            except Exception:  # noqa: BLE001 - a failing duty must not stop supervision
                log.exception("tick_hook_failed", hook=f"{type(feature).__name__}.tick")

    def reload(self, config: Config) -> None:
        for feature in self._all:
            try:
                feature.reload(config)
            except Exception:  # noqa: BLE001 - else the daemon stays `reloading`, no READY
                log.exception("extension_reload_failed", extension=type(feature).__name__)

    def after_batch(self) -> None:
        for feature in self._all:
            feature.after_batch()

    def state_changed(self, state: DaemonState) -> None:
        for feature in self._all:
            feature.state_changed(state)

    def orphans_reaped(self) -> None:
        for feature in self._all:
            feature.orphans_reaped()

    # -- the pipeline: the first refusal wins ------------------------------------------------
    def claim_firing(self, fire: Fire, spec: AgentSpec, job: Job) -> str:
        return next((why for f in self._all if (why := f.claim_firing(fire, spec, job))), "")

    def claim_run(self, rt: AgentRuntime, job: Job) -> str:
        return next((why for f in self._all if (why := f.claim_run(rt, job))), "")

    def may_launch(self, agent: str, trigger: str) -> str | None:
        return next((why for f in self._all if (why := f.may_launch(agent, trigger))), None)

    def degraded_upstreams(self, spec: AgentSpec) -> list[str] | None:
        return next((found for f in self._all
                     if (found := f.degraded_upstreams(spec)) is not None), None)

    def own_sessions(self) -> frozenset[int]:
        return frozenset().union(*(f.own_sessions() for f in self._all))

    def run_started(self, run: Run) -> None:
        for feature in self._all:
            feature.run_started(run)

    def run_finished(self, run: Run, record: RunRecord) -> None:
        for feature in self._all:
            feature.run_finished(run, record)

    def crash_loop(self, rt: AgentRuntime) -> None:
        for feature in self._all:
            feature.crash_loop(rt)

    def paused(self, names: list[str], paused: bool) -> None:
        for feature in self._all:
            feature.paused(names, paused)

    # -- shared parts and status -----------------------------------------------------------------
    def open_memory(self, settings: StewardSettings) -> tuple[Any, Any] | None:
        return next((opened for f in self._all
                     if (opened := f.open_memory(settings)) is not None), None)

    def status(self) -> dict[str, dict]:
        return {f.name: s for f in self._all if (s := f.status()) is not None}

    def extend_status(self, snapshot: dict) -> None:
        for feature in self._all:
            feature.extend_status(snapshot)
