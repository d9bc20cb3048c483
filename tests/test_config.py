"""Configuration: errors name file, line and field; unknown keys are errors; the reference
docs cover every field."""

from __future__ import annotations

import textwrap
from pathlib import Path

import msgspec
import pytest
from harness import wk

from supervisor.config import docs as config_docs
from supervisor.config.load import load_config
from supervisor.config.schema import AgentSpec, Job, Settings
from supervisor.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, main: str, agents: dict[str, str]) -> Path:
    (tmp_path / "agents.d").mkdir(exist_ok=True)
    (tmp_path / "wk.yaml").write_text(textwrap.dedent(main))
    for name, text in agents.items():
        (tmp_path / "agents.d" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return tmp_path / "wk.yaml"


def issues(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(i) for i in info.value.issues]


GOOD_JOB = """\
jobs:
  - id: main
    command: [python3, agent.py]
    schedule: {every_s: 60}
"""


def test_valid_config_loads_with_defaults(tmp_path):
    """A minimal config loads; the agent is named after its file and paths are absolute."""
    cfg = load_config(write(tmp_path, "state_dir: ./st\n", {"seo": GOOD_JOB}))
    assert list(cfg.agents) == ["seo"]
    assert cfg.state_dir == (tmp_path / "st").resolve()
    assert cfg.agents["seo"].jobs[0].timeout_s == 3600.0


def test_invalid_cron_names_file_line_and_field(tmp_path):
    """A bad cron expression is reported as file:line: schedule.cron with the value."""
    agent = """\
    description: seo
    jobs:
      - id: score
        command: [python3, seo.py]
        schedule:
          cron: "*/61 * * * *"
    """
    found = issues(write(tmp_path, "state_dir: st\n", {"seo": agent}))
    assert len(found) == 1
    assert found[0].startswith(f"{tmp_path}/agents.d/seo.yaml:6: jobs[0].schedule.cron: "
                               "'*/61 * * * *' is not a valid cron expression")


def test_unknown_keys_are_errors_with_valid_keys_listed(tmp_path):
    """A typo in a key is an error naming the valid keys at that place."""
    main = "state_dir: st\nlocks:\n  stale_after: 5\n"
    found = issues(write(tmp_path, main, {"a": GOOD_JOB}))
    assert found == [f"{tmp_path}/wk.yaml:3: locks.stale_after: unknown key (valid keys here: "
                     "stale_after_s, check_interval_s)"]


def test_every_error_of_every_file_is_reported(tmp_path):
    """Errors in several jobs and files are all collected, not just the first."""
    bad_a = """\
    jobs:
      - id: one
        command: "echo hi"
        schedule: {every_s: 5}
      - id: two
        command: [x]
        schedule: {every_s: 5, cron: "* * * * *"}
      - id: three
        command: [x]
        schedule: {after: [nobody]}
    """
    bad_b = "jobs:\n  - id: x\n    command: [x]\n    schedule: {every_s: 1}\n    overlap: maybe\n"
    found = issues(write(tmp_path, "state_dir: st\n", {"a": bad_a, "b": bad_b}))
    text = "\n".join(found)
    assert "a.yaml:3: jobs[0].command: a string command needs `shell: true`" in text
    assert "a.yaml:7: jobs[1].schedule: exactly one of cron, every_s, after, always" in text
    assert "a.yaml:10: jobs[2].schedule.after[0]: unknown agent 'nobody'" in text
    assert "b.yaml:5: jobs[0].overlap: Invalid enum value 'maybe' (valid: skip, queue, " \
           "replace)" in text
    assert len(found) == 4


def test_broken_yaml_names_the_line(tmp_path):
    """Invalid YAML syntax is reported with its line."""
    found = issues(write(tmp_path, "state_dir: st\n", {"a": "jobs:\n  - id: [unclosed\n"}))
    assert found[0].startswith(f"{tmp_path}/agents.d/a.yaml:3: (document): invalid YAML")


def test_duplicate_keys_are_errors(tmp_path):
    """A key given twice in one mapping is an error instead of silently taking the last."""
    found = issues(write(tmp_path, "state_dir: st\nstop_grace_s: 1\nstop_grace_s: 2\n",
                         {"a": GOOD_JOB}))
    assert found == [f"{tmp_path}/wk.yaml:3: stop_grace_s: duplicate key (the later one would "
                     "silently win)"]


def test_wrong_type_and_bad_timezone(tmp_path):
    """A wrong type and an unknown time zone name the field and what is expected."""
    agent = """\
    jobs:
      - id: a
        command: [x]
        schedule: {cron: "0 3 * * *", timezone: Mars/Olympus}
      - id: b
        command: [x]
        schedule: {every_s: 5}
        timeout_s: soon
    """
    found = issues(write(tmp_path, "state_dir: st\n", {"a": agent}))
    assert any("a.yaml:4: jobs[0].schedule.timezone: 'Mars/Olympus' is not a known time zone"
               in f for f in found)
    assert any("a.yaml:8: jobs[1].timeout_s: Expected `float | null`, got `str`" in f
               for f in found)


def test_spawn_inputs_exec_cannot_take_are_errors(tmp_path):
    """NUL bytes in argv, cwd or env and env names that are empty or hold '=' are refused at
    load, naming file, line and field (and never an env value)."""
    agent = """\
    jobs:
      - id: argv
        command: [python3, "a\\0b"]
        cwd: "work\\0dir"
        env:
          "": empty
          "A=B": equals
          "C\\0D": nul
          TOKEN: "s3cr\\0t"
          FINE: ok
        schedule: {every_s: 60}
      - id: shell
        command: "echo \\0"
        shell: true
        schedule: {every_s: 60}
    """
    found = issues(write(tmp_path, "state_dir: st\n", {"a": agent}))
    name_rule = "(a variable name is a non-empty string without '=' or NUL)"
    file = f"{tmp_path}/agents.d/a.yaml"
    assert found == [
        f"{file}:3: jobs[0].command[1]: contains a NUL byte (an argument cannot hold one)",
        f"{file}:4: jobs[0].cwd: contains a NUL byte (not a valid path)",
        f"{file}:6: jobs[0].env: key '' is empty {name_rule}",
        f"{file}:7: jobs[0].env: key 'A=B' contains '=' {name_rule}",
        f"{file}:8: jobs[0].env: key 'C\\x00D' contains a NUL byte {name_rule}",
        f"{file}:9: jobs[0].env.TOKEN: the value contains a NUL byte (an environment value "
        "cannot hold one)",
        f"{file}:13: jobs[1].command: contains a NUL byte (an argument cannot hold one)",
    ]
    assert not any("s3cr" in f for f in found)


def test_file_that_is_not_utf8_names_the_line(tmp_path):
    """A file with bytes that are not UTF-8 is an error naming its line, not a crash."""
    path = write(tmp_path, "state_dir: st\n", {})
    (tmp_path / "agents.d" / "a.yaml").write_bytes(b"jobs:\n  - id: main\n"
                                                   b"    command: [x, \"\xff\"]\n")
    assert issues(path) == [f"{tmp_path}/agents.d/a.yaml:3: (document): byte 0xff is not UTF-8 "
                            "(YAML files are UTF-8 text)"]


def test_check_config_cli_prints_every_error_and_exits_nonzero(tmp_path):
    """`watchkeeper check-config` prints each error on its own line and exits 1."""
    path = write(tmp_path, "state_dir: st\nbogus: 1\n", {"a": "jobs: []\n"})
    res = wk("--config", str(path), "check-config")
    assert res.returncode == 1
    lines = res.stderr.strip().splitlines()
    assert lines[-1] == "2 error(s)"
    assert any(":2: bogus: unknown key" in ln for ln in lines)
    (tmp_path / "ok").mkdir()
    good = write(tmp_path / "ok", "state_dir: st\n", {"a": GOOD_JOB})
    res = wk("--config", str(good), "check-config")
    assert res.returncode == 0 and "OK (1 agents, 1 jobs)" in res.stdout


def test_bundled_demo_config_is_valid():
    """The bundled config/watchkeeper.yaml passes check-config."""
    res = wk("--config", str(ROOT / "config" / "watchkeeper.yaml"), "check-config")
    assert res.returncode == 0, res.stderr


def _all_fields(cls):
    for key, _type, _default, doc in config_docs.rows(cls):
        yield key, doc


@pytest.mark.parametrize("cls", [Settings, AgentSpec, Job])
def test_every_field_has_a_default_or_is_required_and_a_doc(cls):
    """Every config field, nested sections included, carries a documentation string."""
    missing = [key for key, doc in _all_fields(cls) if not doc]
    assert missing == []


def test_configuration_reference_is_current():
    """docs/configuration.md is exactly what `watchkeeper config-reference` prints."""
    assert (ROOT / "docs" / "configuration.md").read_text().strip() == \
        config_docs.render().strip()


def test_defaults_of_every_section_validate():
    """The defaults of the whole schema round-trip through validation unchanged."""
    defaults = msgspec.to_builtins(Settings())
    assert msgspec.convert(defaults, Settings) == Settings()


def test_relations_between_fields_are_refused_with_file_line_and_field(tmp_path):
    """The checks a schema cannot express (the loader's `_check_relations`) still say
    file:line: field: problem: memory thresholds out of order, postgresql without a dsn, a
    steward schema outside the subset, a webhook URL that is not http(s) (never echoed)."""
    main = """\
    state_dir: st
    memory_guard:
      clear_percent: 85
      fast_interval_s: 30
    storage:
      backend: postgresql
    steward:
      schemas:
        "notes/*": {type: object, patternProperties: {}}
    alerts:
      webhooks:
        - url: file:///etc/s3cr3t
    """
    found = issues(write(tmp_path, main, {"a": GOOD_JOB}))
    wk = f"{tmp_path}/wk.yaml"
    assert f"{wk}:2: memory_guard: memory percents must satisfy 0 <= clear_percent <= " \
           "warn_percent <= act_percent <= 100, got clear=85 warn=80 act=87" in found
    assert f"{wk}:2: memory_guard: memory intervals must satisfy 0 < fast_interval_s <= " \
           "slow_interval_s, got fast=30 slow=10" in found
    assert f"{wk}:5: storage.dsn: required with backend postgresql " \
           "(e.g. postgresql://watchkeeper@localhost/watchkeeper)" in found
    assert any(f.startswith(f"{wk}:9: steward.schemas.notes/*: ") and "patternProperties" in f
               for f in found)
    assert f"{wk}:12: alerts.webhooks[0].url: must be an http:// or https:// URL with a " \
           "host; got scheme 'file'" in found
    assert not any("s3cr3t" in f for f in found)


def test_shapes_in_the_schema_are_refused_with_file_line_and_field(tmp_path):
    """Job ids, identifiers, bare file names and non-empty lists are declared in the schema;
    a value of the wrong shape is refused with file:line: field: what would be valid."""
    agent = """\
    jobs:
      - id: Main
        command: []
        schedule: {after: []}
    """
    # msgspec stops at the first bad field of a file: one shape per load.
    main = "state_dir: st\nstorage:\n  schema: Bad-Name\n"
    assert issues(write(tmp_path, main, {"a": agent})) == [
        f"{tmp_path}/wk.yaml:3: storage.schema: 'Bad-Name' is not a plain identifier "
        "(lowercase letters, digits and '_', at most 63)",
        f"{tmp_path}/agents.d/a.yaml:2: jobs[0].id: 'Main' is not a valid id "
        "(lowercase letters, digits, '-' and '_', at most 64)"]
    agent = agent.replace("Main", "main")
    main = "state_dir: st\nsteward:\n  db_file: a/b.db\n"
    found = issues(write(tmp_path, main, {"a": agent}))
    assert found[0] == f"{tmp_path}/wk.yaml:3: steward.db_file: 'a/b.db' is not a bare file " \
                       "name (no '/')"
    assert found[1] == f"{tmp_path}/agents.d/a.yaml:3: jobs[0].command: the list is empty " \
                       "(valid: at least 1 item)"
    agent = agent.replace("command: []", "command: [x]")
    assert issues(write(tmp_path, "state_dir: st\n", {"a": agent})) == [
        f"{tmp_path}/agents.d/a.yaml:4: jobs[0].schedule.after: the list is empty "
        "(valid: at least 1 item)"]
