"""A real systemd, booted as PID 1 of its own namespaces, for end-to-end tests of units.

The sandbox boots /lib/systemd/systemd in new pid, mount, uts, ipc and cgroup namespaces, with its
root pivoted onto an overlay whose lower dir is the host's `/`: every host path (the repo, the venv) is visible
inside, and every write inside lands in the overlay's upper dir. systemd never boots on the real
root, where systemd-tmpfiles would clean the host's /tmp.

    box = SystemdSandbox(tmp_path)
    box.start()
    box.install_unit("demo.service", UNIT_TEXT)
    box.run("systemctl", "start", "demo.service")
    box.stop()

Layout inside: pure cgroup v2 (a cgroup2 mount at /sys/fs/cgroup rooted, through the cgroup
namespace, at a fresh host cgroup), read-only /sys (so udev stays off the host's devices), a
tmpfs /dev with bind-mounted basic nodes, a tmpfs /run, the host's network namespace.

Run `python tests/sandbox_systemd.py shell` for an interactive root shell in a fresh sandbox.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn, TypeVar

import psutil

SYSTEMD = "/lib/systemd/systemd"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
CONTAINER_NAME = "watchkeeper-sandbox"
BOOT_TIMEOUT_S = 60.0
SETTLED_STATES = frozenset({"running", "degraded"})

# Units of the host's image that cannot work, or must not run, in the sandbox: it shares the
# host's network, so sockets the host may hold fail to bind; cleaning /tmp is pointless here.
MASKED_UNITS = (
    "epmd.socket",
    "systemd-tmpfiles-clean.timer",
    "apt-daily.timer",
    "apt-daily-upgrade.timer",
    "e2scrub_all.timer",
    "fstrim.timer",
    "man-db.timer",
)
# Device nodes bind-mounted from the host into the sandbox's /dev (as systemd-nspawn does).
DEVICE_NODES = ("null", "zero", "full", "random", "urandom", "tty")
CLONE_NEWCGROUP = 0x02000000

T = TypeVar("T")


class SandboxError(RuntimeError):
    """The sandbox could not boot, or a unit in it did not reach the expected state."""


class SandboxCommandError(SandboxError):
    """A command run inside the sandbox exited non-zero; the message carries its output."""

    def __init__(self, result: subprocess.CompletedProcess[str]) -> None:
        self.result = result
        super().__init__(
            f"{' '.join(result.args)} exited {result.returncode}\n"
            f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")


class SystemdSandbox:
    """One booted systemd; start() it, run() commands in it, stop() it (SIGKILL to its PID 1)."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = Path(tmp_path) / "systemd-sandbox"
        self.upper = self.root / "upper"
        self.merged = self.root / "merged"
        self.boot_log = self.root / "boot.log"
        self.console_log = self.root / "console.log"
        self.name = f"{CONTAINER_NAME}-{uuid.uuid4().hex[:8]}"
        self.pid: int | None = None
        self._unshare: subprocess.Popen[bytes] | None = None
        self._cgroup: Path | None = None

    # -- availability ------------------------------------------------------------------------

    @staticmethod
    def available() -> tuple[bool, str]:
        """Whether this machine can boot a sandbox, and if not, what is missing."""
        if os.geteuid() != 0:
            return False, "the systemd sandbox needs root (mounts and namespaces)"
        for tool in ("unshare", "nsenter", "mount"):
            if shutil.which(tool) is None:
                return False, f"the systemd sandbox needs `{tool}` (util-linux)"
        if not os.access(SYSTEMD, os.X_OK):
            return False, f"the systemd sandbox needs {SYSTEMD} (apt-get install systemd)"
        if "overlay" not in Path("/proc/filesystems").read_text():
            return False, "the systemd sandbox needs overlayfs in the kernel"
        if _cgroup2_mount() is None:
            return False, "the systemd sandbox needs a cgroup2 hierarchy mounted on the host"
        probe = subprocess.run(["unshare", "--pid", "--fork", "--mount", "--cgroup", "true"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            return False, f"cannot create namespaces here: {probe.stderr.strip()}"
        return True, ""

    # -- life cycle --------------------------------------------------------------------------

    def start(self, timeout_s: float = BOOT_TIMEOUT_S) -> None:
        """Boot systemd and return once `systemctl is-system-running` says running or degraded."""
        if self._unshare is not None:
            raise SandboxError("sandbox already started")
        for directory in (self.upper, self.root / "work", self.merged):
            directory.mkdir(parents=True, exist_ok=True)
        self.console_log.touch()
        for unit in MASKED_UNITS:
            self.write_file(f"/etc/systemd/system/{unit}", None, symlink_to="/dev/null")
        # tmp.conf's `D /tmp` empties /tmp at boot: inside the overlay that would hide the
        # host's /tmp (the venv, pytest's tmp_path); an empty file in /etc masks it.
        self.write_file("/etc/tmpfiles.d/tmp.conf", "")
        self._cgroup = _cgroup2_mount() / self.name  # type: ignore[operator]
        self._cgroup.mkdir()
        with open(self.boot_log, "ab") as boot_log:
            self._unshare = subprocess.Popen(
                ["unshare", "--pid", "--fork", "--mount", "--uts", "--ipc",
                 "--propagation", "private", "--",
                 sys.executable, str(Path(__file__).resolve()), "boot",
                 str(self.root), str(self._cgroup)],
                stdin=subprocess.DEVNULL, stdout=boot_log, stderr=subprocess.STDOUT,
                env={"PATH": PATH}, start_new_session=True)
        try:
            self.pid = self._wait(self._find_systemd, timeout_s, "systemd to exec")
            self._wait(self._settled, timeout_s, "systemctl is-system-running")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Kill the sandbox's PID 1 (the kernel then kills the rest) and remove its cgroups.

        The mounts live only in the sandbox's mount namespace, which goes away with its last
        process, so nothing is left mounted on the host.
        """
        if self._unshare is not None:
            target = self.pid or self._first_child()
            if target is not None:
                try:
                    os.kill(target, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            try:
                self._unshare.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._unshare.kill()
                self._unshare.wait(timeout=30)
            self._unshare = None
            self.pid = None
        if self._cgroup is not None:
            self._wait(lambda: _remove_cgroup_tree(self._cgroup), 30.0, "cgroups to empty")
            self._cgroup = None

    def __enter__(self) -> SystemdSandbox:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- commands ----------------------------------------------------------------------------

    def command(self, *argv: str) -> list[str]:
        """The host argv that runs `argv` inside the sandbox (for Popen)."""
        if self.pid is None:
            raise SandboxError("sandbox not started")
        return ["nsenter", "--target", str(self.pid), "--all", "--root", "--wd", "--", *argv]

    def run(self, *argv: str, check: bool = True, timeout_s: float = 60.0,
            input: str | None = None, env: dict[str, str] | None = None,
            ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside the sandbox as root and capture its output."""
        result = subprocess.run(self.command(*argv), capture_output=True, text=True,
                                input=input, timeout=timeout_s, env=self.environment(env))
        if check and result.returncode != 0:
            raise SandboxCommandError(result)
        return result

    @staticmethod
    def environment(extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment of commands run inside: plain, uncoloured, no pager."""
        return {"PATH": PATH, "LANG": "C.UTF-8", "TERM": "dumb", "SYSTEMD_COLORS": "0",
                "SYSTEMD_PAGER": "", "SYSTEMD_LESS": "", **(extra or {})}

    # -- files -------------------------------------------------------------------------------

    def host_path(self, path_inside: str) -> Path:
        """Where the host reaches `path_inside`: through PID 1's root once booted, else upper."""
        relative = Path(path_inside).relative_to("/")
        if self.pid is not None:
            return Path(f"/proc/{self.pid}/root") / relative
        return self.upper / relative

    def write_file(self, path_inside: str, text: str | None, mode: int = 0o644,
                   symlink_to: str | None = None) -> None:
        """Create or replace a file (or a symlink) inside the sandbox, with parent dirs."""
        target = self.host_path(path_inside)
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        if symlink_to is not None:
            target.symlink_to(symlink_to)
            return
        target.write_text(text or "")
        target.chmod(mode)

    def read_file(self, path_inside: str) -> str:
        return self.host_path(path_inside).read_text()

    # -- units -------------------------------------------------------------------------------

    def install_unit(self, name: str, text: str) -> None:
        """Write /etc/systemd/system/<name> and reload systemd."""
        self.write_file(f"/etc/systemd/system/{name}", text)
        self.run("systemctl", "daemon-reload")

    def unit_property(self, unit: str, name: str) -> str:
        """One property of a unit as `systemctl show` prints it (e.g. NRestarts, MainPID)."""
        return self.run("systemctl", "show", "--property", name, "--value", unit).stdout.strip()

    def wait_active(self, unit: str, timeout_s: float = 30.0) -> None:
        """Wait until `unit` is active; fail early, with its status, when it fails."""
        def active() -> bool:
            state = self.run("systemctl", "is-active", unit, check=False).stdout.strip()
            if state == "failed":
                raise SandboxError(f"{unit} failed:\n{self.status(unit)}")
            return state == "active"

        try:
            self._wait(active, timeout_s, f"{unit} to become active")
        except TimeoutError as exc:
            raise SandboxError(f"{exc}\n{self.status(unit)}") from None

    def status(self, unit: str) -> str:
        """`systemctl status` of a unit (with its last journal lines), for failure messages."""
        return self.run("systemctl", "status", "--lines=30", "--full", unit, check=False).stdout

    # -- internals ---------------------------------------------------------------------------

    def _wait(self, condition: Callable[[], T], timeout_s: float, what: str) -> T:
        deadline = time.monotonic() + timeout_s
        while True:
            value = condition()
            if value:
                return value
            if self._unshare is not None and self._unshare.poll() is not None:
                raise SandboxError(f"sandbox exited {self._unshare.returncode} while waiting "
                                   f"for {what}\n{self._logs()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"sandbox: no {what} within {timeout_s}s\n{self._logs()}")
            time.sleep(0.1)

    def _first_child(self) -> int | None:
        try:
            children = psutil.Process(self._unshare.pid).children()  # type: ignore[union-attr]
        except psutil.NoSuchProcess:
            return None
        return children[0].pid if children else None

    def _find_systemd(self) -> int | None:
        pid = self._first_child()
        try:
            return pid if pid is not None and psutil.Process(pid).name() == "systemd" else None
        except psutil.NoSuchProcess:
            return None

    def _settled(self) -> bool:
        state = self.run("systemctl", "is-system-running", check=False, timeout_s=10.0)
        return state.stdout.strip() in SETTLED_STATES

    def _logs(self) -> str:
        tails = []
        for log_file in (self.boot_log, self.console_log):
            if log_file.exists():
                lines = log_file.read_text(errors="replace").splitlines()[-20:]
                tails.append(f"--- {log_file.name} ---\n" + "\n".join(lines))
        return "\n".join(tails)


def _cgroup2_mount() -> Path | None:
    """Where the host mounts its cgroup2 tree (/sys/fs/cgroup, or .../unified when hybrid)."""
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        fields = line.split()
        separator = fields.index("-")
        if fields[separator + 1] == "cgroup2":
            return Path(fields[4])
    return None


def _remove_cgroup_tree(top: Path) -> bool:
    """rmdir a cgroup and its children, deepest first; False while some still hold processes."""
    if not top.exists():
        return True
    for directory, _, _ in sorted(os.walk(top), key=lambda entry: -entry[0].count("/")):
        try:
            os.rmdir(directory)
        except FileNotFoundError:
            pass
        except OSError:
            return False
    return True


# -- boot stage: runs as PID 1 of the new pid namespace, then becomes systemd ------------------


def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True)


def _boot(root: Path, cgroup: Path) -> NoReturn:
    """Enter a fresh cgroup namespace, mount the sandbox's root, and exec systemd in it."""
    (cgroup / "cgroup.procs").write_text("0")
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.unshare(CLONE_NEWCGROUP) != 0:  # os.unshare arrives in Python 3.12
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWCGROUP)")
    merged = root / "merged"
    _mount("--make-rprivate", "/")
    _mount("-t", "overlay", "overlay", "-o",
           f"lowerdir=/,upperdir={root / 'upper'},workdir={root / 'work'}", str(merged))
    _mount("-t", "proc", "-o", "nosuid,nodev,noexec", "proc", f"{merged}/proc")
    # Read-only /sys keeps systemd-udevd (ConditionPathIsReadWrite=/sys) from re-triggering
    # the host's devices; the cgroup tree on top of it stays writable for systemd.
    _mount("-t", "sysfs", "-o", "ro,nosuid,nodev,noexec", "sysfs", f"{merged}/sys")
    _mount("-t", "cgroup2", "-o", "nosuid,nodev,noexec", "cgroup2", f"{merged}/sys/fs/cgroup")
    _mount("-t", "tmpfs", "-o", "mode=755,nosuid,nodev", "tmpfs", f"{merged}/run")
    _populate_dev(root, merged / "dev")
    _pivot_root(merged)
    os.execve(SYSTEMD, [SYSTEMD, "--system", "--unit=basic.target"],
              {"container": CONTAINER_NAME, "PATH": PATH})


def _pivot_root(new_root: Path) -> None:
    """Make `new_root` the root of the mount namespace and detach the host's tree.

    pivot_root, not chroot: the kernel refuses to create user namespaces inside a chroot
    (EPERM), and Chrome's sandbox is built on them.
    """
    put_old = new_root / ".host-root"
    put_old.mkdir(exist_ok=True)
    subprocess.run(["pivot_root", str(new_root), str(put_old)], check=True)
    os.chdir("/")
    subprocess.run(["umount", "--lazy", "/.host-root"], check=True)
    os.rmdir("/.host-root")


def _populate_dev(root: Path, dev: Path) -> None:
    """A private /dev: a few host nodes, its own ptys, and console.log as the console."""
    _mount("-t", "tmpfs", "-o", "mode=755,nosuid", "tmpfs", str(dev))
    for node in (*DEVICE_NODES, "console"):
        (dev / node).touch()
    for node in DEVICE_NODES:
        _mount("--bind", f"/dev/{node}", str(dev / node))
    _mount("--bind", str(root / "console.log"), str(dev / "console"))
    (dev / "pts").mkdir()
    _mount("-t", "devpts", "-o", "newinstance,ptmxmode=0666,mode=620,gid=5", "devpts",
           str(dev / "pts"))
    (dev / "ptmx").symlink_to("pts/ptmx")
    (dev / "shm").mkdir()
    _mount("-t", "tmpfs", "-o", "mode=1777,nosuid,nodev", "tmpfs", str(dev / "shm"))
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        (dev / name).symlink_to(target)


def _shell(argv: Sequence[str]) -> None:
    """Boot a sandbox in a temporary directory and open an interactive shell inside it."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="wk-sandbox-") as tmp, SystemdSandbox(Path(tmp)) as box:
        print(f"sandbox PID 1 is {box.pid}; exit the shell to tear it down", file=sys.stderr)
        subprocess.run(box.command(*(argv or ["/bin/bash"])), env=box.environment())


if __name__ == "__main__":
    if sys.argv[1:2] == ["boot"]:
        _boot(Path(sys.argv[2]), Path(sys.argv[3]))
    elif sys.argv[1:2] == ["shell"]:
        _shell(sys.argv[2:])
    else:
        sys.exit("usage: sandbox_systemd.py shell [command...]")
