"""The agent contract end to end: a real Python agent (SDK) and a real bash agent (CLI)."""

from __future__ import annotations

import json
import os
import sys

from harness import DaemonProc, py

BIN = os.path.dirname(sys.executable)

PY_AGENT = r"""
import json
from supervisor.sdk import Agent, MemoryConflict, OutputDenied
a = Agent()
a.heartbeat()
v1 = a.memory.put("notes", "solar", {"fact": "panels last 25 years"})
v2 = a.memory.merge("notes", "solar", {"source": "demo"})
try:
    a.memory.put("notes", "solar", {"x": 1}, expect_version=v1)
    conflict = None
except MemoryConflict as exc:
    conflict = exc.current_version
with a.lock("article-1"):
    hits = a.search("solar panels", token_budget=200)
a.emit("article", "first article", content="body one")
print(json.dumps({"v": [v1, v2], "conflict": conflict, "hits": len(hits.hits),
                  "value": a.memory.get("notes", "solar"), "ok": a.upstream_ok("anything")}),
      flush=True)
try:
    a.emit("article", "second article", content="body two")
except OutputDenied:
    print("denied", flush=True)  # the halt's SIGTERM may come first
import time
time.sleep(30)
"""

BASH_AGENT = r"""
set -u
watchkeeper heartbeat || exit 10
watchkeeper memory put bash greeting '"hello"' >/dev/null || exit 11
watchkeeper memory get bash greeting
watchkeeper emit post "one post"; echo "emit1=$?"
watchkeeper emit post "two posts"; echo "emit2=$?"
sleep 30
"""


def test_python_agent_uses_every_sdk_operation(tmp_path):
    """Heartbeat, memory put/merge/conflict, lock, search, emit and denial work from the SDK."""
    spec = {"jobs": [{"id": "main", "command": py(PY_AGENT), "schedule": {"every_s": 60}}],
            "memory_write": ["notes"], "limits": {"outputs": {"max_outputs": 1,
                                                              "window_s": 60}}}
    with DaemonProc(tmp_path, {"writer": spec}).start() as d:
        d.call("start-now", agent="writer")
        line = d.wait_event("agent_output", agent="writer", stream="stdout", timeout_s=20)
        out = json.loads(line["line"])
        assert out["v"] == [1, 2] and out["conflict"] == 2
        assert out["value"] == {"fact": "panels last 25 years", "source": "demo"}
        assert out["hits"] == 1 and out["ok"] is True
        d.wait_event("breaker_tripped", agent="writer")
        ev = d.wait_event("run_finished", agent="writer")
        assert ev["stop_reason"] == "breaker"
        assert d.call("breaker-status")["state"] == "open"
        assert (d.state_dir / "status" / "writer.heartbeat").exists()


def test_bash_agent_uses_the_cli(tmp_path):
    """A bash agent heartbeats, writes and reads memory, and sees exit 5 on a denied emit."""
    spec = {"jobs": [{"id": "main", "command": ["bash", "-c", BASH_AGENT],
                      "schedule": {"every_s": 60},
                      "env": {"PATH": f"{BIN}:{os.environ['PATH']}"}}],
            "limits": {"outputs": {"max_outputs": 1, "window_s": 60}}}
    with DaemonProc(tmp_path, {"bash": spec}).start() as d:
        d.call("start-now", agent="bash")
        d.wait_event("run_finished", agent="bash", timeout_s=30)
        lines = [e["line"] for e in d.find("agent_output", agent="bash", stream="stdout")]
        assert lines[:2] == ['"hello"', "emit1=0"], d.tail()
        d.wait_event("breaker_tripped", agent="bash")


def test_agent_cannot_write_another_agents_namespace(tmp_path):
    """An agent writing a namespace it was not granted is rejected; the daemon keeps going."""
    code = ("from supervisor.sdk import Agent, MemoryRejected\n"
            "a = Agent()\ntry:\n    a.memory.put('someone-else', 'k', 1)\n"
            "    print('written')\nexcept MemoryRejected as exc:\n    print('rejected', exc)")
    with DaemonProc(tmp_path, {"nosy": {"jobs": [{"id": "m", "command": py(code),
                                                  "schedule": {"every_s": 60}}]}}).start() as d:
        d.call("start-now", agent="nosy")
        ev = d.wait_event("agent_output", agent="nosy", stream="stdout", timeout_s=20)
        assert ev["line"].startswith("rejected") and "forbidden" in ev["line"]
        assert d.call("ping")["pid"] == d.proc.pid
