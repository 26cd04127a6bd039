"""One contender in its own interpreter, driven by the benchmark over stdin/stdout (one JSON line each way).

A process per contender keeps their thread pools from fighting (torch's OpenMP and onnxruntime's spinning
workers on a 2-core machine), shows what each costs to import and load in a fresh process, and its peak memory:
native allocations (onnxruntime arenas, torch tensors) are invisible to tracemalloc, so it reads VmHWM (peak
resident set) from /proc/self/status. The runtime's worker never imports torch.

    python -m cmath_bench.worker '{"backend": ..., "precision": ..., "threads": ..., "run_dir": ..., "export_dir": ...}'
    requests:  {"op": "warmup" | "time", "batch": B, "length": N, "count": k, "seconds": s}  ->  {"times": [...]}
               {"op": "probs", "batch": B, "length": N}  ->  {"probs": [...]}
               {"op": "stats"}  ->  {"peak_rss_mb": ..., "torch_imported": ...}
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

REPLY = "REPLY "


def vm(field: str) -> float | None:
    """VmRSS / VmHWM of this process in MiB (None where /proc is not available)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def build(job: dict[str, Any]) -> tuple[Any, Any, dict[str, Any]]:
    """Import, load (and for torch.compile: wrap) the contender; (contender, input spec, info)."""
    backend, precision, threads = job["backend"], job["precision"], job["threads"]
    info: dict[str, Any] = {"base_rss_mb": vm("VmRSS")}
    start = time.perf_counter()
    if backend.startswith(("pytorch-eager", "torch-compile")):
        import torch  # noqa: F401  (what a PyTorch caller imports)

        from . import backends

        info["import_s"] = time.perf_counter() - start
        contender = backends.torch_contender(backend, precision, Path(job["run_dir"]), threads)
    else:
        import cmath_runtime

        from . import backends  # imports torch only inside its torch functions, never here

        cmath_runtime.load  # noqa: B018  (resolves the lazy attribute: the runtime's modules)
        info["import_s"] = time.perf_counter() - start
        contender = backends.runtime(Path(job["export_dir"]), backend, precision, threads)
    info.update(
        contender.info, provider=contender.provider, note=contender.note, after_load_rss_mb=vm("VmRSS")
    )
    return contender, info.pop("spec"), info


def serve(job: dict[str, Any]) -> None:
    from .inputs import conversations
    from .timing import timed_calls

    try:
        contender, spec, info = build(job)
    except Exception as e:  # reported to the parent, which records it and goes on without this contender
        from .backends import Skipped

        said = {"skipped": str(e)} if isinstance(e, Skipped) else {"error": f"{type(e).__name__}: {e}"}
        reply({"ready": False, **{k: v[:600] for k, v in said.items()}})
        return
    reply({"ready": True, **info})
    calls: dict[tuple[int, int], Any] = {}
    for line in sys.stdin:
        req = json.loads(line)
        op = req["op"]
        if op == "quit":
            return
        try:
            if op == "stats":
                reply({"peak_rss_mb": vm("VmHWM"), "torch_imported": "torch" in sys.modules})
                continue
            shape = (req["batch"], req["length"])
            if shape not in calls:
                calls[shape] = contender.prepare(conversations(spec, *shape))
            if op == "probs":
                reply({"probs": contender.probs(calls[shape]()).tolist()})
            else:
                deadline = time.perf_counter() + req["seconds"] if req.get("seconds") else None
                reply({"times": timed_calls(calls[shape], req["count"], deadline)})
        except Exception as e:  # e.g. torch.compile failing on a new shape
            reply({"error": f"{type(e).__name__}: {e}"[:600]})


def reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(REPLY + json.dumps(obj) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
