"""Soak: many agents heartbeating and writing memory for minutes; the daemon must not leak or
slow down. WATCHKEEPER_SOAK_S sets the duration (300 s by default, as in CI; run it for hours
locally) and WATCHKEEPER_SOAK_AGENTS the number of agents (50)."""

from __future__ import annotations

import os
import statistics
import time

import pytest
from harness import DaemonProc, py
from hostile import AGENT_ENV, ROOMY_BREAKER, rss_mb

pytestmark = pytest.mark.slow

AGENT = r"""
import os, time
from supervisor.sdk import Agent
a = Agent()
out = open(os.path.join(os.environ["LAT_DIR"], a.name), "a", buffering=1)
i = 0
while True:
    a.heartbeat()
    started = time.monotonic()
    a.memory.put(a.name, f"k{i % 100}", {"i": i, "note": "soak " * 10})
    out.write(f"{time.time():.3f} {(time.monotonic() - started) * 1000:.2f}\n")
    i += 1
    time.sleep(0.5)
"""


def _pct(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) >= 2 else values[0]


def _figures(values: list[float]) -> str:
    return f"p50 {_pct(values, 50):.1f} ms, p99 {_pct(values, 99):.1f} ms, n={len(values)}"


def _latencies(lat_dir, since: float, until: float) -> list[float]:
    out = []
    for path in lat_dir.iterdir():
        for line in path.read_text().split("\n")[:-1]:
            stamp, ms = line.split()
            if since <= float(stamp) < until:
                out.append(float(ms))
    return out


def test_soak_rss_flat_no_missed_heartbeat_latencies_steady(tmp_path):
    """Under many agents heartbeating and writing memory for minutes, the daemon's RSS stays
    flat after warm-up, no heartbeat goes stale, and ping and memory-ack latencies stay
    steady."""
    duration_s = float(os.environ.get("WATCHKEEPER_SOAK_S", "300"))
    count = int(os.environ.get("WATCHKEEPER_SOAK_AGENTS", "50"))
    warm_s = min(60.0, duration_s / 4)
    lat_dir = tmp_path / "latency"
    lat_dir.mkdir()
    agent = {"heartbeat": {"interval_s": 0.5, "stale_multiple": 6, "on_stale": "log"},
             "jobs": [{"id": "main", "command": py(AGENT), "schedule": {"always": True},
                       "env": {"LAT_DIR": str(lat_dir)}, "timeout_s": None}]}
    agents = {f"a{i:02d}": agent for i in range(count)}
    with DaemonProc(tmp_path, agents, breaker=ROOMY_BREAKER,
                    tick_s=0.5).start(extra_env=AGENT_ENV) as d:
        pid = d.proc.pid
        started = time.time()
        warm_until, end = started + warm_s, started + duration_s
        rss: list[tuple[float, float]] = []
        pings: list[tuple[float, float]] = []
        client = d.client()
        next_sample = time.monotonic()
        while time.time() < end:
            t0 = time.monotonic()
            assert client.call("ping")["pid"] == pid
            pings.append((time.time(), (time.monotonic() - t0) * 1000))
            rss.append((time.time(), rss_mb(pid)))
            next_sample += 1.0
            time.sleep(max(0.0, next_sample - time.monotonic()))  # the sampling period
        client.close()
        stale = d.find("heartbeat_stale")
        restarts = len(d.find("run_started")) - count
        assert d.proc.poll() is None

    half = warm_until + (end - warm_until) / 2
    rss_warm = max(r for t, r in rss if t <= warm_until)
    rss_end = statistics.median(r for t, r in rss[-10:])
    ping_early = [ms for t, ms in pings if warm_until < t <= half]
    ping_late = [ms for t, ms in pings if t > half]
    ack_early = _latencies(lat_dir, warm_until, half)
    ack_late = _latencies(lat_dir, half, end)
    print(f"\nsoak: {count} agents for {duration_s:.0f}s (warm-up {warm_s:.0f}s)\n"
          f"  daemon RSS: {rss[0][1]:.1f} MB at start, {rss_warm:.1f} MB after warm-up, "
          f"{rss_end:.1f} MB at the end, {max(r for _, r in rss):.1f} MB peak\n"
          f"  ping:       early {_figures(ping_early)}; late {_figures(ping_late)}\n"
          f"  memory ack: early {_figures(ack_early)}; late {_figures(ack_late)}\n"
          f"  acknowledged writes: {len(_latencies(lat_dir, 0, end + 60))}, "
          f"stale heartbeats: {len(stale)}, run restarts: {restarts}")
    assert not stale, f"heartbeats went stale: {stale[:3]}"
    assert restarts == 0, "agents restarted during the soak"
    assert rss_end <= rss_warm + max(8.0, rss_warm * 0.10), "the daemon's RSS kept growing"
    assert _pct(ping_late, 50) <= 3 * _pct(ping_early, 50) + 20
    assert _pct(ack_late, 50) <= 3 * _pct(ack_early, 50) + 20
    assert _pct(ack_late, 99) <= 3 * _pct(ack_early, 99) + 100
