"""The `[steward]` config section and the JSON Schema subset it declares per namespace.

`check_schema` vets a schema when the config loads; `schema_error` checks a value against one
on every write.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import msgspec

from ..core.ranges import BareFileName, Count, PositiveDuration

SCHEMA_KEYWORDS = frozenset(
    {"type", "required", "properties", "additionalProperties", "items", "maxLength", "maxItems",
     "enum"})
_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
}


class StewardSettings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    """The `[steward]` config section.

    `schemas` maps a namespace glob to a JSON Schema written in a small subset (see
    `SCHEMA_KEYWORDS`); the first glob that matches a namespace applies. A subset keeps the
    daemon free of the `jsonschema` dependency tree, and unknown keywords are refused at load
    time rather than silently ignored.
    """

    db_file: BareFileName = "memory.sqlite3"
    """File name of the steward's SQLite database in state_dir."""
    max_value_bytes: Count = 256 * 1024
    """Largest JSON value one update may write."""
    schemas: dict[str, dict[str, Any]] = {}
    """JSON Schema (a subset) per namespace glob, checked on every write (and the subset
    at load time, by configload)."""
    history_retention_s: PositiveDuration = 30 * 86400.0
    """History entries older than this are pruned."""
    idempotency_ttl_s: PositiveDuration = 86400.0
    """How long an idempotency key makes a retried update a no-op."""
    busy_timeout_ms: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 5000  # a C int
    """SQLite busy timeout for the steward's connections."""


def check_schema(schema: Any, where: str) -> None:
    """Raise ValueError if `schema` uses anything outside the supported subset."""
    stack = [(schema, where)]
    while stack:
        node, at = stack.pop()
        if not isinstance(node, dict):
            raise ValueError(f"{at}: a schema must be an object, got {type(node).__name__}")
        unknown = set(node) - SCHEMA_KEYWORDS
        if unknown:
            raise ValueError(f"{at}: unsupported keyword(s) {sorted(unknown)}; "
                             f"supported: {sorted(SCHEMA_KEYWORDS)}")
        types = node.get("type", [])
        for name in [types] if isinstance(types, str) else types:
            if name not in _JSON_TYPES:
                raise ValueError(f"{at}.type: unknown type {name!r}; valid: {sorted(_JSON_TYPES)}")
        stack.extend((sub, f"{at}.properties.{n}") for n, sub in node.get("properties", {}).items())
        if "items" in node:
            stack.append((node["items"], f"{at}.items"))
        if isinstance(node.get("additionalProperties"), dict):
            stack.append((node["additionalProperties"], f"{at}.additionalProperties"))


def schema_error(value: Any, schema: dict[str, Any]) -> str | None:
    """Return the first way `value` violates `schema` (subset), or None when it conforms."""
    stack = [(value, schema, "$")]
    while stack:
        val, node, path = stack.pop()
        problem = _node_error(val, node, path)
        if problem:
            return problem
        if isinstance(val, dict):
            props = node.get("properties", {})
            extra = node.get("additionalProperties", True)
            for name, member in val.items():
                if name in props:
                    stack.append((member, props[name], f"{path}.{name}"))
                elif extra is False:
                    return f"{path}: property {name!r} is not allowed; allowed: {sorted(props)}"
                elif isinstance(extra, dict):
                    stack.append((member, extra, f"{path}.{name}"))
        if isinstance(val, list) and "items" in node:
            stack.extend((item, node["items"], f"{path}[{i}]") for i, item in enumerate(val))
    return None


def _node_error(val: Any, node: dict[str, Any], path: str) -> str | None:
    types = node.get("type")
    if types is not None:
        names = [types] if isinstance(types, str) else types
        if not any(_JSON_TYPES[n](val) for n in names):
            return f"{path}: expected {' or '.join(names)}, got {json_type(val)}"
    if "enum" in node and val not in node["enum"]:
        return f"{path}: {val!r} is not one of {node['enum']}"
    if isinstance(val, str) and len(val) > node.get("maxLength", len(val)):
        return f"{path}: string of {len(val)} chars exceeds maxLength {node['maxLength']}"
    if isinstance(val, list) and len(val) > node.get("maxItems", len(val)):
        return f"{path}: array of {len(val)} items exceeds maxItems {node['maxItems']}"
    if isinstance(val, dict):
        missing = [name for name in node.get("required", []) if name not in val]
        if missing:
            return f"{path}: missing required property {missing[0]!r}"
    return None


def json_type(val: Any) -> str:
    """The JSON type name of a decoded value, for error messages."""
    return next(name for name, test in _JSON_TYPES.items() if name != "integer" and test(val))
