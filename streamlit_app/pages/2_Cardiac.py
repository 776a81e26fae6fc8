"""Cardiac disease from a cine short-axis MRI study: ED + ES NIfTI (or one 4D cine, ED/ES found from the
LV cavity curve) -> normal vs disease, five-class diagnosis, Grad-CAM."""
from __future__ import annotations

import numpy as np
import streamlit as st

from common import (DISCLAIMER, FOREGROUND, display_controls, file_key, legend, model_or_stop, pick_sample, report_button,
                    reset_namespace, run_safely, training_case_of, training_notice, warm_up_in_background,
                    weights_or_stop)
from core.case_report import cardiac_report, format_probability, render_pdf, with_training_note
from core.dicom_series import read_cine_any
from core.io import read_image_volume
from core.visualize import heatmap_overlay, label_overlay, zoom_view

NS = "card"
st.set_page_config(page_title="Cardiac disease – cine MRI", page_icon="🫀", layout="wide")
st.title("Cardiac disease from cine short-axis MRI")
st.caption(DISCLAIMER)
# the model (and torch under it) loads in the background while the user picks files: the page does not wait
weights_or_stop("cardiac")
warm_up_in_background("cardiac")

mode = st.radio("Study input", ["ED and ES frames", "One 4D cine"], horizontal=True, key=f"{NS}.mode",
                help="A 4D cine NIfTI is (x, y, slice, time): every frame is segmented, and ED and ES are taken "
                     "as the frames with the largest and the smallest left-ventricular cavity.")
cine = cycle = None
if mode == "One 4D cine":
    c1, c3 = st.columns([2, 1])
    with c1:
        up_cine = st.file_uploader("Cine short-axis series: one 4D NIfTI (x, y, slice, time), or the DICOM series "
                                   "as one .zip", type=["nii", "gz", "zip"], key=f"{NS}.cine")
    with c3:
        st.caption("The sample patients are ED/ES frame pairs; choose 'ED and ES frames' to use them.")
    if up_cine is None:
        st.info("Upload a 4D cine NIfTI, or choose 'ED and ES frames'.")
        st.stop()
    cine_bytes = up_cine.getvalue()
    ckey = file_key(cine_bytes)
    if st.session_state.get(f"{NS}.cine_key") != ckey:
        reset_namespace(NS, keep=(f"{NS}.mode", f"{NS}.cine", f"{NS}.ed", f"{NS}.es", f"{NS}.sample"))
        cine = run_safely(lambda: read_cine_any(cine_bytes, up_cine.name), "The cine cannot be used")
        if cine is None:
            st.stop()
        lm = model_or_stop("cardiac")
        from core.cardiac import cardiac_cycle

        with st.spinner(f"Segmenting all {cine.n_frames} frames to find end-diastole and end-systole…"), FOREGROUND:
            cycle = run_safely(lambda: cardiac_cycle(lm, cine), "The cine could not be analysed")
        if cycle is None:
            st.stop()
        st.session_state.update({f"{NS}.cine_key": ckey, f"{NS}.cine_obj": cine, f"{NS}.cycle": cycle,
                                 f"{NS}.ed_t": cycle.ed + 1, f"{NS}.es_t": cycle.es + 1})
    cine, cycle = st.session_state[f"{NS}.cine_obj"], st.session_state[f"{NS}.cycle"]
    import plotly.graph_objects as go

    fr = list(range(1, cine.n_frames + 1))
    # in mL when the file's voxel size is a cine stack's (as the volumes below), else in the model's grid pixels
    ml = cycle.voxel_ml
    unit = (lambda v: np.asarray(v) * ml) if ml else np.asarray  # noqa: E731
    fig = go.Figure()
    fig.add_scatter(x=fr, y=unit(cycle.lv), mode="lines+markers", name="LV cavity")
    fig.add_scatter(x=fr, y=unit(cycle.rv), mode="lines+markers", name="RV cavity")
    fig.add_vline(x=cycle.ed + 1, line_dash="dash", annotation_text="ED (largest LV)")
    fig.add_vline(x=cycle.es + 1, line_dash="dot", annotation_text="ES (smallest LV)")
    fig.update_layout(height=260, margin=dict(t=30, b=30), xaxis_title="frame", xaxis_dtick=1,
                      yaxis_title="cavity volume (mL)" if ml else "cavity size (pixels, all slices)")
    st.plotly_chart(fig, key=f"{NS}.cycle_chart")
    f1, f2 = st.columns(2)
    ed_t = f1.number_input("ED frame (chosen: largest LV cavity)", 1, cine.n_frames, key=f"{NS}.ed_t")
    es_t = f2.number_input("ES frame (chosen: smallest LV cavity)", 1, cine.n_frames, key=f"{NS}.es_t")
    if ed_t == es_t:
        st.info("ED and ES must be different frames.")
        st.stop()
    names = (f"{up_cine.name}, frame {ed_t}", f"{up_cine.name}, frame {es_t}")
    if st.session_state.get(f"{NS}.swapped"):
        ed_t, es_t, names = es_t, ed_t, (names[1], names[0])
    key = f"{ckey}:{ed_t}:{es_t}"
    load = (lambda: (cine.frame(ed_t - 1), cine.frame(es_t - 1)))  # noqa: E731
else:
    c1, c2, c3 = st.columns(3)
    with c1:
        up_ed = st.file_uploader("End-diastole (ED) frame, NIfTI", type=["nii", "gz"], key=f"{NS}.ed")
    with c2:
        up_es = st.file_uploader("End-systole (ES) frame, NIfTI", type=["nii", "gz"], key=f"{NS}.es")
    with c3:
        sample = pick_sample("cardiac", NS, "…or pick a sample patient", disabled=up_ed is not None or up_es is not None)

    ed_bytes = es_bytes = None
    if up_ed is not None or up_es is not None:
        if up_ed is None or up_es is None:
            st.info("Upload both frames (ED and ES) of the same cine series.")
            st.stop()
        ed_bytes, es_bytes = up_ed.getvalue(), up_es.getvalue()
        names = (up_ed.name, up_es.name)
    elif sample is not None:
        ed_bytes, es_bytes = sample.files["ED"].read_bytes(), sample.files["ES"].read_bytes()
        names = (f"{sample.name}: {sample.files['ED'].name}", f"{sample.name}: {sample.files['ES'].name}")
        st.caption(f"Sample: {sample.name} — {sample.note}")
    else:
        st.info("Upload the ED and ES frames, or pick a sample patient.")
        st.stop()

    if st.session_state.get(f"{NS}.swapped"):  # the user asked to use the frames the other way round
        ed_bytes, es_bytes, names = es_bytes, ed_bytes, (names[1], names[0])
    key = file_key(ed_bytes, es_bytes)

    def load():
        ed = run_safely(lambda: read_image_volume(ed_bytes, "ED"), "The ED frame cannot be used")
        es = run_safely(lambda: read_image_volume(es_bytes, "ES"), "The ES frame cannot be used") if ed else None
        return ed, es

lm = model_or_stop("cardiac")
from core.cardiac import feature_text, predict_cardiac  # noqa: E402  (torch: after the uploaders)

if st.session_state.get(f"{NS}.key") != key:
    # controls start from their defaults for a new study, so what they show is what the images are drawn with
    reset_namespace(NS, keep=(f"{NS}.ed", f"{NS}.es", f"{NS}.sample", f"{NS}.swapped", f"{NS}.mode", f"{NS}.cine",
                              f"{NS}.cine_key", f"{NS}.cine_obj", f"{NS}.cycle", f"{NS}.ed_t", f"{NS}.es_t"))
    ed, es = load()
    if ed is None or es is None:
        st.stop()
    with st.spinner("Predicting and computing Grad-CAM…"), FOREGROUND:
        result = run_safely(lambda: predict_cardiac(lm, ed, es), "These frames could not be analysed")
    if result is None:
        st.stop()
    st.session_state[f"{NS}.key"] = key
    st.session_state[f"{NS}.result"] = result
    st.session_state[f"{NS}.training_case"] = training_case_of(lm, ed.data, es.data)

res = st.session_state[f"{NS}.result"]
st.markdown(f"**Result for:** ED = `{names[0]}`, ES = `{names[1]}`")
train_case = st.session_state.get(f"{NS}.training_case")
training_notice(train_case)
report_button(lambda: render_pdf(with_training_note(
    cardiac_report(res, f"ED = {names[0]}, ES = {names[1]}", lm.diagnosis), train_case), lm.card),
    names[0].split(",")[0].split(":")[-1].strip(), NS)


def _swap() -> None:
    st.session_state[f"{NS}.swapped"] = not st.session_state.get(f"{NS}.swapped", False)


if res.frames_swapped:
    # the left ventricle is smaller at "ED" than at "ES": the frames are most likely swapped
    st.error("**The frames look swapped or mislabelled**: the left-ventricular cavity is smaller in the frame given "
             "as end-diastole than in the one given as end-systole, which cannot be (an ejection fraction would be "
             "negative). No diagnosis is shown. Check which file is ED and which is ES, or swap them.")
    st.button("Swap ED and ES", on_click=_swap, key=f"{NS}.swap")
    st.stop()
if st.session_state.get(f"{NS}.swapped"):
    st.caption("ED and ES are used swapped, as you asked.")
    st.button("Undo the swap", on_click=_swap, key=f"{NS}.unswap")
if res.withheld:
    st.warning(f"**No diagnosis.** {res.withheld}")
    cols = st.columns(len(res.slices) // 2)
    for j, c in enumerate(cols):
        c.image(np.rot90(res.slices[j]), caption=res.slice_labels[j], width="stretch", clamp=True)
    st.stop()
from core.cardiac import GROUP_NAMES, cardiac_band  # noqa: E402
from core.runtime import UNCERTAIN_MARGIN  # noqa: E402

band, disagree = cardiac_band(res, lm.diagnosis)
if disagree:
    probs = res.diagnosis["probabilities"]
    top = max(probs, key=probs.get)
    st.warning(f"**Uncertain — refer to a specialist.** The two models disagree: P(disease) = "
               f"**{format_probability(res.probability)}** (threshold {res.threshold:.1%}) says the heart looks "
               f"{'diseased' if res.probability >= res.threshold else 'normal'}, the five-class diagnosis below says "
               f"**{GROUP_NAMES[top]} ({top})** at {format_probability(probs[top])}.")
elif band == "uncertain":
    st.warning(f"**Uncertain — refer to a specialist.** P(disease) = **{format_probability(res.probability)}** lies "
               f"within {UNCERTAIN_MARGIN:.0%} of the decision threshold ({res.threshold:.1%}).")
else:
    finding = ("**Finding: the heart looks diseased**" if band == "positive"
               else "**Finding: the heart looks normal**")
    st.info(f"{finding}: P(disease) = **{format_probability(res.probability)}** (threshold {res.threshold:.1%}). "
            "Disease here means any of DCM, HCM, previous myocardial infarction or abnormal right ventricle"
            + ("; the five-class diagnosis below names the most likely." if lm.diagnosis is not None else
               "; this model does not say which."))
m1, m2, m3, m4, m5 = st.columns(5)
m1.metric("P(disease)", format_probability(res.probability))
sh = res.measures()  # one source for the page, the report and the table below
if sh is not None:
    m2.metric("LV ejection fraction (estimate)", feature_text("lv_ef", sh["lv_ef"]))
    m3.metric("RV ejection fraction (estimate)", feature_text("rv_ef", sh["rv_ef"]))
    m4.metric("Myocardium / LV cavity at ED", f"{sh['myo_lv_ed']:.2f}")
    m5.metric("RV / LV cavity at ED", f"{sh['rv_lv_ed']:.2f}")
    st.caption(("Estimates from the model's own segmentation of every slice of both frames (volumes summed over the "
                "slices, so ratios need no voxel size); the five-class diagnosis below rests on them. "
                if sh["source"] == "every slice" else
                "Estimates from the model's own segmentation of the 8 ED and 8 ES slices shown below (areas summed "
                "over the same slices, so ratios need no voxel size); the decision rests on them. ")
               + "They are not clinical measurements; the RV estimates agree less well with expert masks than the LV "
                 "ones (see Training & metrics).")
if res.at_crop_edge:
    st.warning("**Part of the heart may be missing.** The model's segmentation reaches the edge of the square of the "
               "image it reads (centred on the heart it found, 60 % of the image's shorter side): volumes and ejection "
               "fractions may be wrong, and no volumes in mL are given. Check the segmentation below.")
if res.volumes is not None:
    from core.cardiac import VOLUMES, volume_text
    from core.report import read_validation_eval

    agree = (read_validation_eval("cardiac") or {}).get("volume_agreement", {})
    st.markdown("**Volumes** (summation of discs over the model's segmentation of every slice, with the file's voxel "
                "size; LV mass = myocardium at end-diastole x 1.05 g/mL)")
    st.table([{"quantity": VOLUMES[k], "this study": volume_text(k, v),
               "model vs expert masks (validation)": (f"{agree[k]['mean_abs_pct']:.0f} % mean absolute difference"
                                                      if k in agree else "not measured")}
              for k, v in res.volumes.items()])
    n = next(iter(agree.values()), {}).get("n")
    st.caption("Not indexed to body surface area (the files give no height or weight). Papillary muscles and "
               "trabeculae count as cavity, as in the ACDC masks the model learnt from. "
               + (f"The right column compares the model's volumes with the expert masks' on {n} validation patients "
                  "in voxels, which needs no voxel size (Training & metrics); " if n else "")
               + "the mL are only as right as the file's voxel size.")
elif res.volumes_withheld:
    st.caption(f"No volumes in mL or LV mass in g: {res.volumes_withheld}")

if res.diagnosis is not None and lm.diagnosis is not None:
    from core.cardiac import FEATURES, GROUPS

    probs = res.diagnosis["probabilities"]
    top = max(probs, key=probs.get)
    st.subheader("Which disease (five classes)")
    if probs[top] < lm.diagnosis["uncertain_below"]:
        top2 = sorted(probs, key=probs.get, reverse=True)[:2]  # as the table beside it gives them
        st.warning(f"**Uncertain — refer to a specialist.** No class reaches {lm.diagnosis['uncertain_below']:.0%}; the "
                   f"most likely are {', '.join(f'{GROUP_NAMES[g]} {format_probability(probs[g])}' for g in top2)}.")
    else:
        st.info(f"**Most likely: {GROUP_NAMES[top]} ({top})**, probability {format_probability(probs[top])} "
                "(calibrated on cross-validation).")
    cv = lm.diagnosis["cross_validation"]["calibrated"]
    d1, d2 = st.columns([1, 2])
    with d1:
        st.table({"class": [f"{GROUP_NAMES[g]} ({g})" for g in GROUPS],
                  "probability": [format_probability(probs[g]) for g in GROUPS]})
        st.caption(f"Five-class accuracy in {cv['n']}-patient cross-validation {cv['accuracy']:.2f} "
                   f"({cv['accuracy_ci95'][0]:.2f}-{cv['accuracy_ci95'][1]:.2f}) on expert masks; see Training & metrics.")
    with d2:
        rng = lm.diagnosis["normal_ranges"]
        rows = []
        used = lm.diagnosis["classifier"].get("columns", list(FEATURES))  # what the diagnosis rests on
        for k in [k for k in ("lv_ef", "rv_ef", "rv_lv_ed", "myo_lv_ed", "thick_max_ed", "thick_cv_es", "thick_es_ed")
                  if k in used]:
            lo, hi = rng[k]
            val = res.diagnosis["features"][k]
            rows.append({"feature (from the model's segmentation)": FEATURES[k], "this study": feature_text(k, val),
                         "normal range (training NOR, 5-95 %)": f"{feature_text(k, lo)}-{feature_text(k, hi)}",
                         "vs normal range": "outside" if not lo <= val <= hi else "within"})
        st.table(rows)

alpha = st.slider("Overlay opacity", 0.0, 1.0, 0.4, 0.05, key=f"{NS}.alpha")
view = st.radio("Overlay", ["Grad-CAM", "Segmentation (RV, myocardium, LV cavity)"], horizontal=True,
                key=f"{NS}.view")
show_seg = view.startswith("Segmentation") and res.segmentation is not None
win, zoom, fx, fy = display_controls(NS, res.slices)
st.markdown("**Slices the model used** (the square of the image centred on the heart, base to apex), with the "
            "model's segmentation or its "
            "Grad-CAM map (each map scaled to its own maximum, so compare where, not how strongly, across slices):")
k = len(res.slices) // 2
for row, title in ((0, "End-diastole"), (1, "End-systole")):
    st.markdown(f"*{title}*")
    cols = st.columns(k)
    for j in range(k):
        i = row * k + j
        if show_seg:
            img, entries = label_overlay(res.slices[i], res.segmentation[i], alpha=alpha, window=win)
        else:
            img = heatmap_overlay(res.slices[i], res.heatmap[i], alpha, window=win)
        cols[j].image(zoom_view(np.rot90(img), zoom, fx, fy), caption=res.slice_labels[i], width="stretch")
if show_seg:
    legend(entries)
st.caption("The cardiac model was trained on ACDC (80 patients, 16 of them normal); see Training & metrics for its "
           "cross-validated figures.")
