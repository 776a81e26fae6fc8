"""Out-of-fold check of the fusion rule: on the wide (bSSFP) volumes the app fuses three slice directions
(``core.atrium.resolve_views``); the rule was adopted on 3 validation volumes of one fold. Here each kept
cross-validation model segments its own wide validation volumes both ways, at the fold's threshold: fused (the
app) and one axial view with the fold's in-plane flips (the single-view path, as on an LGE slab). An
experiment, not part of the app: the fusion extent is set out of reach for the second run and put back.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=.:benchmarks python benchmarks/atrium_fused_vs_single_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-fused-vs-single-oof.json
"""
from __future__ import annotations

import time

from core import atrium as A
from core import metrics as M
from core.precision import autocast

from _oof import collect, compare, fold_cases, write

NAMES = ("three views fused (the app)", "one axial view, the fold's flips")


def run_fold(wdir: str, root) -> dict[str, dict]:
    """{case: {way: {dice, seconds, views}}} for the fold's validation volumes that take the fused path."""
    lm, vols = fold_cases(wdir, root, fused=True)
    views, flips = tuple(lm.card["input_spec"].get("views", [2])), int(lm.card["input_spec"].get("tta_flips", 1))
    extent0 = A.FUSE_MIN_EXTENT_MM
    out: dict[str, dict] = {}
    try:
        for v in vols:
            row = {"dataset": v.dataset, "fold_threshold": lm.threshold, "fold_flips": flips}
            for name, extent in zip(NAMES, (extent0, float("inf"))):
                A.FUSE_MIN_EXTENT_MM = extent
                t = time.perf_counter()
                p = A.segment_canonical(lm.model, v.data, v.spacing, views, lm.grid_mm, lm.threshold, 8,
                                        lambda: autocast(lm.precision), flips=flips)
                row[name] = {"dice": round(M.dice(p.mask, v.label), 4), "seconds": round(time.perf_counter() - t, 2),
                             "views": list(p.views)}
            out[v.case_id] = row
            print(v.case_id, {k: r for k, r in row.items() if k in NAMES}, flush=True)
    finally:
        A.FUSE_MIN_EXTENT_MM = extent0
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    write(args, "fusion rule, out of fold: each kept CV model on its own wide (bSSFP) validation volumes, three "
          "views fused against one axial view with the fold's flips, at the fold's threshold", NAMES[0],
          compare(per_case, list(NAMES), NAMES[0]), per_case)


if __name__ == "__main__":
    main()
