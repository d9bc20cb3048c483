"""Send structured log events to journald, one journal field per event key.

The native journal protocol is one datagram of KEY=value lines, so it is written here in a few
lines: systemd-python needs libsystemd-dev and a compiler on every install, and cysystemd ships
its own C build, both heavy for a protocol this small.
"""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import struct
import sys
from collections.abc import Iterable, Mapping
from typing import Any, NoReturn, TextIO

import structlog

JOURNAL_SOCKET = "/run/systemd/journal/socket"
SYSLOG_IDENTIFIER = "watchkeeper"
MAX_VALUE_BYTES = 16 * 1024

# syslog priorities by structlog method name; notice (5) has no structlog level.
PRIORITIES = {
    "debug": 7,
    "info": 6,
    "warning": 4,
    "warn": 4,
    "error": 3,
    "exception": 3,
    "critical": 2,
    "fatal": 2,
}
DEFAULT_PRIORITY = 6

_RESERVED_FIELDS = frozenset({"MESSAGE", "PRIORITY", "SYSLOG_IDENTIFIER"})
_INVALID_FIELD_CHARS = re.compile(r"[^A-Z0-9_]")
_MAX_FIELD_NAME = 64  # journald drops fields with longer names
_BARE_VALUE = re.compile(r"[^\s=\"]+")


def journal_stream_matches(environ: Mapping[str, str] | None = None) -> bool:
    """True when stderr or stdout is the journal stream systemd announced in JOURNAL_STREAM.

    A match means we run under systemd with our output going to the journal, so sending
    native entries loses nothing and gains fields.
    """
    stream = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    device, _, inode = stream.partition(":")
    if not (device.isdigit() and inode.isdigit()):
        return False
    for fd in (2, 1):
        try:
            stat = os.fstat(fd)
        except OSError:
            continue
        if (stat.st_dev, stat.st_ino) == (int(device), int(inode)):
            return True
    return False


def field_name(key: str) -> str:
    """The journal field for an event key: upper case, [A-Z0-9_], no leading underscore.

    journald drops fields starting with '_' (trusted fields it sets itself) or a digit.
    """
    name = _INVALID_FIELD_CHARS.sub("_", key.upper()).lstrip("_")
    if not name or name[0].isdigit():
        name = "FIELD_" + name
    if name in _RESERVED_FIELDS:
        name = "FIELD_" + name  # an event key may not overwrite what the renderer sets
    return name[:_MAX_FIELD_NAME]


def encode_value(value: Any) -> bytes:
    """A field value as bytes, cut to MAX_VALUE_BYTES so one huge value cannot cost the entry."""
    data = value if isinstance(value, bytes) else str(value).encode("utf-8", "replace")
    if len(data) <= MAX_VALUE_BYTES:
        return data
    marker = f"...[truncated {len(data) - MAX_VALUE_BYTES} bytes]".encode()
    return data[: MAX_VALUE_BYTES - len(marker)] + marker


def encode_entry(fields: Iterable[tuple[str, bytes]]) -> bytes:
    """One datagram of the native protocol; values with a newline use the length-prefixed form."""
    parts = []
    for name, value in fields:
        if b"\n" in value:
            parts.append(name.encode() + b"\n" + struct.pack("<Q", len(value)) + value + b"\n")
        else:
            parts.append(name.encode() + b"=" + value + b"\n")
    return b"".join(parts)


def render_message(event_dict: Mapping[str, Any]) -> str:
    """The human line: event name, then key=value pairs, then any traceback on its own lines.
    An agent's own output line is shown as itself, `agent: line`: the fields carry
    the rest, and journald records the time."""
    if event_dict.get("event") == "agent_output" and "line" in event_dict:
        return f"{event_dict.get('agent', '?')}: {event_dict['line']}"
    words = [str(event_dict.get("event", ""))]
    for key, value in event_dict.items():
        if key in ("event", "level", "exception", "timestamp"):
            continue
        text = str(value)
        words.append(f"{key}={text if _BARE_VALUE.fullmatch(text) else json.dumps(text)}")
    line = " ".join(words)
    if "exception" in event_dict:
        line += "\n" + str(event_dict["exception"])
    return line


class JournalRenderer:
    """Final structlog processor: sends the event to journald, then drops it.

    When journald cannot take the entry (no socket, queue full, entry too large) the line is
    written to `fallback` (stderr) so the event is never lost silently.
    """

    __slots__ = ("_socket_path", "_identifier", "_fallback", "_socket", "_failing")

    def __init__(self, socket_path: str = JOURNAL_SOCKET, identifier: str = SYSLOG_IDENTIFIER,
                 fallback: TextIO | None = None) -> None:
        self._socket_path = str(socket_path)
        self._identifier = identifier
        self._fallback = fallback
        self._socket: socket.socket | None = None
        self._failing = False

    def __call__(self, logger: Any, method_name: str, event_dict: Mapping[str, Any]) -> NoReturn:
        level = str(event_dict.get("level", method_name)).lower()
        message = render_message(event_dict)
        fields = [
            ("MESSAGE", encode_value(message)),
            ("PRIORITY", str(PRIORITIES.get(level, DEFAULT_PRIORITY)).encode()),
            ("SYSLOG_IDENTIFIER", self._identifier.encode()),
        ]
        fields.extend((field_name(key), encode_value(value))
                      for key, value in event_dict.items() if key != "level")
        self._send(encode_entry(fields), level, message)
        raise structlog.DropEvent

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def _send(self, datagram: bytes, level: str, message: str) -> None:
        try:
            if self._socket is None:
                self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            # Unconnected sendto: a restarted journald binds a new socket at the same path.
            # MSG_DONTWAIT: a stalled journald must not stall the daemon's loop.
            self._socket.sendto(datagram, socket.MSG_DONTWAIT, self._socket_path)
            self._failing = False
        except OSError as exc:
            self._write_fallback(level, message, exc)

    def _write_fallback(self, level: str, message: str, exc: OSError) -> None:
        stream = self._fallback or sys.stderr
        if not self._failing:
            reason = errno.errorcode.get(exc.errno or 0, str(exc))
            stream.write(f"[warning] journal_unreachable socket={self._socket_path} "
                         f"error={reason}\n")
            self._failing = True
        stream.write(f"[{level}] {message}\n")
        stream.flush()
