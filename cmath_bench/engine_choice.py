"""What backend="auto" / precision="auto" choose on this machine, timed against the engines it chose among.

    python -m cmath_bench.engine_choice EXPORT [--threads N] [--quick] [--csv-dir DIR] [--out FILE]

Contenders (ENGINES), each a cmath_runtime.load of the same export; the auto ones calibrate in this run (a fresh
choice cache). Two calls, p50 in interleaved rounds: the text path's live call (cmath_bench.text_path) and
model.predict on one conversation of UTTERANCES utterances, batch 1; both on the machine as it is, then beside a
CPU-bound process on one core. Every record names the CPU and its ISA class.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import cmath_runtime
from cmath_runtime.cpu import cpu_info
from cmath_runtime.files import atomic_write_json

from .inputs import InputSpec, conversations
from .text_path import HISTORY, live_conversations, live_timer, runtime_contender, text_source
from .timing import Budget, interleaved, percentiles_ms, quiesce, repeating

BUDGET = Budget(warmup=3, iterations=60, seconds=6.0, min_iterations=10, rounds=6)
QUICK_BUDGET = Budget(warmup=2, iterations=16, seconds=2.0, min_iterations=5, rounds=4)
UTTERANCES = 50
LIVE = 8  # live conversations the text-path calls cycle through
AUTO, AUTO_AUTO = "auto", "auto+auto"
ENGINES: dict[str, dict[str, Any]] = {  # contender -> load() arguments
    AUTO: {"backend": "auto"},
    AUTO_AUTO: {"backend": "auto", "precision": "auto"},
    "onnxruntime fp32": {"backend": "cpu"},
    "openvino fp32": {"backend": "openvino"},
    "onnxruntime int8": {"backend": "cpu", "precision": "int8"},
}


@contextlib.contextmanager
def busy_core(seconds: float) -> Iterator[None]:
    """A CPU-bound process on one core for at most `seconds` (ended when the block ends)."""
    code = f"import time\nend = time.monotonic() + {seconds:.0f}\nwhile time.monotonic() < end:\n    pass\n"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        yield
    finally:
        proc.kill()
        proc.wait()


def load_contenders(export: Path, threads: int, cache: Path) -> tuple[dict[str, Any], dict[str, str]]:
    models, skipped = {}, {}
    for name, kw in ENGINES.items():
        try:
            models[name] = cmath_runtime.load(export, threads=threads, choice_cache=cache, **kw)
        except cmath_runtime.CmathError as e:
            skipped[name] = str(e)
    return models, skipped


def run(
    export: Path, threads: int, budget: Budget, csv_dir: Path | None = None, log: Any = print
) -> dict[str, Any]:
    cpu = cpu_info()
    with tempfile.TemporaryDirectory(prefix="cmath-choice-") as cache:
        models, skipped = load_contenders(export, threads, Path(cache))
        first = next(iter(models.values()))
        timers: dict[str, Any] = {}
        if first.manifest.text_encoder is not None and "t" in first.modalities:
            dialogues, source = text_source(csv_dir, first.num_speakers)
            convs = live_conversations(dialogues, LIVE, first.num_speakers, min(HISTORY, first.max_len - 1))
            for name, model in models.items():
                timers[f"text path | {name}"] = live_timer(runtime_contender(name, model, ""), convs)
            log(
                f"text path: {len(convs)} live conversations of {len(convs[0].texts) - 1} turns from {source}"
            )
        [conv] = conversations(InputSpec.of(first), 1, min(UTTERANCES, first.max_len))
        predict = f"model {len(conv['speakers'])} utt."
        for name, model in models.items():
            timers[f"{predict} | {name}"] = repeating(functools.partial(model.predict, [conv], batch_size=1))
        records = []
        where = {"cpu": cpu.model, "isa": cpu.isa, "threads": threads}
        for phase in ("quiet", "beside a busy core"):
            seconds = 4 * budget.seconds * len(timers) + 60
            with busy_core(seconds) if phase != "quiet" else contextlib.nullcontext():
                timings = interleaved(timers, budget, settle=lambda _name: quiesce())
            for key, times in timings.times.items():
                call, name = key.split(" | ")
                if times:
                    engine = engine_of(models[name])
                    records.append(
                        {"call": call, "contender": name, "phase": phase, **where, "engine": engine}
                        | percentiles_ms(times)
                    )
            skipped.update(timings.errors)
        choices = {
            name: {part: c.summary() for part, c in models[name].engine_choice.items()}
            for name in (AUTO, AUTO_AUTO)
            if name in models
        }
    return {
        "benchmark": "engine_choice",
        "cpu": cpu.to_json(),
        "threads": threads,
        "records": records,
        "choices": choices,
        "skipped": skipped,
    }


def engine_of(model: Any) -> str:
    return ", ".join(f"{part} {c.backend} {c.precision}" for part, c in model.engine_choice.items())


def table(report: dict[str, Any]) -> str:
    """p50 per call, contender and phase, and each contender's ratio to onnxruntime fp32 (same call, phase)."""
    cpu = report["cpu"]
    lines = [
        f"CPU: {cpu['model']} (ISA class {cpu['isa']}), {report['threads']} threads; p50 ms, and onnxruntime fp32 p50 / this p50",
        "",
        "| call | phase | contender | engine | p50 ms | speed vs ort fp32 |",
        "|---|---|---|---|---:|---:|",
    ]
    base = {
        (r["call"], r["phase"]): r["p50_ms"]
        for r in report["records"]
        if r["contender"] == "onnxruntime fp32"
    }
    for r in report["records"]:
        ref = base.get((r["call"], r["phase"]))
        ratio = f"{ref / r['p50_ms']:.2f}x" if ref else "n/a"
        lines.append(
            f"| {r['call']} | {r['phase']} | {r['contender']} | {r['engine']} | {r['p50_ms']:.2f} | {ratio} |"
        )
    lines += ["", *(f"- {name}: {c}" for name, cs in report["choices"].items() for c in cs.values())]
    lines += [f"- skipped {k}: {v}" for k, v in report["skipped"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("export", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--csv-dir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the report (JSON) here")
    args = parser.parse_args(argv)
    report = run(args.export, args.threads, QUICK_BUDGET if args.quick else BUDGET, args.csv_dir)
    print(table(report))
    if args.out is not None:
        atomic_write_json(args.out, report)


if __name__ == "__main__":
    main()
