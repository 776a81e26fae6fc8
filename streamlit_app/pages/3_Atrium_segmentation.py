"""Left-atrium segmentation of a 3D MRI: slice viewer in radiological orientation with predicted/true
overlays, a per-slice Dice and uncertainty strip, the quality verdict, and the volume when it holds."""
from __future__ import annotations

import logging

import numpy as np
import streamlit as st

from common import (DISCLAIMER, FOREGROUND, ThrottledProgress, display_controls, file_key, legend, model_or_stop,
                    pick_sample, report_button, reset_namespace, run_safely, training_case_of, training_notice,
                    warm_up_in_background, weights_or_stop)
from core import metrics as M
from core.dicom_series import read_volume_any
from core.io import nifti_to_bytes, read_mask
from core.visualize import PLANES, mask_overlay, middle_slice, radiological_axial, radiological_slice, slice_strip

NS = "atr"
st.set_page_config(page_title="Left-atrium segmentation", page_icon="🫀", layout="wide")
st.title("Left-atrium segmentation (3D MRI)")
st.caption(DISCLAIMER)
# the model (and torch under it) loads in the background while the user picks a file: the page does not wait
weights_or_stop("atrium")
warm_up_in_background("atrium")
st.caption("Trained on bSSFP MRI (MSD Task02_Heart, King's College London) and LGE-MRI (2018 Atrial Segmentation "
           "Challenge, Utah) of adults. Other sequences and centres are untested; a quality check withholds the "
           "volume when the mask is implausible or the model is unsure.")

c1, c2, c3 = st.columns(3)
with c1:
    up_img = st.file_uploader("3D MRI volume (NIfTI .nii/.nii.gz, or a DICOM series as one .zip)",
                              type=["nii", "gz", "zip"], key=f"{NS}.img")
with c2:
    up_mask = st.file_uploader("Optional: its ground-truth left-atrium mask (NIfTI)", type=["nii", "gz"],
                               key=f"{NS}.mask")
with c3:
    sample = pick_sample("atrium", NS, disabled=up_img is not None)

img_bytes = mask_bytes = None
if up_img is not None:
    img_bytes, name = up_img.getvalue(), up_img.name
    mask_bytes = up_mask.getvalue() if up_mask is not None else None
    if sample is not None:
        st.caption("The uploaded file is used; the sample selection is ignored while an upload is present.")
elif sample is not None:
    img_bytes, name = sample.files["image"].read_bytes(), f"sample {sample.name}"
    mask_bytes = sample.files["mask"].read_bytes() if "mask" in sample.files else None
    st.caption(f"Sample: {sample.name} — {sample.note}")
elif up_mask is not None:
    st.info("Upload the image volume too: the mask alone cannot be segmented.")
    st.stop()
else:
    st.info("Upload a 3D MRI volume (and optionally its mask), or pick a sample case.")
    st.stop()


def show_scan_preview(data_c: np.ndarray, name: str) -> None:
    """The middle axial slice of a canonical (X, Y, Z) volume, as the viewer will draw it, before any mask."""
    from core.visualize import grey_rgb, percentile_window, with_orientation_markers

    k = data_c.shape[2] // 2
    left, _ = st.columns([3, 2])
    left.image(with_orientation_markers(grey_rgb(radiological_axial(data_c[:, :, k]), percentile_window(data_c))),
               caption=f"{name} — axial slice {k + 1} of {data_c.shape[2]} as loaded; segmenting the left atrium…",
               width="stretch")


from core import atrium as A  # noqa: E402  (torch: after the uploaders)
from core.atrium import segment_atrium  # noqa: E402

# Segmentation depends on the image only: adding or changing the mask recomputes the metrics, not the mask.
seg_key = file_key(img_bytes)
if st.session_state.get(f"{NS}.key") != seg_key:
    reset_namespace(NS, keep=(f"{NS}.img", f"{NS}.mask", f"{NS}.sample"))
    vol = run_safely(lambda: read_volume_any(img_bytes, "image"), "The volume cannot be used")
    if vol is None:
        st.stop()
    canon = run_safely(lambda: A.to_canonical(vol.data, vol.affine, vol.spacing), "The volume cannot be used")
    if canon is None:
        st.stop()
    data_c, sp_c, orient = canon
    bar = ThrottledProgress("Segmenting slices…")
    # the scan is shown while the model works (seconds on a CPU): one sees at once which file was taken
    preview = st.empty()
    with preview.container():
        try:
            show_scan_preview(data_c, name)
        except Exception as exc:  # noqa: BLE001 - a courtesy, not a result: the segmentation reports what is wrong
            logging.getLogger("medimg.app").warning("scan preview not drawn: %s", type(exc).__name__)
    # the model is asked for after the preview: just after the server starts it may still be loading (~1.5 s);
    # if it cannot be started, no "segmenting…" stays beside the reason
    lm = model_or_stop("atrium", before_stop=lambda: (bar.empty(), preview.empty()))
    with FOREGROUND:
        res = run_safely(lambda: segment_atrium(lm, vol, progress=bar),
                         "The volume could not be segmented")
    bar.empty()
    preview.empty()
    if res is None:
        st.stop()
    st.session_state.update({
        f"{NS}.key": seg_key, f"{NS}.vol": vol, f"{NS}.res": res, f"{NS}.name": name,
        f"{NS}.canon": (data_c, sp_c, A.to_canonical(res.mask, vol.affine, vol.spacing)[0],
                        A.to_canonical(res.prob, vol.affine, vol.spacing)[0]),
    })

lm = model_or_stop("atrium")
vol = st.session_state[f"{NS}.vol"]
res = st.session_state[f"{NS}.res"]
name = st.session_state[f"{NS}.name"]
data_c, sp_c, mask_c, prob_c = st.session_state[f"{NS}.canon"]

mask_key = file_key(mask_bytes) if mask_bytes is not None else None
if st.session_state.get(f"{NS}.mask_key", "none") != mask_key:
    gt = gt_c = mets = None
    if mask_bytes is not None:
        gt = run_safely(lambda: read_mask(mask_bytes, vol, "mask"), "The mask was refused")
        if gt is not None:
            gt_c = A.to_canonical(gt, vol.affine, vol.spacing)[0]
            mets = M.segmentation_metrics(res.mask, gt, vol.spacing)
    st.session_state.update({f"{NS}.mask_key": mask_key, f"{NS}.gt_c": gt_c, f"{NS}.metrics": mets,
                             # per plane (its axis), computed when the plane is first shown, once per mask:
                             # (Dice, disagreement) per slice, and the strip drawn after the slice image (a
                             # slice change only moves its marker)
                             f"{NS}.agree": {}, f"{NS}.strip": {},
                             # a mask just given is shown; none: the switch is off (and disabled)
                             f"{NS}.show_gt": gt_c is not None})
gt_c = st.session_state[f"{NS}.gt_c"]
mets = st.session_state[f"{NS}.metrics"]

st.markdown(f"**Result for: {name}**")
# filled at the end of the run: the training-case fingerprint (~0.1-0.2 s) need not hold back the slice image
notice_slot = st.empty()
q = res.quality
if res.reliable:
    st.success(f"Left-atrium volume (predicted): **{res.volume_ml:.1f} mL** — quality check passed.")
else:
    st.warning("**No reliable segmentation was found**, so no volume is reported: "
               + "; ".join(q.reasons) + ". The model's mask is still shown below for inspection only.")
m1, m2, m3, m4 = st.columns(4)
m1.metric("Left-atrium volume (predicted)", f"{res.volume_ml:.1f} mL" if res.reliable else "withheld",
          help=f"voxel size {res.spacing[0]:.2f} x {res.spacing[1]:.2f} x {res.spacing[2]:.2f} mm from the header")
if mets:
    m2.metric("3D Dice", f"{mets['dice']:.3f}")
    m3.metric("IoU", f"{mets['iou']:.3f}")
    m4.metric("HD95", f"{mets['hd95_mm']:.1f} mm" if np.isfinite(mets["hd95_mm"]) else "n/a")
    st.caption(f"True volume {mets['volume_ml_true']:.1f} mL; volume error {mets['volume_error_pct']:+.1f} %.")
else:
    st.caption("Upload the ground-truth mask to see Dice, IoU and HD95.")


# Axial by default; coronal and sagittal too, as a radiologist pages through a 3D study. The planes come from
# the header, which some converted datasets get wrong (the MSD Task02_Heart files call their sagittal slices
# axial): with all three at hand the reader finds the anatomy whatever the header says.
plane = PLANES[st.radio("Plane (as the file's header gives it)", list(PLANES), format_func=str.capitalize,
                        horizontal=True, key=f"{NS}.plane",
                        help="If the anatomy does not match the plane's name and markers, the file's header "
                             "orientation is wrong; the volume and Dice do not depend on it.")]
ax = plane.axis
n_ax = data_c.shape[ax]
# the slider's key per plane ("atr.z" for axial); the position of a plane not shown in a run is kept aside
# (its slider's state is dropped when it is not drawn) and restored when the plane comes back
zkey = f"{NS}.z" if ax == 2 else f"{NS}.z{ax}"
pos = st.session_state.setdefault(f"{NS}.pos", {})
if zkey not in st.session_state:
    # where it was, else the middle of the predicted mask across this plane; the slider counts from 1
    st.session_state[zkey] = pos[ax] if ax in pos else middle_slice(mask_c, ax) + 1
agree = st.session_state[f"{NS}.agree"]
if gt_c is not None and ax not in agree:
    agree[ax] = A.slice_agreement(mask_c, gt_c, sp_c, axis=ax)
per_slice, disagree = agree.get(ax, (None, None))


def _step(delta: int) -> None:
    st.session_state[zkey] = int(np.clip(st.session_state[zkey] + delta, 1, n_ax))


def _worst() -> None:
    # the slice with the largest area of disagreement (false positive + false negative), not the lowest
    # slice Dice: an edge slice with a few stray pixels has Dice 0 but matters little
    st.session_state[zkey] = int(np.argmax(disagree)) + 1


b1, b2, b3, _ = st.columns([1, 1, 2, 4])
b1.button("◀ Previous", on_click=_step, args=(-1,), key=f"{NS}.prev")
b2.button("Next ▶", on_click=_step, args=(1,), key=f"{NS}.next")
if disagree is not None and disagree.max() > 0:
    b3.button("Jump to largest disagreement", on_click=_worst, key=f"{NS}.worst")
z = st.slider(f"{plane.name.capitalize()} slice ({plane.order}, from the file's header)", 1, n_ax, key=zkey) - 1
pos[ax] = z + 1

t1, t2, t3 = st.columns(3)
show_pred = t1.toggle("Show predicted mask", value=True, key=f"{NS}.show_pred")
show_gt = t2.toggle("Show ground-truth mask", key=f"{NS}.show_gt", disabled=gt_c is None)  # set with the mask
show_gt = show_gt and gt_c is not None
lo, hi = A.UNCERTAIN_BAND
show_unsure = t3.toggle("Show where the model is unsure", value=False, key=f"{NS}.show_unsure",
                        help=f"Hatched where the model's probability is between {lo:g} and {hi:g}: the pixels the "
                             "uncertain area per slice counts.")

win, zoom, fx, fy = display_controls(NS, data_c)
p_slice = radiological_slice(prob_c, plane, z).astype(np.float32) if show_unsure else None
img, entries = mask_overlay(radiological_slice(data_c, plane, z), radiological_slice(mask_c, plane, z),
                            radiological_slice(gt_c, plane, z) if gt_c is not None else None, show_pred, show_gt,
                            window=win, unsure=None if p_slice is None else (p_slice > lo) & (p_slice < hi),
                            unsure_label=f"model unsure (probability {lo:g}-{hi:g}), hatched")
left, right = st.columns([3, 2])
with left:
    from core.visualize import plane_pixel_mm, square_pixels, with_orientation_markers, zoom_view

    st.image(with_orientation_markers(square_pixels(zoom_view(img, zoom, fx, fy), *plane_pixel_mm(sp_c, plane)),
                                      plane.markers),
             caption=f"{name} — {plane.name} slice {z + 1} of {n_ax}" + (f", zoom {zoom:g}x" if zoom > 1 else ""),
             width="stretch")
    legend(entries)
    st.caption(f"{plane.name.capitalize()} slices in the radiological view: {plane.layout} (plane and "
               "R/L/A/P/S/I markers from the file's header orientation).")
with right:
    area = np.take(mask_c, z, axis=ax).sum() * float(np.prod(plane_pixel_mm(sp_c, plane))) / 100
    unsure_by_plane = st.session_state.setdefault(f"{NS}.unsure", {})
    if ax not in unsure_by_plane:
        # per-slice uncertain area: once per segmentation and plane (not on every slider move), after the slice
        # image is drawn (~40 ms over a 256x256x130 volume that need not delay it)
        unsure_by_plane[ax] = A.slice_uncertainty_cm2(prob_c.astype(np.float32), sp_c, axis=ax)
    unsure = unsure_by_plane[ax]
    st.markdown(f"**Slice {z + 1}/{n_ax}**: predicted atrium area {area:.1f} cm²; uncertain area {unsure[z]:.1f} cm²")
    if per_slice is not None:
        d = per_slice[z]
        st.markdown(f"Slice Dice: **{d:.3f}**" if np.isfinite(d) else "Slice Dice: n/a (no atrium in either mask)")
    strips = st.session_state[f"{NS}.strip"]
    if ax not in strips:
        strips[ax] = slice_strip(unsure, per_slice, xlabel=f"{plane.name} slice")
    # a still image, not an interactive chart: the browser redraws it at once on every slice change
    st.image(strips[ax].marked(z), width="stretch",
             caption=("Dice per slice and " if per_slice is not None else "") + "uncertain area per slice; the red "
             "line marks the slice shown")

if f"{NS}.training_case" not in st.session_state:  # once per segmentation (reset_namespace clears it)
    st.session_state[f"{NS}.training_case"] = training_case_of(lm, vol.data)
train_case = st.session_state[f"{NS}.training_case"]
with notice_slot:
    training_notice(train_case)

with st.expander("Quality check: the measures behind the verdict"):
    mm = q.measures
    r = A.rule_for(mm, lm.card)  # a wide volume's three fused views are judged by their own limits
    bright = mm.get("mask_brightness")
    # the check reads the 2D model's uncertainty: the 3D refiner sharpens wrong masks' probabilities too (the
    # hatching and the strip show the refined probabilities)
    unsure_row = "uncertain voxels / mask voxels"
    if lm.refiner is not None:
        unsure_row += " (the 2D model's, before the 3D refiner)"
    st.table({"measure": ["volume (mL)", "share of the raw mask in the largest piece", unsure_row,
                          "agreement between slice directions (Dice)", "smallest field of view (mm)",
                          "share of the scan darker than the segmented region (blood is bright)"],
              "value": [f"{mm['volume_ml']:.1f}", f"{mm['kept_fraction']:.2f}", f"{mm['uncertain_ratio']:.2f}",
                        f"{mm['view_agreement']:.2f}", f"{mm['min_extent_mm']:.0f}",
                        "-" if bright is None else f"{bright:.2f}"],
              "accepted": [f"{r.volume_range_ml[0]:.0f}-{r.volume_range_ml[1]:.0f}", f">= {r.min_kept_fraction:.2f}",
                           f"<= {r.max_uncertain_ratio:.2f}", f">= {r.min_view_agreement:.2f}",
                           f">= {r.min_extent_mm:.0f}", f">= {r.min_mask_brightness:.2f}"]})

from core.case_report import atrium_report, case_stem, render_pdf, with_training_note  # noqa: E402

# encoded when clicked (gzip of a whole volume costs time the page need not wait for)
st.download_button("Download predicted mask (NIfTI, input's grid and affine)",
                   data=lambda: nifti_to_bytes(res.mask, vol.affine), on_click="ignore",
                   file_name=f"{case_stem(name)}_left_atrium_mask.nii.gz", mime="application/gzip",
                   key=f"{NS}.download_btn")
report_button(lambda: render_pdf(with_training_note(atrium_report(res, data_c, mask_c, name, mets, gt_c, sp_c), train_case),
                                 lm.card), name, NS)

# A DICOM series in, a DICOM Segmentation out (what a PACS viewer overlays on the source series): made on request
# (about 1 s for 130 slices), through run_safely, so that a series lacking what a Segmentation must copy from it
# gets a message in words rather than a failed download.
from core.dicom_series import is_zip  # noqa: E402

if img_bytes is not None and is_zip(img_bytes):
    if not res.reliable:
        st.caption("No DICOM Segmentation is offered while the quality check withholds the mask.")
    else:
        seg_key = f"{NS}.seg_file"
        if st.session_state.get(seg_key) is None and st.button(
                "Make a DICOM Segmentation of the mask (for a PACS viewer)", key=f"{NS}.make_seg"):
            from core import pacs as P

            with st.spinner("Making the DICOM Segmentation…"):
                st.session_state[seg_key] = run_safely(lambda: P.segmentation_file(img_bytes, res.mask, lm.card),
                                                       "The DICOM Segmentation could not be made")
        if st.session_state.get(seg_key) is not None:
            st.download_button("Download the DICOM Segmentation (.dcm)", data=st.session_state[seg_key],
                               on_click="ignore", file_name=f"{case_stem(name)}_left_atrium_seg.dcm",
                               mime="application/dicom", key=f"{NS}.seg_download")
