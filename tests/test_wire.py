"""wire.py: the agents' JSON without the json package, byte for byte what json writes."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from supervisor import wire

JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=20)


@given(JSON_VALUES)
def test_wire_writes_and_reads_what_json_does(value):
    """Every JSON value encodes to json's exact text (both separator styles, ASCII or not)
    and decodes back to what json.loads returns."""
    assert wire.dumps(value) == json.dumps(value, ensure_ascii=False)
    assert wire.dumps(value, ensure_ascii=True) == json.dumps(value)
    compact = wire.dumps(value, compact=True)
    assert compact == json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    assert wire.loads(compact) == json.loads(compact)
    assert wire.loads(f" {compact}\n".encode()) == json.loads(compact)


@pytest.mark.parametrize("text", ["", "{", "1 2", "nope", '{"a":}', "[1,]"])
def test_wire_refuses_anything_but_one_json_value(text):
    """Text that is not exactly one JSON value raises ValueError, as json.loads does."""
    with pytest.raises(ValueError):
        wire.loads(text)


def test_wire_reads_json_constants_and_refuses_unserializable_objects():
    """NaN and Infinity read as json reads them; an object json cannot write is a TypeError."""
    assert math.isnan(wire.loads('{"n": NaN}')["n"])
    assert wire.loads("-Infinity") == float("-inf")
    with pytest.raises(TypeError, match="not JSON serializable"):
        wire.dumps({"when": object()})
