"""Training curves and metric tables, all read from the weights cards that training wrote."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from common import DISCLAIMER
from core.checkpoint import read_card
from core.errors import MissingWeightsError
from core.precision import PrecisionError
from core.runtime import task_precision
from core.report import (DATASET_NAMES, SHAPE_NAMES, atrium_cross_validation, external_evaluations,
                         read_validation_eval, schedule_note, shown_measures_agreement, shown_threshold,
                         stress_checks)
from core.tasks import TASKS

NS = "metrics"


def _matching_file(name: str, card: dict) -> dict | None:
    """A JSON file beside the weights, only if it was computed for these weights (same sha256)."""
    import json as _json

    from core.config import weights_dir

    path = weights_dir() / name
    rec = _json.loads(path.read_text()) if path.is_file() else None
    return rec if rec and rec.get("weights_sha256") == card.get("weights_sha256") else None

# per-volume columns as written by core.atrium, in words
PER_VOLUME_COLUMNS = {"dice": "3D Dice", "iou": "IoU", "hd95_mm": "HD95 (mm)", "volume_ml_pred": "volume, predicted (mL)",
                      "volume_ml_true": "volume, expert mask (mL)", "volume_error_pct": "volume error (%)",
                      "dataset": "dataset", "views": "slice directions fused"}


def per_dataset_table(per_dataset: dict[str, dict], with_quality_check: bool = False) -> pd.DataFrame:
    """One row per atrium dataset: Dice with its CI, the lowest Dice, HD95, |volume error| (and, for the pooled
    cross-validation, how often the quality check fired and how many volumes it reported with Dice < 0.5)."""
    rows = []
    for k, r in per_dataset.items():
        row = {"dataset": DATASET_NAMES.get(k, k), "volumes": r["n"],
               "3D Dice": f"{r['dice_mean']:.3f} ({r['dice_ci95'][0]:.3f}-{r['dice_ci95'][1]:.3f})",
               "lowest Dice": f"{r['dice_min']:.3f}", "HD95 (mm)": f"{r['hd95_mm_mean']:.1f}",
               "|volume error| (%)": f"{r['abs_volume_error_pct_mean']:.1f}"}
        if with_quality_check:
            row.update({"quality check fired": len(r["fired"]), "reported with Dice < 0.5": len(r["reported_below_0_5"])})
        rows.append(row)
    return pd.DataFrame(rows)


def per_volume_table(per_case: dict[str, dict]) -> pd.DataFrame:
    """One row per atrium volume (its case id), columns named for a reader (PER_VOLUME_COLUMNS)."""
    df = pd.DataFrame(per_case).T.rename_axis("volume")
    if "dataset" in df:
        df["dataset"] = df["dataset"].map(lambda d: DATASET_NAMES.get(d, d))
    if "views" in df:  # the canonical axes read, e.g. [2, 0, 1]: how many directions were fused is what matters
        df["views"] = df["views"].map(lambda v: len(v) if isinstance(v, (list, tuple)) else v)
    digits = {"dice": 3, "iou": 3, "hd95_mm": 1, "volume_ml_pred": 1, "volume_ml_true": 1, "volume_error_pct": 1}
    return df.astype({c: float for c in digits if c in df}).round(
        {c: d for c, d in digits.items() if c in df}).rename(columns=PER_VOLUME_COLUMNS)


st.set_page_config(page_title="Training & metrics", page_icon="📈", layout="wide")
st.title("Training curves and validation metrics")
st.caption(DISCLAIMER + " All numbers are validation or cross-validation figures read from weights/*.json.")

task = st.radio("Model", list(TASKS), format_func=lambda t: TASKS[t].title, horizontal=True, key=f"{NS}.task")
try:
    card = read_card(task)
except MissingWeightsError as exc:
    st.error(str(exc))
    st.stop()
spec = TASKS[task]
hist = pd.DataFrame(card["history"])
metric = card.get("training", {}).get("monitor", spec.monitor)

st.subheader("Training curves")
validated = hist["val_loss"].notna().any() if "val_loss" in hist else False
kept = "kept checkpoint" if validated else "kept: the last epoch (no validation volumes)"
c1, c2 = st.columns(2)
with c1:
    fig = go.Figure()
    fig.add_scatter(x=hist["epoch"], y=hist["train_loss"], name="train loss")
    if validated:
        fig.add_scatter(x=hist["epoch"], y=hist["val_loss"], name="validation loss")
    fig.add_vline(x=card["best_epoch"], line_dash="dot", annotation_text=kept,
                  # on the last epoch the label would widen the axis to twice the epochs: written to its left
                  annotation_position="top left" if card["best_epoch"] >= hist["epoch"].max() else "top right")
    fig.update_layout(title="Loss per epoch", xaxis_title="epoch", height=340)
    st.plotly_chart(fig, key=f"{NS}.loss")
METRIC_NAMES = {"auc": "validation ROC AUC", "dice": "validation 3D Dice",
                "shift_auc": "shift-aware validation score (battery AUC, mean - half the spread)"}
# only one quantity per axis: the validation metric that picked the checkpoint; a model trained on every
# case has none, and its training figure (Dice on augmented crops) is shown alone, named as what it is
col, name = (f"val_{metric}", METRIC_NAMES.get(metric, metric)) if validated else (
    f"train_{metric}", "training Dice on augmented 2D crops")
with c2:
    fig = go.Figure()
    fig.add_scatter(x=hist["epoch"], y=hist[col], name=name)
    fig.add_vline(x=card["best_epoch"], line_dash="dot")
    fig.update_layout(title=f"{name} per epoch", xaxis_title="epoch", yaxis_title=name.split(" (")[0], height=340)
    st.plotly_chart(fig, key=f"{NS}.metric")
if task == "cardiac":
    st.caption("Curves of the committed model (cross-validation fold 1): its segmentation stage, kept at "
               "the epoch with the best validation Dice (RV, myocardium, LV cavity).")

v = card["validation"]
st.subheader("Validation metrics")
if spec.kind == "binary":
    def rows(res: dict) -> pd.DataFrame:
        # three decimals throughout (a bare "1" beside "0.9625" reads as a different kind of number)
        return pd.DataFrame([{"metric": {"f1": "F1", "auc": "ROC AUC"}.get(k, k), "value": f"{res[k]:.3f}",
                              "95% CI low": f"{res['ci95'][k][0]:.3f}", "95% CI high": f"{res['ci95'][k][1]:.3f}"}
                             for k in ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")])

    # the threshold as the module page shows it (for pneumonia on the calibrated scale of the probability shown
    # there), so that the two pages never give one threshold as two numbers
    shown, calibrated = shown_threshold(card)
    where = (f"on the calibrated P(pneumonia) that the Pneumonia page shows; chosen as {card['threshold']:.3f} on the "
             f"model's raw output: {card['threshold_rule']}" if calibrated else card["threshold_rule"])
    st.markdown(f"Held-out validation set: **n = {v['n']}**, decision threshold **{shown:.1%}** ({where}).")
    c1, c2, c3 = st.columns([1.6, 1.8, 1.4])
    with c1:
        st.dataframe(rows(v), hide_index=True, key=f"{NS}.table")
    with c2:
        cm = v["confusion"]
        neg, pos = spec.classes
        st.markdown("**Confusion matrix** (validation, at the threshold)")
        # a static table: every column shows at any page width (a scrolling data frame cut the last one off)
        st.table(pd.DataFrame({f"predicted {neg}": [cm["tn"], cm["fn"]], f"predicted {pos}": [cm["fp"], cm["tp"]]},
                              index=[f"true {neg}", f"true {pos}"]))
    with c3:
        fig = go.Figure(go.Scatter(x=v["roc"]["fpr"], y=v["roc"]["tpr"], mode="lines", name="ROC"))
        fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line_dash="dash", name="chance")
        fig.update_layout(title=f"ROC (AUC {v['auc']:.3f})", xaxis_title="1 - specificity",
                          yaxis_title="sensitivity", height=320, showlegend=False)
        st.plotly_chart(fig, key=f"{NS}.roc")
    cv = card.get("cross_validation")
    if cv:
        st.markdown("**5-fold cross-validation by patient** (all 80 patients, pooled out-of-fold predictions)")
        st.dataframe(rows(cv["pooled_out_of_fold"]), hide_index=True, key=f"{NS}.cv")
        # threshold-free figures per fold only: the folds recorded accuracy at P >= 0.5, not at the app's
        # threshold, and a column of those would read as the app's accuracy
        folds = pd.DataFrame(cv["folds"]).rename(columns={
            "fold": "fold", "n_val": "patients", "best_epoch": "kept epoch", "val_seg_dice": "segmentation Dice",
            "val_auc": "AUC", "seconds": "training s"})
        keep = [c for c in ("fold", "patients", "kept epoch", "segmentation Dice", "AUC", "training s") if c in folds]
        st.dataframe(folds[keep], hide_index=True, key=f"{NS}.folds",
                     column_config={c: st.column_config.NumberColumn(format=f) for c, f in
                                    (("segmentation Dice", "%.3f"), ("AUC", "%.3f"), ("training s", "%.0f"))})
        st.caption(f"Per fold: threshold-free figures. Accuracy, sensitivity and specificity at the app's threshold "
                   f"({card['threshold']:.1%}) are in the pooled table above.")
    sv = card.get("shift_validation")
    if sv and "conditions" in sv:
        st.markdown("**Shift-aware validation** (checkpoint and threshold were selected on it): the same validation "
                    "images under 11 fixed acquisition perturbations, at the app's threshold. Pooled over the "
                    f"perturbations: AUC **{sv['pooled_perturbed']['auc']:.3f}**, accuracy "
                    f"**{sv['pooled_perturbed']['accuracy']:.3f}**, sensitivity {sv['pooled_perturbed']['sensitivity']:.3f}, "
                    f"specificity {sv['pooled_perturbed']['specificity']:.3f}.")
        st.dataframe(pd.DataFrame(sv["conditions"]).T.rename_axis("condition"), key=f"{NS}.shift")
        if sv.get("by_series"):
            st.markdown("**By acquisition series** (validation images, clean): share called pneumonia")
            st.table(pd.DataFrame(sv["by_series"]).T.rename_axis("series").rename(columns={
                "n": "images", "mean_probability": "mean P(pneumonia) (model output, before calibration)",
                "share_called_pneumonia": "share called pneumonia (at the threshold)", "what": "that share is"}))
    if task == "pneumonia":
        from core.pneumonia import CALIBRATION_FILE

        cal = _matching_file(CALIBRATION_FILE, card)
        if cal:
            st.markdown(f"**Calibration** ({cal['what']}, n = {cal['n']}): expected calibration error "
                        f"{cal['ece_before']:.3f} before and {cal['ece_after_cross_fitted']:.3f} after "
                        + ("Platt scaling (sigmoid of "
                           f"{cal['slope']:.2f} x logit + {cal['intercept']:.2f})" if cal.get("method") == "platt"
                           else f"temperature scaling (T = {cal['temperature']:.2f})")
                        + "; cross-fitted on two halves; the method with the lower cross-fitted log-loss is used. "
                        "The page shows calibrated probabilities; decisions are unchanged.")
            rb = cal.get("refer_band_clean_validation")
            if rb:
                st.markdown(f"**Refer band**: on the calibrated scale the threshold is {rb['threshold_calibrated']:.1%}; "
                            f"{rb['share_of_validation_images']:.1%} of the clean validation images get 'uncertain, "
                            "refer to a specialist' (within 10 points of the threshold, or a verdict that would "
                            f"contradict the probability's side of 50 %); accuracy on the others "
                            f"{rb['accuracy_of_the_rest']:.3f}.")
            fig = go.Figure()
            for name, key in (("before", "reliability_before"), ("after", "reliability_after")):
                fig.add_scatter(x=[r["mean_probability"] for r in cal[key]], y=[r["observed_rate"] for r in cal[key]],
                                mode="lines+markers", name=name)
            fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line_dash="dash", name="perfect")
            fig.update_layout(title="Reliability diagram, P(pneumonia)", xaxis_title="predicted probability",
                              yaxis_title="observed share with pneumonia", height=320)
            st.plotly_chart(fig, key=f"{NS}.pneu_reliability")
        st.caption("What is known about generalisation: validation images come from the same hospital and period as "
                   "the training images; a later test split of the same hospital (measured by the maintainers on the "
                   "previous model) scored well below its validation figure, and adults are outside the population.")
    if task == "cardiac":
        import re

        from core.cardiac import FEATURES, GROUPS, load_diagnosis

        def in_words(text: str) -> str:
            """The card's feature keys (e.g. thick_cv_es) in ``text`` replaced by their names."""
            return re.sub(r"\b[a-z]+(?:_[a-z]+)+\b", lambda m: FEATURES.get(m.group(0), m.group(0)), text)

        dg = load_diagnosis()
        if dg:
            cvc, cvu = dg["cross_validation"]["calibrated"], dg["cross_validation"]["uncalibrated"]
            e2e = dg["validation_end_to_end"]
            st.markdown(f"**Five-class diagnosis** ({dg['method']}). {dg['cross_validation']['what']}: accuracy "
                        f"**{cvc['accuracy']:.3f}** (95 % CI {cvc['accuracy_ci95'][0]:.3f}-{cvc['accuracy_ci95'][1]:.3f}); "
                        f"normal vs disease AUC {cvc['normal_vs_disease'].get('auc', float('nan')):.3f}. End to end on "
                        f"{e2e.get('n', 0)} validation patients through the model's own segmentation: accuracy "
                        f"**{e2e.get('accuracy', float('nan')):.3f}**. Expected calibration error before / after "
                        f"temperature scaling: {cvu['ece']:.3f} / {cvc['ece']:.3f}.")
            cons, rep = dg["cross_validation"].get("ece_if_perfectly_calibrated"), dg["cross_validation"].get("repeated")
            if cons and rep:
                st.markdown(f"How to read an ECE over {cvc['n']} patients: a perfectly calibrated classifier with these "
                            f"same probabilities would show {cons['median']:.3f} (median; 95 % of draws up to "
                            f"{cons['q95']:.3f}), so {cvc['ece']:.3f} is "
                            f"{'within what chance alone gives' if cons['p_value'] >= 0.05 else 'more than chance gives'}"
                            f" (p = {cons['p_value']:.2f}). Over "
                            f"{len(rep['runs'])} fold assignments: ECE {rep['ece_mean']:.3f} "
                            f"({rep['ece_range'][0]:.3f}-{rep['ece_range'][1]:.3f}), accuracy {rep['accuracy_mean']:.3f} "
                            f"({rep['accuracy_range'][0]:.3f}-{rep['accuracy_range'][1]:.3f}).")
            fr = dg.get("feature_reproducibility")
            if fr and fr["left_out"]:
                st.markdown(f"**Features left out** ({fr['what']}): " + ", ".join(
                    f"{FEATURES.get(k, k)} (r = {fr['pearson_r'][k]:.2f})" for k in fr["left_out"]) + f"; {len(fr['used'])} used.")
            s2 = dg["cross_validation"].get("second_stage")
            if s2:
                one, two = s2["one_stage_calibrated"], s2["two_stages_calibrated"]
                st.markdown(f"**Second stage, DCM vs MINF** ({in_words(s2['what'])}): cross-validated log-loss "
                            f"{s2['log_loss_one_stage']:.3f} with one stage, {s2['log_loss_two_stages']:.3f} with two "
                            f"(accuracy {one['accuracy']:.3f} / {two['accuracy']:.3f}; ECE {one['ece']:.3f} / "
                            f"{two['ece']:.3f}): **{'kept' if s2['kept'] else 'not kept'}**.")
            k1, k2 = st.columns(2)
            with k1:
                st.markdown("Confusion matrix, cross-validation (rows: true, columns: predicted)")
                st.table(pd.DataFrame(cvc["confusion"]["matrix"], index=[f"true {g}" for g in GROUPS],
                                      columns=[f"pred. {g}" for g in GROUPS]))
                st.table(pd.DataFrame({"sensitivity": cvc["sensitivity"]}).T)
            with k2:
                fig = go.Figure()
                for name, key in (("before calibration", "reliability_uncalibrated"),
                                  ("after (temperature)", "reliability_calibrated")):
                    b = dg["cross_validation"][key]["bins"]
                    fig.add_scatter(x=[r["confidence"] for r in b], y=[r["accuracy"] for r in b], mode="lines+markers",
                                    name=name)
                fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", line_dash="dash", name="perfect")
                fig.update_layout(title="Reliability diagram (top class, cross-validation)", xaxis_title="confidence",
                                  yaxis_title="accuracy", height=320)
                st.plotly_chart(fig, key=f"{NS}.reliability")
    if task == "cardiac":
        from core.cardiac import BINARY_CALIBRATION_FILE

        bc = _matching_file(BINARY_CALIBRATION_FILE, card)
        if bc:
            st.markdown(f"**Calibration of P(disease)** ({bc['what']}, n = {bc['n']}): expected calibration error "
                        f"{bc['ece_before']:.3f}; {bc['ece_after_cross_fitted']:.3f} after {bc['method']} scaling "
                        "(cross-fitted). Measured only: the page shows the model's own P(disease)."
                        + (f" A perfectly calibrated P(disease) would show {bc['ece_if_perfectly_calibrated']['median']:.3f}"
                           f" on as many patients (p = {bc['ece_if_perfectly_calibrated']['p_value']:.2f})."
                           if "ece_if_perfectly_calibrated" in bc else ""))
    ev = read_validation_eval(task)
    if ev and "shape_agreement" in ev:
        agree, source = shown_measures_agreement(ev)
        st.markdown(f"**Shape estimates against the expert masks** ({ev['n']} validation patients): the page's "
                    f"ejection fractions and ratios come from the model's segmentation of {source}; here "
                    "they are compared with the same ratios from the expert masks over every slice.")
        st.dataframe(pd.DataFrame([{"quantity": SHAPE_NAMES.get(k, k), "mean absolute difference": a["mae"],
                                    "mean difference": a["bias"], "Pearson r": a["pearson_r"], "n": a["n"]}
                                   for k, a in agree.items()]), hide_index=True, key=f"{NS}.shape")
    if ev and ev.get("volume_agreement"):
        from core.cardiac import VOLUMES

        st.markdown(f"**Volumes against the expert masks** ({ev['n']} validation patients): the page gives volumes "
                    "in mL and the LV mass in g only for a file whose voxel size is that of a cine short-axis stack "
                    "(never for the shared ACDC copy, whose headers say 1 mm). Compared here in voxels, where the "
                    "voxel size cancels: difference in % of the expert masks' volume.")
        st.dataframe(pd.DataFrame([{"quantity": VOLUMES[k], "mean absolute difference (%)": round(a["mean_abs_pct"], 1),
                                    "mean difference (%)": round(a["mean_pct"], 1), "Pearson r": a["pearson_r"],
                                    "n": a["n"]} for k, a in ev["volume_agreement"].items()]),
                     hide_index=True, key=f"{NS}.volumes")
else:
    cv = atrium_cross_validation(card)
    pooled = bool(v.get("cross_validated"))  # the model trained on every volume: its figures are its recipe's
    if pooled:
        st.markdown(f"**No validation volumes of its own**: the committed model is the recipe trained on all "
                    f"{card['data']['n_volumes']} volumes. Its figures are the recipe's, from the cross-validation "
                    "below: every volume scored by a fold model that did not train on it, as the app runs it.")
    elif v.get("n"):
        lo, hi = v["dice_ci95"]
        st.markdown(f"**{v['n']} validation volumes**: mean 3D Dice **{v['dice_mean']:.3f}** (95 % CI {lo:.3f}-{hi:.3f}), "
                    f"IoU {v['iou_mean']:.3f}, HD95 {v['hd95_mm_mean']:.2f} mm, volume error {v['volume_error_pct_mean']:+.1f} %.")
        st.markdown("**Per dataset** (validation volumes; 95 % CIs of the mean by bootstrap)")
        st.table(per_dataset_table(v.get("per_dataset", {})))
    else:
        st.warning("No figures for these weights: they were trained on every volume without a cross-validation "
                   "record beside them.")
    from core.atrium import views_in_words

    # the flips apply to a single view only: fused views take one pass each (core.atrium.segment_canonical)
    st.markdown(f"**Inference setting**: {views_in_words(tuple(card['input_spec'].get('views', [2])))}; on a single "
                f"view {card['input_spec'].get('tta_flips', 1)} in-plane flip(s) averaged, fused views one pass each; "
                f"mask threshold {card.get('threshold', 0.5):g} ({card.get('threshold_rule', '')}).")
    loc = card["input_spec"].get("localiser")
    if loc:  # a search aid, not part of the mask: said here so the card's figures are read with it
        st.markdown(f"**Localiser** (volumes wide in every direction): {loc.get('rule', '')}.")
    ref = card["input_spec"].get("refiner")
    if ref:  # part of the mask: the card's figures were measured with it
        st.markdown(f"**3D refiner**: {ref.get('rule', '')}.")
    if v.get("inference_choice"):
        with st.expander("Settings compared"):
            st.dataframe(pd.DataFrame(v["inference_choice"]).rename(columns={
                "flips": "flips", "threshold": "threshold", "dice_mean_of_datasets": "mean of per-dataset Dice"}),
                hide_index=True, key=f"{NS}.inference_choice")
    qc = card.get("quality_check")
    if qc and qc.get("validation_fired") is not None and (v.get("n") or 0) > 0:
        on = "out-of-fold volumes, each judged with its fold's own limits" if pooled else "validation volumes"
        st.markdown(f"**Quality check**: fired on {qc['validation_firing_rate']:.0%} of the {on}: "
                    f"{', '.join(qc['validation_fired']) or 'none'}. Limits: {qc['fitted_on']}.")
        if qc.get("foreign_inputs"):
            st.markdown("On volumes that are not left-atrium MRI it fired on " + "; ".join(
                f"{r['fired']} of {r['n']} {k}" for k, r in qc["foreign_inputs"].items()) + ".")
    if v.get("n") and not pooled:
        st.dataframe(per_volume_table(v["per_case"]), key=f"{NS}.per_case")
    if cv:
        whose = ("the committed model is this recipe trained on all of them" if pooled
                 else "fold 1 is the committed model; folds not listed have not been run yet")
        st.markdown(f"**Cross-validation of the recipe, folds {', '.join(map(str, cv['folds']))} of "
                    f"{cv['n_folds_planned']}** ({whose}; each of these {cv['n']} volumes is scored by a model that "
                    "did not train on it, as the app runs it, with that model's own quality-check limits)")
        st.table(per_dataset_table(cv["per_dataset"], with_quality_check=True))
        st.dataframe(per_volume_table(cv["per_case"]), key=f"{NS}.cv_per_case")
    for sc in stress_checks():
        with st.expander(f"{sc['title']}: {sc['whose']}"):
            st.caption("Does the quality check keep a poor mask from being reported when the scan is unlike the "
                       f"training data? From `{sc['file']}`.")
            st.table(pd.DataFrame([{sc["column"]: d["variant"], "dataset": d["dataset"], "volumes": d["n"],
                                    "3D Dice": f"{d['dice_mean']:.3f}", "volume reported": d["reported"],
                                    "reported with Dice < 0.5": d["reported_with_dice_under_0.5"],
                                    "lowest Dice reported": ("-" if d.get("reported_dice_min") is None
                                                             else f"{d['reported_dice_min']:.3f}")}
                                   for d in sc["rows"]]))
    fit = card.get("training_fit")
    if fit:
        st.caption("On its own training volumes (how well it fits them, not how it does on new data): 3D Dice "
                   + "; ".join(f"{DATASET_NAMES.get(k, k)} {r['dice_mean']:.3f} (n = {r['n']})"
                               for k, r in fit["per_dataset"].items() if k != "all") + ".")

evs = external_evaluations(task, card)
if evs:
    st.subheader("Evaluations on data the model never trained on")
    for ev in evs:
        if not ev["matches"]:
            st.caption(f"{ev['file']}: scored other weights (sha256 differs from the weights in use); not shown.")
            continue
        if spec.kind == "binary":
            st.markdown(f"**{ev.get('data_label', ev['file'])}**, evaluated {ev.get('evaluated', '?')[:10]} "
                        f"(n = {ev['n']}, withheld by the input checks {ev.get('n_refused_by_input_check', 0)}): "
                        f"accuracy {ev['accuracy']:.3f}, sensitivity {ev['sensitivity']:.3f}, specificity "
                        f"{ev['specificity']:.3f}, AUC {ev['auc']:.3f} at threshold {ev['threshold']:.3f}.")
        else:
            st.markdown(f"**{ev.get('data_label', ev['file'])}**, evaluated {ev.get('evaluated', '?')[:10]} "
                        f"({ev['n']} volumes): mean 3D Dice {ev['dice_mean']:.3f}; quality check fired on "
                        f"{ev.get('quality_check_fired', 'n/a')}.")

st.subheader("Data and split")
d = card["data"]
st.markdown(f"- Dataset: {d['dataset']}\n- Split: {d['split']}\n"
            f"- Training: {card['train_time_s']:.0f} s on {card['device']}, "
            + (f"kept epoch {card['best_epoch']} of {card['epochs_run']}: {card['kept_epoch_rule']}"
               if card.get("kept_epoch_rule") else f"best epoch {card['best_epoch']} of {card['epochs_run']}")
            + schedule_note(card) + f", seed {card['training']['seed']}, "
            f"{card['training'].get('precision', 'float32')}, torch {card['torch_version']}")
try:
    prec = task_precision(spec, card)
    st.markdown(f"- Inference in this app: {prec}" + (
        " autocast (this CPU runs bfloat16 natively; what it changes against float32 is measured in the "
        "README's Speed section; `MEDIMG_PRECISION=float32` turns it off)" if prec == "bfloat16" else
        " (8-bit integer passes with activation ranges observed on training volumes, faster on this CPU; what "
        "they change is measured in the README's Speed section; `MEDIMG_PRECISION=bfloat16` or `float32` turns "
        "them off)" if prec == "int8" else ""))
except PrecisionError as exc:
    st.error(str(exc))
with st.expander("Full model card (JSON)"):
    st.json({k: v for k, v in card.items() if k not in ("history",)}, expanded=False)
