"""Alerts: from the emit that trips the breaker to the alert at a local webhook receiver, and
from a receiver's return after an outage to the alert it was owed.

    python bench/alert_latency.py [--quick]

A real daemon runs an `emitter` agent (`always`) with an output limit of N. The emitter makes
its N allowed outputs, reads `time.monotonic()` and sends the (N+1)th emit, which trips the
breaker; the daemon commits the trip and its alert in one transaction and its sender posts
the alert to a local HTTP receiver, which reads `time.monotonic()` on arrival (the same clock
in every process, so the readings subtract). `breaker reset` brings the emitter back for the
next trial. Printed beside: a plain HTTP POST to the same receiver from this process (the
round trip the target allows on top).

Outage: the receiver's port refuses connections while the breaker trips, for 60 s (10 s with
--quick); then the receiver comes back on the same port, and the delay from its return to
the alert's arrival is measured against the webhook's backoff cap.

Targets: p99 trip -> receiver <= 100 ms plus the HTTP round trip; after an outage, delay
<= backoff_max_s + 1 s. Prints figures only; they depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import http.server
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness.machine import machine_line  # noqa: E402  (standard library only)
from live_daemon import LiveDaemon, wait_for  # noqa: E402

N = 3
TRIP_TITLE = "[watchkeeper] Circuit breaker tripped by"

EMITTER = """
import os, time
from pathlib import Path
from supervisor.sdk import Agent
a = Agent()
ctl = Path(os.environ["CTL"])
for i in range(int(os.environ["N"])):
    a.emit("post", f"post {i} of {a.run_id}")
(ctl / "ready").touch()
while not (ctl / "go").exists():
    time.sleep(0.001)
t0 = time.monotonic()
(ctl / "t0.tmp").write_text(repr(t0))
os.rename(ctl / "t0.tmp", ctl / "t0")
a.emit("post", "one too many")
time.sleep(3600)
"""


class Receiver:
    """A webhook that notes `time.monotonic()` when each trip alert arrives."""

    def __init__(self, port: int = 0) -> None:
        self.arrivals: list[tuple[float, str]] = []
        arrivals = self.arrivals

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the name http.server dispatches to
                now = time.monotonic()
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if body.get("content", "").startswith(TRIP_TITLE):
                    arrivals.append((now, body.get("alert_id", "")))
                self.send_response(204)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def emitter(ctl: Path) -> dict:
    return {"jobs": [{"id": "main", "command": ["{python}", "-c", EMITTER],
                      "schedule": {"always": True}, "env": {"CTL": str(ctl), "N": str(N)}}],
            "limits": {"outputs": {"max_outputs": N, "window_s": 3600}}}


def trip_and_wait(daemon: LiveDaemon, ctl: Path) -> float:
    """Trip once; returns t0 (the emitter's monotonic reading before the tripping emit)."""
    wait_for(lambda: (ctl / "ready").exists(), 30, "the emitter's N outputs")
    (ctl / "go").touch()
    wait_for(lambda: (ctl / "t0").exists(), 30, "the tripping emit")
    t0 = float((ctl / "t0").read_text())
    for name in ("ready", "go", "t0"):
        (ctl / name).unlink()
    return t0


def trip_latencies(workdir: Path, trials: int) -> tuple[list[float], list[float]]:
    ctl = workdir / "ctl"
    ctl.mkdir()
    receiver = Receiver()
    alerts = {"webhooks": [{"url": receiver.url(), "backoff_s": 0.2, "backoff_max_s": 1.0}]}
    samples, posts = [], []
    try:
        with LiveDaemon(workdir / "trip", {"emitter": emitter(ctl)}, alerts=alerts) as daemon:
            for _ in range(trials):
                seen = len(receiver.arrivals)
                t0 = trip_and_wait(daemon, ctl)
                wait_for(lambda s=seen: len(receiver.arrivals) > s, 30, "the trip alert")
                samples.append((receiver.arrivals[seen][0] - t0) * 1000)
                daemon.call("breaker-reset", reason="benchmark: next trial")
                for _ in range(3):
                    started = time.monotonic()
                    request = urllib.request.Request(receiver.url(), data=b"{}", method="POST",
                                                     headers={"Content-Type": "application/json"})
                    urllib.request.urlopen(request, timeout=5).read()
                    posts.append((time.monotonic() - started) * 1000)
    finally:
        receiver.close()
    return samples, posts


def outage_delay(workdir: Path, outage_s: float, backoff_max_s: float) -> float:
    ctl = workdir / "ctl-outage"
    ctl.mkdir()
    with socket.create_server(("127.0.0.1", 0)) as sock:
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}/hook"
    alerts = {"webhooks": [{"url": url, "backoff_s": 1.0, "backoff_max_s": backoff_max_s}]}
    with LiveDaemon(workdir / "outage", {"emitter": emitter(ctl)}, alerts=alerts) as daemon:
        trip_and_wait(daemon, ctl)
        down_until = time.monotonic() + outage_s
        while time.monotonic() < down_until:
            time.sleep(0.1)  # the outage: nothing listens on the port
        back = time.monotonic()
        receiver = Receiver(port)
        try:
            wait_for(lambda: receiver.arrivals, backoff_max_s + 30, "the owed alert")
            return receiver.arrivals[0][0] - back
        finally:
            receiver.close()


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer trials, a 10 s outage")
    args = parser.parse_args()
    trials, outage_s, cap_s = (8, 10.0, 2.0) if args.quick else (40, 60.0, 10.0)
    with tempfile.TemporaryDirectory(prefix="wk-bench-") as tmp:
        samples, posts = trip_latencies(Path(tmp), trials)
        rtt = statistics.median(posts)
        print(f"(N+1)th emit -> trip alert at a local webhook; N={N}, {trials} trials:\n")
        print("| measure | p50 | p99 | max | target | machine |")
        print("|---|---:|---:|---:|---|---|")
        print(f"| trip -> alert at receiver | {statistics.median(samples):.1f} ms | "
              f"{pct(samples, 0.99):.1f} ms | {max(samples):.1f} ms | p99 <= "
              f"{100 + rtt:.1f} ms (100 ms + round trip) | {machine_line()} |")
        print(f"| plain HTTP POST round trip (baseline) | {rtt:.1f} ms | "
              f"{pct(posts, 0.99):.1f} ms | {max(posts):.1f} ms | - | {machine_line()} |",
              flush=True)
        delay = outage_delay(Path(tmp), outage_s, cap_s)
        print(f"\nreceiver refusing connections for {outage_s:g} s at the trip, backoff cap "
              f"{cap_s:g} s: alert {delay:.2f} s after the receiver came back "
              f"(target <= {cap_s + 1:g} s) {machine_line()}", flush=True)


if __name__ == "__main__":
    main()
