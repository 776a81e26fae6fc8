"""Weights: checksum-verified, weights_only loading, clear errors when missing or mismatched."""
from __future__ import annotations

import json
import shutil

import pytest

from core.checkpoint import load_state_dict, save_checkpoint
from core.config import PROJECT_ROOT
from core.errors import MissingWeightsError
from core.inference import load_model
from core.models import build_model


def test_save_and_load_roundtrip(tmp_path):
    net = build_model("SmallCNN", base=4, n_blocks=2)
    save_checkpoint(net.state_dict(), {"task": "pneumonia"}, "pneumonia", tmp_path)
    state, card = load_state_dict("pneumonia", tmp_path)
    assert set(state) == set(net.state_dict())
    assert len(card["weights_sha256"]) == 64


def test_missing_weights_say_how_to_fix(tmp_path):
    with pytest.raises(MissingWeightsError, match="train_all.py --tasks atrium"):
        load_model("atrium", tmp_path)
    (tmp_path / "atrium.json").write_text("{}")
    with pytest.raises(MissingWeightsError, match="train_all.py --tasks atrium"):
        load_model("atrium", tmp_path)


def test_tampered_weights_are_refused(tmp_path):
    for f in ("pneumonia.pt", "pneumonia.json"):
        shutil.copy(PROJECT_ROOT / "weights" / f, tmp_path / f)
    with open(tmp_path / "pneumonia.pt", "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(MissingWeightsError, match="does not match its card"):
        load_model("pneumonia", tmp_path)


@pytest.mark.parametrize("task", ["pneumonia", "cardiac", "atrium"])
def test_committed_weights_and_cards(task):
    lm = load_model(task)
    card = lm.card
    assert (PROJECT_ROOT / "weights" / f"{task}.pt").stat().st_size < 20e6
    assert card["smoke"] is False
    assert card["history"] and "val_loss" in card["history"][0]
    assert 0 < lm.threshold < 1
    json.dumps(card)


def test_atomic_writes_get_the_usual_file_mode(tmp_path):
    """Cards, run records and input checks are readable like any file the account writes (not mkstemp's
    0600), so an app server under another account can read what training wrote."""
    import os
    import stat

    from core.checkpoint import FILE_MODE, _atomic_write

    umask = os.umask(0)
    os.umask(umask)
    assert FILE_MODE == 0o666 & ~umask
    target = tmp_path / "x.json"
    _atomic_write(target, b"{}")
    assert stat.S_IMODE(target.stat().st_mode) == FILE_MODE
    assert target.read_bytes() == b"{}" and [p.name for p in tmp_path.iterdir()] == ["x.json"]
