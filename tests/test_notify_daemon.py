"""A real daemon talking to a datagram socket that stands in for systemd's NOTIFY_SOCKET."""

from __future__ import annotations

import datetime as dt
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest
from harness import DaemonProc, py
from support import wait_until

ROOT = Path(__file__).resolve().parent.parent
WATCHDOG_USEC = 400_000  # pings every 0.2 s
DEBUG_ENV = {"WATCHKEEPER_DEBUG_COMMANDS": "1", "WATCHDOG_USEC": str(WATCHDOG_USEC)}


class FakeSystemd:
    """Receives sd_notify datagrams on a thread, each with the wall and monotonic time it
    arrived."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.1)
        self.received: list[tuple[float, float, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.received.append((time.monotonic(), time.time(), data.decode()))
                self._cond.notify_all()

    def messages(self) -> list[str]:
        with self._cond:
            return [text for _, _, text in self.received]

    def arrivals(self, prefix: str) -> list[float]:
        """Monotonic arrival times of the messages starting with `prefix`."""
        with self._cond:
            return [mono for mono, _, text in self.received if text.startswith(prefix)]

    def first(self, prefix: str, timeout_s: float = 10.0) -> tuple[int, float]:
        """Index and wall-clock arrival of the first message starting with `prefix`."""
        def found():
            with self._cond:
                for index, (_, wall, text) in enumerate(self.received):
                    if text.startswith(prefix):
                        return index, wall
            return None
        return wait_until(found, timeout_s, message=f"{prefix!r} in {self.messages()}")

    def close(self) -> None:
        self._closed = True
        self._thread.join(timeout=5)
        self.sock.close()


@pytest.fixture
def systemd(tmp_path):
    fake = FakeSystemd(tmp_path / "notify.sock")
    yield fake
    fake.close()


def every(seconds: float, code: str) -> dict:
    return {"jobs": [{"id": "main", "command": py(code), "schedule": {"every_s": seconds}}]}


def event_time(event: dict) -> float:
    return dt.datetime.fromisoformat(event["timestamp"].replace("Z", "+00:00")).timestamp()


def test_ready_follows_scheduler_start(tmp_path, systemd):
    """READY=1 arrives once, after daemon_started (scheduler running, agents scheduled)."""
    with DaemonProc(tmp_path, {"a": every(60, "pass")}) as d:
        d.start(wait_ready=False, notify_socket=systemd.path)
        ready_index, ready_wall = systemd.first("READY=1")
        started = d.wait_event("daemon_started")
        assert event_time(started) <= ready_wall
        assert d.wait_event("daemon_state", new="running")
        assert any(m.startswith("STATUS=1 agents") for m in systemd.messages()[:ready_index])
        status = d.call("status")
        assert status["daemon"]["state"] == "running"
        assert status["agents"][0]["next_run"] is not None
        assert systemd.messages().count("READY=1") == 1


def test_no_ready_when_state_dir_is_unusable(tmp_path, systemd):
    """A daemon whose state dir cannot be created exits 1 with one line and never sends READY."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    d = DaemonProc(tmp_path, {"a": every(60, "pass")}, state_dir=str(blocker / "state"))
    d.start(wait_ready=False, notify_socket=systemd.path)
    assert d.proc.wait(timeout=15) == 1
    wait_until(lambda: d.find("_raw"), timeout_s=5, message="error line on stderr")
    assert [e["line"] for e in d.find("_raw")] == [
        f"watchkeeper: cannot use state_dir {blocker / 'state'}: [Errno 20] Not a directory: "
        f"'{blocker / 'state'}' (it must be a directory the daemon's user can write)"]
    assert "READY=1" not in systemd.messages()


def test_status_line_follows_runs(tmp_path, systemd):
    """A STATUS= line is sent when an agent starts running and again when it finishes."""
    agents = {"a": every(60, "import time; time.sleep(1)")}
    with DaemonProc(tmp_path, agents).start(notify_socket=systemd.path) as d:
        systemd.first("READY=1")
        d.call("start-now", agent="a")
        systemd.first("STATUS=1 agents: 1 running")
        d.wait_event("run_finished", agent="a")
        wait_until(lambda: systemd.messages()[-1].startswith("STATUS=1 agents: 0 running"),
                   timeout_s=5, message=f"status after the run: {systemd.messages()[-3:]}")


def test_watchdog_pings_stop_while_loop_is_blocked(tmp_path, systemd):
    """WATCHDOG=1 pings stop while debug-block holds the loop and resume once it is free."""
    d = DaemonProc(tmp_path, {"a": every(60, "pass")})
    with d.start(extra_env=DEBUG_ENV, notify_socket=systemd.path):
        assert d.wait_event("systemd_watchdog")["interval_s"] == 0.2
        wait_until(lambda: len(systemd.arrivals("WATCHDOG=1")) >= 3, timeout_s=5,
                   message="three pings before the block")
        blocked_from = time.monotonic()
        assert d.call("debug-block", seconds=1.5) == {"blocked_s": 1.5}
        blocked_until = time.monotonic()
        wait_until(lambda: len([t for t in systemd.arrivals("WATCHDOG=1")
                                if t > blocked_until]) >= 3,
                   timeout_s=5, message="three pings after the block")
        pings = systemd.arrivals("WATCHDOG=1")
        assert not [t for t in pings if blocked_from + 0.3 < t < blocked_until - 0.1]
        longest_gap = max(b - a for a, b in zip(pings, pings[1:], strict=False))
        assert longest_gap > 1.2
        assert blocked_until - blocked_from >= 1.5


def test_watchdog_withheld_when_scheduler_dies(tmp_path, systemd):
    """With the scheduler shut down, the daemon logs why and sends no more WATCHDOG=1."""
    d = DaemonProc(tmp_path, {"a": every(60, "pass")})
    with d.start(extra_env=DEBUG_ENV, notify_socket=systemd.path):
        wait_until(lambda: len(systemd.arrivals("WATCHDOG=1")) >= 2, timeout_s=5,
                   message="pings before the scheduler stops")
        assert d.call("debug-stop-scheduler") == {"scheduler_alive": False}
        first = d.wait_event("watchdog_withheld")
        assert first["problem"] == "the scheduler is shut down: no timed job will fire"
        pings_then = len(systemd.arrivals("WATCHDOG=1"))
        d.wait_event("watchdog_withheld", count=4)
        assert len(systemd.arrivals("WATCHDOG=1")) == pings_then


def test_reload_sends_reloading_then_ready(tmp_path, systemd):
    """SIGHUP sends RELOADING=1 with MONOTONIC_USEC of the reload, then READY=1 again."""
    with DaemonProc(tmp_path, {"a": every(60, "pass")}).start(
            notify_socket=systemd.path) as d:
        systemd.first("READY=1")
        before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        d.signal(signal.SIGHUP)
        reloading_index, _ = systemd.first("RELOADING=1")
        d.wait_event("reload_applied")
        wait_until(lambda: systemd.messages().count("READY=1") == 2, timeout_s=5,
                   message=f"second READY=1 in {systemd.messages()}")
        messages = systemd.messages()
        match = re.fullmatch(r"RELOADING=1\nMONOTONIC_USEC=(\d+)", messages[reloading_index])
        assert match and before_usec <= int(match.group(1))
        assert "READY=1" in messages[reloading_index:]


def test_rejected_reload_still_ends_with_ready(tmp_path, systemd):
    """A reload of a broken configuration is answered RELOADING=1 then READY=1 all the same."""
    with DaemonProc(tmp_path, {"a": every(60, "pass")}).start(
            notify_socket=systemd.path) as d:
        systemd.first("READY=1")
        (d.agents_dir / "b.yaml").write_text("jobs: [{id: x}]\n")
        d.signal(signal.SIGHUP)
        d.wait_event("reload_rejected")
        reloading_index, _ = systemd.first("RELOADING=1")
        wait_until(lambda: "READY=1" in systemd.messages()[reloading_index:], timeout_s=5,
                   message=f"READY=1 after RELOADING=1 in {systemd.messages()}")


FAILING_RELOAD_HOOK = """\
import supervisor.daemon.features as features
from supervisor.core.feature import Feature

_features_for = features.features_for


class FailingReload(Feature):
    name = "failing_reload"

    def reload(self, config):
        raise RuntimeError("reload hook failed on purpose")


def features_for(config):
    return [*_features_for(config), FailingReload()]


features.features_for = features_for
"""


def test_failing_reload_hook_still_ends_with_ready(tmp_path, systemd):
    """A feature whose reload hook raises is logged; the reload ends with READY=1."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(FAILING_RELOAD_HOOK)
    # The checkout first: sitecustomize imports `supervisor` before `-m` adds the cwd.
    python_path = os.pathsep.join([str(ROOT), str(site)])
    with DaemonProc(tmp_path, {"a": every(60, "pass")}).start(
            extra_env={"PYTHONPATH": python_path}, notify_socket=systemd.path) as d:
        systemd.first("READY=1")
        d.signal(signal.SIGHUP)
        assert d.wait_event("extension_reload_failed")["extension"] == "FailingReload"
        d.wait_event("reload_applied")
        wait_until(lambda: systemd.messages().count("READY=1") == 2, timeout_s=5,
                   message=f"READY=1 after the reload in {systemd.messages()}")
        d.signal(signal.SIGHUP)
        d.wait_event("reload_applied", count=2)


def test_sigterm_sends_stopping(tmp_path, systemd):
    """SIGTERM sends STOPPING=1 and a status line that says the daemon is stopping."""
    d = DaemonProc(tmp_path, {"a": every(60, "pass")}).start(notify_socket=systemd.path)
    systemd.first("READY=1")
    assert d.stop() == 0
    stopping_index, _ = systemd.first("STOPPING=1")
    assert any(m.startswith("STATUS=stopping; ") for m in systemd.messages()[stopping_index:])


def test_agents_do_not_inherit_notify_variables(tmp_path, systemd):
    """An agent's environment holds neither NOTIFY_SOCKET nor the watchdog variables."""
    out = tmp_path / "env.txt"
    code = (f"import os; open({str(out)!r}, 'w').write(' '.join(k for k in os.environ "
            f"if k in ('NOTIFY_SOCKET', 'WATCHDOG_USEC', 'WATCHDOG_PID')) or '-')")
    with DaemonProc(tmp_path, {"a": every(60, code)}).start(
            extra_env={"WATCHDOG_USEC": str(WATCHDOG_USEC)}, notify_socket=systemd.path) as d:
        d.call("start-now", agent="a")
        d.wait_event("run_finished", agent="a", outcome="succeeded")
        assert out.read_text() == "-"


def test_nothing_sent_without_notify_socket(tmp_path, systemd):
    """Without NOTIFY_SOCKET a whole life (start, runs, reload, stop) sends nothing at all."""
    d = DaemonProc(tmp_path, {"a": every(0.2, "pass")})
    d.start(extra_env={"WATCHDOG_USEC": str(WATCHDOG_USEC)})
    d.wait_event("run_finished", agent="a", count=3)
    d.signal(signal.SIGHUP)
    d.wait_event("reload_applied")
    assert d.stop() == 0
    assert systemd.messages() == []
    assert not d.find("systemd_watchdog") and not d.find("sd_notify_failed")
