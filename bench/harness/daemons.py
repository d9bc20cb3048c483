"""The two supervisors under test, behind one small interface: write a configuration for a
set of programs, start in the foreground, stop with SIGTERM.

Both run on their documented defaults except for what the comparison needs to be fair:
a 3 s stop grace (watchkeeper `stop_grace_s: 3`, supervisord `stopwaitsecs=3`) and
signals to the whole process group (supervisord `stopasgroup`/`killasgroup`; watchkeeper
does this by default). supervisord keeps its control socket, as watchkeeper always has one.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .procs import TAG, TAG_ENV

STOP_GRACE_S = 3


@dataclass(frozen=True)
class Program:
    name: str
    argv: list[str]


class Daemon:
    """One daemon in a directory of its own; subclasses write the config and the argv."""

    label = ""

    def __init__(self, root: Path, venv_python: Path) -> None:
        self.root = root
        self.bin_dir = venv_python.parent
        self.proc: subprocess.Popen | None = None
        self.log_path = root / "daemon.log"
        self.started_mono = 0.0

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> float:
        """Start the daemon in a session of its own (a Ctrl+C in the terminal reaches only
        the harness, which then cleans up); return the monotonic start time."""
        env = dict(os.environ)
        env[TAG_ENV] = TAG
        env.pop("NOTIFY_SOCKET", None)
        log = open(self.log_path, "ab")
        self.started_mono = time.monotonic()
        self.proc = subprocess.Popen(self.argv(), cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        return self.started_mono

    def terminate(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    def log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Watchkeeper(Daemon):
    label = "watchkeeper"

    def configure(self, programs: list[Program], jobs: list[dict] | None = None) -> None:
        """`programs` become `always` agents; `jobs` are extra agents given as
        {"name": ..., "job": {...}} (used for the scheduling workload)."""
        agents_dir = self.root / "agents.d"
        agents_dir.mkdir(parents=True, exist_ok=True)
        # JSON is YAML: the harness needs no YAML library of its own.
        main = {"state_dir": "./state", "agents_dir": "agents.d",
                "stop_grace_s": STOP_GRACE_S}
        (self.root / "main.yaml").write_text(json.dumps(main, indent=2) + "\n")
        for prog in programs:
            agent = {"jobs": [{"id": "main", "command": prog.argv,
                               "schedule": {"always": True}}]}
            (agents_dir / f"{prog.name}.yaml").write_text(json.dumps(agent, indent=2) + "\n")
        for extra in jobs or []:
            (agents_dir / f"{extra['name']}.yaml").write_text(
                json.dumps({"jobs": [extra["job"]]}, indent=2) + "\n")

    def argv(self) -> list[str]:
        return [str(self.bin_dir / "watchkeeper"), "--config", str(self.root / "main.yaml"),
                "run", "--log-format", "json"]

    def status(self, timeout_s: float = 30) -> dict:
        out = subprocess.run([str(self.bin_dir / "watchkeeper"), "--config",
                              str(self.root / "main.yaml"), "--json", "status"],
                             capture_output=True, text=True, timeout=timeout_s, check=True)
        return json.loads(out.stdout)

    def ready(self) -> bool:
        """The daemon logged that it is running (its control socket is open)."""
        try:
            with open(self.log_path, "rb") as f:
                return any(b'"daemon_state"' in line and b'"new": "running"' in line
                           for line in f)
        except OSError:
            return False


class Supervisord(Daemon):
    label = "supervisord"

    def configure(self, programs: list[Program]) -> None:
        here = self.root
        lines = [
            "[unix_http_server]", f"file={here}/supervisor.sock", "",
            "[supervisord]", "nodaemon=true", f"logfile={here}/supervisord.log",
            f"pidfile={here}/supervisord.pid", f"childlogdir={here}",
            # As root, supervisord wants to be told that it is meant to stay root.
            *(["user=root"] if os.geteuid() == 0 else []), "",
            "[rpcinterface:supervisor]",
            "supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface",
            "", "[supervisorctl]", f"serverurl=unix://{here}/supervisor.sock", "",
        ]
        for prog in programs:
            lines += [f"[program:{prog.name}]", "command=" + shlex.join(prog.argv),
                      "autorestart=true", f"stopwaitsecs={STOP_GRACE_S}",
                      "stopasgroup=true", "killasgroup=true", ""]
        (here / "supervisord.conf").write_text("\n".join(lines))

    def argv(self) -> list[str]:
        return [str(self.bin_dir / "supervisord"), "-n", "-c", str(self.root / "supervisord.conf")]
