"""The alert sender and its sinks against a real HTTP receiver on 127.0.0.1 and real child
processes, with the outbox in a real SQLite store and the daemon's loop in miniature."""

from __future__ import annotations

import contextlib
import http.server
import json
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import psutil
import pytest
from structlog.testing import capture_logs
from support import wait_until

from supervisor.alerts.alerts import (
    Alert,
    AlertKind,
    AlertSettings,
    CommandSettings,
    RateLimitSettings,
    WebhookSettings,
    WebhookSink,
    redact_url,
    trip_alert,
    trip_alert_id,
    webhook_body,
)
from supervisor.alerts.sender import AlertSender
from supervisor.breaker.breaker import Breaker, BreakerSettings, OutputLimit
from supervisor.core.timers import Timers
from supervisor.storage.store import Store

SECRET_PATH = "/api/webhooks/1234567890/s3cr3t-t0ken"


class Receiver:
    """A Discord stand-in: records each POST and answers with the next scripted status."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.requests: list[dict] = []
        self.statuses = list(statuses or [])
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.requests.append({"path": self.path, "headers": dict(self.headers),
                                          "json": json.loads(body)})
                status = receiver.statuses.pop(0) if receiver.statuses else 204
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str = SECRET_PATH) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}{path}?wait=true"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HangingReceiver:
    """Accepts connections and never answers, like a receiver stuck behind a dead proxy."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted.append(conn)

    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}{SECRET_PATH}"

    def close(self) -> None:
        # shutdown first: close() alone leaves the port listening while accept() blocks on it,
        # and the next attempt would hang in the backlog.
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()
        for conn in self.accepted:
            conn.close()


class RecordingSink:
    """An in-memory sink that takes every alert at once."""

    name = key = "recording"
    settings = CommandSettings(argv=["recording"])  # its backoff

    def __init__(self) -> None:
        self.alerts: list[Alert] = []

    def attempt(self, alert: Alert) -> None:
        self.alerts.append(alert)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.delenv(name, raising=False)


class Loop:
    """The daemon's loop in miniature around one AlertSender: a store, timers, a selector."""

    def __init__(self, root: Path, settings: AlertSettings | None = None, *,
                 sinks: list | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.store = Store(root / "state.db")
        self.timers = Timers()
        self.selector = selectors.DefaultSelector()
        self.sender = AlertSender(settings or AlertSettings(), self.store, self.timers,
                                  sinks=sinks, clock=clock)
        self.sender.attach(self.selector)

    def send(self, alert: Alert) -> bool:
        return self.sender.send(alert)

    def run_until(self, condition: Callable[[], object], timeout_s: float = 10.0) -> bool:
        """Turn the loop until `condition()` holds; False when time ran out."""
        deadline = time.monotonic() + timeout_s
        while not condition():
            if time.monotonic() > deadline:
                return False
            pending = self.timers.time_until_next()
            for key, mask in self.selector.select(min(0.05, pending if pending is not None
                                                      else 0.05)):
                key.data(mask)
            self.timers.run_due()
        return True

    def settled(self) -> bool:
        return self.sender.undelivered().count == 0 and not self.sender._in_flight

    def close(self) -> None:
        self.sender.close(timeout_s=1)
        self.store.close()


@pytest.fixture
def make_loop(tmp_path: Path) -> Iterator[Callable[..., Loop]]:
    """Builds Loops and closes them after the test, so no sink thread outlives its test."""
    made: list[Loop] = []

    def make(*args, **kwargs) -> Loop:
        made.append(Loop(tmp_path / f"loop{len(made)}", *args, **kwargs))
        return made[-1]

    yield make
    for loop in made:
        loop.close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


@pytest.fixture
def refused_url() -> str:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}{SECRET_PATH}?token=abc"


def webhook(url: str, **kw) -> AlertSettings:
    kw.setdefault("backoff_s", 0.01)
    return AlertSettings(webhooks=[WebhookSettings(url=url, **kw)])


def crash(agent: str = "seo", title: str = "seo crash-looping") -> Alert:
    return Alert(kind=AlertKind.CRASH_LOOP, agent=agent, title=title, text="5 exits in 60s")


def events(logs: list[dict], name: str) -> list[dict]:
    return [e for e in logs if e["event"] == name]


def test_breaker_trip_sends_exactly_one_post_with_the_fields(receiver: Receiver, make_loop):
    """A runaway agent produces exactly one webhook POST carrying agent, limit, count, summaries
    and the alert's id (in the body and the Idempotency-Key header)."""
    breaker = Breaker(BreakerSettings(outputs=OutputLimit(max_outputs=11, window_s=600)))
    loop = make_loop(webhook(receiver.url()))
    for i in range(40):
        decision = breaker.check_output("community", "discord_post", summary=f"Launch day! #{i}")
        if decision.trip is not None:
            loop.send(trip_alert(decision.trip))
    assert loop.run_until(loop.settled)

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request["path"] == SECRET_PATH + "?wait=true"
    assert request["headers"]["Content-Type"] == "application/json"
    body = request["json"]
    assert body["content"] == body["text"]
    for expected in ("community", "11 outputs in 600s", "count: 12", "window_s: 600",
                     "Launch day! #11", "limits.outputs.max_outputs"):
        assert expected in body["content"]
    assert body["allowed_mentions"] == {"parse": []}
    assert len(body["alert_id"]) == 32 and request["headers"]["Idempotency-Key"] == body["alert_id"]


def test_webhook_retries_server_errors_then_delivers(make_loop):
    """A 503 answer is a failed attempt, retried with backoff; the next 204 delivers."""
    receiver = Receiver(statuses=[503, 204])
    try:
        loop = make_loop(webhook(receiver.url()))
        with capture_logs() as logs:
            loop.send(crash())
            assert loop.run_until(loop.settled)
        assert len(receiver.requests) == 2
        [failed] = events(logs, "alert_delivery_failed")
        assert failed["attempt"] == 1 and failed["error"].startswith("HTTP 503")
        [delivered] = events(logs, "alert_delivered")
        assert delivered["attempts"] == 2
    finally:
        receiver.close()


def test_webhook_client_error_is_retried_like_any_failure(make_loop):
    """A 4xx answer (a bad token the operator may fix) is retried too: the alert stays owed."""
    receiver = Receiver(statuses=[401, 204])
    try:
        loop = make_loop(webhook(receiver.url()))
        with capture_logs() as logs:
            loop.send(crash())
            assert loop.run_until(loop.settled)
        assert "HTTP 401" in events(logs, "alert_delivery_failed")[0]["error"]
        assert len(receiver.requests) == 2
    finally:
        receiver.close()


def test_webhook_down_is_retried_with_capped_backoff(refused_url: str, make_loop):
    """With the receiver down every failed attempt is logged with the next delay, doubling up
    to backoff_max_s, and the alert shows as undelivered with the last error."""
    loop = make_loop(webhook(refused_url, backoff_s=0.05, backoff_max_s=0.1))
    with capture_logs() as logs:
        assert loop.send(crash()) is True
        assert loop.run_until(lambda: len(events(logs, "alert_delivery_failed")) >= 3)
    failures = events(logs, "alert_delivery_failed")[:3]
    assert [e["retry_in_s"] for e in failures] == [0.05, 0.1, 0.1]
    assert "refused" in failures[0]["error"] or "ConnectionRefusedError" in failures[0]["error"]
    owed = loop.sender.undelivered()
    assert owed.count == 1 and "refused" in owed.last_error.lower()


def test_alert_older_than_max_age_is_given_up(refused_url: str, make_loop):
    """An alert still undelivered past alerts.max_age_s is given up and logged, not retried."""
    settings = AlertSettings(max_age_s=60, webhooks=[WebhookSettings(url=refused_url)])
    loop = make_loop(settings)
    with capture_logs() as logs:
        loop.send(Alert(kind=AlertKind.CRASH_LOOP, agent="seo", title="old", text="",
                        time=time.time() - 61))
        assert loop.run_until(lambda: events(logs, "alert_given_up"))
    assert loop.sender.undelivered().count == 0


def test_send_returns_while_receiver_hangs_and_other_sinks_deliver(make_loop):
    """While one webhook accepts and never answers, the other sink gets every alert."""
    hanging, recording = HangingReceiver(), RecordingSink()
    hook = WebhookSink(WebhookSettings(url=hanging.url(), timeout_s=30))
    loop = make_loop(sinks=[hook, recording])
    try:
        for agent in ("a", "b", "c"):
            assert loop.send(crash(agent))
        assert loop.run_until(lambda: hanging.accepted and len(recording.alerts) == 3)
        assert loop.sender.undelivered().count == 3  # the hanging webhook owes all three
        assert loop.sender.close(timeout_s=0.3) is False
    finally:
        hanging.close()
        # Let the stuck thread see the reset and finish, so its log lines stay in this test.
        wait_until(lambda: not any(t.name == f"alerts: {hook.name}"
                                   for t in threading.enumerate()), timeout_s=5)


def test_webhook_that_never_answers_times_out_and_is_logged(make_loop):
    """A request with no answer fails after timeout_s and the failure says it timed out."""
    hanging = HangingReceiver()
    loop = make_loop(webhook(hanging.url(), timeout_s=0.3))
    try:
        with capture_logs() as logs:
            loop.send(crash())
            assert loop.run_until(lambda: events(logs, "alert_delivery_failed"))
        assert "timed out" in events(logs, "alert_delivery_failed")[0]["error"]
    finally:
        hanging.close()


def test_command_sink_gets_the_alert_as_json_on_stdin(tmp_path, make_loop):
    """The command runs as a real child and reads the whole alert, with its id, as JSON."""
    out = tmp_path / "alert.json"
    script = ("import sys, os; data = sys.stdin.buffer.read(); "
              "open(sys.argv[1] + '.tmp', 'wb').write(data); os.replace(sys.argv[1] + '.tmp', "
              "sys.argv[1])")
    settings = AlertSettings(commands=[CommandSettings(argv=[sys.executable, "-c", script,
                                                             str(out)])])
    loop = make_loop(settings)
    alert = Alert(kind=AlertKind.MEMORY_KILL, agent="browser", title="browser killed",
                  text="RSS 1900 MB over 1500 MB", fields={"rss_mb": 1900}, time=1_700_000_000.0)
    with capture_logs() as logs:
        loop.send(alert)
        assert loop.run_until(loop.settled)
    received = msgspec.json.decode(out.read_bytes(), type=Alert)
    assert received.alert_id and msgspec.structs.replace(received, alert_id="") == alert
    assert json.loads(out.read_text())["kind"] == "memory_kill"
    assert len(events(logs, "alert_delivered")) == 1


def test_command_that_hangs_is_killed_with_its_children(tmp_path, make_loop):
    """A command past its timeout is killed together with its grandchildren and the failure logged."""
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, pathlib; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "pathlib.Path(sys.argv[1]).write_text(str(p.pid)); p.wait()")
    settings = AlertSettings(commands=[CommandSettings(
        argv=[sys.executable, "-c", script, str(pid_file)], timeout_s=1.0, backoff_s=60)])
    loop = make_loop(settings)
    with capture_logs() as logs:
        loop.send(crash())
        assert loop.run_until(lambda: events(logs, "alert_delivery_failed"))
    [failed] = events(logs, "alert_delivery_failed")
    assert "timed out after 1s" in failed["error"]
    grandchild = int(pid_file.read_text())

    def gone() -> bool:
        try:
            return psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(gone, timeout_s=5)


def test_command_failure_reports_exit_status_and_stderr(make_loop):
    """A command that exits non-zero is logged with its status and the tail of its stderr."""
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('no route to pager'); sys.exit(3)"]
    loop = make_loop(AlertSettings(commands=[CommandSettings(argv=argv, backoff_s=60)]))
    with capture_logs() as logs:
        loop.send(crash())
        assert loop.run_until(lambda: events(logs, "alert_delivery_failed"))
    [failed] = events(logs, "alert_delivery_failed")
    assert failed["error"] == "exited with status 3: no route to pager"


def test_repeated_non_trip_alerts_are_rate_limited_per_kind_and_agent(make_loop):
    """Only one crash-loop alert per agent passes per interval, and the next says how many were held."""
    clock, recording = FakeClock(), RecordingSink()
    settings = AlertSettings(rate_limit=RateLimitSettings(per_key_interval_s=600))
    loop = make_loop(settings, sinks=[recording], clock=clock)
    with capture_logs() as logs:
        assert [loop.send(crash("seo")) for _ in range(5)] == [True] + [False] * 4
        assert loop.send(crash("content"))
        clock.now += 600
        assert loop.send(crash("seo"))
    assert loop.run_until(loop.settled)
    assert [a.agent for a in recording.alerts] == ["seo", "content", "seo"]
    assert recording.alerts[-1].fields["suppressed_since_last"] == 4
    assert len(events(logs, "alert_suppressed")) == 4
    assert len([e for e in logs if e["log_level"] == "critical"]) == 3


def test_global_cap_limits_alerts_per_hour(make_loop):
    """Past the hourly cap alerts for new keys are held too, until the hour slides on."""
    clock, recording = FakeClock(), RecordingSink()
    settings = AlertSettings(rate_limit=RateLimitSettings(global_max_per_hour=3))
    loop = make_loop(settings, sinks=[recording], clock=clock)
    assert [loop.send(crash(f"agent{i}")) for i in range(5)] == [True] * 3 + [False] * 2
    clock.now += 3600
    assert loop.send(crash("agent9"))


def test_breaker_trips_are_never_rate_limited(make_loop):
    """Every breaker trip alert goes out even past the per-key interval and the global cap."""
    clock, recording = FakeClock(), RecordingSink()
    settings = AlertSettings(rate_limit=RateLimitSettings(global_max_per_hour=1))
    loop = make_loop(settings, sinks=[recording], clock=clock)
    loop.send(crash())
    breaker = Breaker(BreakerSettings(outputs=OutputLimit(max_outputs=1)))
    for _ in range(4):
        breaker.check_output("content", "article")
        trip = breaker.check_output("content", "article").trip
        assert loop.send(trip_alert(trip))
        breaker.reset(by="test", reason="again")
    assert loop.run_until(loop.settled)
    assert [a.kind for a in recording.alerts].count(AlertKind.BREAKER_TRIP) == 4


def test_trip_alert_id_is_the_sha256_it_always_was():
    """The id is hashed without OpenSSL now; an alert queued by an older daemon and
    re-derived from its trip by this one must keep its id, or receivers see it twice."""
    import hashlib  # here only: the daemon itself must not load OpenSSL

    trip = _tripped("community")
    key = msgspec.json.encode([trip.agent, trip.rule.value, trip.time, trip.count])
    assert trip_alert_id(trip) == hashlib.sha256(key).hexdigest()[:32]
    assert trip_alert(trip).alert_id == trip_alert_id(trip)


def _tripped(agent: str):
    breaker = Breaker(BreakerSettings(outputs=OutputLimit(max_outputs=1)))
    breaker.check_output(agent, "k")
    return breaker.check_output(agent, "k").trip


def test_every_admitted_alert_is_logged_at_critical(make_loop):
    """send() writes the alert to the log at critical with its kind, agent, fields and id."""
    loop = make_loop()
    with capture_logs() as logs:
        loop.send(trip_alert(_tripped("community")))
    [entry] = events(logs, "alert")
    assert entry["log_level"] == "critical" and entry["alert_id"]
    assert (entry["kind"], entry["agent"]) == ("breaker_trip", "community")
    assert entry["fields"]["count"] == 2


def test_webhook_url_secret_never_reaches_the_logs(refused_url: str, receiver: Receiver,
                                                   make_loop):
    """Log events from failing and succeeding webhooks show only scheme, host and port."""
    loop = make_loop(AlertSettings(webhooks=[
        WebhookSettings(url=refused_url, backoff_s=0.01),
        WebhookSettings(url=receiver.url())]))
    with capture_logs() as logs:
        loop.send(crash())
        assert loop.run_until(lambda: events(logs, "alert_delivery_failed")
                              and events(logs, "alert_delivered"))
    text = repr(logs) + repr(loop.sender.undelivered())
    for secret in ("s3cr3t-t0ken", "1234567890", "token=abc", "wait=true"):
        assert secret not in text
    assert "http://127.0.0.1:" in text and "/<redacted>" in text
    assert "s3cr3t" not in repr(WebhookSettings(url=refused_url))

def test_redact_url_keeps_scheme_host_and_port_only():
    """redact_url drops credentials, path and query."""
    assert (redact_url("https://user:pw@discord.com:8443/api/webhooks/1/tok?wait=1")
            == "https://discord.com:8443/<redacted>")
    assert redact_url("https://hooks.slack.com") == "https://hooks.slack.com"


def test_webhook_body_suits_slack_and_discord():
    """The body has the same text under `content` and `text`, fits Discord's limit and pings nobody."""
    alert = Alert(kind=AlertKind.STALE_HEARTBEAT, agent="seo", title="seo heartbeat stale",
                  text="@everyone look " + "x" * 5000)
    body = webhook_body(alert)
    assert body["content"] == body["text"]
    assert len(body["content"]) <= 2000
    assert "@everyone" not in body["content"]
    assert body["allowed_mentions"] == {"parse": []}


def test_webhook_settings_reject_unknown_keys():
    """A misspelt webhook key is rejected naming it (a non-http URL: the loader's relations,
    tests/test_config.py)."""
    with pytest.raises(msgspec.ValidationError, match=r"unknown field `retry`"):
        msgspec.convert({"webhooks": [{"url": "https://x.test/h", "retry": 2}]}, AlertSettings)


def test_the_same_webhook_listed_twice_gets_one_delivery(receiver: Receiver, make_loop):
    """Two identical webhook entries are one sink: the alert is stored, owed and posted once."""
    loop = make_loop(AlertSettings(webhooks=[WebhookSettings(url=receiver.url())] * 2))
    assert loop.send(crash())
    assert loop.run_until(loop.settled)
    assert len(receiver.requests) == 1
    delivered = loop.store.db.execute("SELECT COUNT(*) FROM alert_deliveries "
                                      "WHERE delivered IS NOT NULL").fetchone()[0]
    assert delivered == 1
