"""Alerts: tell a person, without ever making the daemon's loop wait for them to be told.

`Alerter.send()` logs the alert at critical (journald PRIORITY=2 through the logging layer) and
queues it for each sink; every sink has its own worker thread and bounded queue, so a Discord
endpoint that accepts a connection and never answers delays neither the loop nor the other sinks.

A flood of events must not become a flood of alerts: alerts other than breaker trips are
rate-limited per (kind, agent) and by a global hourly cap. Breaker trips skip the limiter; the
breaker already yields exactly one per trip, and losing that one is the failure this exists for.

Webhook URLs carry their secret token in the path, so logs show only scheme and host.
"""

from __future__ import annotations

import contextlib
import enum
import os
import signal
import subprocess
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import msgspec
import structlog

from supervisor.breaker import Trip

if TYPE_CHECKING:
    import urllib.error

log = structlog.get_logger("watchkeeper.alerts")

Seconds = Annotated[float, msgspec.Meta(gt=0)]
_CONTENT_CHARS = 2000  # Discord rejects longer `content`; Slack accepts it
_ERROR_CHARS = 500
_USER_AGENT = "watchkeeper-alerts/0.1"  # Discord's edge answers 403 to the urllib default agent


class AlertKind(enum.StrEnum):
    BREAKER_TRIP = "breaker_trip"
    BREAKER_RESET = "breaker_reset"
    CRASH_LOOP = "crash_loop"
    MEMORY_KILL = "memory_kill"
    STALE_HEARTBEAT = "stale_heartbeat"
    RUN_FAILED = "run_failed"


NEVER_RATE_LIMITED = frozenset({AlertKind.BREAKER_TRIP})


class Alert(msgspec.Struct, frozen=True, kw_only=True):
    kind: AlertKind
    title: str
    text: str
    agent: str | None = None
    fields: dict[str, Any] = {}  # JSON-able details: limit, count, window_s, last outputs...
    time: float = msgspec.field(default_factory=time.time)  # wall clock, for people
    alert_id: str = ""  # stable across every delivery attempt: receivers drop duplicates by it


def trip_alert(trip: Trip) -> Alert:
    """The one alert for one breaker trip."""
    fields: dict[str, Any] = {"rule": trip.rule.value, "limit": trip.limit,
                              "count": trip.count, "window_s": trip.window_s}
    if trip.kind:
        fields["output_kind"] = trip.kind
    if trip.setting:
        fields["setting_to_raise"] = trip.setting
    fields["last_outputs"] = list(trip.summaries)
    return Alert(
        kind=AlertKind.BREAKER_TRIP, agent=trip.agent, fields=fields, time=trip.time,
        title=f"Circuit breaker tripped by {trip.agent}: pipeline halted",
        text=(f"{trip.agent} went past the {trip.rule.value} limit ({trip.count:g} seen, limit "
              f"{trip.limit}). Every run is stopped and none will start until the breaker is "
              "reset." + (f" If this was not a runaway, raise {trip.setting}." if trip.setting
                          else "")),
    )


# -- settings ----------------------------------------------------------------------------------


class _Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class WebhookSettings(_Settings):
    """A Slack- or Discord-compatible incoming webhook."""

    url: str
    timeout_s: Seconds = 5.0
    retries: Annotated[int, msgspec.Meta(ge=0)] = 3
    """Immediate retries inside one attempt of the in-memory Alerter; the daemon's outbox
    retries every failed attempt until `alerts.max_age_s` instead."""
    backoff_s: Seconds = 1.0
    """First retry delay; it doubles after each failed attempt."""
    backoff_max_s: Seconds = 30.0
    """Cap on the retry delay."""

    def __post_init__(self) -> None:
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            # Never echo the URL: its path is the webhook's secret.
            raise ValueError(f"alerts.webhooks[].url must be an http:// or https:// URL with a "
                             f"host; got scheme {parts.scheme or '(none)'!r}")

    def __repr__(self) -> str:
        return f"WebhookSettings(url={redact_url(self.url)!r}, timeout_s={self.timeout_s})"


class CommandSettings(_Settings):
    """A program run once per alert with the alert as JSON on stdin; never through a shell."""

    argv: Annotated[list[str], msgspec.Meta(min_length=1)]
    timeout_s: Seconds = 10.0
    backoff_s: Seconds = 1.0
    """First retry delay after the command failed; it doubles after each failed attempt."""
    backoff_max_s: Seconds = 30.0
    """Cap on the retry delay."""


class EscalationSettings(_Settings):
    """Sinks that get an alert only once the first sinks failed to deliver it for `after_s`."""

    after_s: Seconds = 900.0
    """How long the first sinks may fail on one alert before it is escalated."""
    webhooks: list[WebhookSettings] = []
    """Webhooks that get escalated alerts (as in alerts.webhooks)."""
    commands: list[CommandSettings] = []
    """Programs that get escalated alerts (as in alerts.commands)."""


class RateLimitSettings(_Settings):
    """Caps on alerts other than breaker trips."""

    per_key_interval_s: Seconds = 600.0  # one alert per (kind, agent) per interval
    global_max_per_hour: Annotated[int, msgspec.Meta(ge=1)] = 20
    """Alerts other than breaker trips per hour, all kinds together."""


class AlertSettings(_Settings):
    """The `[alerts]` config section; the critical log line is always on."""

    webhooks: list[WebhookSettings] = []
    """Slack/Discord-compatible webhooks: url, timeout_s, retries, backoff_s, backoff_max_s."""
    commands: list[CommandSettings] = []
    """Programs run per alert with the alert as JSON on stdin: argv, timeout_s."""
    rate_limit: RateLimitSettings = msgspec.field(default_factory=RateLimitSettings)
    queue_size: Annotated[int, msgspec.Meta(ge=1)] = 64
    """Alerts waiting per sink; a trip alert displaces an older one."""
    max_age_s: Seconds = 86400.0
    """An undelivered alert is retried (across restarts) until it is this old."""
    escalation: EscalationSettings | None = None
    """Optional sinks for alerts the first sinks failed to deliver for `after_s`."""


# -- redaction and rendering -------------------------------------------------------------------


def redact_url(url: str) -> str:
    """Scheme, host and port only: webhook tokens live in the path and query."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    with contextlib.suppress(ValueError):
        if parts.port:
            host = f"{host}:{parts.port}"
    hidden = "/<redacted>" if (parts.path not in ("", "/") or parts.query) else ""
    return f"{parts.scheme}://{host}{hidden}"


def _scrub(text: str, url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    for secret in (url, parts.path, parts.query):
        if secret and secret != "/":
            text = text.replace(secret, "<redacted>")
    return text[:_ERROR_CHARS]


def _defang(text: str) -> str:
    # Agent output is quoted in alerts; a looping agent's "@everyone" must not page a channel.
    return (text.replace("@everyone", "@\u200beveryone").replace("@here", "@\u200bhere")
            .replace("<!", "<\u200b!"))


def render_text(alert: Alert) -> str:
    """Plain text that reads well in both Slack and Discord."""
    lines = [f"[watchkeeper] {alert.title}", alert.text]
    if alert.agent:
        lines.append(f"agent: {alert.agent}")
    for key, value in alert.fields.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"  - {item}" for item in value)
        else:
            lines.append(f"{key}: {value}")
    text = _defang("\n".join(lines))
    return text if len(text) <= _CONTENT_CHARS else text[: _CONTENT_CHARS - 1] + "\u2026"


def webhook_body(alert: Alert) -> dict[str, Any]:
    """One body both services take: Discord reads `content`, Slack reads `text`.

    No embeds: Slack ignores them and Discord would show every field twice.
    """
    text = render_text(alert)
    body = {"content": text, "text": text, "allowed_mentions": {"parse": []}}
    if alert.alert_id:
        body["alert_id"] = alert.alert_id
    return body


# -- sinks -------------------------------------------------------------------------------------


class DeliveryFailed(Exception):
    pass


class Sink(Protocol):
    name: str

    def deliver(self, alert: Alert, stop: threading.Event) -> None:
        """Deliver one alert or raise; return early when `stop` is set."""


class WebhookSink:
    """HTTP POST of a JSON body, retried with exponential backoff on network errors, 429 and 5xx."""

    def __init__(self, settings: WebhookSettings) -> None:
        self.settings = settings
        self.name = f"webhook {redact_url(settings.url)}"
        self.key = f"webhook:{_digest(settings.url)}"  # stable across restarts, no secret

    def attempt(self, alert: Alert) -> None:
        """One POST of the alert; raises DeliveryFailed (the outbox retries)."""
        import http.client
        import urllib.error

        try:
            self._post(msgspec.json.encode(webhook_body(alert)), alert.alert_id)
        except urllib.error.HTTPError as err:
            raise DeliveryFailed(f"HTTP {err.code} {err.reason}") from None
        except (OSError, http.client.HTTPException) as err:
            raise DeliveryFailed(_scrub(f"{type(err).__name__}: {err}", self.settings.url)) \
                from None
        except ValueError as err:  # urllib quotes the whole URL in these messages
            raise DeliveryFailed(_scrub(f"invalid request: {err}", self.settings.url)) from None

    def deliver(self, alert: Alert, stop: threading.Event) -> None:
        # Imported here: http.client brings ssl and email (~6 MiB) into a daemon that may
        # never send an alert.
        import http.client
        import urllib.error

        s, body = self.settings, msgspec.json.encode(webhook_body(alert))
        for attempt in range(1, s.retries + 2):
            try:
                self._post(body, alert.alert_id)
                return
            except urllib.error.HTTPError as err:
                if err.code != 429 and err.code < 500:
                    raise DeliveryFailed(f"HTTP {err.code} {err.reason}; not retried") from None
                error, retry_after = f"HTTP {err.code} {err.reason}", _retry_after(err)
            except (OSError, http.client.HTTPException) as err:
                error, retry_after = _scrub(f"{type(err).__name__}: {err}", s.url), None
            except ValueError as err:  # urllib quotes the whole URL in these messages
                raise DeliveryFailed(_scrub(f"invalid request: {err}", s.url)) from None
            if attempt > s.retries:
                raise DeliveryFailed(f"{error}; gave up after {attempt} attempts")
            delay_s = min(s.backoff_max_s, retry_after or s.backoff_s * 2 ** (attempt - 1))
            log.warning("alert_retry", sink=self.name, kind=alert.kind.value, attempt=attempt,
                        delay_s=delay_s, error=error)
            if stop.wait(delay_s):
                raise DeliveryFailed(f"{error}; abandoned at shutdown after {attempt} attempts")

    def _post(self, body: bytes, alert_id: str = "") -> None:
        import urllib.request

        headers = {"Content-Type": "application/json", "User-Agent": _USER_AGENT}
        if alert_id:
            headers["Idempotency-Key"] = alert_id
        request = urllib.request.Request(self.settings.url, data=body, method="POST",
                                         headers=headers)
        with urllib.request.urlopen(request, timeout=self.settings.timeout_s) as response:
            response.read(65536)


def _retry_after(err: urllib.error.HTTPError) -> float | None:
    try:
        return max(0.0, float(err.headers.get("Retry-After", "")))
    except (TypeError, ValueError):
        return None


# The daemon's loop reaps every child with waitpid(-1) (it is a subreaper), so the command's
# exit status would be stolen before Popen saw it, and a failed command recorded as delivered.
# A small Python parent waits for the command itself and writes the status on its stdout,
# which no reaper can take.
_STATUS_WRAPPER = (
    "import subprocess, sys\n"
    "try:\n"
    "    code = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL).returncode\n"
    "except OSError as err:\n"
    "    sys.stderr.write(f'cannot run {sys.argv[1]!r}: {err.strerror or err}')\n"
    "    code = 127\n"
    "sys.stdout.write(str(code))\n"
)


class CommandSink:
    """Runs argv with the alert JSON on stdin; the whole process group dies at the timeout."""

    def __init__(self, settings: CommandSettings) -> None:
        self.settings = settings
        self.name = f"command {os.path.basename(settings.argv[0])}"
        self.key = f"command:{_digest(chr(0).join(settings.argv))}"

    def deliver(self, alert: Alert, stop: threading.Event) -> None:
        self.attempt(alert)

    def attempt(self, alert: Alert) -> None:
        """Run the command once; raises DeliveryFailed unless it exits 0."""
        import sys

        argv, timeout_s = self.settings.argv, self.settings.timeout_s
        try:
            # Own session: on timeout we kill the group, so a grandchild holding our pipes
            # cannot keep communicate() waiting.
            proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", _STATUS_WRAPPER, *argv],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, start_new_session=True)
        except OSError as err:
            raise DeliveryFailed(f"cannot run {argv[0]!r}: {err.strerror or err}") from None
        try:
            out, stderr = proc.communicate(msgspec.json.encode(alert), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise DeliveryFailed(f"timed out after {timeout_s:g}s; process group killed") from None
        status = out.decode(errors="replace").strip()
        if status != "0":
            tail = stderr.decode(errors="replace").strip()[-_ERROR_CHARS:]
            shown = status if status.lstrip("-").isdigit() else "unknown (killed)"
            raise DeliveryFailed(f"exited with status {shown}: {tail}")


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=1.0)
    except subprocess.TimeoutExpired:
        proc.kill()  # a descendant left the group and kept the pipe; stop reading it
        proc.wait()


def sinks_from_settings(settings: AlertSettings | EscalationSettings) -> list[Sink]:
    return [*map(WebhookSink, settings.webhooks), *map(CommandSink, settings.commands)]


def _digest(text: str) -> str:
    from .hashing import blake2b

    return blake2b(text.encode(), digest_size=6).hexdigest()


# -- rate limiting -----------------------------------------------------------------------------


class AlertRateLimiter:
    """At most one alert per (kind, agent) per interval and a global cap per sliding hour."""

    def __init__(self, settings: RateLimitSettings, clock: Callable[[], float]) -> None:
        self.settings, self._clock = settings, clock
        self._last: dict[tuple[str, str | None], float] = {}
        self._suppressed: dict[tuple[str, str | None], int] = {}
        self._recent: deque[float] = deque()

    def admit(self, alert: Alert) -> tuple[bool, int]:
        """(whether to send, how many alerts for this key were suppressed since the last sent)."""
        if alert.kind in NEVER_RATE_LIMITED:
            return True, 0
        now, key, s = self._clock(), (alert.kind.value, alert.agent), self.settings
        while self._recent and self._recent[0] <= now - 3600.0:
            self._recent.popleft()
        last = self._last.get(key)
        if ((last is not None and now - last < s.per_key_interval_s)
                or len(self._recent) >= s.global_max_per_hour):
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False, self._suppressed[key]
        self._last[key] = now
        self._recent.append(now)
        return True, self._suppressed.pop(key, 0)


# -- the alerter -------------------------------------------------------------------------------


class _SinkWorker:
    """One sink's bounded queue and thread; a slow sink only delays its own alerts."""

    def __init__(self, sink: Sink, queue_size: int, stop: threading.Event) -> None:
        self.sink, self._queue_size, self._stop = sink, queue_size, stop
        self._items: deque[Alert] = deque()
        self._busy = False
        self._cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name=f"alerts: {sink.name}",
                                       daemon=True)
        self.thread.start()

    def put(self, alert: Alert) -> Alert | None:
        """Queue the alert; returns whichever alert had to be dropped because the queue is full."""
        with self._cond:
            dropped = None
            if len(self._items) >= self._queue_size:
                # A stalled sink must still carry the breaker trip: evict an older non-trip alert.
                victim = next((a for a in self._items if a.kind not in NEVER_RATE_LIMITED), None)
                if alert.kind not in NEVER_RATE_LIMITED or victim is None:
                    return alert
                self._items.remove(victim)
                dropped = victim
            self._items.append(alert)
            self._cond.notify_all()
            return dropped

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._stop.is_set():
                    self._cond.wait()
                if self._stop.is_set():
                    self._abandon()
                    return
                alert, self._busy = self._items.popleft(), True
            try:
                self._deliver(alert)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _deliver(self, alert: Alert) -> None:
        started = time.monotonic()
        try:
            self.sink.deliver(alert, self._stop)
        except Exception as err:
            # One failing sink is logged and the others go on; the critical log line already
            # recorded the alert itself.
            log.error("alert_delivery_failed", sink=self.sink.name, kind=alert.kind.value,
                      agent=alert.agent, title=alert.title, error=str(err)[:_ERROR_CHARS])
            return
        log.info("alert_delivered", sink=self.sink.name, kind=alert.kind.value,
                 agent=alert.agent, duration_s=round(time.monotonic() - started, 3))

    def _abandon(self) -> None:
        if self._items:
            log.error("alerts_abandoned", sink=self.sink.name, count=len(self._items),
                      kinds=sorted({a.kind.value for a in self._items}))
            self._items.clear()

    def wait_idle(self, deadline: float) -> bool:
        with self._cond:
            while self._items or self._busy:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    def wake(self) -> None:
        with self._cond:
            self._cond.notify_all()


class Alerter:
    """Fans alerts out to sinks on background threads; `send()` never waits for a sink."""

    def __init__(self, settings: AlertSettings | None = None, *,
                 sinks: Sequence[Sink] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        settings = settings or AlertSettings()
        self._limiter = AlertRateLimiter(settings.rate_limit, clock)
        self._lock = threading.Lock()  # send() may come from more than one thread
        self._stop = threading.Event()
        self._closed = False
        chosen = sinks_from_settings(settings) if sinks is None else list(sinks)
        self._workers = [_SinkWorker(sink, settings.queue_size, self._stop) for sink in chosen]

    def send(self, alert: Alert) -> bool:
        """Log the alert at critical and queue it for every sink; False if not queued.

        Alerts are not queued when rate-limited away or after `close()`.
        """
        with self._lock:
            admitted, suppressed = self._limiter.admit(alert)
        if not admitted:
            log.warning("alert_suppressed", kind=alert.kind.value, agent=alert.agent,
                        title=alert.title, suppressed=suppressed)
            return False
        if suppressed:
            alert = msgspec.structs.replace(
                alert, fields={**alert.fields, "suppressed_since_last": suppressed})
        log.critical("alert", kind=alert.kind.value, agent=alert.agent, title=alert.title,
                     text=alert.text, fields=alert.fields,
                     time=datetime.fromtimestamp(alert.time, UTC).isoformat())
        if self._closed:
            log.error("alert_after_close", kind=alert.kind.value, agent=alert.agent)
            return False
        for worker in self._workers:
            dropped = worker.put(alert)
            if dropped is not None:
                log.error("alert_dropped_queue_full", sink=worker.sink.name,
                          kind=dropped.kind.value, agent=dropped.agent, title=dropped.title)
        return True

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued alert was delivered or failed; False if time ran out."""
        deadline = time.monotonic() + timeout_s
        return all([worker.wait_idle(deadline) for worker in self._workers])

    def close(self, timeout_s: float = 5.0) -> bool:
        """Deliver what can be delivered within timeout_s, then stop the workers."""
        self._closed = True
        deadline = time.monotonic() + timeout_s
        flushed = self.flush(timeout_s)
        self._stop.set()  # cuts retry backoffs short; an in-flight request runs to its timeout
        for worker in self._workers:
            worker.wake()
        for worker in self._workers:
            worker.thread.join(max(0.0, deadline - time.monotonic()))
        if not flushed:
            log.error("alerter_closed_with_pending_alerts",
                      sinks=[w.sink.name for w in self._workers if w.thread.is_alive()])
        return flushed
