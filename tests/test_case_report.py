"""The PDF case report: what it must say (read back with pdftotext) and that it renders (pdftoppm)."""
from __future__ import annotations

import shutil
import subprocess
from types import SimpleNamespace

import numpy as np
import pytest

from conftest import IN_CI
from core.case_report import (CaseReport, ReportImage, atrium_report, cardiac_report, format_probability, render_pdf,
                              with_training_note, xray_report)
from core.checkpoint import read_card
from core.constants import DISCLAIMER
from core.atrium import AtriumResult
from core.cardiac import CardiacResult
from core.pneumonia import XRayResult


def _poppler() -> None:
    if shutil.which("pdftotext") is None or shutil.which("pdftoppm") is None:
        if IN_CI:
            pytest.fail("poppler-utils (pdftotext, pdftoppm) missing: .ci/run installs them")
        pytest.skip("poppler-utils (pdftotext, pdftoppm) not installed")


def _text(pdf: bytes) -> str:
    _poppler()
    out = subprocess.run(["pdftotext", "-layout", "-", "-"], input=pdf, capture_output=True, check=True).stdout
    return " ".join(out.decode().split())  # one line: the table wraps long cells


def _pages(pdf: bytes, tmp_path) -> int:
    """Pages pdftoppm renders (to PNG files under the test's temporary folder)."""
    _poppler()
    subprocess.run(["pdftoppm", "-r", "20", "-png", "-", str(tmp_path / "page")], input=pdf, capture_output=True,
                   check=True)
    return len(list(tmp_path.glob("page*.png")))


def test_report_checks_its_arguments():
    with pytest.raises(ValueError, match="unknown task"):
        CaseReport("lungs", "x", "a finding")
    with pytest.raises(ValueError, match="headline"):
        CaseReport("pneumonia", "x", "  ")
    with pytest.raises(ValueError, match="report image"):
        ReportImage("bad", np.zeros((4, 4, 2)))


def test_probabilities_never_read_as_certainty():
    assert format_probability(0.5) == "50.0%"
    assert format_probability(0.9994) == "99.9%"
    assert format_probability(0.9996) == "> 99.9%" and format_probability(1.0) == "> 99.9%"
    assert format_probability(0.0006) == "0.1%"
    assert format_probability(0.0004) == "< 0.1%" and format_probability(0.0) == "< 0.1%"
    for bad in (-0.01, 1.01, float("nan")):
        with pytest.raises(ValueError, match="probability"):
            format_probability(bad)


def _xray(prob: float | None, withheld: str | None = None) -> XRayResult:
    g = np.linspace(0, 1, 64 * 64).reshape(64, 64)
    return XRayResult(prob, 0.721 if prob is not None else 0.5, None if prob is None else prob >= 0.721, g,
                      None if prob is None else g[::-1].copy(), withheld=withheld, calibrated=prob is not None)


def test_xray_report_says_the_finding_the_model_and_the_disclaimer():
    image = SimpleNamespace(pixels=np.random.default_rng(0).random((80, 70)),
                            info={"modality": "CR", "photometric interpretation": "MONOCHROME1 (inverted)"})
    card = read_card("pneumonia")
    txt = _text(render_pdf(xray_report(_xray(0.93), image, "child_0042.dcm"), card))
    assert "Finding: pneumonia suggested." in txt and "93.0%" in txt and "72.1%" in txt
    assert "child_0042.dcm" in txt and "MONOCHROME1 (inverted)" in txt
    assert card["weights_sha256"] in txt.replace(" ", "")  # the sha may wrap in its cell
    assert DISCLAIMER.split(":")[0] in txt and "calibrated" in txt
    assert "young children" in txt  # intended population

    near = _text(render_pdf(xray_report(_xray(0.70), image, "x.png"), card))
    assert "Uncertain - refer to a specialist" in near and "Finding:" not in near
    negative = _text(render_pdf(xray_report(_xray(0.10), image, "x.png"), card))
    assert "Finding: no pneumonia suggested." in negative
    sure = _text(render_pdf(xray_report(_xray(0.99996), image, "x.png"), card))
    assert "> 99.9%" in sure and "100.0%" not in sure


def test_report_of_a_training_input_says_so_first():
    image = SimpleNamespace(pixels=np.ones((40, 40)), info={})
    rep = xray_report(_xray(0.93), image, "person1_bacteria_1.jpeg")
    assert with_training_note(rep, None) is rep
    noted = with_training_note(rep, "chest_xray/train/PNEUMONIA/person1_bacteria_1.jpeg")
    assert noted.notes[0].startswith("This input is in the model's training data") and noted.notes[1:] == rep.notes
    txt = _text(render_pdf(noted, read_card("pneumonia")))
    assert "in the model's training data" in txt and "not how it would do on a new patient" in txt


def test_withheld_xray_report_gives_no_probability():
    image = SimpleNamespace(pixels=np.ones((40, 40)), info={})
    txt = _text(render_pdf(xray_report(_xray(None, "This image does not look like a chest X-ray."), image, "a.png"),
                           read_card("pneumonia")))
    assert "No diagnosis. This image does not look like a chest X-ray." in txt and "P(pneumonia)" not in txt


def test_cardiac_report_refuses_swapped_frames_and_names_the_class(tmp_path):
    k = 4
    sl = np.random.default_rng(1).random((2 * k, 32, 32))
    seg = np.zeros((2 * k, 32, 32), np.uint8)
    seg[:, 10:20, 10:20] = 3
    labels = [f"ED slice {i}" for i in range(k)] + [f"ES slice {i}" for i in range(k)]
    swapped = CardiacResult(0.99, 0.44, True, sl, labels, sl.copy(), segmentation=seg,
                            shape={"lv_ef": -1.24, "rv_ef": -0.86, "myo_to_lv_ed": 1.0, "rv_to_lv_ed": 1.0})
    card = read_card("cardiac")
    txt = _text(render_pdf(cardiac_report(swapped, "ED = a, ES = b"), card))
    assert "swapped" in txt and "-124" not in txt and "P(disease)" not in txt

    probs = {"NOR": 0.05, "DCM": 0.8, "HCM": 0.05, "MINF": 0.05, "RV": 0.05}
    # the file's ranges come with a line saying what they are (a report of every real study failed on it)
    diag = {"uncertain_below": 0.5, "normal_ranges": {"what": "5th-95th percentile", "lv_ef": [0.5, 0.75]},
            "cross_validation": {"calibrated": {"n": 80, "accuracy": 0.9, "accuracy_ci95": [0.82, 0.96]}}}
    ok = CardiacResult(0.97, 0.44, True, sl, labels, sl.copy(), segmentation=seg,
                       shape={"lv_ef": 0.2, "rv_ef": 0.3, "myo_to_lv_ed": 0.8, "rv_to_lv_ed": 0.9},
                       diagnosis={"probabilities": probs, "features": {"lv_ef": 0.2, "rv_ef": 0.3, "rv_lv_ed": 0.9,
                                                                        "myo_lv_ed": 0.8}})
    pdf = render_pdf(cardiac_report(ok, "ED = a, ES = b", diag), card)
    txt = _text(pdf)
    assert "Finding: the heart looks diseased" in txt and "Most likely: dilated cardiomyopathy (DCM), 80.0%" in txt
    assert "(outside)" in txt and "20%" in txt
    assert "0.20" not in txt and "50%-75%" in txt  # ejection fractions in one unit (%), the features' too
    assert 1 <= _pages(pdf, tmp_path) <= 2
    # an RV segmented larger at ES than at ED: its ejection fraction is not printed as a negative figure
    ok.diagnosis["features"]["rv_ef"] = -0.03
    txt = _text(render_pdf(cardiac_report(ok, "ED = a, ES = b", diag), card))
    assert "-3%" not in txt and "not measurable (the cavity is not smaller at ES)" in txt


def test_atrium_report_withholds_the_volume_when_the_check_fails(tmp_path):
    vol = np.random.default_rng(2).random((40, 40, 20)).astype(np.float32)
    mask = np.zeros(vol.shape, np.uint8)
    mask[10:25, 10:25, 5:15] = 1
    card = read_card("atrium")
    good = AtriumResult(mask, 2.25, (1.0, 1.0, 1.0), quality=SimpleNamespace(reliable=True, reasons=[]))
    mets = {"dice": 0.91, "iou": 0.83, "hd95_mm": 3.2, "volume_ml_true": 2.4, "volume_error_pct": -6.2}
    report = atrium_report(good, vol, mask, "la_001.nii.gz", mets, mask, (1.0, 1.0, 2.5))
    pdf = render_pdf(report, card)
    txt = _text(pdf)
    assert "2.2 mL" in txt or "2.3 mL" in txt
    assert "0.910" in txt and "-6.2 %" in txt and "Axial slice" in txt
    # the two other planes through the mask's middle (x, y index 17 of 0-39), 2.5 mm slices drawn 2.5x tall
    assert "Coronal slice 18 of 40" in txt and "Sagittal slice 18 of 40" in txt
    cor = next(im for im in report.images if im.caption.startswith("Coronal"))
    from core.pacs import key_images  # the PACS Secondary Capture: the middle axial slice and the coronal one

    assert [im.caption.split(" (")[0] for im in key_images(report)] == ["Axial slice 11 of 20", "Coronal slice 18 of 40"]
    # 20 slices x 2.5 mm = 50 mm tall against 40 x 1 mm wide (without square pixels: 20 px against 40)
    assert cor.rgb.shape[0] * 40 == cor.rgb.shape[1] * 50
    assert 1 <= _pages(pdf, tmp_path) <= 2
    bad = AtriumResult(mask, 2.25, (1.0, 1.0, 1.0),
                       quality=SimpleNamespace(reliable=False, reasons=["volume 2 mL outside 10-250 mL"]))
    txt = _text(render_pdf(atrium_report(bad, vol, mask, "x.nii"), card))
    assert "No reliable segmentation was found" in txt and "volume 2 mL outside 10-250 mL" in txt
    assert "withheld" in txt


def test_case_stem_names_files_after_the_input():
    from core.case_report import case_stem

    assert case_stem("sample MSD la_021 (bSSFP)") == case_stem("MSD la_021 (bSSFP)")
    assert case_stem("scans/la_021.nii.gz") == "la_021"
    assert case_stem("series 7.zip") == case_stem("series 7")  # a DICOM series uploaded as a zip
    assert case_stem("IM0001.dcm") == "IM0001"
