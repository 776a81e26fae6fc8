"""Real DICOM files (pydicom's own test files: real scanner output in each transfer syntax) through the
radiograph reader: compressed syntaxes decode through pydicom's plugins; files without a Part-10 header read."""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from core.errors import InvalidInputError
from core.io import read_image_2d

DECODABLE = {
    "JPGExtended.dcm": "JPEG extended (12-bit)",
    "SC_rgb_jpeg_gdcm.dcm": "JPEG baseline, colour",
    "MR_small_jpeg_ls_lossless.dcm": "JPEG-LS lossless",
    "JPEG2000.dcm": "JPEG 2000 lossy",
    "MR_small_jp2klossless.dcm": "JPEG 2000 lossless",
    "MR_small_RLE.dcm": "RLE lossless",
    "image_dfl.dcm": "deflated explicit little endian",
    "MR_small_bigendian.dcm": "explicit big endian",
}


@pytest.mark.parametrize("name", sorted(DECODABLE))
def test_compressed_transfer_syntaxes_decode(name):
    path = get_testdata_file(name)
    ref = pydicom.dcmread(path)
    img = read_image_2d(open(path, "rb").read(), "upload")
    assert img.pixels.shape == (int(ref.Rows), int(ref.Columns)), DECODABLE[name]
    assert np.isfinite(img.pixels).all() and img.pixels.max() > img.pixels.min()


def _without_part10_header(name: str) -> bytes:
    ds = pydicom.dcmread(get_testdata_file(name))
    ds.preamble = None
    del ds.file_meta
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return buf.getvalue()


def test_file_without_preamble_reads_like_the_original():
    raw = _without_part10_header("CT_small.dcm")
    assert raw[128:132] != b"DICM"
    a = read_image_2d(raw, "no-extension")
    b = read_image_2d(open(get_testdata_file("CT_small.dcm"), "rb").read(), "CT_small.dcm")
    assert np.allclose(a.pixels, b.pixels)


def test_monochrome1_is_inverted():
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    normal = read_image_2d(open(get_testdata_file("CT_small.dcm"), "rb").read(), "a.dcm").pixels
    ds.PhotometricInterpretation = "MONOCHROME1"
    buf = io.BytesIO()
    ds.save_as(buf)
    inv = read_image_2d(buf.getvalue(), "b.dcm").pixels
    assert np.corrcoef(normal.ravel(), inv.ravel())[0, 1] < -0.99


def test_random_bytes_are_not_taken_for_dicom():
    with pytest.raises(InvalidInputError):
        read_image_2d(np.random.default_rng(0).bytes(5000), "x")
