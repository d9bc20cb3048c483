"""The durable alert outbox around a trip: real daemon, SIGKILL at the named instants, a real
local HTTP receiver; each case ends with the trip alert at the receiver (duplicates only with
the same id), the pipeline still halted and nothing left undelivered."""

from __future__ import annotations

import http.server
import json
import os
import selectors
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from harness import DaemonProc, py
from support import wait_until

from supervisor.alerts.alerts import CommandSettings, DeliveryFailed

ROOT = Path(__file__).resolve().parent.parent
AGENT_ENV = {"PYTHONPATH": str(ROOT)}
TRIP_TITLE = "[watchkeeper] Circuit breaker tripped by"

EMITTER = """
from supervisor.sdk import Agent
a = Agent()
for i in range(3):
    a.emit("post", f"post {i}")
"""


class Receiver:
    """A webhook on a chosen port; `on_post(answer)` may act around the answer."""

    def __init__(self, port: int = 0,
                 on_post: Callable[[Callable[[], None]], None] | None = None) -> None:
        self.posts: list[dict] = []
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                body["_idempotency_key"] = self.headers.get("Idempotency-Key")
                receiver.posts.append(body)

                def answer() -> None:
                    self.send_response(204)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    self.wfile.flush()

                (on_post or (lambda answer: answer()))(answer)

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.port = self.server.server_address[1]

    def trip_alerts(self) -> list[dict]:
        return [p for p in self.posts if p.get("content", "").startswith(TRIP_TITLE)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def free_port() -> int:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        return sock.getsockname()[1]


def hook_url(port: int) -> str:
    return f"http://127.0.0.1:{port}/api/webhooks/7/t0ken"


def tripping_daemon(root: Path, url: str, **webhook) -> DaemonProc:
    agents = {"content": {"jobs": [{"id": "main", "command": py(EMITTER),
                                    "schedule": {"every_s": 3600}}],
                          "limits": {"outputs": {"max_outputs": 2, "window_s": 600}}}}
    alerts = {"webhooks": [{"url": url, "backoff_s": 0.2, "backoff_max_s": 1.0, **webhook}]}
    return DaemonProc(root, agents, alerts=alerts)


def trip(d: DaemonProc) -> None:
    d.call("start-now", agent="content")
    d.wait_event("breaker_tripped", timeout_s=20)


def assert_one_logical_alert_delivered(d: DaemonProc, receiver: Receiver) -> None:
    alerts = wait_until(receiver.trip_alerts, 15, message="no trip alert at the receiver")
    ids = {a["alert_id"] for a in alerts}
    assert len(ids) == 1 and {a["_idempotency_key"] for a in alerts} == ids
    assert d.call("breaker-status")["state"] == "open"
    wait_until(lambda: d.call("breaker-status")["alerts"]["undelivered"] == 0, 10,
               message="the outbox still owes the alert")


def test_sigkill_just_after_the_trip_commits_delivers_after_restart(tmp_path):
    """An alert committed with the trip but not delivered when the daemon is SIGKILLed is
    delivered by the restarted daemon, which is still halted."""
    port = free_port()
    d = tripping_daemon(tmp_path, hook_url(port))
    d.start(extra_env=AGENT_ENV)
    try:
        trip(d)
        d.wait_event("alert_delivery_failed", attempt=1)
        d.kill()
    finally:
        d.stop()
    receiver = Receiver(port)
    try:
        with tripping_daemon(tmp_path, hook_url(port)).start(extra_env=AGENT_ENV) as again:
            assert_one_logical_alert_delivered(again, receiver)
            assert again.find("alert_resent_after_restart")
        assert len(receiver.trip_alerts()) == 1
    finally:
        receiver.close()


@pytest.mark.parametrize("instant", ["during_the_attempt", "after_the_answer"])
def test_sigkill_around_a_delivery_gives_duplicates_with_one_id(tmp_path, instant):
    """SIGKILL while the receiver handles the alert, before or after it answers, ends with
    the alert delivered, duplicates carrying the same id and header."""
    daemon_pid: list[int] = []

    def kill_daemon_once(answer: Callable[[], None]) -> None:
        if instant == "after_the_answer":
            answer()
        if daemon_pid:
            os.kill(daemon_pid.pop(), signal.SIGKILL)
        elif instant == "during_the_attempt":
            answer()

    receiver = Receiver(on_post=kill_daemon_once)
    try:
        d = tripping_daemon(tmp_path, hook_url(receiver.port))
        d.start(extra_env=AGENT_ENV)
        daemon_pid.append(d.proc.pid)
        try:
            trip(d)
            d.proc.wait(15)
        finally:
            d.stop()
        with tripping_daemon(tmp_path, hook_url(receiver.port)).start(
                extra_env=AGENT_ENV) as again:
            assert_one_logical_alert_delivered(again, receiver)
    finally:
        receiver.close()


def test_graceful_restart_before_delivery_delivers_after_restart(tmp_path):
    """An alert still owed at a graceful stop is delivered by the next start."""
    port = free_port()
    with tripping_daemon(tmp_path, hook_url(port)).start(extra_env=AGENT_ENV) as d:
        trip(d)
        d.wait_event("alert_delivery_failed", attempt=1)
    receiver = Receiver(port)
    try:
        with tripping_daemon(tmp_path, hook_url(port)).start(extra_env=AGENT_ENV) as again:
            assert_one_logical_alert_delivered(again, receiver)
    finally:
        receiver.close()


def test_webhook_refusing_then_answering_gets_the_alert_without_restart(tmp_path):
    """A webhook that refuses connections for a while gets the alert once it answers."""
    port = free_port()
    with tripping_daemon(tmp_path, hook_url(port)).start(extra_env=AGENT_ENV) as d:
        trip(d)
        d.wait_event("alert_delivery_failed", attempt=2, timeout_s=15)
        assert d.call("breaker-status")["alerts"]["undelivered"] == 1
        receiver = Receiver(port)
        try:
            assert_one_logical_alert_delivered(d, receiver)
            assert d.wait_event("alert_delivered")["attempts"] >= 3
        finally:
            receiver.close()


def test_receiver_that_never_answers_is_retried_and_a_replacement_gets_it(tmp_path):
    """A webhook that never answers times out and is retried; after the operator points the
    config at a working webhook and restarts, that one gets the owed alert."""
    hanging = socket.create_server(("127.0.0.1", 0))
    hanging_url = hook_url(hanging.getsockname()[1])
    try:
        with tripping_daemon(tmp_path, hanging_url, timeout_s=0.3).start(
                extra_env=AGENT_ENV) as d:
            trip(d)
            failed = d.wait_event("alert_delivery_failed", attempt=2, timeout_s=15)
            assert "timed out" in failed["error"]
    finally:
        hanging.close()
    receiver = Receiver()
    try:
        with tripping_daemon(tmp_path, hook_url(receiver.port)).start(
                extra_env=AGENT_ENV) as again:
            assert_one_logical_alert_delivered(again, receiver)
            assert again.find("alert_retargeted")
    finally:
        receiver.close()


@pytest.mark.slow
def test_webhook_refusing_for_60_s_then_answering_gets_one_logical_alert(tmp_path):
    """A webhook refusing connections for 60 s after the trip gets exactly one logical alert
    once it answers, the pipeline stays halted and nothing is left owed."""
    port = free_port()
    with tripping_daemon(tmp_path, hook_url(port)).start(extra_env=AGENT_ENV) as d:
        trip(d)
        tripped_at = time.monotonic()

        def refused_for_60_s_and_daemon_answers() -> bool:
            assert d.call("status")["daemon"]["halted"] is True  # the loop answers meanwhile
            return time.monotonic() - tripped_at >= 60.0

        wait_until(refused_for_60_s_and_daemon_answers, 120, interval_s=1.0)
        failures = d.find("alert_delivery_failed", kind="breaker_trip")
        assert len(failures) >= 10 and all("refused" in f["error"].lower() for f in failures)
        assert max(f["retry_in_s"] for f in failures) <= 1.0  # the configured backoff cap
        assert d.call("breaker-status")["alerts"]["undelivered"] == 1
        receiver = Receiver(port)
        try:
            assert_one_logical_alert_delivered(d, receiver)
            assert d.call("status")["daemon"]["halted"] is True
        finally:
            receiver.close()


def test_receiver_that_hangs_then_answers_gets_the_alert_without_restart(tmp_path):
    """A webhook that accepts and never answers makes each attempt time out and be retried,
    the daemon keeps answering, and the alert is delivered once the webhook answers."""
    answering, release = threading.Event(), threading.Event()

    def hang_until_answering(answer: Callable[[], None]) -> None:
        if answering.is_set():
            answer()
        else:
            release.wait(30)  # never answers this attempt: the sender's timeout ends it

    receiver = Receiver(on_post=hang_until_answering)
    try:
        with tripping_daemon(tmp_path, hook_url(receiver.port), timeout_s=0.3).start(
                extra_env=AGENT_ENV) as d:
            trip(d)
            failed = d.wait_event("alert_delivery_failed", attempt=2, timeout_s=15)
            assert "timed out" in failed["error"]
            assert d.call("status")["daemon"]["halted"] is True
            assert d.call("breaker-status")["alerts"]["undelivered"] == 1
            answering.set()
            assert_one_logical_alert_delivered(d, receiver)
            assert d.wait_event("alert_delivered", kind="breaker_trip")["attempts"] >= 3
    finally:
        release.set()
        receiver.close()

SINK = """
import pathlib, sys
record = pathlib.Path(sys.argv[1])
previous = record.read_text().splitlines() if record.exists() else []
record.write_text("\\n".join([*previous, sys.stdin.read()]) + "\\n")
sys.exit(3 if not previous else 0)
"""


def test_command_sink_exit_3_is_failed_and_retried(tmp_path):
    """A command sink whose command exits 3 is recorded as failed and retried until it exits 0,
    with the same alert id on stdin each time."""
    record = tmp_path / "sink.jsonl"
    agents = {"content": {"jobs": [{"id": "main", "command": py(EMITTER),
                                    "schedule": {"every_s": 3600}}],
                          "limits": {"outputs": {"max_outputs": 2, "window_s": 600}}}}
    alerts = {"commands": [{"argv": [sys.executable, "-c", SINK, str(record)],
                            "backoff_s": 0.2}]}
    with DaemonProc(tmp_path, agents, alerts=alerts).start(extra_env=AGENT_ENV) as d:
        trip(d)
        failed = d.wait_event("alert_delivery_failed", kind="breaker_trip", timeout_s=15)
        assert "exited with status 3" in failed["error"]
        delivered = d.wait_event("alert_delivered", kind="breaker_trip", timeout_s=15)
        assert delivered["attempts"] == 2
    stdin_seen = [json.loads(line) for line in record.read_text().splitlines()]
    assert len(stdin_seen) == 2 and stdin_seen[0]["alert_id"] == stdin_seen[1]["alert_id"]


def test_escalation_sink_gets_an_alert_the_first_sink_failed_on(tmp_path):
    """Once the first webhook has failed on an alert for escalation.after_s, the escalation
    sink gets it (with the same id), while the first one keeps being retried."""
    record = tmp_path / "escalated.jsonl"
    escalate = ("import pathlib, sys; pathlib.Path(sys.argv[1]).open('a')"
                ".write(sys.stdin.read() + '\\n')")
    d = tripping_daemon(tmp_path, hook_url(free_port()))
    d.settings["alerts"]["escalation"] = {
        "after_s": 0.5, "commands": [{"argv": [sys.executable, "-c", escalate, str(record)]}]}
    d.write_config()
    with d.start(extra_env=AGENT_ENV):
        trip(d)
        d.wait_event("alert_escalated", timeout_s=15)
        delivered = d.wait_event("alert_delivered", kind="breaker_trip", timeout_s=15)
        assert delivered["sink"].startswith("command ")
        assert d.call("breaker-status")["alerts"]["undelivered"] == 1  # the webhook still owes
    [escalated] = [json.loads(line) for line in record.read_text().splitlines()]
    assert escalated["kind"] == "breaker_trip" and escalated["alert_id"]


def test_prune_forgets_settled_old_alerts_and_keeps_owed_ones(tmp_path):
    """Pruning drops alerts past the age that every sink settled, never one still owed."""
    from supervisor.alerts.alerts import Alert, AlertKind
    from supervisor.alerts.outbox import Outbox
    from supervisor.storage.store import Store

    store = Store(tmp_path / "state.db")
    try:
        outbox = Outbox(store)
        old = 1_000_000.0
        settled = outbox.add(Alert(kind=AlertKind.CRASH_LOOP, title="a", text="", time=old),
                             ["webhook:x"])
        owed = outbox.add(Alert(kind=AlertKind.BREAKER_TRIP, title="b", text="", time=old),
                          ["webhook:x"])
        outbox.delivered(settled.alert_id, "webhook:x", now=old + 1)
        outbox.prune(older_than_s=3600, now=old + 7200)
        assert [d.alert.alert_id for d in outbox.pending()] == [owed.alert_id]
        assert store.db.execute("SELECT COUNT(*) FROM alert_outbox").fetchone()[0] == 1
    finally:
        store.close()


def test_status_line_and_metrics_show_the_undelivered_alert(tmp_path):
    """While the webhook refuses, the sd_notify STATUS line and the metrics show the owed
    alert (the metrics with its last error as a label); once delivered, both show none."""
    port = free_port()
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(0.1)
    statuses: list[str] = []

    def status_lines() -> list[str]:
        while True:
            try:
                message = notify.recv(65536).decode()
            except TimeoutError:
                return statuses
            statuses.extend(line for line in message.split("\n") if line.startswith("STATUS="))

    metrics_port = free_port()

    def metric_lines(prefix: str) -> list[str]:
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5)
        return [line for line in text.read().decode().splitlines() if line.startswith(prefix)]

    def metric(name: str) -> float | None:
        return next((float(line.split()[1]) for line in metric_lines(name + " ")), None)

    d = tripping_daemon(tmp_path, hook_url(port))
    d.settings["metrics"] = {"port": metrics_port}
    d.write_config()
    try:
        d.start(extra_env=AGENT_ENV, notify_socket=tmp_path / "notify.sock")
        trip(d)
        wait_until(lambda: any("1 alert(s) undelivered" in s for s in status_lines()), 15,
                   message=f"no STATUS with the owed alert: {statuses[-3:]}")
        wait_until(lambda: metric("watchkeeper_alerts_undelivered") == 1.0, 15)
        assert metric("watchkeeper_alerts_oldest_undelivered_age_seconds") > 0
        [error_line] = wait_until(lambda: metric_lines("watchkeeper_alert_last_error_info{"),
                                  15, message="no last error in the metrics")
        assert "refused" in error_line.lower() and error_line.endswith(" 1.0")
        receiver = Receiver(port)
        try:
            d.wait_event("alert_delivered", timeout_s=15)
            wait_until(lambda: metric("watchkeeper_alerts_undelivered") == 0.0, 15)
            assert metric_lines("watchkeeper_alert_last_error_info{") == []
            wait_until(lambda: "undelivered" not in status_lines()[-1], 15)
        finally:
            receiver.close()
    finally:
        d.stop()
        notify.close()


class RefusingSink:
    """A first sink that fails every attempt, as a webhook refusing connections does."""

    name = key = "refusing"
    settings = CommandSettings(argv=["refusing"], backoff_s=3600.0)  # retries never come due

    def attempt(self, alert) -> None:
        raise DeliveryFailed("connection refused")


def test_escalation_counts_from_the_first_failed_attempt_even_across_a_restart(tmp_path):
    """Escalation comes after.after_s past the first sink's first failed attempt (kept in the
    outbox across a restart), not after.after_s past the alert's creation."""
    from supervisor.alerts.alerts import Alert, AlertKind, AlertSettings, EscalationSettings
    from supervisor.alerts.sender import AlertSender
    from supervisor.core.timers import Timers
    from supervisor.storage.store import Store

    settings = AlertSettings(escalation=EscalationSettings(
        after_s=60.0, commands=[CommandSettings(argv=["true"])]))
    wall = [1_000.0]

    def escalated_to(store: Store, alert_id: str) -> list[str]:
        return [r[0] for r in store.db.execute(
            "SELECT sink FROM alert_deliveries WHERE alert_id=? AND sink LIKE 'command:%'",
            (alert_id,))]

    def sender_on(store: Store) -> AlertSender:
        return AlertSender(settings, store, Timers(), sinks=[RefusingSink()],
                           wall_clock=lambda: wall[0])

    store = Store(tmp_path / "state.db")
    sender = sender_on(store)
    try:
        alert = Alert(kind=AlertKind.BREAKER_TRIP, title="t", text="", time=wall[0])
        wall[0] += 100.0  # the first attempt fails long after the alert was created
        assert sender.send(alert)
        assert sender.flush(10)
        [owed] = sender.outbox.pending()
        assert escalated_to(store, owed.alert.alert_id) == []
    finally:
        sender.close(timeout_s=1)
    wall[0] += 59.0  # a restart 59 s into the failure: the next failure is not yet 60 s in
    again = sender_on(store)
    again.attach(selectors.DefaultSelector())
    try:
        assert again.flush(10)
        assert escalated_to(store, owed.alert.alert_id) == []
        wall[0] += 1.0
        again._dispatch(owed.alert, "refusing")  # the retry its timer would make
        assert again.flush(10)
        assert len(escalated_to(store, owed.alert.alert_id)) == 1
    finally:
        again.close(timeout_s=1)
        store.close()


SLOW_SINK = """
import pathlib, sys, time
pathlib.Path(sys.argv[1]).write_text(sys.stdin.read() + "\\n")
time.sleep(1.5)  # the alert is handed on; the command has not exited yet
"""


def test_graceful_stop_lets_an_alert_command_in_flight_finish(tmp_path):
    """A daemon stopped gracefully while its alert command has handed the alert on but not
    yet exited waits for the command: the delivery is recorded, and the next start owes and
    sends nothing (before, the stop signalled the command with the runs' leftovers and the
    alert went out twice)."""
    record = tmp_path / "sink.jsonl"
    agents = {"content": {"jobs": [{"id": "main", "command": py(EMITTER),
                                    "schedule": {"every_s": 3600}}],
                          "limits": {"outputs": {"max_outputs": 2, "window_s": 600}}}}
    alerts = {"commands": [{"argv": [sys.executable, "-c", SLOW_SINK, str(record)],
                            "backoff_s": 0.2}]}
    first = DaemonProc(tmp_path, agents, alerts=alerts).start(extra_env=AGENT_ENV)
    try:
        trip(first)
        wait_until(lambda: record.exists() and record.read_text().strip(), 15,
                   message="the alert command never got the alert")
        assert first.stop() == 0
    finally:
        first.kill()
    first.wait_event("daemon_stopped")  # the log is read to its end
    assert first.find("alert_delivered", kind="breaker_trip")
    assert not first.find("alert_delivery_failed")
    record.unlink()
    with DaemonProc(tmp_path, agents, alerts=alerts).start(extra_env=AGENT_ENV) as again:
        assert again.call("breaker-status")["alerts"]["undelivered"] == 0
        assert not again.find("alert_resent_after_restart")
    assert not record.exists()
