"""The systems CMATH builds on, as first-class registered models beside it (issue 9).

    sdt  SDT (Ma et al., 2023): intra-/inter-modal transformers, hierarchical gated fusion, self-distillation.
    dmd  DMD (Li et al., CVPR 2023) adapted to conversations: decoupled common/specific spaces, graph distillation.

CDaT (confidence-weighted cross-modal transfer) is a training option for every model: LossConfig.cdat, losses.py.
Each model is built from the shared blocks in layers.py, outputs at least `logits`, `embedding` and
`modality_logits` like CMATHOutput, offers `loss(out, labels, mask, cfg, class_weight)` and `set_input_stats`,
and has a deterministic eval path that cmath-export turns into the same ONNX graph interface.
"""

from . import dmd, sdt  # noqa: F401  (register "dmd" and "sdt")
