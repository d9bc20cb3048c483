"""The machine a figure was taken on: total memory and load average, printed beside every
figure (a loaded 2-core VPS and a quiet workstation give different numbers).
Standard library only: the benchmark scripts import it before any venv exists."""

from __future__ import annotations

import os


def machine_line() -> str:
    total_kib = next(int(line.split()[1]) for line in open("/proc/meminfo")
                     if line.startswith("MemTotal:"))
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return f"[{total_kib / 2**20:.1f} GiB total memory, load {load}]"
