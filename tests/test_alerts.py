"""Alert sinks against a real HTTP receiver on 127.0.0.1 and real child processes."""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator

import msgspec
import psutil
import pytest
from structlog.testing import capture_logs
from support import wait_until

from supervisor.alerts import (
    Alert,
    Alerter,
    AlertKind,
    AlertSettings,
    CommandSettings,
    RateLimitSettings,
    WebhookSettings,
    WebhookSink,
    redact_url,
    trip_alert,
    webhook_body,
)
from supervisor.breaker import Breaker, BreakerSettings, OutputLimit

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
        self.sock.close()
        for conn in self.accepted:
            conn.close()


class RecordingSink:
    """An in-memory sink; with a gate it blocks until the test opens it."""

    name = "recording"

    def __init__(self, gate: threading.Event | None = None) -> None:
        self.alerts: list[Alert] = []
        self.gate = gate
        self.entered = threading.Event()

    def deliver(self, alert: Alert, stop: threading.Event) -> None:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
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


@pytest.fixture
def make_alerter() -> Iterator[Callable[..., Alerter]]:
    """Builds Alerters and closes them after the test, so no worker outlives its test."""
    made: list[Alerter] = []

    def make(*args, **kwargs) -> Alerter:
        made.append(Alerter(*args, **kwargs))
        return made[-1]

    yield make
    for alerter in made:
        alerter.close(timeout_s=1)


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


def test_breaker_trip_sends_exactly_one_post_with_the_fields(receiver: Receiver, make_alerter):
    """A runaway agent produces exactly one webhook POST carrying agent, limit, count and summaries."""
    breaker = Breaker(BreakerSettings(outputs=OutputLimit(max_outputs=11, window_s=600)))
    alerter = make_alerter(webhook(receiver.url()))
    for i in range(40):
        decision = breaker.check_output("community", "discord_post", summary=f"Launch day! #{i}")
        if decision.trip is not None:
            alerter.send(trip_alert(decision.trip))
    assert alerter.flush(timeout_s=10)

    assert len(receiver.requests) == 1
    request = receiver.requests[0]
    assert request["path"] == SECRET_PATH + "?wait=true"
    assert request["headers"]["Content-Type"] == "application/json"
    body = request["json"]
    assert body["content"] == body["text"]
    for expected in ("community", "11 outputs in 600s", "count: 12", "window_s: 600",
                     "Launch day! #11"):
        assert expected in body["content"]
    assert body["allowed_mentions"] == {"parse": []}


def test_webhook_retries_server_errors_then_delivers(make_alerter):
    """A 503 answer is retried with backoff and the next 204 counts as delivered."""
    receiver = Receiver(statuses=[503, 204])
    try:
        alerter = make_alerter(webhook(receiver.url(), retries=3))
        with capture_logs() as logs:
            alerter.send(crash())
            assert alerter.flush(timeout_s=10)
        assert len(receiver.requests) == 2
        assert [e["attempt"] for e in events(logs, "alert_retry")] == [1]
        assert len(events(logs, "alert_delivered")) == 1
    finally:
        receiver.close()


def test_webhook_client_error_is_not_retried(make_alerter):
    """A 4xx answer (bad token, bad body) fails at once instead of retrying."""
    receiver = Receiver(statuses=[401])
    try:
        alerter = make_alerter(webhook(receiver.url(), retries=3))
        with capture_logs() as logs:
            alerter.send(crash())
            assert alerter.flush(timeout_s=10)
        assert len(receiver.requests) == 1
        [failed] = events(logs, "alert_delivery_failed")
        assert "HTTP 401" in failed["error"] and "not retried" in failed["error"]
    finally:
        receiver.close()


def test_webhook_down_is_retried_then_logged(refused_url: str, make_alerter):
    """With the receiver down every retry is logged, then one delivery failure, and send() never waits."""
    alerter = make_alerter(webhook(refused_url, retries=2, backoff_s=0.05))
    with capture_logs() as logs:
        started = time.monotonic()
        assert alerter.send(crash()) is True
        assert time.monotonic() - started < 0.05
        wait_until(lambda: events(logs, "alert_delivery_failed"), timeout_s=10)
    assert [e["delay_s"] for e in events(logs, "alert_retry")] == [0.05, 0.1]
    [failed] = events(logs, "alert_delivery_failed")
    assert "ConnectionRefusedError" in failed["error"] or "refused" in failed["error"]
    assert "gave up after 3 attempts" in failed["error"]


def test_send_returns_at_once_while_receiver_hangs(make_alerter):
    """While the receiver accepts and never answers, send() returns at once and other sinks deliver."""
    hanging, recording = HangingReceiver(), RecordingSink()
    hook = WebhookSink(WebhookSettings(url=hanging.url(), timeout_s=30, retries=0))
    alerter = make_alerter(sinks=[hook, recording])
    try:
        started = time.monotonic()
        for agent in ("a", "b", "c"):
            assert alerter.send(crash(agent))
        assert time.monotonic() - started < 0.05
        wait_until(lambda: hanging.accepted, timeout_s=5)
        wait_until(lambda: len(recording.alerts) == 3, timeout_s=5)
        assert not alerter.flush(timeout_s=0.1)

        started = time.monotonic()
        assert alerter.close(timeout_s=0.3) is False
        assert time.monotonic() - started < 1.0
    finally:
        hanging.close()
        # Let the stuck worker see the reset and finish, so its log lines stay in this test.
        wait_until(lambda: not any(t.name == f"alerts: {hook.name}"
                                   for t in threading.enumerate()), timeout_s=5)


def test_webhook_that_never_answers_times_out_and_is_logged(make_alerter):
    """A request with no answer fails after timeout_s and the failure says it timed out."""
    hanging = HangingReceiver()
    alerter = make_alerter(webhook(hanging.url(), timeout_s=0.3, retries=0))
    try:
        with capture_logs() as logs:
            alerter.send(crash())
            assert alerter.flush(timeout_s=10)
        [failed] = events(logs, "alert_delivery_failed")
        assert "timed out" in failed["error"]
    finally:
        hanging.close()


def test_command_sink_gets_the_alert_as_json_on_stdin(tmp_path, make_alerter):
    """The command runs as a real child and reads the whole alert as JSON from stdin."""
    out = tmp_path / "alert.json"
    script = ("import sys, os; data = sys.stdin.buffer.read(); "
              "open(sys.argv[1] + '.tmp', 'wb').write(data); os.replace(sys.argv[1] + '.tmp', "
              "sys.argv[1])")
    settings = AlertSettings(commands=[CommandSettings(argv=[sys.executable, "-c", script,
                                                             str(out)])])
    alerter = make_alerter(settings)
    alert = Alert(kind=AlertKind.MEMORY_KILL, agent="browser", title="browser killed",
                  text="RSS 1900 MB over 1500 MB", fields={"rss_mb": 1900}, time=1_700_000_000.0)
    with capture_logs() as logs:
        alerter.send(alert)
        assert alerter.flush(timeout_s=10)
    assert msgspec.json.decode(out.read_bytes(), type=Alert) == alert
    assert json.loads(out.read_text())["kind"] == "memory_kill"
    assert len(events(logs, "alert_delivered")) == 1


def test_command_that_hangs_is_killed_with_its_children(tmp_path, make_alerter):
    """A command past its timeout is killed together with its grandchildren and the failure logged."""
    pid_file = tmp_path / "grandchild.pid"
    script = ("import subprocess, sys, pathlib; "
              "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
              "pathlib.Path(sys.argv[1]).write_text(str(p.pid)); p.wait()")
    settings = AlertSettings(commands=[CommandSettings(
        argv=[sys.executable, "-c", script, str(pid_file)], timeout_s=1.0)])
    alerter = make_alerter(settings)
    with capture_logs() as logs:
        alerter.send(crash())
        assert alerter.flush(timeout_s=10)
    [failed] = events(logs, "alert_delivery_failed")
    assert "timed out after 1s" in failed["error"]
    grandchild = int(pid_file.read_text())

    def gone() -> bool:
        try:
            return psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_until(gone, timeout_s=5)


def test_command_failure_reports_exit_status_and_stderr(make_alerter):
    """A command that exits non-zero is logged with its status and the tail of its stderr."""
    argv = [sys.executable, "-c", "import sys; sys.stderr.write('no route to pager'); sys.exit(3)"]
    alerter = make_alerter(AlertSettings(commands=[CommandSettings(argv=argv)]))
    with capture_logs() as logs:
        alerter.send(crash())
        assert alerter.flush(timeout_s=10)
    [failed] = events(logs, "alert_delivery_failed")
    assert failed["error"] == "exited with status 3: no route to pager"


def test_repeated_non_trip_alerts_are_rate_limited_per_kind_and_agent(make_alerter):
    """Only one crash-loop alert per agent passes per interval, and the next says how many were held."""
    clock, recording = FakeClock(), RecordingSink()
    settings = AlertSettings(rate_limit=RateLimitSettings(per_key_interval_s=600))
    alerter = make_alerter(settings, sinks=[recording], clock=clock)
    with capture_logs() as logs:
        assert [alerter.send(crash("seo")) for _ in range(5)] == [True] + [False] * 4
        assert alerter.send(crash("content"))
        clock.now += 600
        assert alerter.send(crash("seo"))
    assert alerter.flush(timeout_s=5)
    assert [a.agent for a in recording.alerts] == ["seo", "content", "seo"]
    assert recording.alerts[-1].fields["suppressed_since_last"] == 4
    assert len(events(logs, "alert_suppressed")) == 4
    assert len([e for e in logs if e["log_level"] == "critical"]) == 3


def test_global_cap_limits_alerts_per_hour(make_alerter):
    """Past the hourly cap alerts for new keys are held too, until the hour slides on."""
    clock, recording = FakeClock(), RecordingSink()
    settings = AlertSettings(rate_limit=RateLimitSettings(global_max_per_hour=3))
    alerter = make_alerter(settings, sinks=[recording], clock=clock)
    assert [alerter.send(crash(f"agent{i}")) for i in range(5)] == [True] * 3 + [False] * 2
    clock.now += 3600
    assert alerter.send(crash("agent9"))


def test_breaker_trips_are_never_rate_limited(make_alerter):
    """Every breaker trip alert goes out even past the per-key interval and the global cap."""
    clock, recording = FakeClock(), RecordingSink()
    settings = AlertSettings(rate_limit=RateLimitSettings(global_max_per_hour=1))
    alerter = make_alerter(settings, sinks=[recording], clock=clock)
    alerter.send(crash())
    breaker = Breaker(BreakerSettings(outputs=OutputLimit(max_outputs=1)))
    for _ in range(4):
        breaker.check_output("content", "article")
        trip = breaker.check_output("content", "article").trip
        assert alerter.send(trip_alert(trip))
        breaker.reset(by="test", reason="again")
    assert alerter.flush(timeout_s=5)
    assert [a.kind for a in recording.alerts].count(AlertKind.BREAKER_TRIP) == 4


def test_full_queue_drops_an_older_alert_to_keep_a_trip(make_alerter):
    """When a stalled sink's queue is full a trip alert evicts a queued non-trip alert."""
    gate = threading.Event()
    recording = RecordingSink(gate)
    alerter = make_alerter(AlertSettings(queue_size=2), sinks=[recording])
    trip = trip_alert(_tripped("x"))
    with capture_logs() as logs:
        alerter.send(crash("first"))  # taken by the worker, blocked at the gate
        wait_until(recording.entered.is_set, timeout_s=5)
        alerter.send(crash("second"))
        alerter.send(crash("third"))
        alerter.send(trip)
    gate.set()
    assert alerter.flush(timeout_s=5)
    assert [a.agent for a in recording.alerts] == ["first", "third", "x"]
    [dropped] = events(logs, "alert_dropped_queue_full")
    assert dropped["agent"] == "second"


def _tripped(agent: str):
    breaker = Breaker(BreakerSettings(outputs=OutputLimit(max_outputs=1)))
    breaker.check_output(agent, "k")
    return breaker.check_output(agent, "k").trip


def test_every_admitted_alert_is_logged_at_critical(make_alerter):
    """send() writes the alert to the log at critical with its kind, agent and fields."""
    alerter = make_alerter()
    with capture_logs() as logs:
        alerter.send(trip_alert(_tripped("community")))
    [entry] = events(logs, "alert")
    assert entry["log_level"] == "critical"
    assert (entry["kind"], entry["agent"]) == ("breaker_trip", "community")
    assert entry["fields"]["count"] == 2


def test_webhook_url_secret_never_reaches_the_logs(refused_url: str, receiver: Receiver,
                                                   make_alerter):
    """Log events from failing and succeeding webhooks show only scheme, host and port."""
    alerter = make_alerter(AlertSettings(webhooks=[
        WebhookSettings(url=refused_url, retries=1, backoff_s=0.01),
        WebhookSettings(url=receiver.url())]))
    with capture_logs() as logs:
        alerter.send(crash())
        assert alerter.flush(timeout_s=10)
    assert events(logs, "alert_retry") and events(logs, "alert_delivered")
    text = repr(logs)
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


def test_webhook_settings_reject_non_http_url_without_echoing_it():
    """A webhook URL that is not http(s) is rejected naming the scheme, not the secret path."""
    with pytest.raises(msgspec.ValidationError) as err:
        msgspec.convert({"webhooks": [{"url": "file:///etc/s3cr3t"}]}, AlertSettings)
    assert "http:// or https://" in str(err.value) and "s3cr3t" not in str(err.value)
    with pytest.raises(msgspec.ValidationError, match=r"unknown field `retry`"):
        msgspec.convert({"webhooks": [{"url": "https://x.test/h", "retry": 2}]}, AlertSettings)
