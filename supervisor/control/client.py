"""The client side of the control socket, used by the CLI and the agent SDK."""

from __future__ import annotations

# _socket, not socket: the socket module builds its enums at import (~2 ms per agent call).
import _socket
import json
import os

from ..errors import ControlError, DaemonNotRunning

# Not imported from .protocol, which loads msgspec: every agent imports this module.
MAX_REPLY_BYTES = 16 << 20


class ControlClient:
    def __init__(self, socket_path: str | os.PathLike, timeout_s: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self._sock: _socket.socket | None = None
        self._buffer = b""
        self._next_id = 0
        self.run_id = os.environ.get("WATCHKEEPER_RUN_ID")
        self.token = os.environ.get("WATCHKEEPER_RUN_TOKEN")

    def _connect(self) -> _socket.socket:
        if self._sock is None:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            sock.settimeout(self.timeout_s)
            try:
                sock.connect(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError) as exc:
                sock.close()
                raise DaemonNotRunning(
                    f"watchkeeper is not running (no daemon at {self.socket_path}: "
                    f"{exc.strerror}); start it with `watchkeeper run` or "
                    "`systemctl start watchkeeper`") from None
            self._sock = sock
        return self._sock

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def call(self, cmd: str, **args):
        """Send one request and return its result; raise ControlError on an error reply."""
        reply = self.call_raw(cmd, args)
        if not reply.get("ok"):
            err = ControlError(reply.get("error", "unknown error"))
            err.reply = reply
            raise err
        return reply.get("result")

    def call_raw(self, cmd: str, args: dict) -> dict:
        sock = self._connect()
        self._next_id += 1
        request = {"id": self._next_id, "cmd": cmd, "args": args}
        if self.run_id and self.token:
            request["run_id"], request["token"] = self.run_id, self.token
        try:
            sock.sendall(json.dumps(request).encode() + b"\n")
            return json.loads(self._read_line())
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.close()
            raise DaemonNotRunning(f"the daemon closed the connection: {exc}") from None

    def _read_line(self) -> bytes:
        while b"\n" not in self._buffer:
            chunk = self._sock.recv(65536)
            if not chunk:
                self.close()
                raise DaemonNotRunning("the daemon closed the connection")
            self._buffer += chunk
            if len(self._buffer) > MAX_REPLY_BYTES:
                raise ControlError("reply too large")
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line
