"""Out-of-fold check of the single-view path's test-time flips: 1, 2 (the app) or 4 in-plane flips, at the
fold's own threshold, on each kept cross-validation model's LGE validation volumes (the slabs that take the
single-view path). Records Dice, seconds and whether the fold's quality check (fitted with 2 flips) would
report the volume. An experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_flips_oof.py \
        benchmarks/cv-folds/atrium/fold1 benchmarks/cv-folds/atrium/fold5 --json benchmarks/logs/atrium-flips-oof.json
"""
from __future__ import annotations

import time

import numpy as np

from core import atrium as A
from core import io as mio
from core import metrics as M
from core.inference import load_model
from core.precision import autocast

from _oof import collect, write

FLIPS = (1, 2, 4)


def run_fold(wdir: str, root) -> dict[str, dict]:
    """{case: {"flips N": {dice, seconds, reported}}} for the fold's single-view validation volumes."""
    lm = load_model("atrium", wdir)
    views = tuple(lm.card["input_spec"].get("views", [2]))
    val = set(lm.card["data"]["val_cases"])
    out: dict[str, dict] = {}
    for c in mio.find_atrium_cases(root):
        if c.case_id not in val:
            continue
        v = mio.load_nifti_path(c.image_path)
        d, sp, _ = A.to_canonical(v.data, v.affine, v.spacing)
        if len(A.resolve_views(views, d.shape, sp)) > 1:
            continue
        truth = A.to_canonical((mio.load_nifti_path(c.label_path).data > 0).astype(np.uint8), v.affine, v.spacing)[0]
        row = {"dataset": c.dataset, "fold_threshold": lm.threshold}
        for f in FLIPS:
            t = time.perf_counter()
            p = A.segment_canonical(lm.model, d, sp, views, lm.grid_mm, lm.threshold, 8,
                                    lambda: autocast(lm.precision), flips=f)
            s = time.perf_counter() - t
            q = A.judge_with_card(A.quality_measures(p, sp, lm.threshold), lm.card)
            row[f"flips {f}"] = {"dice": round(M.dice(p.mask, truth), 4), "seconds": round(s, 2),
                                 "reported": bool(q.reliable)}
        out[c.case_id] = row
        print(c.case_id, {k: r for k, r in row.items() if k.startswith("flips")}, flush=True)
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    rows = list(per_case.values())
    base = "flips 2"
    summary = {}
    for f in FLIPS:
        n = f"flips {f}"
        diff = np.array([r[n]["dice"] - r[base]["dice"] for r in rows])
        summary[n] = {"dice_mean": round(float(np.mean([r[n]["dice"] for r in rows])), 4),
                      "dice_change_vs_app_mean": round(float(diff.mean()), 4),
                      "volumes_better": int((diff > 0).sum()), "volumes_worse_by_0.01": int((diff < -0.01).sum()),
                      "reported": int(sum(r[n]["reported"] for r in rows)),
                      "reported_with_dice_below_0.5": int(sum(r[n]["reported"] and r[n]["dice"] < 0.5 for r in rows)),
                      "seconds_median": round(float(np.median([r[n]["seconds"] for r in rows])), 2)}
    write(args, "single-view test-time flips, out of fold: each kept CV model on its own single-view (LGE) "
          "validation volumes, at the fold's threshold; quality check with the fold's limits (fitted with 2 flips)",
          base, summary, per_case)


if __name__ == "__main__":
    main()
