"""Per-run pids.max: max_processes x 64 (pids.max counts threads), never more than the
service's own limit less a reserve for the daemon.

The kernel's enforcement under the shipped unit is not tested on this machine kind: its
pids controller is bound to the cgroup v1 hierarchy, so no cgroup v2 (not even the systemd
sandbox's) can delegate it. docs/reliability.md says so."""

from __future__ import annotations

from supervisor.kernel.cgroups import RESERVED_TASKS, RunCgroups


def test_a_runs_pids_max_is_clamped_below_the_base_limit(tmp_path):
    """create() writes max_pids into the run's pids.max, but at most the base cgroup's own
    pids.max less RESERVED_TASKS, and as asked where the base has no limit."""
    (tmp_path / "runs").mkdir()
    (tmp_path / "pids.max").write_text("512\n")
    cgroups = RunCgroups(tmp_path, created_base=False)
    assert (cgroups.create("small", max_pids=128) / "pids.max").read_text() == "128"
    assert (cgroups.create("big", max_pids=256 * 64) / "pids.max").read_text() == \
        str(512 - RESERVED_TASKS)
    (tmp_path / "pids.max").write_text("max\n")
    assert (cgroups.create("free", max_pids=256 * 64) / "pids.max").read_text() == "16384"
