"""Supervision of runs: the pipeline, one agent's record, spawning one run, task locks."""
