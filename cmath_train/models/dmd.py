"""DMD: Decoupled Multimodal Distilling for emotion recognition (Li et al., CVPR 2023), adapted to conversations.

Paper: Decoupled Multimodal Distilling for Emotion Recognition (CVPR 2023, arXiv 2303.13802); public code: github.com/mdswyz/DMD (trains/singleTask/model/dmd.py, DMD.py,
distillnets/). Built from our blocks; shapes B conversations, N utterances, d hidden size, C classes, M modalities.

    U_m --Conv1D--> X~_m;   s_m = E_m(X~_m) (private, per modality),   c_m = E_c(X~_m) (shared by all modalities)
    decoupling:   X~_m ~ D_m([s_m, c_m]),   s_m ~ E_m(D_m([s_m, c_m])),   cos(s_m, c_m) <= 0,
                  margin loss: common features of same-emotion utterances (any modality) closer than others
    homogeneous:  c'_m = Transformer(c_m + S + P)            -> homo logits/reprs per modality, c_x = mean_m c'_m
                  HomoGD: learned edges e_{n<-m} distil the homo logits of modality m into n
    heterogeneous: s'_m = Transformer(Linear([CrossAttn(s_m <- s_a)]_{a != m}))  -> hetero logits/reprs
                  HeteroGD: learned edges distil hetero logits (and keep hetero reprs of modalities apart)
    fusion:       H_x = ResMLP(Linear([sigmoid(W_m s'_m)]_m ++ [sigmoid(W_c c_x)])),  Y^_x = Linear(H_x)
    L = L_task + g_dec (L_rec + L_cycle + g_mo (L_margin + L_ort)) + g_gd (L_homoGD + L_heteroGD)

What was adapted for conversations, and why (the README quotes this):
1. Sequence axis. DMD encodes one utterance as a sequence of words/frames and reads its prediction off the last
   time step. In ERC every position is an utterance (features are already utterance-level) and every position
   needs a prediction, so all of DMD's temporal layers run along the utterance axis of a conversation, with the
   conversation mask, and every utterance is classified: the "utterance-level transformer" is our Attention +
   AddNormFFN layer with speaker embeddings and sinusoidal positions added, exactly as CMATH and SDT read context.
   DMD's per-modality Conv1D (padding 0) becomes our 'same'-padded (or causal) UtteranceConv over utterances with
   padded rows zeroed, so padding never changes a real utterance; the 1x1 encoders/decoders become Linear layers.
2. Flattened-sequence layers. DMD's projections that flatten a fixed-length sequence (align_c_*, proj_cosine_*,
   proj*_low) cannot exist for conversations of any length; they become per-utterance Linear/residual layers. The
   homogeneous logits come from the context-encoded common features c'_m (DMD: from c_m before self-attention),
   because in ERC an utterance without its context is the weakest possible predictor.
3. Any modality subset. The heterogeneous branch of m concatenates its cross-modal attentions over the other
   modalities and projects them back to d (DMD: 2d "memory" transformer of 3 layers; ours 1 layer at d), and the
   common fusion c_x averages the modalities' common features (they share one space; DMD concatenates 3 of them),
   so the same code serves t, ta, tav, ... With one modality there is no cross-attention and no graph to distil.
4. Classification. DMD regresses sentiment with L1; ours is C-way cross-entropy on every head DMD supervises
   (fused, each homo, each hetero, common). DMD's margin 0.15 * |y_i - y_j| needs ordered labels; emotions are
   not ordered, so the margin is a constant (LossConfig.dmd_margin = 0.15, DMD's margin for labels one apart).
   The margin loss is DMD's exact hinge mean over (anchor, positive, negative) triples, computed in O(K^2 log K).
5. Graph distillation. Edges e_{n<-m} = softmax over the M(M-1) edges of W_e [z_n, z_m] / 8 with z = [W_l logits,
   W_r repr], per utterance; weight e + prior; the prior favours text as teacher (DMD's [0,0,1,0,1,0] homo and
   [0,0,1,0,1,1] hetero priors, language first), softmax(. / 0.25) over the edges present. As in DMD's code the
   homo unit distils logits (L1), the hetero unit logits plus the cosine repulsion of its representations, and
   both pull the mean edges to the prior. W_e has no bias: a shared bias cancels in the softmax (it would get no
   gradient). The edge networks live in the model and are used only by `loss`; inference never runs them.
6. Orthogonality per utterance (cosine along features; DMD's code takes it along the batch axis of (L, B, d)).
`modality_logits` are the homogeneous (context-only, single-modality) predictions; the hetero ones are kept too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import LossConfig, ModelConfig, Preset, coerce
from ..layers import UtteranceConv, attention_mask
from ..losses import cross_entropy, masked_mean, tensor_sum
from .common import BaselineInputs, ConversationModel, ResidualMLP, TransformerLayer

EDGE_ALPHA = 1 / 8  # softmax sharpness of the edge scores (DMD: alpha)
PRIOR_TEMPERATURE = 0.25  # the prior's softmax temperature (DMD: softmax([...], 0.25))


@dataclass
class DMDConfig(ModelConfig):
    """DMD's own fields (the shared ones are in config.ModelConfig)."""

    conv_kernel: int = 3  # the per-modality UtteranceConv over utterances ('same', or left-only when causal)
    dmd_gd_hidden_homo: int = 64  # hidden sizes of the graph-distillation edge networks (DMD code: 64 homo,
    dmd_gd_hidden_hetero: int = 32  # 32 hetero)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.conv_kernel < 1:
            raise ValueError(f"conv_kernel: expected >= 1, got {self.conv_kernel}")


@dataclass
class DMDLossConfig(LossConfig):
    """L = L_task + g_dec * L_dec + g_gd * (L_homo + L_hetero) (DMD code's weights); shared fields in LossConfig."""

    dmd_gamma_dec: float = 0.1  # decoupling: reconstruction + cycle + g_mo * (margin + orthogonality)
    dmd_gamma_margin_ort: float = 0.1  # g_mo inside L_dec
    dmd_margin: float = 0.15  # hinge margin of the margin (triplet-like) loss on the common features
    dmd_gamma_gd: float = 0.05  # each graph distillation unit
    dmd_gd_repr: float = (
        10.0  # weight of the representation term in the heterogeneous unit (DMD: w_losses[1])
    )
    dmd_gd_reg: float = 10.0  # pull of the mean learned edge weights towards their prior (DMD: gd_reg)


# DMD's published recipe is for utterance-level sentiment regression (MOSI/MOSEI), not conversations: what
# transfers are its loss weights, which are DMDLossConfig's defaults. No dataset presets of its own, so
# `registry.preset("dmd", name)` falls back to the shared presets (their CMATH-only fields are dropped).
PRESETS: dict[str, Preset] = {}


@dataclass
class DMDOutput:
    logits: Tensor  # (B, N, C) fused prediction
    embedding: Tensor  # (B, N, d) fused representation H_x
    modality_logits: dict[str, Tensor]  # m -> (B, N, C) homogeneous (common-space) prediction of modality m
    modality_embeddings: dict[str, Tensor]  # m -> (B, N, d) homogeneous representation
    hetero_logits: dict[str, Tensor]  # m -> (B, N, C) heterogeneous (specific-space) prediction
    hetero_embeddings: dict[str, Tensor]  # m -> (B, N, d)
    common_logits: Tensor  # (B, N, C) prediction from the fused common features c_x
    projected: dict[str, Tensor]  # m -> (B, N, d) X~_m, the reconstruction target
    specific: dict[str, Tensor]  # m -> (B, N, d) s_m
    common: dict[str, Tensor]  # m -> (B, N, d) c_m
    reconstructions: dict[str, Tensor] = field(default_factory=dict)  # m -> D_m([s_m, c_m]) (training only)
    specific_cycle: dict[str, Tensor] = field(
        default_factory=dict
    )  # m -> E_m(D_m([s_m, c_m])) (training only)
    common_aligned: dict[str, Tensor] = field(
        default_factory=dict
    )  # m -> projection of c_m for the margin loss


def edge_pairs(mods: tuple[str, ...]) -> list[tuple[str, str]]:
    """(student, teacher) pairs in DMD's order: student outer, teacher inner."""
    return [(n, m) for n in mods for m in mods if n != m]


def edge_prior(mods: tuple[str, ...], hetero: bool) -> Tensor:
    """DMD's prior: text teaches (homo and hetero), and visual teaches audio in the hetero unit."""
    favoured = {(n, "t") for n in mods if n != "t"} | ({("a", "v")} if hetero else set())
    logits = torch.tensor([1.0 if pair in favoured else 0.0 for pair in edge_pairs(mods)])
    return torch.softmax(logits / PRIOR_TEMPERATURE, dim=0)


class GraphDistillation(nn.Module):
    """A graph distillation unit: modalities are vertices, edge e_{n<-m} (per utterance) how much m teaches n."""

    prior: Tensor

    def __init__(self, mods: tuple[str, ...], num_classes: int, d: int, hidden: int, hetero: bool) -> None:
        super().__init__()
        self.pairs = edge_pairs(mods)
        self.logit_proj = nn.Linear(num_classes, hidden)
        self.repr_proj = nn.Linear(d, hidden)
        self.edge = nn.Linear(4 * hidden, 1, bias=False)
        self.register_buffer("prior", edge_prior(mods, hetero), persistent=False)

    def edges(self, logits: dict[str, Tensor], reprs: dict[str, Tensor]) -> Tensor:
        """(B, N, E) edge weights, a softmax over the E = M(M-1) edges of each utterance."""
        z = {m: torch.cat([self.logit_proj(logits[m]), self.repr_proj(reprs[m])], dim=-1) for m in logits}
        scores = torch.cat([self.edge(torch.cat([z[n], z[m]], dim=-1)) for n, m in self.pairs], dim=-1)
        return torch.softmax(scores * EDGE_ALPHA, dim=-1)

    def losses(
        self, logits: dict[str, Tensor], reprs: dict[str, Tensor], rows: Tensor, reg_weight: float
    ) -> dict[str, Tensor]:
        """logit: sum_e mean_i w_e,i |Y_n - Y_m (detached)|_1; repr: sum_e mean_i w_e,i relu(cos(R_n, R_m (detached)));
        reg: reg_weight * sum_e (mean_i e_e,i - prior_e)^2;  w = e + prior."""
        edges = self.edges(logits, reprs)  # (B, N, E)
        w = edges + self.prior
        logit, rep = [], []
        for k, (n, m) in enumerate(self.pairs):
            logit.append(masked_mean(w[..., k] * (logits[n] - logits[m].detach()).abs().sum(-1), rows))
            cos = F.cosine_similarity(reprs[n], reprs[m].detach(), dim=-1, eps=1e-8)
            rep.append(masked_mean(w[..., k] * F.relu(cos), rows))
        mean_edges = edges[rows].mean(0) if rows.any() else self.prior
        reg = reg_weight * ((mean_edges - self.prior) ** 2).sum()
        return {"logit": tensor_sum(logit), "repr": tensor_sum(rep), "reg": reg}


class DMD(ConversationModel):
    cfg: DMDConfig

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg = coerce(DMDConfig, cfg)
        mods, d, c = cfg.modalities, cfg.d, cfg.num_classes
        self.inputs = BaselineInputs(cfg)
        self.dropout = nn.Dropout(cfg.dropout)
        self.project = nn.ModuleDict(
            {m: UtteranceConv(cfg.feature_dims[m], d, cfg.conv_kernel, cfg.causal) for m in mods}
        )
        # decoupling: private encoders, one shared encoder, decoders, and the margin loss' projections
        self.encode_specific = nn.ModuleDict({m: nn.Linear(d, d, bias=False) for m in mods})
        self.encode_common = nn.Linear(d, d, bias=False)
        self.decode = nn.ModuleDict({m: nn.Linear(2 * d, d, bias=False) for m in mods})
        self.align = nn.ModuleDict({m: nn.Linear(d, d) for m in mods})
        # homogeneous (common) branch
        self.common_context = nn.ModuleDict({m: TransformerLayer(cfg) for m in mods})
        self.homo_proj = nn.ModuleDict({m: ResidualMLP(d) for m in mods})
        self.homo_classify = nn.ModuleDict({m: nn.Linear(d, c) for m in mods})
        self.common_proj, self.common_classify = ResidualMLP(d), nn.Linear(d, c)
        # heterogeneous (specific) branch: cross-modal attention, then a self-attention "memory" layer
        self.cross = nn.ModuleDict(
            {m: nn.ModuleDict({a: TransformerLayer(cfg) for a in mods if a != m}) for m in mods}
        )
        self.merge = (
            nn.ModuleDict({m: nn.Linear((len(mods) - 1) * d, d) for m in mods}) if len(mods) > 1 else None
        )
        self.specific_context = nn.ModuleDict({m: TransformerLayer(cfg) for m in mods})
        self.hetero_proj = nn.ModuleDict({m: ResidualMLP(d) for m in mods})
        self.hetero_classify = nn.ModuleDict({m: nn.Linear(d, c) for m in mods})
        # fusion
        self.gate = nn.ModuleDict({m: nn.Linear(d, d) for m in mods})
        self.gate_common = nn.Linear(d, d)
        self.fuse = nn.Linear((len(mods) + 1) * d, d)
        self.fuse_proj = ResidualMLP(d)
        self.classify_x = nn.Linear(d, c)
        # graph distillation units (training only)
        self.homo_gd: GraphDistillation | None
        self.hetero_gd: GraphDistillation | None
        if len(mods) > 1:
            self.homo_gd = GraphDistillation(mods, c, d, cfg.dmd_gd_hidden_homo, hetero=False)
            self.hetero_gd = GraphDistillation(mods, c, d, cfg.dmd_gd_hidden_hetero, hetero=True)
        else:
            self.homo_gd = self.hetero_gd = None

    def forward(
        self, features: dict[str, Tensor], speaker: Tensor, mask: Tensor, reconstruct: bool | None = None
    ) -> DMDOutput:
        mods = self.cfg.modalities
        reconstruct = self.training if reconstruct is None else reconstruct
        inputs, context = self.inputs(features, speaker, mask)
        rows = mask[..., None].to(self.classify_x.weight.dtype)
        allowed = attention_mask(mask, self.cfg.causal)

        proj = {m: self.project[m](inputs[m]) * rows for m in mods}  # X~_m; padding looks like the conv's own
        s = {m: self.encode_specific[m](proj[m]) for m in mods}
        c = {m: self.encode_common(proj[m]) for m in mods}
        recon, cycle, aligned = {}, {}, {}
        if reconstruct:
            for m in mods:
                recon[m] = self.decode[m](torch.cat([s[m], c[m]], dim=-1))
                cycle[m] = self.encode_specific[m](recon[m])
                aligned[m] = self.align[m](c[m])

        # homogeneous branch: each modality's common features in their conversation context
        hc = {}
        for m in mods:
            x = self.dropout(c[m] + context)
            hc[m] = self.common_context[m](x, x, allowed)
        homo_repr = {m: self.homo_proj[m](hc[m]) for m in mods}
        c_x = torch.stack([hc[m] for m in mods]).mean(0)
        common_logits = self.common_classify(self.common_proj(c_x))

        # heterogeneous branch: specific features of m attend to those of every other modality
        hs = {m: self.dropout(s[m] + context) for m in mods}
        h_spec = {}
        for m in mods:
            if self.merge is not None:
                cross = cast(nn.ModuleDict, self.cross[m])  # ModuleDict's item type is Module
                crossed = torch.cat([cross[a](hs[m], hs[a], allowed) for a in mods if a != m], dim=-1)
                h = self.merge[m](crossed)
            else:
                h = hs[m]
            h_spec[m] = self.specific_context[m](h, h, allowed)
        hetero_repr = {m: self.hetero_proj[m](h_spec[m]) for m in mods}

        gated = [torch.sigmoid(self.gate[m](h_spec[m])) for m in mods] + [
            torch.sigmoid(self.gate_common(c_x))
        ]
        h_x = self.fuse_proj(self.fuse(torch.cat(gated, dim=-1)))
        return DMDOutput(
            logits=self.classify_x(h_x),
            embedding=h_x,
            modality_logits={m: self.homo_classify[m](homo_repr[m]) for m in mods},
            modality_embeddings=homo_repr,
            hetero_logits={m: self.hetero_classify[m](hetero_repr[m]) for m in mods},
            hetero_embeddings=hetero_repr,
            common_logits=common_logits,
            projected=proj,
            specific=s,
            common=c,
            reconstructions=recon,
            specific_cycle=cycle,
            common_aligned=aligned,
        )

    def loss(
        self,
        out: DMDOutput,
        labels: Tensor,
        mask: Tensor,
        cfg: LossConfig,
        class_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        return dmd_loss(self, out, labels, mask, coerce(DMDLossConfig, cfg), class_weight)

    def set_input_stats(self, mean: dict[str, Tensor], std: dict[str, Tensor]) -> None:
        self.inputs.set_input_stats(mean, std)


def margin_loss(points: Tensor, ids: Tensor, margin: float) -> Tensor:
    """DMD's hinge: mean over anchors i (with a positive and a negative) of the mean over positives p (same id,
    p != i) and negatives n (other id) of relu(margin - cos(i, p) + cos(i, n)).  points (K, d), ids (K,).

    Exact, without the K^3 triple tensor: for anchor i and positive p the negatives that count are those with
    cos(i, n) > cos(i, p) - margin; with each anchor's negative similarities sorted, their number and sum come from
    a binary search and a suffix sum, so the cost is O(K^2 log K)."""
    k = points.shape[0]
    if k < 3:
        return points.sum() * 0
    x = F.normalize(points, dim=-1, eps=1e-8)
    cos = x @ x.T  # (K, K)
    same = (ids[:, None] == ids[None, :]) & ~torch.eye(k, dtype=torch.bool, device=points.device)
    diff = ids[:, None] != ids[None, :]
    fill = -(abs(margin) + 3.0)  # below every threshold cos - margin >= -1 - margin: never counted
    neg_sorted, _ = torch.where(diff, cos, fill).sort(dim=1)
    suffix = torch.cat(
        [neg_sorted.flip(1).cumsum(1).flip(1), neg_sorted.new_zeros(k, 1)], dim=1
    )  # (K, K + 1)
    first = torch.searchsorted(
        neg_sorted.detach().contiguous(), (cos - margin).detach().contiguous(), right=True
    )
    per_pair = (k - first) * (margin - cos) + suffix.gather(1, first)  # sum over negatives, for each (i, p)
    n_pos, n_neg = same.sum(1), diff.sum(1)
    valid = (n_pos > 0) & (n_neg > 0)
    if not valid.any():
        return points.sum() * 0
    per_anchor = (per_pair * same).sum(1) / (n_pos * n_neg).clamp_min(1)
    return per_anchor[valid].mean()


def dmd_loss(
    model: DMD,
    out: DMDOutput,
    labels: Tensor,
    mask: Tensor,
    cfg: DMDLossConfig,
    class_weight: Tensor | None = None,
) -> dict[str, Tensor]:
    rows = mask & (labels >= 0)
    zero = out.logits.sum() * 0
    # task: every head DMD supervises
    ce_x = cross_entropy(out.logits, labels, rows, class_weight)
    ce_m = tensor_sum(
        cross_entropy(lg, labels, rows, class_weight)
        for heads in (out.modality_logits, out.hetero_logits)
        for lg in heads.values()
    )
    ce_c = cross_entropy(out.common_logits, labels, rows, class_weight)
    # decoupling
    mods = list(out.projected)
    re = sum(
        (masked_mean((out.reconstructions[m] - out.projected[m]) ** 2, mask) for m in out.reconstructions),
        zero,
    )
    cycle = sum(
        (masked_mean((out.specific_cycle[m] - out.specific[m]) ** 2, mask) for m in out.specific_cycle), zero
    )
    ort = tensor_sum(
        masked_mean(F.relu(F.cosine_similarity(out.specific[m], out.common[m], dim=-1, eps=1e-8)), mask)
        for m in mods
    )
    if out.common_aligned:
        points = torch.cat([out.common_aligned[m][rows] for m in mods])
        margin = margin_loss(points, labels[rows].repeat(len(mods)), cfg.dmd_margin)
    else:
        margin = zero
    dec = re + cycle + cfg.dmd_gamma_margin_ort * (margin + ort)
    terms = graph_distillation_terms(model, out, rows, cfg.dmd_gd_reg, zero)
    gd = terms["gd_homo"] + terms["gd_hetero"] + cfg.dmd_gd_repr * terms["gd_hetero_repr"] + terms["gd_reg"]
    total = ce_x + ce_m + ce_c + cfg.dmd_gamma_dec * dec + cfg.dmd_gamma_gd * gd
    return {
        "total": total,
        "ce_x": ce_x,
        "ce_m": ce_m,
        "ce_c": ce_c,
        "re": re,
        "cycle": cycle,
        "ort": ort,
        "margin": margin,
        **terms,
    }


def graph_distillation_terms(
    model: DMD, out: DMDOutput, rows: Tensor, reg_weight: float, zero: Tensor
) -> dict[str, Tensor]:
    """The homogeneous and heterogeneous graph distillation units' losses (all `zero` with one modality)."""
    if model.homo_gd is None or model.hetero_gd is None:  # both, or neither (one modality)
        return {"gd_homo": zero, "gd_hetero": zero, "gd_hetero_repr": zero, "gd_reg": zero}
    homo = model.homo_gd.losses(out.modality_logits, out.modality_embeddings, rows, reg_weight)
    hetero = model.hetero_gd.losses(out.hetero_logits, out.hetero_embeddings, rows, reg_weight)
    return {
        "gd_homo": homo["logit"],
        "gd_hetero": hetero["logit"],
        "gd_hetero_repr": hetero["repr"],
        "gd_reg": homo["reg"] + hetero["reg"],
    }
