"""The control protocol: one JSON object per line over a Unix stream socket.

Request:  {"id": 1, "cmd": "status", "args": {...}, "run_id": "...", "token": "..."}
Response: {"id": 1, "ok": true, "result": ...}  or  {"id": 1, "ok": false, "error": "..."}

`run_id` and `token` identify a run (from WATCHKEEPER_RUN_ID / WATCHKEEPER_RUN_TOKEN) and
are required for every command an agent performs as itself (heartbeat, emit, lock,
memory writes). docs/protocol.md lists every command.
"""

from __future__ import annotations

import msgspec

MAX_FRAME_BYTES = 1 << 20


class Request(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    cmd: str
    id: int | str | None = None
    args: dict = {}
    run_id: str | None = None
    token: str | None = None


class ProtocolError(Exception):
    """A frame that is not a valid request: answered with an error, the connection lives."""


_decoder = msgspec.json.Decoder(Request)
_encoder = msgspec.json.Encoder()


def decode_request(frame: bytes) -> Request:
    try:
        return _decoder.decode(frame)
    except msgspec.ValidationError as exc:
        raise ProtocolError(f"invalid request: {exc}") from None
    except RecursionError:
        # 1,000 levels of `[` escaped as RecursionError: no reply, and the connection hung.
        raise ProtocolError("invalid request: nested too deeply (more levels than the "
                            "decoder's limit of about 1,000; memory values may nest at most "
                            "64 levels)") from None
    except (msgspec.DecodeError, UnicodeDecodeError) as exc:
        # msgspec raises UnicodeDecodeError for invalid UTF-8 inside a JSON string.
        raise ProtocolError(f"malformed JSON: {exc}") from None


def encode(obj) -> bytes:
    return _encoder.encode(obj) + b"\n"


def ok(request_id, result=None) -> bytes:
    return encode({"id": request_id, "ok": True, "result": result})


def error(request_id, message: str, **extra) -> bytes:
    return encode({"id": request_id, "ok": False, "error": message, **extra})
