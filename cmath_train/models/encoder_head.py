"""The fine-tuned text encoder's own classifier as a model: per utterance, no speakers, no context.

    Y^ = W (s * U_t) + b        s = input_scale (sqrt(d) for an L2-normalised embedding, as in fine-tuning)

cmath-prepare trains this head together with the encoder (prepare/finetune.py) and stores it beside the features;
when the context model does not beat it on validation, cmath-train ships it instead (cmath_train/shipped.py). It is
never trained by cmath-train (registry: trainable=False). Its inputs and outputs are every model's (features,
speaker, mask -> logits, embedding), so export, runtime and serving take it unchanged; `embedding` is the head's
input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import LossConfig, ModelConfig, coerce
from .common import ConversationModel, check_inputs


@dataclass
class EncoderHeadConfig(ModelConfig):
    # features are multiplied by this before the head (sqrt(d): a unit vector at unit RMS)
    input_scale: float = 1.0

    def __post_init__(self) -> None:
        if len(tuple(self.modalities)) != 1:
            raise ValueError(
                f"modalities: expected exactly one for encoder_head, got {tuple(self.modalities)}"
            )
        (m,) = tuple(self.modalities)
        if m in self.feature_dims:
            self.d = int(self.feature_dims[m])  # the embedding is the head's input: d is the feature size
        self.heads = 1  # no attention
        super().__post_init__()


@dataclass
class EncoderHeadLossConfig(LossConfig):
    """Nothing: the head is trained by cmath-prepare (a checkpoint records a loss config for every model)."""


@dataclass
class EncoderHeadOutput:
    logits: Tensor  # (B, N, C)
    embedding: Tensor  # (B, N, d) the head's input
    modality_logits: dict[str, Tensor]  # the one modality -> logits


class EncoderHead(ConversationModel):
    cfg: EncoderHeadConfig

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg = coerce(EncoderHeadConfig, cfg)
        (self.modality,) = cfg.modalities
        self.classify_x = nn.Linear(cfg.d, cfg.num_classes)

    def forward(
        self,
        features: dict[str, Tensor],
        speaker: Tensor,
        mask: Tensor,
        reconstruct: bool | None = None,
        cache: object | None = None,
    ) -> EncoderHeadOutput:
        """features {m: (B, N, d)}, speaker (B, N) int (not read), mask (B, N) bool; `reconstruct`/`cache` are
        every model's arguments and mean nothing here (no reconstruction, no past)."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_inputs(self.cfg, features, speaker, mask)
        m = self.modality
        x = torch.where(mask[..., None], features[m], 0.0) * self.cfg.input_scale
        logits = self.classify_x(x)
        return EncoderHeadOutput(logits, x, {m: logits})
