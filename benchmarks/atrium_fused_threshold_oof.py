"""Out-of-fold check of the mask threshold on the fused (wide-volume) path. The CV chooses each fold's threshold on
its single-view (LGE) validation volumes, and the fused three-view path takes the same one; the mean of three views
is a differently calibrated probability, so a threshold of its own might suit it better.

Each kept cross-validation model (benchmarks/cv-folds/atrium/fold<K>) segments its own validation volumes that take
the fused path (the bSSFP ones) once, as the app does; the fused probability is then cut at each threshold (largest
3D component, as the app). Dice per volume and threshold go to a JSON. An experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_fused_threshold_oof.py \
        benchmarks/cv-folds/atrium/fold1 benchmarks/cv-folds/atrium/fold2 benchmarks/cv-folds/atrium/fold5 \
        --json benchmarks/logs/atrium-fused-threshold-oof.json
"""
from __future__ import annotations

import time

import numpy as np

from core import atrium as A
from core import metrics as M
from core import preprocess as pp
from core.precision import autocast

from _oof import collect, compare, fold_cases, write

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6)  # the CV's candidates and two above


def run_fold(wdir: str, root) -> dict[str, dict]:
    """{case: {"fold's threshold" | "threshold t": {dice, seconds}}} for the fold's fused-path validation volumes."""
    lm, vols = fold_cases(wdir, root, fused=True)
    spec = lm.card["input_spec"]
    views, flips = tuple(spec.get("views", [2])), int(spec.get("tta_flips", 1))
    out: dict[str, dict] = {}
    for v in vols:
        t = time.perf_counter()
        p = A.segment_canonical(lm.model, v.data, v.spacing, views, lm.grid_mm, lm.threshold, 8,
                                lambda: autocast(lm.precision), flips=flips)
        secs = round(time.perf_counter() - t, 2)
        prob = p.prob.astype(np.float32)
        row = {"fold's threshold": {"dice": round(M.dice(p.mask, v.label), 4), "seconds": secs,
                                    "threshold": lm.threshold}}
        for thr in THRESHOLDS:
            row[f"threshold {thr:g}"] = {"dice": round(M.dice(pp.largest_component(prob >= thr), v.label), 4),
                                         "seconds": secs}
        out[v.case_id] = row
        print(v.case_id, {k: r["dice"] for k, r in row.items()}, flush=True)
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    names = ["fold's threshold"] + [f"threshold {t:g}" for t in THRESHOLDS]
    write(args, "fused-path mask threshold, out of fold: each kept CV model on its own fused (bSSFP) validation "
          "volumes, the fused probability cut at each threshold", names[0], compare(per_case, names, names[0]),
          per_case)


if __name__ == "__main__":
    main()
