"""Raw text -> "t" features inside the runtime: `tokenizers` + the exported text_encoder.onnx, no torch.

The export's `text_encoder` entry (docs/artifact-format.md) names the ONNX graph (tokens -> pooled, normalised
sentence embedding) and the tokenizer files. Texts are first normalised as cmath-prepare did (cmath-clean-text-v1),
then tokenised like sentence-transformers: [CLS] text [SEP], cut on the right to max_seq_length tokens, padded
to the longest text of the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .errors import ArtifactError, InputError
from .files import sha256_file
from .text_clean import TEXT_NORMALISATION, clean_text

if TYPE_CHECKING:
    from .manifest import Manifest
    from .model import EmotionModel

TEXT_MODALITY = "t"
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class TextEncoderSpec:
    """export.json's `text_encoder` entry, checked."""

    onnx_file: Path
    tokenizer_file: Path
    files: dict[str, tuple[Path, str]]  # name -> (path, sha256)
    inputs: tuple[str, ...]
    max_seq_length: int
    pooling: str
    normalize: bool
    dim: int
    text_normalisation: str | None

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> TextEncoderSpec | None:
        raw = manifest.text_encoder
        if raw is None:
            return None
        try:
            files = {k: (manifest.file(v["file"], f"text_encoder.files[{k!r}].file"), str(v["sha256"]))
                     for k, v in raw["files"].items()}
            return cls(files["onnx"][0], files["tokenizer"][0], files, tuple(raw["inputs"]), int(raw["max_seq_length"]),
                       str(raw["pooling"]), bool(raw["normalize"]), int(raw["dim"]), raw.get("text_normalisation"))
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(manifest.path, f"invalid manifest: text_encoder entry ({type(e).__name__}: {e})") from None


class TextEncoder:
    """Tokenizer + onnxruntime session: `encode(texts)` -> (n, dim) float32, like the training features."""

    def __init__(self, spec: TextEncoderSpec, threads: int | None = None, verify: bool = True,
                 spinning: bool = False) -> None:
        from tokenizers import Tokenizer

        from .session import open_session

        for name, (path, digest) in spec.files.items():
            if not path.is_file():
                raise ArtifactError(path, f"the text encoder's {name} file listed in export.json is missing")
            if verify and sha256_file(path) != digest:
                raise ArtifactError(path, "sha256 mismatch with export.json (corrupt or replaced; re-export it)")
        self.spec = spec
        self.tokenizer = Tokenizer.from_file(str(spec.tokenizer_file))
        self.tokenizer.enable_truncation(max_length=spec.max_seq_length, strategy="longest_first", direction="right")
        self.tokenizer.no_padding()  # padded by hand, per batch, to the longest text
        self.session = open_session(spec.onnx_file, "cpu", threads=threads, inputs=spec.inputs,
                                    spinning=spinning, what="text encoder").session

    @property
    def dim(self) -> int:
        return self.spec.dim

    def normalise(self, text: str) -> str:
        return clean_text(text) if self.spec.text_normalisation == TEXT_NORMALISATION else text.strip()

    def tokenize(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
        """input_ids / attention_mask / token_type_ids (n, longest) int64, right-padded with 0."""
        encs = self.tokenizer.encode_batch([self.normalise(t) for t in texts])
        width = max(len(e.ids) for e in encs)
        out = {k: np.zeros((len(encs), width), np.int64) for k in ("input_ids", "attention_mask", "token_type_ids")}
        for i, e in enumerate(encs):
            n = len(e.ids)
            out["input_ids"][i, :n] = e.ids
            out["attention_mask"][i, :n] = e.attention_mask
            out["token_type_ids"][i, :n] = e.type_ids
        return {k: v for k, v in out.items() if k in self.spec.inputs}

    def encode(self, texts: Sequence[str], batch_size: int = DEFAULT_BATCH) -> np.ndarray:
        """(n, dim) float32 sentence embeddings; texts of similar length are batched together."""
        texts = [_check_text(t, f"texts[{i}]") for i, t in enumerate(texts)]
        out = np.zeros((len(texts), self.dim), np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for k in range(0, len(order), batch_size):
            idx = order[k:k + batch_size]
            (emb,) = self.session.run(None, self.tokenize([texts[i] for i in idx]))
            out[idx] = emb
        return out


def load_text_encoder(model: EmotionModel) -> TextEncoder:
    """The artifact's text encoder (EmotionModel.text_encoder loads it once); InputError if the artifact has none."""
    spec = TextEncoderSpec.from_manifest(model.manifest)
    if spec is None or TEXT_MODALITY not in model.modalities:
        raise InputError("text", "feature vectors: this artifact has no text encoder",
                         "raw text", "Re-export the run with cmath-export (without --no-text-encoder).")
    return TextEncoder(spec, threads=model.threads, verify=model.verify, spinning=model.spinning)


def text_encoder(model: EmotionModel) -> TextEncoder:
    """model.text_encoder (kept for callers of the function)."""
    return model.text_encoder


def utterance_features(model: EmotionModel, text: Any, features: dict[str, Any], field: str) -> dict[str, Any]:
    """Conversation.add(speaker, text=...): the features with "t" computed from the text."""
    if TEXT_MODALITY in features:
        raise InputError(field, "either text= or t=, not both", "both")
    return {**features, TEXT_MODALITY: model.text_encoder.encode([_check_text(text, field)])[0]}


def resolve_texts(model: EmotionModel, conversations: Any) -> Any:
    """The batch API: conversations given with "texts" (one string per utterance) get features["t"] from them."""
    if isinstance(conversations, (Mapping, str, bytes, np.ndarray)) or not hasattr(conversations, "__len__"):
        return conversations  # validation explains what is wrong
    todo = [i for i, c in enumerate(conversations) if isinstance(c, Mapping) and "texts" in c]
    if not todo:
        return conversations
    out = list(conversations)
    texts: list[str] = []
    for i in todo:
        conv = out[i]
        if isinstance(conv["texts"], (str, bytes)) or not hasattr(conv["texts"], "__len__"):
            raise InputError(f"conversations[{i}].texts", "a list of strings, one per utterance", type(conv["texts"]).__name__)
        if TEXT_MODALITY in (conv.get("features") or {}):
            raise InputError(f"conversations[{i}]", "either texts or features['t'], not both", "both")
        texts += [_check_text(t, f"conversations[{i}].texts[{j}]") for j, t in enumerate(conv["texts"])]
    emb = model.text_encoder.encode(texts) if texts else np.zeros((0, model.feature_dims.get(TEXT_MODALITY, 0)))
    start = 0
    for i in todo:
        conv, n = out[i], len(out[i]["texts"])
        feats = {**(conv.get("features") or {}), TEXT_MODALITY: emb[start:start + n]}
        out[i] = {**{k: v for k, v in conv.items() if k != "texts"}, "features": feats}
        start += n
    return out


def _check_text(text: Any, field: str) -> str:
    if not isinstance(text, str):
        raise InputError(field, "a str", type(text).__name__)
    return text
