"""The one description of the machine a benchmark ran on, which every report names beside its speed figures."""

from __future__ import annotations

import os
import platform
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any


def describe() -> dict[str, str | int]:
    """{"cpu": the CPU's model name, "isa": its ISA class (cmath_runtime.cpu: avx2, avx512, avx512_vnni, amx, ...),
    "cores": the cores this process may run on}: what every benchmark records as its machine, beside its figures."""
    from cmath_runtime.cpu import cpu_info
    from cmath_runtime.session import default_threads

    cpu = cpu_info()
    return {"cpu": cpu.model, "isa": cpu.isa, "cores": default_threads()}


def environment(threads: int) -> dict[str, Any]:
    """describe() with the software, the threads every contender gets and the load average: cmath-bench's and the
    GPU check's description of their run."""
    import numpy
    import onnxruntime

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return {
        "python": platform.python_version(),
        "torch": torch_version,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        **describe(),
        "threads": threads,
        "load_average": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
    }


def export_of(path: Path) -> Path:
    """An export folder, given it or the run folder holding it (RUN/export)."""
    return path / "export" if (path / "export" / "export.json").is_file() else path


def server_env(
    export: Path,
    threads: int,
    queue_delay_us: int,
    load_start: float,
    module: str,
    argv: list[str] | None = None,
) -> dict[str, Any]:
    """What a server benchmark's report says of its run: the machine, the export (its folder's name), the server
    settings, the command (the export written EXPORT_DIR) and the load average at its start and end."""
    given = sys.argv[1:] if argv is None else argv
    here = {export.resolve(), export.resolve().parent}  # no path of this machine in a page
    args = ["EXPORT_DIR" if Path(a).resolve() in here else a for a in given]
    return {
        **describe(),
        "export": export.name,
        "threads": threads,
        "queue_delay_us": queue_delay_us,
        "command": f"python -m cmath_bench.{module} " + " ".join(args),
        "loadavg_start": load_start,
        "loadavg_end": os.getloadavg()[0],
    }
