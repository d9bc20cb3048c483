"""Heartbeat files, verdicts, upstream degradation and its edge-triggered logging."""

from __future__ import annotations

import os
import subprocess
import threading
import time

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs

from supervisor.health.heartbeat import (
    DegradationTracker,
    Heartbeat,
    HeartbeatSettings,
    OnStale,
    Verdict,
    heartbeat_path,
    heartbeat_verdict,
    load_heartbeat,
    parse_heartbeat,
    read_heartbeat,
    stale_response,
    upstream_status,
    write_heartbeat,
)

NOW = 1_700_000_000.0
SETTINGS = HeartbeatSettings(interval_s=60, stale_multiple=3.0)


def test_write_then_read_round_trips(tmp_path):
    """A written heartbeat reads back with its timestamp, pid and run id."""
    write_heartbeat(tmp_path, "scout", ts=NOW, pid=42, run_id="r1")
    assert read_heartbeat(heartbeat_path(tmp_path, "scout")) == Heartbeat(ts=NOW, pid=42,
                                                                          run_id="r1")


def test_write_leaves_no_temp_files(tmp_path):
    """Writing replaces the file by rename and leaves nothing else in the status dir."""
    for i in range(5):
        write_heartbeat(tmp_path, "scout", ts=NOW + i)
    assert [p.name for p in (tmp_path / "status").iterdir()] == ["scout.heartbeat"]


def test_concurrent_reader_never_sees_a_partial_write(tmp_path):
    """A reader polling during many rewrites always gets a whole heartbeat."""
    write_heartbeat(tmp_path, "scout", ts=NOW)
    path = heartbeat_path(tmp_path, "scout")
    done = threading.Event()
    bad = []

    def reader():
        while not done.is_set():
            if read_heartbeat(path) is None:
                bad.append(1)

    t = threading.Thread(target=reader)
    t.start()
    for i in range(500):
        write_heartbeat(tmp_path, "scout", ts=NOW + i, run_id="x" * (i % 50))
    done.set()
    t.join()
    assert bad == []


def test_one_line_of_shell_is_a_heartbeat(tmp_path):
    """`date +%s > file` from a shell produces a heartbeat that reads as fresh."""
    path = heartbeat_path(tmp_path, "shell")
    path.parent.mkdir(parents=True)
    subprocess.run(["sh", "-c", f"date +%s > {path}"], check=True)
    hb = read_heartbeat(path)
    assert hb is not None and heartbeat_verdict(hb, SETTINGS, time.time()) is Verdict.FRESH


@pytest.mark.parametrize("text, ts", [
    ('{"ts": 1700000000.5, "pid": 7, "run_id": "a"}\n', 1700000000.5),
    ("1700000000\n", 1700000000.0),
    ("  1700000000.25  ", 1700000000.25),
    ("2023-11-14T22:13:20Z", 1700000000.0),
    ("2023-11-14T22:13:20+00:00", 1700000000.0),
])
def test_accepted_formats(text, ts):
    """JSON lines, bare unix timestamps and ISO-8601 times all parse to the same unix time."""
    hb = parse_heartbeat(text)
    assert hb is not None and hb.ts == pytest.approx(ts)


@pytest.mark.parametrize("text", ["", "hello", "{", '{"pid": 3}', '{"ts": "soon"}', "nan",
                                  "-5", "inf", '{"ts": 1, "extra": [}'])
def test_garbage_formats_parse_to_none(text):
    """Text that is no heartbeat parses to None rather than raising."""
    assert parse_heartbeat(text) is None


@given(st.binary(max_size=300))
def test_arbitrary_bytes_never_raise(tmp_path_factory, data):
    """Any bytes in a heartbeat file give a reading, never an exception."""
    path = tmp_path_factory.mktemp("hb") / "x.heartbeat"
    path.write_bytes(data)
    reading = load_heartbeat(path)
    assert (reading.heartbeat is None) == (reading.fault is Verdict.GARBAGE)


def test_garbage_file_is_garbage_not_stale_and_unreadable_is_garbage(tmp_path):
    """A garbage file and a directory in its place both judge GARBAGE without raising."""
    path = heartbeat_path(tmp_path, "a")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff\xfe not a time")
    assert heartbeat_verdict(load_heartbeat(path), SETTINGS, NOW) is Verdict.GARBAGE
    assert read_heartbeat(path) is None
    path.unlink()
    path.mkdir()
    assert heartbeat_verdict(load_heartbeat(path), SETTINGS, NOW) is Verdict.GARBAGE


def test_oversized_file_is_garbage(tmp_path):
    """A heartbeat file larger than 4 KiB is garbage even if it starts with a timestamp."""
    path = tmp_path / "big.heartbeat"
    path.write_text("1700000000\n" + " " * 5000)
    assert load_heartbeat(path).fault is Verdict.GARBAGE


def test_missing_file_is_missing(tmp_path):
    """No heartbeat file judges MISSING."""
    assert heartbeat_verdict(load_heartbeat(tmp_path / "none"), SETTINGS, NOW) is Verdict.MISSING


def test_fresh_until_stale_window_then_stale():
    """A beat is fresh up to interval_s * stale_multiple old and stale after."""
    hb = Heartbeat(ts=NOW)
    assert heartbeat_verdict(hb, SETTINGS, NOW + 180) is Verdict.FRESH
    assert heartbeat_verdict(hb, SETTINGS, NOW + 180.01) is Verdict.STALE


def test_future_beat_is_fresh():
    """A beat stamped ahead of our clock is fresh, not an error."""
    assert heartbeat_verdict(Heartbeat(ts=NOW + 3600), SETTINGS, NOW) is Verdict.FRESH


def test_new_run_gets_a_full_window_before_judged():
    """With started_at, an old or missing beat is fresh until a stale window plus the
    first-beat grace after the start."""
    old = Heartbeat(ts=NOW - 10_000)
    assert heartbeat_verdict(old, SETTINGS, NOW + 100, started_at=NOW) is Verdict.FRESH
    assert heartbeat_verdict(None, SETTINGS, NOW + 100, started_at=NOW) is Verdict.FRESH
    assert heartbeat_verdict(None, SETTINGS, NOW + 211, started_at=NOW) is Verdict.STALE


def test_first_beat_grace_applies_only_until_the_runs_first_beat():
    """A run without a beat of its own gets stale window + first_beat_grace_s; once it beat,
    only the stale window counts."""
    settings = HeartbeatSettings(interval_s=0.5, stale_multiple=6, first_beat_grace_s=30)
    assert heartbeat_verdict(None, settings, NOW + 20, started_at=NOW) is Verdict.FRESH
    assert heartbeat_verdict(None, settings, NOW + 34, started_at=NOW) is Verdict.STALE
    beat = Heartbeat(ts=NOW + 1)
    assert heartbeat_verdict(beat, settings, NOW + 4.5, started_at=NOW) is Verdict.STALE
    none = HeartbeatSettings(interval_s=0.5, stale_multiple=6, first_beat_grace_s=0)
    assert heartbeat_verdict(None, none, NOW + 4, started_at=NOW) is Verdict.STALE


def test_stale_response_follows_settings():
    """A stale beat maps to the agent's on_stale choice and a fresh one to nothing."""
    kill = HeartbeatSettings(on_stale=OnStale.KILL)
    assert stale_response(Verdict.STALE, kill) is OnStale.KILL
    assert stale_response(Verdict.FRESH, kill) is None


def test_settings_defaults_and_unknown_keys():
    """Defaults are 300 s, x3, log; an unknown key is rejected."""
    s = msgspec.convert({}, HeartbeatSettings)
    assert (s.interval_s, s.stale_multiple, s.on_stale) == (300, 3.0, OnStale.LOG)
    assert msgspec.convert({"on_stale": "restart"}, HeartbeatSettings).on_stale is OnStale.RESTART
    with pytest.raises(msgspec.ValidationError, match="intervall_s"):
        msgspec.convert({"intervall_s": 5}, HeartbeatSettings)


def test_settings_reject_nonpositive_interval():
    """interval_s of zero is rejected with the valid range in the message."""
    with pytest.raises(msgspec.ValidationError, match="> 0"):
        msgspec.convert({"interval_s": 0}, HeartbeatSettings)


def _upstreams(tmp_path, ok=None):
    return upstream_status(tmp_path, ["fetch", "parse"], {"fetch": SETTINGS, "parse": SETTINGS},
                           ok or {}, NOW)


def test_upstream_fresh_and_ok_is_not_degraded(tmp_path):
    """Fresh upstream beats with successful last runs are not degraded."""
    write_heartbeat(tmp_path, "fetch", ts=NOW - 10)
    write_heartbeat(tmp_path, "parse", ts=NOW - 10)
    statuses = _upstreams(tmp_path, {"fetch": True, "parse": True})
    assert not any(s.degraded for s in statuses.values())
    assert statuses["fetch"].age_s == pytest.approx(10)


def test_upstream_stale_is_degraded(tmp_path):
    """A stale upstream beat makes that upstream degraded with reason heartbeat_stale."""
    write_heartbeat(tmp_path, "fetch", ts=NOW - 1000)
    write_heartbeat(tmp_path, "parse", ts=NOW)
    statuses = _upstreams(tmp_path)
    assert statuses["fetch"].degraded and statuses["fetch"].reason == "heartbeat_stale"
    assert not statuses["parse"].degraded


def test_upstream_failed_last_run_is_degraded_even_when_fresh(tmp_path):
    """A fresh upstream whose last run failed is degraded with reason last_run_failed."""
    write_heartbeat(tmp_path, "fetch", ts=NOW)
    write_heartbeat(tmp_path, "parse", ts=NOW)
    statuses = _upstreams(tmp_path, {"fetch": False})
    assert statuses["fetch"].reason == "last_run_failed"


def test_upstream_missing_is_degraded(tmp_path):
    """An upstream that never wrote a heartbeat is degraded."""
    assert _upstreams(tmp_path)["parse"].reason == "heartbeat_missing"


def test_tracker_logs_one_enter_and_one_leave(tmp_path):
    """Many degraded checks then many healthy ones log exactly one enter and one leave event."""
    tracker = DegradationTracker()
    write_heartbeat(tmp_path, "parse", ts=NOW)
    with capture_logs() as logs:
        write_heartbeat(tmp_path, "fetch", ts=NOW - 1000)
        for _ in range(20):
            assert tracker.observe("report", _upstreams(tmp_path))
        write_heartbeat(tmp_path, "fetch", ts=NOW)
        for _ in range(20):
            assert not tracker.observe("report", _upstreams(tmp_path))
    events = [e["event"] for e in logs]
    assert events == ["agent_degraded", "agent_recovered"]
    assert logs[0]["upstreams"] == ["fetch"] and logs[0]["agent"] == "report"


def test_tracker_logs_garbage_once_per_file_change(tmp_path):
    """A garbage heartbeat is logged once, and again only after the file changes."""
    tracker = DegradationTracker()
    path = heartbeat_path(tmp_path, "fetch")
    write_heartbeat(tmp_path, "parse", ts=NOW)
    path.write_text("garbage")
    with capture_logs() as logs:
        for _ in range(10):
            tracker.observe("report", _upstreams(tmp_path))
        path.write_text("other garbage!")
        os.utime(path, ns=(1, 1))  # a distinct mtime even on coarse-timestamp filesystems
        for _ in range(10):
            tracker.observe("report", _upstreams(tmp_path))
    assert [e["event"] for e in logs].count("heartbeat_garbage") == 2
    assert [e["event"] for e in logs].count("agent_degraded") == 1
