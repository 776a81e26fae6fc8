"""PACS round trip against a real Orthanc (DICOMweb): real volumes and radiographs stored as DICOM, listed,
fetched, analysed, and the results (Secondary Capture, Segmentation) stored back and read again."""
from __future__ import annotations

import numpy as np
import pytest
from _dicom_build import mr_slices, radiograph

from core import pacs as P
from core.errors import InvalidInputError


@pytest.fixture(scope="module")
def models():
    from core.inference import load_model

    cache: dict = {}

    def lm_for(task: str):
        if task not in cache:
            cache[task] = load_model(task)
        return cache[task]

    return lm_for


def test_config_from_environment():
    assert P.PacsConfig.from_env({}) is None
    cfg = P.PacsConfig.from_env({P.ENV_URL: " http://pacs.local:8042/dicom-web/ ", P.ENV_USER: "ana",
                                 P.ENV_PASSWORD: "secret"})
    assert cfg.url == "http://pacs.local:8042/dicom-web" and cfg.username == "ana" and cfg.password == "secret"
    assert "secret" not in repr(cfg)
    for bad in ("ftp://pacs/dicom-web", "pacs.local:8042", ""):
        with pytest.raises(InvalidInputError, match="not a DICOMweb address"):
            P.PacsConfig(bad)


def test_unreachable_server_says_so():
    pacs = P.Pacs(P.PacsConfig("http://127.0.0.1:9/dicom-web", timeout_s=2))
    with pytest.raises(P.PacsError, match="could not be reached"):
        P.list_studies(pacs)


def test_module_chosen_from_the_series():
    rng = np.random.default_rng(0)
    aff = np.diag([1.5, 1.5, 8.0, 1.0])
    assert P.task_for(mr_slices(rng.random((16, 16, 4)) * 100, aff)) == "atrium"
    assert P.task_for(mr_slices(rng.random((16, 16, 4, 3)) * 100, aff)) == "cardiac"
    assert P.task_for([radiograph(np.zeros((8, 8), np.uint8))]) == "pneumonia"
    with pytest.raises(InvalidInputError, match="holds 2 images"):
        P.task_for([radiograph(np.zeros((8, 8), np.uint8)), radiograph(np.zeros((8, 8), np.uint8))])
    ct = radiograph(np.zeros((8, 8), np.uint8))
    ct.Modality = "CT"
    with pytest.raises(InvalidInputError, match="modality 'CT'"):
        P.task_for([ct])
    seg = radiograph(np.zeros((8, 8), np.uint8))
    seg.Modality = "SEG"
    with pytest.raises(InvalidInputError, match="result"):
        P.task_for([seg])
    with pytest.raises(InvalidInputError, match="no images"):
        P.task_for([])


def _zip(dss: list) -> bytes:
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i, ds in enumerate(dss):
            z.writestr(f"IM{i:04d}.dcm", P.dataset_bytes(ds))
    return buf.getvalue()


def test_segmentation_file_from_an_uploaded_series_zip():
    """The atrium page's DICOM Segmentation download: a zipped series and a mask on its grid -> one SEG file
    whose frames give the mask back; a series without what a Segmentation copies gets a message in words."""
    import io

    import pydicom

    from core.dicom_series import read_volume_any

    vol = np.random.default_rng(2).random((32, 24, 6)) * 100
    dss = mr_slices(vol, np.diag([1.5, 1.5, 3.0, 1.0]))
    zb = _zip(dss)
    v = read_volume_any(zb, "series.zip")  # the grid the page segments on
    mask = np.zeros(v.data.shape, np.uint8)
    mask[5:15, 4:12, 2:4] = 1
    seg = pydicom.dcmread(io.BytesIO(P.segmentation_file(zb, mask, {"weights_sha256": "ab" * 32})))
    assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel == "Left atrium"
    assert seg.StudyInstanceUID == dss[0].StudyInstanceUID and int(seg.NumberOfFrames) == 6
    assert np.array_equal(P.mask_from_segmentation(seg, dss), mask > 0)
    for d in dss:
        del d.PatientID
    with pytest.raises(InvalidInputError, match="this series has no PatientID"):
        P.segmentation_file(_zip(dss), mask, {})
    dss = mr_slices(vol, np.diag([1.5, 1.5, 3.0, 1.0]))
    for d in dss:
        del d.FrameOfReferenceUID
    with pytest.raises(InvalidInputError, match="Frame Of Reference"):
        P.segmentation_file(_zip(dss), mask, {})


def test_series_stored_twice_is_refused():
    from core.dicom_series import series_cine

    vol = np.random.default_rng(1).random((16, 16, 4)) * 100
    dss = mr_slices(vol, np.diag([1.5, 1.5, 8.0, 1.0])) * 2
    with pytest.raises(InvalidInputError, match="same slice position and trigger time"):
        series_cine(dss)


def test_atrium_round_trip(orthanc, heart_root, models):
    import nibabel as nib

    img = nib.load(heart_root / "Task02_Heart" / "imagesTr" / "la_005.nii.gz")
    vol = np.round(np.asarray(img.dataobj, dtype=np.float32))
    study = "1.2.826.0.1.3680043.8.498.10"
    pacs = P.Pacs(P.PacsConfig(orthanc))
    P.store(pacs, mr_slices(vol, img.affine, "1.2.826.0.1.3680043.8.498.11", study_uid=study))
    row = next(r for r in P.list_studies(pacs) if r["study_uid"] == study)
    assert row["modalities"] == "MR" and row["instances"] == str(vol.shape[2])
    (series,) = P.list_series(pacs, study)
    dss = P.fetch_series(pacs, study, series["series_uid"])
    assert len(dss) == vol.shape[2]

    res = P.run_series(models, dss, "la_005 from PACS")
    assert res.task == "atrium" and res.analysis.row["status"] == "ok"
    assert res.analysis.mask.shape == vol.shape and res.analysis.mask.sum() > 1000
    assert {ds.Modality for ds in res.outgoing} == {"OT", "SEG"}
    P.store(pacs, res.outgoing)

    back = {r["modality"]: r for r in P.list_series(pacs, study)}
    assert set(back) == {"MR", "OT", "SEG"}
    (seg,) = P.fetch_series(pacs, study, back["SEG"]["series_uid"])
    assert seg.StudyInstanceUID == study and seg.PatientID == dss[0].PatientID
    assert seg.SegmentSequence[0].SegmentLabel == "Left atrium"
    assert np.array_equal(P.mask_from_segmentation(seg, dss), res.analysis.mask > 0)
    (sc,) = P.fetch_series(pacs, study, back["OT"]["series_uid"])
    assert sc.StudyInstanceUID == study and sc.BurnedInAnnotation == "YES"
    assert sc.pixel_array.ndim == 3 and sc.pixel_array.shape[2] == 3 and sc.pixel_array.std() > 0


def test_radiograph_round_trip(orthanc, xray_root, models):
    from PIL import Image

    path = sorted((xray_root / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0]
    pix = np.asarray(Image.open(path).convert("L"))
    study = "1.2.826.0.1.3680043.8.498.20"
    pacs = P.Pacs(P.PacsConfig(orthanc))
    P.store(pacs, [radiograph(pix, study, "1.2.826.0.1.3680043.8.498.21")])
    (series,) = P.list_series(pacs, study)
    (ds,) = P.fetch_series(pacs, study, series["series_uid"])
    assert np.array_equal(ds.pixel_array, pix)

    res = P.run_series(models, [ds], "radiograph from PACS")
    assert res.task == "pneumonia" and res.analysis.row["status"] in ("ok", "uncertain", "withheld")
    assert [d.Modality for d in res.outgoing] == ["OT"]
    P.store(pacs, res.outgoing)
    back = [r for r in P.list_series(pacs, study) if r["modality"] == "OT"]
    (sc,) = P.fetch_series(pacs, study, back[0]["series_uid"])
    assert sc.PatientID == "TEST-0002" and sc.SeriesDescription.startswith("AI pneumonia result")


def test_cardiac_cine_round_trip(orthanc, acdc_root, models):
    """A real patient's ED and ES frames stored as an MR cine series with a cine stack's geometry (1.5 mm pixels,
    slices 10 mm apart): the cardiac module runs from the PACS, its row gives the volumes in mL (the geometry comes
    from the DICOM positions, not the NIfTI header), and its result goes back as a Secondary Capture."""
    import nibabel as nib

    pdir = sorted((acdc_root / "ACDC" / "training").glob("patient*"))[0]
    info = dict(ln.split(":", 1) for ln in (pdir / "Info.cfg").read_text().splitlines() if ":" in ln)
    ed, es = (np.asarray(nib.load(pdir / f"{pdir.name}_frame{int(info[k]):02d}.nii.gz").dataobj, dtype=np.float32)
              for k in ("ED", "ES"))
    study = "1.2.826.0.1.3680043.8.498.50"  # UIDs no other test uses: in CI the tests share one server
    pacs = P.Pacs(P.PacsConfig(orthanc))
    P.store(pacs, mr_slices(np.round(np.stack([ed, es, ed], -1)), np.diag([1.5, 1.5, 10.0, 1.0]),
                            "1.2.826.0.1.3680043.8.498.51", study_uid=study))
    (series,) = P.list_series(pacs, study)
    dss = P.fetch_series(pacs, study, series["series_uid"])

    res = P.run_series(models, dss, "cine from PACS")
    row = res.analysis.row
    assert res.task == "cardiac" and row["status"] in ("ok", "uncertain") and row["es_frame"] == "2"
    assert float(row["lv_edv_ml"]) > float(row["lv_esv_ml"]) > 0 and float(row["lv_mass_g"]) > 0
    assert [d.Modality for d in res.outgoing] == ["OT"]
    P.store(pacs, res.outgoing)
    back = [r for r in P.list_series(pacs, study) if r["modality"] == "OT"]
    (sc,) = P.fetch_series(pacs, study, back[0]["series_uid"])
    assert sc.SeriesDescription.startswith("AI cardiac result") and sc.pixel_array.std() > 0


def test_real_ct_file_is_refused_by_every_module(orthanc):
    import pydicom
    from pydicom.data import get_testdata_file

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))  # real scanner output
    pacs = P.Pacs(P.PacsConfig(orthanc))
    P.store(pacs, [ct])
    series = P.list_series(pacs, str(ct.StudyInstanceUID))
    dss = P.fetch_series(pacs, str(ct.StudyInstanceUID), series[0]["series_uid"])
    with pytest.raises(InvalidInputError, match="not read by any module"):
        P.task_for(dss)


def test_pacs_page_opens_a_study_and_sends_the_result_back(orthanc, xray_root, monkeypatch):
    """The PACS page (AppTest): the configured server's studies are listed, a radiograph study is opened and
    analysed, and the result goes back into the same study."""
    from PIL import Image
    from streamlit.testing.v1 import AppTest

    from core.config import PROJECT_ROOT

    path = sorted((xray_root / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    ds = radiograph(np.asarray(Image.open(path).convert("L")), "1.2.826.0.1.3680043.8.498.30",
                    "1.2.826.0.1.3680043.8.498.31")
    ds.StudyDate, ds.StudyDescription = "20991231", "page test"  # the newest study: listed first
    pacs = P.Pacs(P.PacsConfig(orthanc))
    P.store(pacs, [ds])
    monkeypatch.setenv(P.ENV_URL, orthanc)
    at = AppTest.from_file(str(PROJECT_ROOT / "streamlit_app" / "pages" / "5_PACS.py"), default_timeout=120).run()
    assert not at.exception, at.exception
    study = at.selectbox(key="pacs.study")
    assert "page test" in study.format_func(study.value)  # the newest study is offered first
    assert "2099-12-31" in study.format_func(study.value)  # a date as a reader writes it, not DICOM's 20991231
    table = at.dataframe[0].value
    assert "2099-12-31" in set(table["Date"]) and "Test, Phantom" in set(table["Patient"])
    at.button(key="pacs.open").click().run()
    assert not at.exception, at.exception
    shown = " ".join(x.value for x in list(at.info) + list(at.warning))
    assert "pneumonia" in shown.lower() or "withheld" in shown.lower() or "no diagnosis" in shown.lower()
    assert any("case report" in str(getattr(b, "proto", b)) for b in at.get("download_button"))
    at.button(key="pacs.send").click().run()
    assert not at.exception, at.exception
    assert any("Stored 1 new instance" in s.value for s in at.success)
    modalities = {r["modality"] for r in P.list_series(pacs, "1.2.826.0.1.3680043.8.498.30")}
    assert modalities == {"DX", "OT"}


def test_dicom_dates_and_names_as_a_reader_writes_them():
    assert P.display_date("20260102") == "2026-01-02"
    assert P.display_date("") == "" and P.display_date("2026") == "2026"  # not a full date: as it is
    assert P.display_name("Test^Phantom") == "Test, Phantom"
    assert P.display_name("Doe^John^A^Dr^") == "Doe, John A"
    assert P.display_name("Anonymous") == "Anonymous" and P.display_name("^Jane") == "Jane"
    assert P.display_name("Yamada^Tarou=山田^太郎") == "Yamada, Tarou"  # the alphabetic group only


def test_multipart_parts_by_hand():
    body = (b"--b1\r\nContent-Type: application/dicom\r\n\r\nAAA\r\n--b1\r\nContent-Type: application/dicom\r\n"
            b"Content-Length: 4\r\n\r\nB\r\nB\r\n--b1--\r\n")
    parts = P.multipart_parts(body, 'multipart/related; type="application/dicom"; boundary=b1')
    assert [bytes(p) for p in parts] == [b"AAA", b"B\r\nB"]
    assert P.multipart_parts(b"--b1--\r\n", "multipart/related; boundary=b1") == []
    for ctype, raw in (("application/dicom+json", body), ("multipart/related", body),
                       ("multipart/related; boundary=b1", body[:30])):
        with pytest.raises(ValueError):
            P.multipart_parts(raw, ctype)
