"""docs/configuration.md, generated from the schema: every field, its type, default and doc.

The string literal under a field in a Struct's body is its documentation (read with ast,
since Python keeps no attribute docstrings at run time).
"""

from __future__ import annotations

import ast
import enum
import inspect
import textwrap
import typing

import msgspec

from ..core.ranges import describe, meta_of, shape_of
from .schema import AgentSpec, Job, Settings


def _field_docs(cls: type) -> dict[str, str]:
    """A field's doc: the string literal under it, else the comment above or beside it."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        try:
            source = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        lines = source.splitlines()
        tree = ast.parse(source)
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:] + [None], strict=True):
            if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
                continue
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant) and \
                    isinstance(nxt.value.value, str):
                docs[node.target.id] = " ".join(nxt.value.value.split())
                continue
            comment = _comments(lines, node.lineno - 1)
            if comment:
                docs[node.target.id] = comment
    return docs


def _comments(lines: list[str], index: int) -> str:
    """The comment block right above line `index`, or the comment at its end."""
    above = []
    i = index - 1
    while i >= 0 and lines[i].strip().startswith("#"):
        above.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    if above:
        return " ".join(above)
    _, sep, inline = lines[index].partition("  # ")
    return inline.strip() if sep else ""


def _struct_of(hint) -> type | None:
    for candidate in (hint, *typing.get_args(hint)):
        if isinstance(candidate, type) and issubclass(candidate, msgspec.Struct):
            return candidate
    return None


def _type_name(hint) -> str:
    if typing.get_origin(hint) is typing.Annotated:
        meta, shape = meta_of(hint), shape_of(hint)
        base = _type_name(hint.__origin__)
        if shape is not None and shape.extra:
            return f"{base} ({shape.extra['what']})"
        if meta is None:
            lengths = [m.min_length for m in hint.__metadata__
                       if isinstance(m, msgspec.Meta) and m.min_length]
            return f"{base} (at least {lengths[0]})" if lengths else base
        return f"{base} ({describe(meta)})"
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return " \\| ".join(str(m.value) for m in hint)
    if isinstance(hint, type):
        return hint.__name__
    args = typing.get_args(hint)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return " \\| ".join(str(a) for a in args)
    if args and origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return " \\| ".join("null" if a is type(None) else _type_name(a) for a in args)
    name = getattr(origin, "__name__", str(origin))
    return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name


def _default(field: msgspec.structs.FieldInfo) -> str:
    if field.required:
        return "required"
    value = field.default if field.default is not msgspec.NODEFAULT else field.default_factory()
    if isinstance(value, msgspec.Struct):
        return "(section)"
    if isinstance(value, enum.Enum):
        value = value.value
    return "`null`" if value is None else f"`{msgspec.json.encode(value).decode()}`"


def rows(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(key path, type, default, doc) of every field of `cls`, sections flattened."""
    out = []
    docs = _field_docs(cls)
    hints = typing.get_type_hints(cls, include_extras=True)  # with the ranges
    for field in msgspec.structs.fields(cls):
        key = f"{prefix}{field.name}"
        hint = hints[field.name]
        sub = _struct_of(hint)
        origin = typing.get_origin(hint)
        doc = docs.get(field.name, "")
        if sub is not None and origin not in (list, dict):
            doc = doc or (sub.__doc__ or "").strip().split("\n")[0]
            out.append((key, "section", "", doc))
            out.extend(rows(sub, f"{key}."))
        else:
            out.append((key, _type_name(hint), _default(field), doc))
    return out


def _table(title: str, intro: str, cls: type) -> list[str]:
    lines = [f"## {title}", "", intro, "", "| key | type | default | meaning |",
             "|---|---|---|---|"]
    for key, type_name, default, doc in rows(cls):
        lines.append(f"| `{key}` | {type_name} | {default} | {doc} |")
    return lines + [""]


def render() -> str:
    lines = ["# Configuration reference", "",
             "Generated by `watchkeeper config-reference` from the schema in "
             "`supervisor/config/schema.py` (and the sections it imports); a test keeps this file "
             "equal to its output. Durations are in seconds (`_s`), sizes in MB (`_mb`). "
             "Unknown keys are errors. A number's valid range follows its type, e.g. "
             "`float (> 0, <= 315360000)`; a value outside it is an error.", ""]
    lines += _table("Main file: watchkeeper.yaml", "Relative paths are relative to this file. "
                    "String values may name environment variables (`supervisor/config/env.py`): "
                    "`${NAME}`, `${NAME:-default}` (the default when NAME is unset or empty), "
                    "`$${` for a literal `${`; an unset NAME without default is an error. The "
                    "environment is the daemon's (its unit's `Environment=`), or the shell's "
                    "for `check-config`. Agent files are never expanded: their commands keep "
                    "`${...}` for the agent's own shell.", Settings)
    lines += _table("Agent file: agents.d/NAME.yaml", "One agent, the identity that heartbeats, "
                    "locks, memory permissions and output limits attach to.", AgentSpec)
    lines += _table("Job: an item of `jobs:`", "Exactly one of `schedule.cron`, "
                    "`schedule.every_s`, `schedule.after`, `schedule.always`.", Job)
    return "\n".join(lines)
