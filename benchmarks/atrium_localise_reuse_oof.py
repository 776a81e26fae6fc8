"""Out-of-fold check: should the fused path's localisation pass count as a fourth view? The app localises by
segmenting every 2nd slice of the first view over the whole volume (``core.atrium.localise``), keeps only the box
it finds, and then runs the first view again inside that box. Those localising probabilities are another reading
of the same slices at another crop alignment (the U-Net is not shift-invariant below 2**depth pixels), at no
extra cost. Variants: the app's three box views; the first view averaged with the localising pass on the slices
it covered (every 2nd); the localising pass added to the fusion as a fourth view on those slices; the
localising pass in place of the first view's box pass on its slices (which would save half of that pass); that,
with the first view's probabilities then blended 1/4, 1/2, 1/4 across neighbouring slices, so that every slice mixes
the two readings half and half (alternating readings make the mask's area step from slice to slice: ``roughness``,
the mean absolute second difference of the per-slice mask area along the first view, over the mean area).

Each kept cross-validation model segments its own validation volumes that take the fused path, at the fold's
threshold, cut to the largest component, as the app does. Dice, HD95 and volume error per variant. An
experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_localise_reuse_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-localise-reuse-oof.json
"""
from __future__ import annotations

import numpy as np

from core import atrium as A
from core import preprocess as pp

from _oof import collect, compare, fused_fold_volumes, mask_scores, roughness, write

VARIANTS = ("three box views (the app)", "first view averaged with the localising pass",
            "localising pass as a fourth view", "first view: the localising pass where it ran, the box pass elsewhere",
            "as the last, then the first view blended 1/4, 1/2, 1/4 across its slices")


def run_fold(wdir: str, root) -> dict[str, dict]:
    """{case: {variant: {dice, hd95, volume_error_pct, seconds}}} for the fold's fused-path validation volumes."""
    out: dict[str, dict] = {}
    s = A.LOCALISE_STRIDE
    for lm, v, views, ctx in fused_fold_volumes(wdir, root):
        norm = pp.normalise_volume(np.asarray(v.data))
        loc = A.segment_view(lm.model, norm, v.spacing, views[0], lm.grid_mm, 8, ctx, normalised=True, stride=s)
        box = A.localise(lm.model, norm, v.spacing, views[0], lm.grid_mm, lm.threshold, 8, ctx)
        assert box is not None, f"{v.case_id}: localisation found nothing (the app would take its fallback)"
        sub = np.ascontiguousarray(norm[box])
        ps = [A.segment_view(lm.model, sub, v.spacing, ax, lm.grid_mm, 8, ctx, normalised=True) for ax in views]
        lb = loc[box]
        covered = np.zeros(lb.shape, bool)
        idx = [slice(None)] * 3
        first = box[views[0]].start
        idx[views[0]] = slice((-first) % s, None, s)  # the box's slices that the localising pass segmented
        covered[tuple(idx)] = True
        three = np.mean(ps, axis=0)
        avg_first = np.where(covered, (ps[0] + lb) / 2, ps[0])
        fused = {VARIANTS[0]: three,
                 VARIANTS[1]: (avg_first + sum(ps[1:])) / len(views),
                 VARIANTS[2]: np.where(covered, (sum(ps) + lb) / (len(views) + 1), three),
                 VARIANTS[3]: (np.where(covered, lb, ps[0]) + sum(ps[1:])) / len(views),
                 VARIANTS[4]: (A.blend_slices(np.where(covered, lb, ps[0]), views[0]) + sum(ps[1:])) / len(views)}
        row: dict = {"dataset": v.dataset, "fold_threshold": lm.threshold, "box": [[b.start, b.stop] for b in box],
                     "expert_mask_roughness": round(roughness(v.label.astype(bool), views[0]), 4)}
        for name, prob in fused.items():
            mask = np.zeros(norm.shape, np.uint8)
            mask[box] = pp.largest_component(prob >= lm.threshold)
            row[name] = {**mask_scores(mask, v.label, v.spacing), "roughness": round(roughness(mask, views[0]), 4),
                         "seconds": 0.0}
        out[v.case_id] = row
        print(v.case_id, {k: (r["dice"], r["hd95"]) for k, r in row.items() if k in VARIANTS}, flush=True)
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    names = list(VARIANTS)
    summary = compare(per_case, names, names[0], {"hd95": 3, "volume_error_pct": 2, "roughness": 4})
    summary["expert masks"] = {"roughness_mean": round(float(np.mean(
        [r["expert_mask_roughness"] for r in per_case.values()])), 4)}
    write(args, "fused path: the localising pass reused as a view, out of fold: each kept CV model on its own fused "
          "(bSSFP) validation volumes, at the fold's threshold", names[0], summary, per_case)


if __name__ == "__main__":
    main()
