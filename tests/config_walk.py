"""The numeric settings of the config schema, found by walking its structs: where each sits in
the YAML files, its range, and values inside and outside it. Shared by the generated range
tests (test_config_ranges.py) and the config fuzz (test_fuzz.py), so that a new setting is
covered by both without touching either."""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Iterator

import msgspec

from supervisor.config.schema import AgentSpec, Job, Settings
from supervisor.core.ranges import meta_of

MAIN, AGENT = "watchkeeper.yaml", "agents.d/a.yaml"

JOB = {"id": "main", "command": ["true"], "schedule": {"every_s": 60}}
# Values for the required fields of nested sections, so that a section holding the numeric
# field under test is otherwise valid. A new required field must be added here (the walk says so).
REQUIRED = {("WebhookSettings", "url"): "http://127.0.0.1:9/hook",
            ("CommandSettings", "argv"): ["true"],
            **{("Job", name): JOB[name] for name in JOB}}
# Settings ordered against each other (clear <= warn <= act, fast <= slow): an edge value of
# one loads only with its partners at the same value.
LINKED = [{"clear_percent", "warn_percent", "act_percent"}, {"fast_interval_s", "slow_interval_s"}]


class MapKey(str):
    """A key of a `dict[str, Section]` field (breaker.agents.<agent>)."""


@dataclasses.dataclass(frozen=True)
class NumericSetting:
    file: str
    keys: tuple            # path in the YAML document: str, MapKey or list index
    makers: tuple          # per key: builds the container a missing key opens, or None
    hint: object
    meta: msgspec.Meta | None
    in_list: bool          # a list of numbers (agent_uid_range): the value goes in as [v, v]

    @property
    def name(self) -> str:
        return field_path(self.keys)

    @property
    def is_int(self) -> bool:
        return _scalar(self.hint) is int


def field_path(keys: tuple) -> str:
    out = ""
    for key in keys:
        if isinstance(key, int):
            out += f"[{key}]"
        else:
            out += f".{key}" if out else key
    return out


def _strip(hint):
    """`X | None` -> X, Annotated[X, ...] -> X."""
    while True:
        if typing.get_origin(hint) is typing.Annotated:
            hint = hint.__origin__
            continue
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint) in (typing.Union, __import__("types").UnionType) and \
                len(args) == 1:
            hint = args[0]
            continue
        return hint


def _scalar(hint):
    hint = _strip(hint)
    return hint if hint in (int, float) else None


def _minimal(struct: type) -> dict:
    doc = {}
    for field in msgspec.structs.fields(struct):
        if field.required:
            assert (struct.__name__, field.name) in REQUIRED, \
                f"add a valid {struct.__name__}.{field.name} to REQUIRED in {__file__}"
            doc[field.name] = copy.deepcopy(REQUIRED[(struct.__name__, field.name)])
    return doc


def walk(struct: type, file: str, keys: tuple = (), makers: tuple = ()) -> Iterator[NumericSetting]:
    hints = typing.get_type_hints(struct, include_extras=True)
    for field in msgspec.structs.fields(struct):
        if struct is AgentSpec and field.name == "jobs":
            continue  # walked as Job below
        hint, inner = hints[field.name], _strip(hints[field.name])
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        here = (*keys, field.name)
        if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
            yield from walk(inner, file, here, (*makers, lambda s=inner: _minimal(s)))
        elif origin is list and _is_struct(args[0]):
            sub = _strip(args[0])
            yield from walk(sub, file, (*here, 0), (*makers, lambda s=sub: [_minimal(s)], None))
        elif origin is dict and _is_struct(args[1]):
            sub = _strip(args[1])
            # The key is the agent's name: breaker.agents must name a defined agent.
            yield from walk(sub, file, (*here, MapKey("a")),
                             (*makers, dict, lambda s=sub: _minimal(s)))
        elif _scalar(hint) is not None:
            yield NumericSetting(file, here, (*makers, None), hint, meta_of(hint), False)
        elif origin is list and _scalar(args[0]) is not None:
            yield NumericSetting(file, here, (*makers, None), args[0], meta_of(args[0]), True)


def _is_struct(hint) -> bool:
    hint = _strip(hint)
    return isinstance(hint, type) and issubclass(hint, msgspec.Struct)


SETTINGS = [*walk(Settings, MAIN), *walk(AgentSpec, AGENT),
            *walk(Job, AGENT, ("jobs", 0), (None, None))]


def bounds(meta: msgspec.Meta) -> tuple[float | None, float | None, float | None, float | None]:
    return meta.gt, meta.ge, meta.lt, meta.le


def out_of_range(setting: NumericSetting) -> list[float]:
    gt, ge, lt, le = bounds(setting.meta)
    values = []
    if gt is not None:
        values += [gt, gt - 1]
    if ge is not None:
        values += [ge - 1]
    if lt is not None:
        values += [lt]
    if le is not None:
        values += [le + 1]
    return values


def in_range(setting: NumericSetting) -> list[float]:
    gt, ge, lt, le = bounds(setting.meta)
    step = 1 if setting.is_int else 0.01
    low = ge if ge is not None else gt + step
    high = le if le is not None else lt - step if lt is not None else low + 1000
    return [low, high]


def place(doc: dict, setting: NumericSetting, value: float, linked: bool = False) -> None:
    """Set `setting` to `value` in its file's document, opening the sections on the way;
    `linked`: its ordered partners (LINKED) get the same value."""
    node = doc
    for key, maker in zip(setting.keys[:-1], setting.makers[:-1], strict=True):
        key = str(key) if isinstance(key, MapKey) else key  # yaml dumps plain str only
        if isinstance(node, dict) and key not in node:
            node[key] = maker()
        node = node[key]
    last = setting.keys[-1]
    names = next((group for group in LINKED if last in group), {last}) if linked else {last}
    for name in names:
        node[name] = [value, value] if setting.in_list else value
