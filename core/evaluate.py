"""Evaluate committed weights on every labelled case found under a data root (official layouts).

    python -m core.evaluate --task {pneumonia,cardiac,atrium} --data-root DIR [--weights DIR] [--json OUT]
                            [--only-validation] [--precision {auto,float32,bfloat16}]
    python -m core.evaluate --task atrium --data-root DIR --cv-folds benchmarks/cv-folds/atrium --layout-stress
                            [--acquisition-stress] --json OUT   (the stress checks out of fold, pooled)

Prints (and optionally writes) JSON. A case that cannot be read is named under "failed" and
counted in "n_failed"; it is never skipped silently.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from core import io as mio
from core import metrics as M
from core.checkpoint import _clean
from core.config import data_root
from core.errors import MedImgError
from core.atrium import segment_atrium
from core.cardiac import VOLUMES, cardiac_band, predict_cardiac, structure_voxels, volumes_from_voxels, volumes_ml
from core.inference import load_model
from core.pneumonia import predict_xray_batch
from core.precision import PRECISIONS, flush_subnormals
from core.tasks import TASKS


def _classifier_summary(y: list[int], p: list[float], threshold: float, failed: list[dict]) -> dict:
    out: dict = {"n": len(y), "threshold": threshold}
    if y:
        m = M.classification_metrics(y, p, threshold)
        out.update({k: m[k] for k in M.CLASSIFICATION_METRICS})
        out["confusion"] = {k: m[k] for k in ("tp", "fp", "tn", "fn")}
        out["ci95"] = M.bootstrap_ci(y, p, threshold)
    out["n_failed"] = len(failed)
    out["failed"] = failed
    return out


def evaluate_pneumonia(root: Path, wdir=None, only: set[str] | None = None, precision: str | None = None,
                       batch_size: int = 32) -> dict:
    lm = load_model("pneumonia", wdir, precision=precision)
    cases = [c for c in mio.find_xray_cases(root) if only is None or str(c.path.relative_to(root)) in only]
    ys, ps, failed = [], [], []
    refused_flags: list[bool] = []
    buf: list[tuple[int, np.ndarray]] = []

    def flush() -> None:
        if buf:
            probs, flags = predict_xray_batch(lm, [b[1] for b in buf])
            ys.extend(b[0] for b in buf)
            ps.extend(float(x) for x in probs)
            refused_flags.extend(bool(f) for f in flags)
            buf.clear()

    for c in cases:
        try:
            img = mio.read_image_2d(c.path.read_bytes(), c.path.name)
        except (MedImgError, OSError) as exc:
            failed.append({"case": str(c.path.relative_to(root)), "error": str(exc)})
            continue
        buf.append((c.label, img.pixels))
        if len(buf) >= batch_size:
            flush()
    flush()
    out = _classifier_summary(ys, ps, lm.threshold, failed)
    out["n_refused_by_input_check"] = int(sum(refused_flags))
    out["refused_fraction"] = float(np.mean(refused_flags)) if refused_flags else float("nan")
    acc = [i for i, f in enumerate(refused_flags) if not f]
    if acc and len({ys[i] for i in acc}) == 2:
        m = M.classification_metrics([ys[i] for i in acc], [ps[i] for i in acc], lm.threshold)
        out["on_images_not_withheld"] = {"n": len(acc), **{k: m[k] for k in M.CLASSIFICATION_METRICS}}
    out["inference_precision"] = lm.precision
    return out


def evaluate_cardiac(root: Path, wdir=None, only: set[str] | None = None, precision: str | None = None) -> dict:
    lm = load_model("cardiac", wdir, precision=precision)
    ys, ps, failed, per_case = [], [], [], {}
    for c in mio.find_cardiac_cases(root):
        if only is not None and c.patient_id not in only:
            continue
        try:
            ed_vol = mio.load_nifti_path(c.ed_path)
            ed_shape = ed_vol.data.shape[:2]
            r = predict_cardiac(lm, ed_vol, mio.load_nifti_path(c.es_path), explain=False, guard=False)
            expert = expert_vox = None
            if c.ed_gt is not None and c.es_gt is not None:
                ed_gt, es_gt = mio.load_nifti_path(c.ed_gt).data, mio.load_nifti_path(c.es_gt).data
                expert, expert_vox = M.cardiac_indices(ed_gt, es_gt), structure_voxels(ed_gt, es_gt)
        except (MedImgError, OSError) as exc:
            failed.append({"case": c.patient_id, "error": str(exc)})
            continue
        ys.append(c.label)
        ps.append(r.probability)
        finding, why = cardiac_band(r, lm.diagnosis)
        per_case[c.patient_id] = {"group": c.group, "probability": r.probability,
                                  "five_class": r.diagnosis["probabilities"] if r.diagnosis else None,
                                  "input_check_refused": bool(r.ood_score > lm.guard.threshold),
                                  "finding": finding, "models_disagree": why is not None,
                                  "shape_estimate": r.shape, "shape_expert_masks_all_slices": expert,
                                  "measures": r.measures(),
                                  # both as if the frame's voxels were 1 mm each way: one unit whatever the true
                                  # spacing, which cancels in the relative differences
                                  "volumes_1mm_expert": volumes_from_voxels(expert_vox, 1e-3) if expert_vox else None,
                                  "volumes_1mm_model": (volumes_ml(r.diagnosis["voxels"], ed_shape, (1.0, 1.0, 1.0),
                                                                   lm.input_size) if r.diagnosis else None)}
    out = _classifier_summary(ys, ps, lm.threshold, failed)
    out["n_refused_by_input_check"] = sum(r["input_check_refused"] for r in per_case.values())
    # the finding the page shows (core.cardiac.cardiac_band): a verdict, or "uncertain" near the threshold or when
    # the five-class diagnosis confidently says the opposite
    out["findings"] = {"what": "the page's finding per patient: verdict band of P(disease), uncertain also when the "
                               "five-class diagnosis confidently disagrees",
                       **{b: [k for k, r in per_case.items() if r["finding"] == b]
                          for b in ("positive", "negative", "uncertain")},
                       "models_disagree": [k for k, r in per_case.items() if r["models_disagree"]]}
    with_gt = [r for r in per_case.values() if r["shape_expert_masks_all_slices"] is not None]
    # How the model's estimates (its segmentation of 8 slices per frame) compare with the same ratios
    # from the expert masks over every slice.
    out["shape_agreement"] = {
        k: M.agreement([r["shape_estimate"][k] for r in with_gt], [r["shape_expert_masks_all_slices"][k] for r in with_gt])
        for k in ("lv_ef", "rv_ef", "myo_to_lv_ed", "rv_to_lv_ed")
    }
    # What the page shows (its ejection fractions and ratios: the segmentation of every slice where the five-class
    # model runs) against the expert masks over every slice; and the volumes the page gives in mL, compared in
    # voxels (relative differences hold for any true voxel size).
    shown = [r for r in with_gt if r["measures"] is not None]
    if shown:
        out["measures_source"] = sorted({r["measures"]["source"] for r in shown})
        out["measures_agreement"] = {
            k: M.agreement([r["measures"][k] for r in shown], [r["shape_expert_masks_all_slices"][e] for r in shown])
            for k, e in (("lv_ef", "lv_ef"), ("rv_ef", "rv_ef"), ("myo_lv_ed", "myo_to_lv_ed"), ("rv_lv_ed", "rv_to_lv_ed"))
        }
    vol = [r for r in with_gt if r["volumes_1mm_model"] is not None]
    if vol:
        out["volume_agreement"] = {
            k: M.relative_agreement([r["volumes_1mm_model"][k] for r in vol], [r["volumes_1mm_expert"][k] for r in vol])
            for k in VOLUMES}
    five = [(r["group"], r["five_class"]) for r in per_case.values() if r["five_class"]]
    if five:
        from core.cardiac import GROUPS, summarise as five_summary

        yy = np.array([GROUPS.index(g) for g, _ in five])
        pp_ = np.array([[p[g] for g in GROUPS] for _, p in five])
        out["five_class"] = five_summary(yy, pp_)
        # the flat keys the maintainers read (issue #15), beside the full summary
        out["accuracy_5class"] = out["five_class"]["accuracy"]
        out["confusion_5class"] = out["five_class"]["confusion"]
        out["sensitivity_5class"] = out["five_class"]["sensitivity"]
    out["per_case"] = per_case
    out["inference_precision"] = lm.precision
    return out


def evaluate_atrium(root: Path, wdir=None, only: set[str] | None = None, precision: str | None = None) -> dict:
    lm = load_model("atrium", wdir, precision=precision)
    per_case, failed = {}, []
    for c in mio.find_atrium_cases(root):
        if only is not None and c.case_id not in only:
            continue
        try:
            vol = mio.load_nifti_path(c.image_path)
            gt = mio.read_mask(c.label_path.read_bytes(), vol, c.label_path.name)
            res = segment_atrium(lm, vol)
        except (MedImgError, OSError) as exc:
            failed.append({"case": c.case_id, "error": str(exc)})
            continue
        per_case[c.case_id] = {**M.segmentation_metrics(res.mask, gt, vol.spacing), "dataset": c.dataset,
                               "quality_check_passed": res.reliable,
                               "quality_reasons": list(res.quality.reasons) if res.quality is not None else []}

    from core.atrium import summarise

    confident_bad = [k for k, r in per_case.items() if r["quality_check_passed"] and r["dice"] < 0.5]
    return {
        "n": len(per_case),
        "per_dataset": summarise(per_case) if per_case else {},
        "quality_check_fired": sum(not r["quality_check_passed"] for r in per_case.values()),
        "reported_with_dice_under_0.5": confident_bad,
        "dice_mean": M.mean_finite(per_case, "dice"),
        "dice_per_case": {k: r["dice"] for k, r in per_case.items()},
        "iou_mean": M.mean_finite(per_case, "iou"),
        "hd95_mm_mean": M.mean_finite(per_case, "hd95_mm"),
        "volume_error_pct_mean": M.mean_finite(per_case, "volume_error_pct"),
        "dice_ci95": M.mean_ci([r["dice"] for r in per_case.values()]),
        "per_case": per_case,
        "threshold": lm.threshold,
        "inference_precision": lm.precision,
        "n_failed": len(failed),
        "failed": failed,
    }


EVALUATORS = {"pneumonia": evaluate_pneumonia, "cardiac": evaluate_cardiac, "atrium": evaluate_atrium}


def evaluate(task: str, root, wdir=None, only_validation: bool = False, precision: str | None = None,
             split: str | None = None, data_label: str | None = None) -> dict:
    """Evaluate one task's weights on every labelled case under ``root``; JSON-safe dict.

    ``only_validation`` keeps the cases the weights' card lists as held out from their training;
    ``split`` keeps the X-rays of one official split folder (train, val or test);
    ``precision`` is the inference precision (core.precision; default: what the app uses). The result
    records the sha256 of the weights scored (the app shows an evaluation only beside those weights),
    when it ran and, in ``data_label``, what data it ran on.
    """
    from datetime import datetime, timezone

    from core.checkpoint import read_card

    card = read_card(task, wdir)
    only = None
    if only_validation:
        only = set(card["data"]["val_cases"])
        if not only:
            raise MedImgError(f"the {task} weights were trained on every case, so none is held out from them; their "
                              "figures are the cross-validation's (see the Training & metrics page)")
    if split is not None:
        if task != "pneumonia":
            raise MedImgError("--split applies to the chest X-ray folders (train, val, test) only")
        only_split = {str(c.path.relative_to(root)) for c in mio.find_xray_cases(Path(root)) if c.split == split}
        only = only_split if only is None else only & only_split
    res = EVALUATORS[task](Path(root), wdir, only, precision)
    res = {"task": task, "data_root": str(root), "data_label": data_label or str(root),
           **({"split": split} if split else {}),
           **({"cases": "validation cases of the card"} if only_validation else {}),
           "weights_sha256": card.get("weights_sha256"),
           "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds"), **res}
    return _clean(res)


def stress_out_of_fold(folds_dir, root, layout: bool = True, acquisition: bool = False, cv_dir=None) -> dict:
    """The atrium stress checks (``core.atrium.layout_stress`` / ``acquisition_stress``) of every volume out of
    fold: each kept cross-validation model (``<folds_dir>/fold<K>``, weights + card with its own threshold, flips
    and quality limits) on its own validation volumes, pooled. Each model must be the one the atrium.cv.json
    in ``cv_dir`` (default: the committed weights folder) recorded for its fold (sha256 and split), and every fold
    of that file must be there. JSON-safe dict with ``cv_folds`` (fold -> weights sha256) instead of one
    ``weights_sha256``."""
    from datetime import datetime, timezone

    from core.atrium import (acquisition_stress, check_fold_model, kept_fold_dirs, layout_stress, read_cv,
                             stress_summary)

    cv = read_cv(cv_dir)
    if not cv:
        raise MedImgError(f"no atrium cross-validation record (atrium.cv.json in {cv_dir or 'weights/'}) to check "
                          "the fold models against")
    recorded = {int(f["fold"]): f for f in cv["folds"]}
    dirs = kept_fold_dirs(folds_dir)
    if sorted(dirs) != sorted(recorded):
        raise MedImgError(f"{folds_dir} holds folds {sorted(dirs)}; atrium.cv.json records folds {sorted(recorded)}")
    all_cases = mio.find_atrium_cases(Path(root))
    checks = {"layout_stress": layout_stress} if layout else {}
    if acquisition:
        checks["acquisition_stress"] = acquisition_stress
    per_case: dict[str, dict] = {k: {} for k in checks}
    used, shas, precisions, refiners = [], {}, {}, {}
    for k, d in sorted(dirs.items()):
        lm = load_model("atrium", d)
        precisions[str(k)] = lm.precision
        check_fold_model(lm.card, recorded[k], d)
        val = set(recorded[k]["val_cases"])
        cases = [c for c in all_cases if c.case_id in val]
        for key, fn in checks.items():
            for variant, rows in fn(lambda v: segment_atrium(lm, v), cases)["per_case"].items():
                per_case[key].setdefault(variant, {}).update(rows)
        used += cases
        shas[str(k)] = lm.card["weights_sha256"]
        refiners[str(k)] = lm.refiner.card.get("weights_sha256") if lm.refiner is not None else None
    out = {"task": "atrium", "data_root": str(root), "cases": "every volume, out of fold (each by the fold model "
           "that did not train on it, at that fold's threshold, flips and quality limits)", "n": len(used),
           "cv_folds": shas, "cv_refiners": refiners, "inference_precision": precisions,
           "evaluated": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    for key in checks:
        out[key] = {"summary": stress_summary(per_case[key], used), "per_case": per_case[key]}
    return _clean(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=list(TASKS))
    ap.add_argument("--data-root", default=None, help="dataset root (else $MEDIMG_DATA_ROOT, else ./data)")
    ap.add_argument("--weights", default=None, help="weights folder (default weights/)")
    ap.add_argument("--json", default=None, help="also write the JSON here")
    ap.add_argument("--only-validation", action="store_true",
                    help="only the cases the weights' card lists as validation (held out from training)")
    ap.add_argument("--split", default=None, choices=["train", "val", "test"],
                    help="pneumonia: only the images of this official split folder")
    ap.add_argument("--label", default=None,
                    help="what the data is, in words (shown with the figures), e.g. 'Kermany official test split'")
    ap.add_argument("--layout-stress", action="store_true",
                    help="atrium: also score each case with its voxels transposed and the affine left as it was")
    ap.add_argument("--acquisition-stress", action="store_true",
                    help="atrium: also score each case after strong noise, gamma, bias field, inverted contrast "
                         "and blur (core.atrium.ACQUISITION_SHIFTS)")
    ap.add_argument("--cv-folds", default=None, metavar="DIR",
                    help="atrium, with --layout-stress/--acquisition-stress: run the checks out of fold instead, each "
                         "kept cross-validation model in DIR/fold<K> on its own validation volumes, pooled; the "
                         "models must be those of the atrium.cv.json in --weights")
    ap.add_argument("--precision", default=None, choices=PRECISIONS,
                    help="inference precision (default: $MEDIMG_PRECISION, else auto = what the app uses)")
    args = ap.parse_args(argv)
    flush_subnormals()  # before the first torch operation (see there)
    if args.cv_folds:
        if args.task != "atrium" or not (args.layout_stress or args.acquisition_stress):
            print("error: --cv-folds is for --task atrium with --layout-stress and/or --acquisition-stress",
                  file=sys.stderr)
            return 2
        try:
            res = stress_out_of_fold(args.cv_folds, data_root(args.data_root), args.layout_stress,
                                     args.acquisition_stress, cv_dir=args.weights)
        except MedImgError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return _emit(res, args.json)
    try:
        res = evaluate(args.task, data_root(args.data_root), args.weights, args.only_validation, args.precision,
                       args.split, args.label)
    except MedImgError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if (args.layout_stress or args.acquisition_stress) and args.task == "atrium":
        from core.atrium import acquisition_stress, layout_stress

        lm = load_model("atrium", args.weights, precision=args.precision)
        keep = set(res.get("per_case", {}))
        cases = [c for c in mio.find_atrium_cases(data_root(args.data_root)) if c.case_id in keep]
        if args.layout_stress:
            res["layout_stress"] = _clean(layout_stress(lambda v: segment_atrium(lm, v), cases))
        if args.acquisition_stress:
            res["acquisition_stress"] = _clean(acquisition_stress(lambda v: segment_atrium(lm, v), cases))
    return _emit(res, args.json)


def _emit(res: dict, json_path: str | None) -> int:
    text = json.dumps(res, indent=1)
    print(text)
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
