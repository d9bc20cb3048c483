"""Alerts: what one is, the `[alerts]` settings, how it is rendered, and the sinks.

A sink makes one delivery attempt at a time (`attempt()`, raising DeliveryFailed); the outbox
(alerts/outbox.py) and the sender (alerts/sender.py) make an alert durable and retry it. A flood
of events must not become a flood of alerts: alerts other than breaker trips are rate-limited
per (kind, agent) and by a global hourly cap (AlertRateLimiter). Breaker trips skip the
limiter; the breaker already yields exactly one per trip, and losing that one is the failure
this exists for.

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import msgspec

from supervisor.breaker.breaker import Trip
from supervisor.core.hashing import sha256
from supervisor.core.ranges import PositiveDuration

if TYPE_CHECKING:
    import urllib.error

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


def trip_alert_id(trip: Trip) -> str:
    """The trip alert's id, derived from the trip: an alert re-derived from the trip later
    (pg/lost_trip_alert.py) carries the id of the one it replaces."""
    key = msgspec.json.encode([trip.agent, trip.rule.value, trip.time, trip.count])
    return sha256(key).hexdigest()[:32]


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
        alert_id=trip_alert_id(trip),
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
    """http:// or https:// with a host (configload checks it without echoing the URL)."""
    timeout_s: PositiveDuration = 5.0
    retries: Annotated[int, msgspec.Meta(ge=0)] = 3
    """Ignored since the alert outbox, which retries every failed attempt until
    `alerts.max_age_s`; accepted so that older configurations load."""
    backoff_s: PositiveDuration = 1.0
    """First retry delay; it doubles after each failed attempt."""
    backoff_max_s: PositiveDuration = 30.0
    """Cap on the retry delay."""

    def __repr__(self) -> str:
        return f"WebhookSettings(url={redact_url(self.url)!r}, timeout_s={self.timeout_s})"


class CommandSettings(_Settings):
    """A program run once per alert with the alert as JSON on stdin; never through a shell."""

    argv: Annotated[list[str], msgspec.Meta(min_length=1)]
    timeout_s: PositiveDuration = 10.0
    backoff_s: PositiveDuration = 1.0
    """First retry delay after the command failed; it doubles after each failed attempt."""
    backoff_max_s: PositiveDuration = 30.0
    """Cap on the retry delay."""


class EscalationSettings(_Settings):
    """Sinks that get an alert only once the first sinks failed to deliver it for `after_s`."""

    after_s: PositiveDuration = 900.0
    """How long the first sinks may fail on one alert before it is escalated."""
    webhooks: list[WebhookSettings] = []
    """Webhooks that get escalated alerts (as in alerts.webhooks)."""
    commands: list[CommandSettings] = []
    """Programs that get escalated alerts (as in alerts.commands)."""


class RateLimitSettings(_Settings):
    """Caps on alerts other than breaker trips."""

    per_key_interval_s: PositiveDuration = 600.0  # one alert per (kind, agent) per interval
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
    """Ignored since the alert outbox (state.db) holds every undelivered alert; accepted so
    that older configurations load."""
    max_age_s: PositiveDuration = 86400.0
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
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s  # the receiver's Retry-After, if it sent one


class Sink(Protocol):
    name: str  # for people and logs: no secret
    key: str  # stable across restarts: the outbox's delivery rows name the sink by it
    settings: WebhookSettings | CommandSettings  # backoff_s, backoff_max_s

    def attempt(self, alert: Alert) -> None:
        """Deliver one alert once, or raise DeliveryFailed."""


class WebhookSink:
    """HTTP POST of a JSON body with the alert's id as its Idempotency-Key."""

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
            raise DeliveryFailed(f"HTTP {err.code} {err.reason}", _retry_after(err)) from None
        except (OSError, http.client.HTTPException) as err:
            raise DeliveryFailed(_scrub(f"{type(err).__name__}: {err}", self.settings.url)) \
                from None
        except ValueError as err:  # urllib quotes the whole URL in these messages
            raise DeliveryFailed(_scrub(f"invalid request: {err}", self.settings.url)) from None

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


# Sessions of alert commands in flight (each runs in a session of its own). A daemon stopping
# gracefully leaves them to the sender's flush: signalled with the runs' leftovers, a command
# that had already handed the alert on died before saying so, and the alert was sent again
# at the next start.
_LIVE_SESSIONS: set[int] = set()
_LIVE_LOCK = threading.Lock()


def alert_command_sessions() -> frozenset[int]:
    """The session ids of the alert commands running now (sender threads start them)."""
    with _LIVE_LOCK:
        return frozenset(_LIVE_SESSIONS)


class CommandSink:
    """Runs argv with the alert JSON on stdin; the whole process group dies at the timeout."""

    def __init__(self, settings: CommandSettings) -> None:
        self.settings = settings
        self.name = f"command {os.path.basename(settings.argv[0])}"
        self.key = f"command:{_digest(chr(0).join(settings.argv))}"

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
        with _LIVE_LOCK:
            _LIVE_SESSIONS.add(proc.pid)
        try:
            out, stderr = proc.communicate(msgspec.json.encode(alert), timeout=timeout_s)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            raise DeliveryFailed(f"timed out after {timeout_s:g}s; process group killed") from None
        finally:
            with _LIVE_LOCK:
                _LIVE_SESSIONS.discard(proc.pid)
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
    from ..core.hashing import blake2b

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
