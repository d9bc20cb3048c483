"""Randomized replay: the decisions of seeded histories match those recorded before a refactor."""

from __future__ import annotations

import replay
from structlog.testing import capture_logs


def test_seeded_histories_give_the_recorded_decisions():
    """Every breaker, crash-loop, heartbeat, memory-guard, rate-limit, transition and schedule
    decision of the seeded histories equals the golden file's (tests/replay.py --record)."""
    with capture_logs():
        got = [replay.dumps(r) for r in replay.replay()]
    golden = replay.load_golden()
    for n, (want, now) in enumerate(zip(golden, got, strict=False), 1):
        assert now == want, f"decision {n} changed"
    assert len(got) == len(golden)


def test_the_replay_covers_every_kind_of_decision():
    """The histories reach trips, restarts, orphan kills, run stops and missed slots, so an
    identical replay says something about each."""
    with capture_logs():
        records = replay.replay()
    ops = {r.get("op") for r in records if r["s"] == "breaker"}
    assert {"output", "launch", "usage", "tick", "reset", "restart", "recount"} <= ops
    assert any("trip" in r for r in records)
    assert any(r.get("new_state") == "half_open" for r in records)
    assert any(r["s"] == "memguard" and r.get("signals") for r in records)
    assert any(r["s"] == "memguard" and r.get("actions") for r in records)
    assert any(r["s"] == "crash_loop" and r["then"] == "failed" for r in records)
    assert any(r["s"] == "schedule" and r["catch_up"] for r in records)
    assert any(r["s"] == "heartbeat" and r["verdict"] == "stale" for r in records)
