"""JSON for the agents' side of the control socket, without the json package.

`import json` imports re, and re imports enum: about 8 ms of every `watchkeeper heartbeat`
(as much as starting Python itself, bench/agent_cost.py). The work is done by _json, the C
accelerator json itself uses, so the text on the wire is the same.
"""

from __future__ import annotations

try:
    import _json
except ImportError:  # an interpreter without the accelerator: the json package it is
    _json = None

_CONSTANTS = {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}
_WHITESPACE = " \t\n\r"


def _unserializable(obj):
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serializable")


class _DecoderSettings:
    """What the C scanner reads from a json.JSONDecoder: its defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = _CONSTANTS.__getitem__
    memo: dict = {}


def _encoder(item_separator: str, key_separator: str, ensure_ascii: bool):
    if _json is None:
        import json

        return json.JSONEncoder(ensure_ascii=ensure_ascii,
                                separators=(item_separator, key_separator)).iterencode
    strings = _json.encode_basestring_ascii if ensure_ascii else _json.encode_basestring
    encode = _json.make_encoder(None, _unserializable, strings, None, key_separator,
                                item_separator, False, False, True)
    return lambda obj: encode(obj, 0)


_ENCODERS = {(compact, ascii_only): _encoder(*((",", ":") if compact else (", ", ": ")),
                                             ascii_only)
             for compact in (False, True) for ascii_only in (False, True)}
_scan = _json.make_scanner(_DecoderSettings()) if _json is not None else None


def dumps(obj, *, compact: bool = False, ensure_ascii: bool = False) -> str:
    """json.dumps(obj, ensure_ascii=ensure_ascii), with separators=(",", ":") when compact."""
    return "".join(_ENCODERS[compact, ensure_ascii](obj))


def loads(text: str | bytes):
    """json.loads(text); ValueError (json.JSONDecodeError) on anything but one JSON value."""
    if isinstance(text, bytes | bytearray):
        text = text.decode()
    if _scan is None:
        import json

        return json.loads(text)
    text = text.strip(_WHITESPACE)
    try:
        value, end = _scan(text, 0)
    except StopIteration:
        raise ValueError(f"not JSON: {text[:60]!r}") from None
    if end != len(text):
        raise ValueError(f"not JSON: extra data at character {end} of {text[:60]!r}")
    return value
