"""A real watchkeeper daemon in a child process, for the benchmarks that go through its socket.

Its log goes to a file (a pipe nobody reads would stall the daemon once full); `events()` reads
it back as dicts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from supervisor.control.client import ControlClient  # noqa: E402
from supervisor.errors import DaemonNotRunning  # noqa: E402


class LiveDaemon:
    def __init__(self, root: Path, agents: dict[str, dict], **settings) -> None:
        self.root = Path(root)
        self.state_dir = self.root / "state"
        self.log_path = self.root / "daemon.log"
        self.settings = {"state_dir": str(self.state_dir), "stop_grace_s": 2, "tick_s": 0.2,
                         **settings}
        self.agents = agents
        self.proc: subprocess.Popen | None = None

    @property
    def socket_path(self) -> Path:
        return self.state_dir / "control.sock"

    def start(self, timeout_s: float = 20.0) -> LiveDaemon:
        (self.root / "agents.d").mkdir(parents=True, exist_ok=True)
        config = self.root / "watchkeeper.yaml"
        config.write_text(yaml.safe_dump(self.settings))
        for name, spec in self.agents.items():
            (self.root / "agents.d" / f"{name}.yaml").write_text(yaml.safe_dump(spec))
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        env.pop("NOTIFY_SOCKET", None)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "supervisor.cli", "--config", str(config), "run",
                 "--log-format", "json"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self.call("ping")
                return self
            except (DaemonNotRunning, OSError):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"daemon did not start; see {self.log_path}") from None
                time.sleep(0.02)

    def call(self, cmd: str, **args):
        client = ControlClient(self.socket_path, timeout_s=30)
        client.run_id = client.token = None
        try:
            return client.call(cmd, **args)
        finally:
            client.close()

    def events(self, name: str) -> list[dict]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == name:
                found.append(event)
        return found

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> LiveDaemon:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.005):
    """Poll `condition` until truthy; raise naming `what` when the deadline passes."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(interval_s)
