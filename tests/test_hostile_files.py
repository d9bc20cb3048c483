"""Files planted in the state dir: refused with their path, never followed, never blocking
the daemon's loop."""

from __future__ import annotations

import os

import pytest
from harness import DaemonProc, py, wk
from support import wait_until
from test_hostile_config import KINDS, plant

SLEEPER = {"jobs": [{"id": "main", "command": py("import time; time.sleep(60)"),
                     "schedule": {"every_s": 3600}}]}


def pings(d: DaemonProc) -> bool:
    """The loop answers (within the client's deadline; how fast is for bench/, not here)."""
    return d.call("ping")["pid"] == d.proc.pid


def test_planted_heartbeats_and_locks_are_refused_while_ping_answers(tmp_path):
    """A FIFO, link, socket, directory or /dev/zero as an upstream heartbeat or a task lock
    is refused with its path, and the loop keeps answering ping."""
    agents = {}
    for kind in KINDS:
        agents[f"up-{kind}"] = SLEEPER
        agents[f"down-{kind}"] = {**SLEEPER, "depends_on": [f"up-{kind}"]}
    d = DaemonProc(tmp_path, agents, locks={"check_interval_s": 0.2})
    for sub in ("status", "tasks"):
        (d.state_dir / sub).mkdir(parents=True, exist_ok=True)
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    for kind in KINDS:
        plant(d.state_dir / "status" / f"up-{kind}.heartbeat", kind)
        plant(d.state_dir / "tasks" / f"planted-{kind}.lock", kind)
    (d.state_dir / "tasks" / ".breaker").symlink_to(tmp_path / "breaker-target")
    with d.start():
        for kind in KINDS:
            beat = str(d.state_dir / "status" / f"up-{kind}.heartbeat")
            lock = str(d.state_dir / "tasks" / f"planted-{kind}.lock")
            d.wait_event("heartbeat_file_refused", path=beat)
            d.wait_event("lock_file_refused", path=lock)
            assert pings(d)
        d.wait_event("lock_file_refused", path=str(d.state_dir / "tasks" / ".breaker"))
        assert not (tmp_path / "breaker-target").exists()
        assert victim.read_text() == "precious\n"


def test_daemon_lock_symlink_is_refused_and_its_target_untouched(tmp_path):
    """A daemon.lock symlink makes the start fail naming it; the target keeps its content."""
    d = DaemonProc(tmp_path, {"a": SLEEPER})
    d.state_dir.mkdir()
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    (d.state_dir / "daemon.lock").symlink_to(victim)
    result = wk("--config", str(d.config_path), "run")
    assert result.returncode != 0
    assert str(d.state_dir / "daemon.lock") in result.stderr and "symbolic link" in result.stderr
    assert "Traceback" not in result.stderr
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("kind", ["fifo", "socket", "directory", "devzero"])
def test_daemon_lock_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    """A FIFO, socket, directory or /dev/zero link as daemon.lock: the start fails at once
    naming it."""
    d = DaemonProc(tmp_path, {"a": SLEEPER})
    d.state_dir.mkdir()
    plant(d.state_dir / "daemon.lock", kind)
    result = wk("--config", str(d.config_path), "run")
    assert result.returncode != 0
    assert str(d.state_dir / "daemon.lock") in result.stderr and "refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_world_writable_state_dir_is_refused(tmp_path):
    """A world-writable state dir without the sticky bit is refused with the chmod to fix it."""
    d = DaemonProc(tmp_path, {"a": SLEEPER})
    d.state_dir.mkdir()
    os.chmod(d.state_dir, 0o777)
    result = wk("--config", str(d.config_path), "run")
    assert result.returncode != 0
    assert "world-writable" in result.stderr and "chmod" in result.stderr
    assert not (d.state_dir / "daemon.lock").exists()


def test_sticky_world_writable_state_dir_is_accepted(tmp_path):
    """The sticky bit makes a shared state dir acceptable (as /tmp is)."""
    d = DaemonProc(tmp_path, {"a": SLEEPER})
    d.state_dir.mkdir()
    os.chmod(d.state_dir, 0o1777)
    with d.start():
        assert wait_until(lambda: d.call("ping"))


def test_reload_with_each_hostile_agent_file_keeps_the_old_config(tmp_path):
    """A reload that meets a FIFO, link, /dev/zero or billion-laughs agent file, or a main
    file that is a FIFO or a link, is rejected naming it, the old agents keep running, and
    the next reload works."""
    from test_hostile_config import BILLION_LAUGHS

    d = DaemonProc(tmp_path, {"a": SLEEPER})
    with d.start():
        bad = d.agents_dir / "bad.yaml"
        for kind in ["fifo", "symlink", "devzero", "socket", "directory", "laughs"]:
            if kind == "laughs":
                bad.write_text(BILLION_LAUGHS)
            else:
                plant(bad, kind)
            client = d.client()
            try:
                reply = client.call_raw("reload", {})
            finally:
                client.close()
            assert reply["ok"] is False and str(bad) in str(reply.get("errors")), (kind, reply)
            assert [a["agent"] for a in d.call("status")["agents"]] == ["a"]
            bad.rmdir() if kind == "directory" else bad.unlink()
            assert d.call("reload") == {"agents": 1}
        saved = d.config_path.read_bytes()
        for kind in ["fifo", "symlink", "devzero"]:
            d.config_path.unlink()
            plant(d.config_path, kind)
            client = d.client()
            try:
                reply = client.call_raw("reload", {})
            finally:
                client.close()
            assert reply["ok"] is False and str(d.config_path) in str(reply.get("errors"))
            d.config_path.unlink()
            d.config_path.write_bytes(saved)
            assert d.call("reload") == {"agents": 1}


@pytest.mark.parametrize("name", ["state.db", "memory.sqlite3-wal"])
@pytest.mark.parametrize("kind", ["fifo", "symlink"])
def test_planted_database_file_is_refused_at_start(tmp_path, name, kind):
    """A FIFO or link in place of a database file makes the start fail naming it, at once
    (SQLite would have followed the link or waited on the FIFO)."""
    d = DaemonProc(tmp_path, {"a": SLEEPER})
    d.state_dir.mkdir()
    plant(d.state_dir / name, kind)
    result = wk("--config", str(d.config_path), "run")
    assert result.returncode != 0
    assert str(d.state_dir / name) in result.stderr and "refused" in result.stderr
    assert "Traceback" not in result.stderr


def test_tasks_dir_symlink_is_refused_at_start(tmp_path):
    """A `tasks` link makes the start fail naming it: the stale-lock check never works on
    the directory it points to."""
    d = DaemonProc(tmp_path, {"a": SLEEPER})
    d.state_dir.mkdir()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "x.lock").write_text("not a lock of ours")
    (d.state_dir / "tasks").symlink_to(elsewhere)
    result = wk("--config", str(d.config_path), "run")
    assert result.returncode != 0 and str(d.state_dir / "tasks") in result.stderr
    assert (elsewhere / "x.lock").exists()
