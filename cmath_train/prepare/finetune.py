"""Fine-tuning the text encoder on the train split's utterance labels.

Each utterance is read as `cmath_runtime.turns` builds it (the utterance with its speaker, then its past turns);
the encoder (pooled.py: transformer -> mean over the utterance's tokens -> L2 normalisation) -> a linear head ->
cross-entropy. A unit vector has entries of size ~1/sqrt(d), so the head sees sqrt(d) * embedding (unit RMS).
AdamW with a small encoder learning rate, a larger one for the fresh head, linear warm-up then linear decay,
gradient clipping; batches group inputs of similar length (shuffled pools sorted by length) so a CPU pads
little. The token embedding table (vocab x d, half of MiniLM's weights) stays fixed by default: most of its rows
never occur in the train split, and skipping its dense AdamW update makes a CPU step ~1.5x faster; position and
type embeddings and every transformer layer are trained.
After every epoch the dev split (never test) is scored by weighted-F1 of the head; the best epoch's encoder and
head are kept. Without a dev split every epoch is run and the last one is kept.

With a teacher's probabilities for the train utterances (knowledge distillation, Hinton et al. 2015) the loss is
(1 - kd_weight) * cross-entropy + kd_weight * T^2 * KL(teacher_T || student_T), both distributions softened by
the temperature T: the student learns which emotions the teacher finds close, not only the gold one.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.metrics import accuracy_score, f1_score
from torch import nn
from tqdm import tqdm

from .pooled import PooledEncoder, collate, embed

Example = tuple[list[int], list[int]]  # (input_ids, token_type_ids) of one utterance, cmath_runtime.turns


@dataclass
class FinetuneOptions:
    epochs: int = 2  # 0 = frozen encoder (cmath-prepare --finetune-epochs 0)
    lr: float = 5e-5  # encoder
    head_lr: float = 1e-3  # the linear head, freshly initialised
    batch_size: int = 16
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1  # of all steps
    grad_clip: float = 1.0
    patience: int = 0  # stop after this many epochs without a better dev weighted-F1; 0 = run all epochs
    seed: int = 0
    eval_batch_size: int = 64
    bucket_batches: int = 50  # batches are formed within shuffled pools of this many batches sorted by length
    freeze_word_embeddings: bool = True  # keep the (vocab x d) token embedding table fixed (see module doc)
    kd_weight: float = 0.5  # share of the distillation term when a teacher's probabilities are given
    kd_temperature: float = 2.0


@dataclass
class EpochLog:
    epoch: int
    train_loss: float
    train_seconds: float
    dev_weighted_f1: float | None = None
    dev_accuracy: float | None = None
    eval_seconds: float | None = None


@dataclass
class FinetuneResult:
    options: FinetuneOptions
    selection: str
    best_epoch: int
    history: list[EpochLog] = field(default_factory=list)
    num_train: int = 0
    num_dev: int = 0

    def to_meta(self) -> dict[str, Any]:
        return {
            "objective": "utterance classification from its turns input: pooled embedding -> linear head -> cross-entropy",
            "options": asdict(self.options),
            "selection": self.selection,
            "best_epoch": self.best_epoch,
            "train_utterances": self.num_train,
            "dev_utterances": self.num_dev,
            "history": [asdict(h) for h in self.history],
        }


def finetune_encoder(
    encoder: PooledEncoder,
    train: Sequence[Example],
    train_labels: np.ndarray,
    num_classes: int,
    options: FinetuneOptions,
    dev: Sequence[Example] | None = None,
    dev_labels: np.ndarray | None = None,
    log: Callable[[str], None] = print,
    desc: str = "fine-tune",
    teacher_probs: np.ndarray | None = None,
) -> tuple[FinetuneResult, nn.Linear]:
    """Fine-tune `encoder` in place; on return it and the returned head hold the selected epoch's weights.
    `teacher_probs` (n_train, classes): a teacher's probabilities to distil (module doc)."""
    if options.epochs < 1:
        raise ValueError(f"epochs: expected >= 1, got {options.epochs}")
    torch.manual_seed(options.seed)
    rng = np.random.default_rng(options.seed)
    dim, device = int(encoder.transformer.config.hidden_size), next(encoder.parameters()).device
    head = nn.Linear(dim, num_classes).to(device)
    steps = _Steps(encoder, head, options, math.ceil(len(train) / options.batch_size) * options.epochs)
    labels = torch.as_tensor(np.asarray(train_labels, np.int64))
    teacher = _softened_teacher(teacher_probs, (len(train), num_classes), options.kd_temperature)
    lengths = np.array([len(ids) for ids, _ in train])
    dev_set = (dev, dev_labels) if dev is not None and dev_labels is not None and len(dev) > 0 else None
    result = FinetuneResult(
        options,
        "dev weighted-F1" if dev_set else "last epoch (no dev split)",
        0,
        num_train=len(train),
        num_dev=len(dev_set[0]) if dev_set else 0,
    )
    best_f1, best_state, stale = -1.0, None, 0
    bar = tqdm(total=steps.total, desc=desc, unit="batch")
    for epoch in range(1, options.epochs + 1):
        batches = _length_bucketed_batches(lengths, options.batch_size, options.bucket_batches, rng)
        start = time.perf_counter()
        loss_sum = steps.epoch(epoch, batches, train, labels, teacher, bar)
        entry = EpochLog(epoch, loss_sum / len(train), time.perf_counter() - start)
        f1 = _score_dev(encoder, head, dev_set, options.eval_batch_size, entry) if dev_set else None
        result.history.append(entry)
        log(_epoch_line(desc, entry))
        if f1 is None:
            result.best_epoch = epoch
            continue
        if f1 > best_f1:
            best_f1, result.best_epoch, stale = f1, epoch, 0
            best_state = copy.deepcopy((encoder.state_dict(), head.state_dict()))
        else:
            stale += 1
            if options.patience and stale >= options.patience:
                log(f"{desc}: early stop, no better dev weighted-F1 for {stale} epochs")
                break
    bar.close()
    if best_state is not None:
        encoder.load_state_dict(best_state[0])
        head.load_state_dict(best_state[1])
    encoder.eval()
    head.eval()
    log(f"{desc}: selected epoch {result.best_epoch} ({result.selection})")
    return result, head


class _Steps:
    """The optimisation of one fine-tuning: AdamW over the trainable encoder weights and the head, the linear
    warm-up/decay schedule over `total` steps, gradient clipping."""

    def __init__(self, encoder: PooledEncoder, head: nn.Linear, options: FinetuneOptions, total: int) -> None:
        from transformers import get_linear_schedule_with_warmup

        self.encoder, self.head, self.options, self.total = encoder, head, options, total
        self.scale = head_input_scale(encoder, head.in_features)
        self.device = head.weight.device
        if options.freeze_word_embeddings:
            for module in encoder.modules():
                if isinstance(module, nn.Embedding) and module.num_embeddings > 1000:
                    module.weight.requires_grad_(False)
        self.trainable = [p for p in encoder.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(
            [
                {"params": self.trainable, "lr": options.lr},
                {"params": list(head.parameters()), "lr": options.head_lr},
            ],
            weight_decay=options.weight_decay,
        )
        # linear warm-up over the first warmup_fraction of the steps, then linear decay to 0 (sentence-transformers'
        # own "WarmupLinear")
        self.scheduler = get_linear_schedule_with_warmup(
            self.optimizer, max(1, round(total * options.warmup_fraction)), total
        )

    def epoch(
        self,
        epoch: int,
        batches: list[np.ndarray],
        train: Sequence[Example],
        labels: torch.Tensor,
        teacher: torch.Tensor | None,
        bar: Any,
    ) -> float:
        """One pass over `batches` (indices into train); the summed train loss."""
        self.encoder.train()
        self.head.train()
        kd_weight, temperature = self.options.kd_weight, self.options.kd_temperature
        loss_sum = 0.0
        for idx in batches:
            logits = self.head(self.encoder(**collate([train[j] for j in idx], self.device)) * self.scale)
            loss = nn.functional.cross_entropy(logits, labels[idx].to(self.device))
            if teacher is not None:
                loss = (1 - kd_weight) * loss + kd_weight * _distillation(
                    logits, teacher[idx].to(self.device), temperature
                )
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_([*self.trainable, *self.head.parameters()], self.options.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += loss.item() * len(idx)
            bar.update(1)
            bar.set_postfix(epoch=epoch, loss=f"{loss.item():.3f}")
        return loss_sum


def _softened_teacher(
    teacher_probs: np.ndarray | None, shape: tuple[int, int], temperature: float
) -> torch.Tensor | None:
    """The teacher's probabilities (n_train, classes) softened by the temperature, or None without a teacher."""
    if teacher_probs is None:
        return None
    if np.shape(teacher_probs) != shape:
        raise ValueError(f"teacher_probs: expected shape {shape}, got {np.shape(teacher_probs)}")
    logp = torch.log(torch.as_tensor(teacher_probs, dtype=torch.float32).clamp_min(1e-8))
    return torch.softmax(logp / temperature, -1)


def _score_dev(
    encoder: PooledEncoder,
    head: nn.Linear,
    dev_set: tuple[Sequence[Example], np.ndarray],
    batch_size: int,
    entry: EpochLog,
) -> float:
    """The head's dev weighted-F1 (and accuracy, timing) recorded in `entry`; the weighted-F1."""
    t0 = time.perf_counter()
    dev, dev_labels = dev_set
    pred = classify(encoder, head, dev, batch_size).argmax(-1)
    f1 = float(f1_score(dev_labels, pred, average="weighted"))
    entry.dev_weighted_f1, entry.dev_accuracy = f1, float(accuracy_score(dev_labels, pred))
    entry.eval_seconds = time.perf_counter() - t0
    return f1


def _epoch_line(desc: str, entry: EpochLog) -> str:
    line = f"{desc} epoch {entry.epoch}: train loss {entry.train_loss:.4f}, {entry.train_seconds:.1f} s"
    if (
        entry.dev_weighted_f1 is not None
        and entry.dev_accuracy is not None
        and entry.eval_seconds is not None
    ):
        line += (
            f"; dev weighted-F1 {100 * entry.dev_weighted_f1:.2f}, acc {100 * entry.dev_accuracy:.2f}, "
            f"eval {entry.eval_seconds:.1f} s"
        )
    return line


def _distillation(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 * KL(teacher || softmax(logits / T)), batch mean (`teacher` already softened by T)."""
    log_student = torch.log_softmax(logits / temperature, -1)
    return nn.functional.kl_div(log_student, teacher, reduction="batchmean") * temperature**2


def head_input_scale(encoder: PooledEncoder, dim: int) -> float:
    """What the head's input is multiplied by: sqrt(d) for an L2-normalised embedding (unit RMS), else 1."""
    return math.sqrt(dim) if encoder.normalize else 1.0


def classify(
    encoder: PooledEncoder, head: nn.Linear, examples: Sequence[Example], batch_size: int = 64
) -> np.ndarray:
    """(n, classes) probabilities of the encoder's own classifier (the fine-tuning head)."""
    return classify_embeddings(encoder, head, embed(encoder, examples, batch_size))


def classify_embeddings(encoder: PooledEncoder, head: nn.Linear, emb: np.ndarray) -> np.ndarray:
    """(n, classes) probabilities of the encoder's own classifier on its (n, d) embeddings."""
    scale = head_input_scale(encoder, head.in_features)
    with torch.no_grad():
        x = torch.from_numpy(emb).to(head.weight.device) * scale
        return torch.softmax(head(x), -1).cpu().numpy()


def _length_bucketed_batches(
    lengths: np.ndarray, batch_size: int, pool: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """Shuffled batches of similar-length texts (less padding): sort shuffled pools by length, cut, shuffle batches."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * max(1, pool)):
        chunk = order[start : start + batch_size * max(1, pool)]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]
