"""Helpers shared by the chaos, fuzz, fault, security and soak suites."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import psutil

from supervisor.kernel.lineage import read_markers

ROOT = Path(__file__).resolve().parent.parent

# Agents run with the daemon's Python from the config's directory; this makes them import
# the `supervisor` package of this checkout rather than whatever the venv points at.
AGENT_ENV = {"PYTHONPATH": str(ROOT)}

# The breaker's defaults (12 launches an hour, 30 outputs in 10 min) are for production;
# suites that run many short runs raise them unless they test the breaker itself.
ROOMY_BREAKER = {"launches": {"max_runs": 1_000_000, "window_s": 60},
                 "outputs": {"max_outputs": 1_000_000, "window_s": 60},
                 "duplicates": {"max_repeats": 1_000_000, "window_s": 60}}


def integrity(db: Path) -> str:
    """`PRAGMA integrity_check` of a SQLite file, through a connection of our own."""
    conn = sqlite3.connect(db, timeout=10)
    try:
        return "\n".join(r[0] for r in conn.execute("PRAGMA integrity_check"))
    finally:
        conn.close()


def query(db: Path, sql: str, *params) -> list[tuple]:
    conn = sqlite3.connect(db, timeout=10)
    try:
        return conn.execute(sql, params).fetchall()
    finally:
        conn.close()


def processes_for(state_dir: Path) -> list[int]:
    """Live (non-zombie) processes started for `state_dir`: they carry it in their env."""
    found = []
    for proc in psutil.process_iter(["status"]):
        if proc.info["status"] == psutil.STATUS_ZOMBIE or proc.pid == os.getpid():
            continue
        if read_markers(proc.pid).get("WATCHKEEPER_STATE_DIR") == str(state_dir):
            found.append(proc.pid)
    return found


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def kill_all(pids: list[int]) -> None:
    """Test cleanup: SIGKILL whatever is left (never by name)."""
    for pid in pids:
        try:
            os.kill(pid, 9)
        except OSError:
            pass
