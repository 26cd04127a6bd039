"""Every registered model, each with its config beside it (timm's models/):

    cmath  CMATH (Zhu et al., 2024): the paper's model, cmath.py.
    sdt    SDT (Ma et al., 2023): intra-/inter-modal transformers, hierarchical gated fusion, self-distillation.
    dmd    DMD (Li et al., CVPR 2023) adapted to conversations: decoupled common/specific spaces, graph distillation.
    encoder_head  a per-utterance linear classifier, no context: the fine-tuned text encoder's own classifier when
           a run ships it (cmath_train/shipped.py); never trained by cmath-train (registry: trainable=False).

The CDaT add-on (cdat.py) wraps any trainable one.
Each model is built from the shared blocks in layers.py (and models/common.py), outputs at least `logits`,
`embedding` and `modality_logits`, and has a deterministic eval path that cmath-export turns into the same ONNX
graph interface; each trainable one also offers `loss(out, labels, mask, cfg, class_weight)` and `set_input_stats`.
"""

from . import cmath, dmd, encoder_head, sdt  # noqa: F401  (imported by the registry)
