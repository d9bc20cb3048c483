"""Prometheus metrics on 127.0.0.1:<metrics.port>, through prometheus-client.

prometheus-client is imported only when a port is configured: the exporter's thread and
registry cost a few MB that a daemon without metrics should not pay on a 4 GB box.
Gauges that need a scan (heartbeat age, run memory) are refreshed on the loop's tick.
"""

from __future__ import annotations

import time

import psutil
import structlog

from ..core.feature import Feature, Services
from ..health.heartbeat import heartbeat_path, load_heartbeat
from .output_gate import OutputGate
from .steward import Steward

log = structlog.get_logger("watchkeeper.metrics")

REFRESH_INTERVAL_S = 5.0
BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
ALERT_ERROR_CHARS = 200  # a label value is stored per series and scraped every time: bounded


class Metrics(Feature):
    name = "metrics"

    def __init__(self) -> None:
        self.services: Services | None = None
        self.server = None
        self.registry = None
        self._next_refresh = 0.0

    def start(self, services: Services) -> None:
        settings = services.config.settings.metrics
        if settings.port is None:
            return
        from prometheus_client import (
            CollectorRegistry,
            Counter,
            Gauge,
            Histogram,
            start_http_server,
        )

        self.services = services
        reg = self.registry = CollectorRegistry()
        self.runs = Counter("watchkeeper_runs", "Finished runs", ["agent", "outcome"], registry=reg)
        self.duration = Histogram("watchkeeper_run_duration_seconds", "Run duration", ["agent"],
                                  buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600), registry=reg)
        self.restarts = Counter("watchkeeper_restarts", "Runs started by retry, restart or "
                                "an always agent", ["agent"], registry=reg)
        self.hb_age = Gauge("watchkeeper_heartbeat_age_seconds", "Age of the agent's heartbeat",
                            ["agent"], registry=reg)
        self.rss = Gauge("watchkeeper_agent_rss_bytes", "RSS of the agent's running processes",
                         ["agent"], registry=reg)
        self.breaker = Gauge("watchkeeper_breaker_state", "0 closed, 1 half-open, 2 open",
                             registry=reg)
        self.queue = Gauge("watchkeeper_steward_queue_depth", "Memory updates waiting for the "
                           "steward", registry=reg)
        self.alerts_owed = Gauge("watchkeeper_alerts_undelivered", "Alerts some sink has not "
                                 "acknowledged yet", registry=reg)
        self.alerts_age = Gauge("watchkeeper_alerts_oldest_undelivered_age_seconds", "Age of the "
                                "oldest undelivered alert (0 when none)", registry=reg)
        # Prometheus has no string values: the error is an info-style label on a constant 1.
        self.alerts_error = Gauge("watchkeeper_alert_last_error_info", "The latest error of an "
                                  "undelivered alert's sink, in the label (no series when none)",
                                  ["error"], registry=reg)
        self._alert_error = ""
        self.running = Gauge("watchkeeper_agents_running", "Agents with a live run", registry=reg)
        self.server, _thread = start_http_server(settings.port, addr=settings.address,
                                                 registry=reg)
        log.info("metrics_listening", address=settings.address, port=settings.port)

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()

    def run_started(self, run) -> None:
        if self.server is None:
            return  # no port configured
        if run.trigger in ("retry", "always", "restart"):
            self.restarts.labels(run.agent).inc()

    def run_finished(self, run, record) -> None:
        if self.server is None:
            return
        self.runs.labels(run.agent, record.outcome).inc()
        if record.ended is not None:
            self.duration.labels(run.agent).observe(max(0.0, record.ended - record.started))

    def tick(self, now_mono: float) -> None:
        if self.server is None or now_mono < self._next_refresh:
            return
        self._next_refresh = now_mono + REFRESH_INTERVAL_S
        pipeline = self.services.pipeline
        now = time.time()
        self.running.set(len(pipeline.runs))
        for name in pipeline.agents:
            hb = load_heartbeat(heartbeat_path(self.services.state_dir, name)).heartbeat
            if hb is not None:
                self.hb_age.labels(name).set(max(0.0, now - hb.ts))
        rss: dict[str, int] = dict.fromkeys(pipeline.agents, 0)
        for pid, run_id in pipeline.owners.items():
            run = pipeline.runs.get(run_id)
            if run is not None:
                rss[run.agent] = rss.get(run.agent, 0) + _rss(pid)
        for run in pipeline.runs.values():
            rss[run.agent] = rss.get(run.agent, 0) + _rss(run.pid)
        for name, value in rss.items():
            self.rss.labels(name).set(value)
        gate = self.services.features.find(OutputGate)
        if gate is not None:
            self.breaker.set(BREAKER_VALUES.get(gate.breaker.state.value, 0))
            owed = gate.alerter.undelivered()
            self.alerts_owed.set(owed.count)
            self.alerts_age.set(owed.oldest_age_s)
            self._show_alert_error(owed.last_error)
        steward = self.services.features.find(Steward)
        if steward is not None:
            self.queue.set(steward.queue_depth())

    def _show_alert_error(self, error: str) -> None:
        # One series at most: the old label goes when the error changes or is cleared.
        error = " ".join(error.split())[:ALERT_ERROR_CHARS]
        if error == self._alert_error:
            return
        if self._alert_error:
            self.alerts_error.remove(self._alert_error)
        if error:
            self.alerts_error.labels(error).set(1)
        self._alert_error = error


def _rss(pid: int) -> int:
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return 0
