"""benchmarks/atrium_cv_compare.py: the fold-by-fold comparison of two atrium CV files, on hand-made files."""
import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("atrium_cv_compare", ROOT / "benchmarks" / "atrium_cv_compare.py")
C = importlib.util.module_from_spec(spec)
spec.loader.exec_module(C)


def _fold(k: int, dice: dict[str, float], fired=()) -> dict:
    ds = {c: ("Task02_Heart" if c.startswith("la_") else "LA2018") for c in dice}
    return {"fold": k, "val_cases": sorted(dice),
            "per_case": {c: {"dice": d, "dataset": ds[c], "hd95_mm": 2.0 * (1 + d), "volume_error_pct": -10 * d}
                         for c, d in dice.items()},
            "quality_check": {"validation_fired": {c: ["reason"] for c in fired}}}


def test_compare_counts_changes_per_dataset_over_the_common_folds():
    a = {"folds": [_fold(1, {"A": 0.80, "B": 0.90, "la_1": 0.85}), _fold(2, {"C": 0.70})]}
    b = {"folds": [_fold(1, {"A": 0.83, "B": 0.895, "la_1": 0.80}, fired=["la_1"]), _fold(3, {"D": 0.9})]}
    res = C.compare(a, b)
    assert res["folds"] == [1]  # fold 2 and 3 are in one file only
    lge = res["rows"]["pooled / LA2018"]
    assert lge["n"] == 2 and lge["dice"] == pytest.approx([0.85, 0.8625])
    assert lge["mean_change"] == pytest.approx(0.0125) and (lge["better"], lge["worse"]) == (1, 0)
    assert lge["abs_volume_error_pct"] == pytest.approx([8.5, 8.625])
    msd = res["rows"]["fold 1 / Task02_Heart"]
    assert (msd["better"], msd["worse"], msd["quality_fired"]) == (0, 1, [0, 1])
    assert msd["t"] != msd["t"]  # one volume: no t statistic (nan)
    b["folds"][0]["val_cases"] = ["A", "B"]
    with pytest.raises(ValueError, match="fold 1"):
        C.compare(a, b)
