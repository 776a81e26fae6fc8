"""Open a study from a PACS (DICOMweb), run the module its series needs, and send the result back into the
same study (Secondary Capture; for the atrium also a DICOM Segmentation). Everything stays in memory."""
from __future__ import annotations

import os

import streamlit as st

from common import DISCLAIMER, get_model, report_button, run_safely
from core import pacs as P
from core.tasks import TASKS

NS = "pacs"
st.set_page_config(page_title="PACS (DICOMweb)", page_icon="🗄️", layout="wide")
st.title("Open a study from a PACS")
st.caption(DISCLAIMER)
st.caption("Lists the studies of a DICOMweb server (QIDO-RS), opens one series (WADO-RS) and runs the module it "
           "needs: a chest radiograph (CR/DX) goes to the pneumonia model, a 3D MR series to the left-atrium model, "
           "an MR cine series to the cardiac model. The result can be stored back into the same study (STOW-RS) as "
           "new series; the source images are never changed.")

default_url = os.environ.get(P.ENV_URL, "")
url = st.text_input("DICOMweb address of the PACS", value=default_url, key=f"{NS}.url",
                    help=f"Set {P.ENV_URL} for the server to open with; credentials, if the server needs them, "
                         f"come from {P.ENV_USER} and {P.ENV_PASSWORD} and are never typed here.")
if not url.strip():
    st.info(f"No PACS is configured. Type the DICOMweb address of your server above (for Orthanc: "
            f"http://HOST:8042/dicom-web), or start the app with {P.ENV_URL} set.")
    st.stop()
cfg = run_safely(lambda: P.PacsConfig(url, os.environ.get(P.ENV_USER) or None,
                                      os.environ.get(P.ENV_PASSWORD) or None), "PACS address")
if cfg is None:
    st.stop()
pacs = P.Pacs(cfg)
studies = run_safely(lambda: P.list_studies(pacs), "Listing the studies")
if studies is None:
    st.stop()
if not studies:
    st.info("The PACS holds no studies.")
    st.stop()

st.dataframe([{"Date": P.display_date(r["date"]), "Patient ID": r["patient_id"],
               "Patient": P.display_name(r["patient_name"]), "Description": r["description"],
               "Modalities": r["modalities"], "Series": r["series"], "Images": r["instances"]} for r in studies],
             hide_index=True, width="stretch")


def _study_label(i: int) -> str:
    r = studies[i]
    return f"{P.display_date(r['date']) or 'no date'} · {r['patient_id'] or 'no ID'} · " \
           f"{r['description'] or 'no description'} · {r['modalities']}"


si = st.selectbox("Study", range(len(studies)), format_func=_study_label, key=f"{NS}.study")
study_uid = studies[si]["study_uid"]
series = run_safely(lambda: P.list_series(pacs, study_uid), "Listing the study's series")
if not series:
    if series == []:
        st.info("This study holds no series.")
    st.stop()


def _series_label(i: int) -> str:
    r = series[i]
    return f"{r['modality']} · series {r['number'] or '?'} · {r['description'] or 'no description'} · " \
           f"{r['instances']} image(s)"


ri = st.selectbox("Series", range(len(series)), format_func=_series_label, key=f"{NS}.series")
chosen = series[ri]
case_name = f"{P.display_date(studies[si]['date'])} series {chosen['number'] or '?'} {chosen['description']}".strip()

if st.button("Open and analyse this series", type="primary", key=f"{NS}.open"):
    from core.precision import flush_subnormals

    flush_subnormals()  # this run's model calls: see streamlit_app/common.py, model_or_stop
    st.session_state.pop(f"{NS}.stored", None)
    with st.spinner("Fetching the series and running the model…"):
        dss = run_safely(lambda: P.fetch_series(pacs, study_uid, chosen["series_uid"]), "Fetching the series")
        res = run_safely(lambda: P.run_series(get_model, dss, case_name), "Analysis") if dss is not None else None
    st.session_state[f"{NS}.result"] = (chosen["series_uid"], res) if res is not None else None

held = st.session_state.get(f"{NS}.result")
if held is None or held[0] != chosen["series_uid"]:
    st.stop()
res = held[1]
an = res.analysis
st.subheader(f"{TASKS[res.task].title}: {case_name}")
status = an.row.get("status")
headline = an.report.headline if an.report is not None else an.row.get("finding", "")
if status == "ok":
    st.info(headline, icon=":material/stethoscope:")
else:
    st.warning(headline + (f" {an.row['message']}" if an.row.get("message") and an.row["message"] not in headline
                           else ""), icon="⚠️")
if an.report is not None and an.report.figures:
    st.table({"measure": [k for k, _ in an.report.figures], "value": [v for _, v in an.report.figures]})
st.image(res.outgoing[0].pixel_array, caption="The result as it is stored back (Secondary Capture)", width=720)
if an.report is not None:
    from core.case_report import render_pdf

    report_button(lambda: render_pdf(an.report, get_model(res.task).card), case_name, NS)

kinds = " and ".join(f"{'a DICOM Segmentation' if ds.Modality == 'SEG' else 'a Secondary Capture'}"
                     for ds in res.outgoing)
if st.button(f"Send the result to the PACS ({kinds}, into this study)", key=f"{NS}.send"):
    uids = run_safely(lambda: P.store(pacs, res.outgoing), "Storing the result")
    if uids is not None:
        st.session_state[f"{NS}.stored"] = (chosen["series_uid"], uids)
stored = st.session_state.get(f"{NS}.stored")
if stored is not None and stored[0] == chosen["series_uid"]:
    st.success(f"Stored {len(stored[1])} new instance(s) in the study: "
               + "; ".join(f"{ds.SeriesDescription} (series {ds.SeriesNumber})" for ds in res.outgoing))
