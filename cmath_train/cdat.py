"""CDaT, cross-modal dynamic transfer (the CDaT paper, section III): a training add-on for any registered model.

`CDaT(model, CDaTConfig)` wraps a fusion model F (CMATH, SDT, DMD): per modality a transfer encoder G_m refines the
standardised low-level features h_m before F; training adds a dynamic probabilistic knowledge transfer (PKT) loss
between the refined features of every ordered pair of modalities, weighted per utterance by how much the fused
prediction relies on the source modality. At inference only G and F run, so `forward` returns F's own output and
the exporter, the parity checks and the runtime see the same graph interface as without CDaT.

The extracted paper text lacks the equation bodies; the numbers below follow the order of the text, which refers
to the ConfidNet loss as equation 5 and to the confidence weight as equation 6:

    h~_m = G_m(h_m)                                                                   (1)
    L_KT = sum_{m in M} sum_{n in M, n != m} KT(m, n)                                 (2), stage 2 below
    w_m^CE = CE(z, z_m) = -sum_c softmax(z)_c log softmax(z_m)_c                      (3)
    C* = 1/L sum_{l} P(y_l | z)   (true-class probability; L = 1 label per utterance) (4)
    L_conf(theta) = ||C^(z; theta) - C*||^2                                          (5)
    w_m^ConfidNet from C^(z_m; theta)                                                 (6)
    KT(m, n) = KL(P(h~_m) || Q(h~_n))                                                 (7)
    L_PKT = sum_{m} sum_{n != m} KT(m, n)   (six ordered pairs for t, a, v)           (8)
    s_{m,n} = adjustment factor comparing w_m and w_n                                  (9)
    L_DPKT = sum_{m} sum_{n != m} s_{m,n} w_m KT(m, n)                                (10)
    L = L_task + alpha * L_DPKT   (+ L_conf for the ConfidNet variant)                (11)
    y^ = F(G_t(h_t), G_a(h_a), G_v(h_v))                                             (12)

Choices the text leaves open, ours:
- h_m are the model inputs after the train-split standardisation (the precomputed utterance features are the
  unimodal encoders' outputs); G_m(h) = h + MLP(h), the MLP's last layer zero-initialised so training starts from
  F alone; the wrapped F then reads h~_m with an identity standardisation (the statistics live in the wrapper);
- masking modality m sets h~_m to 0 (the train mean) in every utterance; z and z_m come from one extra pass of F in
  eval mode without gradient, so the weights are deterministic per batch;
- w_m is "how much masking m costs": for CE the cross-entropy (3) itself (higher = m matters more, as the paper
  reads it); for ConfidNet 1 - C^(z_m), the predicted true-class confidence left without m (a modality whose
  features belong to another emotion leaves the prediction *more* confident when masked, so its w_m is low);
- s_{m,n} = 1[w_m >= w_n] per utterance: knowledge flows from the more confident modality to the less confident
  one (the paper: "the features of the modality with lower confidence follow ... the higher confidence"); with
  the constant w_m = 1 every pair is active and (10) is plain PKT (8);
- PKT (Passalis & Tefas 2018): over the real utterances of a batch, K(x_i, x_j) = (cos(x_i, x_j) + 1) / 2,
  P_{j|i} = K_ij / sum_{k != i} K_ik; KT(m, n) = 1/|I| sum_i s w_m,i KL(P_{.|i}(h~_m) || P_{.|i}(h~_n)), the
  source distribution detached (the student G_n moves, the teacher stays);
- ConfidNet: an MLP with ReLU on the (detached) logits, a sigmoid output, trained with (5) on the full and the
  masked passes (each against its own true-class probability), so it has seen masked predictions before it rates
  them. It takes no part in inference and is not exported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import LossConfig, ModelConfig
from .models.common import ConversationModel, Standardize, check_inputs, set_standardize_stats

CONFIDENCES = ("const", "ce", "confidnet")


@dataclass
class CDaTConfig:
    """The add-on's recipe; a checkpoint stores it as config.json["cdat"] and load_checkpoint rebuilds the wrapper."""

    confidence: str = "ce"  # w_m: "const" (1, plain PKT), "ce" (3), "confidnet" (4-6)
    alpha: float = 1.0  # weight of L_DPKT in the total (11)
    hidden: int = 64  # width of each G_m's MLP
    confidnet_hidden: int = 32  # width of ConfidNet's hidden layers

    def __post_init__(self) -> None:
        if self.confidence not in CONFIDENCES:
            raise ValueError(f"cdat confidence: expected one of {CONFIDENCES}, got {self.confidence!r}")
        if self.alpha < 0:
            raise ValueError(f"cdat alpha: expected >= 0, got {self.alpha}")
        if self.hidden < 1 or self.confidnet_hidden < 1:
            raise ValueError(f"cdat hidden sizes: expected >= 1, got {self.hidden}, {self.confidnet_hidden}")


class TransferEncoder(nn.Module):
    """G_m (1): h~ = h + W_2 GELU(W_1 h), W_2 = 0 at initialisation (G_m starts as the identity)."""

    def __init__(self, d_in: int, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(d_in, hidden)
        self.down = nn.Linear(hidden, d_in)
        nn.init.zeros_(self.down.weight)
        nn.init.zeros_(self.down.bias)

    def forward(self, h: Tensor) -> Tensor:  # (B, N, d_m) -> (B, N, d_m)
        return h + self.down(F.gelu(self.up(h)))


class ConfidNet(nn.Module):
    """C^(z; theta) in [0, 1] (5-6): an MLP with ReLU on the class logits z (C,), trained only to predict C* (4)."""

    def __init__(self, num_classes: int, hidden: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(num_classes, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 1),
        )

    def forward(self, logits: Tensor) -> Tensor:  # (..., C) -> (...)
        return torch.sigmoid(self.net(logits))[..., 0]


@dataclass
class CDaTOutput:
    """The wrapped model's output plus what the transfer loss needs; attribute reads fall through to `inner`."""

    inner: Any
    refined: dict[str, Tensor]  # m -> (B, N, d_m) h~_m = G_m(h_m) (1), with gradient
    speaker: Tensor

    def __getattr__(self, name: str) -> Any:  # logits, embedding, modality_logits, ... of the wrapped model
        return getattr(self.__dict__["inner"], name)


class TransferInputs(nn.Module):
    """Standardised inputs h_m (train statistics, 0 in padded rows) refined by G_m: h~_m = G_m(h_m) (1)."""

    def __init__(self, cfg: ModelConfig, hidden: int) -> None:
        super().__init__()
        self.standardize = nn.ModuleDict({m: Standardize(cfg.feature_dims[m]) for m in cfg.modalities})
        self.transfer = nn.ModuleDict(
            {m: TransferEncoder(cfg.feature_dims[m], hidden) for m in cfg.modalities}
        )

    def forward(self, features: dict[str, Tensor], mask: Tensor) -> dict[str, Tensor]:
        rows = mask[..., None]
        return {
            m: self.transfer[m](torch.where(rows, self.standardize[m](x), 0.0)) for m, x in features.items()
        }


class CDaT(ConversationModel):
    """G_m per modality + the wrapped fusion model F (12). Training mode returns a CDaTOutput, eval mode F's output.

    The streaming step of a causal CMATH composes with it (G_m is per utterance): cmath_train/streaming.py runs
    `inputs` before the wrapped model's cached forward."""

    def __init__(self, model: ConversationModel, cfg: CDaTConfig) -> None:
        super().__init__()
        self.cfg = model.cfg  # the wrapped model's config (the same object)
        self.inputs = TransferInputs(
            model.cfg, cfg.hidden
        )  # first in state_dict, where the exporter's parity data
        self.model = model  # looks for the standardisation buffers
        self.confidnet = (
            ConfidNet(model.cfg.num_classes, cfg.confidnet_hidden) if cfg.confidence == "confidnet" else None
        )
        self.cdat_cfg = cfg

    @property
    def standardize(self) -> nn.ModuleDict:
        """The train-split standardisation of the raw inputs (the wrapped model's own is the identity)."""
        return self.inputs.standardize

    def set_input_stats(self, mean: dict[str, Tensor], std: dict[str, Tensor]) -> None:
        """The train statistics standardise h_m here; F keeps its identity standardisation (mean 0, std 1)."""
        set_standardize_stats(self.inputs.standardize, self.cfg, mean, std)

    def forward(
        self, features: dict[str, Tensor], speaker: Tensor, mask: Tensor, reconstruct: bool | None = None
    ) -> Any:
        """y^ = F(G_t(h_t), G_a(h_a), G_v(h_v)) (12)."""
        if not (torch.jit.is_tracing() or torch.compiler.is_compiling()):
            check_inputs(self.cfg, features, speaker, mask)
        refined = self.inputs(features, mask)
        out = self.model(refined, speaker, mask, reconstruct=reconstruct)
        return CDaTOutput(out, refined, speaker) if self.training else out

    def loss(
        self,
        out: CDaTOutput,
        labels: Tensor,
        mask: Tensor,
        cfg: LossConfig,
        class_weight: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """F's own loss terms + alpha * L_DPKT (11) as "pkt" (+ L_conf (5) as "confidnet")."""
        terms = self.model.loss(out.inner, labels, mask, cfg, class_weight)
        rows = mask & (labels >= 0)
        weights, conf_loss = self.confidence_weights(out.refined, out.speaker, mask, labels)
        terms["pkt"] = dynamic_pkt(out.refined, weights, mask)
        terms["total"] = terms["total"] + self.cdat_cfg.alpha * terms["pkt"]  # (11)
        if conf_loss is not None:
            terms["confidnet"] = conf_loss if rows.any() else conf_loss * 0
            terms["total"] = terms["total"] + terms["confidnet"]
        return terms

    def masked_logits(
        self, refined: dict[str, Tensor], speaker: Tensor, mask: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """(z, {m: z_m}): F's logits (B, N, C) on all refined modalities and with each one masked (h~_m = 0), in
        one eval-mode pass of batch (1 + |M|) B without gradient."""
        mods = self.cfg.modalities
        b = mask.shape[0]
        feats = {
            m: torch.cat(
                [refined[m].detach()]
                + [torch.zeros_like(refined[m]) if k == m else refined[m].detach() for k in mods]
            )
            for m in mods
        }
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad():
                logits = self.model(
                    feats, speaker.repeat(1 + len(mods), 1), mask.repeat(1 + len(mods), 1), reconstruct=False
                ).logits.float()
        finally:
            self.model.train(was)
        return logits[:b], {m: logits[(i + 1) * b : (i + 2) * b] for i, m in enumerate(mods)}

    def confidence_weights(
        self, refined: dict[str, Tensor], speaker: Tensor, mask: Tensor, labels: Tensor
    ) -> tuple[dict[str, Tensor], Tensor | None]:
        """(m -> (B, N) w_m without gradient, ConfidNet's loss (5) or None) for the configured confidence."""
        kind = self.cdat_cfg.confidence
        if kind == "const" or len(self.cfg.modalities) < 2:
            return {m: torch.ones(mask.shape, device=mask.device) for m in self.cfg.modalities}, None
        z, z_masked = self.masked_logits(refined, speaker, mask)
        if kind == "ce":
            return {m: masking_cross_entropy(z, z_m) for m, z_m in z_masked.items()}, None
        assert self.confidnet is not None  # built for confidence "confidnet"
        rows = mask & (labels >= 0)
        passes = torch.stack([z, *z_masked.values()])  # (1 + |M|, B, N, C)
        target = true_class_probability(passes, labels)  # C* (4) of each pass
        conf_loss = ((self.confidnet(passes) - target) ** 2)[:, rows].mean()  # (5)
        with torch.no_grad():
            w = {m: 1.0 - self.confidnet(z_m) for m, z_m in z_masked.items()}  # (6)
        return w, conf_loss


def masking_cross_entropy(z: Tensor, z_m: Tensor) -> Tensor:
    """(3) CE(z, z_m) = -sum_c softmax(z)_c log softmax(z_m)_c per utterance: (..., C) -> (...)."""
    return -(torch.softmax(z, -1) * torch.log_softmax(z_m, -1)).sum(-1)


def true_class_probability(logits: Tensor, labels: Tensor) -> Tensor:
    """C* (4): P(y | z), the probability the prediction gives the true class (one label per utterance, L = 1);
    (..., B, N, C) logits, (B, N) labels (padding < 0 reads class 0, callers mask it) -> (..., B, N)."""
    idx = labels.clamp_min(0).expand(logits.shape[:-1])[..., None]
    return torch.softmax(logits, -1).gather(-1, idx)[..., 0]


def pkt_conditional(x: Tensor, eps: float = 1e-8) -> Tensor:
    """P_{j|i} over n samples x (n, d): the cosine kernel (cos + 1) / 2 normalised over j != i; (n, n), 0 diagonal."""
    x = x / (x.norm(dim=-1, keepdim=True) + eps)
    k = (x @ x.T + 1.0) / 2.0
    k = k * (1.0 - torch.eye(len(x), dtype=k.dtype, device=k.device))
    return k / (k.sum(-1, keepdim=True) + eps)


def pkt_kl(teacher: Tensor, student: Tensor, eps: float = 1e-8) -> Tensor:
    """KT per anchor i (7): KL(P_{.|i}(teacher) || P_{.|i}(student)) for samples (n, d_m), (n, d_n) -> (n,)."""
    p, q = pkt_conditional(teacher), pkt_conditional(student)
    return (p * (torch.log(p + eps) - torch.log(q + eps))).sum(-1)


def dynamic_pkt(refined: dict[str, Tensor], weights: dict[str, Tensor], mask: Tensor) -> Tensor:
    """L_DPKT (10) over the real utterances of the batch: sum over ordered pairs (m, n), m != n, of
    1/|I| sum_i s_{m,n,i} w_{m,i} KT_i(m, n), s_{m,n,i} = 1[w_{m,i} >= w_{n,i}] (9), the source m detached.
    With every w_m = 1 it is L_PKT (8). Fewer than two modalities or real utterances: 0."""
    mods = list(refined)
    total = torch.zeros((), device=mask.device)
    if len(mods) < 2 or int(mask.sum()) < 2:
        return total
    h = {m: refined[m][mask] for m in mods}  # (|I|, d_m)
    w = {m: weights[m][mask] for m in mods}  # (|I|,)
    for m in mods:
        for n in mods:
            if m != n:
                s = (w[m] >= w[n]).to(h[n].dtype)  # (9)
                total = total + (s * w[m] * pkt_kl(h[m].detach(), h[n])).mean()  # (7), (10)
    return total
