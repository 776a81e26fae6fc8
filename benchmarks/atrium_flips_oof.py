"""Out-of-fold check of the single-view path's test-time flips: 1, 2 (the app) or 4 in-plane flips, at the
fold's own threshold, on each kept cross-validation model's LGE validation volumes (the slabs that take the
single-view path). Records Dice, seconds and whether the fold's quality check (fitted with 2 flips) would
report the volume. An experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_flips_oof.py \
        benchmarks/cv-folds/atrium/fold1 benchmarks/cv-folds/atrium/fold2 benchmarks/cv-folds/atrium/fold5 \
        --json benchmarks/logs/atrium-flips-oof.json
"""
from __future__ import annotations

import time

from core import atrium as A
from core import metrics as M
from core.precision import autocast

from _oof import collect, compare, fold_cases, write

FLIPS = (1, 2, 4)


def run_fold(wdir: str, root) -> dict[str, dict]:
    """{case: {"flips N": {dice, seconds, reported}}} for the fold's single-view validation volumes."""
    lm, vols = fold_cases(wdir, root, fused=False)
    views = tuple(lm.card["input_spec"].get("views", [2]))
    out: dict[str, dict] = {}
    for v in vols:
        row = {"dataset": v.dataset, "fold_threshold": lm.threshold}
        for f in FLIPS:
            t = time.perf_counter()
            p = A.segment_canonical(lm.model, v.data, v.spacing, views, lm.grid_mm, lm.threshold, 8,
                                    lambda: autocast(lm.precision), flips=f)
            s = time.perf_counter() - t
            q = A.judge_with_card(A.quality_measures(p, v.spacing, lm.threshold), lm.card)
            row[f"flips {f}"] = {"dice": round(M.dice(p.mask, v.label), 4), "seconds": round(s, 2),
                                 "reported": bool(q.reliable)}
        out[v.case_id] = row
        print(v.case_id, {k: r for k, r in row.items() if k.startswith("flips")}, flush=True)
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    names = [f"flips {f}" for f in FLIPS]
    summary = compare(per_case, names, "flips 2")
    for n in names:
        rep = [r[n] for r in per_case.values() if r[n]["reported"]]
        summary[n].update({"reported": len(rep), "reported_with_dice_below_0.5": int(sum(r["dice"] < 0.5 for r in rep))})
    write(args, "single-view test-time flips, out of fold: each kept CV model on its own single-view (LGE) "
          "validation volumes, at the fold's threshold; quality check with the fold's limits (fitted with 2 flips)",
          "flips 2", summary, per_case)


if __name__ == "__main__":
    main()
