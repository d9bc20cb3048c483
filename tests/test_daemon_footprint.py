"""What the running daemon maps: none of OpenSSL, even after a breaker trip and its alert.

hashlib and ssl load libcrypto/libssl (~3.3 MiB of RSS on a daemon whose whole budget is
supervisord's ~25 MiB); the daemon needs neither for its hashes (core/hashing.py) and sends
webhooks through a child process. Read from the real process's /proc/PID/maps."""

from __future__ import annotations

from pathlib import Path

from harness import DaemonProc, py
from support import wait_until

ROOT = Path(__file__).resolve().parent.parent
AGENT_ENV = {"PYTHONPATH": str(ROOT)}
OPENSSL = ("libcrypto", "libssl", "_hashlib", "_ssl.")

FLOODER = """
from supervisor.sdk import Agent, OutputDenied
a = Agent()
try:
    while True:
        a.emit("post", "again")
except OutputDenied:
    pass
"""


def openssl_mapped(pid: int) -> list[str]:
    paths = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and any(name in parts[5] for name in OPENSSL):
            paths.add(parts[5])
    return sorted(paths)


def test_daemon_maps_no_openssl_before_or_after_a_trip(tmp_path):
    cron = {f"cron{i:02d}": {"jobs": [{"id": "main", "command": ["/bin/true"],
                                       "schedule": {"cron": f"{i} 3 1 1 *"}}]}
            for i in range(12)}
    agents = {**cron,
              "flood": {"jobs": [{"id": "main", "command": py(FLOODER),
                                  "schedule": {"every_s": 3600}}],
                        "limits": {"outputs": {"max_outputs": 2, "window_s": 600}}}}
    with DaemonProc(tmp_path, agents).start(extra_env=AGENT_ENV) as d:
        pid = d.proc.pid
        assert openssl_mapped(pid) == [], "OpenSSL mapped at start"
        d.call("start-now", agent="flood")
        d.wait_event("breaker_tripped", timeout_s=20)
        trip = d.call("breaker-status")["last_trip"]
        assert trip["count"] == 3
        # The trip's alert is derived (its id hashed) before it is queued: wait for the
        # outbox entry, then read the maps again.
        wait_until(lambda: any(e.get("event", "").startswith("alert") for e in d.events),
                   20, message=f"no alert event after the trip: {d.tail()}")
        assert openssl_mapped(pid) == [], "OpenSSL mapped after the trip alert"
