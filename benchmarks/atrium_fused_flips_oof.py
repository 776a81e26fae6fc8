"""Out-of-fold check of test-time flips on the fused (wide-volume) path: the app runs each of the three views
once in the box around the atrium; would 2 or 4 in-plane flips per view, or a heavier axial view, raise the
bSSFP (MSD) Dice, the dataset under its 0.90 bar?

Each kept cross-validation model segments its own validation volumes that take the fused path: the atrium is
localised as the app does, then every view runs once per in-plane flip in that box; the variants are means of
those passes, thresholded at the fold's threshold and cut to the largest component as the app does. Seconds per
variant are the localisation plus the passes it uses (timed one by one). An experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_fused_flips_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-fused-flips-64ep-oof.json
"""
from __future__ import annotations

import time

import numpy as np

from core import atrium as A
from core import metrics as M
from core import preprocess as pp

from _oof import collect, compare, fused_fold_volumes, write

# name -> (flips per view, weight of each view in the mean: the first listed view is the slicing axis the
# app localises along)
VARIANTS = {"1 pass per view (the app)": (1, (1, 1, 1)), "2 flips per view": (2, (1, 1, 1)),
            "4 flips per view": (4, (1, 1, 1)), "1 pass, first view weighted 2": (1, (2, 1, 1)),
            "2 flips on the first view only": (None, (1, 1, 1))}


def run_fold(wdir: str, root) -> dict[str, dict]:
    """{case: {variant: {dice, seconds}}} for the fold's validation volumes that take the fused path."""
    out: dict[str, dict] = {}
    for lm, v, views, ctx in fused_fold_volumes(wdir, root):
        t0 = time.perf_counter()
        norm = pp.normalise_volume(np.asarray(v.data))
        box = A.localise(lm.model, norm, v.spacing, views[0], lm.grid_mm, lm.threshold, 8, ctx)
        t_loc = time.perf_counter() - t0
        assert box is not None, f"{v.case_id}: localisation found nothing (the app would take its fallback)"
        sub = np.ascontiguousarray(norm[box])
        passes: dict[tuple[int, int], np.ndarray] = {}  # (view index, flip index) -> probabilities in the box
        secs: dict[tuple[int, int], float] = {}
        for k, ax in enumerate(views):
            for j, dims in enumerate(A.TTA_FLIPS[4]):
                t = time.perf_counter()
                passes[(k, j)] = A.segment_view(lm.model, sub, v.spacing, ax, lm.grid_mm, 8, ctx, normalised=True,
                                                flip_set=(dims,))
                secs[(k, j)] = time.perf_counter() - t
        row = {"dataset": v.dataset, "fold_threshold": lm.threshold}
        for name, (flips, weights) in VARIANTS.items():
            used = [(k, j) for k in range(len(views))
                    for j in range(flips if flips is not None else (2 if k == 0 else 1))]
            acc = np.zeros(sub.shape, np.float32)
            for k in range(len(views)):
                js = [j for (kk, j) in used if kk == k]
                acc += weights[k] * np.mean([passes[(k, j)] for j in js], axis=0)
            prob = acc / sum(weights[:len(views)])
            mask = np.zeros(norm.shape, np.uint8)
            mask[box] = pp.largest_component(prob >= lm.threshold)
            row[name] = {"dice": round(M.dice(mask, v.label), 4),
                         "seconds": round(t_loc + sum(secs[u] for u in used), 2)}
        out[v.case_id] = row
        print(v.case_id, {k: r for k, r in row.items() if k in VARIANTS}, flush=True)
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    names = list(VARIANTS)
    write(args, "fused-path test-time flips and view weights, out of fold: each kept CV model on its own fused "
          "(bSSFP) validation volumes, at the fold's threshold", names[0], compare(per_case, names, names[0]),
          per_case)


if __name__ == "__main__":
    main()
