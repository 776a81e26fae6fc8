"""Home: what the app does and does not do, the three modules at a glance."""
from __future__ import annotations

import streamlit as st

from common import DISCLAIMER, figure_line, warm_up_in_background

st.set_page_config(page_title="MedImg – diagnosis research app", page_icon="🩺", layout="wide")

# the models start loading before Home is drawn, not at its end: a user who opens a module at once ends this run
# early (a link, another tab), and the loading then began only with that module's page, so the first X-ray's
# verdict waited for torch's import. Home drawn while they load (the first visit after a server start) comes about
# 0.3-0.8 s later (docs/speed.md)
warm_up_in_background()

st.title("MedImg: medical image diagnosis (research)")
st.warning(DISCLAIMER)
st.markdown(
    "Three independent modules, each a model trained on public data and checked on patients it did not see. "
    "Every figure shown comes from files the training and evaluation code wrote."
)

MODULES = [
    ("pneumonia", "pages/1_Pneumonia.py", "Pneumonia (chest X-ray)",
     "P(pneumonia) from one frontal chest radiograph (PNG, JPEG, DICOM), with a Grad-CAM heatmap."),
    ("cardiac", "pages/2_Cardiac.py", "Cardiac disease (cine MRI)",
     "Normal vs disease (DCM, HCM, previous MI, abnormal RV) and the most likely of the five classes, from the ED "
     "and ES frames of a short-axis cine study or from one 4D cine, NIfTI or a DICOM series as .zip (ED and ES "
     "found from the LV cavity curve); LV and RV volumes in mL and the LV mass when the file's voxel size is a cine "
     "stack's."),
    ("atrium", "pages/3_Atrium_segmentation.py", "Left-atrium segmentation (3D MRI)",
     "Left-atrium mask of a 3D MRI volume (NIfTI or a DICOM series as .zip; bSSFP or LGE, any slice plane), its volume in mL when a quality check "
     "passes, and Dice/HD95 against a ground-truth mask."),
]
for task, page, title, desc in MODULES:
    with st.container(border=True):
        st.subheader(title)
        st.write(desc)
        st.caption(figure_line(task))
        st.page_link(page, label=f"Open {title}", icon=":material/arrow_forward:")

st.page_link("pages/4_Training_and_metrics.py", label="Training curves and metric tables", icon=":material/monitoring:")
st.page_link("pages/5_PACS.py", label="Open a study from a PACS (DICOMweb) and send the result back", icon=":material/lan:")

st.subheader("Where the models and data came from")
st.markdown(
    "- **Chest X-rays**: Kermany et al., Cell 2018 (Guangzhou paediatric radiographs, CC BY 4.0). "
    "Intended population: frontal radiographs of children aged about 1-5; adult radiographs, lateral views and "
    "other images are withheld by a population check.\n"
    "- **Cine MRI**: ACDC, Bernard et al., IEEE TMI 2018 (research, non-commercial use).\n"
    "- **Left atrium**: Medical Segmentation Decathlon Task02_Heart, King's College London (bSSFP, CC BY-SA 4.0), "
    "and the 2018 Atrial Segmentation Challenge, University of Utah (LGE-MRI, research use).\n\n"
    "Models are small CNNs and U-Nets trained from scratch (no pretrained weights). Validation splits are by "
    "patient; the official test sets were not available, so these are validation figures, not test figures. "
    "Uploaded files are processed in memory and never stored."
)
