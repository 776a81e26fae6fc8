"""Every page with streamlit.testing.v1.AppTest: loads without exception; a sample case gives a result."""
from __future__ import annotations

import re

import pytest
from streamlit.testing.v1 import AppTest

from core.config import PROJECT_ROOT

APP = PROJECT_ROOT / "streamlit_app"
TIMEOUT = 120


def _page(name: str) -> AppTest:
    at = AppTest.from_file(str(APP / name), default_timeout=TIMEOUT)
    return at.run()


def _text(at: AppTest) -> str:
    parts = [m.value for m in at.markdown] + [e.value for e in at.error] + [s.value for s in at.success]
    parts += [f"{m.label} {m.value}" for m in at.metric] + [c.value for c in at.caption] + [i.value for i in at.info]
    return "\n".join(parts)


def _report_buttons(at: AppTest) -> int:
    """Download buttons of a PDF case report on the page."""
    return sum("case report" in str(getattr(b, "proto", b)) for b in at.get("download_button"))


def _images(at: AppTest) -> int:
    return len(at.get("image"))


@pytest.mark.parametrize("page", ["Home.py", "pages/1_Pneumonia.py", "pages/2_Cardiac.py",
                                  "pages/3_Atrium_segmentation.py", "pages/4_Training_and_metrics.py",
                                  "pages/5_PACS.py"])
def test_page_loads(page):
    at = _page(page)
    assert not at.exception, at.exception


@pytest.mark.parametrize("page", ["pages/1_Pneumonia.py", "pages/2_Cardiac.py", "pages/3_Atrium_segmentation.py"])
def test_module_page_shows_its_uploader_before_loading_the_model(page, monkeypatch):
    """A module page does not wait for its model (torch, weights) before the user can pick a file."""
    import common

    def loading(task):
        raise AssertionError(f"the {task} model was loaded before any input was given")

    monkeypatch.setattr(common, "get_model", loading)
    at = _page(page)
    assert not at.exception, at.exception
    assert len(at.get("file_uploader")) >= 1


def test_home_shows_figures_and_disclaimer():
    at = _page("Home.py")
    text = "\n".join(w.value for w in at.warning) + _text(at)
    assert "not a medical device" in text
    assert "validation AUC" in text and "3D Dice" in text and "5-fold CV (all 80 patients)" in text
    assert "shift-aware" in text and "LGE" in text


def test_home_starts_loading_the_models_before_its_module_cards(monkeypatch):
    """A user who opens a module at once (a link, another tab) ends Home's run early: the models' background
    loading must have begun by then (it began at the end of Home, so the first X-ray waited for torch's import)."""
    import common

    calls = []
    monkeypatch.setattr(common, "warm_up_in_background", lambda *a: calls.append(a))

    def run_ended(task):  # Home's run stops while its module cards are drawn
        raise RuntimeError("run ended")

    monkeypatch.setattr(common, "figure_line", run_ended)
    at = _page("Home.py")
    assert at.exception  # the run did end early
    assert calls == [()]
    assert "not a medical device" in "\n".join(w.value for w in at.warning)


def test_pneumonia_sample_prediction(xray_root):
    at = _page("pages/1_Pneumonia.py")
    sample = next(o for o in at.selectbox(key="pneu.sample").options if "bacterial" in o)
    at.selectbox(key="pneu.sample").select(sample).run()
    assert not at.exception
    text = _text(at)
    assert "P(pneumonia)" in text and "%" in text
    assert "in the model's training data" not in text  # a validation image: no training-data notice
    assert _images(at) >= 2  # original + Grad-CAM overlay
    assert _report_buttons(at) == 1
    at.slider(key="pneu.alpha").set_value(0.8).run()
    assert not at.exception and _images(at) >= 2
    # the Training & metrics page gives the same decision threshold as this page (it gave the model's raw
    # 0.244 beside this page's calibrated 72.1 %)
    page_thr = re.search(r"decision threshold (\d+\.\d%)", text).group(1)
    metrics = _page("pages/4_Training_and_metrics.py")
    assert f"decision threshold **{page_thr}**" in _text(metrics)


def test_cardiac_sample_prediction(acdc_root):
    at = _page("pages/2_Cardiac.py")
    at.selectbox(key="card.sample").select_index(1).run()
    assert not at.exception
    assert "P(disease)" in _text(at)
    assert _images(at) >= 16  # 8 ED + 8 ES slices with Grad-CAM
    assert "LV ejection fraction (estimate)" in _text(at)
    # one ejection fraction per ventricle on the page, in one unit: the metric row and the five-class feature
    # table show the same value (it was 20 % beside 0.19 before)
    shown = {m.label: m.value for m in at.metric}
    rows = [r for t in at.table for r in t.value.to_dict("records")]
    for label, feature in (("LV ejection fraction (estimate)", "LV ejection fraction"),
                           ("RV ejection fraction (estimate)", "RV ejection fraction")):
        row = next(r for r in rows if str(r.get("feature (from the model's segmentation)", "")).startswith(feature))
        assert row["this study"] == shown[label] and shown[label].endswith("%")
        assert row["vs normal range"] in ("within", "outside")  # the column is named, and says "within" too
    # no probability reads as certainty ("100.0%", "0.0%"): such values show as "> 99.9%" / "< 0.1%"
    probs = [r["probability"] for r in rows if "probability" in r] + [shown["P(disease)"]]
    assert len(probs) == 6 and not any(re.fullmatch(r"(100|0)\.0%", p) for p in probs), probs
    assert not re.search(r"(?<![\d.])(100|0)\.0%", _text(at))
    _five_class_box_quotes_the_table(at)
    assert _report_buttons(at) == 1
    at.radio(key="card.view").set_value("Segmentation (RV, myocardium, LV cavity)").run()
    assert not at.exception and "left-ventricle cavity" in _text(at) and _images(at) >= 16


def test_cardiac_volumes_only_with_a_cine_stacks_voxel_size(acdc_root, monkeypatch):
    """The shared copy's 1 mm headers give no mL (the page says why); the same frames with a cine stack's voxel
    size give the volumes and the LV mass, each beside its validated agreement with expert masks."""
    at = _page("pages/2_Cardiac.py")
    at.selectbox(key="card.sample").select_index(1).run()
    assert not at.exception
    assert "No volumes in mL or LV mass in g: the file's slices are 1.00 mm apart" in _text(at)
    assert not any(" mL" in str(r.get("this study", "")) for t in at.table for r in t.value.to_dict("records"))

    from dataclasses import replace

    import core.io

    real = core.io.read_image_volume
    monkeypatch.setattr(core.io, "read_image_volume",
                        lambda data, *a, **k: replace(real(data, *a, **k), spacing=(1.5, 1.5, 10.0)))
    at = _page("pages/2_Cardiac.py")
    at.selectbox(key="card.sample").select_index(1).run()
    assert not at.exception
    rows = {r["quantity"]: r for t in at.table for r in t.value.to_dict("records") if "quantity" in r}
    edv, esv = (float(rows[q]["this study"].removesuffix(" mL")) for q in ("LV end-diastolic volume",
                                                                           "LV end-systolic volume"))
    assert edv > esv > 0 and rows["LV mass (myocardium at ED)"]["this study"].endswith(" g")
    assert rows["LV end-diastolic volume"]["model vs expert masks (validation)"].endswith("mean absolute difference")
    assert "No volumes in mL" not in _text(at)


def _five_class_box_quotes_the_table(at: AppTest) -> None:
    """The five-class verdict box quotes its probabilities as the table beside it gives them (an uncertain
    study's box said "47%" beside the table's 46.8%)."""
    probs = [r["probability"] for t in at.table for r in t.value.to_dict("records") if "probability" in r]
    box = next(x.value for x in list(at.info) + list(at.warning)
               if "Most likely:" in x.value or "No class reaches" in x.value)
    quoted = re.findall(r"(?:[<>] )?\d+\.\d%", box)
    assert quoted and set(quoted) <= set(probs), (box, probs)


def test_cardiac_five_class_box_for_a_dcm_sample(acdc_root):
    at = _page("pages/2_Cardiac.py")
    sel = at.selectbox(key="card.sample")
    sel.select(next(o for o in sel.options if "DCM" in o)).run()  # patient006: no class reaches 60 % here
    assert not at.exception
    _five_class_box_quotes_the_table(at)


def test_cardiac_no_plain_finding_when_the_two_models_disagree(acdc_root):
    """patient084 (abnormal RV, a validation patient): P(disease) from the 8-slice shape descriptors falls below the
    threshold while the five-class diagnosis says RV with > 90 %: the page must not read "the heart looks normal"."""
    at = _page("pages/2_Cardiac.py")
    sel = at.selectbox(key="card.sample")
    sel.select(next(o for o in sel.options if "patient084" in o)).run()
    assert not at.exception
    text = _text(at) + "\n".join(w.value for w in at.warning)
    assert "The two models disagree" in text and "abnormal right ventricle (RV)" in text
    assert "Finding: the heart looks normal" not in text


def test_atrium_sample_segmentation_and_slider(heart_root):
    at = _page("pages/3_Atrium_segmentation.py")
    at.selectbox(key="atr.sample").select_index(1).run()
    assert not at.exception
    text = _text(at)
    assert "mL" in text and "3D Dice" in text and "Slice Dice" in text
    # the scan drawn while the model worked has made way for the result: one slice image, with its mask
    captions = [m.caption for im in at.get("image") for m in im.proto.imgs]
    assert not any("segmenting" in c for c in captions) and sum("axial slice" in c for c in captions) == 1
    assert "training data: its Dice shows the fit" in text  # a sample the model trained on says so
    # and the input itself is recognised as a training volume (by fingerprint, as an upload would be)
    assert "This input is in the model's training data (la_" in text
    assert _report_buttons(at) == 1
    # the quality table shows the limits the verdict used: a wide bSSFP volume's three fused views have their own
    # (the single-view ones were shown until 2026-12-07)
    from core import atrium as A
    from core.checkpoint import read_card

    card = read_card("atrium")
    qt = next(t.value for t in at.table if "accepted" in t.value.columns)
    unsure = qt[qt["measure"] == "uncertain voxels / mask voxels (the 2D model's, before the 3D refiner)"]
    fused = A.QualityRule.from_card(card, fused=True).max_uncertain_ratio
    assert fused != A.QualityRule.from_card(card).max_uncertain_ratio
    assert unsure["accepted"].iloc[0] == f"<= {fused:.2f}"
    z0 = at.slider(key="atr.z").value
    at.button(key="atr.next").click().run()
    assert at.slider(key="atr.z").value == z0 + 1
    # the note is filled in after the slice image (it need not hold the image back) and stays on every rerun
    assert "This input is in the model's training data (la_" in _text(at)
    at.button(key="atr.worst").click().run()
    assert not at.exception
    at.toggle(key="atr.show_gt").set_value(False).run()
    assert "predicted atrium" in _text(at)
    # the other planes: their own slider, strip and markers; the axial position is kept while they are shown
    z_axial = at.slider(key="atr.z").value
    at.radio(key="atr.plane").set_value("sagittal").run()
    assert not at.exception
    captions = [m.caption for im in at.get("image") for m in im.proto.imgs]
    assert sum("sagittal slice" in c for c in captions) == 1
    assert "superior at the top, anterior on the image's left" in _text(at)
    z0 = at.slider(key="atr.z0").value
    assert at.slider(key="atr.z0").max == 256  # MSD volumes are 256 voxels along x
    at.button(key="atr.next").click().run()
    assert at.slider(key="atr.z0").value == z0 + 1 and "Slice Dice" in _text(at)
    at.radio(key="atr.plane").set_value("axial").run()
    assert at.slider(key="atr.z").value == z_axial
    assert "model unsure" not in _text(at)
    at.toggle(key="atr.show_unsure").set_value(True).run()
    assert not at.exception and "model unsure (probability 0.2-0.8), hatched" in _text(at)


def _image_bytes(at: AppTest) -> list[str]:
    """The media URLs of the images shown: each names a digest of the image's bytes."""
    return [m.url for im in at.get("image") for m in im.proto.imgs]


@pytest.mark.parametrize("page, sample_key", [("pages/1_Pneumonia.py", "pneu.sample"),
                                              ("pages/2_Cardiac.py", "card.sample"),
                                              ("pages/3_Atrium_segmentation.py", "atr.sample")])
def test_window_level_and_zoom_redraw_and_reset_with_a_new_case(page, sample_key, xray_root, acdc_root, heart_root):
    """Every viewer has window/level and zoom; changing them redraws, and a new case starts from the defaults
    (what the controls show is what the image is drawn with)."""
    ns = sample_key.split(".")[0]
    at = _page(page)
    at.selectbox(key=sample_key).select_index(1).run()
    assert not at.exception
    win = at.selectbox(key=f"{ns}.win")
    assert len(win.options) >= 3 and any("full range" in o for o in win.options)
    before = _image_bytes(at)
    at.slider(key=f"{ns}.zoom").set_value(2.0).run()
    at.selectbox(key=f"{ns}.win").set_value(len(win.options) - 1).run()  # custom level and width
    at.slider(key=f"{ns}.width").set_value(at.slider(key=f"{ns}.width").min).run()
    assert not at.exception, at.exception
    assert _image_bytes(at) != before
    at.selectbox(key=sample_key).select_index(2).run()
    assert not at.exception
    assert at.slider(key=f"{ns}.zoom").value == 1.0 and at.selectbox(key=f"{ns}.win").value == 0


def test_metrics_page_each_task():
    at = _page("pages/4_Training_and_metrics.py")
    for task in ("pneumonia", "cardiac", "atrium"):
        at.radio(key="metrics.task").set_value(task).run()
        assert not at.exception
        assert not _internal_column_names(at), task
        assert len(at.get("plotly_chart")) >= 2
        assert len(at.dataframe) >= 1
        if task == "cardiac":
            assert "Shape estimates against the expert masks" in _text(at)
            assert "Calibration of P(disease)" in _text(at)  # weights/cardiac.calibration.json matches
            assert "a perfectly calibrated classifier with these same probabilities" in _text(at)
            assert "Features left out" in _text(at)  # those the segmentation does not reproduce
            from core.cardiac import FEATURES

            assert not [k for k in FEATURES if k in _text(at)]  # features by name, not by their keys in the card
        if task == "atrium":
            assert "Cross-validation of the recipe" in _text(at) and "Quality check" in _text(at)
            assert "Inference setting" in _text(at) and "not left-atrium MRI" in _text(at)
            assert "Localiser" in _text(at)  # the card names one: the page says what it does
            assert "3D refiner" in _text(at)  # part of the mask: the page says what it does
            # the stress checks of the recipe (files in benchmarks/logs of a cross-validation fold's weights)
            labels = [e.label for e in at.expander]
            assert any(lb.startswith("Atrium acquisition check") for lb in labels), labels
            assert any(lb.startswith("Atrium layout check") for lb in labels), labels
            assert any("reported with Dice < 0.5" in str(t.value.columns.tolist()) for t in at.table)
        if task == "pneumonia":
            assert "Inference in this app: float32" in _text(at)  # the registry keeps the X-ray CNN in float32
            assert "Shift-aware validation" in _text(at)
        if spec_kind(task) == "binary":
            # the confusion matrix is a static table: both predicted columns are always on the page
            cm = next(t for t in at.table if "predicted" in " ".join(map(str, t.value.columns)))
            assert len(cm.value.columns) == 2
        else:
            assert "Inference in this app: " in _text(at)
        if task == "atrium":  # int8 with the committed activation ranges, except on AMX CPUs (core.precision)
            from core.precision import has_amx

            assert f"Inference in this app: {'bfloat16' if has_amx() else 'int8'}" in _text(at)


def _internal_column_names(at: AppTest) -> list[str]:
    """Column and index names of the page's tables written as code (snake_case, e.g. "hd95_mm") rather than
    words a reader knows."""
    import re

    names = []
    for t in [*at.table, *at.dataframe]:
        v = t.value
        names += [str(c) for c in v.columns] + [str(v.index.name)]
    return [n for n in names if re.fullmatch(r"[a-z0-9]+(_[a-z0-9]+)+", n)]


def spec_kind(task: str) -> str:
    from core.tasks import get_task

    return get_task(task).kind


def test_pneumonia_controls_reset_with_a_new_image_and_name_the_case(xray_root):
    at = _page("pages/1_Pneumonia.py")
    opts = at.selectbox(key="pneu.sample").options
    first = next(o for o in opts if "bacterial" in o)
    at.selectbox(key="pneu.sample").select(first).run()
    assert "Result for: " in _text(at)
    at.slider(key="pneu.alpha").set_value(0.9).run()
    at.selectbox(key="pneu.sample").select("—").run()  # back to no input: the slider is not drawn
    other = next(o for o in opts if o not in ("—", first))
    at.selectbox(key="pneu.sample").select(other).run()
    assert not at.exception
    if at.slider:  # a withheld image draws no heatmap controls
        assert at.slider(key="pneu.alpha").value == 0.4  # what it shows is what the image is drawn with
    assert other.split(" ")[0] in _text(at) or "Result for: " in _text(at)


def test_cardiac_swapped_frames_are_refused_then_swapped_back(acdc_root):
    at = _page("pages/2_Cardiac.py")
    at.selectbox(key="card.sample").select_index(1).run()
    assert "P(disease)" in _text(at) and "ED = `" in _text(at)
    at.session_state["card.swapped"] = True  # as if the user had uploaded ES as ED and ED as ES
    at.run()
    assert not at.exception
    assert any("look swapped" in e.value for e in at.error)
    assert "%" not in " ".join(m.value for m in at.metric)  # no ejection fraction or P shown
    at.button(key="card.swap").click().run()
    assert not at.exception and "P(disease)" in _text(at)


def test_cardiac_cine_mode_asks_for_one_4d_file(acdc_root):
    at = _page("pages/2_Cardiac.py")
    at.radio(key="card.mode").set_value("One 4D cine").run()
    assert not at.exception
    assert any("Upload a 4D cine NIfTI" in i.value for i in at.info)
    assert not at.get("file_uploader") or len(at.get("file_uploader")) == 1  # one box: the cine


def test_atrium_view_names_the_case_and_has_no_ground_truth_toggle_without_mask(heart_root):
    at = _page("pages/3_Atrium_segmentation.py")
    at.selectbox(key="atr.sample").select_index(1).run()
    assert "Result for: sample" in _text(at)
    assert "radiological view" in _text(at) and "R/L/A/P" in _text(at)
    assert at.toggle(key="atr.show_gt").value is True  # the sample has a mask: its overlay is on


def test_metrics_page_names_a_bad_precision_setting(monkeypatch, heart_root):
    monkeypatch.setenv("MEDIMG_PRECISION", "fp16")
    at = _page("pages/4_Training_and_metrics.py")
    assert not at.exception
    assert any("$MEDIMG_PRECISION is 'fp16'; use one of: auto, float32, bfloat16" in e.value for e in at.error)
    import streamlit as st

    st.cache_resource.clear()  # models are cached per process; start from none
    at = _page("pages/3_Atrium_segmentation.py")
    at.selectbox(key="atr.sample").select_index(1).run()  # the model is not loaded: the page says why, no stack trace
    st.cache_resource.clear()
    assert not at.exception
    assert any("cannot be started" in e.value and "MEDIMG_PRECISION" in e.value for e in at.error)
    # the scan preview (drawn before the model is asked for) does not stay beside the reason
    assert not any("segmenting" in c.value for c in at.caption) and not at.get("image")


def test_missing_weights_message(monkeypatch, tmp_path):
    import streamlit as st

    monkeypatch.setenv("MEDIMG_WEIGHTS_DIR", str(tmp_path))
    st.cache_resource.clear()  # models are cached per process; start from none
    at = _page("pages/1_Pneumonia.py")
    st.cache_resource.clear()
    assert not at.exception
    assert any("train_all.py --tasks pneumonia" in e.value for e in at.error)


def test_metrics_page_shows_an_evaluation_only_beside_its_weights(monkeypatch, tmp_path):
    import json
    import shutil

    from core.checkpoint import read_card
    from core.config import weights_dir

    card = read_card("pneumonia")
    wd = tmp_path / "w"
    shutil.copytree(weights_dir(), wd, ignore=shutil.ignore_patterns("logs", "evaluations"))
    (wd / "evaluations").mkdir()
    ev = {"task": "pneumonia", "data_label": "Kermany official test split (maintainers)", "evaluated": "2026-12-04T10:00:00",
          "weights_sha256": card["weights_sha256"], "n": 624, "n_refused_by_input_check": 3, "accuracy": 0.9,
          "sensitivity": 0.95, "specificity": 0.85, "auc": 0.97, "threshold": card["threshold"]}
    (wd / "evaluations" / "test.json").write_text(json.dumps(ev))
    (wd / "evaluations" / "older.json").write_text(json.dumps({**ev, "weights_sha256": "f" * 64,
                                                               "data_label": "for older weights"}))
    monkeypatch.setenv("MEDIMG_WEIGHTS_DIR", str(wd))
    at = _page("pages/4_Training_and_metrics.py")
    assert not at.exception
    text = _text(at)
    assert "Kermany official test split (maintainers)" in text and "2026-12-04" in text
    assert "for older weights" not in text and "scored other weights" in text


def test_progress_bar_redraws_at_most_once_per_interval(monkeypatch):
    """Each redraw is a message the computation waits on: 10 updates over 1 s redraw twice at 0.45 s."""
    import common
    from common import ThrottledProgress

    clock = [100.0]
    monkeypatch.setattr(common.time, "monotonic", lambda: clock[0])
    bar = ThrottledProgress("Segmenting", interval_s=0.45)
    for k in range(10):
        clock[0] += 0.1
        bar(k / 10)
    assert bar.redraws == 2
    every = ThrottledProgress("Segmenting", interval_s=0.0)
    for k in range(5):
        every(k / 5)
    assert every.redraws == 5
    with pytest.raises(ValueError):
        ThrottledProgress("Segmenting", interval_s=-1)


def test_foreground_gate_counts_requests_and_releases_the_warm_up():
    import threading
    import time

    from common import _Foreground

    gate = _Foreground()
    assert not gate.busy
    t = time.monotonic()
    gate.wait_idle()
    assert time.monotonic() - t < 0.05  # idle: no wait
    with gate:
        with gate:
            assert gate.busy
        assert gate.busy  # one request still computing
        t = time.monotonic()
        gate.wait_idle(poll_s=0.01, max_s=0.2)  # busy: waits, but not for ever
        assert 0.2 <= time.monotonic() - t < 1.0
    assert not gate.busy
    done = []
    with gate:
        th = threading.Thread(target=lambda: (gate.wait_idle(poll_s=0.01), done.append(time.monotonic())))
        th.start()
        time.sleep(0.1)
        assert not done  # the warm-up waits while the request runs
        left = time.monotonic()
    th.join(2)
    assert done and done[0] >= left


def test_an_unexpected_error_names_its_kind_on_the_page_and_where_it_arose_in_the_server_log(caplog):
    """The page never shows a stack trace; whoever runs the server gets where it arose (an intermittent NameError
    on the cardiac page was only traceable with it), but not the exception's message, which may quote the upload."""
    from common import run_safely

    value = "PatientName=" + "DOE" + "^JANE"  # as a file's content would be: not in any source line

    def broken_reader():
        return {}[value]

    with caplog.at_level("ERROR", logger="medimg.app"):
        assert run_safely(broken_reader, "These frames could not be analysed") is None
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "medimg.app")
    assert "unexpected KeyError during These frames could not be analysed" in logged
    assert "broken_reader" in logged and "test_app.py" in logged  # where
    assert "DOE^JANE" not in logged  # not what


def test_a_report_that_cannot_be_built_downloads_as_a_pdf_that_says_so(caplog):
    """The case report is built in the download's own request, where no message reaches the page: a failure there
    left the click unanswered (every real cardiac study's report, until 2026-12-06). Now the PDF says so."""
    from common import report_or_notice
    from test_case_report import _text as pdf_text

    value = "PatientName=" + "DOE" + "^JANE"

    def broken_report() -> bytes:
        return {}[value]

    with caplog.at_level("ERROR", logger="medimg.app"):
        pdf = report_or_notice(broken_report)()
    assert pdf.startswith(b"%PDF")
    txt = pdf_text(pdf)
    assert "could not be built" in txt and "KeyError" in txt and "not a medical device" in txt
    assert "DOE^JANE" not in txt
    logged = "\n".join(r.getMessage() for r in caplog.records if r.name == "medimg.app")
    assert "unexpected KeyError while building a case report" in logged and "broken_report" in logged
    assert "DOE^JANE" not in logged
    assert report_or_notice(lambda: b"%PDF-ok")() == b"%PDF-ok"


def test_server_connections_get_tcp_nodelay_although_the_listening_socket_has_protocol_0():
    """Streamlit binds its listening socket as ``socket.socket(family)`` (protocol number 0), for which asyncio
    leaves Nagle's algorithm on: every response written in two parts then waited 40 ms for the browser's delayed
    acknowledgement. Importing the app's common module turns TCP_NODELAY on for the connections accepted after it."""
    import asyncio
    import socket

    import common

    assert common.enable_tcp_nodelay() is False  # already on from the import; a second call changes nothing

    async def accepted_nodelay() -> int:
        listener = socket.socket(socket.AF_INET)  # as Streamlit's _bind_socket makes it
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        assert listener.proto == 0
        got: asyncio.Future = asyncio.get_running_loop().create_future()

        def on_connect(reader, writer) -> None:
            sock = writer.get_extra_info("socket")
            got.set_result(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        _, w = await asyncio.open_connection(*listener.getsockname())
        value = await asyncio.wait_for(got, 5)
        w.close()
        server.close()
        await server.wait_closed()
        return value

    assert asyncio.run(accepted_nodelay()) == 1


def test_no_page_relies_on_streamlit_magic():
    """.streamlit/config.toml turns Streamlit's "magic" off (it costs each page a source rewrite): a bare
    expression that is not a call or a docstring would then show nothing, so none may be written."""
    import ast
    import tomllib

    assert tomllib.loads((PROJECT_ROOT / ".streamlit" / "config.toml").read_text())["runner"]["magicEnabled"] is False
    found = []
    for path in [APP / "Home.py", *sorted((APP / "pages").glob("*.py"))]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            for field in ("body", "orelse", "finalbody"):
                seq = getattr(node, field, None)
                for i, stmt in enumerate(seq if isinstance(seq, list) else []):
                    if not isinstance(stmt, ast.Expr) or isinstance(stmt.value, (ast.Call, ast.Await, ast.Yield)):
                        continue
                    docstring = (seq is body and i == 0 and isinstance(stmt.value, ast.Constant)
                                 and isinstance(node, (ast.Module, ast.FunctionDef, ast.ClassDef)))
                    if not docstring:
                        found.append(f"{path.name}:{stmt.lineno}")
    assert not found, f"bare expressions (shown only with magic on): {found}"
