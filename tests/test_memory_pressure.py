"""The memory guard driven by the kernel (a PSI trigger wakes it), and per-run limits that
read only the run's own processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid

import pytest
from harness import DaemonProc, py
from support import require, wait_until
from test_memguard import own_memory_cgroup

from supervisor.health.memguard import Level, MemoryGuardSettings, interval_for
from supervisor.kernel import procscan
from supervisor.kernel.procscan import LiveRun, SystemMemory
from supervisor.kernel.psi import SYSTEM_MEMORY_PRESSURE, PressureTrigger

# Allocates far past its cgroup's limit: reclaim stalls, then the OOM killer; again and
# again until the test stops it (the shell loop itself stays small).
ALLOCATE_FOREVER = (f"while true; do {sys.executable} -c "
                    "'a = bytearray(100 << 20)\nfor i in range(0, len(a), 4096): a[i] = 1'; "
                    "done")


def psi_trigger_works() -> bool:
    trigger = PressureTrigger.open(stall_ms=1)
    if trigger is None:
        return False
    trigger.close()
    return True


@contextlib.contextmanager
def limited_cgroup(limit_bytes: int):
    """A child memory cgroup with this limit (its path and version), removed afterwards."""
    found = own_memory_cgroup()
    require(found is not None and os.access(found[0], os.W_OK),
            "no writable memory cgroup (need cgroup v1 memory or v2 with memory delegated)")
    parent, version = found
    path = parent / f"wk-psi-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
        (path / ("memory.max" if version == "v2" else "memory.limit_in_bytes")).write_text(
            str(limit_bytes))
    except OSError as err:
        require(False, f"cannot create a limited memory cgroup under {parent}: {err}")
    try:
        yield path, version
    finally:
        wait_until(lambda: not (path / "cgroup.procs").read_text().strip(), 10)
        path.rmdir()


@pytest.fixture
def tiny_cgroup():
    """A child memory cgroup limited to 32 MiB."""
    with limited_cgroup(32 << 20) as (path, _):
        yield path


def test_with_psi_the_guard_samples_slowly_far_from_the_threshold():
    """On a 4 GB machine at 50 % used the guard reads memory every slow_interval_s when the
    kernel notifies it, instead of every ~1.2 s."""
    settings = MemoryGuardSettings()
    half_used = SystemMemory(total_mb=4096.0, available_mb=2048.0)
    assert interval_for(Level.NORMAL, settings, half_used) == pytest.approx(1.2288)
    assert interval_for(Level.NORMAL, settings, half_used, kernel_notifies=True) == 10.0
    assert interval_for(Level.WARNING, settings, half_used, kernel_notifies=True) == 0.25


def test_pressure_stall_setting_is_bounded_by_the_kernel_window():
    """pressure_stall_ms outside 0..2000 (the kernel's 2 s window) is refused with the range."""
    import msgspec

    with pytest.raises(msgspec.ValidationError, match="<= 2000"):
        msgspec.convert({"pressure_stall_ms": 2500}, MemoryGuardSettings)


def test_real_allocation_in_a_limited_cgroup_wakes_the_guard_without_sampling(
        tmp_path, tiny_cgroup):
    """A real allocation stalling in a memory-limited cgroup fires the daemon's PSI trigger,
    and the guard's only reading besides the one at start is the one the trigger caused."""
    require(os.path.exists(SYSTEM_MEMORY_PRESSURE) and psi_trigger_works(),
            "no PSI triggers on this kernel (/proc/pressure/memory)")
    idle = {"jobs": [{"id": "m", "command": py("pass"), "schedule": {"every_s": 3600}}]}
    memory = {"pressure_stall_ms": 1, "slow_interval_s": 3600}
    with DaemonProc(tmp_path, {"idle": idle}, memory_guard=memory).start() as d:
        assert not d.find("psi_unavailable")
        hog = subprocess.Popen(["sh", "-c", f'echo $$ > {tiny_cgroup}/cgroup.procs && '
                                            f'exec sh -c "{ALLOCATE_FOREVER}"'],
                               start_new_session=True, stderr=subprocess.DEVNULL)
        try:
            event = d.wait_event("memory_pressure_notified", timeout_s=30)
        finally:
            os.killpg(hog.pid, signal.SIGKILL)
            hog.wait()
        assert event["samples"] == 2 and event["memory_level"] == "normal"


HOG = ("import sys\nblock = bytearray(80 << 20)\nfor i in range(0, len(block), 4096): block[i] = 1\n"
       "print('ready', flush=True)\nsys.stdin.read()")


def _guard_over_real_run(tmp_path, hog, run_pids):
    from supervisor.health.memguard import AgentMemorySettings, MemoryGuard

    return MemoryGuard(MemoryGuardSettings(run_check_interval_s=0), daemon_pid=os.getpid(),
                       state_dir=str(tmp_path),
                       live_runs=lambda: {"r1": LiveRun("hog", hog.pid)},
                       agent_settings=lambda agent: AgentMemorySettings(memory_max_mb=40),
                       run_pids=run_pids)


def test_run_limit_measures_only_the_runs_known_pids(tmp_path, monkeypatch):
    """A run over its memory_max_mb is stopped after reading only its own processes: the
    whole process table is never scanned (it is without the run's pids, as a control)."""
    scans = []
    real_read_ppids = procscan.read_ppids
    monkeypatch.setattr(procscan, "read_ppids", lambda *a: scans.append(1) or real_read_ppids(*a))
    hog = subprocess.Popen([sys.executable, "-c", HOG], stdin=subprocess.PIPE,
                           stdout=subprocess.PIPE, text=True)
    try:
        assert hog.stdout.readline().strip() == "ready"
        actions = _guard_over_real_run(tmp_path, hog, lambda rid, run: [run.root_pid]).tick(1.0)
        assert [(a.run_id, a.reason.value) for a in actions] == [("r1", "memory")]
        assert actions[0].memory_mb > 40 and scans == []
        _guard_over_real_run(tmp_path, hog, None).tick(1.0)
        assert scans  # the old path: a scan of every process's stat
    finally:
        hog.kill()
        hog.wait()


HOLD = ("import sys\nblock = bytearray(160 << 20)\nfor i in range(0, len(block), 4096): block[i] = 1\n"
        "print('holding', flush=True)\nsys.stdin.read()")


def test_crossing_warn_percent_of_a_v1_scope_cgroup_wakes_the_guard(tmp_path):
    """A real allocation that takes a cgroup v1 scope past warn_percent, without any stall,
    wakes the guard through the kernel's usage threshold: one reading besides the first."""
    with limited_cgroup(256 << 20) as (path, version):
        require(version == "v1", "usage thresholds are a cgroup v1 feature")
        memory = {"scope_cgroup": str(path), "warn_percent": 50, "act_percent": 95,
                  "clear_percent": 40, "slow_interval_s": 3600}
        idle = {"jobs": [{"id": "m", "command": py("pass"), "schedule": {"every_s": 3600}}]}
        with DaemonProc(tmp_path, {"idle": idle}, memory_guard=memory).start() as d:
            hog = subprocess.Popen(["sh", "-c", f'echo $$ > {path}/cgroup.procs && '
                                                f'exec "$0" -c "$1"', sys.executable, HOLD],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert hog.stdout.readline().strip() == "holding"
                event = d.wait_event("memory_pressure_notified", timeout_s=20)
            finally:
                hog.kill()
                hog.wait()
        assert event["path"].endswith("memory.usage_in_bytes")
        assert event["samples"] == 2 and event["memory_level"] == "warning"


HOLD_170 = ("import sys\nblock = b'x' * (170 << 20)\nprint('holding', flush=True)\n"
            "sys.stdin.read()")


def test_act_percent_of_the_guards_own_measure_wakes_it_past_a_file_cache(tmp_path):
    """With file cache in a cgroup v1 scope (counted in raw usage, not in the guard's
    measure), a real allocation past act_percent of the guard's measure still wakes it
    through the kernel at that point: critical with no periodic reading at all."""
    with limited_cgroup(256 << 20) as (path, version):
        require(version == "v1", "usage thresholds are a cgroup v1 feature")
        cache = tmp_path / "cache.bin"  # 48 MiB written from inside the cgroup: its cache
        subprocess.run(["sh", "-c", f'echo $$ > {path}/cgroup.procs && exec dd if=/dev/zero '
                                    f'of={cache} bs=1M count=48 conv=fsync status=none'],
                       check=True)
        memory = {"scope_cgroup": str(path), "warn_percent": 30, "act_percent": 60,
                  "clear_percent": 20, "slow_interval_s": 3600, "fast_interval_s": 3600}
        idle = {"jobs": [{"id": "m", "command": py("pass"), "schedule": {"every_s": 3600}}]}
        with DaemonProc(tmp_path, {"idle": idle}, memory_guard=memory).start() as d:
            hog = subprocess.Popen(["sh", "-c", f'echo $$ > {path}/cgroup.procs && '
                                                f'exec "$0" -c "$1"', sys.executable, HOLD_170],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            try:
                assert hog.stdout.readline().strip() == "holding"
                critical = d.wait_event("memory_level_changed", memory_level="critical",
                                        timeout_s=20)
                # Logged once that reading's work is done: wait for it before counting.
                d.wait_event("memory_pressure_notified", samples=critical["samples"])
            finally:
                hog.kill()
                hog.wait()
            notified = d.find("memory_pressure_notified")
    # One reading at start, then only readings the kernel caused.
    woken = [e for e in notified if e["samples"] <= critical["samples"]]
    assert critical["samples"] == 1 + len(woken)
    assert any(e["path"].endswith("(tracked)") for e in woken)
