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

import numpy as np

from core import atrium as A
from core import io as mio
from core import metrics as M
from core.inference import load_model
from core.precision import autocast

from _oof import collect, write

SETTINGS = [(2, 40.0), (4, 40.0), (2, 60.0), (4, 60.0)]  # (localisation stride, margin mm); first = the app's


def run_fold(wdir: str, root) -> dict[str, dict]:
    """{case: {setting: {dice, seconds}}} for the fold's validation volumes that take the fused path."""
    lm = load_model("atrium", wdir)
    spec = lm.card["input_spec"]
    views, flips = tuple(spec.get("views", [2])), int(spec.get("tta_flips", 1))
    val = set(lm.card["data"]["val_cases"])
    stride0, margin0 = A.LOCALISE_STRIDE, A.roi_box.__defaults__
    out: dict[str, dict] = {}
    try:
        for c in mio.find_atrium_cases(root):
            if c.case_id not in val:
                continue
            v = mio.load_nifti_path(c.image_path)
            d, sp, _ = A.to_canonical(v.data, v.affine, v.spacing)
            if len(A.resolve_views(views, d.shape, sp)) == 1:
                continue
            truth = A.to_canonical((mio.load_nifti_path(c.label_path).data > 0).astype(np.uint8), v.affine, v.spacing)[0]
            row = {}
            for stride, margin in SETTINGS:
                A.LOCALISE_STRIDE, A.roi_box.__defaults__ = stride, (margin, margin0[1])
                t = time.perf_counter()
                p = A.segment_canonical(lm.model, d, sp, views, lm.grid_mm, lm.threshold, 8,
                                        lambda: autocast(lm.precision), flips=flips)
                row[f"stride {stride}, margin {margin:g} mm"] = {"dice": round(M.dice(p.mask, truth), 4),
                                                                 "seconds": round(time.perf_counter() - t, 2)}
            out[c.case_id] = row
            print(c.case_id, row, flush=True)
    finally:
        A.LOCALISE_STRIDE, A.roi_box.__defaults__ = stride0, margin0
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    names = [f"stride {s}, margin {m:g} mm" for s, m in SETTINGS]
    base = names[0]
    summary = {n: {"dice_mean": round(float(np.mean([r[n]["dice"] for r in per_case.values()])), 4),
                   "dice_change_vs_app_mean": round(float(np.mean([r[n]["dice"] - r[base]["dice"] for r in per_case.values()])), 4),
                   "volumes_better": int(sum(r[n]["dice"] > r[base]["dice"] for r in per_case.values())),
                   "seconds_median": round(float(np.median([r[n]["seconds"] for r in per_case.values()])), 2)}
               for n in names}
    write(args, "fused-path box settings, out of fold: each kept CV model on its own fused (bSSFP) validation volumes",
          base, summary, per_case)


if __name__ == "__main__":
    main()
