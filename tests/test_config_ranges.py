"""Numeric ranges, generated from the schema: every numeric setting found by walking the config
structs has a range, an out-of-range value is refused with file:line: field, and values at the
edges of the range load. A new setting is covered without touching this file."""

from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
import yaml
from harness import wk

from supervisor.config import AgentSpec, Job, Settings
from supervisor.config_ranges import MAX_DURATION_S, describe, meta_of, number
from supervisor.configload import ConfigIssue, load_config
from supervisor.errors import ConfigError

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
        return _field(self.keys)

    @property
    def is_int(self) -> bool:
        return _scalar(self.hint) is int


def _field(keys: tuple) -> str:
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


def _walk(struct: type, file: str, keys: tuple = (), makers: tuple = ()) -> Iterator[NumericSetting]:
    hints = typing.get_type_hints(struct, include_extras=True)
    for field in msgspec.structs.fields(struct):
        if struct is AgentSpec and field.name == "jobs":
            continue  # walked as Job below
        hint, inner = hints[field.name], _strip(hints[field.name])
        origin, args = typing.get_origin(inner), typing.get_args(inner)
        here = (*keys, field.name)
        if isinstance(inner, type) and issubclass(inner, msgspec.Struct):
            yield from _walk(inner, file, here, (*makers, lambda s=inner: _minimal(s)))
        elif origin is list and _is_struct(args[0]):
            sub = _strip(args[0])
            yield from _walk(sub, file, (*here, 0), (*makers, lambda s=sub: [_minimal(s)], None))
        elif origin is dict and _is_struct(args[1]):
            sub = _strip(args[1])
            # The key is the agent's name: breaker.agents must name a defined agent.
            yield from _walk(sub, file, (*here, MapKey("a")),
                             (*makers, dict, lambda s=sub: _minimal(s)))
        elif _scalar(hint) is not None:
            yield NumericSetting(file, here, (*makers, None), hint, meta_of(hint), False)
        elif origin is list and _scalar(args[0]) is not None:
            yield NumericSetting(file, here, (*makers, None), args[0], meta_of(args[0]), True)


def _is_struct(hint) -> bool:
    hint = _strip(hint)
    return isinstance(hint, type) and issubclass(hint, msgspec.Struct)


SETTINGS = [*_walk(Settings, MAIN), *_walk(AgentSpec, AGENT),
            *_walk(Job, AGENT, ("jobs", 0), (None, None))]


def _bounds(meta: msgspec.Meta) -> tuple[float | None, float | None, float | None, float | None]:
    return meta.gt, meta.ge, meta.lt, meta.le


def out_of_range(setting: NumericSetting) -> list[float]:
    gt, ge, lt, le = _bounds(setting.meta)
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
    gt, ge, lt, le = _bounds(setting.meta)
    step = 1 if setting.is_int else 0.01
    low = ge if ge is not None else gt + step
    high = le if le is not None else lt - step if lt is not None else low + 1000
    return [low, high]


def _write(root: Path, setting: NumericSetting, value: float, linked: bool) -> None:
    main = {"state_dir": "state"}
    agent = {"jobs": [copy.deepcopy(JOB)]}
    doc = main if setting.file == MAIN else agent
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
    (root / "agents.d").mkdir(exist_ok=True)
    (root / MAIN).write_text(yaml.safe_dump(main))
    (root / AGENT).write_text(yaml.safe_dump(agent))


def _issues(root: Path) -> list[ConfigIssue]:
    try:
        load_config(root / MAIN)
    except ConfigError as exc:
        return exc.issues
    return []


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_numeric_setting_declares_its_range(setting):
    """Each numeric setting carries its valid range in the schema, a duration (`_s`) at most
    ten years."""
    assert setting.meta is not None, f"{setting.name} has no range (see config_ranges.py)"
    if setting.keys[-1].endswith("_s"):
        assert setting.meta.le is not None and setting.meta.le <= MAX_DURATION_S, setting.name


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.meta is not None],
                         ids=lambda s: s.name)
def test_out_of_range_value_is_refused_with_file_line_and_field(tmp_path, setting):
    """Each value just outside a numeric setting's range is a config error naming the file,
    the line of the key, the field and the valid range."""
    for value in out_of_range(setting):
        _write(tmp_path, setting, value, linked=False)
        issues = _issues(tmp_path)
        field = _field(setting.keys) + ("[0]" if setting.in_list else "")
        mine = [i for i in issues if i.field == field]
        assert len(mine) == 1, f"{setting.name}={value}: {[str(i) for i in issues]}"
        issue = mine[0]
        assert issue.file == str(tmp_path / setting.file)
        line = (tmp_path / setting.file).read_text().splitlines()[issue.line - 1]
        shown = setting.keys[-1] if not setting.in_list else f"- {number(value)}"
        assert shown in line, f"{issue} points at {line!r}"
        assert f"{number(value)} is out of range (valid: {describe(setting.meta)})" in \
            issue.message, str(issue)


@pytest.mark.parametrize("setting", [s for s in SETTINGS if s.meta is not None],
                         ids=lambda s: s.name)
def test_values_at_the_edges_of_the_range_load(tmp_path, setting):
    """The lowest and the highest value of each numeric setting's range load."""
    for value in in_range(setting):
        _write(tmp_path, setting, value, linked=True)
        assert _issues(tmp_path) == [], f"{setting.name}={value}"


def test_the_walk_finds_the_settings_of_every_section():
    """The schema walk reaches numeric settings in nested, optional, listed and per-agent
    sections, so none escapes the generated tests."""
    names = {s.name for s in SETTINGS}
    for expected in ("tick_s", "memory_guard.warn_percent", "alerts.webhooks[0].timeout_s",
                     "alerts.escalation.after_s", "breaker.agents.a.outputs.window_s",
                     "limits.kinds.a.max_outputs", "heartbeat.interval_s", "agent_uid_range",
                     "jobs[0].retries.jitter", "jobs[0].schedule.every_s", "storage.poll_s",
                     "steward.busy_timeout_ms", "metrics.port"):
        assert expected in names, expected


ISSUE_EXAMPLES = [  # issue #17: values check-config accepted
    (MAIN, "tick_s: 0\n", "tick_s: 0 is out of range (valid: >= 0.01, <= 3600)"),
    (MAIN, "tick_s: -5\n", "tick_s: -5 is out of range"),
    (MAIN, "stop_grace_s: -1\n", "stop_grace_s: -1 is out of range (valid: >= 0"),
    (MAIN, "run_history_days: -1\n", "run_history_days: -1 is out of range (valid: > 0"),
    (AGENT, "memory_max_mb: 0\n", "memory_max_mb: 0 is out of range (valid: > 0)"),
]


@pytest.mark.parametrize(("file", "text", "expected"), ISSUE_EXAMPLES,
                         ids=[t.strip() for _, t, _ in ISSUE_EXAMPLES])
def test_check_config_refuses_the_values_the_issue_named(tmp_path, file, text, expected):
    """`watchkeeper check-config` exits non-zero and prints `file:line: field: problem` for
    each out-of-range value issue #17 found accepted."""
    (tmp_path / "agents.d").mkdir()
    main, agent = "state_dir: state\n", "jobs: [{id: main, command: ['true'], " \
                                        "schedule: {every_s: 60}}]\n"
    (tmp_path / MAIN).write_text(main + text if file == MAIN else main)
    (tmp_path / AGENT).write_text(agent + text if file == AGENT else agent)
    result = wk("--config", str(tmp_path / MAIN), "check-config")
    assert result.returncode != 0
    assert f"{tmp_path / file}:2: {expected}" in result.stdout + result.stderr, \
        result.stdout + result.stderr

