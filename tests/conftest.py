"""Shared fixtures: the data root (real-data tests skip without it, and fail under CI=true)."""
from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
# `streamlit run streamlit_app/app.py` (or Home.py) puts the app folder on the path; AppTest of a page does not.
sys.path.insert(0, str(ROOT / "streamlit_app"))

from core.config import data_root  # noqa: E402

IN_CI = os.environ.get("CI", "").lower() == "true"
# the app's background warm-up thread is for a server; a test process would exit while it runs torch
os.environ.setdefault("MEDIMG_WARM_UP", "0")


def _require(sub: str) -> Path:
    root = data_root()
    if not (root / sub).exists():
        msg = f"dataset {sub} not found under data root {root} (set MEDIMG_DATA_ROOT)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    return root


@pytest.fixture(scope="session")
def xray_root() -> Path:
    return _require("chest_xray")


@pytest.fixture(scope="session")
def acdc_root() -> Path:
    return _require("ACDC")


@pytest.fixture(scope="session")
def heart_root() -> Path:
    return _require("Task02_Heart")


def nifti_bytes(arr: np.ndarray, affine: np.ndarray | None = None, gz: bool = True,
                zooms: tuple | None = None) -> bytes:
    """Serialise an array as NIfTI-1 bytes in memory (.nii.gz when ``gz``)."""
    import gzip

    import nibabel as nib

    img = nib.Nifti1Image(arr, np.eye(4) if affine is None else affine)
    if zooms is not None:
        img.header.set_zooms(zooms)
    raw = img.to_bytes()
    return gzip.compress(raw) if gz else raw


def png_bytes(arr: np.ndarray, mode: str | None = None) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def jpeg_bytes(arr: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def dicom_bytes(arr: np.ndarray, slope: float = 1.0, intercept: float = 0.0, window: tuple | None = None,
                photometric: str = "MONOCHROME2") -> bytes:
    """A minimal valid DICOM (Secondary Capture) with identifying tags filled in."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "SECRET-123"
    ds.PatientBirthDate = "19700101"
    ds.AccessionNumber = "ACC-999"
    ds.InstitutionName = "General Hospital"
    ds.Modality = "CR"
    ds.BodyPartExamined = "CHEST"
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 16
    ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    if window:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = arr.astype(np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="session")
def lge_root() -> Path:
    return _require("LA2018")


@pytest.fixture(scope="session")
def outside_root() -> Path:
    return _require("outside_population")



@pytest.fixture(scope="session")
def orthanc(tmp_path_factory):
    """A real Orthanc (DICOMweb) for the PACS tests -> its DICOMweb root URL: the one .ci/run started
    (``MEDIMG_TEST_DICOMWEB_URL``), else a private one on a free localhost port, stopped at the end."""
    import socket

    import orthanc_server as O

    url = os.environ.get("MEDIMG_TEST_DICOMWEB_URL", "").strip()
    if url:
        if not O.answers(url):
            pytest.fail(f"MEDIMG_TEST_DICOMWEB_URL={url} does not answer")
        yield url
        return
    if not O.installed():
        msg = "Orthanc with its DICOMweb plugin is not installed (apt install orthanc orthanc-dicomweb)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = O.start(tmp_path_factory.mktemp("orthanc"), port)
    yield O.dicomweb_url(port)
    proc.terminate()
    try:
        proc.wait(10)
    except Exception:  # noqa: BLE001
        proc.kill()
