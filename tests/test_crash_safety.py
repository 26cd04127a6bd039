"""Crash safety, checked: a checkpoint write or an export cut short at any point never leaves a folder that loads
as something it is not, and the previous checkpoint survives.

Two ways to cut: fault injection (the k-th rename of the write raises, for every k: every state between two file
operations is visited) and real SIGKILLs of a process saving checkpoints in a loop, at random moments.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import pytest

import cmath_runtime
from cmath_runtime import ArtifactError

pytestmark = pytest.mark.slow  # real servers / killed processes: left out of the fast lane (-m 'not slow')


class Crash(BaseException):
    """Stands for a kill: raised instead of the k-th os.replace."""


def _crash_at(monkeypatch: pytest.MonkeyPatch, k: int) -> None:
    real, calls = os.replace, [0]

    def replace(src: object, dst: object) -> None:
        calls[0] += 1
        if calls[0] == k:
            raise Crash(f"killed before rename {k}: {dst}")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)


def _copy_run(tiny_run: Path, dest: Path) -> Path:
    dest.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_run / name, dest / name)
    return dest


def _save_generation(run: Path, g: int) -> None:
    """Save the run's checkpoint again with generation g written into the config and into the first weight."""
    import torch

    from cmath_train.checkpoint import load_checkpoint, save_checkpoint

    ck = load_checkpoint(run)
    with torch.no_grad():
        next(iter(ck.model.parameters())).view(-1)[0] = float(g)
    extra = {
        k: v
        for k, v in ck.extra.items()
        if k not in ("weights_sha256", "format", "version", "model_name", "versions")
    }
    save_checkpoint(
        run,
        ck.model,
        ck.model_name,
        ck.model_cfg,
        ck.loss_cfg,
        ck.train_cfg,
        ck.label_names,
        {**extra, "generation": g},
    )


def _generation(run: Path) -> int:
    """Load the checkpoint (must succeed) and check that its config and weights come from the same save."""
    from cmath_train.checkpoint import load_checkpoint

    ck = load_checkpoint(run)
    g = ck.extra.get("generation")
    first = float(next(iter(ck.model.parameters())).detach().view(-1)[0])
    assert g is not None and first == float(g), f"config says generation {g}, weights say {first}"
    return int(g)


def test_checkpoint_write_cut_at_every_rename(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = _copy_run(tiny_run, tmp_path / "run")
    _save_generation(run, 0)
    last = 0
    for g, k in enumerate([1, 2, 3, 1, 3, 2, 3, 99], start=1):  # 3 renames per save; 99 = not cut
        with monkeypatch.context() as m:
            _crash_at(m, k)
            with contextlib.suppress(Crash):
                _save_generation(run, g)
        got = _generation(run)  # the previous checkpoint (or the new one) always loads, whole
        assert got in (last, g), (g, k, got)
        last = got
    assert last == 8  # the save that was not cut is the one that loads


SAVER = """
import sys, torch
sys.path.insert(0, {root!r})
from tests.test_crash_safety import _save_generation
print("ready", flush=True)
g = 1
while True:
    _save_generation(__import__("pathlib").Path({run!r}), g)
    print("saved", g, flush=True)
    g += 1
"""


def test_checkpoint_killed_at_random_moments(tiny_run: Path, tmp_path: Path) -> None:
    """SIGKILL a process that saves checkpoints in a loop, 4 times at random moments (time-bounded)."""
    run = _copy_run(tiny_run, tmp_path / "run")
    _save_generation(run, 0)
    rng, deadline, done = random.Random(16), time.monotonic() + 150, 0
    root = str(Path(__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "OMP_NUM_THREADS": "1",
    }
    while done < 4 and time.monotonic() < deadline:
        proc = subprocess.Popen(
            [sys.executable, "-c", SAVER.format(root=root, run=str(run))],
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        try:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
            time.sleep(rng.uniform(0.05, 1.0))
        finally:
            proc.send_signal(signal.SIGKILL)
            out, _ = proc.communicate(timeout=30)
        saved = [int(line.split()[1]) for line in out.splitlines() if line.startswith("saved")]
        before = _generation(run)  # loads, whole (config and weights of one save)
        assert not saved or before >= saved[-1]  # a completed save is never lost
        _save_generation(run, 0)  # next round starts again from generation 0 (the subprocess counts from 1)
        done += 1
    assert done >= 2, "the machine was too slow to kill the saver even twice in 150 s"


# --- exports -----------------------------------------------------------------------------------------------------


def test_export_cut_at_every_rename(tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An export (fp32 first; then fp32 + fp16) cut before each of its renames: the folder loads as the previous
    export or the new one, sha256 of every file verified, or it does not load at all; never a mix."""
    from cmath_export import builders, export_run

    out = tmp_path / "out"
    first = export_run(tiny_run, out_dir=out, text_encoder=False)
    proto = onnx.load(str(out / "model.onnx"))
    monkeypatch.setattr(builders, "export_onnx", lambda model, opset, max_len: proto)  # skip the slow trace
    conv = {
        "speakers": [0, 1, 2],
        "features": {
            m: np.ones((3, d), np.float32)
            for m, d in json.loads((out / "export.json").read_text())["feature_dims"].items()
        },
    }
    outcomes = set()
    for k in range(1, 12):
        folder = tmp_path / f"cut{k}"
        shutil.copytree(out, folder)
        with monkeypatch.context() as m:
            _crash_at(m, k)
            try:
                export_run(tiny_run, out_dir=folder, fp16=True, text_encoder=False)
                outcomes.add("finished")
            except Crash:
                pass
        try:
            model = cmath_runtime.load(folder, backend="cpu", threads=1)  # verify=True: every sha256 checked
        except ArtifactError:
            outcomes.add("does not load")
            continue
        manifest = json.loads((folder / "export.json").read_text())
        assert manifest["artifacts"].keys() in ({"fp32"}, {"fp32", "fp16"})
        if "fp16" in manifest["artifacts"]:
            cmath_runtime.load(folder, backend="cpu", threads=1, precision="fp16").predict([conv])
            outcomes.add("new")
        else:
            assert manifest == first
            outcomes.add("previous")
        model.predict([conv])
    assert {"previous", "does not load", "finished"} <= outcomes, outcomes
