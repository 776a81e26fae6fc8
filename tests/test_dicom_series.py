"""DICOM MRI series: built from real NIfTI volumes with pydicom, read back to the same voxels and geometry;
mixed, incomplete and cine series."""
from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from _dicom_build import mr_slices, to_bytes

from core.dicom_series import read_series_cine, read_series_volume
from core.errors import InvalidInputError


def _slices(vol: np.ndarray, affine: np.ndarray, series_uid: str = "1.2.3.4",
            trigger_order=None) -> list[bytes]:
    """One single-frame MR DICOM file per slice (and per frame of a cine: vol (X, Y, Z, T))."""
    return [to_bytes(ds) for ds in mr_slices(vol, affine, series_uid, trigger_order)]


def _zip(files: list[bytes], seed: int = 0) -> bytes:
    order = np.random.default_rng(seed).permutation(len(files))  # file order says nothing
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in order:
            z.writestr(f"IM{i:04d}", files[i])
        z.writestr("README.txt", "not dicom")
    return buf.getvalue()


def _oblique(spacing=(1.25, 1.25, 1.37)) -> np.ndarray:
    a = np.deg2rad(30)
    rot = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag(spacing)
    aff[:3, 3] = [-100.0, 20.0, -40.0]
    return aff


def test_real_volume_round_trip(heart_root):
    import nibabel as nib

    img = nib.load(heart_root / "Task02_Heart" / "imagesTr" / "la_003.nii.gz")
    vol = np.round(np.asarray(img.dataobj, dtype=np.float32))[:, :, 40:60]  # 20 slices keep the test short
    aff = img.affine.copy()
    aff[:3, 3] = (img.affine @ np.array([0, 0, 40, 1.0]))[:3]
    got = read_series_volume(_zip(_slices(vol, aff)))
    assert got.data.shape == vol.shape and np.array_equal(got.data, vol)
    assert np.allclose(got.affine, aff, atol=1e-4)
    assert np.allclose(got.spacing, np.linalg.norm(aff[:3, :3], axis=0), atol=1e-4)


def test_oblique_geometry_round_trip():
    vol = np.arange(12 * 10 * 6, dtype=np.float32).reshape(12, 10, 6) % 500
    aff = _oblique()
    got = read_series_volume(_zip(_slices(vol, aff), seed=3))
    assert np.array_equal(got.data, vol) and np.allclose(got.affine, aff, atol=1e-4)


def test_cine_round_trip_orders_frames_by_trigger_time():
    rng = np.random.default_rng(0)
    cine = rng.integers(0, 1000, (16, 14, 5, 4)).astype(np.float32)
    files = _slices(cine, _oblique())
    got = read_series_cine(_zip(files, seed=1))
    assert got.data.shape == cine.shape and np.array_equal(got.data, cine)


def test_bad_series_get_clear_messages():
    vol = np.ones((8, 8, 5), np.float32)
    vol[2:5, 2:5] = 7
    good = _slices(vol, np.eye(4))
    with pytest.raises(InvalidInputError, match="mixes 2 DICOM series"):
        read_series_volume(_zip(good + _slices(vol, np.eye(4), series_uid="9.9")))
    with pytest.raises(InvalidInputError, match="uneven"):
        read_series_volume(_zip(good[:2] + good[3:]))  # a slice missing in the middle
    with pytest.raises(InvalidInputError, match="cine"):
        read_series_volume(_zip(_slices(np.stack([vol, vol], -1), np.eye(4))))
    with pytest.raises(InvalidInputError, match="not a cine"):
        read_series_cine(_zip(good))
    with pytest.raises(InvalidInputError, match="No DICOM image slices"):
        read_series_volume(_zip([b"\x00" * 300]))
    with pytest.raises(InvalidInputError, match="zip"):
        read_series_volume(b"PK\x03\x04 truncated")
    with pytest.raises(InvalidInputError):
        read_series_volume(good[0])  # a single file, not a zip


def test_mutated_series_raise_only_the_projects_error():
    vol = np.arange(10 * 8 * 4, dtype=np.float32).reshape(10, 8, 4)
    good = _zip(_slices(vol, _oblique()))
    rng = np.random.default_rng(0)
    for _ in range(150):
        b = bytearray(good)
        for i in rng.integers(0, len(b), rng.integers(1, 40)):
            b[i] = int(rng.integers(0, 256))
        if rng.random() < 0.3:
            b = b[: int(rng.integers(4, len(b)))]
        try:
            read_series_volume(bytes(b))
        except InvalidInputError:
            pass
