"""The daemon: one loop that owns all state.

Signals, scheduler firings, control requests and child output all arrive as events on one
selector; the loop handles them in order, runs due timers and does its periodic duties.
No other thread changes state; cron and interval jobs wait on the loop's own timers.

Signals (handled in handle_signal, never in the signal handler itself):
    SIGTERM, SIGINT  warm stop: stop scheduling, SIGTERM every run, SIGKILL after the
                     grace period; a second one skips to SIGKILL at once
    SIGHUP           reload the configuration (validated completely before anything changes)
    SIGCHLD          reap every exited child (runs and reparented orphans)
"""

from __future__ import annotations

import fcntl
import os
import queue
import selectors
import signal
import time
from collections.abc import Callable, Sequence

import structlog

from .. import __version__
from ..config.load import Config, load_config
from ..control.admission import run_peer_check
from ..control.handlers import Handlers
from ..control.server import ControlServer
from ..core.alarm import Alarm
from ..core.feature import Feature, Features, Services
from ..core.firing import Fire
from ..core.safefile import (
    UnsafeFile,
    check_regular_if_exists,
    check_state_dir,
    is_real_dir,
    open_regular,
)
from ..core.states import DAEMON_TRANSITIONS, DaemonState, Outcome, StopReason, check_transition
from ..core.timers import Timers
from ..errors import AlreadyRunning, ConfigError, WatchkeeperError
from ..kernel.cgroups import RunCgroups
from ..kernel.identity import (
    Identities,
    drop_ambient_capabilities,
    make_undumpable,
    readable_by_others,
)
from ..kernel.proctree import (
    become_subreaper,
    is_alive,
    live_descendants,
    processes_of_state_dir,
    reap_children,
    send_signal,
)
from ..runs.locks import break_stale
from ..runs.pipeline import Pipeline
from ..scheduling.catch_up import absorb_slot_due_after_catch_up, catch_up_due
from ..scheduling.scheduler import Scheduler
from ..storage.state_modes import (
    DAEMON_UMASK,
    open_to_agents,
    secure_state_dir,
    socket_group_problem,
)
from ..storage.store import Store

log = structlog.get_logger("watchkeeper.daemon")

TICK_SLACK = 0.2  # of tick_s
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


class Daemon:
    def __init__(self, config: Config, features: Sequence[Feature] = ()) -> None:
        self.config = config
        self.state = DaemonState.STARTING
        self.state_dir = config.state_dir
        self.timers = Timers()
        self.alarm = Alarm()  # wakes the selector at a timer's exact deadline
        self.selector = selectors.DefaultSelector()
        self.events: queue.SimpleQueue = queue.SimpleQueue()
        self._due_fires: list[Fire] = []  # handed on by due timers, started in the same turn
        self.started_mono = time.monotonic()
        self.stop_deadline: float | None = None
        self._installed = tuple(features)  # in start order (daemon/features.py says why)
        # The control handlers first, then the installed features; set up in _start.
        self.features = Features()
        self._started: list[Feature] = []
        self._lock_fd = -1
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._sig_r, self._sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._next_tick = 0.0
        self._next_lock_check = 0.0
        self._next_prune = 0.0
        self.store: Store | None = None
        self.pipeline: Pipeline | None = None
        self.scheduler: Scheduler | None = None
        self.control: ControlServer | None = None
        self.cgroups: RunCgroups | None = None
        self.agent_uids: set[int] = set()  # uids only agents run under (authz fallback)
        self._not_isolated_said = ""

    # -- lifecycle ---------------------------------------------------------------------------
    def transition(self, target: DaemonState) -> None:
        check_transition(DAEMON_TRANSITIONS, self.state, target)
        log.info("daemon_state", old=self.state.value, new=target.value)
        self.state = target
        self.features.state_changed(target)

    def run(self) -> None:
        """Start, loop until stopped, clean up; a failure raises (cli/main.py maps it to an exit
        code)."""
        # Every file the daemon creates is its own (0600/0700): agents go through the socket.
        os.umask(DAEMON_UMASK)
        drop_ambient_capabilities()
        make_undumpable()
        problem = socket_group_problem(self.config.settings.socket_group)
        if problem:
            raise WatchkeeperError(problem)
        self._open_state_dir()
        secure_state_dir(self.state_dir)
        try:
            self._start()
            while self.state != DaemonState.STOPPED:
                self._turn()
        finally:
            self._cleanup()

    def _open_state_dir(self) -> None:
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            loose = check_state_dir(self.state_dir)
            if loose:
                raise WatchkeeperError(f"refusing to start: {loose}")
            for sub in ("tasks", "status", "logs"):
                (self.state_dir / sub).mkdir(exist_ok=True)
                if not is_real_dir(self.state_dir / sub):
                    raise UnsafeFile(self.state_dir / sub, "is not a directory of its own "
                                     "(a symbolic link or another file): refused")
            for name in _database_files(self.config):
                check_regular_if_exists(self.state_dir / name)
            # Never through a link: a planted daemon.lock symlink made the start truncate
            # the link's target and write the pid there.
            fd = open_regular(self.state_dir / "daemon.lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise WatchkeeperError(f"cannot use state_dir {self.state_dir}: {exc} (it must be "
                                   "a directory the daemon's user can write)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise AlreadyRunning(f"another watchkeeper (pid {holder}) already runs on "
                                 f"{self.state_dir}; stop it first or use another state_dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _start(self) -> None:
        cfg = self.config
        become_subreaper()
        self._install_signals()
        self.store = Store(self.state_dir / "state.db")
        self._stop_previous_leftovers()
        closed = self.store.close_dangling_runs(Outcome.FAILED.value, time.time())
        if closed:
            log.warning("runs_lost_with_previous_daemon", count=closed)
        self.cgroups = RunCgroups.setup(cfg.settings.cgroups,
                                        f"watchkeeper-{os.getpid()}")
        self.scheduler = Scheduler(self._fire_now, time.time, self.timers)
        handlers = Handlers(self)
        self.features = Features([handlers, *self._installed])
        self.pipeline = Pipeline(
            settings=cfg.settings, state_dir=self.state_dir, socket_path=cfg.socket_path,
            store=self.store, timers=self.timers, scheduler=self.scheduler,
            cgroups=self.cgroups, watch_fd=self._watch_fd, unwatch_fd=self._unwatch_fd,
            features=self.features)
        self.control = ControlServer(cfg.socket_path, self.selector, handlers.dispatch,
                                     group=cfg.settings.socket_group,
                                     is_run_peer=run_peer_check(self.pipeline),
                                     idle_timeout_s=cfg.settings.control_idle_timeout_s)
        self.control.open()
        self._isolate_agents(cfg)
        self.selector.register(self._wake_r, selectors.EVENT_READ, self._drain_wake)
        self.selector.register(self._sig_r, selectors.EVENT_READ, self._drain_signals)
        if self.alarm.fd >= 0:
            self.selector.register(self.alarm.fd, selectors.EVENT_READ, self.alarm.silence)
        services = self._services()
        for feature in self.features:
            feature.start(services)
            self._started.append(feature)  # only what started is stopped at exit
            feature.adjust_run_env(self.pipeline.base_env)
        handlers.serve(self.features)
        self.scheduler.start()
        self.pipeline.set_agents(cfg.agents)
        self._catch_up()
        log.info("daemon_started", version=__version__, pid=os.getpid(),
                 state_dir=str(self.state_dir), agents=len(cfg.agents),
                 cgroups=str(self.cgroups.base) if self.cgroups else None,
                 socket=str(cfg.socket_path))
        self.transition(DaemonState.RUNNING)

    def _services(self) -> Services:
        """What every feature may use, built once the core is up."""
        return Services(
            state_dir=self.state_dir, store=self.store, timers=self.timers,
            selector=self.selector, pipeline=self.pipeline, scheduler=self.scheduler,
            cgroups=self.cgroups, features=self.features,
            current_config=lambda: self.config, current_state=lambda: self.state,
            uptime_s=self.uptime_s)

    def _isolate_agents(self, cfg: Config) -> None:
        """Each agent's uid (kernel/identity.py); say once, clearly, when agents are not isolated."""
        identities = Identities(cfg.settings.agent_user, cfg.agents.values(),
                                cfg.settings.agent_uid_range)
        self.pipeline.identity_of = identities.for_agent
        self.agent_uids = identities.uids(cfg.agents.values())
        if self.agent_uids:
            open_to_agents(self.state_dir, cfg.socket_path)
            exposed = readable_by_others(cfg.settings.agents_dir, cfg.agent_files.values())
            if exposed:
                log.warning("agent_files_readable_by_agents", files=exposed,
                            hint="their env secrets are readable by every agent: "
                                 "chmod o-rwx the agents directory (docs/security.md)")
        reason = identities.not_isolated_reason(cfg.agents.values())
        if reason and reason != self._not_isolated_said:
            log.warning("agents_not_isolated", reason=reason,
                        hint="set agent_user or a `user:` per agent and run the daemon as "
                             "root or with CAP_SETUID+CAP_SETGID (docs/security.md)")
        self._not_isolated_said = reason

    def _install_signals(self) -> None:
        signal.set_wakeup_fd(self._sig_w, warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            # The C-level handler writes the signal number to the wakeup pipe; the
            # Python handler does nothing. All handling happens in the loop.
            signal.signal(sig, _ignore_in_handler)

    def _stop_previous_leftovers(self) -> None:
        """Processes of a previous daemon on this state dir that died without stopping
        them (SIGKILL, OOM): they are unsupervised now, so stop them before starting."""
        pids = processes_of_state_dir(str(self.state_dir), {os.getpid()})
        if not pids:
            return
        log.warning("previous_leftovers_stopping", pids=pids[:20], count=len(pids))
        for pid in pids:
            send_signal(pid, signal.SIGTERM)
        deadline = time.monotonic() + self.config.settings.stop_grace_s
        while time.monotonic() < deadline and any(is_alive(p) for p in pids):
            reap_children()
            time.sleep(0.05)  # start-up only: nothing else is running yet
        for pid in pids:
            if is_alive(pid):
                send_signal(pid, signal.SIGKILL)
        reap_children()

    def _catch_up(self) -> None:
        now = time.time()
        for name, spec in self.config.agents.items():
            for job in spec.jobs:
                planned = self.scheduler.next_fire(name, job.id)
                if catch_up_due(job, self.store.last_fire(name, job.id),
                                planned.timestamp() if planned else None, now):
                    log.info("catch_up_firing", agent=name, job=job.id)
                    # Recorded first, as cron firings are: a kill right after the run
                    # starts must not catch the same window up again after the restart.
                    self.store.record_fire(name, job.id, now)
                    self.pipeline.fire(Fire(name, job.id, "catch_up", now))
                    if absorb_slot_due_after_catch_up(self.scheduler, spec, job, time.time()):
                        log.info("catch_up_absorbed_due_slot", agent=name, job=job.id)

    # -- the loop ------------------------------------------------------------------------------
    def _turn(self) -> None:
        timeout = self._select_timeout()
        for key, mask in self.selector.select(timeout):
            self._guarded(key.data, mask)
        self.timers.run_due(self._guarded)
        self._start_due_fires()
        now = time.monotonic()
        tick_s = self.config.settings.tick_s
        # A tick due soon runs now, on a wakeup that happened anyway (a memory reading, a
        # timeout): housekeeping may come early, and every wakeup saved is CPU saved.
        if now >= self._next_tick - TICK_SLACK * tick_s:
            self._next_tick = now + tick_s
            self._tick(now)
        self.features.after_batch()
        if self.state == DaemonState.STOPPING:
            self._check_stopped()

    def _guarded(self, callback: Callable, *args) -> None:
        """One failing callback is logged; supervision of everything else goes on."""
        try:
            callback(*args)
        except Exception:  # noqa: BLE001
            log.exception("loop_callback_failed",
                          callback=getattr(callback, "__qualname__", repr(callback)))

    def _select_timeout(self) -> float:
        now = time.monotonic()
        timeout = max(0.0, self._next_tick - now)
        deadline = self.timers.next_deadline()
        if deadline is not None and deadline - now < timeout:
            timeout = max(0.0, deadline - now)
            # epoll rounds its timeout up to the next millisecond: the alarm rings on time.
            self.alarm.ring_at(deadline)
        return timeout

    def _tick(self, now: float) -> None:
        """Periodic duties: re-arm cron timers if the wall clock jumped, break stale locks,
        prune history, let the features do theirs."""
        self.scheduler.recheck_wall_clock()
        settings = self.config.settings
        if now >= self._next_lock_check:
            self._next_lock_check = now + settings.locks.check_interval_s
            break_stale(self.state_dir, settings.locks.stale_after_s)
        if now >= self._next_prune:
            self._next_prune = now + 3600
            self.store.prune_runs(settings.run_history_days * 86400)
        try:
            self.control.close_idle(now)
        except Exception:  # noqa: BLE001 - a failing duty must not stop supervision
            log.exception("tick_hook_failed", hook="ControlServer.close_idle")
        self.features.tick(now)

    def _fire_now(self, fire: Fire) -> None:
        """The scheduler's timers run on the loop, so a due job starts in the same turn:
        a trip through the event queue and the wake pipe cost a loop turn of lateness
        for every slot. Started once every due timer has run (_start_due_fires): each
        job's slots are reckoned at the turn's start, not after the spawns before it (a
        thousand jobs due at once would see their next slot pass and coalesce)."""
        self._due_fires.append(fire)

    def _start_due_fires(self) -> None:
        fires, self._due_fires = self._due_fires, []
        if fires and self.state in (DaemonState.RUNNING, DaemonState.RELOADING):
            self.pipeline.fire_batch(fires, self._guarded)

    def post(self, fire: Fire) -> None:
        """Thread-safe: a firing from outside the loop, handled on its next turn."""
        self.events.put(fire)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # the pipe is full, so the loop is already due to wake

    def _drain_wake(self, _mask: int) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                fire = self.events.get_nowait()
            except queue.Empty:
                return
            if self.state in (DaemonState.RUNNING, DaemonState.RELOADING):
                self.pipeline.fire(fire)

    def _drain_signals(self, _mask: int) -> None:
        try:
            data = os.read(self._sig_r, 4096)
        except BlockingIOError:
            return
        # A fork bomb sends thousands of SIGCHLDs: one reap per batch reaps them all.
        child_reaped = False
        for signum in data:
            if signum == signal.SIGCHLD:
                if child_reaped:
                    continue
                child_reaped = True
            self.handle_signal(signum)

    def handle_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reap()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.request_stop(signal.Signals(signum).name)
        elif signum == signal.SIGHUP:
            self.reload()

    def reap(self) -> None:
        orphans = 0
        for pid, status in reap_children():
            if not self.pipeline.child_exited(pid, status):
                log.debug("orphan_reaped", pid=pid)
                orphans += 1
        if orphans:
            self.features.orphans_reaped()

    # -- control actions ---------------------------------------------------------------------
    def request_stop(self, why: str = "request") -> None:
        if self.state == DaemonState.STOPPING:
            log.warning("daemon_stop_forced", signal=why,
                        hint="second stop request: skipping to SIGKILL")
            self.pipeline.kill_all()
            self._kill_descendants()
            return
        log.info("daemon_stopping", signal=why, grace_s=self.config.settings.stop_grace_s,
                 hint="send the signal again (Ctrl+C) to skip the grace period")
        self.transition(DaemonState.STOPPING)
        self.scheduler.shutdown()
        self.pipeline.accepting = False
        self.pipeline.stop_all(StopReason.SHUTDOWN)
        self._signal_untracked(signal.SIGTERM)
        self.stop_deadline = time.monotonic() + self.config.settings.stop_grace_s
        self.timers.call_later(self.config.settings.stop_grace_s, self._grace_expired)

    def _grace_expired(self) -> None:
        self.pipeline.kill_all()
        self._kill_descendants()

    def _signal_untracked(self, sig: int) -> None:
        """Leftovers kept (leftovers: keep) or of ended runs: every descendant gets it."""
        for pid in self._leftovers():
            send_signal(pid, sig)

    def _kill_descendants(self, *, features_too: bool = False) -> None:
        for pid in live_descendants(os.getpid()) if features_too else self._leftovers():
            send_signal(pid, signal.SIGKILL)

    def _leftovers(self) -> list[int]:
        """Our descendants, less the processes features run themselves (an alert command
        in flight), which their `stop` waits for, bounded, before the exit kills the rest."""
        own = self.features.own_sessions()
        return [pid for pid in live_descendants(os.getpid())
                if not own or _session_of(pid) not in own]

    def _check_stopped(self) -> None:
        if self.pipeline.runs or self._leftovers():
            if self.stop_deadline is not None and time.monotonic() > self.stop_deadline + 5:
                self._kill_descendants()  # something keeps spawning: keep killing
            return
        self.transition(DaemonState.STOPPED)

    def reload(self) -> list[str]:
        """Validate the new configuration completely; apply it only if it has no error."""
        if self.state != DaemonState.RUNNING:
            return ["the daemon is not running (stopping or already reloading)"]
        self.transition(DaemonState.RELOADING)
        try:
            return self._reload_from_file()
        except Exception as exc:  # noqa: BLE001 - a failed reload must not wedge `reloading`
            log.exception("reload_failed", hint="still running the previous configuration")
            return [f"reload failed: {type(exc).__name__}: {exc}"]
        finally:
            if self.state == DaemonState.RELOADING:
                self.transition(DaemonState.RUNNING)

    def _reload_from_file(self) -> list[str]:
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("reload_config_error", error=str(issue))
            log.error("reload_rejected", errors=len(exc.issues),
                      hint="still running the previous configuration")
            self.transition(DaemonState.RUNNING)
            return [str(i) for i in exc.issues]
        for field in ("state_dir", "control_socket", "cgroups", "socket_group"):
            if getattr(new.settings, field) != getattr(self.config.settings, field):
                log.warning("reload_needs_restart", field=field,
                            hint="this setting takes effect at the next start")
        self.config = new
        self.pipeline.settings = new.settings
        self._isolate_agents(new)
        self.pipeline.set_agents(new.agents)
        self.features.reload(new)
        log.info("reload_applied", agents=len(new.agents))
        self.transition(DaemonState.RUNNING)
        return []

    def uptime_s(self) -> float:
        return time.monotonic() - self.started_mono

    # -- fd plumbing for the pipeline --------------------------------------------------------------
    def _watch_fd(self, fd: int, callback: Callable[[int], None]) -> None:
        self.selector.register(fd, selectors.EVENT_READ, callback)

    def _unwatch_fd(self, fd: int) -> None:
        try:
            self.selector.unregister(fd)
        except (KeyError, ValueError):
            pass

    def _cleanup(self) -> None:
        for feature in reversed(self._started):
            try:
                feature.stop()
            except Exception:  # noqa: BLE001
                log.exception("extension_stop_failed", extension=type(feature).__name__)
        if self.scheduler is not None:
            self.scheduler.shutdown()
        if self.pipeline is not None:
            self._kill_descendants(features_too=True)  # past the features' bounded stop
        if self.control is not None:
            self.control.close()
        if self.cgroups is not None:
            self.cgroups.close()
        if self.store is not None:
            self.store.close()
        signal.set_wakeup_fd(-1)
        self.alarm.close()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
        log.info("daemon_stopped", exit_code=0)  # a failure raises through run() instead


def _database_files(config: Config) -> list[str]:
    """The SQLite files in the state dir, which SQLite opens itself (links followed)."""
    names = ["state.db", config.settings.steward.db_file]
    return [name + suffix for name in names for suffix in ("", "-wal", "-shm", "-journal")]


def _ignore_in_handler(signum, frame) -> None:
    """Signal handler - no logging, no state: the wakeup pipe already queued the signal."""


def _session_of(pid: int) -> int | None:
    try:
        return os.getsid(pid)
    except OSError:  # gone already
        return None
