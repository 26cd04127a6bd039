"""The text encoder as one torch module: HF transformer -> pooling over tokens -> optional L2 normalisation.

The same module is fine-tuned (finetune.py), embeds the features (build.py) and is traced to text_encoder.onnx
(cmath_export/text_encoder.py), so the three cannot drift apart. `first_segment` pools over the tokens of type 0
only (the utterance of a `cmath_runtime.turns` input; its past turns are type 1): with a single segment it is
the sentence-transformers pipeline's mean pooling. A transformer without segment embeddings (RoBERTa's single
token type) is not given the token types: they only choose the tokens to pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

INPUTS = ("input_ids", "attention_mask", "token_type_ids")


class PooledEncoder(nn.Module):
    transformer: Any  # a Hugging Face model: its attributes (`config`, ...) depend on the architecture

    def __init__(
        self,
        transformer: nn.Module,
        pooling: str = "mean",
        normalize: bool = True,
        first_segment: bool = False,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls", "max"):
            raise ValueError(f"pooling: expected mean, cls or max, got {pooling!r}")
        self.transformer, self.pooling, self.normalize, self.first_segment = (
            transformer,
            pooling,
            normalize,
            first_segment,
        )

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        segments = int(getattr(getattr(self.transformer, "config", None), "type_vocab_size", 2))
        kwargs = {"token_type_ids": token_type_ids} if token_type_ids is not None and segments >= 2 else {}
        h = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        keep = attention_mask
        if self.first_segment and token_type_ids is not None:
            keep = attention_mask * (token_type_ids == 0).to(attention_mask.dtype)
        mask = keep.unsqueeze(-1).to(h.dtype)
        if self.pooling == "mean":
            out = (h * mask).sum(1) / torch.clamp(mask.sum(1), min=1e-9)
        elif self.pooling == "cls":
            out = h[:, 0]
        else:  # max, as sentence-transformers: padding set to -1e9 first
            out = torch.where(mask > 0, h, torch.full_like(h, -1e9)).max(1).values
        if self.normalize:
            out = out / torch.clamp(out.norm(p=2, dim=1, keepdim=True), min=1e-12)
        return out


def collate(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]], device: torch.device | str = "cpu"
) -> dict[str, torch.Tensor]:
    """(input_ids, token_type_ids) pairs -> right-padded int64 tensors with the attention mask."""
    width = max(len(ids) for ids, _ in examples)
    out = {k: np.zeros((len(examples), width), np.int64) for k in INPUTS}
    for i, (ids, types) in enumerate(examples):
        out["input_ids"][i, : len(ids)] = ids
        out["attention_mask"][i, : len(ids)] = 1
        out["token_type_ids"][i, : len(types)] = types
    return {k: torch.from_numpy(v).to(device) for k, v in out.items()}


@torch.no_grad()
def embed(
    encoder: PooledEncoder,
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 64,
    progress: str | None = None,
) -> np.ndarray:
    """(n, d) float32 embeddings; examples of similar length are batched together."""
    from tqdm import tqdm

    encoder.eval()
    device = next(encoder.parameters()).device
    order = np.argsort([len(ids) for ids, _ in examples], kind="stable")
    out: np.ndarray | None = None
    starts = range(0, len(order), batch_size)
    for k in tqdm(starts, desc=progress, unit="batch", disable=progress is None):
        idx = order[k : k + batch_size]
        emb = encoder(**collate([examples[i] for i in idx], device)).float().cpu().numpy()
        if out is None:
            out = np.zeros((len(examples), emb.shape[1]), np.float32)
        out[idx] = emb
    return out if out is not None else np.zeros((0, 0), np.float32)
