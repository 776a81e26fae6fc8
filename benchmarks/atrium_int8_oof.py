"""Out-of-fold check of an 8-bit integer (int8) atrium network against the app's bfloat16 one: same masks, less
time? Static post-training quantisation (PyTorch FX, x86 backend): weights per channel, activations per tensor,
their ranges observed on a few of each fold model's own *training* volumes (the first CALIB_PER_DATASET of each
dataset in its training list) as ``core.atrium.calibrate_int8`` does for the app's weights
(``core.atrium.int8_calibration_feed``).

Each kept cross-validation model then segments each of its own validation volumes twice, as the app does (its
views, flips and threshold, its localiser and 3D refiner when its folder has them; before 2026-12-07 the check
ran without them): bfloat16 autocast and int8 (the app runs its committed weights in int8); Dice against the
expert mask, seconds, the volume and the quality check's verdict are recorded for both. An experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_int8_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-int8-refiner-oof.json
"""
from __future__ import annotations

import time

import numpy as np

from core import atrium as A
from core import io as mio
from core import metrics as M
from core.inference import load_model
from core.precision import autocast
from core.quantize import calibrate

from _oof import collect, write

CALIB_PER_DATASET = A.INT8_CALIBRATION_PER_DATASET
NAMES = ["bfloat16", "int8"]


def _run(lm, model, v, views, ctx):
    t0 = time.perf_counter()
    pred = A.segment_canonical(model, v.data, v.spacing, views, lm.grid_mm, lm.threshold, 8, ctx,
                               flips=int(lm.card["input_spec"].get("tta_flips", 1)), localiser=lm.localiser,
                               refiner=lm.refiner)
    secs = time.perf_counter() - t0
    q = A.judge_with_card(A.quality_measures(pred, v.spacing, lm.threshold, v.data), lm.card)
    return pred, {"dice": round(M.dice(pred.mask, v.label), 4), "seconds": round(secs, 2),
                  "volume_ml": round(A.volume_ml(pred.mask, v.spacing), 2), "reliable": bool(q.reliable)}


def calibrated_fold(wdir: str, root):
    """(fold model, its int8 model calibrated as the app's, its views, its validation volumes (canonical))."""
    lm = load_model("atrium", wdir)
    spec_views = tuple(lm.card["input_spec"].get("views", [2]))
    cases = mio.find_atrium_cases(root)
    calib_cases = A.int8_calibration_cases(lm.card["data"]["train_cases"], cases)
    t0 = time.perf_counter()
    flips = int(lm.card["input_spec"].get("tta_flips", 1))
    q8, _ = calibrate(lm.model, A.int8_calibration_feed(A.load_cases(calib_cases), spec_views, lm.grid_mm,
                                                        lm.threshold, flips))
    print(f"{wdir}: calibrated on {[c.case_id for c in calib_cases]} in {time.perf_counter() - t0:.0f} s", flush=True)
    val = set(lm.card["data"]["val_cases"])
    return lm, q8, spec_views, A.load_cases([c for c in cases if c.case_id in val])


def run_fold(wdir: str, root) -> dict[str, dict]:
    lm, q8, spec_views, vols = calibrated_fold(wdir, root)
    out: dict[str, dict] = {}
    for v in vols:
        views = A.resolve_views(spec_views, v.data.shape, v.spacing)
        pb, rb = _run(lm, lm.model, v, spec_views, lambda: autocast(lm.precision))
        pq, rq = _run(lm, q8, v, spec_views, None)
        row = {"dataset": v.dataset, "fused": len(views) > 1, "fold_threshold": lm.threshold,
               NAMES[0]: rb, NAMES[1]: rq, "mask_agreement_dice": round(M.dice(pq.mask, pb.mask), 4)}
        out[v.case_id] = row
        print(v.case_id, v.dataset, rb, rq, row["mask_agreement_dice"], flush=True)
    return out


def summary(per_case: dict[str, dict]) -> dict:
    out = {}
    for ds in sorted({r["dataset"] for r in per_case.values()}) + ["all"]:
        rows = [r for r in per_case.values() if ds in ("all", r["dataset"])]
        d = np.array([r[NAMES[1]]["dice"] - r[NAMES[0]]["dice"] for r in rows])
        out[ds] = {"n": len(rows), **{f"dice_mean {n}": round(float(np.mean([r[n]["dice"] for r in rows])), 4)
                                      for n in NAMES},
                   "dice_change_mean": round(float(d.mean()), 4), "volumes_worse_by_0.01": int((d < -0.01).sum()),
                   "volumes_better_by_0.01": int((d > 0.01).sum()),
                   "mask_agreement_min": float(min(r["mask_agreement_dice"] for r in rows)),
                   "verdict_changed": [c for c, r in per_case.items() if ds in ("all", r["dataset"])
                                       and r[NAMES[0]]["reliable"] != r[NAMES[1]]["reliable"]],
                   **{f"seconds_median {n}": round(float(np.median([r[n]["seconds"] for r in rows])), 2)
                      for n in NAMES}}
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    write(args, "int8 against bfloat16, out of fold: each kept CV model (int8 calibrated on "
          f"{CALIB_PER_DATASET} of its training volumes per dataset) on its own validation volumes, as the app runs "
          "(with the fold's localiser and 3D refiner)",
          NAMES[1], summary(per_case), per_case)


if __name__ == "__main__":
    main()
