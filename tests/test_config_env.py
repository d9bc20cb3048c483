"""Environment references (`${NAME}`, `${NAME:-default}`) in the main configuration file."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from harness import wk

from supervisor.cli.discovery import socket_of_config
from supervisor.config.env import EnvReferenceError, expand_string
from supervisor.config.load import load_config
from supervisor.errors import ConfigError

ALERTS = """\
state_dir: ./st
alerts:
  webhooks:
    - {url: "http://127.0.0.1:${WK_TEST_PORT:-8765}/webhooks/alerts"}
"""
AGENT = """\
jobs:
  - id: main
    command: [bash, -c, "echo ${WK_TEST_PORT:-none} $${HOME}"]
    schedule: {every_s: 60}
"""


def write(tmp_path: Path, main: str, agent: str = AGENT) -> Path:
    (tmp_path / "agents.d").mkdir(exist_ok=True)
    (tmp_path / "agents.d" / "a.yaml").write_text(agent)
    (tmp_path / "wk.yaml").write_text(textwrap.dedent(main))
    return tmp_path / "wk.yaml"


def alert_url(path: Path) -> str:
    return load_config(path).settings.alerts.webhooks[0].url


@pytest.mark.parametrize(("text", "environ", "expected"), [
    ("${P}", {"P": "9000"}, "9000"),
    ("${P:-8765}", {}, "8765"),
    ("${P:-8765}", {"P": ""}, "8765"),
    ("${P}", {"P": ""}, ""),
    ("a$${P}b", {"P": "x"}, "a${P}b"),
    ("$HOME and $1", {}, "$HOME and $1"),
])
def test_expand_string_follows_the_shell_forms(text, environ, expected):
    """${NAME}, ${NAME:-default} and $${ expand as a shell would; a bare $ is left alone."""
    assert expand_string(text, environ) == expected


@pytest.mark.parametrize(("text", "message"), [
    ("${UNSET_X}", "UNSET_X is not set"),
    ("${not a name}", "not a reference"),
    ("${P", "not a reference"),
])
def test_expand_string_rejects_unset_and_malformed_references(text, message):
    """An unset variable without default, or a malformed `${`, raises naming the valid forms."""
    with pytest.raises(EnvReferenceError, match=message):
        expand_string(text, {})


def test_expansion_is_bounded():
    """A value that would expand past MAX_EXPANDED_CHARS is an error, not a huge string."""
    with pytest.raises(EnvReferenceError, match="expands to more than"):
        expand_string("${BIG}" * 1000, {"BIG": "x" * 1000})


def test_main_file_reference_takes_the_environment_or_its_default(tmp_path, monkeypatch):
    """The alert URL takes WK_TEST_PORT from the environment, else the written default."""
    path = write(tmp_path, ALERTS)
    monkeypatch.delenv("WK_TEST_PORT", raising=False)
    assert alert_url(path) == "http://127.0.0.1:8765/webhooks/alerts"
    monkeypatch.setenv("WK_TEST_PORT", "9123")
    assert alert_url(path) == "http://127.0.0.1:9123/webhooks/alerts"


def test_agent_files_are_not_expanded(tmp_path, monkeypatch):
    """An agent's command keeps its ${...} text for the program's own shell to expand."""
    monkeypatch.setenv("WK_TEST_PORT", "9123")
    cfg = load_config(write(tmp_path, ALERTS))
    assert cfg.agents["a"].jobs[0].command[2] == "echo ${WK_TEST_PORT:-none} $${HOME}"


def test_unset_reference_is_a_config_error_naming_file_line_and_field(tmp_path, monkeypatch):
    """A reference to an unset variable without default names file, line, field and the fix."""
    monkeypatch.delenv("WK_TEST_UNSET", raising=False)
    path = write(tmp_path, "state_dir: ./st\nlog_level: ${WK_TEST_UNSET}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert [str(i) for i in info.value.issues] == [
        f"{path}:2: log_level: the environment variable WK_TEST_UNSET is not set (set it, or "
        "write ${WK_TEST_UNSET:-default} to give a default)"]


def test_check_config_reports_the_unset_reference_without_traceback(tmp_path, monkeypatch):
    """check-config exits 1 naming the unset variable, with no traceback."""
    monkeypatch.delenv("WK_TEST_UNSET", raising=False)
    path = write(tmp_path, "state_dir: ${WK_TEST_UNSET}\n")
    result = wk("--config", str(path), "check-config")
    assert result.returncode == 1
    assert "WK_TEST_UNSET is not set" in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_discovery_expands_the_socket_path_as_the_daemon_does(tmp_path, monkeypatch):
    """The CLI finds the socket under a state_dir written as a reference, as the daemon does."""
    monkeypatch.setenv("WK_TEST_STATE", str(tmp_path / "elsewhere"))
    path = write(tmp_path, "state_dir: ${WK_TEST_STATE}\n")
    assert socket_of_config(path) == tmp_path / "elsewhere" / "control.sock"
    assert load_config(path).socket_path == tmp_path / "elsewhere" / "control.sock"
