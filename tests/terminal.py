"""A real terminal for tests: a private tmux server with one 80x24 window."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from support import require, wait_until


class Terminal:
    """One tmux window running `argv`; read the screen, send keys."""

    def __init__(self, tmp_path: Path, argv: list[str], env: dict[str, str],
                 columns: int = 80, rows: int = 24) -> None:
        require(shutil.which("tmux") is not None, "tmux is not installed (apt-get install tmux)")
        self.socket = str(tmp_path / "tmux.sock")
        command = " ".join(shlex.quote(a) for a in
                           ["env", *(f"{k}={v}" for k, v in env.items()), *argv])
        self._tmux("-f", "/dev/null", "new-session", "-d", "-x", str(columns), "-y", str(rows),
                   "-s", "t", command)
        self._tmux("set-option", "-t", "t", "remain-on-exit", "on")

    def _tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], capture_output=True,
                              text=True, check=True, timeout=10).stdout

    def screen(self) -> str:
        return self._tmux("capture-pane", "-p", "-t", "t")

    def lines(self) -> list[str]:
        return self.screen().splitlines()

    def wait_for(self, text: str, timeout_s: float = 20) -> str:
        return wait_until(lambda: (lambda s: s if text in s else None)(self.screen()),
                          timeout_s, message=f"{text!r} on the screen")

    def send(self, *keys: str) -> None:
        self._tmux("send-keys", "-t", "t", *keys)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True,
                       timeout=10)
