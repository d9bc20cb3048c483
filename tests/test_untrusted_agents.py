"""Agents are untrusted: from inside any run (its process, or a grandchild that left its
tree) no admin verb is accepted and no other agent's identity can be taken."""

from __future__ import annotations

import os

import pytest
import yaml
from harness import DaemonProc
from hostile import AGENT_ENV, ROOMY_BREAKER
from support import require
from untrusted import ADMIN_VERBS, probe_job, report_of

from supervisor.config.load import load_config
from supervisor.errors import ConfigError

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


def _in_child(fn) -> str:
    """fn() in a forked process (free to change its credentials); its string result."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write, str(fn()).encode())
        finally:
            os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answer = f.read()
    os.waitpid(pid, 0)
    return answer


def test_peer_groups_come_from_the_socket_not_from_proc():
    """SO_PEERGROUPS gives the peer's supplementary groups without reading /proc (which
    ProtectProc=invisible hides for other uids)."""
    require(os.geteuid() == 0, "needs root to set supplementary groups")
    import socket

    from supervisor.kernel.peers import peer_groups

    def groups_seen_by_the_socket():
        os.setgroups([4242, 4343])
        ours, theirs = socket.socketpair(socket.AF_UNIX)
        return sorted(peer_groups(ours, -1))  # pid -1 has no /proc entry: only the socket

    assert _in_child(groups_seen_by_the_socket) == "[4242, 4343]"


def _write_config(tmp_path, agents: dict[str, dict], **settings) -> None:
    (tmp_path / "agents.d").mkdir()
    (tmp_path / "watchkeeper.yaml").write_text(
        yaml.safe_dump({"state_dir": str(tmp_path / "state"), **settings}))
    for name, spec in agents.items():
        (tmp_path / "agents.d" / f"{name}.yaml").write_text(yaml.safe_dump(spec))


JOB = {"id": "main", "command": ["true"], "schedule": {"every_s": 60}}


@pytest.mark.parametrize(("agents", "settings", "expected"), [
    ({"watchkeeper-admin": {"jobs": [JOB]}}, {}, "agent: 'watchkeeper-admin' is reserved"),
    ({"watchkeeperbot": {"jobs": [JOB]}}, {}, "agent: 'watchkeeperbot' is reserved"),
    ({"a": {"jobs": [JOB], "user": "root"}}, {}, "user: 'root' is root"),
    ({"a": {"jobs": [JOB], "user": "no-such-user-x"}}, {}, "no such user 'no-such-user-x'"),
    ({"a": {"jobs": [JOB]}}, {"agent_user": "no-such-user-x"}, "agent_user: no such user"),
    ({"a": {"jobs": [JOB]}}, {"agent_uid_range": [0, 10]},
     "agent_uid_range[0]: 0 is out of range (valid: >= 1, <= 2147483646)"),
    ({"a": {"jobs": [JOB]}}, {"agent_uid_range": [80000, 70000]},
     "agent_uid_range: [80000, 70000] must be [first, last] with 0 < first <= last"),
    ({"a": {"jobs": [JOB]}, "b": {"jobs": [JOB]}}, {"agent_uid_range": [70000, 70000]},
     "agent_uid_range: [70000, 70000] has fewer uids than the 2 agents need"),
    ({"a": {"jobs": [JOB], "permissions": ["breaker-rest"]}}, {},
     "permissions[0]: Invalid enum value 'breaker-rest' (valid: start-now, pause"),
])
def test_unsafe_agent_identities_are_config_errors(tmp_path, agents, settings, expected):
    """A reserved agent name, a root or unknown agent user, an unusable uid range and an
    unknown permission are configuration errors naming the file, the field and what is
    valid."""
    _write_config(tmp_path, agents, **settings)
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "watchkeeper.yaml")
    assert expected in str(caught.value), str(caught.value)


def test_a_socket_group_the_daemons_user_is_not_in_is_a_clear_error():
    """socket_group naming a group the daemon's (non-root) user is not in says so and how to
    fix it, instead of a PermissionError when the socket is created."""
    require(os.geteuid() == 0, "needs root to switch to an unprivileged uid")
    from supervisor.storage.state_modes import socket_group_problem

    def as_nobody():  # a real process of another uid, asking the real group database
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        return socket_group_problem("root")

    answer = _in_child(as_nobody)
    assert "is not a member of 'root'" in answer and "usermod -aG root" in answer, answer
    assert "no such group 'no-such-group-x'" in socket_group_problem("no-such-group-x")


def test_a_daemon_whose_agents_share_its_uid_says_once_they_are_not_isolated(tmp_path):
    """Agents without a user of their own make the daemon warn at start, once (not again at
    each reload), that they run as its own user."""
    with DaemonProc(tmp_path, {"beta": SLEEPER}).start(extra_env=AGENT_ENV) as d:
        warning = d.wait_event("agents_not_isolated")
        assert "run as the daemon's own user" in warning["reason"]
        assert d.call("reload")["agents"] == 1
        d.wait_event("reload_applied")
        assert len(d.find("agents_not_isolated")) == 1
