"""Validation figures as Markdown, generated from the weights cards (never typed by hand).

    python -m core.report            # print the table
    python -m core.report --write README.md   # refresh the block between the figure markers
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from core.checkpoint import read_card
from core.errors import MissingWeightsError
from core.tasks import TASKS

START, END = "<!-- figures:start -->", "<!-- figures:end -->"


def _ci(v: dict, key: str) -> str:
    lo, hi = (v.get("ci95") or {}).get(key, [None, None])
    x = v.get(key)
    if x is None:
        return "n/a"
    return f"{x:.3f} ({lo:.3f}-{hi:.3f})" if lo is not None and hi is not None else f"{x:.3f}"


def shown_threshold(card: dict, wdir=None) -> tuple[float, bool]:
    """(the decision threshold as the module page shows it, whether that is on a calibrated scale): for
    pneumonia with a calibration fitted on these very weights the page shows calibrated probabilities, so its
    threshold is the card's mapped through the same (monotone) map; otherwise the card's own."""
    if card.get("task") == "pneumonia":
        from core.calibration import apply_platt
        from core.pneumonia import with_calibration  # torch: only here, so the Home page stays light

        cal = with_calibration(card, wdir).get("calibration")
        if cal:
            return float(apply_platt(card["threshold"], cal[0], cal[1])), True
    return float(card["threshold"]), False


def threshold_text(card: dict, wdir=None) -> str:
    """The threshold column: as the page shows it, with the model's raw value beside a calibrated one."""
    shown, calibrated = shown_threshold(card, wdir)
    return f"{shown:.1%} (calibrated; {card['threshold']:.3f} raw)" if calibrated else f"{shown:.1%}"


def classifier_rows(card: dict, wdir=None) -> list[str]:
    v = card["validation"]
    d = card["data"]
    thr = threshold_text(card, wdir)
    rows = [f"| {card['title']} | {d['split']} | {v['n']} | {_ci(v, 'accuracy')} | {_ci(v, 'sensitivity')} | "
            f"{_ci(v, 'specificity')} | {_ci(v, 'auc')} | {thr} |"]
    sv = card.get("shift_validation")
    if sv and "pooled_perturbed" in sv:
        p = sv["pooled_perturbed"]
        rows.append(f"| {card['title']}: shift-aware (selected on) | the same validation images under 11 fixed acquisition "
                    f"perturbations, pooled; worst perturbation accuracy {sv['worst']['accuracy']:.3f}, specificity "
                    f"{sv['worst']['specificity']:.3f} | {v['n']} x 11 | {_ci(p, 'accuracy')} | {_ci(p, 'sensitivity')} | "
                    f"{_ci(p, 'specificity')} | {_ci(p, 'auc')} | {thr} |")
    cv = card.get("cross_validation")
    if cv:
        o = cv["pooled_out_of_fold"]
        folds = cv["folds"]
        aucs = [f["val_auc"] for f in folds if f.get("val_auc") is not None]
        rows.append(
            f"| {card['title']}: {len(folds)}-fold CV, pooled out-of-fold | per-fold AUC "
            f"{', '.join(f'{a:.2f}' for a in aucs)} (mean {sum(aucs) / len(aucs):.3f}) | {o['n']} | "
            f"{_ci(o, 'accuracy')} | {_ci(o, 'sensitivity')} | {_ci(o, 'specificity')} | {_ci(o, 'auc')} | "
            f"{thr} |")
    return rows


def markdown(wdir=None) -> str:
    lines = [
        "Validation figures (patient-level splits of the shared training data; 95 % bootstrap CIs). "
        "Not test-set figures: the pneumonia model was selected on its shift-aware row; expect new hospitals "
        "to score lower than either row.",
        "",
        "| model | split | n | accuracy | sensitivity | specificity | ROC AUC | threshold |",
        "|---|---|---|---|---|---|---|---|",
    ]
    seg = []
    meta = []
    for name, spec in TASKS.items():
        try:
            card = read_card(name, wdir)
        except MissingWeightsError:
            lines.append(f"| {spec.title} | not trained | | | | | | |")
            continue
        kept = (f"kept epoch {card['best_epoch']} of {card['epochs_run']}: {card['kept_epoch_rule']}"
                if card.get("kept_epoch_rule") else f"best epoch {card['best_epoch']} of {card['epochs_run']}")
        meta.append(f"- {spec.title}: trained {card['train_time_s']:.0f} s on {card['device']}, {kept}, weights "
                    f"{card['weights_bytes'] / 1e6:.1f} MB, torch {card['torch_version']}.")
        if spec.kind == "binary":
            lines.extend(classifier_rows(card, wdir))
        else:
            seg += atrium_rows(card, wdir)
    if seg:
        lines += ["", "| model | split | volumes | 3D Dice (95 % CI of mean) | IoU | HD95 (mm) | volume error (%) | "
                      "Dice per case |", "|---|---|---|---|---|---|---|---|", *seg]
    lines += stress_markdown(wdir)
    lines += ["", *meta]
    lines += run_markdown(wdir)
    lines += shape_markdown(wdir)
    lines += diagnosis_markdown(wdir)
    lines += perf_markdown()
    return "\n".join(lines)


BENCH_FILE = "benchmarks/cpu-2core.json"
LAYOUT_FILE = "benchmarks/logs/atrium-layout-stress-validation.json"
LAYOUT_OOF_FILE = "benchmarks/logs/atrium-layout-stress-oof.json"  # `--cv-folds`: every volume, out of fold
ACQUISITION_FILE = "benchmarks/logs/atrium-acquisition-stress-validation.json"
ACQUISITION_OOF_FILE = "benchmarks/logs/atrium-acquisition-stress-oof.json"  # `--cv-folds`: every volume, out of fold


def atrium_rows(card: dict, wdir=None) -> list[str]:
    """README rows of the atrium model: its validation volumes per dataset (a fold-1 model) or none (the
    model trained on every volume), the cross-validation per dataset, the inference setting and the
    quality check's firing."""
    v, seg = card["validation"], []
    for ds, r in v.get("per_dataset", {}).items() if not v.get("cross_validated") else ():
        if ds == "all":
            continue
        lo2, hi2 = r["dice_ci95"]
        seg.append(f"| {card['title']}: {DATASET_NAMES.get(ds, ds)} | {card['data']['split']} | {r['n']} | "
                   f"{r['dice_mean']:.3f} ({lo2:.3f}-{hi2:.3f}) | - | {r['hd95_mm_mean']:.2f} | "
                   f"{r['volume_error_pct_mean']:+.1f} (mean absolute {r['abs_volume_error_pct_mean']:.1f}) | "
                   f"lowest {r['dice_min']:.3f} |")
    cv = atrium_cross_validation(card, wdir)
    if cv:
        done = ", ".join(str(k) for k in cv["folds"])
        whose = ("the committed model is this recipe trained on all of them" if v.get("cross_validated")
                 else "fold 1 = the committed model")
        for ds, r in cv["per_dataset"].items():
            lo2, hi2 = r["dice_ci95"]
            seg.append(f"| {card['title']}: {DATASET_NAMES.get(ds, ds)}, cross-validation | folds {done} of "
                       f"{cv['n_folds_planned']} (each volume scored by a model that did not train on it; {whose}) | "
                       f"{r['n']} | {r['dice_mean']:.3f} ({lo2:.3f}-{hi2:.3f}) | - | {r['hd95_mm_mean']:.2f} | "
                       f"mean absolute {r['abs_volume_error_pct_mean']:.1f} | lowest {r['dice_min']:.3f}; quality "
                       f"check fired on {len(r['fired'])}; reported with Dice < 0.5: {len(r['reported_below_0_5'])} |")
    where = ("the cross-validation folds' choice (most folds' flips, median threshold)" if v.get("cross_validated")
             else "chosen on these validation volumes (figures above slightly optimistic)")
    seg.append(f"| inference setting | {where} | {v['n']} | - | - | - | - | {v.get('tta_flips', 1)} in-plane flip(s) "
               f"averaged, threshold {v.get('threshold', 0.5):g} |")
    qc = card.get("quality_check", {})
    if qc:
        on = ("out-of-fold volumes (each fold's own limits)" if v.get("cross_validated") else "validation volumes")
        seg.append(f"| quality check | fired on {on} | {v['n']} | - | - | - | - | "
                   f"{qc['validation_firing_rate']:.0%} ({', '.join(qc['validation_fired']) or 'none'}) |")
        for kind, r in qc.get("foreign_inputs", {}).items():
            seg.append(f"| quality check | fired on {kind} (not left-atrium MRI) | {r['n']} | - | - | - | - "
                       f"| {r['fired']} of {r['n']} |")
    return seg


# The atrium stress checks written by `python -m core.evaluate --task atrium [--only-validation | --cv-folds DIR]
# --layout-stress | --acquisition-stress --json FILE`: JSON key -> (files, most preferred first: the first that is of
# the current weights or of their cross-validation is shown; what was done to the volumes; the variant column)
STRESS_CHECKS = {
    "layout_stress": ((LAYOUT_OOF_FILE, LAYOUT_FILE), "Atrium layout check, voxels transposed and the header left as "
                      "it was", "layout"),
    "acquisition_stress": ((ACQUISITION_OOF_FILE, ACQUISITION_FILE), "Atrium acquisition check, each volume changed as a poor scan or "
                           "another scanner might change it (far beyond the training augmentation)", "change"),
}
OUT_OF_FOLD = ("every volume of both datasets out of fold (each by the cross-validation fold model that did not train "
               "on it, at that fold's threshold, flips and quality limits; the committed model is the same recipe "
               "trained on all of them)")


def stress_checks(wdir=None) -> list[dict]:
    """The atrium stress checks (STRESS_CHECKS) whose file is of the current weights or of one of the
    cross-validation folds (the same recipe): per check, title, file, column (name of the variant column),
    whose (which model and volumes, in words) and rows (variant, dataset, n, dice_mean, reported,
    reported_with_dice_under_0.5, reported_dice_min)."""
    import json

    from core.atrium import read_cv
    from core.checkpoint import read_card
    from core.config import PROJECT_ROOT

    try:
        card = read_card("atrium", wdir)
    except (OSError, ValueError, MissingWeightsError):
        return []
    cv_folds = (read_cv(wdir) or {}).get("folds", [])
    folds = {f.get("weights_sha256"): f["fold"] for f in cv_folds}
    fold_shas = {str(f["fold"]): f.get("weights_sha256") for f in cv_folds}
    fold_refiners = {str(f["fold"]): f.get("refiner_sha256") for f in cv_folds}
    out = []
    for key, (files, title, column) in STRESS_CHECKS.items():
        for file in files:
            try:
                res = json.loads((PROJECT_ROOT / file).read_text())
            except (OSError, ValueError):
                continue
            if key not in res:
                continue
            if res.get("cv_folds"):  # pooled out of fold: every fold model of the current CV, and only those
                if res["cv_folds"] != fold_shas:
                    continue
                whose = OUT_OF_FOLD
                if res.get("cv_refiners", {k: None for k in fold_refiners}) != fold_refiners:
                    whose += (" — **measured on the path before the 3D refiner** the folds and the app now run, "
                              "not rerun since")
            elif not res.get("weights_sha256"):
                continue
            elif res["weights_sha256"] == card.get("weights_sha256"):
                whose = "the validation volumes"
            elif res["weights_sha256"] in folds:  # measured before the committed model was trained on every volume
                whose = (f"the validation volumes of the cross-validation fold-{folds[res['weights_sha256']]} model, "
                         "the same recipe (the committed model trained on every volume, so none is left to check it on)")
            else:
                continue
            rows = [{"variant": name, "dataset": DATASET_NAMES.get(ds, ds), **d}
                    for name, r in res[key]["summary"].items() for ds, d in r.get("per_dataset", {}).items()]
            out.append({"title": title, "file": file, "column": column, "whose": whose, "rows": rows})
            break
    return out


def stress_markdown(wdir=None) -> list[str]:
    """README tables of the atrium stress checks (``stress_checks``)."""
    lines: list[str] = []
    for c in stress_checks(wdir):
        rows = []
        for d in c["rows"]:
            low = d.get("reported_dice_min")
            rows.append(f"| {d['variant']} | {d['dataset']} | {d['n']} | {d['dice_mean']:.3f} | {d['reported']} | "
                        f"{d['reported_with_dice_under_0.5']} | {'-' if low is None else f'{low:.3f}'} |")
        lines += ["", f"{c['title']} (`{c['file']}`), on {c['whose']}:", "",
                  f"| {c['column']} | dataset | volumes | 3D Dice | volume reported | reported with Dice < 0.5 | "
                  "lowest Dice reported |", "|---|---|---|---|---|---|---|", *rows]
    return lines


DATASET_NAMES = {"Task02_Heart": "bSSFP, MSD Task02_Heart", "LA2018": "LGE-MRI, 2018 LA challenge"}
SHAPE_NAMES = {"lv_ef": "LV ejection fraction", "rv_ef": "RV ejection fraction",
               "myo_to_lv_ed": "myocardium / LV cavity at ED", "rv_to_lv_ed": "RV / LV cavity at ED"}


def read_validation_eval(task: str, wdir=None) -> dict | None:
    """What `python -m core.evaluate --task T --only-validation --json weights/T.validation-eval.json` wrote."""
    from core.config import weights_dir

    path = weights_dir(wdir) / f"{task}.validation-eval.json"
    return json.loads(path.read_text()) if path.is_file() else None


def atrium_cross_validation(card: dict, wdir=None) -> dict | None:
    """Every atrium volume validated so far by a model that did not train on it: the folds in
    atrium.cv.json (``python train_all.py --atrium-cv [--folds K]``), and fold 1 from the card when the card
    is of a fold-1 model (before the committed model was trained on every volume), pooled overall and per
    dataset (``core.atrium.pool_folds``) with the quality check's firing on them (each fold's own limits);
    None when that file is absent. Keys: n, n_folds (folds pooled), n_folds_planned, folds, dice_mean,
    dice_ci95, per_dataset, fired, per_case."""
    from core.atrium import fold_record_from_card, pool_folds, read_cv

    cv = read_cv(wdir)
    if not cv or not cv.get("folds"):
        return None
    folds = list(cv["folds"])
    if 1 not in {f["fold"] for f in folds} and card.get("data", {}).get("val_cases"):
        folds.append(fold_record_from_card(card))
    pool = pool_folds(folds)
    return {"n": pool["n"], "n_folds": len(folds), "folds": pool["folds"],
            "n_folds_planned": cv.get("n_folds_planned", len(folds)), "dice_mean": pool["dice_mean"],
            "dice_ci95": pool["dice_ci95"], "per_dataset": pool["per_dataset"], "fired": pool["fired"],
            "per_case": pool["per_case"]}


EVALUATIONS_DIR = "evaluations"


def external_evaluations(task: str, card: dict, wdir=None) -> list[dict]:
    """Evaluation JSONs that ``python -m core.evaluate --json`` wrote and someone placed in
    ``weights/evaluations/``, for this task: each with ``matches`` (its weights' sha256 equals the card's,
    so its figures belong to the weights in use) and its file name."""
    from core.config import weights_dir

    folder = weights_dir(wdir) / EVALUATIONS_DIR
    out = []
    for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            ev = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if not isinstance(ev, dict) or ev.get("task") != task:
            continue
        out.append({**ev, "file": path.name,
                    "matches": bool(ev.get("weights_sha256")) and ev.get("weights_sha256") == card.get("weights_sha256")})
    return out


def shift_line(card: dict) -> str | None:
    """Pneumonia: one line with the plain and the shift-aware validation figures."""
    sv = card.get("shift_validation")
    if not sv or "pooled_perturbed" not in sv:
        return None
    v, p, w = card["validation"], sv["pooled_perturbed"], sv["worst"]
    return (f"validation AUC {v['auc']:.3f}, accuracy {v['accuracy']:.3f}; under 11 acquisition perturbations "
            f"(shift-aware, selected on): AUC {p['auc']:.3f}, accuracy {p['accuracy']:.3f}, specificity "
            f"{p['specificity']:.3f} (worst perturbation: accuracy {w['accuracy']:.3f}, specificity {w['specificity']:.3f})")


def run_markdown(wdir=None) -> list[str]:
    """How long the run of `python train_all.py` that wrote these weights took (weights/train_all.run.json)."""
    from core.config import weights_dir

    path = weights_dir(wdir) / "train_all.run.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())
    if r.get("smoke"):
        return []
    parts = ", ".join(f"{t} {s / 60:.1f} min" for t, s in r["seconds_per_task"].items())
    return ["", f"`{r['command']}` took **{r['total_s'] / 60:.1f} min** for {len(r['tasks'])} task(s) "
                f"on {r['machine']}{', ' + r['cpu'] if r.get('cpu') else ''} ({r['cpu_count']} cores, {r['threads']} threads, device {r['device']}, "
                f"torch {r['torch']}): {parts}, each with reading its data, its validation or scoring and fitting "
                "its input or quality check (weights/train_all.run.json)." + _shortened_note(r)]


def schedule_note(card: dict) -> str:
    """The phrase " (the 64-epoch schedule cut to 61 by the time budget on the training machine)" when
    train_all's time budget shortened the schedule of the model a card describes; "" otherwise."""
    t = card.get("training", {})
    s = t.get("schedule") or {}
    if not s.get("shortened_at_epoch"):
        return ""
    return (f" (the {t.get('epochs', '?')}-epoch schedule cut to {s['epochs_planned']} by the time budget on "
            "the training machine)")


def _shortened_note(run: dict) -> str:
    """Which schedules the time budget shortened in a run record, in words ("" if none)."""
    cut = [f"{t} {s['epochs_planned']} epochs" + (" per fold" if t == "cardiac" else "")
           for t, s in run.get("schedules", {}).items() if s.get("shortened_at_epoch")]
    if not cut:
        return ""
    return (" On this machine the time budget shortened the schedule: " + ", ".join(cut)
            + " (the registry's full schedule with `--no-time-budget`).")


def shape_markdown(wdir=None) -> list[str]:
    """How the cardiac model's shape estimates agree with the expert masks on its validation patients."""
    ev = read_validation_eval("cardiac", wdir)
    if not ev or "shape_agreement" not in ev:
        return []
    agree, source = shown_measures_agreement(ev)
    rows = ["", f"Cardiac estimates as the page shows them (from the model's segmentation of {source}) against the same "
                f"ratios from the expert masks over every slice, on the committed model's {ev['n']} validation patients "
                "(weights/cardiac.validation-eval.json):", "",
            "| quantity | mean absolute difference | mean difference | Pearson r |", "|---|---|---|---|"]
    for k, a in agree.items():
        rows.append(f"| {SHAPE_NAMES.get(k, k)} | {a['mae']:.3f} | {a['bias']:+.3f} | {a['pearson_r']:.2f} |")
    if ev.get("volume_agreement"):
        from core.cardiac import VOLUMES

        rows += ["", "Cardiac volumes (mL, and the LV mass in g, shown only when the file's voxel size is that of a cine "
                     "stack: never for the shared ACDC copy) against the expert masks' on the same patients, in voxels "
                     "(the voxel size cancels; the model's segmentation of every slice):", "",
                 "| quantity | mean absolute difference | mean difference | Pearson r |", "|---|---|---|---|"]
        for k, a in ev["volume_agreement"].items():
            rows.append(f"| {VOLUMES[k]} | {a['mean_abs_pct']:.1f} % | {a['mean_pct']:+.1f} % | {a['pearson_r']:.2f} |")
    return rows


def shown_measures_agreement(ev: dict) -> tuple[dict, str]:
    """The agreement of what the cardiac page shows (``measures_agreement``, keyed as SHAPE_NAMES) and where it
    comes from, in words; an evaluation file written before it gives the 8-slice estimates' (``shape_agreement``)."""
    if "measures_agreement" in ev:
        keys = {"myo_lv_ed": "myo_to_lv_ed", "rv_lv_ed": "rv_to_lv_ed"}
        src = " and ".join(ev.get("measures_source", ["every slice"]))
        return {keys.get(k, k): a for k, a in ev["measures_agreement"].items()}, f"{src} of each frame"
    return ev["shape_agreement"], "8 slices per frame"


def perf_markdown() -> list[str]:
    """The performance table, from the file `python -m core.bench --json benchmarks/cpu-2core.json` wrote."""
    from core.config import PROJECT_ROOT

    path = PROJECT_ROOT / BENCH_FILE
    if not path.is_file():
        return []
    b = json.loads(path.read_text())
    cpu = f"{b['machine']}" + (f", {b['cpu']}" if b.get("cpu") else "")
    rows = ["", f"Performance ({BENCH_FILE}: {cpu}, torch {b['torch']}, {b['threads']} CPU threads, "
                f"no GPU; baseline = {b['baseline']}):", "",
            "| step | median (s) | p95 (s) | baseline median (s) | speed-up |", "|---|---|---|---|---|"]
    for name, f in b["figures"].items():
        rows.append(f"| {name} | {f['optimised']['median_s']:.3f} | {f['optimised']['p95_s']:.3f} | "
                    f"{f['baseline']['median_s']:.3f} | x{f['speedup']:.2f} |")
    oc = b["optimisation_output_change"]
    rows.append("")
    if "precision" in b:
        rows.append("Inference precision of the optimised models: "
                    + ", ".join(f"{t} {p}" for t, p in b["precision"].items()) + ".")
    rows.append(f"Peak memory of the benchmark process (both model variants loaded): {b['peak_memory_mb']:.0f} MB. "
                f"Output change from the optimisations: X-ray probability {oc['xray_probability_abs_diff']}, "
                f"atrium mask voxels differing {oc['atrium_mask_voxels_differing']} of {oc['atrium_mask_voxels']}.")
    rows += felt_markdown()
    rows += precision_markdown(b.get("precision_check"))
    rows += alternatives_markdown(b.get("alternatives"))
    if "training" in b:
        t = b["training"]
        rows += ["", f"Training throughput (same file; one forward + backward + Adam step on random tensors at the "
                     f"training batch and input size; optimised = {t['optimised']}; baseline = {t['baseline']}):", "",
                 "| model | batch x input | images/s | baseline images/s | speed-up |", "|---|---|---|---|---|"]
        for task, r in t["throughput"].items():
            rows.append(f"| {task} | {r['batch']} x {'x'.join(str(d) for d in r['input'])} | "
                        f"{r['optimised']['images_per_s']:.1f} | {r['baseline']['images_per_s']:.1f} | "
                        f"x{r['speedup']:.2f} |")
    return rows


def felt_markdown() -> list[str]:
    """Browser step times, from what `python -m core.bench_browser` wrote (benchmarks/felt-cpu-2core.json)."""
    from core.bench_browser import FELT_FILE, STEP_NAMES
    from core.config import PROJECT_ROOT

    path = PROJECT_ROOT / FELT_FILE
    if not path.is_file():
        return []
    b = json.loads(path.read_text())
    m = b["machine"]
    rows = ["", f"What a user waits for in the browser ({FELT_FILE}, `python -m core.bench_browser`; {m.get('cpu_model', m['cpu'])}, "
                f"{m['threads']} threads, {m['browser']}, measured {b['measured'][:10]}; median of n repeats, each "
                "in a new session unless said):", "", "| step | median (s) | range (s) | n | goal (s) |", "|---|---|---|---|---|"]
    for k, r in b["steps"].items():
        rows.append(f"| {STEP_NAMES.get(k, k)} | {r['median_s']:.2f} | {r['min_s']:.2f}-{r['max_s']:.2f} | {r['n']} | "
                    f"{b['goals_s'].get(k, '-')} |")
    return rows


def precision_markdown(pc: dict | None) -> list[str]:
    """What the app's inference precision changes against float32 (`python -m core.bench --accuracy`)."""
    if not pc:
        return []
    rows = ["", "What the app's inference precision changes against float32 (same file, `--accuracy`; every case of "
                "the shared data through both precisions, and the card's validation cases scored in each):", ""]
    for task, r in pc.items():
        if r.get("app_precision") == "float32":
            rows.append(f"- {task}: float32 in the app, nothing changes.")
            continue
        app = r["app_precision"]
        v32, v16 = r.get("validation_float32"), r.get(f"validation_{app}")
        if "probability_max_abs_change" in r:
            rows.append(f"- {task} ({app}, {r['n_cases']} studies): P(disease) changes by at most "
                        f"{r['probability_max_abs_change']:.4f} (mean {r['probability_mean_abs_change']:.5f}); "
                        f"decisions changed at the card's threshold: {r['decisions_changed']}. Validation "
                        f"({v32['n']} patients) float32 / {app}: AUC {v32['auc']:.3f} / {v16['auc']:.3f}, "
                        f"accuracy {v32['accuracy']:.3f} / {v16['accuracy']:.3f}, LV EF mean absolute difference "
                        f"{v32['lv_ef_mae']:.4f} / {v16['lv_ef_mae']:.4f}.")
        else:
            rows.append(f"- {task} ({app}, {r['n_cases']} volumes): Dice between the {app} and float32 masks "
                        f"{r['mask_dice_vs_float32_min']:.4f} at worst (mean {r['mask_dice_vs_float32_mean']:.4f})."
                        + (f" Validation ({v32['n']} volumes) 3D Dice float32 / {app}: {v32['dice_mean']:.4f} / "
                           f"{v16['dice_mean']:.4f}." if v32 and v16 else ""))
    return rows


def alternatives_markdown(alt: dict | None) -> list[str]:
    """Other runtimes timed on the atrium U-Net (`python -m core.bench --alternatives`)."""
    if not alt:
        return []
    rows = ["", f"Other runtimes (same file, `--alternatives`; {alt['what']}; median over repeats after warm-up; "
                "the app uses eager bfloat16 autocast, or eager int8 where core.precision picks it):", "",
            "| runtime | median (s) | speed-up over eager float32 | largest probability change |", "|---|---|---|---|"]
    for name, r in alt["inference"].items():
        if "median_s" in r:
            rows.append(f"| {name} | {r['median_s']:.3f} | x{r['speedup_vs_eager_float32']:.2f} | "
                        f"{r['max_abs_prob_diff_vs_eager_float32']:.2g} |")
        else:
            rows.append(f"| {name} | {r.get('skipped') or r.get('failed')} | | |")
    t = alt.get("training_step")
    if t:
        rows += ["", f"Training ({t['what']}): eager {t['eager']['median_s']:.3f} s per step, torch.compile "
                     f"{t['torch_compile']['median_s']:.3f} s (x{t['torch_compile']['speedup_vs_eager']:.2f}, after "
                     f"{t['torch_compile']['first_step_s']:.0f} s compiling its first step)."]
    return rows


def diagnosis_markdown(wdir=None) -> list[str]:
    """The five-class cardiac diagnosis: cross-validated confusion matrix, per-class sensitivity, accuracy and
    calibration (weights/cardiac_diagnosis.json), and the end-to-end figure on the validation patients."""
    from core.cardiac import GROUPS, load_diagnosis

    dg = load_diagnosis(wdir)
    if not dg:
        return []
    cv = dg["cross_validation"]
    c, u = cv["calibrated"], cv["uncalibrated"]
    lo, hi = c["accuracy_ci95"]
    rows = ["", f"Cardiac five-class diagnosis, {cv['what']} (weights/cardiac_diagnosis.json): accuracy "
                f"**{c['accuracy']:.3f}** (95 % CI {lo:.3f}-{hi:.3f}), normal vs disease AUC "
                f"{c['normal_vs_disease'].get('auc', float('nan')):.3f}. Rows: true group; columns: predicted.", "",
            "| true \\ predicted | " + " | ".join(GROUPS) + " | sensitivity |", "|---" * (len(GROUPS) + 2) + "|"]
    for g, row in zip(GROUPS, c["confusion"]["matrix"]):
        rows.append(f"| {g} | " + " | ".join(str(v) for v in row) + f" | {c['sensitivity'][g]:.3f} |")
    cal = (f"Top-class expected calibration error: {u['ece']:.3f} before, {c['ece']:.3f} after temperature scaling "
           "(cross-fitted)")
    cons, rep = cv.get("ece_if_perfectly_calibrated"), cv.get("repeated")
    if cons:
        cal += (f"; a perfectly calibrated classifier with the same probabilities would show {cons['median']:.3f} on "
                f"{c['n']} patients (95 % of draws up to {cons['q95']:.3f}; p = {cons['p_value']:.2f})")
    if rep:
        cal += (f"; over {len(rep['runs'])} fold assignments ECE {rep['ece_mean']:.3f} ({rep['ece_range'][0]:.3f}-"
                f"{rep['ece_range'][1]:.3f}) and accuracy {rep['accuracy_mean']:.3f} ({rep['accuracy_range'][0]:.3f}-"
                f"{rep['accuracy_range'][1]:.3f})")
    rows += ["", cal + "."]
    e = dg.get("validation_end_to_end", {})
    if e.get("n"):
        lo, hi = e["accuracy_ci95"]
        rows += ["", f"End to end through the U-Net's own segmentation, on the committed model's {e['n']} validation "
                     f"patients: accuracy {e['accuracy']:.3f} ({lo:.3f}-{hi:.3f}); per-class sensitivity "
                     + ", ".join(f"{g} {v:.2f}" for g, v in e["sensitivity"].items()) + "."]
    return rows


def figure_line(task: str, card: dict) -> str:
    """One-line validation figures of a task from its card (Home cards, PDF reports): the cross-validated
    figure first where there is one."""
    v = card["validation"]
    if TASKS[task].kind == "binary":
        cv = card.get("cross_validation")
        if cv:  # lead with the cross-validated figure: every patient scored once by a model that did not see them
            o = cv["pooled_out_of_fold"]
            lo, hi = o["ci95"]["auc"]
            txt = (f"5-fold CV (all {o['n']} patients) AUC {o['auc']:.3f} ({lo:.3f}-{hi:.3f}), accuracy "
                   f"{o['accuracy']:.3f}; fold-1 validation AUC {v['auc']:.3f}, n = {v['n']}")
        else:
            lo, hi = v["ci95"]["auc"]
            txt = f"validation AUC {v['auc']:.3f} ({lo:.3f}-{hi:.3f}), accuracy {v['accuracy']:.3f}, n = {v['n']}"
        sl = shift_line(card)
        if sl:
            txt = (sl + f". Validation is the training hospital and period (n = {v['n']}): expect lower figures on "
                   "other hospitals or later patients; not for adults.")
        return txt
    if not v.get("n"):
        return "no accuracy figures: no cross-validation record beside these weights"
    lo, hi = v["dice_ci95"]
    names = {"Task02_Heart": "bSSFP (MSD)", "LA2018": "LGE (2018 LA challenge)"}
    per = "; ".join(f"{names.get(k, k)} {r['dice_mean']:.3f} (n = {r['n']})"
                    for k, r in v.get("per_dataset", {}).items() if k != "all")
    if v.get("cross_validated"):  # the model trained on every volume: its figures are the recipe's, out of fold
        cv = atrium_cross_validation(card)
        k = f"{cv['n_folds']}-fold " if cv else ""
        return f"{k}cross-validated 3D Dice {v['dice_mean']:.3f} ({lo:.3f}-{hi:.3f}), n = {v['n']} volumes — {per}"
    txt = f"validation 3D Dice {v['dice_mean']:.3f} ({lo:.3f}-{hi:.3f}), n = {v['n']} volumes"
    if len(v.get("per_dataset", {})) > 2:
        txt += " — " + per
    cv = atrium_cross_validation(card)
    if cv:
        lo, hi = cv["dice_ci95"]
        txt += f"; {cv['n_folds']}-fold CV Dice {cv['dice_mean']:.3f} ({lo:.3f}-{hi:.3f}), n = {cv['n']}"
    return txt


def write_readme(path: Path, wdir=None) -> None:
    text = path.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{path} has no {START} ... {END} block")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    path.write_text(f"{head}{START}\n{markdown(wdir)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.report", description=__doc__)
    ap.add_argument("--write", type=Path, default=None)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args(argv)
    if args.write:
        write_readme(args.write, args.weights)
    else:
        print(markdown(args.weights))
    return 0


if __name__ == "__main__":
    sys.exit(main())
