"""Training smoke run on real shared data (loss goes down; weights + card are self-describing)."""
from __future__ import annotations

import json

import pytest
import torch

import train_all
from core.checkpoint import load_state_dict
from core.inference import load_model


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("smoke-weights")


def test_train_all_smoke_every_task(xray_root, acdc_root, heart_root, smoke_dir):
    rc = train_all.main(["--smoke", "--data-root", str(xray_root), "--weights-dir", str(smoke_dir), "--device", "cpu"])
    assert rc == 0
    for task in ("pneumonia", "cardiac", "atrium"):
        card = json.loads((smoke_dir / f"{task}.json").read_text())
        hist = card["history"]
        assert len(hist) == 2, task
        assert hist[-1]["train_loss"] < hist[0]["train_loss"], f"{task}: training loss did not go down"
        for key in ("architecture", "input_spec", "threshold", "training", "data", "validation", "train_time_s",
                    "device", "git_commit", "weights_sha256"):
            assert key in card, (task, key)
        assert card["smoke"] is True
        state, _ = load_state_dict(task, smoke_dir)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
        load_model(task, smoke_dir)
        # the run fingerprinted the training inputs of these very weights (core.provenance)
        from core.provenance import load_fingerprints

        assert load_fingerprints(task, card, smoke_dir), task
    # pneumonia's split is by patient: no patient on both sides
    card = json.loads((smoke_dir / "pneumonia.json").read_text())
    assert card["data"]["n_train"] + card["data"]["n_val"] == card["data"]["n_images"]


def test_no_temporary_files_left(smoke_dir):
    if not any(smoke_dir.iterdir()):
        pytest.skip("smoke run did not happen")
    assert not [p for p in smoke_dir.iterdir() if p.name.endswith(".tmp")]


def test_atrium_cv_folds_run_one_at_a_time_and_are_kept(heart_root, tmp_path):
    """`--atrium-cv --folds K` (smoke): each run adds its fold to atrium.cv.json and keeps the folds an
    earlier run of the same recipe wrote; every fold is scored per dataset with its own quality check."""
    import json

    from train_all import main as train_main

    for k in (2, 3):
        assert train_main(["--atrium-cv", "--smoke", "--folds", str(k), "--data-root", str(heart_root), "--device", "cpu",
                           "--weights-dir", str(tmp_path)]) == 0
    cv = json.loads((tmp_path / "atrium.cv.json").read_text())
    assert [f["fold"] for f in cv["folds"]] == [2, 3]
    for f in cv["folds"]:
        assert not set(f["train_cases"]) & set(f["val_cases"])
        assert set(f["per_case"]) == set(f["val_cases"])
        assert {r["dataset"] for r in f["per_case"].values()} == set(f["per_dataset"]) - {"all"}
        assert 0.0 <= f["quality_check"]["validation_firing_rate"] <= 1.0
        # the fold's weights are kept with a card the app's loader reads, and the record names them
        lm = load_model("atrium", tmp_path / "atrium-cv-folds" / f"fold{f['fold']}")
        assert lm.card["weights_sha256"] == f["weights_sha256"]
        assert lm.card["data"]["val_cases"] == f["val_cases"] and lm.threshold == f["threshold"]
        # and the localiser it was scored with, trained on the fold's training volumes, beside it
        assert lm.localiser.card["weights_sha256"] == f["localiser_sha256"]
        assert lm.localiser.card["data"]["train_cases"] == f["train_cases"]
    # scoring the kept folds again with the same inference choices (no training) gives the same record
    from core.atrium import rescore_folds

    rep = rescore_folds(tmp_path / "atrium-cv-folds", root=heart_root, out_dir=tmp_path)
    assert [f["fold"] for f in rep["folds"]] == [2, 3]
    for old, new in zip(cv["folds"], rep["folds"]):
        assert new["weights_sha256"] == old["weights_sha256"] and new["rescored"]["git_commit"]
        assert new["localiser_sha256"] == old["localiser_sha256"]
        assert (new["tta_flips"], new["threshold"]) == (old["tta_flips"], old["threshold"])
        # the same Dice up to the last bits of bfloat16 arithmetic: on a CPU with AVX512-BF16 but no AMX the
        # scoring during training and the rescoring of the saved weights differ by ~2e-5 (an AMD EPYC; exactly
        # equal on a Xeon with AMX), as the same weights in another memory layout take other oneDNN kernels
        # there; a different scoring (threshold, flips, volumes) moves Dice by far more than 1e-3
        old_dice = {c: r["dice"] for c, r in old["per_case"].items()}
        assert {c: r["dice"] for c, r in new["per_case"].items()} == pytest.approx(old_dice, abs=1e-3)
    assert json.loads((tmp_path / "atrium.cv.json").read_text())["scoring"] == cv["scoring"]
    # running a fold again replaces its entry and keeps what the replaced run said
    assert train_main(["--atrium-cv", "--smoke", "--folds", "3", "--data-root", str(heart_root), "--device", "cpu",
                       "--weights-dir", str(tmp_path)]) == 0
    again = json.loads((tmp_path / "atrium.cv.json").read_text())["folds"]
    assert again[0] == rep["folds"][0]
    prev = again[1]["previous_run"]
    assert prev["weights_sha256"] == rep["folds"][1]["weights_sha256"]
    assert prev["dice_mean_per_dataset"] == {ds: r["dice_mean"] for ds, r in rep["folds"][1]["per_dataset"].items()}
