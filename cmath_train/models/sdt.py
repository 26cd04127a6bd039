"""SDT: a transformer-based model with self-distillation for multimodal ERC (Ma et al., IEEE TMM 2024).

Paper: A Transformer-Based Model With Self-Distillation for Multimodal Emotion Recognition in Conversations
(arXiv 2310.20494); public code: github.com/butterfliesss/SDT (model.py, train.py).
Built from our blocks; shapes B conversations, N utterances, d hidden size, C classes.

    U_m --Conv1D(k=1)--> X_m --+ S + P--> X_m
    for each target m and source a (a = m: intra-modal, a != m: inter-modal transformer):
        H_{a->m} = Transformer(query X_m, key/value X_a)
        H_{a->m} <- sigmoid(W_{a->m} H_{a->m}) * H_{a->m}          unimodal-level gate
    H_m = Linear([H_{a->m}]_a)                                       (SDT: features_reduce, 3d -> d)
    H_x = sum_m softmax_m(W_m H_m) * H_m                             multimodal-level gate (our GatedFusion)
    Y^_m = Linear(Dropout(ReLU(H_m))),  Y^_x = Linear(H_x)
    L = CE(Y^_x) + g_ce_m sum_m CE(Y^_m) + g_kl sum_m KL(softmax(Y^_x/T) || softmax(Y^_m/T))  [+ g_feat sum_m MSE]

Self-distillation: the fused prediction's hard labels (the gold labels it is trained on) and soft labels teach
each modality. What differs from the public code, and why:
- our Attention/AddNormFFN post-norm layer (finite replacement mask, fp16-safe) instead of SDT's pre-norm FFN
  layer with a -1e10 additive mask; FFN width is ModelConfig.ffn_mult * d (SDT: d);
- inputs standardised with train statistics inside the graph and padded speaker ids read as 0, as in CMATH;
- the multimodal gate has one score layer per modality (our GatedFusion) where SDT shares one; with one modality
  there is nothing to gate and H_x = H_m; SDT's MELD-only frozen identity unimodal gates are not reproduced;
- the teacher of the KL is detached when LossConfig.detach_teacher (default, as for CMATH); SDT lets it learn;
- the optional feature-level term (sdt_gamma_feat, default 0) is not in SDT's paper or code;
- selection on validation (SDT's script picks the best *test* epoch).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import torch
from torch import Tensor, nn

from ..config import LossConfig, ModelConfig, Preset, coerce
from ..layers import GatedFusion, attention_mask
from ..losses import cross_entropy, high_level_distillation, masked_mean, tensor_sum
from .common import BaselineInputs, ConversationModel, TransformerLayer


@dataclass
class SDTConfig(ModelConfig):
    """SDT reads only the shared fields (config.ModelConfig)."""


@dataclass
class SDTLossConfig(LossConfig):
    """L = CE_x + g_ce_m * sum_m CE_m + g_kl * sum_m KL_T + g_feat * sum_m MSE; shared fields in config.LossConfig."""

    detach_teacher: bool = True  # the fused prediction teaches without receiving gradient (SDT lets it learn)
    sdt_gamma_ce_m: float = 1.0  # hard labels teach each modality (SDT code: gamma_2 = 1)
    sdt_gamma_kl: float = (
        1.0  # soft labels: KL(softmax(Y^_x / T) || softmax(Y^_m / T)) (SDT code: gamma_3 = 1)
    )
    sdt_temperature: float = 1.0  # T (SDT code: 1 on IEMOCAP, 8 on MELD)
    sdt_gamma_feat: float = (
        0.0  # feature-level term ||H_x - H_m||^2; not in SDT's paper or public code, so off
    )

    def __post_init__(self) -> None:
        if self.sdt_temperature <= 0:
            raise ValueError(f"sdt_temperature: expected > 0, got {self.sdt_temperature}")


# SDT's published recipes (its public code: exec_meld.sh / exec_iemocap.sh and train.py's defaults): Adam with L2
# 1e-5, dropout 0.5, hidden size 1024 with 8 heads, loss weights gamma_1..3 = 1; MELD: lr 5e-6, batch 8, 50 epochs,
# temperature 8; IEMOCAP: lr 1e-4, batch 16, 150 epochs, temperature 1, inverse-frequency class weights. SDT has
# no early stopping (it reports its best *test* epoch); we keep every epoch too (patience = epochs) but select on
# validation. `registry.preset("sdt", name)` returns these in place of CMATH's presets of the same name.
PRESETS: dict[str, Preset] = {
    "meld": Preset(
        model={"d": 1024, "heads": 8, "dropout": 0.5},
        loss={"sdt_temperature": 8.0, "sdt_gamma_ce_m": 1.0, "sdt_gamma_kl": 1.0},
        train={"lr": 5e-6, "batch_size": 8, "epochs": 50, "patience": 50, "weight_decay": 1e-5},
    ),
    "iemocap": Preset(
        model={"d": 1024, "heads": 8, "dropout": 0.5},
        loss={"sdt_temperature": 1.0, "sdt_gamma_ce_m": 1.0, "sdt_gamma_kl": 1.0, "class_weighted": True},
        train={"lr": 1e-4, "batch_size": 16, "epochs": 150, "patience": 150, "weight_decay": 1e-5},
    ),
}


@dataclass
class SDTOutput:
    logits: Tensor  # (B, N, C) fused prediction Y^_x before softmax
    embedding: Tensor  # (B, N, d) H_x after the multimodal gate
    modality_logits: dict[str, Tensor]  # m -> (B, N, C) Y^_m
    modality_embeddings: dict[str, Tensor]  # m -> (B, N, d) H_m


class UnimodalGate(nn.Module):
    """SDT's unimodal-level gate: z = sigmoid(W h) (no bias), out = z * h."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d, bias=False)

    def forward(self, h: Tensor) -> Tensor:
        return torch.sigmoid(self.fc(h)) * h


class SDT(ConversationModel):
    cfg: SDTConfig

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg = coerce(SDTConfig, cfg)
        mods, d = cfg.modalities, cfg.d
        self.inputs = BaselineInputs(cfg)
        self.project = nn.ModuleDict(
            {m: nn.Linear(cfg.feature_dims[m], d, bias=False) for m in mods}
        )  # Conv1D k=1
        self.dropout = nn.Dropout(cfg.dropout)
        # transformer[m][a]: target m attends to source a (intra-modal when a == m)
        self.transformer = nn.ModuleDict(
            {m: nn.ModuleDict({a: TransformerLayer(cfg) for a in mods}) for m in mods}
        )
        self.unimodal_gate = nn.ModuleDict(
            {m: nn.ModuleDict({a: UnimodalGate(d) for a in mods}) for m in mods}
        )
        self.reduce = nn.ModuleDict({m: nn.Linear(len(mods) * d, d) for m in mods})
        self.multimodal_gate = GatedFusion(d, len(mods)) if len(mods) > 1 else None
        self.classify_m = nn.ModuleDict(
            {
                m: nn.Sequential(nn.ReLU(), nn.Dropout(cfg.dropout), nn.Linear(d, cfg.num_classes))
                for m in mods
            }
        )
        self.classify_x = nn.Linear(d, cfg.num_classes)

    def forward(
        self, features: dict[str, Tensor], speaker: Tensor, mask: Tensor, reconstruct: bool | None = None
    ) -> SDTOutput:
        """`reconstruct` is accepted for interface parity with CMATH (export passes it); SDT has no decoder."""
        mods = self.cfg.modalities
        inputs, context = self.inputs(features, speaker, mask)
        allowed = attention_mask(mask, self.cfg.causal)  # (B, 1, N, N)
        x = {m: self.dropout(self.project[m](inputs[m]) + context) for m in mods}
        h = {}
        for m in mods:
            # ModuleDict's item type is Module: these are the inner ModuleDicts of __init__
            gate, transformer = (
                cast(nn.ModuleDict, self.unimodal_gate[m]),
                cast(nn.ModuleDict, self.transformer[m]),
            )
            branches = [gate[a](transformer[a](x[m], x[a], allowed)) for a in mods]
            h[m] = self.reduce[m](torch.cat(branches, dim=-1))  # (B, N, d)
        h_x = self.multimodal_gate([h[m] for m in mods]) if self.multimodal_gate is not None else h[mods[0]]
        return SDTOutput(
            logits=self.classify_x(h_x),
            embedding=h_x,
            modality_logits={m: self.classify_m[m](h[m]) for m in mods},
            modality_embeddings=h,
        )

    def loss(
        self,
        out: SDTOutput,
        labels: Tensor,
        mask: Tensor,
        cfg: LossConfig,
        class_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        return sdt_loss(out, labels, mask, coerce(SDTLossConfig, cfg), class_weight)

    def set_input_stats(self, mean: dict[str, Tensor], std: dict[str, Tensor]) -> None:
        self.inputs.set_input_stats(mean, std)


def soft_label_distillation(out: SDTOutput, rows: Tensor, temperature: float, detach_teacher: bool) -> Tensor:
    """sum_m 1/n sum_i KL(softmax(Y^_x,i / T) || softmax(Y^_m,i / T))  (SDT's MaskedKLDivLoss, no T^2 factor)."""
    return high_level_distillation(out, rows, detach_teacher, temperature)


def feature_distillation(out: SDTOutput, rows: Tensor, detach_teacher: bool) -> Tensor:
    """sum_m mean ||H_x - H_m||^2 over real rows and features (optional, see the module docstring)."""
    teacher = out.embedding.detach() if detach_teacher else out.embedding
    return tensor_sum(masked_mean((teacher - h_m) ** 2, rows) for h_m in out.modality_embeddings.values())


def sdt_loss(
    out: SDTOutput, labels: Tensor, mask: Tensor, cfg: SDTLossConfig, class_weight: Tensor | None = None
) -> dict[str, Tensor]:
    rows = mask & (labels >= 0)
    ce_x = cross_entropy(out.logits, labels, rows, class_weight)  # task loss on the fused prediction
    ce_m = tensor_sum(
        cross_entropy(lg, labels, rows, class_weight) for lg in out.modality_logits.values()
    )  # hard labels
    kl = soft_label_distillation(out, rows, cfg.sdt_temperature, cfg.detach_teacher)  # soft labels
    feat = feature_distillation(out, rows, cfg.detach_teacher)
    total = ce_x + cfg.sdt_gamma_ce_m * ce_m + cfg.sdt_gamma_kl * kl + cfg.sdt_gamma_feat * feat
    return {"total": total, "ce_x": ce_x, "ce_m": ce_m, "kl": kl, "feat": feat}
