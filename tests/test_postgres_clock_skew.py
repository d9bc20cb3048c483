"""Hosts whose clocks differ by +/- 30 s (libfaketime per daemon) still run each firing once."""

from __future__ import annotations

import os
from pathlib import Path

from harness import py
from pg_harness import ROOT, hosts, query
from support import require, wait_until

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
EVERY_S = 2.0


def skewed_env(offset: str) -> dict:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    # Wall clock only: the daemon's durations (monotonic) stay true, as on a host whose
    # NTP is off.
    return {"PYTHONPATH": path, "LD_PRELOAD": str(LIBFAKETIME), "FAKETIME": offset,
            "DONT_FAKE_MONOTONIC": "1"}


def test_each_interval_slot_runs_once_with_clocks_thirty_seconds_apart(tmp_path, schema):
    """Three hosts at +30 s, 0 s and -30 s name each interval slot on the database's clock:
    every slot is one run, and no host runs slots of its own skewed time."""
    require(LIBFAKETIME.exists(), f"{LIBFAKETIME} missing (apt-get install faketime)")
    agents = {"tick": {"jobs": [{"id": "t", "command": py("pass"),
                                 "schedule": {"every_s": EVERY_S}}]}}
    daemons = hosts(tmp_path, schema, agents, count=3,
                    breaker={"launches": {"max_runs": 10000}})
    try:
        for d, offset in zip(daemons, ("+30s", "+0s", "-30s"), strict=True):
            d.start(extra_env=skewed_env(offset))
        wait_until(lambda: query(schema, "select count(*) from firing_claims")[0][0] >= 6, 30,
                   message="six claimed slots")
        started = sum(len(d.find("run_started", agent="tick")) for d in daemons)
        claims = query(schema, "select slot, extract(epoch from claimed_at)::float8 from "
                       "firing_claims where agent = 'tick' order by slot")
    finally:
        for d in daemons:
            d.stop()
    assert all(d.find("run_started") or d.find("firing_skipped") for d in daemons)
    assert started <= len(claims)
    for slot, claimed_at in claims:
        # On the database's clock a slot is claimed in its own period (plus the tolerance);
        # a slot from a skewed clock would sit 30 s away.
        assert -1.0 <= claimed_at - slot <= EVERY_S + 1.0, (slot, claimed_at)
    slots = [s for s, _ in claims]
    assert all(b - a >= EVERY_S for a, b in zip(slots, slots[1:], strict=False))
