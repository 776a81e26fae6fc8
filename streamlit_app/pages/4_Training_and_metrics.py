"""Training curves and metric tables, all read from the weights cards that training wrote."""
from __future__ import annotations

import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from common import DISCLAIMER
from core.checkpoint import read_card
from core.errors import MissingWeightsError
from core.precision import PrecisionError, inference_precision
from core.report import SHAPE_NAMES, atrium_cross_validation, read_validation_eval
from core.tasks import TASKS

NS = "metrics"
st.set_page_config(page_title="Training & metrics", page_icon="📈", layout="wide")
st.title("Training curves and validation metrics")
st.caption(DISCLAIMER + " All numbers are validation figures read from weights/*.json.")

task = st.radio("Model", list(TASKS), format_func=lambda t: TASKS[t].title, horizontal=True, key=f"{NS}.task")
try:
    card = read_card(task)
except MissingWeightsError as exc:
    st.error(str(exc))
    st.stop()
spec = TASKS[task]
hist = pd.DataFrame(card["history"])
metric = card.get("training", {}).get("monitor", spec.monitor)
train_metric = "train_accuracy" if "train_accuracy" in hist else f"train_{metric}"

st.subheader("Training curves")
c1, c2 = st.columns(2)
with c1:
    fig = go.Figure()
    fig.add_scatter(x=hist["epoch"], y=hist["train_loss"], name="train loss")
    fig.add_scatter(x=hist["epoch"], y=hist["val_loss"], name="validation loss")
    fig.add_vline(x=card["best_epoch"], line_dash="dot", annotation_text="kept checkpoint")
    fig.update_layout(title="Loss per epoch", xaxis_title="epoch", height=340)
    st.plotly_chart(fig, key=f"{NS}.loss")
with c2:
    fig = go.Figure()
    fig.add_scatter(x=hist["epoch"], y=hist[train_metric], name=train_metric.replace("_", " "))
    fig.add_scatter(x=hist["epoch"], y=hist[f"val_{metric}"], name=f"validation {metric}")
    fig.add_vline(x=card["best_epoch"], line_dash="dot")
    fig.update_layout(title="Metric per epoch", xaxis_title="epoch", height=340)
    st.plotly_chart(fig, key=f"{NS}.metric")
if task == "cardiac":
    st.caption("Curves of the committed model (cross-validation fold 1): its segmentation stage, kept at "
               "the epoch with the best validation Dice (RV, myocardium, LV cavity).")

v = card["validation"]
st.subheader("Validation metrics")
if spec.kind == "binary":
    def rows(res: dict) -> pd.DataFrame:
        return pd.DataFrame([{"metric": k, "value": res[k], "95% CI low": res["ci95"][k][0],
                              "95% CI high": res["ci95"][k][1]}
                             for k in ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")])

    st.markdown(f"Held-out validation set: **n = {v['n']}**, decision threshold **{card['threshold']:.3f}** "
                f"({card['threshold_rule']}).")
    c1, c2, c3 = st.columns([2, 1.2, 1.5])
    with c1:
        st.dataframe(rows(v), hide_index=True, key=f"{NS}.table")
    with c2:
        cm = v["confusion"]
        neg, pos = spec.classes
        st.markdown("**Confusion matrix**")
        st.dataframe(pd.DataFrame({f"predicted {neg}": [cm["tn"], cm["fn"]], f"predicted {pos}": [cm["fp"], cm["tp"]]},
                                  index=[f"true {neg}", f"true {pos}"]), key=f"{NS}.cm")
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
        st.dataframe(pd.DataFrame(cv["folds"]), hide_index=True, key=f"{NS}.folds")
    ev = read_validation_eval(task)
    if ev and "shape_agreement" in ev:
        st.markdown(f"**Shape estimates against the expert masks** ({ev['n']} validation patients): the page's "
                    "ejection fractions and ratios come from the model's segmentation of 8 slices per frame; here "
                    "they are compared with the same ratios from the expert masks over every slice.")
        st.dataframe(pd.DataFrame([{"quantity": SHAPE_NAMES.get(k, k), "mean absolute difference": a["mae"],
                                    "mean difference": a["bias"], "Pearson r": a["pearson_r"], "n": a["n"]}
                                   for k, a in ev["shape_agreement"].items()]), hide_index=True, key=f"{NS}.shape")
else:
    lo, hi = v["dice_ci95"]
    st.markdown(f"**{v['n']} validation volumes**: mean 3D Dice **{v['dice_mean']:.3f}** (95 % CI {lo:.3f}-{hi:.3f}), "
                f"IoU {v['iou_mean']:.3f}, HD95 {v['hd95_mm_mean']:.2f} mm, volume error {v['volume_error_pct_mean']:+.1f} %.")
    st.dataframe(pd.DataFrame(v["per_case"]).T.rename_axis("case"), key=f"{NS}.per_case")
    cv = atrium_cross_validation(card)
    if cv:
        lo, hi = cv["dice_ci95"]
        st.markdown(f"**{cv['n_folds']}-fold cross-validation of the same recipe** (fold 1 is the committed model; "
                    f"every one of the {cv['n']} volumes validated once): mean 3D Dice **{cv['dice_mean']:.3f}** "
                    f"(95 % CI {lo:.3f}-{hi:.3f}), IoU {cv['iou_mean']:.3f}, HD95 {cv['hd95_mm_mean']:.2f} mm, "
                    f"volume error {cv['volume_error_pct_mean']:+.1f} %.")
        st.dataframe(pd.DataFrame(cv["per_case"]).T.rename_axis("case"), key=f"{NS}.cv_per_case")

st.subheader("Data and split")
d = card["data"]
st.markdown(f"- Dataset: {d['dataset']}\n- Split: {d['split']}\n"
            f"- Training: {card['train_time_s']:.0f} s on {card['device']}, best epoch {card['best_epoch']} "
            f"of {card['epochs_run']}, seed {card['training']['seed']}, "
            f"{card['training'].get('precision', 'float32')}, torch {card['torch_version']}")
try:
    prec = inference_precision(bf16_allowed=spec.bf16_inference)
    st.markdown(f"- Inference in this app: {prec}" + (
        " autocast (this CPU runs bfloat16 natively; what it changes against float32 is measured in the "
        "README's Speed section; `MEDIMG_PRECISION=float32` turns it off)" if prec == "bfloat16" else ""))
except PrecisionError as exc:
    st.error(str(exc))
with st.expander("Full model card (JSON)"):
    st.json({k: v for k, v in card.items() if k not in ("history",)}, expanded=False)
