"""Left-atrium segmentation of a 3D MRI: slice viewer with predicted/true overlays, Dice, volume."""
from __future__ import annotations

import numpy as np
import streamlit as st

from common import (DISCLAIMER, file_key, legend, model_or_stop, reset_namespace, run_safely,
                    pick_sample)
from core import metrics as M
from core.inference import segment_atrium
from core.io import nifti_to_bytes, read_image_volume, read_mask
from core.visualize import mask_overlay, to_display

NS = "atr"
st.set_page_config(page_title="Left-atrium segmentation", page_icon="🫀", layout="wide")
st.title("Left-atrium segmentation (3D MRI)")
st.caption(DISCLAIMER)
lm = model_or_stop("atrium")

c1, c2, c3 = st.columns(3)
with c1:
    up_img = st.file_uploader("3D MRI volume (NIfTI .nii or .nii.gz)", type=["nii", "gz"], key=f"{NS}.img")
with c2:
    up_mask = st.file_uploader("Optional: its ground-truth left-atrium mask (NIfTI)", type=["nii", "gz"],
                               key=f"{NS}.mask")
with c3:
    sample = pick_sample("atrium", NS)

img_bytes = mask_bytes = None
if up_img is not None:
    img_bytes = up_img.getvalue()
    mask_bytes = up_mask.getvalue() if up_mask is not None else None
elif sample is not None:
    img_bytes = sample.files["image"].read_bytes()
    mask_bytes = sample.files["mask"].read_bytes() if "mask" in sample.files else None
elif up_mask is not None:
    st.info("Upload the image volume too: the mask alone cannot be segmented.")
    st.stop()
else:
    st.info("Upload a 3D MRI volume (and optionally its mask), or pick a sample case.")
    st.stop()

key = file_key(img_bytes, mask_bytes or b"")
if st.session_state.get(f"{NS}.key") != key:
    reset_namespace(NS, keep=(f"{NS}.img", f"{NS}.mask", f"{NS}.sample", f"{NS}.show_pred", f"{NS}.show_gt"))
    vol = run_safely(lambda: read_image_volume(img_bytes, "image"), "The volume cannot be used")
    if vol is None:
        st.stop()
    gt = None
    if mask_bytes is not None:
        gt = run_safely(lambda: read_mask(mask_bytes, vol, "mask"), "The mask was refused")
        if gt is None:
            st.stop()
    bar = st.progress(0.0, text="Segmenting slices…")
    res = run_safely(lambda: segment_atrium(lm, vol, progress=lambda f: bar.progress(f, text=f"Segmenting slices… {f:.0%}")),
                     "Segmentation failed")
    bar.empty()
    if res is None:
        st.stop()
    st.session_state[f"{NS}.key"] = key
    st.session_state[f"{NS}.vol"] = vol
    st.session_state[f"{NS}.gt"] = gt
    st.session_state[f"{NS}.res"] = res
    st.session_state[f"{NS}.per_slice"] = M.per_slice_dice(res.mask, gt) if gt is not None else None
    st.session_state[f"{NS}.metrics"] = M.segmentation_metrics(res.mask, gt, vol.spacing) if gt is not None else None
    st.session_state[f"{NS}.download"] = nifti_to_bytes(res.mask, vol.affine)
    zs = np.nonzero(res.mask.any(axis=(0, 1)))[0]
    # the slider counts slices from 1, as a viewer does
    st.session_state[f"{NS}.z"] = int(zs[len(zs) // 2]) + 1 if len(zs) else vol.data.shape[2] // 2 + 1

vol = st.session_state[f"{NS}.vol"]
gt = st.session_state[f"{NS}.gt"]
res = st.session_state[f"{NS}.res"]
per_slice = st.session_state[f"{NS}.per_slice"]
mets = st.session_state[f"{NS}.metrics"]
nz = vol.data.shape[2]

m1, m2, m3, m4 = st.columns(4)
m1.metric("Left-atrium volume (predicted)", f"{res.volume_ml:.1f} mL",
          help=f"voxel size {res.spacing[0]:.2f} x {res.spacing[1]:.2f} x {res.spacing[2]:.2f} mm from the header")
if mets:
    m2.metric("3D Dice", f"{mets['dice']:.3f}")
    m3.metric("IoU", f"{mets['iou']:.3f}")
    m4.metric("HD95", f"{mets['hd95_mm']:.1f} mm" if np.isfinite(mets["hd95_mm"]) else "n/a")
    st.caption(f"True volume {mets['volume_ml_true']:.1f} mL; volume error {mets['volume_error_pct']:+.1f} %.")
else:
    st.caption("Upload the ground-truth mask to see Dice, IoU and HD95.")


def _step(delta: int) -> None:
    st.session_state[f"{NS}.z"] = int(np.clip(st.session_state[f"{NS}.z"] + delta, 1, nz))


def _worst() -> None:
    ps = np.where(np.isnan(per_slice), np.inf, per_slice)
    st.session_state[f"{NS}.z"] = int(np.argmin(ps)) + 1


b1, b2, b3, _ = st.columns([1, 1, 2, 4])
b1.button("◀ Previous", on_click=_step, args=(-1,), key=f"{NS}.prev")
b2.button("Next ▶", on_click=_step, args=(1,), key=f"{NS}.next")
if per_slice is not None and np.isfinite(per_slice).any():
    b3.button("Jump to worst slice", on_click=_worst, key=f"{NS}.worst")
z = st.slider("Slice", 1, nz, key=f"{NS}.z") - 1

t1, t2 = st.columns(2)
show_pred = t1.toggle("Show predicted mask", value=True, key=f"{NS}.show_pred")
show_gt = t2.toggle("Show ground-truth mask", value=True, key=f"{NS}.show_gt", disabled=gt is None)

img, entries = mask_overlay(to_display(vol.data[:, :, z]), to_display(res.mask[:, :, z]),
                            to_display(gt[:, :, z]) if gt is not None else None, show_pred, show_gt)
left, right = st.columns([3, 2])
with left:
    st.image(img, caption=f"Slice {z + 1} of {nz}", width="stretch")
    legend(entries)
with right:
    area = res.mask[:, :, z].sum() * res.spacing[0] * res.spacing[1] / 100
    st.markdown(f"**Slice {z + 1}/{nz}**: predicted atrium area {area:.1f} cm²")
    if per_slice is not None:
        d = per_slice[z]
        st.markdown(f"Slice Dice: **{d:.3f}**" if np.isfinite(d) else "Slice Dice: n/a (no atrium in either mask)")
        import plotly.graph_objects as go

        fig = go.Figure(go.Scatter(x=np.arange(1, nz + 1), y=per_slice, mode="lines+markers", name="Dice"))
        fig.add_vline(x=z + 1, line_color="red")
        fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), title="Dice per slice",
                          xaxis_title="slice", yaxis_range=[0, 1.05])
        st.plotly_chart(fig, key=f"{NS}.dice_plot")

st.download_button("Download predicted mask (NIfTI, input's affine)", data=st.session_state[f"{NS}.download"],
                   file_name="left_atrium_mask.nii.gz", mime="application/gzip", key=f"{NS}.download_btn")
