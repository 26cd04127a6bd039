"""Raw text -> emotion: parity and speed of the runtime's text path vs sentence-transformers + PyTorch.

    python -m benchmarks.text_path RUN_DIR [--features DIR] [--csv-dir DIR] [--n 1000] [--threads 1]

- parity: runtime text embeddings (tokenizers + text_encoder.onnx) vs SentenceTransformer.encode on MELD
  utterances read with cmath-prepare's CSV front-end (cleaned as training saw them), plus edge cases;
- labels: MELD test emotions from raw text vs from the precomputed features (FEATURES_DIR/test.npz);
- latency: per utterance at batch 1 (an agent's step): encode the new utterance + run the conversation so far,
  onnxruntime vs sentence-transformers + the torch model; median of the timed utterances.
cmath-bench calls `report_text_path` when the run's export carries a text encoder.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

MELD_CSV_DIR = Path("/work/shared/data/meld")
SPLIT_FILES = {"train": "train_sent_emo.csv", "dev": "dev_sent_emo.csv", "test": "test_sent_emo.csv"}
EDGE_CASES = (
    "", "   ", "😂😂😂", "Oh. My. God. 😱🙈", "CafÃ© â€œgreatâ€\x9d", "I\x92m fine\x85 really", "It’s Ã¼ber-cool",
    "Pivot! " * 200, " ".join(["supercalifragilisticexpialidocious"] * 60), "a\tb\nc\r\nd", "\u200b\u200d👨‍👩‍👧",
)


def meld_texts(n: int = 1000, csv_dir: Path = MELD_CSV_DIR, seed: int = 0) -> list[str]:
    """n texts: MELD utterances as training saw them (longest ones, mojibake-repaired ones, a random rest)
    plus EDGE_CASES and over-long texts made of whole dialogues (truncated at max_seq_length)."""
    from cmath_train.prepare.csv_source import read_conversations

    dialogues = [d for split in SPLIT_FILES.values() for d in read_conversations(csv_dir / split).dialogues]
    texts = [t for d in dialogues for t in d.texts]
    long_dialogues = [" ".join(d.texts) for d in sorted(dialogues, key=lambda d: -sum(map(len, d.texts)))[:10]]
    special = sorted(set(texts), key=len)[-40:] + [t for t in texts if any(ord(c) > 0x7F for c in t)][:150]
    special += [t for t in texts if len(t) <= 2][:20]
    rng = random.Random(seed)
    extra = [*EDGE_CASES, *long_dialogues]
    rest = n - len(extra) - len(special)
    return (extra + special + rng.sample(texts, max(rest, 0)))[:n]


def embedding_parity(export_dir: Path, texts: list[str], threads: int = 1) -> dict[str, Any]:
    """Cosine (min/mean) of runtime vs sentence-transformers embeddings, and token-id equality."""
    from cmath_runtime.compare import cosines
    from cmath_runtime.manifest import read_manifest
    from cmath_runtime.text import TextEncoder, TextEncoderSpec
    from cmath_train.prepare.text_encoder import SentenceTransformerEncoder

    manifest = read_manifest(export_dir)
    spec = TextEncoderSpec.from_manifest(manifest)
    enc = TextEncoder(spec, threads=threads)
    st = SentenceTransformerEncoder.load(manifest.raw["text_encoder"]["source"])
    cleaned = [enc.normalise(t) for t in texts]
    ref = st.encode(cleaned)
    ours = enc.encode(texts)
    cos = cosines(ours, ref)
    same_tokens = sum(
        enc.tokenize([c])["input_ids"][0].tolist() == st.model.tokenize([c])["input_ids"][0].tolist() for c in cleaned)
    truncated = sum(len(enc.tokenizer.encode(c).ids) >= spec.max_seq_length for c in cleaned)
    worst = int(cos.argmin())
    return {"texts": len(texts), "min_cosine": float(cos.min()), "mean_cosine": float(cos.mean()),
            "max_abs_diff": float(np.abs(ours - ref).max()), "token_ids_equal": f"{same_tokens}/{len(texts)}",
            "truncated_texts": truncated, "empty_texts": sum(not c for c in cleaned), "worst_text": texts[worst][:80]}


def label_agreement(export_dir: Path, features_dir: Path, csv_dir: Path = MELD_CSV_DIR, split: str = "test",
                    limit: int | None = None) -> dict[str, Any]:
    """Labels from raw text (runtime) vs from the precomputed features, dialogue by dialogue."""
    import cmath_runtime
    from cmath_train.prepare.csv_source import read_conversations

    model = cmath_runtime.load(export_dir, backend="cpu", threads=1)
    z = np.load(features_dir / f"{split}.npz", allow_pickle=False)
    starts = np.concatenate([[0], np.cumsum(z["length"])])
    by_id = {d.id: d for d in read_conversations(csv_dir / SPLIT_FILES[split]).dialogues}
    ids = list(z["id"])[:limit]
    conv_feat, conv_text = [], []
    for k, did in enumerate(ids):
        rows = slice(starts[k], starts[k + 1])
        spk = z["speaker"][rows]
        conv_feat.append({"speakers": spk, "features": {"t": z["feat_t"][rows]}})
        conv_text.append({"speakers": spk, "texts": by_id[str(did)].texts})
    a = model.predict(conv_feat)
    b = model.predict(conv_text)
    la = np.concatenate([p.label_ids for p in a])
    lb = np.concatenate([p.label_ids for p in b])
    pa, pb = np.concatenate([p.probs for p in a]), np.concatenate([p.probs for p in b])
    return {"split": split, "utterances": len(la), "dialogues": len(ids), "agreement": float((la == lb).mean()),
            "max_abs_prob_diff": float(np.abs(pa - pb).max())}


def latency(run_dir: Path, export_dir: Path, threads: int = 1, utterances: int = 20, repeats: int = 3) -> dict[str, Any]:
    """Per-utterance text encoding + inference at batch 1: onnxruntime vs sentence-transformers + torch."""
    import torch

    import cmath_runtime
    from cmath_runtime.manifest import read_manifest
    from cmath_runtime.text import text_encoder
    from cmath_train.checkpoint import load_checkpoint
    from cmath_train.prepare.text_encoder import SentenceTransformerEncoder

    torch.set_num_threads(threads)
    texts = [t for t in meld_texts(200)[25:] if t][:utterances]
    speakers = [i % 2 for i in range(len(texts))]
    model = cmath_runtime.load(export_dir, backend="cpu", threads=threads)
    enc = text_encoder(model)
    ckpt = load_checkpoint(run_dir)
    net = ckpt.model.eval()
    st = SentenceTransformerEncoder.load(read_manifest(export_dir).raw["text_encoder"]["source"], batch_size=1)

    def ort_step(i: int, feats: list[np.ndarray]) -> None:
        feats.append(enc.encode([texts[i]])[0])
        model.predict([{"speakers": speakers[:i + 1], "features": {"t": np.stack(feats)}}])

    def torch_step(i: int, feats: list[np.ndarray]) -> None:
        feats.append(st.encode([enc.normalise(texts[i])])[0])
        with torch.inference_mode():
            x = torch.from_numpy(np.stack(feats))[None]
            out = net({"t": x}, torch.tensor([speakers[:i + 1]]), torch.ones(1, i + 1, dtype=torch.bool),
                      reconstruct=False)
            torch.softmax(out.logits, -1)

    result = {}
    for name, step in (("onnxruntime", ort_step), ("torch", torch_step)):
        step(0, [])  # warm-up
        times = []
        for _ in range(repeats):
            feats: list[np.ndarray] = []
            for i in range(len(texts)):
                t0 = time.perf_counter()
                step(i, feats)
                times.append(time.perf_counter() - t0)
        result[name] = {"median_ms": 1e3 * statistics.median(times), "mean_ms": 1e3 * statistics.fmean(times)}
    result["speedup"] = result["torch"]["median_ms"] / result["onnxruntime"]["median_ms"]
    result.update({"threads": threads, "utterances": len(texts), "repeats": repeats,
                   "torch_threads": torch.get_num_threads(), "ort_intra_op_threads": threads})
    return result


def report_text_path(run_dir: Path, export_dir: Path, threads: int | None, quick: bool) -> dict[str, Any] | None:
    """cmath-bench's text-path section: None when the export has no text encoder."""
    raw = json.loads((export_dir / "export.json").read_text())
    if not raw.get("text_encoder"):
        return None
    return latency(run_dir, export_dir, threads or 1, utterances=8 if quick else 20, repeats=1 if quick else 3)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path)
    p.add_argument("--export", type=Path, default=None)
    p.add_argument("--features", type=Path, default=Path("data/meld_minilm"))
    p.add_argument("--csv-dir", type=Path, default=MELD_CSV_DIR)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip", default="", help="comma list of parity,labels,latency to skip")
    args = p.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    export_dir = args.export or args.run_dir / "export"
    skip = set(args.skip.split(","))
    out: dict[str, Any] = {}
    if "parity" not in skip:
        out["parity"] = embedding_parity(export_dir, meld_texts(args.n, args.csv_dir), args.threads)
        print(json.dumps({"parity": out["parity"]}, ensure_ascii=False), flush=True)
    if "labels" not in skip:
        out["labels"] = label_agreement(export_dir, args.features, args.csv_dir)
        print(json.dumps({"labels": out["labels"]}), flush=True)
    if "latency" not in skip:
        out["latency"] = latency(args.run_dir, export_dir, args.threads)
        print(json.dumps({"latency": out["latency"]}), flush=True)


if __name__ == "__main__":
    main()
