"""The fork watch (kernel/forkwatch.py): the kernel wakes the daemon for forks of its own tree only."""

from __future__ import annotations

import os
import select
import subprocess
import sys

from support import require, wait_until

from supervisor.kernel.forkwatch import ForkWatch

# Forks one child when told to (a line on stdin), waits for it, reports, then waits again.
FORKER = ("import os, sys\n"
          "for line in sys.stdin:\n"
          "    pid = os.fork()\n"
          "    if pid == 0:\n"
          "        os._exit(0)\n"
          "    os.waitpid(pid, 0)\n"
          "    print('forked', flush=True)\n")


def _forker() -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", FORKER], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def _fork(proc: subprocess.Popen) -> None:
    proc.stdin.write("go\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "forked"


def _readable(watch: ForkWatch) -> bool:
    return bool(select.select([watch], [], [], 0)[0])


def test_only_forks_of_watched_pids_wake_the_watch():
    """A fork by a process outside the watched set queues nothing; a fork by a watched pid
    makes the watch readable with exactly that one event."""
    watched, other = _forker(), _forker()
    watch = ForkWatch.open({watched.pid})
    require(watch is not None, "the proc connector needs CAP_NET_ADMIN in the initial namespaces")
    try:
        _fork(other)
        _fork(watched)
        wait_until(lambda: _readable(watch), 10, message="the watched fork was not reported")
        assert watch.drain() == 1
        watch.watch({other.pid})
        _fork(watched)
        _fork(other)
        wait_until(lambda: _readable(watch), 10, message="the newly watched fork was not reported")
        assert watch.drain() == 1
    finally:
        for proc in (watched, other):
            proc.stdin.close()
            proc.wait()
        if watch is not None:
            watch.close()


def test_a_spawn_by_the_watching_process_is_reported():
    """A watch on its own pid reports the process's own spawn (the daemon starting a run)."""
    watch = ForkWatch.open({os.getpid()})
    require(watch is not None, "the proc connector needs CAP_NET_ADMIN in the initial namespaces")
    try:
        subprocess.run(["true"], check=True)
        wait_until(lambda: _readable(watch), 10, message="our own fork was not reported")
        assert watch.drain() == 1
    finally:
        watch.close()


THREADS_THEN_FORK = ("import os, threading, time\n"
                     "for i in range(5):\n"
                     "    t = threading.Thread(target=time.sleep, args=(0.001,))\n"
                     "    t.start()\n"
                     "    t.join()\n"
                     "if os.fork() == 0:\n"
                     "    os._exit(0)\n"
                     "os.wait()\n")


def test_threads_do_not_wake_the_watch():
    """Threads started by a child of a watched process (which the kernel reports as forks
    by that watched parent) queue nothing; the child's one fork after them is one event."""
    watch = ForkWatch.open({os.getpid()})
    require(watch is not None, "the proc connector needs CAP_NET_ADMIN in the initial namespaces")
    try:
        child = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.readline()\n"
                                  + THREADS_THEN_FORK], stdin=subprocess.PIPE, text=True)
        wait_until(lambda: _readable(watch), 10, message="the spawn was not reported")
        assert watch.drain() == 1  # the spawn, by this process
        watch.watch({os.getpid(), child.pid})
        child.stdin.write("go\n")
        child.stdin.close()
        child.wait()
        wait_until(lambda: _readable(watch), 10, message="the child's fork was not reported")
        assert watch.drain() == 1
    finally:
        watch.close()
