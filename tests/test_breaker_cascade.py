"""The circuit breaker end to end: real agents, a real daemon, local HTTP stand-ins for Discord
and for the alert webhook.

The 3am story this replays: a scheduler agent loops on bad retry logic and keeps starting the
content agent, whose articles the community agent posts to Discord. With the breaker at N
outputs, Discord sees at most N posts, one alert goes out, every agent process is stopped and
the pipeline stays halted across a restart until an operator resets it.
"""

from __future__ import annotations

import http.server
import json
import socket
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from harness import DaemonProc, py, wk
from support import wait_until

from supervisor.errors import ControlError

ROOT = Path(__file__).resolve().parent.parent
# Agents run in tmp_path; they must import this tree's supervisor package, not an installed one.
AGENT_ENV = {"PYTHONPATH": str(ROOT)}
N = 3
HALTED = "pipeline halted by the circuit breaker"
TRIP_TITLE = "[watchkeeper] Circuit breaker tripped by"


class Receiver:
    """Records every JSON POST and answers 204: stands in for Discord and for alert webhooks."""

    def __init__(self) -> None:
        self.posts: list[dict] = []
        posts = self.posts

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
                body = self.rfile.read(int(self.headers["Content-Length"]))
                posts.append(json.loads(body))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/webhooks/42/t0ken"

    def trip_alerts(self) -> list[dict]:
        return [p for p in self.posts if p.get("content", "").startswith(TRIP_TITLE)]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class HangingReceiver:
    """Accepts connections and never answers, like a webhook stuck behind a dead proxy."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.accepted: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                self.accepted.append(self.sock.accept()[0])
            except OSError:
                return

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/hook"

    def close(self) -> None:
        self.sock.close()
        for conn in self.accepted:
            conn.close()


@pytest.fixture
def hook() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def discord() -> Iterator[Receiver]:
    receiver = Receiver()
    yield receiver
    receiver.close()


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def live_descendants(d: DaemonProc) -> list[int]:
    return [p.pid for p in psutil.Process(d.proc.pid).children(recursive=True) if alive(p.pid)]


def webhook(url: str, **kw) -> dict:
    return {"webhooks": [{"url": url, "backoff_s": 0.2, **kw}]}


def job(code: str, schedule: dict, **extra) -> dict:
    return {"id": "main", "command": py(code), "schedule": schedule, **extra}


# -- the 3am cascade -----------------------------------------------------------------------------

SCHEDULER = """
import subprocess, sys
# The bad retry logic: start the content run again, and again, and again.
while True:
    subprocess.run([sys.executable, "-m", "supervisor.cli", "start-now", "content"],
                   stdout=subprocess.DEVNULL)
"""

CONTENT = """
from supervisor.sdk import Agent
a = Agent()
a.emit("article", f"Ten tips for home solar ({a.run_id})", content=f"variation {a.run_id}")
"""

COMMUNITY = """
import json, os, urllib.request
from supervisor.sdk import Agent
a = Agent()
# Its own bug: every run posts again everything content has published lately.
articles = [o for o in a.call("outputs", agent="content", limit=50) if o["allowed"]]
for article in reversed(articles):
    text = "New on the blog: " + article["summary"]
    a.emit("discord_post", text)
    request = urllib.request.Request(os.environ["DISCORD_URL"], method="POST",
                                     data=json.dumps({"content": text}).encode(),
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=5).read()
"""


def cascade_agents(discord_url: str) -> dict:
    return {
        # Starting another agent from a run needs the grant (docs/agents.md); the scheduler
        # has it, as a real one would, so its loop reaches the pipeline.
        "scheduler": {"jobs": [job(SCHEDULER, {"every_s": 1})], "permissions": ["start-now"]},
        "content": {"jobs": [job(CONTENT, {"every_s": 3600})]},
        "community": {"jobs": [job(COMMUNITY, {"after": ["content"]}, overlap="queue",
                                   env={"DISCORD_URL": discord_url})]},
    }


def test_scheduler_loop_cascade_halts_with_one_alert_and_stays_halted(tmp_path, hook, discord):
    """A looping scheduler's cascade trips the breaker: at most N posts, one alert, no agent
    process left, still halted after a restart until `breaker reset`."""
    agents = cascade_agents(discord.url)
    settings = {"breaker": {"outputs": {"max_outputs": N, "window_s": 600}},
                "alerts": webhook(hook.url)}
    with DaemonProc(tmp_path, agents, **settings).start(extra_env=AGENT_ENV) as d:
        trip = d.wait_event("breaker_tripped", level="critical", timeout_s=60)
        assert trip["agent"] in ("content", "community") and trip["rule"] == "outputs"
        wait_until(lambda: not live_descendants(d), 10,
                   message=f"agent processes left: {live_descendants(d)}")
        wait_until(hook.trip_alerts, 10, message="no trip alert reached the webhook")
        d.wait_event("run_finished", agent="scheduler", stop_reason="breaker")
        assert d.call("status")["daemon"]["halted"] is True
    posted = len(discord.posts)
    assert 1 <= posted <= N
    assert len(hook.posts) == 1 and len(hook.trip_alerts()) == 1
    assert len(d.find("breaker_tripped")) == 1  # one trip, one log line
    assert f"agent: {trip['agent']}" in hook.posts[0]["content"]

    with DaemonProc(tmp_path, agents, **settings).start(extra_env=AGENT_ENV) as d2:
        d2.wait_event("pipeline_halted_at_start")
        d2.wait_event("firing_skipped", agent="scheduler", reason=HALTED)
        status = json.loads(wk("--config", str(d2.config_path), "--json", "breaker",
                               "status").stdout)
        assert status["state"] == "open" and status["last_trip"]["agent"] == trip["agent"]
        with pytest.raises(ControlError, match=f"refused: {HALTED}"):
            d2.call("start-now", agent="content")
        refused = wk("--config", str(d2.config_path), "start-now", "content")
        assert refused.returncode != 0 and HALTED in refused.stderr
        with pytest.raises(ControlError, match="resume refused"):
            d2.call("resume")
        assert not d2.find("run_started") and not live_descendants(d2)

        # The operator pauses the two buggy agents, then resets: the pipeline runs again.
        for buggy in ("scheduler", "community"):
            assert wk("--config", str(d2.config_path), "pause", buggy).returncode == 0
        reset = wk("--config", str(d2.config_path), "breaker", "reset", "--reason", "x")
        assert reset.returncode == 0 and reset.stdout.strip() == "breaker reset", reset.stderr
        d2.wait_event("breaker_reset")
        assert d2.call("start-now", agent="content")["result"] == "started"
        d2.wait_event("run_finished", agent="content", outcome="succeeded", timeout_s=20)
        d2.wait_event("firing_skipped", agent="community", reason="paused")
        assert d2.call("breaker-status")["state"] == "closed"
    assert len(hook.trip_alerts()) == 1  # the reset is announced; the trip never twice
    assert len(d2.find("breaker_reset")) == 1  # one reset, one log line
    assert len(discord.posts) == posted


# -- the other rules, end to end -------------------------------------------------------------------

DUPLICATER = """
from supervisor.sdk import Agent, OutputDenied
a = Agent()
# One article, reworded only in case and spacing: the hash sees through that.
for body in ("Ten tips for home solar", "ten  tips for HOME solar", "Ten tips for home solar\\n"):
    try:
        a.emit("article", "home solar tips", content=body)
        print("allowed", flush=True)
    except OutputDenied as exc:
        print("denied", exc, flush=True)
        break
"""


def test_duplicate_content_trips_the_breaker(tmp_path, hook):
    """The same content emitted past max_repeats is denied, trips the breaker and alerts once."""
    agents = {"content": {"jobs": [job(DUPLICATER, {"every_s": 3600})],
                          "limits": {"duplicates": {"max_repeats": 2, "window_s": 600}}}}
    with DaemonProc(tmp_path, agents, alerts=webhook(hook.url)).start(extra_env=AGENT_ENV) as d:
        d.call("start-now", agent="content")
        trip = d.wait_event("breaker_tripped", level="critical", timeout_s=20)
        assert trip["rule"] == "duplicates" and trip["count"] == 3
        d.wait_event("run_finished", agent="content")
        lines = [e["line"] for e in d.find("agent_output", agent="content", stream="stdout")]
        assert lines[:2] == ["allowed", "allowed"]
        outputs = d.call("outputs", agent="content")
        assert [o["allowed"] for o in outputs] == [0, 1, 1]
        assert len({o["hash"] for o in outputs}) == 1
        wait_until(hook.trip_alerts, 10, message="no trip alert reached the webhook")
    assert len(hook.posts) == 1 and "rule: duplicates" in hook.posts[0]["content"]


PROBER = """
import time
from supervisor.sdk import Agent
a = Agent()
i = 0
while True:
    i += 1
    a.emit("post", f"post {i} of {a.run_id}")
    time.sleep(0.1)
"""


def test_half_open_probe_excess_re_trips(tmp_path, hook):
    """After auto_reset_after_s the breaker half-opens, restarts the agents, and an agent that
    keeps going past its probe budget trips it again, with one alert per trip."""
    breaker = {"outputs": {"max_outputs": 2, "window_s": 600}, "auto_reset_after_s": 1,
               "probe_outputs": 1, "probe_window_s": 600}
    agents = {"looper": {"jobs": [job(PROBER, {"always": True})]}}
    d = DaemonProc(tmp_path, agents, breaker=breaker, alerts=webhook(hook.url))
    with d.start(extra_env=AGENT_ENV):
        first = d.wait_event("breaker_tripped", level="critical", timeout_s=20)
        assert first["rule"] == "outputs"
        d.wait_event("breaker_state_changed", to_state="half_open")
        d.wait_event("run_started", agent="looper", count=2)
        second = d.wait_event("breaker_tripped", level="critical", count=2, timeout_s=20)
        assert second["rule"] == "probe" and second["count"] == 2
        assert d.call("breaker-status")["trips_total"] >= 2
    # The alerter is flushed at stop: every trip made exactly one POST, never more.
    trips = d.find("breaker_tripped", level="critical")
    assert len(hook.trip_alerts()) == len(trips) >= 2


EMITTER = """
from supervisor.sdk import Agent
a = Agent()
for i in range(3):
    a.emit("post", f"post {i}")
"""


@pytest.mark.parametrize("failure", ["refused", "hanging"])
def test_webhook_down_leaves_the_loop_responsive_and_the_alert_retried(tmp_path, failure):
    """With the webhook refusing or never answering, the daemon still answers, logs the alert
    at critical, keeps retrying its delivery and shows it as undelivered."""
    if failure == "refused":
        with socket.create_server(("127.0.0.1", 0)) as sock:
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/hook"
        hanging = None
    else:
        hanging = HangingReceiver()
        url = hanging.url
    alerts = webhook(url, timeout_s=2, retries=1)
    agents = {"content": {"jobs": [job(EMITTER, {"every_s": 3600})],
                          "limits": {"outputs": {"max_outputs": 2, "window_s": 600}}}}
    try:
        with DaemonProc(tmp_path, agents, alerts=alerts).start(extra_env=AGENT_ENV) as d:
            d.call("start-now", agent="content")
            d.wait_event("breaker_tripped", level="critical", timeout_s=20)
            if hanging is not None:
                wait_until(lambda: hanging.accepted, 5, message="the sink never connected")
            assert d.call("ping")["pid"] == d.proc.pid
            assert d.call("breaker-status")["state"] == "open"
            alert = d.wait_event("alert", kind="breaker_trip")
            assert alert["level"] == "critical" and alert["agent"] == "content"
            first = d.wait_event("alert_delivery_failed", kind="breaker_trip", attempt=1,
                                 timeout_s=10)
            assert ("timed out" in first["error"]) if hanging else ("refused" in first["error"])
            d.wait_event("alert_delivery_failed", kind="breaker_trip", attempt=2, timeout_s=15)
            if hanging is not None:
                assert len(hanging.accepted) >= 2
            owed = d.call("breaker-status")["alerts"]
            assert owed["undelivered"] == 1 and owed["last_error"]
            assert d.call("ping")["pid"] == d.proc.pid
    finally:
        if hanging is not None:
            hanging.close()


SPENDER = """
from supervisor.sdk import Agent, OutputDenied
a = Agent()
for call in range(1, 10):
    try:
        a.report_usage(tokens=400, cost=0.01, model="small")
    except OutputDenied as exc:
        print("denied at call", call, flush=True)
        break
"""

BASH_SPENDER = """
for call in 1 2 3 4 5 6; do
    "$WK_PYTHON" -m supervisor.cli usage --tokens 10 --cost 0.25
    echo "call $call exit $?"
done
"""


def test_agent_token_budget_trips_on_report_usage(tmp_path, hook):
    """An agent whose reported tokens pass its budget is denied and trips the breaker."""
    agents = {"writer": {"jobs": [job(SPENDER, {"every_s": 3600})],
                         "limits": {"spend": {"max_tokens": 1000, "window_s": 3600}}}}
    with DaemonProc(tmp_path, agents, alerts=webhook(hook.url)).start(extra_env=AGENT_ENV) as d:
        d.call("start-now", agent="writer")
        trip = d.wait_event("breaker_tripped", level="critical", timeout_s=20)
        assert trip["rule"] == "agent_spend" and trip["agent"] == "writer"
        assert d.wait_event("run_finished", agent="writer")["stop_reason"] == "breaker"
        last = d.call("breaker-status")["last_trip"]
        assert last["count"] == 1200 and last["limit"] == "1000 tokens in 3600s"
        wait_until(hook.trip_alerts, 10, message="no trip alert reached the webhook")
    assert "rule: agent_spend" in hook.trip_alerts()[0]["content"]


def test_pipeline_cost_budget_trips_through_the_cli(tmp_path, hook):
    """A bash agent reporting cost with `watchkeeper usage` gets exit 5 once the pipeline's
    budget is spent, and the breaker is open."""
    code = ["bash", "-c", BASH_SPENDER]
    agents = {"poster": {"jobs": [{"id": "main", "command": code, "schedule": {"every_s": 3600},
                                   "env": {"WK_PYTHON": sys.executable}}]}}
    breaker = {"pipeline_spend": {"max_cost": 0.6, "window_s": 3600}}
    d = DaemonProc(tmp_path, agents, breaker=breaker, alerts=webhook(hook.url))
    with d.start(extra_env=AGENT_ENV):
        d.call("start-now", agent="poster")
        trip = d.wait_event("breaker_tripped", level="critical", timeout_s=20)
        assert trip["rule"] == "pipeline_spend"
        d.wait_event("run_finished", agent="poster", timeout_s=20)
        lines = [e["line"] for e in d.find("agent_output", agent="poster", stream="stdout")]
        assert lines[:2] == ["call 1 exit 0", "call 2 exit 0"]
        assert lines[2:3] in ([], ["call 3 exit 5"])  # the halt's SIGTERM may come first
        assert d.call("breaker-status")["state"] == "open"
