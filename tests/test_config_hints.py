"""A value of the wrong type in the configuration is answered with the valid forms."""

from __future__ import annotations

import yaml
from harness import wk


def check(tmp_path, job_extra: dict) -> str:
    (tmp_path / "agents.d").mkdir()
    (tmp_path / "watchkeeper.yaml").write_text(yaml.safe_dump({"state_dir": "state"}))
    job = {"id": "j", "command": ["true"], "schedule": {"every_s": 5}, **job_extra}
    (tmp_path / "agents.d" / "a.yaml").write_text(yaml.safe_dump({"jobs": [job]},
                                                                 sort_keys=False))
    res = wk("--config", str(tmp_path / "watchkeeper.yaml"), "check-config")
    assert res.returncode == 1
    return res.stderr.splitlines()[0]


def test_schedule_always_as_a_word_names_the_mapping(tmp_path):
    """`schedule: always` is answered with `{always: true}` and the other valid forms."""
    line = check(tmp_path, {"schedule": "always"})
    assert line.startswith(f"{tmp_path / 'agents.d' / 'a.yaml'}:5: jobs[0].schedule: ")
    assert "`always` alone is a word: write {always: true}" in line
    assert "{every_s: 60}" in line and '{cron: "*/15 * * * *"' in line
    assert "{after: [research]}" in line


def test_bare_number_for_a_section_names_its_key(tmp_path):
    """`retries: 3` is answered with an example mapping that uses the number."""
    line = check(tmp_path, {"retries": 3})
    assert line.endswith("(valid forms: {max_attempts: 3, backoff_s: 30}; a bare number "
                         "needs its key, e.g. {max_attempts: 3})")
