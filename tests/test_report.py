"""The README's figures are generated from the weights cards, not typed by hand."""
from __future__ import annotations

from core.config import PROJECT_ROOT
from core.checkpoint import read_card
from core.report import END, START, markdown


def test_readme_figures_match_cards():
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == markdown().strip(), "README figures are stale: run `python -m core.report --write README.md`"


def test_precision_and_runtime_lines_from_known_values():
    from core.report import alternatives_markdown, precision_markdown

    pc = {"pneumonia": {"app_precision": "float32"},
          "cardiac": {"app_precision": "bfloat16", "n_cases": 80, "probability_max_abs_change": 0.0111,
                      "probability_mean_abs_change": 0.00037, "decisions_changed": 1,
                      "validation_float32": {"n": 17, "auc": 1.0, "accuracy": 16 / 17, "lv_ef_mae": 0.0398},
                      "validation_bfloat16": {"n": 17, "auc": 1.0, "accuracy": 1.0, "lv_ef_mae": 0.0397}},
          "atrium": {"app_precision": "int8", "n_cases": 16, "mask_dice_vs_float32_min": 0.99893,
                     "mask_dice_vs_float32_mean": 0.99946, "validation_float32": {"n": 3, "dice_mean": 0.89082},
                     "validation_int8": {"n": 3, "dice_mean": 0.89073}}}
    text = "\n".join(precision_markdown(pc))
    assert "- pneumonia: float32 in the app, nothing changes." in text
    assert "at most 0.0111 (mean 0.00037); decisions changed at the card's threshold: 1" in text
    assert "accuracy 0.941 / 1.000" in text
    assert "- cardiac (bfloat16, 80 studies)" in text and "float32 / bfloat16: AUC 1.000 / 1.000" in text
    assert "- atrium (int8, 16 volumes): Dice between the int8 and float32 masks 0.9989 at worst (mean 0.9995)" in text
    assert "3D Dice float32 / int8: 0.8908 / 0.8907" in text
    assert precision_markdown(None) == [] and alternatives_markdown(None) == []
    alt = {"what": "atrium U-Net", "inference": {
        "eager_float32": {"median_s": 2.0, "speedup_vs_eager_float32": 1.0, "max_abs_prob_diff_vs_eager_float32": 0.0},
        "onnxruntime_float32": {"skipped": "onnxruntime is not installed"}},
        "training_step": {"what": "one step", "eager": {"median_s": 0.8},
                          "torch_compile": {"median_s": 0.4, "speedup_vs_eager": 2.0, "first_step_s": 25.2}}}
    lines = alternatives_markdown(alt)
    assert "| eager_float32 | 2.000 | x1.00 | 0 |" in lines
    assert "| onnxruntime_float32 | onnxruntime is not installed | | |" in lines
    assert lines[-1].endswith("torch.compile 0.400 s (x2.00, after 25 s compiling its first step).")


def _case(ds: str, dice: float, hd: float = 5.0, ve: float = 10.0) -> dict:
    return {"dice": dice, "iou": dice / (2 - dice), "hd95_mm": hd, "volume_error_pct": ve, "dataset": ds}


def _fold1_card() -> dict:
    return {"validation": {"per_case": {"a1": _case("msd", 0.9), "b1": _case("lge", 0.8, ve=-20.0)},
                           "per_dataset": {}, "tta_flips": 2},
            "quality_check": {"validation_fired": {}, "limits": {}, "limits_fused": None, "validation_firing_rate": 0.0,
                              "validation_measures": {}},
            "data": {"train_cases": ["a2", "b2", "b3"], "val_cases": ["a1", "b1"]}, "best_epoch": 3, "epochs_run": 4,
            "train_time_s": 1.0, "git_commit": "x", "threshold": 0.5}


def test_atrium_cross_validation_pools_folds_per_dataset(tmp_path):
    """The folds in atrium.cv.json pooled per dataset (fold 1 from the card while the committed model is a
    fold-1 model), with the quality check's firing taken from each fold's own record: known values."""
    import json

    import pytest

    from core.atrium import fold_record_from_card
    from core.report import atrium_cross_validation

    card = _fold1_card()
    assert atrium_cross_validation(card, tmp_path) is None  # no CV file: nothing pooled
    fold2 = {"fold": 2, "per_case": {"a2": _case("msd", 0.7, hd=15.0), "b2": _case("lge", 0.4), "b3": _case("lge", 0.3)},
             "quality_check": {"validation_fired": {"b3": ["volume"]}}}
    (tmp_path / "atrium.cv.json").write_text(json.dumps({"n_folds_planned": 5, "folds": [fold2]}))
    # the committed model trained on every volume: only the file's folds, one record per fold
    all_volume = {"validation": {"cross_validated": True}, "data": {"val_cases": []}}
    (tmp_path / "atrium.cv.json").write_text(json.dumps({"n_folds_planned": 5,
                                                         "folds": [fold_record_from_card(card), fold2]}))
    for c in (card, all_volume):
        r = atrium_cross_validation(c, tmp_path)
        assert r["n"] == 5 and r["folds"] == [1, 2] and r["n_folds"] == 2 and r["n_folds_planned"] == 5
        assert r["dice_mean"] == pytest.approx((0.9 + 0.8 + 0.7 + 0.4 + 0.3) / 5)
        msd, lge = r["per_dataset"]["msd"], r["per_dataset"]["lge"]
        assert msd["n"] == 2 and msd["dice_mean"] == pytest.approx(0.8) and msd["hd95_mm_mean"] == pytest.approx(10.0)
        assert lge["n"] == 3 and lge["dice_min"] == pytest.approx(0.3)
        assert lge["abs_volume_error_pct_mean"] == pytest.approx(40 / 3)
        assert lge["fired"] == ["b3"] and r["fired"] == ["b3"]
        assert lge["reported_below_0_5"] == ["b2"] and msd["reported_below_0_5"] == []
    # a file written before fold 1 moved into it: fold 1 still comes from a fold-1 card
    (tmp_path / "atrium.cv.json").write_text(json.dumps({"n_folds_planned": 5, "folds": [fold2]}))
    assert atrium_cross_validation(card, tmp_path)["folds"] == [1, 2]
    assert atrium_cross_validation(all_volume, tmp_path)["folds"] == [2]


def test_inference_setting_of_the_all_volume_model_from_the_folds():
    from core.atrium import cv_inference_setting

    folds = [{"tta_flips": f, "threshold": t} for f, t in ((2, 0.5), (2, 0.5), (1, 0.45), (2, 0.4), (1, 0.5))]
    assert cv_inference_setting(folds) == (2, 0.5)  # most folds' flips; median threshold
    assert cv_inference_setting(folds[:4]) == (2, 0.475)
    assert cv_inference_setting([{"tta_flips": 2, "threshold": 0.5}, {"tta_flips": 1, "threshold": 0.3}])[0] == 1  # tie: fewer


def test_five_class_diagnosis_lines_from_known_values(tmp_path):
    import json

    from core.report import diagnosis_markdown

    cm = [[3, 1, 0, 0, 0], [0, 4, 0, 0, 0], [0, 0, 4, 0, 0], [0, 2, 0, 2, 0], [0, 0, 0, 0, 4]]
    sens = {"NOR": 0.75, "DCM": 1.0, "HCM": 1.0, "MINF": 0.5, "RV": 1.0}
    cal = {"n": 20, "accuracy": 0.85, "accuracy_ci95": [0.7, 1.0], "normal_vs_disease": {"auc": 0.95},
           "confusion": {"matrix": cm}, "sensitivity": sens, "ece": 0.04}
    rep = {"cross_validation": {"what": "5-fold CV", "calibrated": cal, "uncalibrated": {**cal, "ece": 0.2},
                                "ece_if_perfectly_calibrated": {"median": 0.05, "q95": 0.09, "p_value": 0.7},
                                "repeated": {"runs": [{}, {}], "ece_mean": 0.045, "ece_range": [0.04, 0.05],
                                             "accuracy_mean": 0.85, "accuracy_range": [0.8, 0.9]}},
           "validation_end_to_end": {}}
    (tmp_path / "cardiac_diagnosis.json").write_text(json.dumps(rep))
    text = "\n".join(diagnosis_markdown(tmp_path))
    assert "accuracy **0.850** (95 % CI 0.700-1.000)" in text
    assert "| MINF | 0 | 2 | 0 | 2 | 0 | 0.500 |" in text
    assert "0.200 before, 0.040 after" in text and "would show 0.050 on 20 patients" in text
    assert "over 2 fold assignments ECE 0.045 (0.040-0.050)" in text
    assert "End to end" not in text  # no end-to-end patients, no line


def test_sample_cases_say_truly_whether_the_weights_trained_on_them():
    """A sample named "validation" must be a validation case of the committed weights, and one named a
    training volume must be in their training data: a Dice on a training volume is a fit, not accuracy."""
    import json
    from pathlib import Path

    from core.samples import SAMPLES_FILE

    spec = json.loads(SAMPLES_FILE.read_text())
    for task in ("pneumonia", "cardiac", "atrium"):
        data = read_card(task)["data"]
        for item in spec[task]:
            if "patient" in item:
                case = Path(item["patient"]).name
            elif task == "atrium":
                case = Path(item["files"]["image"]).name.removesuffix(".nii.gz")
            else:
                case = item["files"]["image"]
            if "validation" in item["name"]:
                assert case in data["val_cases"] and case not in data.get("train_cases", []), (task, case)
            if "training volume" in item["name"]:
                assert case in data["train_cases"], (task, case)
            assert "validation" in item["name"] or "training volume" in item["name"], item["name"]


def test_stress_checks_prefer_the_out_of_fold_file_only_when_its_folds_are_the_cv(tmp_path, monkeypatch):
    """A pooled out-of-fold stress file is shown when its fold models are exactly the CV's (by sha256); with one
    fold model replaced it is passed over for the next file of the check."""
    import json

    from core import report as R
    from core.atrium import read_cv

    cv = read_cv()
    assert cv, "weights/atrium.cv.json is committed"
    shas = {str(f["fold"]): f["weights_sha256"] for f in cv["folds"]}
    summary = {"as stored": {"n": 2, "dice_mean": 0.8, "reported": 2, "reported_with_dice_under_0.5": 0,
                             "per_dataset": {"LA2018": {"n": 2, "dice_mean": 0.8, "reported": 2,
                                                        "reported_with_dice_under_0.5": 0, "reported_dice_min": 0.7}}}}
    oof, other = tmp_path / "oof.json", tmp_path / "other.json"
    refiners = {str(f["fold"]): f.get("refiner_sha256") for f in cv["folds"]}
    oof.write_text(json.dumps({"cv_folds": shas, "cv_refiners": refiners, "layout_stress": {"summary": summary}}))
    other.write_text(json.dumps({"weights_sha256": shas["1"], "layout_stress": {"summary": {}}}))
    monkeypatch.setattr(R, "STRESS_CHECKS", {"layout_stress": ((str(oof), str(other)), "Layout", "layout")})
    (c,) = R.stress_checks()
    assert c["whose"] == R.OUT_OF_FOLD and c["file"] == str(oof)
    # the same fold models run without the refiners the CV now records: shown, and said to be of the path before
    oof.write_text(json.dumps({"cv_folds": shas, "layout_stress": {"summary": summary}}))
    (c,) = R.stress_checks()
    assert c["file"] == str(oof) and ("before the 3D refiner" in c["whose"]) == any(refiners.values())
    assert c["rows"] == [{"variant": "as stored", "dataset": "LGE-MRI, 2018 LA challenge", "n": 2, "dice_mean": 0.8,
                          "reported": 2, "reported_with_dice_under_0.5": 0, "reported_dice_min": 0.7}]
    oof.write_text(json.dumps({"cv_folds": {**shas, "1": "0" * 64}, "layout_stress": {"summary": summary}}))
    (c,) = R.stress_checks()
    assert c["file"] == str(other) and "fold-1 model" in c["whose"] and c["rows"] == []


def test_threshold_shown_as_the_page_shows_it(tmp_path):
    import json
    import math

    from core.report import threshold_text

    card = {"task": "pneumonia", "threshold": 0.25, "weights_sha256": "abc"}
    assert threshold_text(card, tmp_path) == "25.0%"  # no calibration file: the card's own value
    # Platt map sigmoid(1 * logit(p) + ln 3): logit(0.25) = -ln 3, so the page shows the threshold at 50 %
    cal = {"weights_sha256": "abc", "method": "platt", "slope": 1.0, "intercept": math.log(3.0)}
    (tmp_path / "pneumonia.calibration.json").write_text(json.dumps(cal))
    assert threshold_text(card, tmp_path) == "50.0% (calibrated; 0.250 raw)"
    assert threshold_text({**card, "weights_sha256": "other"}, tmp_path) == "25.0%"  # fitted on other weights
    assert threshold_text({"task": "cardiac", "threshold": 0.44}, tmp_path) == "44.0%"
