"""The Prometheus exporter of a real daemon, scraped over HTTP on 127.0.0.1."""

from __future__ import annotations

import socket
import urllib.request

import psutil
from harness import DaemonProc, py
from prometheus_client.parser import text_string_to_metric_families
from support import wait_until

HEARTBEAT_THEN_EXIT = "from supervisor.sdk import Agent; Agent().heartbeat()"
TWO_OUTPUTS = """\
from supervisor.sdk import Agent, OutputDenied
agent = Agent()
agent.emit("post", "first")
try:
    agent.emit("post", "second")
except OutputDenied:
    pass
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """Every sample on /metrics as {(name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def manual(code: str) -> dict:
    return {"jobs": [{"id": "main", "command": py(code), "schedule": {"every_s": 3600}}]}


def test_runs_heartbeat_and_breaker_are_exported(tmp_path):
    """After one successful run that heartbeats, /metrics shows the run, the heartbeat's age
    and a closed breaker."""
    port = free_port()
    with DaemonProc(tmp_path, {"a": manual(HEARTBEAT_THEN_EXIT)},
                    metrics={"port": port}).start() as d:
        d.wait_event("metrics_listening", port=port)
        d.call("start-now", agent="a")
        d.wait_event("run_finished", agent="a", outcome="succeeded")
        key = ("watchkeeper_heartbeat_age_seconds", (("agent", "a"),))
        samples = wait_until(lambda: (m := scrape(port)) and key in m and m, timeout_s=15,
                             message="heartbeat age on /metrics (refreshed every 5 s)")
        assert samples[("watchkeeper_runs_total",
                        (("agent", "a"), ("outcome", "succeeded")))] == 1.0
        assert 0.0 <= samples[key] < 15.0
        assert samples[("watchkeeper_breaker_state", ())] == 0.0
        assert samples[("watchkeeper_run_duration_seconds_count", (("agent", "a"),))] == 1.0


def test_tripped_breaker_is_exported_as_open(tmp_path):
    """An agent's second output over a limit of one trips the breaker; /metrics then says 2."""
    port = free_port()
    with DaemonProc(tmp_path, {"a": manual(TWO_OUTPUTS)}, metrics={"port": port},
                    breaker={"outputs": {"max_outputs": 1, "window_s": 600}}).start() as d:
        d.wait_event("metrics_listening", port=port)
        d.call("start-now", agent="a")
        d.wait_event("run_finished", agent="a")
        wait_until(lambda: scrape(port).get(("watchkeeper_breaker_state", ())) == 2.0,
                   timeout_s=15, message="breaker state 2 (open) on /metrics")


def test_no_exporter_without_port(tmp_path):
    """Without metrics.port the daemon listens on no TCP port at all."""
    with DaemonProc(tmp_path, {"a": manual("pass")}).start() as d:
        d.call("start-now", agent="a")
        d.wait_event("run_finished", agent="a", outcome="succeeded")
        assert not d.find("metrics_listening")
        assert psutil.Process(d.proc.pid).net_connections(kind="inet") == []
