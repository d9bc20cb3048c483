"""Degradation passes down the pipeline with its chain, and a clean start warns of nothing."""

from __future__ import annotations

import time

from harness import DaemonProc, py

from supervisor.health.heartbeat import write_heartbeat

SAY = ("import os\nprint('degraded=' + os.environ.get('WATCHKEEPER_DEGRADED', '0') + "
       "' upstreams=' + os.environ.get('WATCHKEEPER_DEGRADED_UPSTREAMS', ''), flush=True)\n")


def agent(*depends_on: str, command: str = SAY, **extra) -> dict:
    return {"depends_on": list(depends_on), **extra,
            "jobs": [{"id": "m", "command": py(command), "schedule": {"every_s": 3600}}]}


def test_downstream_of_a_degraded_agent_is_told_the_chain(tmp_path):
    """seo, downstream of content whose upstream research is stale, runs with
    WATCHKEEPER_DEGRADED_UPSTREAMS=content<-research and status says why."""
    agents = {"research": agent(heartbeat={"interval_s": 1, "stale_multiple": 1}),
              "content": agent("research"), "seo": agent("content")}
    d = DaemonProc(tmp_path, agents)
    write_heartbeat(d.state_dir, "research", ts=time.time() - 3600)
    write_heartbeat(d.state_dir, "content")
    with d.start():
        d.wait_event("agent_degraded", agent="seo")
        d.call("start-now", agent="seo")
        out = d.wait_event("agent_output", agent="seo", timeout_s=15)
        status = {a["agent"]: a for a in d.call("status")["agents"]}
    assert out["line"] == "degraded=1 upstreams=content<-research"
    assert status["seo"]["degraded"] == ["content<-research"]
    assert status["seo"]["degraded_reason"] == "upstream content: degraded by research"
    assert status["content"]["degraded"] == ["research"]


def test_upstream_ok_names_the_head_of_a_chain(tmp_path):
    """An agent told content<-research finds `upstream-ok content` false."""
    check = ("from supervisor.sdk import Agent\n"
             "print('content ok' if Agent().upstream_ok('content') else 'content down', "
             "flush=True)\n")
    agents = {"research": agent(heartbeat={"interval_s": 1, "stale_multiple": 1}),
              "content": agent("research"), "seo": agent("content", command=check)}
    d = DaemonProc(tmp_path, agents)
    write_heartbeat(d.state_dir, "research", ts=time.time() - 3600)
    write_heartbeat(d.state_dir, "content")
    with d.start():
        d.wait_event("agent_degraded", agent="seo")
        d.call("start-now", agent="seo")
        assert d.wait_event("agent_output", agent="seo", timeout_s=15)["line"] == "content down"


def test_clean_start_logs_no_warning(tmp_path):
    """A fresh pipeline whose upstream has not beaten yet starts and runs its downstream
    without a single warning, and the downstream is not degraded."""
    agents = {"research": agent(), "content": agent("research")}
    with DaemonProc(tmp_path, agents).start() as d:
        d.call("start-now", agent="content")
        out = d.wait_event("agent_output", agent="content", timeout_s=15)
        d.wait_event("run_finished", agent="content", timeout_s=15)
        warnings = [e for e in d.events if e.get("level") in ("warning", "error", "critical")]
    assert out["line"] == "degraded=0 upstreams="
    # Agents sharing the daemon's uid is a real security statement (docs/security.md), said
    # once at start; nothing else may warn.
    assert [e["event"] for e in warnings if e["event"] != "agents_not_isolated"] == []
    assert [e["event"] for e in warnings].count("agents_not_isolated") <= 1
