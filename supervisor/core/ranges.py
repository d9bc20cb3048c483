"""The ranges and shapes settings may take, declared in the schema as msgspec constraints.

Every numeric field of the config structs carries its range (`Annotated[float, Meta(...)]`),
and every string with a fixed form its pattern (`shaped(...)`), so that one mechanism rejects
a bad value at load time, the reference docs show the range, and a test generated from the
schema covers every field. This module holds the shared ranges and shapes, and the helpers
that read them back for messages and docs. Checks between fields, which a schema cannot
express, are in config/load.py (`_check_relations`).
"""

from __future__ import annotations

import re
import typing
from typing import Annotated

import msgspec

# `.inf` or `1e300` as a duration would overflow the scheduler's date arithmetic.
MAX_DURATION_S = 10 * 365 * 86400.0
MAX_DAYS = 10 * 365.0

PositiveDuration = Annotated[float, msgspec.Meta(gt=0, le=MAX_DURATION_S)]
"""A period, timeout or window: 0 would busy-loop or expire at once."""
Duration = Annotated[float, msgspec.Meta(ge=0, le=MAX_DURATION_S)]
"""A grace, delay or jitter: 0 means none."""
Count = Annotated[int, msgspec.Meta(ge=1)]
CountOrZero = Annotated[int, msgspec.Meta(ge=0)]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
Fraction = Annotated[float, msgspec.Meta(ge=0, le=1)]
# Every float has an upper bound, so `.inf` is out of range like any other value.
Megabytes = Annotated[float, msgspec.Meta(gt=0, le=2.0**30)]  # 1 PiB
Amount = Annotated[float, msgspec.Meta(gt=0, le=1e12)]  # spend, in the unit agents report
Multiple = Annotated[float, msgspec.Meta(ge=1, le=1000)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Uid = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 2)]  # 2**31-1 is (uid_t)-1 on 32-bit ABIs



def shaped(pattern: str, what: str, *, echo: bool = True):
    """A string matching `pattern` (anchor it: \\A...\\Z), explained as `what` when it does
    not; `echo=False` keeps the value out of the message (a webhook URL's path is a secret)."""
    return Annotated[str, msgspec.Meta(pattern=pattern, extra={"what": what, "echo": echo})]


IDENTIFIER_PATTERN = r"\A[a-z0-9][a-z0-9_-]{0,63}\Z"  # job ids and agent names
Identifier = shaped(IDENTIFIER_PATTERN,
                    "a valid id (lowercase letters, digits, '-' and '_', at most 64)")
SqlIdentifier = shaped(r"\A[a-z_][a-z0-9_]{0,62}\Z",
                       "a plain identifier (lowercase letters, digits and '_', at most 63)")
BareFileName = shaped(r"\A[^/]+\Z", "a bare file name (no '/')")

_BOUNDS = (("gt", ">"), ("ge", ">="), ("lt", "<"), ("le", "<="))


def meta_of(hint) -> msgspec.Meta | None:
    """The range constraint of a field's type hint (read with include_extras), or None;
    `X | None` and list elements are looked through."""
    if typing.get_origin(hint) is Annotated:
        for extra in hint.__metadata__:
            if isinstance(extra, msgspec.Meta) and any(getattr(extra, k) is not None
                                                        for k, _ in _BOUNDS):
                return extra
        return meta_of(hint.__origin__)  # e.g. a length limit on a list of ranged items
    for arg in typing.get_args(hint):
        if arg is not type(None):
            found = meta_of(arg)
            if found is not None:
                return found
    return None


def describe(meta: msgspec.Meta) -> str:
    """'> 0, <= 315360000': the bounds of a range, for docs and messages."""
    return ", ".join(f"{sign} {number(getattr(meta, key))}" for key, sign in _BOUNDS
                     if getattr(meta, key) is not None)


def number(value: float) -> str:
    """315360000 rather than 3.1536e+08; 0.01 as it is."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def shape_of(hint) -> msgspec.Meta | None:
    """The pattern constraint (a `shaped` string) of a field's type hint, or None."""
    if typing.get_origin(hint) is Annotated:
        for extra in hint.__metadata__:
            if isinstance(extra, msgspec.Meta) and extra.pattern is not None:
                return extra
    for arg in typing.get_args(hint):
        if arg is not type(None):
            found = shape_of(arg)
            if found is not None:
                return found
    return None


def shape_message(hint, value) -> str | None:
    """msgspec's "Expected `str` matching regex '...'" for `value`, of a field typed `hint`,
    said for people: "'Main' is not a valid id (lowercase letters, ...)"; None when the
    field declares no shape."""
    meta = shape_of(hint)
    if meta is None or not meta.extra:
        return None
    shown = repr(value) if meta.extra.get("echo", True) and isinstance(value, str) else "the value"
    return f"{shown} is not {meta.extra['what']}"


_TOO_SHORT = re.compile(r"Expected `array` of length >= (?P<n>\d+)")


def length_message(message: str, value) -> str:
    """msgspec's 'Expected `array` of length >= 1' said for people: 'the list is empty
    (valid: at least 1 item)'. Other messages are returned unchanged."""
    m = _TOO_SHORT.match(message)
    if m is None or not isinstance(value, list):
        return message
    n = int(m["n"])
    has = "the list is empty" if not value else f"the list has {len(value)}"
    return f"{has} (valid: at least {n} item{'s' if n > 1 else ''})"


_OUT_OF_RANGE = re.compile(r"Expected `(?:int|float)` (?:>|>=|<|<=) ")


def range_message(message: str, hint, value) -> str:
    """msgspec's 'Expected `float` > 0.0' for `value`, of a field typed `hint`, rewritten to
    say the value and the whole valid range: '-5 is out of range (valid: > 0, <= 3600)'.
    Other messages are returned unchanged."""
    meta = meta_of(hint) if _OUT_OF_RANGE.match(message) else None
    if meta is None:
        return message
    shown = f"{number(value)} is " if isinstance(value, int | float) and not isinstance(value, bool) \
        else ""
    return f"{shown}out of range (valid: {describe(meta)})"

