"""`watchkeeper` subcommands for the operator of a host: the journal and the systemd unit.

    watchkeeper logs AGENT [-f] [-p PRIORITY] [--since TIME]   journalctl, one agent's lines
    watchkeeper install-systemd --unit-file PATH                user, /etc/watchkeeper, unit
"""

from __future__ import annotations

import grp
import os
import pwd
import subprocess
import sys
from pathlib import Path

SERVICE = "watchkeeper.service"
USER = "watchkeeper"  # the unit's User= and Group=
STATE_DIR = "/var/lib/watchkeeper"  # the unit's StateDirectory=, and the user's home
DEFAULT_EXEC = Path("/opt/watchkeeper/bin/watchkeeper")  # the unit's ExecStart
DEFAULT_CONFIG_DIR = Path("/etc/watchkeeper")
SHIPPED_UNIT = Path(__file__).resolve().parent.parent.parent / "deploy" / "systemd" / SERVICE
# What the unit hides from the daemon: ProtectHome=yes and PrivateTmp=yes.
HIDDEN_PREFIXES = ("/home/", "/root/", "/run/user/", "/tmp/", "/var/tmp/")

SAMPLE_CONFIG = f"""\
# watchkeeper's settings. Each agent is one file in agents.d/: adding a file adds an
# agent, and `systemctl reload watchkeeper` applies the change. Every field, its default
# and its unit: `watchkeeper config-reference`.
state_dir: {STATE_DIR}
# Under the unit only the state directory is writable; agents run there unless a job
# sets cwd, and their HOME (Chrome's profile) is there too.
working_dir: {STATE_DIR}
agents_dir: agents.d
stop_grace_s: 10
log_level: info
# Members of this group are the host's operators: without --config they may run every
# verb, admin verbs included (pause, resume, breaker reset): `usermod -aG {USER} NAME`.
# An agent's uid never is, even in the group. docs/security.md.
socket_group: {USER}
"""


def add_ops_commands(sub) -> None:
    p = sub.add_parser("logs", help="an agent's lines from the journal (runs journalctl)")
    p.add_argument("agent")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    p.add_argument("-p", "--priority",
                   help="emerg, alert, crit, err, warning, notice, info, debug, or FROM..TO")
    p.add_argument("--since", help="journalctl time: '2024-05-01 10:00', today, or --since=-1h")
    p.add_argument("--until", help="journalctl time, like --since")
    p.add_argument("-n", "--lines", help="only the last N lines")
    p.add_argument("-o", "--output", help="journalctl output mode: short, cat, json...")
    p.add_argument("--unit", default="watchkeeper", help="the service (default: watchkeeper)")
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("install-systemd", help="create the watchkeeper user, /etc/watchkeeper "
                       "and the systemd unit (root)")
    p.add_argument("--unit-file", type=Path, default=None,
                   help=f"the unit to install (default: {SHIPPED_UNIT}, in a source checkout)")
    p.add_argument("--exec", dest="exec_path", type=Path, default=None,
                   help="the watchkeeper command the unit runs (default: the one next to "
                        "this Python)")
    p.add_argument("--config-dir", type=Path, default=DEFAULT_CONFIG_DIR)
    p.add_argument("--systemd-dir", type=Path, default=Path("/etc/systemd/system"))
    p.set_defaults(func=cmd_install_systemd)


# -- logs -----------------------------------------------------------------------------------
def journalctl_argv(args) -> list[str]:
    """journalctl selecting the unit's entries whose AGENT field names the agent."""
    argv = ["journalctl", f"--unit={args.unit}", f"AGENT={args.agent}"]
    if args.follow:
        argv.append("--follow")
    for flag, value in (("--priority", args.priority), ("--since", args.since),
                        ("--until", args.until), ("--lines", args.lines),
                        ("--output", args.output)):
        if value is not None:
            argv.append(f"{flag}={value}")
    return argv


def cmd_logs(args) -> int:
    argv = journalctl_argv(args)
    if _unit_inactive(args.unit):
        # The demo and any `watchkeeper run` by hand log to their terminal: without this,
        # the journal's "-- No entries --" reads as "the agent said nothing".
        print(f"watchkeeper logs: the {args.unit} unit is not running here; a daemon started "
              "by hand (`watchkeeper run`, the demo) prints its agents' lines on its own "
              "terminal, not to the journal", file=sys.stderr)
    sys.stdout.flush()
    try:
        os.execvp(argv[0], argv)
    except FileNotFoundError:
        print("watchkeeper logs: journalctl not found: agents' lines reach the journal only "
              "under systemd; a daemon started by hand logs them on its stderr",
              file=sys.stderr)
    return 1


def _unit_inactive(unit: str) -> bool:
    """True when systemctl says the unit is not active; False when it is, or when there
    is no systemctl to ask (journalctl alone may still hold older entries)."""
    try:
        result = subprocess.run(["systemctl", "is-active", "--quiet", unit],
                                capture_output=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode != 0


# -- install-systemd --------------------------------------------------------------------------
class InstallError(Exception):
    """A precondition of install-systemd failed; the message says what to do."""


def cmd_install_systemd(args) -> int:
    try:
        unit_file = _unit_file(args.unit_file)
        exec_path = _exec_path(args.exec_path)
        if os.geteuid() != 0:
            raise InstallError("needs root: it creates a system user and writes to /etc")
        ensure_user()
        write_sample_config(args.config_dir)
        install_unit(unit_file, args.systemd_dir, exec_path, args.config_dir)
    except (InstallError, OSError) as exc:
        print(f"watchkeeper install-systemd: {exc}", file=sys.stderr)
        return 1
    print(f"next: add agents to {args.config_dir / 'agents.d'}, check them with "
          f"`watchkeeper --config {args.config_dir / 'watchkeeper.yaml'} check-config`, "
          f"then `systemctl enable --now {SERVICE}`")
    return 0


def _unit_file(given: Path | None) -> Path:
    unit = given or SHIPPED_UNIT
    if not unit.is_file():
        raise InstallError(f"no unit file at {unit}: pass --unit-file "
                           f"deploy/systemd/{SERVICE} from the source tree")
    return unit


def _exec_path(given: Path | None) -> Path:
    """The command for ExecStart, refused when the unit's sandbox would hide it or its
    interpreter (the service would fail with status 203/EXEC or 126)."""
    path = Path(os.path.abspath(given or Path(sys.executable).parent / "watchkeeper"))
    if not path.is_file():
        raise InstallError(f"no watchkeeper command at {path}: pass --exec PATH")
    checked = [path, Path(os.path.realpath(path))]
    with open(path, "rb") as script:
        first = script.readline()
    if first.startswith(b"#!"):
        interpreter = first[2:].decode(errors="replace").split()[0]
        checked += [Path(interpreter), Path(os.path.realpath(interpreter))]
    for candidate in checked:
        hidden = [p for p in HIDDEN_PREFIXES if str(candidate).startswith(p)]
        if hidden:
            raise InstallError(
                f"{candidate} is under {hidden[0]}, which the unit hides from the daemon "
                "(ProtectHome=yes, PrivateTmp=yes): install watchkeeper into a virtual "
                "environment of its own, e.g. /opt/watchkeeper, from a system Python")
    return path


def ensure_user() -> None:
    try:
        pwd.getpwnam(USER)
        print(f"user {USER}: exists")
        return
    except KeyError:
        pass
    _run("useradd", "--system", "--user-group", "--home-dir", STATE_DIR, "--no-create-home",
         "--shell", "/usr/sbin/nologin", USER)
    print(f"user {USER}: created (home {STATE_DIR}, created by systemd's StateDirectory=)")


def write_sample_config(config_dir: Path) -> None:
    """/etc/watchkeeper/{watchkeeper.yaml,agents.d}; an existing file is never touched.
    Owned by root, readable by the daemon's group, not by others (webhook tokens)."""
    gid = grp.getgrnam(USER).gr_gid
    main = config_dir / "watchkeeper.yaml"
    for directory in (config_dir, config_dir / "agents.d"):
        if not directory.is_dir():
            directory.mkdir(mode=0o750)
            os.chown(directory, 0, gid)
            print(f"{directory}: created")
    if main.exists():
        print(f"{main}: exists, kept")
        return
    main.write_text(SAMPLE_CONFIG)
    os.chown(main, 0, gid)
    main.chmod(0o640)
    print(f"{main}: sample written")


def install_unit(unit_file: Path, systemd_dir: Path, exec_path: Path, config_dir: Path) -> None:
    """Copy the unit; a drop-in overrides ExecStart when the command or the configuration
    lives elsewhere than the unit says. Then `systemctl daemon-reload`."""
    target = systemd_dir / SERVICE
    _write_if_changed(target, unit_file.read_text(), 0o644)
    drop_in = systemd_dir / f"{SERVICE}.d" / "install.conf"
    if (exec_path, config_dir) != (DEFAULT_EXEC, DEFAULT_CONFIG_DIR):
        drop_in.parent.mkdir(mode=0o755, exist_ok=True)
        config = config_dir / "watchkeeper.yaml"
        _write_if_changed(drop_in, "# Written by `watchkeeper install-systemd`.\n[Service]\n"
                          f"ExecStart=\nExecStart={exec_path} --config {config} run\n"
                          f"ExecReload=\nExecReload={exec_path} --config {config} check-config\n"
                          "ExecReload=/bin/kill -HUP $MAINPID\n", 0o644)
    elif drop_in.exists():
        drop_in.unlink()
        print(f"{drop_in}: removed (the unit's ExecStart fits)")
    if not Path("/run/systemd/system").is_dir():
        print("systemd is not running here: run `systemctl daemon-reload` once it is")
        return
    _run("systemctl", "daemon-reload")
    print("systemctl daemon-reload: done")


def _write_if_changed(path: Path, text: str, mode: int) -> None:
    if path.exists() and path.read_text() == text:
        print(f"{path}: unchanged")
        return
    path.write_text(text)
    path.chmod(mode)
    print(f"{path}: installed")


def _run(*argv: str) -> None:
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise InstallError(f"`{' '.join(argv)}` exited {result.returncode}: "
                           f"{(result.stderr or result.stdout).strip()}")
