"""The control socket server, driven by the daemon's selector (no thread of its own).

Bad input never costs more than an error reply: a malformed frame gets an error and the
connection stays; an oversized frame gets an error and the connection is closed (its
remaining bytes cannot be framed); a slow reader whose replies pile up is dropped.
"""

from __future__ import annotations

import dataclasses
import grp
import os
import selectors
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from .admission import Admission
from .protocol import MAX_FRAME_BYTES, ProtocolError, Request, decode_request, error

log = structlog.get_logger("watchkeeper.control")

MAX_PENDING_OUT_BYTES = 8 * MAX_FRAME_BYTES


@dataclasses.dataclass(frozen=True)
class Peer:
    pid: int
    uid: int
    gid: int


class Connection:
    __slots__ = ("sock", "peer", "inbuf", "outbuf", "closed", "server", "verified_run",
                 "last_active")

    def __init__(self, sock: socket.socket, peer: Peer, server: ControlServer) -> None:
        self.sock = sock
        self.peer = peer
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.closed = False
        self.server = server
        self.verified_run: str | None = None  # the run this peer was proved to belong to
        self.last_active = time.monotonic()  # last byte received, for the idle timeout

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if len(self.outbuf) > MAX_PENDING_OUT_BYTES:
            # Replies pile up unread: a slow reader. One big reply alone (a 10 MB `memory
            # list`) is never the reason: it was cut off when this was checked after it.
            log.warning("control_slow_reader_dropped", peer_pid=self.peer.pid)
            self.server._drop(self)
            return
        self.outbuf += data
        self.server.flush(self)


Dispatch = Callable[[Connection, Request], bytes | None]


class ControlServer:
    def __init__(self, path: Path, selector: selectors.BaseSelector, dispatch: Dispatch,
                 group: str | None = None, is_run_peer: Callable[[int], bool] | None = None,
                 idle_timeout_s: float | None = None) -> None:
        self.path = Path(path)
        self.selector = selector
        self.dispatch = dispatch
        self.group = group
        self.sock: socket.socket | None = None
        self.connections: set[Connection] = set()
        self.admission = Admission(is_run_peer)
        self.idle_timeout_s = idle_timeout_s
        self._refusals_unlogged = 0
        self._refusal_logged_at = float("-inf")

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.path.unlink()  # a stale socket of a dead daemon (the state-dir lock is ours)
        except FileNotFoundError:
            pass
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old_umask = os.umask(0o117)  # born 0660: never a window where others could connect
        try:
            sock.bind(str(self.path))
        finally:
            os.umask(old_umask)
        os.chmod(self.path, 0o660)
        if self.group:
            os.chown(self.path, -1, grp.getgrnam(self.group).gr_gid)
        sock.listen(64)
        sock.setblocking(False)
        self.sock = sock
        self.selector.register(sock, selectors.EVENT_READ, self._accept)

    def close(self) -> None:
        for conn in list(self.connections):
            self._drop(conn)
        if self.sock is not None:
            self.selector.unregister(self.sock)
            self.sock.close()
            self.sock = None
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def _accept(self, _mask: int) -> None:
        while True:
            try:
                sock, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            sock.setblocking(False)
            pid, uid, gid = struct.unpack("3i", sock.getsockopt(
                socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
            refusal = self.admission.refusal(pid)
            if refusal is not None:
                self._refuse(sock, pid, refusal)
                continue
            conn = Connection(sock, Peer(pid, uid, gid), self)
            self.connections.add(conn)
            self.admission.admitted(pid)
            self.selector.register(sock, selectors.EVENT_READ,
                                   lambda mask, c=conn: self._on_event(c, mask))

    def _refuse(self, sock: socket.socket, pid: int, reason: str) -> None:
        try:
            sock.send(error(None, f"connection refused: {reason}"))
        except OSError:
            pass
        sock.close()
        # At most one line a second: a flood of connections must not become a flood of logs.
        self._refusals_unlogged += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= 1.0:
            log.warning("control_connection_refused", reason=reason, peer_pid=pid,
                        refused=self._refusals_unlogged)
            self._refusal_logged_at, self._refusals_unlogged = now, 0

    def close_idle(self, now_mono: float) -> None:
        """Close connections silent for the idle timeout; a run's connection is kept (an
        agent's SDK holds one for its whole run)."""
        if not self.idle_timeout_s:
            return
        for conn in list(self.connections):
            if conn.verified_run is None and not conn.outbuf and \
                    now_mono - conn.last_active > self.idle_timeout_s:
                log.info("control_idle_closed", peer_pid=conn.peer.pid,
                         idle_s=round(now_mono - conn.last_active, 1))
                self._drop(conn)

    def _on_event(self, conn: Connection, mask: int) -> None:
        if mask & selectors.EVENT_WRITE:
            self.flush(conn)
        if mask & selectors.EVENT_READ and not conn.closed:
            self._read(conn)

    def _read(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop(conn)
            return
        conn.inbuf += data
        conn.last_active = time.monotonic()
        while not conn.closed:
            nl = conn.inbuf.find(b"\n")
            if nl < 0:
                if len(conn.inbuf) > MAX_FRAME_BYTES:
                    conn.send(error(None, f"frame too large (max {MAX_FRAME_BYTES} bytes)"))
                    log.warning("control_frame_too_large", peer_pid=conn.peer.pid)
                    self._drop(conn)
                return
            frame = bytes(conn.inbuf[:nl])
            del conn.inbuf[:nl + 1]
            if len(frame) > MAX_FRAME_BYTES:
                conn.send(error(None, f"frame too large (max {MAX_FRAME_BYTES} bytes)"))
                continue
            if frame.strip():
                self._handle(conn, frame)

    def _handle(self, conn: Connection, frame: bytes) -> None:
        try:
            request = decode_request(frame)
        except ProtocolError as exc:
            conn.send(error(None, str(exc)))
            return
        try:
            reply = self.dispatch(conn, request)
        except Exception as exc:  # noqa: BLE001 - a handler bug must not kill the daemon
            log.exception("control_handler_crashed", cmd=request.cmd)
            reply = error(request.id, f"internal error: {type(exc).__name__}: {exc}")
        if reply is not None:
            conn.send(reply)

    def flush(self, conn: Connection) -> None:
        if conn.closed:
            return
        try:
            while conn.outbuf:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
        except (BlockingIOError, InterruptedError):
            pass
        except OSError:
            self._drop(conn)
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        try:
            self.selector.modify(conn.sock, events, self.selector.get_key(conn.sock).data)
        except (KeyError, ValueError):
            pass

    def _drop(self, conn: Connection) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.connections.discard(conn)
        self.admission.released(conn.peer.pid)
        try:
            self.selector.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()
