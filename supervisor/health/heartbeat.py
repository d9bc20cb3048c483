"""Heartbeat files: agents prove they are alive, downstream agents learn whether to trust upstream.

A heartbeat is `STATE_DIR/status/{agent}.heartbeat`. The canonical content is one JSON line,
`{"ts": <unix seconds>, "pid": <int>, "run_id": <str>}`, but a bare unix timestamp or an ISO-8601
time is accepted too, so `date +%s > "$WATCHKEEPER_STATE_DIR/status/$WATCHKEEPER_AGENT.heartbeat"`
is a complete heartbeat from one line of shell.

Heartbeats carry wall-clock time (not monotonic) because they are written by other processes and
by shell; every `now` in this module is therefore `time.time()`.
"""

from __future__ import annotations

import enum
import math
import os
import time
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path

import msgspec
import structlog

from ..core.ranges import Duration, Multiple, PositiveDuration
from ..core.safefile import UnsafeFile, open_regular

log = structlog.get_logger("watchkeeper.heartbeat")

SUFFIX = ".heartbeat"
# Anything larger is not a heartbeat; reading it whole would let one broken agent cost memory.
MAX_HEARTBEAT_BYTES = 4096


class OnStale(enum.StrEnum):
    """What the daemon does when a running agent's own heartbeat goes stale."""

    LOG = "log"
    RESTART = "restart"
    KILL = "kill"


class Verdict(enum.StrEnum):
    FRESH = "fresh"
    STALE = "stale"
    MISSING = "missing"
    GARBAGE = "garbage"


class HeartbeatSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """Config section `heartbeat` (per agent): how often it beats and what staleness means."""

    interval_s: PositiveDuration = 300.0
    """How often the agent is expected to heartbeat."""
    # Stale after interval_s * stale_multiple: one late beat is jitter, three missed beats are not.
    stale_multiple: Multiple = 3.0
    on_stale: OnStale = OnStale.LOG
    """A running agent's stale heartbeat: log, restart the run, or kill it."""
    first_beat_grace_s: Duration = 30.0
    """Extra time a run has for its first beat, on top of the stale window: 50 agents started
    at once on 2 busy cores were still importing when a 3 s window ran out."""

    @property
    def stale_after_s(self) -> float:
        return self.interval_s * self.stale_multiple


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    ts: float
    pid: int | None = None
    run_id: str | None = None


class HeartbeatReading(msgspec.Struct, frozen=True, kw_only=True):
    """One look at a heartbeat file: the beat if it parsed, else why not.

    `file_key` (mtime_ns, size) changes when the file is rewritten, so a garbage file is
    reported once per change rather than once per check.
    """

    path: Path
    heartbeat: Heartbeat | None = None
    fault: Verdict | None = None  # MISSING or GARBAGE when heartbeat is None
    file_key: tuple[int, int] | None = None


def heartbeat_path(state_dir: Path | str, agent: str) -> Path:
    return Path(state_dir) / "status" / f"{agent}{SUFFIX}"


def write_heartbeat(state_dir: Path | str, agent: str, *, ts: float | None = None,
                    pid: int | None = None, run_id: str | None = None) -> Path:
    """Write the heartbeat atomically: a reader sees the old beat or the new one, never half."""
    path = heartbeat_path(state_dir, agent)
    path.parent.mkdir(parents=True, exist_ok=True)
    beat = Heartbeat(ts=time.time() if ts is None else ts,
                     pid=os.getpid() if pid is None else pid,
                     run_id=run_id if run_id is not None else os.environ.get("WATCHKEEPER_RUN_ID"))
    payload = msgspec.json.encode(beat) + b"\n"
    # Not tempfile.mkstemp: the daemon writes beats too, and tempfile imports shutil and
    # random (~1 MiB of RSS) for what one O_EXCL open does.
    tmp = path.parent / f".{agent}.{os.getpid()}.{os.urandom(4).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def parse_heartbeat(text: str) -> Heartbeat | None:
    """Parse any accepted format; None for anything else."""
    text = text.strip()
    if not text:
        return None
    if text.startswith("{"):
        try:
            beat = msgspec.json.decode(text.splitlines()[0], type=Heartbeat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None
        return beat if _plausible(beat.ts) else None
    try:
        ts = float(text)
    except ValueError:
        try:
            moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            return None
        if moment.tzinfo is None:  # naive ISO time: the writer's local time, as `date -Iseconds`
            moment = moment.astimezone()
        ts = moment.timestamp()
    return Heartbeat(ts=ts) if _plausible(ts) else None


def _plausible(ts: float) -> bool:
    return math.isfinite(ts) and ts > 0


def load_heartbeat(path: Path | str) -> HeartbeatReading:
    """Read a heartbeat file; never raises (a broken agent must not break the daemon)."""
    path = Path(path)
    try:
        # A FIFO planted here blocked the daemon's loop in open(): never block, never follow.
        fd = open_regular(path)
    except FileNotFoundError:
        return HeartbeatReading(path=path, fault=Verdict.MISSING)
    except UnsafeFile as exc:
        _log_refusal_once(exc)
        return HeartbeatReading(path=path, fault=Verdict.GARBAGE)
    except OSError:
        return HeartbeatReading(path=path, fault=Verdict.GARBAGE)
    try:
        st = os.fstat(fd)
        raw = os.read(fd, MAX_HEARTBEAT_BYTES + 1)
    except OSError:
        return HeartbeatReading(path=path, fault=Verdict.GARBAGE)
    finally:
        os.close(fd)
    key = (st.st_mtime_ns, st.st_size)
    beat = None
    if len(raw) <= MAX_HEARTBEAT_BYTES:
        try:
            beat = parse_heartbeat(raw.decode("utf-8"))
        except UnicodeDecodeError:
            beat = None
    if beat is None:
        return HeartbeatReading(path=path, fault=Verdict.GARBAGE, file_key=key)
    return HeartbeatReading(path=path, heartbeat=beat, file_key=key)


_refusals_logged: set[str] = set()


def _log_refusal_once(exc: UnsafeFile) -> None:
    """Once per path and problem: the health check reads heartbeats on every tick."""
    if str(exc) not in _refusals_logged and len(_refusals_logged) < 1000:
        _refusals_logged.add(str(exc))
        log.warning("heartbeat_file_refused", path=exc.path, problem=exc.problem)


def read_heartbeat(path: Path | str) -> Heartbeat | None:
    """The heartbeat in `path`, or None when it is missing, unreadable or garbage."""
    return load_heartbeat(path).heartbeat


def heartbeat_verdict(hb: Heartbeat | HeartbeatReading | None, settings: HeartbeatSettings,
                      now: float, *, started_at: float | None = None) -> Verdict:
    """Judge a beat against its agent's settings at wall-clock `now`.

    `started_at` (wall clock) is when the current run began: a run gets a full stale window
    before a missing or old beat counts against it, so a fresh start is not judged stale
    on its predecessor's beat.
    """
    if isinstance(hb, HeartbeatReading):
        fault, hb = hb.fault, hb.heartbeat
        if fault is Verdict.GARBAGE:
            return Verdict.GARBAGE
    last = hb.ts if hb is not None else None
    if started_at is not None and (last is None or last < started_at):
        # No beat from this run yet: its start counts as one, plus the first-beat grace.
        return (Verdict.FRESH if now - started_at <= first_beat_due_s(settings)
                else Verdict.STALE)
    if last is None:
        return Verdict.MISSING
    # A beat from the future (clock step, skewed writer) counts as fresh rather than stale.
    return Verdict.FRESH if now - last <= settings.stale_after_s else Verdict.STALE


def first_beat_due_s(settings: HeartbeatSettings) -> float:
    """Seconds after a run's start by which its first beat must have come."""
    return settings.stale_after_s + settings.first_beat_grace_s


def stale_response(verdict: Verdict, settings: HeartbeatSettings) -> OnStale | None:
    """What to do about a running agent's own beat: None while it is fresh."""
    return None if verdict is Verdict.FRESH else settings.on_stale


class UpstreamStatus(msgspec.Struct, frozen=True, kw_only=True):
    """Whether a downstream run can trust one upstream agent."""

    name: str
    verdict: Verdict
    last_run_ok: bool | None
    age_s: float | None
    file_key: tuple[int, int] | None = None

    @property
    def degraded(self) -> bool:
        return self.verdict is not Verdict.FRESH or self.last_run_ok is False

    @property
    def reason(self) -> str | None:
        if self.last_run_ok is False:
            return "last_run_failed"
        return None if self.verdict is Verdict.FRESH else f"heartbeat_{self.verdict.value}"


def upstream_status(state_dir: Path | str, upstreams: Iterable[str],
                    settings_by_agent: Mapping[str, HeartbeatSettings],
                    last_run_ok_by_agent: Mapping[str, bool | None],
                    now: float) -> dict[str, UpstreamStatus]:
    """Check each upstream before a downstream run starts; stale, missing or failed → degraded."""
    statuses = {}
    for name in upstreams:
        reading = load_heartbeat(heartbeat_path(state_dir, name))
        settings = settings_by_agent.get(name, HeartbeatSettings())
        hb = reading.heartbeat
        statuses[name] = UpstreamStatus(
            name=name,
            verdict=heartbeat_verdict(reading, settings, now),
            last_run_ok=last_run_ok_by_agent.get(name),
            age_s=None if hb is None else now - hb.ts,
            file_key=reading.file_key,
        )
    return statuses


class DegradationTracker:
    """Turns per-check upstream statuses into edge events: one on entering degraded mode,
    one on leaving it, and one per garbage heartbeat file version.

    Checks run before every downstream run; logging each check would bury the one line
    an operator needs ("agent X degraded since 03:12 because Y is stale").
    """

    __slots__ = ("_degraded", "_garbage_seen")

    def __init__(self) -> None:
        self._degraded: dict[str, frozenset[str]] = {}
        self._garbage_seen: dict[str, tuple[int, int] | None] = {}

    def observe(self, agent: str, statuses: Mapping[str, UpstreamStatus]) -> bool:
        """Record one check of `agent`'s upstreams; returns whether it runs degraded."""
        self._note_garbage(statuses.values())
        causes = {name: st.reason for name, st in statuses.items() if st.degraded}
        was = self._degraded.get(agent)
        if causes and was is None:
            self._degraded[agent] = frozenset(causes)
            log.warning("agent_degraded", agent=agent, upstreams=sorted(causes),
                        reasons=causes)
        elif not causes and was is not None:
            del self._degraded[agent]
            log.info("agent_recovered", agent=agent, upstreams=sorted(was))
        elif causes:
            # The set of bad upstreams may change while degraded; that is not a new episode.
            self._degraded[agent] = frozenset(causes)
        return bool(causes)

    def _note_garbage(self, statuses: Iterable[UpstreamStatus]) -> None:
        for st in statuses:
            if st.verdict is not Verdict.GARBAGE:
                self._garbage_seen.pop(st.name, None)
                continue
            if st.name in self._garbage_seen and self._garbage_seen[st.name] == st.file_key:
                continue
            self._garbage_seen[st.name] = st.file_key
            log.warning("heartbeat_garbage", upstream=st.name,
                        hint="expected a JSON line {\"ts\": <unix seconds>}, "
                             "a bare unix timestamp, or an ISO-8601 time")
