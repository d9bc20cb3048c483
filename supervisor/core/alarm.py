"""A wakeup for the loop's selector at an exact monotonic deadline: a Linux timerfd.

epoll counts its timeout in whole milliseconds, rounded up, so a timer the loop waited for
ran up to a millisecond after its deadline, plus the wakeup itself: every cron firing
started 1-2 ms late. Sleeping out the rest of the millisecond costs a second wakeup, which
a busy machine delays by a scheduler slice (p99 6-24 ms measured under load). A timerfd
armed at the deadline wakes epoll once, at the nanosecond the kernel's timer slack allows.

Where timerfd is missing, `fd` is -1 and the loop waits on epoll's timeout alone.
"""

from __future__ import annotations

import ctypes
import os

CLOCK_MONOTONIC = 1  # the clock of time.monotonic() on Linux
TFD_NONBLOCK = os.O_NONBLOCK
TFD_CLOEXEC = os.O_CLOEXEC
TFD_TIMER_ABSTIME = 1


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


class Alarm:
    """One-shot alarm on the monotonic clock; the fd turns readable when it rings."""

    __slots__ = ("fd", "_settime", "_deadline")

    def __init__(self) -> None:
        self.fd = -1
        self._deadline = 0.0
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)
        except (OSError, AttributeError):
            return
        if fd >= 0:
            self.fd, self._settime = fd, libc.timerfd_settime

    def ring_at(self, deadline: float) -> None:
        """Ring at `deadline` (time.monotonic()), replacing any earlier setting; a deadline
        already past rings at once."""
        if self.fd < 0 or deadline == self._deadline:
            return
        seconds = int(deadline)
        nanoseconds = min(999_999_999, int((deadline - seconds) * 1e9))
        # An all-zero it_value would disarm the timer instead.
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(seconds, nanoseconds or 1))
        if self._settime(self.fd, TFD_TIMER_ABSTIME, ctypes.byref(spec), None) == 0:
            self._deadline = deadline

    def silence(self, _mask: int = 0) -> None:
        """Read the ring (a selector callback): the fd is readable until then."""
        self._deadline = 0.0
        try:
            os.read(self.fd, 8)
        except BlockingIOError:
            pass

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
