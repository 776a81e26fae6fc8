"""Out-of-fold check of a cheaper localisation on the fused (wide-volume) path: the app finds the box around the
atrium by segmenting every 2nd slice of the first view (``core.atrium.LOCALISE_STRIDE``) on the model's own
in-plane grid, about half of the fused path's time on a 256x256x130 volume; would every 3rd or 4th slice, or a
coarser in-plane grid (2x the model's: a quarter of the pixels), give the same masks?

Each kept cross-validation model segments its own validation volumes that take the fused path: localised with
each variant (timed), then the three views run once each in that box on the model's grid, averaged, thresholded
at the fold's threshold and cut to the largest component, as the app does. Seconds are the localisation plus the
three views. An experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_localise_stride_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-localise-stride-grid-oof.json
"""
from __future__ import annotations

import time

import numpy as np

from core import atrium as A
from core import metrics as M
from core import preprocess as pp

from _oof import collect, compare, fused_fold_volumes, write

# name -> (slice stride, in-plane grid as a multiple of the model's)
VARIANTS = {"every 2nd slice (the app)": (2, 1), "every 3rd slice": (3, 1), "every 4th slice": (4, 1),
            "every slice, grid 2x coarser": (1, 2), "every 2nd slice, grid 2x coarser": (2, 2)}


def run_fold(wdir: str, root) -> dict[str, dict]:
    """{case: {variant: {dice, seconds, box}}} for the fold's validation volumes that take the fused path."""
    out: dict[str, dict] = {}
    for lm, v, views, ctx in fused_fold_volumes(wdir, root):
        norm = pp.normalise_volume(np.asarray(v.data))
        row: dict = {"dataset": v.dataset, "fold_threshold": lm.threshold}
        app_stride = A.LOCALISE_STRIDE
        for name, (stride, coarse) in VARIANTS.items():
            A.LOCALISE_STRIDE = stride
            try:
                t0 = time.perf_counter()
                box = A.localise(lm.model, norm, v.spacing, views[0], lm.grid_mm * coarse, lm.threshold, 8, ctx)
                assert box is not None, f"{v.case_id}: localisation found nothing (the app would take its fallback)"
                sub = np.ascontiguousarray(norm[box])
                prob = np.mean([A.segment_view(lm.model, sub, v.spacing, ax, lm.grid_mm, 8, ctx, normalised=True)
                                for ax in views], axis=0)
                secs = time.perf_counter() - t0
            finally:
                A.LOCALISE_STRIDE = app_stride
            mask = np.zeros(norm.shape, np.uint8)
            mask[box] = pp.largest_component(prob >= lm.threshold)
            row[name] = {"dice": round(M.dice(mask, v.label), 4), "seconds": round(secs, 2),
                         "box": [[s.start, s.stop] for s in box]}
        out[v.case_id] = row
        print(v.case_id, {k: (r["dice"], r["seconds"]) for k, r in row.items() if k in VARIANTS}, flush=True)
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    names = list(VARIANTS)
    write(args, "fused-path localisation stride and grid, out of fold: each kept CV model on its own fused (bSSFP) "
          "validation volumes, at the fold's threshold", names[0], compare(per_case, names, names[0]), per_case)


if __name__ == "__main__":
    main()
