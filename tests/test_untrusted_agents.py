"""Agents are untrusted: from inside any run (its process, or a grandchild that left its
tree) no admin verb is accepted and no other agent's identity can be taken."""

from __future__ import annotations

from harness import DaemonProc
from hostile import AGENT_ENV, ROOMY_BREAKER
from untrusted import ADMIN_VERBS, probe_job, report_of

SLEEPER = {"jobs": [{"id": "main", "command": ["sleep", "60"], "schedule": {"every_s": 3600}}]}

TRY_EVERY_VERB = f"""
verbs = {ADMIN_VERBS!r}
report("direct", [call(cmd, args) for cmd, args in verbs])
detached(lambda: report("grandchild", [call(cmd, args) for cmd, args in verbs]))
idle()
"""


def _refused_inside_a_run(replies: list) -> None:
    assert len(replies) == len(ADMIN_VERBS)
    for (cmd, _), reply in zip(ADMIN_VERBS, replies, strict=True):
        assert reply["ok"] is False, (cmd, reply)
        assert "permission denied" in reply["error"], (cmd, reply)
        assert "inside a run" in reply["error"], (cmd, reply)


def test_every_admin_verb_is_refused_from_a_run_and_its_reparented_grandchild(tmp_path):
    """A run of the daemon's own uid, and its setsid+double-forked grandchild re-parented
    to the daemon, are refused every admin verb, and nothing they asked for happens."""
    agents = {"alpha": {"jobs": [probe_job(TRY_EVERY_VERB)]}, "beta": SLEEPER}
    with DaemonProc(tmp_path, agents, breaker=ROOMY_BREAKER).start(extra_env=AGENT_ENV) as d:
        d.call("start-now", agent="alpha")
        _refused_inside_a_run(report_of(d, "alpha", "direct"))
        _refused_inside_a_run(report_of(d, "alpha", "grandchild"))
        status = d.call("status")
        beta = next(a for a in status["agents"] if a["agent"] == "beta")
        assert beta["paused"] is False and beta["run_id"] is None
        assert status["daemon"]["state"] == "running"
        assert not d.find("reload_applied") and not d.find("memory_reverted")
        assert len(d.find("control_denied")) == 2 * len(ADMIN_VERBS)


TRIP_THEN_RESET = """
emits = [call("emit", {"kind": "post", "summary": f"post {i}"}) for i in range(4)]
report("emits", [e["ok"] for e in emits])
report("reset", call("breaker-reset", {"reason": "I am fine"}))
detached(lambda: report("grandchild_reset", call("breaker-reset", {"reason": "me too"})))
idle()
"""


def test_a_tripped_breaker_cannot_be_reset_from_inside_any_run(tmp_path):
    """An agent that trips the breaker and ignores SIGTERM cannot reset it, neither itself
    nor through a re-parented grandchild; the breaker stays open for the operator."""
    breaker = {**ROOMY_BREAKER, "outputs": {"max_outputs": 2, "window_s": 600}}
    agents = {"alpha": {"jobs": [probe_job(TRIP_THEN_RESET)]}}
    with DaemonProc(tmp_path, agents, breaker=breaker).start(extra_env=AGENT_ENV) as d:
        d.call("start-now", agent="alpha")
        assert report_of(d, "alpha", "emits")[:2] == [True, True]
        assert report_of(d, "alpha", "emits")[2] is False  # the third trips it
        for tag in ("reset", "grandchild_reset"):
            reply = report_of(d, "alpha", tag)
            assert reply["ok"] is False and "inside a run" in reply["error"], reply
        assert d.call("breaker-status")["state"] != "closed"
        assert d.call("breaker-reset", reason="operator checked")["was_open"] is True


GRANTED = """
report("start", call("start-now", {"agent": "beta"}))
report("pause", call("pause", {"agent": "beta"}))
idle()
"""


def test_a_granted_permission_allows_that_verb_only(tmp_path):
    """An agent granted `permissions: [start-now]` may start another agent from its run,
    and is still refused every verb it was not granted."""
    agents = {"alpha": {"jobs": [probe_job(GRANTED)], "permissions": ["start-now"]},
              "beta": SLEEPER}
    with DaemonProc(tmp_path, agents, breaker=ROOMY_BREAKER).start(extra_env=AGENT_ENV) as d:
        d.call("start-now", agent="alpha")
        assert report_of(d, "alpha", "start")["ok"] is True
        d.wait_event("run_started", agent="beta")
        pause = report_of(d, "alpha", "pause")
        assert pause["ok"] is False and "permissions: [pause]" in pause["error"], pause


STEAL_BETAS_IDENTITY = """
beta = next(a for a in call("status")["result"]["agents"] if a["agent"] == "beta")
env = dict(item.split("=", 1) for item in
           open(f"/proc/{beta['pid']}/environ").read().split("\\0") if "=" in item)
forged = {"run_id": env["WATCHKEEPER_RUN_ID"], "token": env["WATCHKEEPER_RUN_TOKEN"]}
as_beta = [("heartbeat", {}), ("emit", {"kind": "post", "summary": "forged-by-alpha"}),
           ("lock", {"task": "betas-task"}), ("usage", {"tokens": 5, "cost": 1.0}),
           ("memory", {"op": "put", "namespace": "beta", "key": "k", "value": 1})]
report("direct", [call(cmd, args, **forged) for cmd, args in as_beta])
# The grandchild carries beta's identity in its own environment, as if beta had started it.
detached(lambda: reexec(
    f"report('grandchild', [call(cmd, args) for cmd, args in {as_beta!r}])",
    WATCHKEEPER_AGENT="beta", WATCHKEEPER_RUN_ID=forged["run_id"],
    WATCHKEEPER_RUN_TOKEN=forged["token"]))
idle()
"""


def test_a_reparented_grandchild_cannot_act_as_another_agent(tmp_path):
    """Holding beta's run id and token (read from /proc, same uid), neither alpha's run nor
    its grandchild re-parented to the daemon with beta's identity in its environment can
    heartbeat, emit, lock, spend or write memory as beta."""
    agents = {"alpha": {"jobs": [probe_job(STEAL_BETAS_IDENTITY)]}, "beta": SLEEPER}
    with DaemonProc(tmp_path, agents, breaker=ROOMY_BREAKER).start(extra_env=AGENT_ENV) as d:
        d.call("start-now", agent="beta")
        d.wait_event("run_started", agent="beta")
        d.call("start-now", agent="alpha")
        for tag in ("direct", "grandchild"):
            replies = report_of(d, "alpha", tag)
            assert [r["ok"] for r in replies] == [False] * 5, (tag, replies)
            assert all("not part of run" in r["error"] for r in replies), (tag, replies)
        assert d.call("outputs", agent="beta") == []
        assert not (d.state_dir / "tasks" / "betas-task.lock").exists()
        assert d.call("memory-get", namespace="beta", key="k") is None
