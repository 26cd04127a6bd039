"""Bring your own encoder: a local Hugging Face model directory (here a tiny RoBERTa-style model with a byte-level
BPE tokenizer, `<s>`/`</s>` and a single token type) through the plain commands: cmath-prepare --encoder DIR
(fine-tune) -> cmath-train -> cmath-export --fp16 --int8 -> raw text in the torch-free runtime, as training read it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import cmath_runtime
from tests.conftest import context_rows
from tests.test_prepare import MELD_HEADER, meld_rows, write_csv


def tiny_roberta(root: Path, texts: list[str]) -> Path:
    """A 1-layer, 32-d RoBERTa (random weights) with a byte-level BPE tokenizer trained on `texts`, saved as a plain
    Hugging Face directory (config.json, model.safetensors, tokenizer.json; no sentence-transformers files)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import RobertaConfig, RobertaModel, RobertaTokenizerFast

    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    bpe = Tokenizer(models.BPE(unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator(texts, trainer)
    bpe.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    tok = RobertaTokenizerFast(tokenizer_object=bpe, model_max_length=64)
    out = root / "roberta"
    tok.save_pretrained(out)
    torch.manual_seed(0)
    config = RobertaConfig(
        vocab_size=bpe.get_vocab_size(),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=66,
        type_vocab_size=1,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
    )
    RobertaModel(config).save_pretrained(out)
    return out


def test_a_local_roberta_style_encoder_goes_through_the_whole_pipeline(tmp_path: Path) -> None:
    from cmath_export.cli import main as export_cli
    from cmath_train.cli import main as train_cli
    from cmath_train.data.features_dir import load_features
    from cmath_train.prepare.cli import main as prepare_cli

    rows = {s: context_rows(n, k) for k, (s, n) in enumerate((("train", 48), ("dev", 18), ("test", 12)))}
    files = {s: write_csv(tmp_path / f"{s}.csv", MELD_HEADER, meld_rows(r)) for s, r in rows.items()}
    encoder = tiny_roberta(tmp_path, [r[0] for r in rows["train"]] + ["0: 1: 2:"])
    assert not (encoder / "modules.json").exists()
    feats, run = tmp_path / "feat", tmp_path / "run"
    steps = [
        (
            prepare_cli,
            ["csv", "--train", str(files["train"]), "--dev", str(files["dev"]), "--test", str(files["test"])]
            + ["--out", str(feats), "--encoder", str(encoder), "--no-cache", "--finetune-epochs", "1"]
            + ["--finetune-batch-size", "8", "--finetune-lr", "1e-3", "--context-window", "2"]
            + ["--context-max-tokens", "48", "--future-turns", "0", "--text-col", "Utterance"],
        ),
        (train_cli, ["--data", str(feats), "--epochs", "1", "--d", "16", "--causal", "--out", str(run)]),
        (export_cli, [str(run), "--fp16", "--int8"]),
    ]
    for cli, args in steps:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
    fs = load_features(feats)
    assert fs.meta["text_encoder"]["finetune"]["base_encoder"]["path"] == str(encoder.resolve())
    entry = json.loads((run / "export/export.json").read_text())["text_encoder"]
    assert "token_type_ids" in entry["inputs"]  # the segment mask, though the model has one token type
    for precision, atol in (("fp32", 1e-5), ("int8", None)):
        model = cmath_runtime.load(run / "export", backend="cpu", threads=1, precision=precision)
        for d in fs.splits["dev"]:
            conv = cmath_runtime.Conversation(model)
            for s, text in zip(d.speakers, d.texts, strict=True):
                conv.add(int(s), text=text)
            if (
                atol is not None
            ):  # raw text read as cmath-prepare read it (<s> utterance </s> past turns </s>)
                np.testing.assert_allclose(conv.features["t"], d.features["t"], atol=atol)
            else:
                cos = (conv.features["t"] * d.features["t"]).sum(1) / (
                    np.linalg.norm(conv.features["t"], axis=1) * np.linalg.norm(d.features["t"], axis=1)
                )
                assert cos.min() > 0.99


def test_an_encoder_without_start_and_separator_tokens_is_refused(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models

    from cmath_runtime.errors import InputError
    from cmath_runtime.turns import TurnFormat
    from cmath_train.prepare.build import turn_examples

    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json")
    )
    with pytest.raises(InputError, match="token pairs"):
        turn_examples({}, {}, TurnFormat(window=1), tmp_path)
