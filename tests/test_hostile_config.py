"""Hostile configuration files: each is a clear config error naming the file, never a hang,
a traceback or an exhausted memory."""

from __future__ import annotations

import os
import socket
import textwrap
from pathlib import Path

import pytest
from harness import wk

from supervisor.config.load import MAX_CONFIG_FILE_BYTES, MAX_CONFIG_TOTAL_BYTES, load_config
from supervisor.config.yamlguard import MAX_DEPTH
from supervisor.errors import ConfigError

GOOD_JOB = """\
jobs:
  - id: main
    command: [python3, agent.py]
    schedule: {every_s: 60}
"""

BILLION_LAUGHS = "\n".join(
    ["a: &a [x, x, x, x, x, x, x, x, x, x]"]
    + [f"{chr(98 + i)}: &{chr(98 + i)} [{', '.join([f'*{chr(97 + i)}'] * 10)}]"
       for i in range(8)]) + "\n"


def write(tmp_path: Path, main: str = "state_dir: ./st\n", agents: dict | None = None) -> Path:
    (tmp_path / "agents.d").mkdir(exist_ok=True)
    (tmp_path / "wk.yaml").write_text(textwrap.dedent(main))
    for name, text in (agents or {"ok": GOOD_JOB}).items():
        (tmp_path / "agents.d" / f"{name}.yaml").write_text(textwrap.dedent(text))
    return tmp_path / "wk.yaml"


def issues(path: Path) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return [str(i) for i in info.value.issues]


def plant(path: Path, kind: str) -> None:
    """Put a FIFO, symlink, socket, directory or /dev/zero link at `path`."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        target = path.parent / "target.txt"
        target.write_text("jobs: []\n")
        path.symlink_to(target)
    elif kind == "devzero":
        path.symlink_to("/dev/zero")
    elif kind == "socket":
        sock = socket.socket(socket.AF_UNIX)
        sock.bind(str(path))
        sock.close()
    elif kind == "directory":
        path.mkdir()


KINDS = ["fifo", "symlink", "devzero", "socket", "directory"]


@pytest.mark.parametrize("kind", KINDS)
def test_agent_file_that_is_not_a_regular_file_is_refused_with_its_path(tmp_path, kind):
    """An agents.d entry that is a FIFO, link, socket, directory or /dev/zero is a config
    error naming it, returned at once."""
    cfg = write(tmp_path)
    bad = tmp_path / "agents.d" / "bad.yaml"
    plant(bad, kind)
    found = issues(cfg)
    assert any(str(bad) in i and "refused" in i for i in found), found


@pytest.mark.parametrize("kind", ["fifo", "symlink", "devzero", "socket"])
def test_main_config_that_is_not_a_regular_file_is_refused(tmp_path, kind):
    """The main config file as a FIFO, link, socket or /dev/zero is refused with its path."""
    write(tmp_path)
    main = tmp_path / "main.yaml"
    plant(main, kind)
    found = issues(main)
    assert any(str(main) in i and "refused" in i for i in found), found


def test_oversized_config_is_refused_before_parsing(tmp_path):
    """A file over the documented size (2.6 M keys) is refused by its size, unparsed."""
    main = write(tmp_path)
    with open(main, "a") as f:
        f.write("".join(f"k{i}: 1\n" for i in range(MAX_CONFIG_FILE_BYTES // 6)))
    found = issues(main)
    assert len(found) == 1 and f"limit of {MAX_CONFIG_FILE_BYTES}" in found[0], found


def test_billion_laughs_is_refused(tmp_path):
    """Aliases that expand to a billion nodes are a config error on the alias's line."""
    cfg = write(tmp_path, agents={"ok": GOOD_JOB, "laughs": BILLION_LAUGHS})
    found = issues(cfg)
    assert any("laughs.yaml" in i and "billion laughs" in i for i in found), found


def test_deep_nesting_is_refused(tmp_path):
    """Nesting past the documented depth is a config error, not a RecursionError."""
    deep = "x: " + "[" * (MAX_DEPTH + 10) + "]" * (MAX_DEPTH + 10) + "\n"
    cfg = write(tmp_path, agents={"ok": GOOD_JOB, "deep": deep})
    found = issues(cfg)
    assert any("deep.yaml" in i and f"deeper than {MAX_DEPTH}" in i for i in found), found


def test_agents_dir_symlink_loop_is_a_config_error(tmp_path):
    """An agents_dir that is a symlink loop is reported, not a RuntimeError."""
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    cfg = write(tmp_path, "state_dir: ./st\nagents_dir: loop\n")
    found = issues(cfg)
    assert any("agents_dir" in i and "not a directory" in i for i in found), found


def test_job_after_its_own_agent_is_a_cycle(tmp_path):
    """A job `after:` its own agent is a config error."""
    selfish = GOOD_JOB.replace("{every_s: 60}", "{after: [selfish]}")
    found = issues(write(tmp_path, agents={"selfish": selfish}))
    assert any("selfish -> selfish" in i for i in found), found


def test_after_ring_between_agents_is_a_cycle(tmp_path):
    """Agents after each other in a ring are one config error naming the ring."""
    agents = {n: GOOD_JOB.replace("{every_s: 60}", f"{{after: [{up}]}}")
              for n, up in (("a", "c"), ("b", "a"), ("c", "b"))}
    found = issues(write(tmp_path, agents=agents))
    cycles = [i for i in found if "cycle" in i]
    assert len(cycles) == 1 and "a -> c -> b -> a" in cycles[0], found


def test_unknown_socket_group_is_a_config_error(tmp_path):
    """socket_group naming no group fails check-config, not `run` with a KeyError."""
    cfg = write(tmp_path, "state_dir: ./st\nsocket_group: no-such-group-wk\n")
    result = wk("--config", str(cfg), "check-config")
    assert result.returncode != 0
    assert "socket_group" in result.stdout + result.stderr
    assert "no-such-group-wk" in result.stdout + result.stderr
    assert "Traceback" not in result.stderr


def test_agent_files_over_the_total_budget_are_one_error(tmp_path):
    """Agent files that together pass the documented total are one error, none parsed."""
    filler = GOOD_JOB + "#" + "x" * (MAX_CONFIG_FILE_BYTES // 2) + "\n"
    count = MAX_CONFIG_TOTAL_BYTES // len(filler) + 2
    found = issues(write(tmp_path, agents={f"a{i}": filler for i in range(count)}))
    assert len(found) == 1 and f"at most {MAX_CONFIG_TOTAL_BYTES} together" in found[0], found


def test_socket_group_with_a_nul_byte_is_a_config_error(tmp_path):
    """A group name holding a NUL byte is a config error, not a ValueError."""
    found = issues(write(tmp_path, 'state_dir: ./st\nsocket_group: "a\\0b"\n'))
    assert any("socket_group" in i for i in found), found
