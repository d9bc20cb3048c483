"""The bundled demo pipeline end to end: the five agents in agents/, run by a real daemon from
the repository's own config/, with the demo's page server and webhook receiver."""

from __future__ import annotations

import os
import sys

from harness import wk

from supervisor.runner import with_own_bin


# -- daemon behaviour the demo relies on ------------------------------------------------------
def test_agents_find_the_daemons_own_cli():
    """The daemon's bin directory is added to an agent's PATH once, after what PATH had."""
    own = os.path.dirname(sys.executable)
    assert with_own_bin("/usr/bin:/bin") == f"/usr/bin:/bin:{own}"
    assert with_own_bin(f"{own}:/usr/bin") == f"{own}:/usr/bin"


def test_check_config_reports_a_missing_agents_dir(tmp_path):
    """check-config names a missing agents.d and exits 1 instead of looping forever."""
    config = tmp_path / "watchkeeper.yaml"
    config.write_text(f"state_dir: {tmp_path / 'state'}\n")
    result = wk("--config", str(config), "check-config", timeout_s=20)
    assert result.returncode == 1
    assert "agents_dir: " in result.stderr and "is not a directory" in result.stderr
