"""cmath-prepare: CSV reading, labels, speakers, text cleaning, cache, CLI, MiniLM offline, fine-tuning."""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from cmath_runtime.errors import InputError
from cmath_runtime.text_clean import clean_text
from cmath_runtime.turns import TurnFormat
from cmath_train.data.features_dir import load_features
from cmath_train.prepare import build as build_module
from cmath_train.prepare.build import PrepareOptions, prepare_features
from cmath_train.prepare.cli import main
from cmath_train.prepare.csv_source import CsvColumns, read_conversations
from cmath_train.prepare.embedding_cache import EmbeddingCache, encode_texts
from cmath_train.prepare.finetune import FinetuneOptions
from tests.conftest import minilm_dir

MELD_DIR = Path(__file__).resolve().parents[2] / "shared/data/meld"
MELD_HEADER = ["Sr No.", "Utterance", "Speaker", "Emotion", "Dialogue_ID", "Utterance_ID"]


class FakeEncoder:
    """Deterministic 8-d vectors from sha256 of the text; counts what it was asked to embed."""

    dim = 8
    identity = "fake-encoder-v1"

    def __init__(self) -> None:
        self.seen: list[str] = []

    def describe(self) -> dict[str, Any]:
        return {"kind": "fake", "name": "fake", "dim": self.dim}

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        self.seen += list(texts)
        return np.stack([self.vector(t) for t in texts])

    @staticmethod
    def vector(text: str) -> np.ndarray:
        digest = hashlib.sha256(text.encode()).digest()
        return np.frombuffer(digest[:32], np.uint8).reshape(8, 4).astype(np.float32).mean(1) / 255


def write_csv(path: Path, header: list[str], rows: list[list[object]], encoding: str = "utf-8") -> Path:
    with path.open("w", newline="", encoding=encoding) as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def meld_rows(rows: list[tuple[str, str, str, int, int]]) -> list[list[object]]:
    return [[i + 1, text, spk, emo, dlg, utt] for i, (text, spk, emo, dlg, utt) in enumerate(rows)]


TRAIN = [
    ("Hi there.", "Ann", "joy", 0, 1),  # shuffled on purpose: Utterance_ID orders them
    ("Hello!", "Bob", "neutral", 0, 0),
    ("Go away.", "Cat", "anger", 0, 2),
    ("Fine.", "Ann", "neutral", 1, 0),
    ("Really?", "Dan", "surprise", 1, 1),
]
TEST = [("Who are you?", "Eve", "surprise", 7, 0), ("Me.", "Ann", "joy", 7, 1)]


@pytest.fixture
def splits(tmp_path: Path) -> dict[str, Path]:
    return {
        "train": write_csv(tmp_path / "train.csv", MELD_HEADER, meld_rows(TRAIN)),
        "dev": write_csv(tmp_path / "dev.csv", MELD_HEADER, meld_rows(TRAIN[:3])),
        "test": write_csv(tmp_path / "test.csv", MELD_HEADER, meld_rows(TEST)),
    }


def run(files: dict[str, Path], out: Path, encoder: FakeEncoder | None = None, **kw: Any) -> Any:
    """prepare_features with a frozen (fake) encoder."""
    options = PrepareOptions(cache_dir=None, finetune=FinetuneOptions(epochs=0), **kw)
    return prepare_features(files, out, options, encoder=encoder or FakeEncoder(), log=lambda _: None)


def test_orders_rows_and_writes_the_feature_format(splits: dict[str, Path], tmp_path: Path) -> None:
    run(splits, tmp_path / "feat")
    fs = load_features(tmp_path / "feat")
    assert fs.label_names == ["anger", "joy", "neutral", "surprise"]  # alphabetical, from train
    assert (
        fs.feature_dims == {"t": 8} and fs.num_speakers == 9 and list(fs.splits) == ["train", "dev", "test"]
    )
    d0, d1 = fs.splits["train"]
    assert (d0.id, d1.id) == ("0", "1")
    np.testing.assert_array_equal(
        d0.features["t"], np.stack([FakeEncoder.vector(t) for t in ["Hello!", "Hi there.", "Go away."]])
    )
    assert d0.labels.tolist() == [2, 1, 0] and d0.speakers.tolist() == [0, 1, 2]
    assert d1.speakers.tolist() == [0, 1]  # ids restart in each conversation
    meta = json.loads((tmp_path / "feat/meta.json").read_text())["meta"]
    assert meta["speakers"]["mapping"] == "order" and meta["text_encoder"]["name"] == "fake"
    assert meta["source"]["files"]["train"]["rows"] == 5


def test_no_dev_split(splits: dict[str, Path], tmp_path: Path) -> None:
    fs = run({"train": splits["train"], "test": splits["test"]}, tmp_path / "feat")
    assert list(fs.splits) == ["train", "test"]
    assert list(load_features(tmp_path / "feat").splits) == ["train", "test"]


def test_fine_tuning_without_dev_carves_one_from_train(splits: dict[str, Path], tmp_path: Path) -> None:
    from cmath_train.prepare.build import carve_dev

    table = read_conversations(splits["train"])
    parts = carve_dev(table, 0.5, seed=0)
    assert sorted(d.id for p in parts.values() for d in p.dialogues) == sorted(d.id for d in table.dialogues)
    assert len(parts["dev"].dialogues) == 1 and parts["dev"].describe()["carved_from_train"] is True
    assert parts["train"].num_rows + parts["dev"].num_rows == table.num_rows
    one = dataclasses.replace(table, dialogues=table.dialogues[:1])
    with pytest.raises(InputError, match="at least 2 conversations"):
        carve_dev(one, 0.1, seed=0)


def test_speaker_mappings_handle_unseen_speakers(splits: dict[str, Path], tmp_path: Path) -> None:
    fs = run(splits, tmp_path / "a", speakers="order", num_speakers=2)
    assert fs.splits["train"][0].speakers.tolist() == [0, 1, 1]  # capped at num_speakers - 1
    fs = run(splits, tmp_path / "b", speakers="frequent", num_speakers=3)
    assert fs.meta["speakers"]["names"] == ["Ann", "Bob"]  # Ann 2x, then ties by name
    assert fs.splits["train"][0].speakers.tolist() == [1, 0, 2]  # Bob, Ann, Cat -> other
    assert fs.splits["test"][0].speakers.tolist() == [2, 0]  # unseen Eve -> other


def test_cli_column_options_and_multi_column_dialogue_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = ["season", "ep", "turn", "who", "line", "feeling"]
    rows = [
        [1, 5, "2", "B", "second", "sad"],
        [2, 5, "0", "X", "other talk", "happy"],
        [1, 5, "0.5", "A", "first", "happy"],
    ]
    train = write_csv(tmp_path / "train.csv", header, rows)
    test = write_csv(tmp_path / "test.csv", header, rows[:2])
    monkeypatch.setattr(
        build_module.SentenceTransformerEncoder, "load", classmethod(lambda cls, *a, **k: FakeEncoder())
    )
    args = [
        "csv",
        "--train",
        str(train),
        "--test",
        str(test),
        "--out",
        str(tmp_path / "feat"),
        "--no-cache",
        "--text-col",
        "line",
        "--speaker-col",
        "who",
        "--label-col",
        "feeling",
        "--dialogue-cols",
        "season, ep",
        "--order-col",
        "turn",
        "--speakers",
        "frequent",
        "--num-speakers",
        "4",
        "--finetune-epochs",
        "0",
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    fs = load_features(tmp_path / "feat")
    assert [d.id for d in fs.splits["train"]] == ["1/5", "2/5"]
    first = fs.splits["train"][0]
    np.testing.assert_array_equal(
        first.features["t"], np.stack([FakeEncoder.vector("first"), FakeEncoder.vector("second")])
    )
    assert [fs.label_names[i] for i in first.labels] == ["happy", "sad"]
    assert list(fs.splits) == ["train", "test"]


def test_unknown_test_label_names_file_row_and_label(splits: dict[str, Path], tmp_path: Path) -> None:
    bad = write_csv(
        tmp_path / "bad.csv", MELD_HEADER, meld_rows([TEST[0], ("Ugh.", "Ann", "contempt", 7, 1)])
    )
    with pytest.raises(InputError) as e:
        run({**splits, "test": bad}, tmp_path / "feat")
    assert str(bad) in str(e.value) and "data row 2 (line 3)" in str(e.value) and "'contempt'" in str(e.value)
    assert not (tmp_path / "feat").exists()  # checked before any embedding or writing


def test_mojibake_and_cp1252_files_are_normalised(tmp_path: Path) -> None:
    rows = meld_rows(
        [
            ("He\x92s here\x85", "Ann", "joy", 0, 0),
            ("You\u00e2\u20ac\u2122re  late", "Bob", "anger", 0, 1),
            ("Caf\u00e9 Nestl\u00e9", "Ann", "joy", 0, 2),
        ]
    )
    table = read_conversations(write_csv(tmp_path / "u.csv", MELD_HEADER, rows))
    assert table.dialogues[0].texts == ["He\u2019s here\u2026", "You\u2019re late", "Caf\u00e9 Nestl\u00e9"]
    raw = write_csv(
        tmp_path / "w.csv",
        MELD_HEADER,
        meld_rows([("It\u2019s caf\u00e9", "Zo\u00eb", "joy", 0, 0)]),
        "cp1252",
    )
    table = read_conversations(raw)
    assert table.encoding == "cp1252" and table.dialogues[0].texts == ["It\u2019s caf\u00e9"]
    assert table.dialogues[0].speakers == ["Zo\u00eb"]
    assert clean_text("e\u0301\u00a0x\x00") == "\u00e9 x"  # NFC, odd spaces, control characters


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("", "an empty file"),
        ("\n\n", "an empty file"),
        (",".join(MELD_HEADER) + "\n", "only a header"),
        (
            ",".join(MELD_HEADER) + "\n1,Hi,Ann,joy,0,first\n",
            "data row 1 (line 2), column 'Utterance_ID': expected a number",
        ),
        (
            ",".join(MELD_HEADER) + "\n1,Hi,Ann,joy,0,1\n2,Yo,Bob,joy,0,1\n",
            "distinct values within conversation '0'",
        ),
        (",".join(MELD_HEADER) + "\n1,Hi, there,Ann,joy,0,1\n", "7 fields"),
        (",".join(MELD_HEADER) + "\n1,Hi,Ann,,0,1\n", "column 'Emotion': expected a label"),
    ],
)
def test_bad_files_are_clear_errors(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(InputError) as e:
        read_conversations(path)
    assert str(path) in str(e.value) and expected in str(e.value)


def test_missing_column_lists_the_columns_found(tmp_path: Path) -> None:
    path = write_csv(
        tmp_path / "x.csv", ["Utterance", "Speaker", "Dialogue_ID", "Utterance_ID"], [["Hi", "A", 0, 0]]
    )
    with pytest.raises(InputError) as e:
        read_conversations(path)
    message = str(e.value)
    assert str(path) in message and "column 'Emotion'" in message and "'Utterance', 'Speaker'" in message
    with pytest.raises(InputError, match="column 'Feeling'"):
        read_conversations(path, CsvColumns(label="Feeling"))


def test_cache_makes_reruns_free(tmp_path: Path) -> None:
    enc = FakeEncoder()
    cache = EmbeddingCache(tmp_path / "cache", enc.identity, enc.dim)
    first = encode_texts(enc, ["a", "bb", "a", "ccc"], cache, chunk=2, flush_every=2)
    assert sorted(enc.seen) == ["a", "bb", "ccc"]  # duplicates embedded once
    again = FakeEncoder()
    second = encode_texts(
        again, ["ccc", "a", "dddd"], EmbeddingCache(tmp_path / "cache", again.identity, again.dim)
    )
    assert again.seen == ["dddd"]
    np.testing.assert_array_equal(second[:2], first[[3, 0]])
    for shard in cache.dir.glob("shard-*.npz"):
        with np.load(shard, allow_pickle=False) as z:
            assert z["emb"].dtype == np.float32 and z["key"].dtype.kind == "U"
    other = EmbeddingCache(tmp_path / "cache", "another-encoder", 8)
    assert other.load() == {} and other.key("a") != cache.key("a")


@pytest.mark.meld
@pytest.mark.skipif(
    not (MELD_DIR / "dev_sent_emo.csv").is_file(), reason=f"MELD CSVs not found in {MELD_DIR}"
)
def test_real_meld_dev_file(tmp_path: Path) -> None:
    dev = MELD_DIR / "dev_sent_emo.csv"
    fs = run({"train": dev, "test": dev}, tmp_path / "feat")
    train = fs.splits["train"]
    assert sum(len(d) for d in train) == 1109 and len(train) == 114
    assert fs.label_names == ["anger", "disgust", "fear", "joy", "neutral", "sadness", "surprise"]
    assert all(d.speakers.max() < 9 for d in train)
    table = read_conversations(dev)
    assert table.dialogues[0].texts[0] == "Oh my God, he\u2019s lost it. He\u2019s totally lost it."
    assert all("\x92" not in t and "\u00e2\u20ac" not in t for d in table.dialogues for t in d.texts)


def test_minilm_loads_offline_and_matches_sentence_transformers() -> None:
    from cmath_train.prepare.text_encoder import SentenceTransformerEncoder

    enc = SentenceTransformerEncoder.load()
    assert enc.model_dir == minilm_dir().resolve()
    texts = ["Oh my God, he\u2019s lost it.", "What?", "You\u2019re a genius!", "Okay."]
    emb = encode_texts(enc, texts)
    assert emb.shape == (4, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb, enc.model.encode(texts, normalize_embeddings=True), atol=1e-5)
    info = enc.describe()
    assert info["name"] == "sentence-transformers/all-MiniLM-L6-v2" and info["dim"] == 384
    assert info["pooling"] == "mean" and info["normalized"] is True and info["max_seq_length"] == 256
    assert info["modules"] == ["Transformer", "Pooling", "Normalize"] and len(info["weights_sha256"]) == 1


def test_finetune_saves_a_reloadable_changed_encoder(tmp_path: Path, tiny_encoder: Path) -> None:
    from safetensors.numpy import load_file

    from cmath_train.prepare.text_encoder import SentenceTransformerEncoder

    words = {"joy": "great lovely fun", "anger": "stupid awful hate", "neutral": "the table is here"}
    rows, labels = [], list(words)
    for i in range(40):
        label = labels[i % 3]
        rows.append((f"{words[label]} {i}", "AB"[i % 2], label, i // 5, i % 5))
    train = write_csv(tmp_path / "train.csv", MELD_HEADER, meld_rows(rows))
    dev = write_csv(tmp_path / "dev.csv", MELD_HEADER, meld_rows(rows[:10]))
    out = tmp_path / "feat"
    options = dict(
        encoder_dir=tiny_encoder,
        finetune=FinetuneOptions(epochs=1, batch_size=8, lr=1e-3),
        turns=TurnFormat(window=2, max_tokens=48),
    )
    fs = prepare_features(
        {"train": train, "dev": dev, "test": dev},
        out,
        PrepareOptions(cache_dir=None, **options),
        log=lambda _: None,
    )
    info = fs.meta["text_encoder"]
    assert info["path"] == str((out / "encoder").resolve()) and info["dim"] == 32
    ft = info["finetune"]
    assert ft["best_epoch"] == 1 and ft["history"][0]["dev_weighted_f1"] is not None
    assert ft["base_encoder"]["path"] == str(tiny_encoder.resolve())
    before, after = (
        load_file(str(tiny_encoder / "model.safetensors")),
        load_file(str(out / "encoder/model.safetensors")),
    )
    changed = {k for k in before if not np.array_equal(before[k], after[k])}
    assert before.keys() == after.keys() and changed and "embeddings.word_embeddings.weight" not in changed
    reloaded = SentenceTransformerEncoder.load(out / "encoder")
    assert reloaded.dim == 32 and info["turns"] == TurnFormat(window=2, max_tokens=48).to_json()
    probs = np.load(out / "encoder_classifier.npz")
    assert probs["dev_probs"].shape == (10, 3) and np.allclose(probs["dev_probs"].sum(1), 1, atol=1e-5)
    feats = load_features(out)
    assert [t for d in feats.splits["dev"] for t in d.texts] == [
        t for d in read_conversations(dev).dialogues for t in d.texts
    ]


def test_linear_probe_tunes_c_on_dev_and_scores_test() -> None:
    from cmath_train.data.types import Dialogue, FeatureSet
    from cmath_train.prepare.probe import linear_probe

    rng = np.random.default_rng(0)

    def split(n: int) -> list[Dialogue]:
        y = rng.integers(0, 3, (n, 4))
        return [
            Dialogue(
                str(i),
                {"t": (np.eye(3)[row] * 3 + rng.normal(size=(4, 3))).astype(np.float32)},
                np.zeros(4, np.int64),
                row,
            )
            for i, row in enumerate(y)
        ]

    fs = FeatureSet(["a", "b", "c"], {"t": 3}, 2, {"train": split(30), "dev": split(10), "test": split(10)})
    r = linear_probe(fs, cs=(0.01, 1.0))
    assert r.selection == "dev" and set(r.by_c) == {0.01, 1.0} and r.test_weighted_f1 > 0.8
    no_dev = FeatureSet(
        fs.label_names, fs.feature_dims, 2, {"train": fs.splits["train"], "test": fs.splits["test"]}
    )
    assert linear_probe(no_dev, cs=(1.0,)).selection == "20% of train conversations (seed 0)"


def test_future_turns_give_a_whole_conversation_encoder_and_a_distilled_causal_twin(
    tmp_path: Path, tiny_encoder: Path
) -> None:
    from cmath_runtime.errors import InputError
    from cmath_train.data import load_data

    words = {"joy": "great lovely fun", "anger": "stupid awful hate", "neutral": "the table is here"}
    rows, labels = [], list(words)
    for i in range(30):
        label = labels[i % 3]
        rows.append((f"{words[label]} {i}", "AB"[i % 2], label, i // 5, i % 5))
    train = write_csv(tmp_path / "train.csv", MELD_HEADER, meld_rows(rows))
    dev = write_csv(tmp_path / "dev.csv", MELD_HEADER, meld_rows(rows[:10]))
    out = tmp_path / "feat"
    whole_fmt = TurnFormat(window=2, max_tokens=48, future=1)
    fs = prepare_features(
        {"train": train, "dev": dev, "test": dev},
        out,
        PrepareOptions(
            cache_dir=None,
            encoder_dir=tiny_encoder,
            finetune=FinetuneOptions(epochs=1, batch_size=8, lr=1e-3),
            turns=whole_fmt,
            causal_turns=TurnFormat(window=2, max_tokens=40),
        ),
        log=lambda _: None,
    )
    assert fs.meta["text_encoder"]["turns"] == whole_fmt.to_json() and fs.meta["causal_twin"] == "causal"
    twin = load_data(str(out), causal=True)
    info = twin.meta["text_encoder"]
    assert info["turns"]["future"] == 0 and info["turns"]["max_tokens"] == 40
    assert info["finetune"]["distilled_from"] and info["path"] == str((out / "causal/encoder").resolve())
    assert (out / "causal/encoder_classifier.npz").is_file() and (out / "encoder_classifier.npz").is_file()
    whole = load_data(str(out))
    assert whole.meta["text_encoder"]["turns"]["future"] == 1
    # the twin's features are its own encoder's, not the whole-conversation encoder's
    a, b = (np.concatenate([d.features["t"] for d in f.splits["dev"]]) for f in (whole, twin))
    assert a.shape == b.shape and not np.allclose(a, b)
    shutil.rmtree(out / "causal")
    with pytest.raises(InputError, match="future turn"):
        load_data(str(out), causal=True)


def test_a_twin_longer_than_the_encoder_reads_is_refused_before_fine_tuning(
    splits: dict[str, Path], tmp_path: Path, tiny_encoder: Path
) -> None:
    from cmath_runtime.errors import InputError

    options = PrepareOptions(
        cache_dir=None,
        encoder_dir=tiny_encoder,
        finetune=FinetuneOptions(epochs=1, batch_size=8),
        turns=TurnFormat(window=2, max_tokens=48, future=1),
        causal_turns=TurnFormat(window=2, max_tokens=96),  # the tiny encoder reads 64
    )
    with pytest.raises(InputError, match="causal_max_tokens.*at most 64"):
        prepare_features(splits, tmp_path / "feat", options, log=lambda _: None)
    assert not (tmp_path / "feat").exists()  # nothing fine-tuned, nothing written
