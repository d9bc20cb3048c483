"""A real watchkeeper daemon in a child process, with its JSON log events readable by tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import yaml
from support import wait_until

from supervisor.control.client import ControlClient

PY = sys.executable


def py(code: str) -> list[str]:
    """argv running `code` with the daemon's Python."""
    return ["{python}", "-c", code]


class DaemonProc:
    def __init__(self, root: Path, agents: dict[str, dict], **settings) -> None:
        self.root = Path(root)
        self.config_path = self.root / "watchkeeper.yaml"
        self.agents_dir = self.root / "agents.d"
        self.state_dir = self.root / "state"
        self.settings = {"state_dir": str(self.state_dir), "stop_grace_s": 2, "tick_s": 0.2,
                         **settings}
        self.agents = agents
        self.proc: subprocess.Popen | None = None
        self.events: list[dict] = []
        self.raw_lines: list[str] = []
        self._cond = threading.Condition()
        self.write_config()

    # -- config -------------------------------------------------------------------------------
    def write_config(self) -> None:
        self.agents_dir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.settings))
        for existing in self.agents_dir.glob("*.yaml"):
            if existing.stem not in self.agents:
                existing.unlink()
        for name, spec in self.agents.items():
            (self.agents_dir / f"{name}.yaml").write_text(yaml.safe_dump(spec))

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "control.sock"

    # -- process ------------------------------------------------------------------------------
    def start(self, wait_ready: bool = True, extra_env: dict | None = None,
              notify_socket: Path | None = None) -> DaemonProc:
        """Start the daemon; it gets NOTIFY_SOCKET only when `notify_socket` is given."""
        env = {**os.environ, **(extra_env or {})}
        env.pop("NOTIFY_SOCKET", None)
        if notify_socket is not None:
            env["NOTIFY_SOCKET"] = str(notify_socket)
        self.proc = subprocess.Popen(
            [PY, "-m", "supervisor.cli", "--config", str(self.config_path), "run",
             "--log-format", "json"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            env=env)
        threading.Thread(target=self._read_log, args=(self.proc,), daemon=True).start()
        if wait_ready:
            self.wait_event("daemon_state", new="running", timeout_s=15)
        return self

    def _read_log(self, proc: subprocess.Popen) -> None:
        for raw in proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            try:
                event = json.loads(line)
            except ValueError:
                event = {"event": "_raw", "line": line}
            with self._cond:
                self.raw_lines.append(line)
                self.events.append(event)
                self._cond.notify_all()

    def find(self, event: str, **match) -> list[dict]:
        with self._cond:
            return [e for e in self.events if e.get("event") == event
                    and all(e.get(k) == v for k, v in match.items())]

    def wait_event(self, event: str, timeout_s: float = 10.0, count: int = 1, **match) -> dict:
        found = wait_until(lambda: len(self.find(event, **match)) >= count, timeout_s,
                           message=f"{count}x {event} {match}; last events: {self.tail()}")
        return self.find(event, **match)[count - 1] if found else {}

    def tail(self, n: int = 15) -> list[str]:
        with self._cond:
            return self.raw_lines[-n:]

    def client(self) -> ControlClient:
        client = ControlClient(self.socket_path, timeout_s=10)
        client.run_id = client.token = None
        return client

    def call(self, cmd: str, **args):
        client = self.client()
        try:
            return client.call(cmd, **args)
        finally:
            client.close()

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout_s: float = 20.0) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        finally:
            self._kill_leftovers()

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()

    def _kill_leftovers(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def __enter__(self) -> DaemonProc:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def wk(*argv: str, env: dict | None = None, timeout_s: float = 30) -> subprocess.CompletedProcess:
    """Run the `watchkeeper` CLI as a real process."""
    return subprocess.run([PY, "-m", "supervisor.cli", *argv], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout_s)
