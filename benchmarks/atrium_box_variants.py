"""Out-of-fold check of the fused (wide-volume) path's two box settings: how sparsely the atrium is localised
(``core.atrium.LOCALISE_STRIDE``) and how much context the views get around it (``ROI_MARGIN_MM``).

Each kept cross-validation model (benchmarks/cv-folds/atrium/fold<K>) segments its own validation volumes that
take the fused path (the bSSFP ones), once per setting; Dice against the truth and the seconds taken go to a JSON.
An experiment, not part of the app: the settings are changed in place for the run and put back.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_box_variants.py \
        benchmarks/cv-folds/atrium/fold1 benchmarks/cv-folds/atrium/fold5 --json benchmarks/logs/atrium-box-variants-oof.json
"""
from __future__ import annotations

import time

from core import atrium as A
from core import metrics as M
from core.precision import autocast

from _oof import collect, compare, fold_cases, write

SETTINGS = [(2, 40.0), (4, 40.0), (2, 60.0), (4, 60.0)]  # (localisation stride, margin mm); first = the app's


def run_fold(wdir: str, root) -> dict[str, dict]:
    """{case: {setting: {dice, seconds}}} for the fold's validation volumes that take the fused path."""
    lm, vols = fold_cases(wdir, root, fused=True)
    spec = lm.card["input_spec"]
    views, flips = tuple(spec.get("views", [2])), int(spec.get("tta_flips", 1))
    stride0, margin0 = A.LOCALISE_STRIDE, A.roi_box.__defaults__
    out: dict[str, dict] = {}
    try:
        for v in vols:
            row = {}
            for stride, margin in SETTINGS:
                A.LOCALISE_STRIDE, A.roi_box.__defaults__ = stride, (margin, margin0[1])
                t = time.perf_counter()
                p = A.segment_canonical(lm.model, v.data, v.spacing, views, lm.grid_mm, lm.threshold, 8,
                                        lambda: autocast(lm.precision), flips=flips)
                row[f"stride {stride}, margin {margin:g} mm"] = {"dice": round(M.dice(p.mask, v.label), 4),
                                                                 "seconds": round(time.perf_counter() - t, 2)}
            out[v.case_id] = row
            print(v.case_id, row, flush=True)
    finally:
        A.LOCALISE_STRIDE, A.roi_box.__defaults__ = stride0, margin0
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    names = [f"stride {s}, margin {m:g} mm" for s, m in SETTINGS]
    write(args, "fused-path box settings, out of fold: each kept CV model on its own fused (bSSFP) validation volumes",
          names[0], compare(per_case, names, names[0]), per_case)


if __name__ == "__main__":
    main()
