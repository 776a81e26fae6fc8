"""Where the out-of-fold atrium masks go wrong: how much of the wrong volume lies at the expert mask's surface
(within 2 mm: contour precision) and how much further away (gross errors: a vein, the appendage or the valve plane
taken or missed), and where along each axis of the volume the gross errors lie (thirds of the expert mask's extent).
Also the Dice each volume would have without its gross errors, i.e. what better contours alone could reach.

Each kept cross-validation model segments its own validation volumes (fused and single-view paths alike) as the app
does (views, flips and threshold from the fold's card; bfloat16, the fold models have no int8 ranges). The axes are
the canonical (RAS by the header) axes: the MSD headers call their sagittal slices axial, so for MSD "axis 2" is
not the body's superior-inferior axis. An analysis, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_error_anatomy_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-error-anatomy-oof.json
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage

from _oof import app_predictions, collect, write

GROSS_MM = 2.0  # wrong voxels further than this from the expert surface count as gross errors


def thirds(m: np.ndarray, truth: np.ndarray, axis: int, voxel_ml: float) -> list[float]:
    """mL of ``m`` in the lower, middle and upper third of the expert mask's extent along ``axis`` (voxels beyond
    the extent count in the nearest third)."""
    others = tuple(i for i in range(3) if i != axis)
    idx = np.where(truth.any(axis=others))[0]
    lo, hi = int(idx.min()), int(idx.max())
    pos = (np.where(m)[axis] - lo) / max(hi - lo, 1)
    parts = (pos < 1 / 3, (pos >= 1 / 3) & (pos < 2 / 3), pos >= 2 / 3)
    return [round(float(p.sum()) * voxel_ml, 2) for p in parts]


def anatomy(mask: np.ndarray, truth: np.ndarray, spacing) -> dict:
    """Boundary and gross false positives / negatives (mL), gross ones by thirds along each axis, Dice with and
    without the gross errors."""
    pred, gt = mask.astype(bool), truth.astype(bool)
    voxel_ml = float(np.prod(spacing)) / 1000
    fp, fn = pred & ~gt, gt & ~pred
    gross_fp = fp & (ndimage.distance_transform_edt(~gt, sampling=spacing) > GROSS_MM)
    gross_fn = fn & (ndimage.distance_transform_edt(gt, sampling=spacing) > GROSS_MM)
    tp = float((pred & gt).sum())
    ml = lambda m: round(float(m.sum()) * voxel_ml, 2)  # noqa: E731
    return {
        "dice": round(2 * tp / max(float(pred.sum() + gt.sum()), 1), 4),
        "dice_without_gross_errors": round(2 * tp / max(2 * tp + float((fp & ~gross_fp).sum() + (fn & ~gross_fn).sum()), 1), 4),
        "truth_ml": ml(gt), "fp_ml": ml(fp), "fn_ml": ml(fn), "gross_fp_ml": ml(gross_fp), "gross_fn_ml": ml(gross_fn),
        **{f"gross_fp_ml_thirds_axis{a}": thirds(gross_fp, gt, a, voxel_ml) for a in range(3)},
        **{f"gross_fn_ml_thirds_axis{a}": thirds(gross_fn, gt, a, voxel_ml) for a in range(3)},
    }


def run_fold(wdir: str, root) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for _, v, fused, pred in app_predictions(wdir, root):
        out[v.case_id] = {"dataset": v.dataset, "fused": fused,
                          "fold": wdir.rstrip("/").rsplit("/", 1)[-1], **anatomy(pred.mask, v.label, v.spacing)}
        print(v.case_id, out[v.case_id]["dice"], out[v.case_id]["dice_without_gross_errors"], flush=True)
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    summary = {}
    for ds in sorted({r["dataset"] for r in per_case.values()}):
        rows = [r for r in per_case.values() if r["dataset"] == ds]
        tot = {k: round(float(sum(r[k] for r in rows)), 1) for k in ("fp_ml", "fn_ml", "gross_fp_ml", "gross_fn_ml")}
        summary[ds] = {
            "volumes": len(rows), "dice_mean": round(float(np.mean([r["dice"] for r in rows])), 4),
            "dice_without_gross_errors_mean": round(float(np.mean([r["dice_without_gross_errors"] for r in rows])), 4),
            **{f"{k}_total": v for k, v in tot.items()},
            "gross_share_of_wrong_volume": round((tot["gross_fp_ml"] + tot["gross_fn_ml"])
                                                 / max(tot["fp_ml"] + tot["fn_ml"], 1e-9), 3),
            **{f"{k}_thirds_axis{a}_total": [round(float(x), 1) for x in np.sum([r[f"{k}_thirds_axis{a}"] for r in rows], 0)]
               for k in ("gross_fp_ml", "gross_fn_ml") for a in range(3)},
        }
    write(args, f"atrium error anatomy, out of fold: each kept CV model on its own validation volumes (both paths, "
          f"bfloat16, the fold's localiser); wrong voxels within {GROSS_MM} mm of the expert surface (boundary) or "
          "beyond (gross), gross ones by thirds of the expert mask's extent along each canonical axis; per dataset",
          "the app's path", summary, per_case)


if __name__ == "__main__":
    main()
