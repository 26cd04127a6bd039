"""cmath_demo's API without a browser: an export whose text encoder reads future turns cannot stream, so the page
reads the whole conversation with `predict` after every turn, and answers exactly what the runtime answers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

import cmath_runtime

pytest.importorskip("starlette", reason="the demo extra is not installed (pip install 'cmath[demo]')")


def test_a_future_reading_export_is_read_whole_after_every_turn(
    context_run: tuple[Path, Path], tmp_path: Path
) -> None:
    from cmath_demo.app import Demo

    _, export = context_run
    copy = tmp_path / "export"
    shutil.copytree(export, copy)
    manifest = json.loads((copy / "export.json").read_text())
    manifest["text_encoder"]["turns"]["future"] = 1  # the same graph, read with one future turn
    (copy / "export.json").write_text(json.dumps(manifest))
    demo = Demo(copy, threads=1)
    lines = [("Ann", "great lovely fun 3"), ("Bo", "stupid awful hate 8"), ("Ann", "the table is here 1")]
    out = demo.transcript({"transcript": "\n".join(f"{n}: {t}" for n, t in lines), "precision": "fp32"})
    assert out["path"] == "whole conversation"
    more = demo.turn({"session": out["session"], "speaker": "Bo", "text": "great fun", "precision": "fp32"})
    model = cmath_runtime.load(copy, backend="cpu", threads=1)
    [want] = model.predict([{"speakers": [0, 1, 0, 1], "texts": [t for _, t in lines] + ["great fun"]}])
    got = np.array([u["probs"] for u in more["utterances"]])
    np.testing.assert_allclose(got, want.probs, atol=1e-6)  # earlier turns read again with the new one
    assert [u["label"] for u in more["utterances"]] == want.labels
    with pytest.raises(cmath_runtime.InputError, match="text"):
        demo.turn({"session": more["session"], "speaker": "Bo", "text": "  ", "precision": "fp32"})
    assert len(demo.sessions[more["session"]]) == 4  # a refused turn changes nothing
