"""Readers: good files of every accepted type, and each kind of bad file."""
from __future__ import annotations

import gzip
import zlib

import numpy as np
import pytest
from conftest import dicom_bytes, jpeg_bytes, nifti_bytes, png_bytes

from core import io as mio
from core.errors import InvalidInputError, MaskMismatchError

RNG = np.random.default_rng(0)
IMG = (RNG.random((64, 80)) * 255).astype(np.uint8)


def test_png_jpeg_read_to_unit_range():
    for data, fmt in ((png_bytes(IMG), "png"), (jpeg_bytes(IMG), "jpeg")):
        im = mio.read_image_2d(data, "x")
        assert im.source_format == fmt
        assert im.pixels.shape == (64, 80)
        assert im.pixels.min() == 0.0 and im.pixels.max() == 1.0
        assert not im.colour


def test_grey_rgb_is_not_colour_but_photo_is():
    grey_rgb = np.repeat(IMG[..., None], 3, axis=2)
    assert not mio.read_image_2d(png_bytes(grey_rgb), "x.png").colour
    photo = (RNG.random((64, 80, 3)) * 255).astype(np.uint8)
    assert mio.read_image_2d(png_bytes(photo), "x.png").colour


def test_lying_extension_is_read_by_content():
    im = mio.read_image_2d(png_bytes(IMG), "scan.jpeg")
    assert im.source_format == "png"


def test_dicom_rescale_window_and_no_identifying_tags():
    arr = np.tile(np.arange(0, 1000, 10, dtype=np.uint16), (100, 1))  # 0..990 across columns
    data = dicom_bytes(arr, slope=2.0, intercept=-100.0, window=(900, 200))  # window 800..1000 in HU-like units
    im = mio.read_image_2d(data, "x.dcm")
    assert im.source_format == "dicom"
    # rescaled value v = 2*raw - 100; below 800 -> 0, above 1000 -> 1 after windowing and min-max
    raw = arr[0]
    v = 2.0 * raw - 100
    assert np.all(im.pixels[0][v <= 790] == 0.0)
    assert np.all(im.pixels[0][v >= 1010] == 1.0)
    mid = (v > 820) & (v < 980)
    assert np.all(np.diff(im.pixels[0][mid]) > 0)
    shown = " ".join(f"{k}={v}" for k, v in im.info.items())
    for secret in ("Doe", "SECRET-123", "19700101", "ACC-999", "General Hospital"):
        assert secret not in shown
    assert im.info["Modality"] == "CR"


def test_dicom_monochrome1_is_inverted():
    arr = np.tile(np.arange(100, dtype=np.uint16), (20, 1))
    im = mio.read_image_2d(dicom_bytes(arr, photometric="MONOCHROME1"), "x.dcm")
    assert im.pixels[0, 0] == 1.0 and im.pixels[0, -1] == 0.0


@pytest.mark.parametrize(
    "data,needle",
    [
        (b"", "empty"),
        (png_bytes(IMG)[:200], "truncated or corrupt"),
        (jpeg_bytes(IMG)[:300], "truncated or corrupt"),
        (b"hello world, not an image" * 10, "not a PNG, JPEG or DICOM"),
        (png_bytes(np.full((64, 64), 7, np.uint8)), "blank"),
        (png_bytes(np.zeros((8, 8), np.uint8) + np.eye(8, dtype=np.uint8)), "too small"),
        (nifti_bytes(np.zeros((20, 20, 5), np.float32)), "NIfTI volume, not a radiograph"),
    ],
)
def test_bad_2d_inputs(data, needle):
    with pytest.raises(InvalidInputError, match=needle):
        mio.read_image_2d(data, "upload")


def test_decompression_bomb_is_refused_before_decoding():
    # A PNG header claiming 100000 x 100000 pixels, with a tiny compressed body.
    import struct

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 0, 0, 0, 0)
    data = mio.PNG_MAGIC + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 1000)) + chunk(b"IEND", b"")
    with pytest.raises(InvalidInputError, match="implausibly large"):
        mio.read_image_2d(data, "bomb.png")


def test_dicom_truncated_and_without_pixels():
    arr = np.tile(np.arange(100, dtype=np.uint16), (20, 1))
    good = dicom_bytes(arr)
    with pytest.raises(InvalidInputError):
        mio.read_image_2d(good[: len(good) - 1500], "x.dcm")


# --------------------------------------------------------------------------- NIfTI


def test_nifti_keeps_affine_and_spacing():
    aff = np.diag([1.25, 1.25, 1.37, 1.0])
    aff[:3, 3] = [10, -20, 5]
    arr = RNG.random((32, 30, 12)).astype(np.float32)
    for gz in (True, False):
        v = mio.read_image_volume(nifti_bytes(arr, aff, gz=gz), "v.nii")
        assert v.data.shape == (32, 30, 12)
        np.testing.assert_allclose(v.affine, aff, atol=1e-6)
        np.testing.assert_allclose(v.spacing, (1.25, 1.25, 1.37), atol=1e-6)
        np.testing.assert_allclose(v.data, arr, atol=1e-6)


def test_nifti2_single_file_is_read():
    # NIfTI-2 keeps its magic at byte 4 (not 344 as NIfTI-1): such files were once refused as "not NIfTI"
    import nibabel as nib

    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    arr = RNG.random((32, 30, 8)).astype(np.float32)
    raw = nib.Nifti2Image(arr, aff).to_bytes()
    assert mio.sniff_format(raw[:400]) == "nifti" and mio.is_nifti2(raw)
    for data in (raw, gzip.compress(raw)):
        v = mio.read_image_volume(data, "v.nii")
        np.testing.assert_allclose(v.data, arr)
        np.testing.assert_allclose(v.spacing, (1.5, 1.5, 3.0))


def test_nifti_header_whose_voxel_count_overflows_int64_is_refused():
    import struct

    import nibabel as nib

    raw = bytearray(nib.Nifti2Image(np.zeros((40, 40, 4), np.float32), np.eye(4)).to_bytes())
    struct.pack_into("<8q", raw, 16, 3, 2**32, 2**32, 4, 1, 1, 1, 1)  # product 2**66: 0 in int64
    with pytest.raises(InvalidInputError, match="implausibly large"):
        mio.read_nifti(bytes(raw))


def test_nifti_singleton_4d_is_3d():
    v = mio.read_image_volume(nifti_bytes(RNG.random((20, 20, 6, 1)).astype(np.float32)))
    assert v.data.shape == (20, 20, 6)


@pytest.mark.parametrize(
    "arr,needle",
    [
        (RNG.random((20, 20, 6, 3)).astype(np.float32), "4D"),
        (RNG.random((20, 20)).astype(np.float32), "2D"),
        (RNG.random((20, 20, 1)).astype(np.float32), "2D"),
        (np.full((20, 20, 6), 3.0, np.float32), "blank"),
        (np.where(RNG.random((20, 20, 6)) > 0.5, np.nan, 1.0).astype(np.float32), "NaN"),
        (np.where(RNG.random((20, 20, 6)) > 0.5, np.inf, 1.0).astype(np.float32), "NaN or infinity"),
        (RNG.random((4, 4, 6)).astype(np.float32), "implausible size"),
    ],
)
def test_bad_volumes(arr, needle):
    with pytest.raises(InvalidInputError, match=needle):
        mio.read_image_volume(nifti_bytes(arr))


def test_nifti_truncated_corrupt_and_wrong_type():
    data = nifti_bytes(RNG.random((20, 20, 6)).astype(np.float32), gz=False)
    with pytest.raises(InvalidInputError, match="truncated"):
        mio.read_nifti(data[:1000])  # header intact, voxels missing
    with pytest.raises(InvalidInputError, match="truncated|corrupt"):
        mio.read_nifti(gzip.compress(data)[:500])
    with pytest.raises(InvalidInputError, match="PNG image, not a NIfTI"):
        mio.read_nifti(png_bytes(IMG))
    with pytest.raises(InvalidInputError, match="empty"):
        mio.read_nifti(b"")
    import nibabel as nib

    header_only = nib.Nifti1Pair(np.zeros((20, 20, 6), np.float32), np.eye(4)).header.binaryblock
    with pytest.raises(InvalidInputError, match="two-file NIfTI pair"):
        mio.read_nifti(header_only)


def test_gzip_bomb_is_refused(monkeypatch):
    monkeypatch.setattr(mio, "MAX_DECOMPRESSED_BYTES", 10_000)
    with pytest.raises(InvalidInputError, match="implausibly large once decompressed"):
        mio.read_nifti(gzip.compress(b"\0" * 50_000))


def test_mask_checks():
    aff = np.diag([1.25, 1.25, 1.37, 1.0])
    img = mio.read_image_volume(nifti_bytes(RNG.random((20, 20, 6)).astype(np.float32), aff))
    ok = (RNG.random((20, 20, 6)) > 0.7).astype(np.uint8)
    m = mio.read_mask(nifti_bytes(ok, aff), img)
    assert m.dtype == np.uint8 and np.array_equal(m, ok)
    with pytest.raises(MaskMismatchError, match="size"):
        mio.read_mask(nifti_bytes(ok[:, :, :5], aff), img)
    shifted = aff.copy()
    shifted[0, 3] = 30
    with pytest.raises(MaskMismatchError, match="affine"):
        mio.read_mask(nifti_bytes(ok, shifted), img)
    with pytest.raises(MaskMismatchError, match="not binary"):
        mio.read_mask(nifti_bytes(ok * 3, aff), img)
    assert np.array_equal(mio.read_mask(nifti_bytes(ok.astype(np.float32), aff), img), ok)  # 0.0/1.0 floats
    half = ok.astype(np.float32)
    half[0, 0, 0] = 0.5
    with pytest.raises(MaskMismatchError, match="not binary"):
        mio.read_mask(nifti_bytes(half, aff), img)


# --------------------------------------------------------------------------- dataset layouts


def test_xray_patient_ids():
    assert mio.xray_patient_id("person1000_bacteria_2931.jpeg", 1) == "person1000"
    assert mio.xray_patient_id("person1000_virus_1681.jpeg", 1) == "person1000"
    assert mio.xray_patient_id("IM-0115-0001.jpeg", 0) == "IM-0115"
    assert mio.xray_patient_id("NORMAL2-IM-0383-0001.jpeg", 0) == "NORMAL2-IM-0383"


def test_layouts_on_real_data(xray_root, acdc_root, heart_root):
    x = mio.find_xray_cases(xray_root)
    assert len(x) == 5216 and sum(c.label for c in x) == 3875
    a = mio.find_cardiac_cases(acdc_root)
    assert len(a) == 80 and sum(c.label == 0 for c in a) == 16
    assert all(c.ed_gt is not None for c in a)
    h = mio.find_atrium_cases(heart_root, ("Task02_Heart",))
    assert len(h) == 16
    v = mio.load_nifti_path(h[0].image_path)
    np.testing.assert_allclose(v.spacing, (1.25, 1.25, 1.37), atol=1e-3)
    mio.read_mask(h[0].label_path.read_bytes(), v)


def test_missing_dataset_message(tmp_path):
    from core.errors import DatasetNotFoundError

    for fn in (mio.find_xray_cases, mio.find_cardiac_cases, mio.find_atrium_cases):
        with pytest.raises(DatasetNotFoundError, match="MEDIMG_DATA_ROOT"):
            fn(tmp_path)
