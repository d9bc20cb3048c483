"""How every `watchkeeper` verb finds the daemon: one order, one function, one error."""

from __future__ import annotations

import os
import subprocess

import pytest
from harness import PY, DaemonProc, py

from supervisor.cli import discovery
from supervisor.cli.discovery import DaemonNotFound, find_socket


@pytest.fixture
def clean_env(monkeypatch, tmp_path):
    """No WATCHKEEPER_* variables, no installed configuration, cwd an empty directory."""
    for name in (discovery.SOCKET_ENV, discovery.CONFIG_ENV):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(discovery, "INSTALLED_CONFIG", tmp_path / "etc" / "watchkeeper.yaml")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return work


def write_config(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_socket_option_wins_over_everything(clean_env, monkeypatch, tmp_path):
    """--socket is used as given even when --config and both variables are set."""
    monkeypatch.setenv("WATCHKEEPER_SOCKET", "/env/sock")
    monkeypatch.setenv("WATCHKEEPER_CONFIG", "/env/config.yaml")
    config = write_config(tmp_path / "a.yaml", "state_dir: /a\n")
    assert find_socket("/given.sock", config) == discovery.Path("/given.sock")


def test_config_option_wins_over_socket_variable(clean_env, monkeypatch, tmp_path):
    """--config beats WATCHKEEPER_SOCKET: an operator's explicit file is not overridden."""
    monkeypatch.setenv("WATCHKEEPER_SOCKET", "/env/sock")
    config = write_config(tmp_path / "a.yaml", "state_dir: state\n")
    assert find_socket(None, config) == (tmp_path / "state" / "control.sock").resolve()


def test_socket_variable_wins_over_config_variable(clean_env, monkeypatch):
    """Inside a run, WATCHKEEPER_SOCKET is used before WATCHKEEPER_CONFIG is read."""
    monkeypatch.setenv("WATCHKEEPER_SOCKET", "/env/sock")
    monkeypatch.setenv("WATCHKEEPER_CONFIG", "/does/not/exist.yaml")
    assert find_socket() == discovery.Path("/env/sock")


def test_installed_config_wins_over_local(clean_env, tmp_path):
    """With nothing named, the installed configuration is used before config/watchkeeper.yaml."""
    write_config(discovery.INSTALLED_CONFIG, "control_socket: /installed.sock\n")
    write_config(clean_env / "config" / "watchkeeper.yaml", "control_socket: /local.sock\n")
    assert find_socket() == discovery.Path("/installed.sock")


def test_local_config_is_the_last_resort(clean_env):
    """Without an installed file, config/watchkeeper.yaml in the current directory is used."""
    write_config(clean_env / "config" / "watchkeeper.yaml", "state_dir: ../demo-state\n")
    assert find_socket() == clean_env / "demo-state" / "control.sock"


def test_error_lists_every_place_tried(clean_env):
    """With no configuration anywhere, the error names each place that was tried."""
    with pytest.raises(DaemonNotFound) as caught:
        find_socket()
    message = str(caught.value)
    for tried in ("--config", "$WATCHKEEPER_CONFIG", str(discovery.INSTALLED_CONFIG),
                  str(clean_env / "config" / "watchkeeper.yaml")):
        assert tried in message


def test_discovery_imports_no_yaml_when_socket_is_set():
    """Agents' verbs stay cheap: importing discovery and naming a socket loads no PyYAML."""
    code = ("import sys; from supervisor.cli.discovery import find_socket; find_socket('/s'); "
            "print('yaml' in sys.modules)")
    assert subprocess.run([PY, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"


OPERATOR_VERBS = [("status",), ("runs",), ("locks",), ("outputs",), ("breaker", "status"),
                  ("memory", "list", "notes"), ("memory", "history"), ("search", "anything")]


def test_every_operator_verb_finds_the_daemon_from_the_local_config(tmp_path):
    """Every read verb reaches the daemon with no --config from a directory holding
    config/watchkeeper.yaml, and with the global options after the verb."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHKEEPER_")}
    with DaemonProc(tmp_path / "config", {"idle": {"jobs": [
            {"id": "j", "command": py("pass"), "schedule": {"every_s": 3600}}]}}) as d:
        d.start()
        for verb in OPERATOR_VERBS:
            res = subprocess.run([PY, "-m", "supervisor.cli", *verb], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=30)
            assert res.returncode == 0, (verb, res.stderr)
        res = subprocess.run([PY, "-m", "supervisor.cli", "status", "--json", "--config",
                              str(d.config_path)], cwd="/", env=env, capture_output=True,
                             text=True, timeout=30)
        assert res.returncode == 0, res.stderr
        assert res.stdout.lstrip().startswith("{")
