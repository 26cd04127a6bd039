"""The synthetic default (seeded, learnable only with context + all modalities) and the features directory."""

from __future__ import annotations

import numpy as np
import pytest

from cmath_runtime.errors import ArtifactError, InputError
from cmath_train.config import LossConfig, ModelConfig, TrainConfig
from cmath_train.data import load_data
from cmath_train.data.batching import collate
from cmath_train.data.features_dir import load_features, save_features
from cmath_train.data.synthetic import SyntheticConfig, make_synthetic
from cmath_train.data.types import Dialogue, split_validation
from cmath_train.train import train


def test_synthetic_is_seeded(tiny_data):
    again = make_synthetic(
        SyntheticConfig(
            feature_dims={"t": 24, "a": 12, "v": 16},
            conversations={"train": 30, "test": 10},
            max_len=20,
            seed=1,
        )
    )
    a, b = tiny_data.splits["train"][3], again.splits["train"][3]
    assert np.array_equal(a.features["t"], b.features["t"]) and np.array_equal(a.labels, b.labels)
    other = make_synthetic(
        SyntheticConfig(
            feature_dims={"t": 24, "a": 12, "v": 16},
            conversations={"train": 30, "test": 10},
            max_len=20,
            seed=2,
        )
    )
    assert not np.array_equal(a.labels, other.splits["train"][3].labels)


def test_synthetic_labels_depend_on_context_and_speaker():
    fs = make_synthetic(SyntheticConfig(feature_dims={"t": 4, "a": 4, "v": 4}, conversations={"train": 200}))
    same_speaker_kept, n = 0, 0
    for d in fs.splits["train"]:
        last: dict[int, int] = {}
        for s, y in zip(d.speakers.tolist(), d.labels.tolist()):
            if s in last:
                same_speaker_kept += last[s] == y
                n += 1
            last[s] = y
    assert same_speaker_kept / n > 0.5  # a chance level would be ~1/6: emotions persist per speaker
    by_speaker = np.zeros((9, 6))
    for d in fs.splits["train"]:
        np.add.at(by_speaker, (d.speakers, d.labels), 1)
    dist = by_speaker[:2] / by_speaker[:2].sum(1, keepdims=True)
    assert np.abs(dist[0] - dist[1]).sum() > 0.1  # speaker slots have different temperaments


def test_all_three_modalities_beat_each_single_modality(tmp_path):
    fs = make_synthetic(
        SyntheticConfig(
            feature_dims={"t": 32, "a": 16, "v": 16}, conversations={"train": 100, "test": 1}, seed=3
        )
    )
    scores = {}
    for mods in ("t", "a", "v", "tav"):
        sub = fs.select(tuple(mods))
        cfg = ModelConfig(
            modalities=tuple(mods),
            feature_dims=sub.feature_dims,
            num_classes=6,
            num_speakers=9,
            d=32,
            heads=4,
        )
        metrics = train(
            sub,
            cfg,
            LossConfig(),
            TrainConfig(epochs=10, lr=1e-2, batch_size=8, patience=10),
            tmp_path / mods,
            progress=False,
        )
        scores[mods] = metrics["validation"]["weighted_f1"]
    assert scores["tav"] > max(scores["t"], scores["a"], scores["v"]) + 0.05, scores


def test_validation_fraction_is_seeded_and_disjoint(tiny_data):
    train_a, val_a = split_validation(tiny_data.splits["train"], 0.2, seed=0)
    train_b, val_b = split_validation(tiny_data.splits["train"], 0.2, seed=0)
    assert [d.id for d in val_a] == [d.id for d in val_b] and len(val_a) == 6
    assert not {d.id for d in val_a} & {d.id for d in train_a}
    with pytest.raises(ValueError, match="val_fraction"):
        split_validation(tiny_data.splits["train"], 1.5, seed=0)


def test_features_dir_round_trip(tiny_data, tmp_path):
    save_features(tiny_data, tmp_path / "f")
    back = load_data(str(tmp_path / "f"))
    assert back.label_names == tiny_data.label_names and back.feature_dims == tiny_data.feature_dims
    for split in ("train", "test"):
        for a, b in zip(tiny_data.splits[split], back.splits[split], strict=True):
            assert (
                a.id == b.id and np.array_equal(a.speakers, b.speakers) and np.array_equal(a.labels, b.labels)
            )
            assert all(np.array_equal(a.features[m], b.features[m]) for m in "tav")


def test_features_dir_errors(tiny_data, tmp_path):
    with pytest.raises(ArtifactError, match="meta.json is missing"):
        load_features(tmp_path)
    save_features(tiny_data, tmp_path / "f")
    (tmp_path / "f" / "train.npz").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ArtifactError, match="train.npz: corrupt or truncated"):
        load_features(tmp_path / "f")
    (tmp_path / "f" / "meta.json").write_text('{"format": "something-else"}')
    with pytest.raises(ArtifactError, match="expected format 'cmath-features'"):
        load_features(tmp_path / "f")
    with pytest.raises(InputError, match="--data"):
        load_data(str(tmp_path / "nope"))


def test_empty_conversation_is_refused(tiny_data):
    empty = Dialogue(
        "empty-1",
        {m: np.zeros((0, 4), np.float32) for m in "tav"},
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
    )
    with pytest.raises(InputError, match="conversation 'empty-1': expected at least one utterance"):
        collate([tiny_data.splits["train"][0], empty], ("t", "a", "v"))
