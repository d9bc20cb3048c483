"""The side-by-side benchmark of watchkeeper and supervisord: venvs, daemons, probes,
workloads and the report. `bench/run.py` is the one entry point."""
