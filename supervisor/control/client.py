"""The client side of the control socket, used by the CLI and the agent SDK."""

from __future__ import annotations

# _socket, not socket: the socket module builds its enums at import (~2 ms per agent call).
import _socket
import os
import select

from .. import wire
from ..errors import ControlError, DaemonNotRunning

# Not imported from .protocol, which loads msgspec: every agent imports this module.
# Replies are not capped by the daemon (a namespace is as large as its writers made it);
# this only bounds what a client will buffer.
MAX_REPLY_BYTES = 1 << 30


class ControlClient:
    # os.PathLike, not pathlib.Path: pathlib's import (urllib.parse, fnmatch, re) cost every
    # agent CLI call a few ms, and typing's would cost as much.
    def __init__(self, socket_path: str | os.PathLike[str], timeout_s: float = 30.0) -> None:
        self.socket_path = str(socket_path)
        self.timeout_s = timeout_s
        self._sock: _socket.socket | None = None
        self._buffer = b""
        self._next_id = 0
        self.run_id = os.environ.get("WATCHKEEPER_RUN_ID")
        self.token = os.environ.get("WATCHKEEPER_RUN_TOKEN")

    def _connect(self) -> _socket.socket:
        if self._sock is not None and self._closed_by_daemon():
            self.close()  # e.g. the idle timeout: nothing was sent on it, so connect anew
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

    def _closed_by_daemon(self) -> bool:
        # select first: with a timeout set, recv() would wait for data even with MSG_DONTWAIT.
        if not select.select([self._sock], [], [], 0)[0]:
            return False
        try:
            return self._sock.recv(1, _socket.MSG_PEEK) == b""
        except OSError:
            return True

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
            # Compact UTF-8: the same request in fewer bytes of the 1 MiB frame.
            sock.sendall(wire.dumps(request, compact=True).encode() + b"\n")
            return wire.loads(self._read_line())
        except (BrokenPipeError, ConnectionResetError) as exc:
            self.close()
            raise DaemonNotRunning(f"the daemon closed the connection: {exc}") from None

    def _read_line(self) -> bytes:
        # Chunks gathered in a list: `bytes += chunk` copied a 10 MB reply ~160 times.
        if b"\n" in self._buffer:
            line, _, self._buffer = self._buffer.partition(b"\n")
            return line
        chunks, size = [self._buffer], len(self._buffer)
        while True:
            chunk = self._sock.recv(1 << 20)
            if not chunk:
                self.close()
                raise DaemonNotRunning("the daemon closed the connection")
            chunks.append(chunk)
            size += len(chunk)
            if b"\n" in chunk:
                break
            if size > MAX_REPLY_BYTES:
                raise ControlError("reply too large")
        line, _, self._buffer = b"".join(chunks).partition(b"\n")
        return line
