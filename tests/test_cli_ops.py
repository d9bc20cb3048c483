"""`watchkeeper logs` and the checks `watchkeeper install-systemd` makes before it changes
anything (the install itself runs under real systemd in test_systemd_e2e.py)."""

from __future__ import annotations

import os

from harness import wk

FAKE_JOURNALCTL = "#!/bin/sh\nprintf '%s\\n' \"$@\"\n"


def fake_path(tmp_path, journalctl: bool = True) -> dict:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if journalctl:
        (bin_dir / "journalctl").write_text(FAKE_JOURNALCTL)
        (bin_dir / "journalctl").chmod(0o755)
    return {"PATH": f"{bin_dir}{os.pathsep}/usr/bin:/bin" if journalctl else str(bin_dir)}


def test_logs_runs_journalctl_for_one_agent(tmp_path):
    """`watchkeeper logs` runs journalctl on the unit, matching AGENT=, with the options given."""
    res = wk("logs", "seo", "-f", "-p", "warning", "--since=-1h", "-n", "50", "-o", "json",
             env=fake_path(tmp_path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.splitlines() == [
        "--unit=watchkeeper", "AGENT=seo", "--follow", "--priority=warning", "--since=-1h",
        "--lines=50", "--output=json"]


def test_logs_unit_name_is_configurable(tmp_path):
    """--unit selects another service name; without options only the unit and agent are passed."""
    res = wk("logs", "seo", "--unit", "wk-staging", env=fake_path(tmp_path))
    assert res.stdout.splitlines() == ["--unit=wk-staging", "AGENT=seo"]


def test_logs_without_journalctl_says_why(tmp_path):
    """Without journalctl, `watchkeeper logs` exits 1 and says where the lines are instead."""
    res = wk("logs", "seo", env=fake_path(tmp_path, journalctl=False))
    assert res.returncode == 1
    assert res.stderr.startswith("watchkeeper logs: journalctl not found: agents' lines reach")


def test_install_refuses_command_the_unit_would_hide(tmp_path):
    """install-systemd refuses a watchkeeper command under /tmp (PrivateTmp) before any change."""
    command = tmp_path / "venv" / "bin" / "watchkeeper"
    command.parent.mkdir(parents=True)
    command.write_text("#!/usr/bin/python3\n")
    systemd_dir = tmp_path / "systemd"
    systemd_dir.mkdir()
    res = wk("install-systemd", "--exec", str(command), "--systemd-dir", str(systemd_dir),
             "--config-dir", str(tmp_path / "etc"))
    assert res.returncode == 1
    assert res.stderr.startswith(f"watchkeeper install-systemd: {command} is under /tmp/, "
                                 "which the unit hides from the daemon")
    assert list(systemd_dir.iterdir()) == [] and not (tmp_path / "etc").exists()


def test_install_names_missing_unit_file(tmp_path):
    """install-systemd without a unit file says which file it looked for and how to pass one."""
    res = wk("install-systemd", "--unit-file", str(tmp_path / "absent.service"))
    assert res.returncode == 1
    assert f"no unit file at {tmp_path / 'absent.service'}: pass --unit-file" in res.stderr


def test_logs_says_where_the_lines_are_when_the_unit_is_not_running(tmp_path):
    """When systemctl says the unit is inactive, `logs` says a hand-started daemon logs to
    its terminal, then still runs journalctl."""
    env = fake_path(tmp_path)
    (tmp_path / "bin" / "systemctl").write_text("#!/bin/sh\nexit 3\n")
    (tmp_path / "bin" / "systemctl").chmod(0o755)
    res = wk("logs", "content", env=env)
    assert res.returncode == 0
    assert res.stderr.startswith("watchkeeper logs: the watchkeeper unit is not running here")
    assert res.stdout.splitlines() == ["--unit=watchkeeper", "AGENT=content"]
