"""SystemdNotifier against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import re
import socket
import time
from pathlib import Path

import pytest

from supervisor.systemd.notify import SystemdNotifier


def bind_datagram(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(5.0)
    return sock


def pending(sock: socket.socket) -> list[bytes]:
    """Every datagram queued on `sock`, without waiting for more."""
    datagrams = []
    sock.setblocking(False)
    try:
        while True:
            datagrams.append(sock.recv(65536))
    except BlockingIOError:
        return datagrams
    finally:
        sock.settimeout(5.0)


@pytest.fixture
def systemd(tmp_path, monkeypatch):
    """A datagram socket named by NOTIFY_SOCKET, as systemd sets it for a Type=notify unit."""
    path = tmp_path / "notify.sock"
    sock = bind_datagram(path)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield sock
    sock.close()


def test_ready_sends_ready(systemd):
    """ready() sends READY=1."""
    assert SystemdNotifier().ready()
    assert systemd.recv(4096) == b"READY=1"


def test_status_sent_once_per_change(systemd):
    """status() sends a STATUS= line only when the text differs from the last one sent."""
    notifier = SystemdNotifier()
    assert notifier.status("3 agents running")
    assert not notifier.status("3 agents running")
    assert notifier.status("2 agents running")
    assert pending(systemd) == [b"STATUS=3 agents running", b"STATUS=2 agents running"]


def test_reloading_carries_monotonic_usec(systemd):
    """reloading() sends RELOADING=1 with MONOTONIC_USEC taken from CLOCK_MONOTONIC."""
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    SystemdNotifier().reloading()
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", systemd.recv(4096))
    assert match is not None
    assert before_usec <= int(match.group(1)) <= after_usec


def test_stopping_and_watchdog(systemd):
    """stopping() and watchdog_ping() send STOPPING=1 and WATCHDOG=1."""
    notifier = SystemdNotifier()
    notifier.watchdog_ping()
    notifier.stopping()
    assert pending(systemd) == [b"WATCHDOG=1", b"STOPPING=1"]


def test_extend_timeout_in_usec(systemd):
    """extend_timeout() sends EXTEND_TIMEOUT_USEC in microseconds."""
    SystemdNotifier().extend_timeout(2.5)
    assert systemd.recv(4096) == b"EXTEND_TIMEOUT_USEC=2500000"


def test_reconnects_to_recreated_socket(systemd, tmp_path):
    """A notifier keeps working when systemd re-creates its socket at the same path (reexec)."""
    notifier = SystemdNotifier()
    notifier.watchdog_ping()
    assert systemd.recv(4096) == b"WATCHDOG=1"
    systemd.close()
    path = tmp_path / "notify.sock"
    path.unlink()
    with bind_datagram(path) as reborn:
        assert notifier.watchdog_ping()
        assert reborn.recv(4096) == b"WATCHDOG=1"


def test_abstract_socket_address(tmp_path, monkeypatch):
    """An abstract NOTIFY_SOCKET address ('@name') is reached too."""
    name = f"watchkeeper-test-{os.getpid()}-{tmp_path.name}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5.0)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        SystemdNotifier().ready()
        assert sock.recv(4096) == b"READY=1"


def test_noop_without_notify_socket(monkeypatch):
    """Without NOTIFY_SOCKET every call sends nothing and raises nothing."""
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = SystemdNotifier()
    assert not notifier.enabled
    assert not any([notifier.ready(), notifier.status("x"), notifier.reloading(),
                    notifier.stopping(), notifier.watchdog_ping()])
    assert notifier.watchdog_interval_s() is None


def test_unreachable_socket_is_not_fatal(tmp_path, monkeypatch):
    """A NOTIFY_SOCKET naming no socket makes calls return False instead of raising."""
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent.sock"))
    assert not SystemdNotifier().ready()


def test_status_resent_after_failed_send(tmp_path, monkeypatch):
    """A status that could not be sent is sent again when the socket comes back."""
    path = tmp_path / "notify.sock"
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    notifier = SystemdNotifier()
    assert not notifier.status("starting")
    with bind_datagram(path) as sock:
        assert notifier.status("starting")
        assert sock.recv(4096) == b"STATUS=starting"


@pytest.mark.parametrize(
    ("usec", "pid", "expected_s"),
    [
        ("30000000", None, 15.0),
        ("30000000", "self", 15.0),
        ("30000000", "1", None),  # the watchdog belongs to another process
        (None, None, None),
        ("0", None, None),
        ("soon", None, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout(monkeypatch, usec, pid, expected_s):
    """watchdog_interval_s() is half of WATCHDOG_USEC, and None unless the watchdog is ours."""
    for name, value in (("WATCHDOG_USEC", usec),
                        ("WATCHDOG_PID", str(os.getpid()) if pid == "self" else pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    assert SystemdNotifier().watchdog_interval_s() == expected_s
