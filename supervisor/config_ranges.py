"""The ranges numeric settings may take, declared in the schema as msgspec constraints.

Every numeric field of the config structs carries its range (`Annotated[float, Meta(...)]`),
so that one mechanism rejects an out-of-range value at load time, the reference docs show the
range, and a test generated from the schema covers every field. This module holds the shared
ranges, and the helpers that read a field's range back for messages and docs.
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
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
Uid = Annotated[int, msgspec.Meta(ge=1, le=2**31 - 2)]  # 2**31-1 is (uid_t)-1 on 32-bit ABIs

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

