"""Search the text encoder's fine-tune settings on the dev split: past turns, input length, learning rate, epochs.

    python -m studies.finetune_search --csv-dir path/to/MELD --out docs/results/finetune_search \\
        --turns 4:96,6:128,8:160 --lrs 3e-5,5e-5,1e-4,2e-4 --epochs 2,3,4 --seeds 0,1 --device cuda --parallel 14

Each setting fine-tunes the encoder exactly as cmath-prepare does (prepare/finetune.py on prepare/build.py's turn
examples) and scores the encoder's own classifier on dev: weighted-F1 of the selected epoch, every epoch's score
kept. The test split is never read. Settings run in `--parallel` worker processes (one GPU serves many: a small
encoder's steps are bound by kernel launches, not arithmetic), all first seeds before any second seed, so a
`--time-limit` still leaves one run of every setting it reached. Writes OUT.jsonl (one line per run, rewritten as
each finishes) and OUT.md (the settings ranked by their mean over seeds, with the spread between seeds).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import click

from cmath_runtime.files import atomic_write_bytes

MELD_COLUMNS_NOTE = "MELD's columns (Utterance, Speaker, Emotion, Dialogue_ID, Utterance_ID)"


@dataclass(frozen=True)
class Setting:
    window: int
    max_tokens: int
    lr: float
    epochs: int

    def label(self) -> str:
        return f"window {self.window}, {self.max_tokens} tokens, lr {self.lr:g}, {self.epochs} epochs"


@dataclass(frozen=True)
class Task:
    setting: Setting
    seed: int


_DATA: dict[str, Any] = {}  # per worker process: the dev/train tables and the turn examples per input format


def _init(train: str, dev: str, encoder: str | None, device: str, bars: bool) -> None:
    if not bars:  # several workers: one line per finished run from the parent instead of interleaved bars
        os.environ["TQDM_DISABLE"] = "1"
    import numpy as np
    import torch

    from cmath_train.prepare.csv_source import CsvColumns, read_conversations
    from cmath_train.prepare.labels import label_indices, label_names
    from cmath_train.prepare.speakers import make_speaker_mapping

    torch.set_num_threads(1)  # many workers share the cores; the GPU, when used, does the arithmetic
    cols = CsvColumns()
    tables = {"train": read_conversations(train, cols), "dev": read_conversations(dev, cols)}
    names = label_names(tables["train"])
    mapping = make_speaker_mapping("order", 9, tables["train"])
    _DATA.update(
        tables=tables,
        names=names,
        labels={s: np.concatenate(label_indices(t, names, cols.label)) for s, t in tables.items()},
        speakers={s: [mapping.ids(d.speakers) for d in t.dialogues] for s, t in tables.items()},
        encoder=Path(encoder) if encoder else None,
        device=device,
        examples={},
    )


def _run(task: Task) -> dict[str, Any]:
    from cmath_runtime.turns import TurnFormat
    from cmath_train.prepare.build import trainable_encoder, turn_examples
    from cmath_train.prepare.finetune import FinetuneOptions, finetune_encoder

    s = task.setting
    fmt = TurnFormat(window=s.window, max_tokens=s.max_tokens, speaker_prefix=True)
    st, enc = trainable_encoder(_DATA["encoder"], _DATA["device"], fmt)
    key = (s.window, s.max_tokens)
    if key not in _DATA["examples"]:
        per_conv = turn_examples(_DATA["tables"], _DATA["speakers"], fmt, Path(st.describe()["path"]))
        _DATA["examples"][key] = {split: [x for c in convs for x in c] for split, convs in per_conv.items()}
    ex, y = _DATA["examples"][key], _DATA["labels"]
    start = time.perf_counter()
    result, _ = finetune_encoder(
        enc,
        ex["train"],
        y["train"],
        len(_DATA["names"]),
        FinetuneOptions(epochs=s.epochs, lr=s.lr, seed=task.seed),
        ex["dev"],
        y["dev"],
        log=lambda _msg: None,
        desc=f"{s.label()}, seed {task.seed}",
    )
    return {
        **asdict(s),
        "seed": task.seed,
        "best_epoch": result.best_epoch,
        "dev_weighted_f1": max(h.dev_weighted_f1 or 0.0 for h in result.history),
        "dev_weighted_f1_by_epoch": [h.dev_weighted_f1 for h in result.history],
        "seconds": round(time.perf_counter() - start, 1),
        "device": _DATA["device"],
    }


def search(
    train: Path,
    dev: Path,
    settings: list[Setting],
    seeds: list[int],
    out: Path,
    encoder: Path | None = None,
    device: str = "cpu",
    parallel: int = 1,
    time_limit: float | None = None,
) -> list[dict[str, Any]]:
    """Run every (setting, seed), first seeds first; stop starting new runs after `time_limit` seconds."""
    tasks = [Task(s, seed) for seed in seeds for s in settings]
    deadline = time.monotonic() + time_limit if time_limit else None
    rows: list[dict[str, Any]] = []
    ctx = mp.get_context("spawn")  # CUDA cannot be forked
    init = (str(train), str(dev), str(encoder) if encoder else None, device, parallel == 1)
    with ctx.Pool(max(1, parallel), initializer=_init, initargs=init) as pool:
        pending = [pool.apply_async(_run, (t,)) for t in tasks[: max(1, parallel)]]
        queue = tasks[len(pending) :]
        while pending:
            done = next((p for p in pending if p.ready()), None)
            if done is None:
                time.sleep(0.2)
                continue
            pending.remove(done)
            rows.append(done.get())
            _write(rows, out)
            click.echo(f"{len(rows)}/{len(tasks)}: {_line(rows[-1])}", err=True)
            if queue and (deadline is None or time.monotonic() < deadline):
                pending.append(pool.apply_async(_run, (queue.pop(0),)))
    if queue:
        click.echo(f"time limit: {len(queue)} of {len(tasks)} runs not started", err=True)
    return rows


def ranking(rows: list[dict[str, Any]]) -> list[tuple[Setting, list[float]]]:
    """Settings with their dev weighted-F1 per seed, best mean first."""
    by: dict[Setting, list[float]] = defaultdict(list)
    for r in rows:
        by[Setting(r["window"], r["max_tokens"], r["lr"], r["epochs"])].append(r["dev_weighted_f1"])
    return sorted(by.items(), key=lambda kv: -sum(kv[1]) / len(kv[1]))


def _line(r: dict[str, Any]) -> str:
    s = Setting(r["window"], r["max_tokens"], r["lr"], r["epochs"])
    return (
        f"{s.label()}, seed {r['seed']}: dev weighted-F1 {100 * r['dev_weighted_f1']:.2f} ({r['seconds']} s)"
    )


def _write(rows: list[dict[str, Any]], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out.with_suffix(".jsonl"), "".join(json.dumps(r) + "\n" for r in rows).encode())
    lines = [
        "# Text encoder fine-tune search (dev split only)",
        "",
        "Written by `python -m studies.finetune_search`. Score: the fine-tuned encoder's own classifier, dev "
        "weighted-F1 (%) of the selected epoch; the test split is not read.",
        "",
        "| past turns | tokens | lr | epochs | seeds | mean | per seed |",
        "|---:|---:|---:|---:|---:|---:|---|",
    ]
    for s, scores in ranking(rows):
        mean = 100 * sum(scores) / len(scores)
        per = ", ".join(f"{100 * v:.2f}" for v in scores)
        lines.append(
            f"| {s.window} | {s.max_tokens} | {s.lr:g} | {s.epochs} | {len(scores)} | {mean:.2f} | {per} |"
        )
    atomic_write_bytes(out.with_suffix(".md"), ("\n".join(lines) + "\n").encode())


def _ints(text: str, name: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated integers, got {text!r}", param_hint=name
        ) from None


def _settings(turns: str, lrs: str, epochs: str) -> list[Setting]:
    shapes = []
    for t in turns.split(","):
        window, _, tokens = t.strip().partition(":")
        if not (window.isdigit() and tokens.isdigit()):
            raise click.BadParameter(
                f"expected WINDOW:TOKENS pairs like 4:96, got {t!r}", param_hint="--turns"
            )
        if int(tokens) < 4:
            raise click.BadParameter(f"expected at least 4 tokens, got {t!r}", param_hint="--turns")
        shapes.append((int(window), int(tokens)))
    try:
        rates = [float(x) for x in lrs.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"expected comma-separated numbers, got {lrs!r}", param_hint="--lrs"
        ) from None
    if not all(r > 0 for r in rates):
        raise click.BadParameter(f"expected learning rates > 0, got {lrs!r}", param_hint="--lrs")
    counts = _ints(epochs, "--epochs")
    if not all(e >= 1 for e in counts):
        raise click.BadParameter(f"expected epoch counts >= 1, got {epochs!r}", param_hint="--epochs")
    return [Setting(w, t, lr, e) for w, t in shapes for lr in rates for e in counts]


@click.command()
@click.option(
    "--csv-dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help=f"Folder with train_sent_emo.csv and dev_sent_emo.csv ({MELD_COLUMNS_NOTE}).",
)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Writes OUT.jsonl and OUT.md.")
@click.option("--turns", default="4:96", show_default=True, help="Comma-separated WINDOW:TOKENS.")
@click.option("--lrs", default="5e-5", show_default=True, help="Comma-separated encoder learning rates.")
@click.option("--epochs", default="2", show_default=True, help="Comma-separated epoch counts.")
@click.option("--seeds", default="0", show_default=True, help="Comma-separated seeds.")
@click.option("--encoder", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None)
@click.option("--device", default="cpu", show_default=True, help="torch device of every worker (cpu, cuda).")
@click.option(
    "--parallel", type=click.IntRange(1, 64), default=1, show_default=True, help="Worker processes."
)
@click.option(
    "--time-limit", type=click.FloatRange(min=1), default=None, help="Seconds; no run starts after."
)
def main(
    csv_dir: Path,
    out: Path,
    turns: str,
    lrs: str,
    epochs: str,
    seeds: str,
    encoder: Path | None,
    device: str,
    parallel: int,
    time_limit: float | None,
) -> None:
    """Fine-tune settings of the text encoder, scored on dev; see the module docstring."""
    files = [csv_dir / "train_sent_emo.csv", csv_dir / "dev_sent_emo.csv"]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise click.BadParameter(
            f"expected train_sent_emo.csv and dev_sent_emo.csv, missing {missing}", param_hint="--csv-dir"
        )
    settings = _settings(turns, lrs, epochs)
    rows = search(*files, settings, _ints(seeds, "--seeds"), out, encoder, device, parallel, time_limit)
    best, scores = ranking(rows)[0]
    click.echo(
        f"best on dev: {best.label()}: {100 * sum(scores) / len(scores):.2f} over {len(scores)} seed(s)"
    )
    click.echo(f"wrote {out.with_suffix('.jsonl')} and {out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
