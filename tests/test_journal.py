"""JournalRenderer and journal_stream_matches against real sockets and file descriptors."""

from __future__ import annotations

import io
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import structlog

from supervisor.systemd.journal import (
    MAX_VALUE_BYTES,
    JournalRenderer,
    field_name,
    journal_stream_matches,
)

ROOT = Path(__file__).resolve().parent.parent


def parse_entry(datagram: bytes) -> dict[str, bytes]:
    """Decode one native-protocol datagram, both KEY=value and length-prefixed fields."""
    fields: dict[str, bytes] = {}
    position = 0
    while position < len(datagram):
        line_end = datagram.index(b"\n", position)
        line = datagram[position:line_end]
        if b"=" in line:
            name, _, value = line.partition(b"=")
            position = line_end + 1
        else:
            name = line
            (size,) = struct.unpack("<Q", datagram[line_end + 1:line_end + 9])
            value = datagram[line_end + 9:line_end + 9 + size]
            assert datagram[line_end + 9 + size:line_end + 10 + size] == b"\n"
            position = line_end + 10 + size
        fields[name.decode()] = value
    return fields


@pytest.fixture
def journald(tmp_path):
    """A datagram socket standing in for /run/systemd/journal/socket."""
    path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5.0)
    yield sock, path
    sock.close()


def make_logger(renderer: JournalRenderer):
    return structlog.wrap_logger(
        structlog.PrintLogger(io.StringIO()),
        processors=[structlog.processors.add_log_level, renderer],
    )


def test_event_keys_become_fields(journald):
    """Every event key arrives as an upper-case field beside MESSAGE, PRIORITY and the identifier."""
    sock, path = journald
    make_logger(JournalRenderer(socket_path=path)).info(
        "agent_started", agent="scout", run_id="r-17", job="hourly")
    entry = parse_entry(sock.recv(65536))
    assert entry["EVENT"] == b"agent_started"
    assert entry["AGENT"] == b"scout"
    assert entry["RUN_ID"] == b"r-17"
    assert entry["JOB"] == b"hourly"
    assert entry["PRIORITY"] == b"6"
    assert entry["SYSLOG_IDENTIFIER"] == b"watchkeeper"
    assert entry["MESSAGE"] == b"agent_started agent=scout run_id=r-17 job=hourly"


@pytest.mark.parametrize(("method", "priority"), [
    ("debug", b"7"), ("info", b"6"), ("warning", b"4"), ("error", b"3"), ("critical", b"2"),
])
def test_priority_follows_level(journald, method, priority):
    """PRIORITY is the syslog number of the structlog level."""
    sock, path = journald
    getattr(make_logger(JournalRenderer(socket_path=path)), method)("tick")
    assert parse_entry(sock.recv(65536))["PRIORITY"] == priority


def test_multiline_value_uses_binary_safe_form(journald):
    """A value with newlines is sent length-prefixed and arrives intact."""
    sock, path = journald
    traceback = "Traceback (most recent call last):\n  boom\nValueError: x"
    make_logger(JournalRenderer(socket_path=path)).error("run_failed", exception=traceback)
    datagram = sock.recv(65536)
    assert b"EXCEPTION\n" + struct.pack("<Q", len(traceback)) in datagram
    entry = parse_entry(datagram)
    assert entry["EXCEPTION"] == traceback.encode()
    assert entry["MESSAGE"].endswith(b"\n" + traceback.encode())


def test_values_quoted_in_message(journald):
    """MESSAGE quotes values that hold spaces so the line stays key=value parseable."""
    sock, path = journald
    make_logger(JournalRenderer(socket_path=path)).info("agent_stopped", reason="exit code 3")
    assert parse_entry(sock.recv(65536))["MESSAGE"] == b'agent_stopped reason="exit code 3"'


@pytest.mark.parametrize(("key", "name"), [
    ("run_id", "RUN_ID"),
    ("run-id", "RUN_ID"),
    ("_private", "PRIVATE"),
    ("9lives", "FIELD_9LIVES"),
    ("durée", "DUR_E"),
    ("message", "FIELD_MESSAGE"),
    ("priority", "FIELD_PRIORITY"),
    ("x" * 80, "X" * 64),
])
def test_field_names_sanitised(key, name):
    """Keys become names journald accepts and never overwrite the renderer's own fields."""
    assert field_name(key) == name


def test_huge_value_truncated(journald):
    """A value over 16 KiB is cut to MAX_VALUE_BYTES with a marker."""
    sock, path = journald
    make_logger(JournalRenderer(socket_path=path)).info("page_saved", html="<p>" * 20_000)
    entry = parse_entry(sock.recv(262144))
    assert len(entry["HTML"]) == MAX_VALUE_BYTES
    assert entry["HTML"].endswith(b"[truncated 43616 bytes]")


def test_nothing_printed_after_sending(journald):
    """The renderer drops the event after sending, so the wrapped logger prints nothing."""
    sock, path = journald
    out = io.StringIO()
    logger = structlog.wrap_logger(structlog.PrintLogger(out),
                                   processors=[JournalRenderer(socket_path=path)])
    logger.info("quiet")
    sock.recv(65536)
    assert out.getvalue() == ""


def test_absent_socket_falls_back_to_stderr(tmp_path, capsys):
    """Without a journal socket the line goes to stderr, with the reason said once."""
    logger = make_logger(JournalRenderer(socket_path=tmp_path / "absent.sock"))
    logger.warning("disk_low", free_mb=80)
    logger.warning("disk_low", free_mb=70)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        f"[warning] journal_unreachable socket={tmp_path / 'absent.sock'} error=ENOENT",
        "[warning] disk_low free_mb=80",
        "[warning] disk_low free_mb=70",
    ]


def test_oversized_entry_falls_back(journald):
    """An entry larger than a datagram may be is written to the fallback stream."""
    _, path = journald
    fallback = io.StringIO()
    fields = {f"part{i}": "x" * MAX_VALUE_BYTES for i in range(64)}  # about 1 MiB
    make_logger(JournalRenderer(socket_path=path, fallback=fallback)).info("big", **fields)
    assert "error=EMSGSIZE" in fallback.getvalue()
    assert "[info] big part0=" in fallback.getvalue()


def test_full_queue_falls_back_without_blocking(journald):
    """When journald stops reading, sends fail with EAGAIN instead of blocking the caller."""
    _, path = journald
    fallback = io.StringIO()
    logger = make_logger(JournalRenderer(socket_path=path, fallback=fallback))
    for number in range(100_000):
        logger.info("flood", number=number)
        if fallback.getvalue():
            break
    assert "error=EAGAIN" in fallback.getvalue()


def test_stream_matches_stderr(monkeypatch):
    """journal_stream_matches() is True when JOURNAL_STREAM names our stderr."""
    stat = os.fstat(2)
    monkeypatch.setenv("JOURNAL_STREAM", f"{stat.st_dev}:{stat.st_ino}")
    assert journal_stream_matches()


@pytest.mark.parametrize("stream", [None, "", "1:2", "garbage", "12:"])
def test_stream_mismatch(monkeypatch, stream):
    """journal_stream_matches() is False when JOURNAL_STREAM is unset, malformed or foreign."""
    if stream is None:
        monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    else:
        monkeypatch.setenv("JOURNAL_STREAM", stream)
    assert not journal_stream_matches()


def test_stream_matches_in_child_with_redirected_stderr(tmp_path):
    """A child whose stderr is the announced file sees a match; its parent's stream does not."""
    log_path = tmp_path / "stream.log"
    probe = "from supervisor.systemd.journal import journal_stream_matches as m; print(m())"
    with open(log_path, "w") as stream:
        stat = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{stat.st_dev}:{stat.st_ino}",
               "PYTHONPATH": str(ROOT)}
        matched = subprocess.run([sys.executable, "-c", probe], env=env, stderr=stream,
                                 stdout=subprocess.PIPE, text=True, check=True)
        unmatched = subprocess.run([sys.executable, "-c", probe], env=env,
                                   capture_output=True, text=True, check=True)
    assert matched.stdout.strip() == "True"
    assert unmatched.stdout.strip() == "False"
