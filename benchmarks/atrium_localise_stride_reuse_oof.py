"""Out-of-fold check: now that the fused path keeps the localising pass's reading for the first view (and blends
that view across its slices), does localising on every 3rd or 4th slice still cost accuracy? Before the reuse,
every 4th slice saved about 0.56 s of 2.5 s but lowered the MSD Dice by 0.0017
(``benchmarks/logs/atrium-localise-stride-grid-oof.json``). With the reuse the saving is smaller (the first view's
box pass then reads 2/3 or 3/4 of its slices instead of half), and the blend (1/4, 1/2, 1/4) no longer mixes the
two readings evenly on every slice.

Each kept cross-validation model runs the app's own fused path (``core.atrium.segment_canonical``, the fold's
threshold, batch 8, the model's precision) on its own validation volumes that take that path, with
``LOCALISE_STRIDE`` set to each variant; Dice, HD95, volume error, slice-to-slice area roughness along the first
view and the seconds of the whole call. An experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_localise_stride_reuse_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-localise-stride-reuse-oof.json
"""
from __future__ import annotations

import time

from core import atrium as A

from _oof import collect, compare, fused_fold_volumes, mask_scores, roughness, write

VARIANTS = {"every 2nd slice (the app)": 2, "every 3rd slice": 3, "every 4th slice": 4}


def run_fold(wdir: str, root) -> dict[str, dict]:
    """{case: {variant: {dice, hd95, volume_error_pct, roughness, seconds}}} for the fold's fused-path volumes."""
    out: dict[str, dict] = {}
    app_stride = A.LOCALISE_STRIDE
    for lm, v, views, ctx in fused_fold_volumes(wdir, root):
        row: dict = {"dataset": v.dataset, "fold_threshold": lm.threshold}
        for name, stride in VARIANTS.items():
            A.LOCALISE_STRIDE = stride
            try:
                t0 = time.perf_counter()
                pred = A.segment_canonical(lm.model, v.data, v.spacing, views, lm.grid_mm, lm.threshold, 8, ctx)
                secs = time.perf_counter() - t0
            finally:
                A.LOCALISE_STRIDE = app_stride
            assert pred.box is not None, f"{v.case_id}: localisation found nothing (the fallback would run)"
            row[name] = {**mask_scores(pred.mask, v.label, v.spacing),
                         "roughness": round(roughness(pred.mask, views[0]), 4), "seconds": round(secs, 2)}
        out[v.case_id] = row
        print(v.case_id, {k: (r["dice"], r["hd95"], r["seconds"]) for k, r in row.items() if k in VARIANTS}, flush=True)
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    names = list(VARIANTS)
    summary = compare(per_case, names, names[0], {"hd95": 3, "volume_error_pct": 2, "roughness": 4})
    write(args, "fused-path localisation stride with the localising pass reused and the first view blended, out "
          "of fold: each kept CV model through segment_canonical on its own fused (bSSFP) validation volumes, at "
          "the fold's threshold", names[0], summary, per_case)


if __name__ == "__main__":
    main()
