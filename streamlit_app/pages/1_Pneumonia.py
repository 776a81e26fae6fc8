"""Pneumonia from a frontal chest X-ray: upload or sample -> P(pneumonia) + Grad-CAM."""
from __future__ import annotations

from dataclasses import replace

import streamlit as st

from common import (DISCLAIMER, FOREGROUND, display_controls, file_key, model_or_stop, pick_sample, report_button,
                    reset_namespace, run_safely, training_case_of, training_notice, warm_up_in_background,
                    weights_or_stop)
from core.case_report import format_probability, render_pdf, with_training_note, xray_report
from core.io import read_image_2d
from core.visualize import fit_for_display, grey_rgb, heatmap_overlay, zoom_view


def _display_values(im):
    """(values, presets, invert) for the viewer: a DICOM's own values and window presets, else the pixels."""
    return (im.values if im.values is not None else im.pixels), im.windows, im.invert


NS = "pneu"
st.set_page_config(page_title="Pneumonia – chest X-ray", page_icon="🫁", layout="wide")
st.title("Pneumonia from a chest X-ray")
st.caption(DISCLAIMER)
# the model (and torch under it) loads in the background while the user picks a file: the page does not wait
weights_or_stop("pneumonia")
warm_up_in_background("pneumonia")
st.info("**Intended use:** frontal (PA/AP) chest radiographs of young children (about 1-5 years), the population of "
        "the Guangzhou cohort the model was trained on. Adult radiographs, lateral views, other body parts and "
        "modalities are recognised where possible and get no diagnosis.")

left, right = st.columns(2)
with left:
    upload = st.file_uploader("Upload a frontal chest X-ray (PNG, JPEG or DICOM)",
                              type=["png", "jpg", "jpeg", "dcm", "dicom"], key=f"{NS}.upload")
with right:
    sample = pick_sample("pneumonia", NS, disabled=upload is not None)

data, name = None, ""
if upload is not None:
    data, name = upload.getvalue(), upload.name
    if sample is not None:
        st.caption("The uploaded file is used; the sample selection is ignored while an upload is present.")
elif sample is not None:
    data, name = sample.files["image"].read_bytes(), sample.files["image"].name
    st.caption(f"Sample: {sample.name} — {sample.note}")

if data is None:
    st.info("Upload a radiograph or pick a sample to get a prediction.")
    st.stop()

lm = model_or_stop("pneumonia")
from core.pneumonia import predict_xray, xray_heatmap  # noqa: E402  (torch: after the uploader)
from core.runtime import UNCERTAIN_MARGIN, verdict_band  # noqa: E402

key = file_key(data)
if st.session_state.get(f"{NS}.key") != key:
    # controls start from their defaults for a new image, so what they show is what the image is drawn with
    reset_namespace(NS, keep=(f"{NS}.upload", f"{NS}.sample"))
    image = run_safely(lambda: read_image_2d(data, name), "This file cannot be used")
    if image is None:
        st.stop()
    # the verdict first; the Grad-CAM map (a backward pass) is computed where it is drawn, below
    with st.spinner("Predicting…"), FOREGROUND:
        result = run_safely(lambda: predict_xray(lm, image, explain=False), "This image could not be analysed")
    if result is None:
        st.stop()
    st.session_state[f"{NS}.key"] = key
    st.session_state[f"{NS}.image"] = image
    st.session_state[f"{NS}.result"] = result
    st.session_state[f"{NS}.name"] = name
    st.session_state[f"{NS}.training_case"] = training_case_of(lm, image.pixels)

image = st.session_state[f"{NS}.image"]


res = st.session_state[f"{NS}.result"]
name = st.session_state[f"{NS}.name"]
st.markdown(f"**Result for: {name}**")
train_case = st.session_state.get(f"{NS}.training_case")
training_notice(train_case)
if res.withheld:
    report_button(lambda: render_pdf(with_training_note(xray_report(res, image, name), train_case), lm.card), name, NS)
    st.warning(f"**No diagnosis.** {res.withheld}")
    win, zoom, fx, fy = display_controls(NS, *_display_values(image))
    st.image(fit_for_display(zoom_view(grey_rgb(_display_values(image)[0], win), zoom, fx, fy)),
             caption="Uploaded image", width=480)
    if image.info:
        with st.expander("Image information (no identifying fields are shown)"):
            st.table({"field": list(image.info), "value": [str(v) for v in image.info.values()]})
    st.stop()

# A finding is a finding, not an error: a neutral box with a plain label; near the threshold, no verdict.
band = verdict_band(res.probability, res.threshold, calibrated=res.calibrated)
if band == "uncertain":
    why = (f"lies within {UNCERTAIN_MARGIN:.0%} of the decision threshold ({res.threshold:.1%})"
           if abs(res.probability - res.threshold) < UNCERTAIN_MARGIN else
           f"is on the other side of 50 % than the decision threshold ({res.threshold:.1%}) would call it")
    st.warning(f"**Uncertain — refer to a specialist.** P(pneumonia) = **{format_probability(res.probability)}** "
               f"{why}; the model cannot call this image either way.")
else:
    finding = "**Finding: pneumonia suggested.**" if band == "positive" else "**Finding: no pneumonia suggested.**"
    st.info(f"{finding} P(pneumonia) = **{format_probability(res.probability)}** (decision threshold "
            f"{res.threshold:.1%}, chosen on validation data under acquisition perturbations).")
st.metric("P(pneumonia)", format_probability(res.probability),
          help=("Calibrated on the validation images (clean and under acquisition perturbations), where 3 in 4 "
                "children had pneumonia: among such images, about this share had it. At a lower prevalence the "
                "true share is lower." if res.calibrated else "Model output after the sigmoid, not a calibrated risk."))

alpha = st.slider("Heatmap opacity", 0.0, 1.0, 0.4, 0.05, key=f"{NS}.alpha")
win, zoom, fx, fy = display_controls(NS, *_display_values(image))
c1, c2 = st.columns(2)
with c1:
    st.image(fit_for_display(zoom_view(grey_rgb(_display_values(image)[0], win), zoom, fx, fy)),
             caption=f"Original image (window: {win.name})", width="stretch")
with c2:
    if res.heatmap is None:  # once per image: later reruns (opacity, window, zoom) reuse it
        with st.spinner("Computing the Grad-CAM heatmap…"), FOREGROUND:
            heat = run_safely(lambda: xray_heatmap(lm, image, res.positive), "The heatmap could not be computed")
        if heat is not None:
            res = replace(res, heatmap=heat)
            st.session_state[f"{NS}.result"] = res
    if res.heatmap is not None:
        st.image(zoom_view(heatmap_overlay(res.display, res.heatmap, alpha), zoom, fx, fy), width="stretch",
                 caption=f"Grad-CAM for the '{'pneumonia' if res.positive else 'normal'}' decision "
                         "(red = regions that most raised it; shown on the model's square input)")
report_button(lambda: render_pdf(with_training_note(xray_report(res, image, name), train_case), lm.card), name, NS)
if image.info:
    with st.expander("Image information (no identifying fields are shown)"):
        st.table({"field": list(image.info), "value": [str(v) for v in image.info.values()]})
st.caption("Trained on paediatric radiographs (Kermany et al.); Grad-CAM shows where the model looked, "
           "not a lesion segmentation.")
