"""Numeric ranges, generated from the schema: every numeric setting found by walking the config
structs has a range, an out-of-range value is refused with file:line: field, and values at the
edges of the range load. A new setting is covered without touching this file."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml
from config_walk import (
    AGENT,
    JOB,
    MAIN,
    SETTINGS,
    NumericSetting,
    field_path,
    in_range,
    out_of_range,
    place,
)
from harness import wk

from supervisor.config.load import ConfigIssue, load_config
from supervisor.core.ranges import MAX_DURATION_S, describe, number
from supervisor.errors import ConfigError


def _write(root: Path, setting: NumericSetting, value: float, linked: bool) -> None:
    main = {"state_dir": "state"}
    agent = {"jobs": [copy.deepcopy(JOB)]}
    place(main if setting.file == MAIN else agent, setting, value, linked)
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
    assert setting.meta is not None, f"{setting.name} has no range (see core/ranges.py)"
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
        field = field_path(setting.keys) + ("[0]" if setting.in_list else "")
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
    (AGENT, "memory_max_mb: 0\n", "memory_max_mb: 0 is out of range (valid: > 0, <= 1073741824)"),
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



def test_an_issue_under_a_mapping_names_its_key_and_keeps_its_hint(tmp_path):
    """A problem inside breaker.agents.<agent> names that agent and its line (msgspec says
    only `[...]`), and an unknown key there still lists the valid keys."""
    (tmp_path / "agents.d").mkdir()
    (tmp_path / MAIN).write_text("state_dir: state\nbreaker:\n  agents:\n    a:\n"
                                 "      outputs: {colour: 1}\n")
    (tmp_path / AGENT).write_text(yaml.safe_dump({"jobs": [JOB]}))
    [issue] = _issues(tmp_path)
    assert (issue.line, issue.field) == (5, "breaker.agents.a.outputs.colour"), str(issue)
    assert "valid keys here: max_outputs, window_s" in issue.message, str(issue)
