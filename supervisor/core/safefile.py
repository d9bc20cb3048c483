"""Opening files that someone else may have planted: never block, never follow a link.

Any agent can create files in the state dir (heartbeats, task locks), and an agents.d entry
may be anything. A FIFO there blocked the whole loop in open(); a symlink made the daemon
truncate the link's target; /dev/zero made a reader run out of memory. So every file the
daemon opens from the state dir or the config goes through here:

- `O_NOFOLLOW`: a symlink as the last component is refused (ELOOP), never followed;
- `O_NONBLOCK`: opening a FIFO returns at once instead of waiting for a writer;
- `fstat` after the open: only a regular file is accepted (not a FIFO, socket, device or
  directory), and, for reads, only one of at most `max_bytes`;
- the read itself stops at `max_bytes + 1`, so a file that grows after the fstat is caught.

Every refusal is an `UnsafeFile` (an OSError, so callers that already survive I/O errors
survive these) whose message names the path and says what was found.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

SAFE_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISLNK, "a symbolic link"))


class UnsafeFile(OSError):
    """A path that is not a regular file of acceptable size: refused, with the reason."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(errno.EINVAL, f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem

    def __str__(self) -> str:
        return f"{self.path}: {self.problem}"


def kind_of(mode: int) -> str:
    for test, kind in _KINDS:
        if test(mode):
            return kind
    return "not a regular file"


def open_regular(path: Path | str, flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """An fd on `path`, which must be a regular file and not a symlink; UnsafeFile otherwise.

    FileNotFoundError passes through unchanged (a missing file is an ordinary answer)."""
    try:
        fd = os.open(path, flags | SAFE_FLAGS, mode)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _refusal(path, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafeFile(path, f"is {kind_of(st.st_mode)}, not a regular file (refused)")
        # Regular files never block; clear the flag so later writes behave as usual.
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _refusal(path: Path | str, exc: OSError) -> OSError:
    if exc.errno == errno.ELOOP:
        return UnsafeFile(path, "is a symbolic link (refused: links in the state dir or the "
                                "configuration are never followed)")
    if exc.errno == errno.ENXIO:
        return UnsafeFile(path, "is a socket or a device without a reader (refused)")
    if exc.errno == errno.EISDIR:
        return UnsafeFile(path, "is a directory, not a regular file (refused)")
    return exc


def read_capped(path: Path | str, max_bytes: int) -> bytes:
    """The whole content of the regular file `path`, refused if over `max_bytes`."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > max_bytes:
            raise UnsafeFile(path, f"is {size} bytes, over the limit of {max_bytes} (refused)")
        chunks, total = [], 0
        while total <= max_bytes:
            chunk = os.read(fd, min(1 << 20, max_bytes + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > max_bytes:
            raise UnsafeFile(path, f"grew over the limit of {max_bytes} bytes while read "
                                   "(refused)")
        return b"".join(chunks)
    finally:
        os.close(fd)


def check_regular_if_exists(path: Path | str) -> None:
    """UnsafeFile if `path` exists and is not a regular file (a database another library
    opens: SQLite would follow a link or wait on a FIFO)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISREG(st.st_mode):
        raise UnsafeFile(path, f"is {kind_of(st.st_mode)}, not a regular file (refused)")


def is_real_dir(path: Path | str) -> bool:
    """A directory that is not a symlink to one: a planted `tasks` link would have the
    stale-lock check remove lock files wherever it points."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def is_loose_dir(mode: int) -> bool:
    """Group- or world-writable without the sticky bit: anyone in that set could replace
    any file in it (the state dir's rule, docs/reliability.md)."""
    return bool(mode & (stat.S_IWGRP | stat.S_IWOTH)) and not mode & stat.S_ISVTX


def check_state_dir(path: Path | str) -> str | None:
    """None when `path` is safe to keep state in; the reason to refuse it otherwise.

    The rule: the directory must be owned by the daemon's user (or root), and must not be
    group- or world-writable unless the sticky bit is set."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        st = os.stat(path)  # a configured link to a directory is the operator's choice
    if not stat.S_ISDIR(st.st_mode):
        return f"state_dir {path} is {kind_of(st.st_mode)}, not a directory"
    if st.st_uid not in (0, os.geteuid()):
        return (f"state_dir {path} is owned by uid {st.st_uid}, not by the daemon's user "
                f"(uid {os.geteuid()}) or root: chown it")
    if is_loose_dir(st.st_mode):
        return (f"state_dir {path} has mode {stat.S_IMODE(st.st_mode):04o}: group- or "
                "world-writable without the sticky bit lets others plant files; "
                f"chmod 0750 {path}")
    return None
