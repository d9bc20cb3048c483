"""The alert sender: delivers the outbox to every sink, never making the loop wait.

`send()` logs the alert at critical at once (journald PRIORITY=2), inserts it into the outbox
(alerts/outbox.py) within the caller's transaction, and hands it to each sink's thread only
after that transaction commits. A sink's thread makes one attempt and posts the result back
to the loop through a pipe; the loop, the store's one writer, marks the delivery or schedules
the next attempt with capped exponential backoff, until the alert is `alerts.max_age_s` old.
At start-up everything still owed is sent again, so a restarted daemon that comes back halted
delivers the trip alert its predecessor could not.

Alerts other than breaker trips are rate-limited per (kind, agent) and by a global hourly
cap (alerts.AlertRateLimiter); a trip is never limited.
"""

from __future__ import annotations

import os
import queue
import selectors
import threading
import time
from datetime import UTC, datetime

import msgspec
import structlog

from .alerts import Alert, AlertRateLimiter, AlertSettings, Sink, sinks_from_settings
from .outbox import Outbox, Undelivered

log = structlog.get_logger("watchkeeper.alerts")

_ERROR_CHARS = 500


class _Attempt(msgspec.Struct, frozen=True):
    """One attempt's outcome, posted by a sink's thread to the loop."""

    sink: str
    alert: Alert
    error: str | None
    duration_s: float
    retry_after_s: float | None = None


class _SinkThread:
    """One sink's attempts, one at a time: a sink that hangs delays only its own alerts."""

    def __init__(self, sink: Sink, report) -> None:
        self.sink, self._report = sink, report
        self.jobs: queue.SimpleQueue[Alert | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._run, name=f"alerts: {sink.name}",
                                       daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while (alert := self.jobs.get()) is not None:
            started = time.monotonic()
            error, retry_after_s = None, None
            try:
                self.sink.attempt(alert)
            except Exception as err:  # noqa: BLE001 - a sink's failure is a result, not a crash
                error = str(err)[:_ERROR_CHARS] or type(err).__name__
                retry_after_s = getattr(err, "retry_after_s", None)
            self._report(_Attempt(self.sink.key, alert, error, time.monotonic() - started,
                                  retry_after_s))


class AlertSender:
    """The daemon's alerter: durable, at-least-once per sink, one logical alert per event."""

    def __init__(self, settings: AlertSettings, store, timers, *,
                 sinks: list[Sink] | None = None, clock=time.monotonic,
                 wall_clock=time.time) -> None:
        self.settings, self.store, self.timers = settings, store, timers
        self._wall = wall_clock
        self.outbox = Outbox(store)
        self._limiter = AlertRateLimiter(settings.rate_limit, clock)
        chosen = sinks_from_settings(settings) if sinks is None else sinks
        escalation = settings.escalation
        self.escalation_sinks = [] if escalation is None else sinks_from_settings(escalation)
        self._results: queue.SimpleQueue[_Attempt] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._threads = {s.key: _SinkThread(s, self._post_result)
                         for s in [*chosen, *self.escalation_sinks]}
        self.first_sinks = list(dict.fromkeys(s.key for s in chosen))  # one row per sink
        self._in_flight: set[tuple[str, str]] = set()
        self._attempts: dict[tuple[str, str], int] = {}
        self._escalated: set[str] = set()
        self._closed = False

    # -- wiring into the loop ----------------------------------------------------------------
    def attach(self, selector: selectors.BaseSelector) -> None:
        """Watch the results pipe, then send whatever a previous daemon still owed."""
        selector.register(self._wake_r, selectors.EVENT_READ, self._drain)
        escalation_keys = {s.key for s in self.escalation_sinks}
        for delivery in self.outbox.pending():
            alert, sink = delivery.alert, delivery.sink
            if sink not in self._threads:
                self._retarget(alert, sink)
                continue
            self._attempts[(alert.alert_id, sink)] = delivery.attempts
            if sink in escalation_keys:
                self._escalated.add(alert.alert_id)
            log.warning("alert_resent_after_restart", alert_id=alert.alert_id,
                        kind=alert.kind.value, sink=sink, attempts=delivery.attempts)
            self._dispatch(alert, sink)

    def _retarget(self, alert: Alert, old_sink: str) -> None:
        # The operator replaced a broken webhook while the alert was owed: the new one gets it.
        self.outbox.give_up(alert.alert_id, old_sink, "sink no longer configured; owed to "
                            "the configured sinks instead")
        log.warning("alert_retargeted", alert_id=alert.alert_id, old_sink=old_sink,
                    sinks=self.first_sinks)
        for key in self.first_sinks:
            if key not in self.outbox.delivered_to(alert.alert_id):
                self.outbox.add_sink(alert.alert_id, key)
                self._dispatch(alert, key)

    def _post_result(self, result: _Attempt) -> None:
        """Any thread: queue a result and wake the loop."""
        self._results.put(result)
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # the pipe is full (the loop is due to wake) or closed at shutdown

    def _drain(self, _mask: int = 0) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        while True:
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                return
            self._record(result)

    # -- sending -------------------------------------------------------------------------------
    def send(self, alert: Alert) -> bool:
        """Log the alert at critical and put it in the outbox; False if rate-limited away.

        Delivery starts once the caller's transaction commits; this never waits for a sink.
        """
        admitted, suppressed = self._limiter.admit(alert)
        if not admitted:
            log.warning("alert_suppressed", kind=alert.kind.value, agent=alert.agent,
                        title=alert.title, suppressed=suppressed)
            return False
        if suppressed:
            alert = msgspec.structs.replace(
                alert, fields={**alert.fields, "suppressed_since_last": suppressed})
        try:
            alert = self.outbox.add(alert, self.first_sinks)
        except Exception as exc:  # noqa: BLE001 - a full disk must not swallow the alert
            log.error("alert_outbox_write_failed", error=str(exc),
                      hint="delivering from memory only; a restart now would lose it")
            alert = msgspec.structs.replace(alert, alert_id=alert.alert_id or os.urandom(16).hex())
        log.critical("alert", kind=alert.kind.value, agent=alert.agent, title=alert.title,
                     text=alert.text, fields=alert.fields, alert_id=alert.alert_id,
                     time=datetime.fromtimestamp(alert.time, UTC).isoformat())
        self.store.after_commit(lambda: [self._dispatch(alert, k) for k in self.first_sinks])
        return True

    def _dispatch(self, alert: Alert, sink: str) -> None:
        if self._closed or (alert.alert_id, sink) in self._in_flight:
            return
        thread = self._threads.get(sink)
        if thread is None:
            self.outbox.give_up(alert.alert_id, sink, "sink no longer configured")
            log.error("alert_given_up", alert_id=alert.alert_id, sink=sink,
                      reason="sink no longer configured")
            return
        self._in_flight.add((alert.alert_id, sink))
        thread.jobs.put(alert)

    def _record(self, result: _Attempt) -> None:
        alert, key = result.alert, (result.alert.alert_id, result.sink)
        self._in_flight.discard(key)
        sink = self._threads[result.sink].sink
        attempts = self._attempts.get(key, 0) + 1
        if result.error is None:
            self._attempts.pop(key, None)
            self.outbox.delivered(alert.alert_id, result.sink)
            log.info("alert_delivered", sink=sink.name, kind=alert.kind.value,
                     agent=alert.agent, alert_id=alert.alert_id, attempts=attempts,
                     duration_s=round(result.duration_s, 3))
            return
        self._attempts[key] = attempts
        self.outbox.failed(alert.alert_id, result.sink, result.error, now=self._wall())
        age_s = self._wall() - alert.time
        if age_s >= self.settings.max_age_s:
            self._attempts.pop(key, None)
            self.outbox.give_up(alert.alert_id, result.sink, result.error)
            log.error("alert_given_up", sink=sink.name, kind=alert.kind.value,
                      alert_id=alert.alert_id, attempts=attempts, error=result.error,
                      hint=f"undelivered for alerts.max_age_s ({self.settings.max_age_s:g}s)")
            return
        backoff = sink.settings
        delay_s = min(backoff.backoff_max_s,
                      result.retry_after_s or backoff.backoff_s * 2 ** (attempts - 1))
        log.error("alert_delivery_failed", sink=sink.name, kind=alert.kind.value,
                  agent=alert.agent, alert_id=alert.alert_id, attempt=attempts,
                  retry_in_s=round(delay_s, 3), error=result.error)
        self.timers.call_later(delay_s, lambda: self._dispatch(alert, result.sink))
        self._maybe_escalate(alert, result.sink)

    def _maybe_escalate(self, alert: Alert, failed_sink: str) -> None:
        escalation = self.settings.escalation
        if (escalation is None or alert.alert_id in self._escalated
                or failed_sink not in self.first_sinks):
            return
        # Counted from the sink's first failed attempt, which the outbox keeps across
        # restarts; an alert that waited in a queue or a hung attempt has not failed yet.
        first_failed = self._first_failed(alert, failed_sink)
        failing_for_s = self._wall() - first_failed
        if failing_for_s < escalation.after_s:
            return
        self._escalated.add(alert.alert_id)
        log.error("alert_escalated", alert_id=alert.alert_id, kind=alert.kind.value,
                  after_s=escalation.after_s, failing_for_s=round(failing_for_s, 3),
                  attempts=self._attempts.get((alert.alert_id, failed_sink), 0))
        for sink in self.escalation_sinks:
            self.outbox.add_sink(alert.alert_id, sink.key)
            self._dispatch(alert, sink.key)

    def _first_failed(self, alert: Alert, sink: str) -> float:
        try:
            first_failed = self.outbox.first_failed(alert.alert_id, sink)
        except Exception as exc:  # noqa: BLE001 - a broken disk must not stop escalation
            log.error("alert_outbox_read_failed", error=str(exc))
            first_failed = None
        # No row (the mark could not be written): the alert's age, so escalation still comes.
        return alert.time if first_failed is None else first_failed

    def prune(self) -> None:
        """Forget settled alerts a week past `max_age_s` (the outbox must not grow forever)."""
        try:
            self.outbox.prune(self.settings.max_age_s + 7 * 86400.0, self._wall())
        except Exception as exc:  # noqa: BLE001 - a full disk must not stop the tick
            log.error("alert_outbox_prune_failed", error=str(exc))

    # -- what people see -----------------------------------------------------------------------
    def undelivered(self) -> Undelivered:
        try:
            return self.outbox.undelivered(self._wall())
        except Exception as exc:  # noqa: BLE001 - status must answer even with a broken disk
            return Undelivered(-1, 0.0, f"outbox unreadable: {exc}")

    def flush(self, timeout_s: float) -> bool:
        """Loop thread: wait until no attempt is in flight, recording results; False on timeout."""
        deadline = time.monotonic() + timeout_s
        while self._in_flight:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            try:
                result = self._results.get(timeout=remaining)
            except queue.Empty:
                return False
            self._record(result)
        self._drain()
        return True

    def close(self, timeout_s: float = 5.0) -> bool:
        """Record the attempts in flight (up to timeout_s), then stop; the rest stays owed."""
        flushed = self.flush(timeout_s)
        self._closed = True
        for thread in self._threads.values():
            thread.jobs.put(None)
        owed = self.undelivered()
        if owed.count:
            log.warning("alerts_owed_at_stop", **owed.as_dict(),
                        hint="the next start sends them")
        return flushed
