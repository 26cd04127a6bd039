"""The one description of the machine a benchmark ran on, which every report names beside its speed figures."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def describe() -> dict[str, str | int]:
    """{"cpu": the CPU's model name (/proc/cpuinfo, else the platform's), "cores": the cores this process may run
    on}: what cmath-bench, the server load and the replica benchmarks record as their machine."""
    return {"cpu": _cpu_name(), "cores": _cores()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1
