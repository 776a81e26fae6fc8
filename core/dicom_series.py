"""DICOM MRI series -> the volumes the cardiac and atrium modules read, in memory.

A series arrives as a zip of single-frame DICOM files (what a PACS export or a viewer's "save series" gives),
or as a folder (the batch command). Slices are put in order along the slice normal (from
ImageOrientationPatient x ImagePositionPatient, not from SliceLocation or file order), the slice spacing
comes from the positions (not only from SliceThickness), and the NIfTI-style affine (RAS) keeps the series'
orientation, so that the rest of the code sees what it would see from the same series converted to NIfTI.
A cine series (several frames at each position) becomes (X, Y, Z, T), frames ordered by TriggerTime.

Mixed series, missing slices, uneven spacing, differing image sizes or orientations are refused with a
message that says which."""
from __future__ import annotations

import io
import warnings
import zipfile
from pathlib import Path

import numpy as np

from core.errors import InvalidInputError
from core.io import Cine, Volume, _ensure_transfer_syntax, _guarded, _quiet_pydicom

ZIP_MAGIC = b"PK\x03\x04"
MAX_FILES = 5000  # a cine of 30 frames x 25 slices is 750 files
MAX_SERIES_VOXELS = 512 * 512 * 600
POSITION_TOL_MM = 0.01


def is_zip(data: bytes) -> bool:
    return bytes(data[:4]) == ZIP_MAGIC


def datasets_from_zip(data: bytes) -> list:
    """Every DICOM dataset in a zip (other members ignored), read in memory."""
    _quiet_pydicom()
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
        members = [m for m in zf.infolist() if not m.is_dir()]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise InvalidInputError("The zip file could not be opened: it looks truncated or corrupt.") from exc
    if len(members) > MAX_FILES:
        raise InvalidInputError(f"The zip holds {len(members)} files; a series of at most {MAX_FILES} is accepted.")
    if sum(m.file_size for m in members) > 4 * MAX_SERIES_VOXELS:
        raise InvalidInputError("The zip is implausibly large once unpacked; it was not opened.")
    out = []
    for m in members:
        try:
            raw = zf.read(m)
        except Exception as exc:  # noqa: BLE001 - a damaged member
            raise InvalidInputError("A file inside the zip could not be unpacked: the zip looks corrupt.") from exc
        ds = _dataset(raw)
        if ds is not None:
            out.append(ds)
    return out


def datasets_from_folder(folder: Path) -> list:
    """Every DICOM dataset in a folder (recursively)."""
    _quiet_pydicom()
    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    if len(files) > MAX_FILES:
        raise InvalidInputError(f"The folder holds {len(files)} files; a series of at most {MAX_FILES} is accepted.")
    return [ds for ds in (_dataset(p.read_bytes()) for p in files) if ds is not None]


def _dataset(raw: bytes):
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(raw), force=True)
    except Exception:  # noqa: BLE001 - not DICOM: ignored (zips carry DICOMDIR, readme files, ...)
        return None
    return ds if "PixelData" in ds and "ImagePositionPatient" in ds else None


def _pixels(ds) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    _ensure_transfer_syntax(ds)
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise InvalidInputError("A slice's pixel data could not be decoded (truncated, or a compression this app "
                                "does not support).") from exc
    if arr.ndim != 2:
        raise InvalidInputError("The series holds multi-frame or colour images; single-frame MR slices are expected.")
    return np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)


def _geometry(ds) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[float, float]]:
    try:
        iop = np.asarray([float(v) for v in ds.ImageOrientationPatient], dtype=float)
        ipp = np.asarray([float(v) for v in ds.ImagePositionPatient], dtype=float)
        ps = [float(v) for v in ds.PixelSpacing]
    except Exception as exc:
        raise InvalidInputError("A slice lacks its position, orientation or pixel spacing, so the series' geometry "
                                "cannot be known.") from exc
    if iop.shape != (6,) or ipp.shape != (3,) or len(ps) != 2 or min(ps) <= 0:
        raise InvalidInputError("A slice has an invalid position, orientation or pixel spacing.")
    row, col = iop[:3], iop[3:]
    return row, col, ipp, (ps[0], ps[1])


def _one_series(dss: list) -> list:
    if not dss:
        raise InvalidInputError("No DICOM image slices were found (files with pixel data and a slice position).")
    uids = {str(ds.get("SeriesInstanceUID", "")) for ds in dss}
    if len(uids) > 1:
        raise InvalidInputError(f"The upload mixes {len(uids)} DICOM series; upload one series at a time.")
    return dss


def _stack(dss: list) -> tuple[list[list], np.ndarray, float, np.ndarray]:
    """Group slices by position along the normal. -> (groups of datasets, sorted positions along the normal,
    slice spacing in mm, affine)."""
    row, col, _, ps = _geometry(dss[0])
    normal = np.cross(row, col)
    if not np.isclose(np.linalg.norm(normal), 1, atol=1e-3):
        raise InvalidInputError("The slices' orientation vectors are not orthonormal.")
    shape0 = (int(dss[0].Rows), int(dss[0].Columns))
    groups: dict[float, list] = {}
    for ds in dss:
        r, c, ipp, p = _geometry(ds)
        if not (np.allclose(r, row, atol=1e-3) and np.allclose(c, col, atol=1e-3)):
            raise InvalidInputError("The slices have different orientations: this is not one stack of parallel "
                                    "slices (a localiser or another plane may be mixed in).")
        if (int(ds.Rows), int(ds.Columns)) != shape0 or not np.allclose(p, ps, atol=1e-4):
            raise InvalidInputError("The slices differ in image size or pixel spacing.")
        d = float(ipp @ normal)
        key = next((k for k in groups if abs(k - d) < POSITION_TOL_MM), d)
        groups.setdefault(key, []).append(ds)
    pos = np.array(sorted(groups))
    if len(pos) < 2:
        raise InvalidInputError("The series holds a single slice position; a 3D volume needs several.")
    gaps = np.diff(pos)
    dz = float(np.median(gaps))
    if np.any(np.abs(gaps - dz) > max(0.05 * dz, 0.01)):
        raise InvalidInputError(f"The slice spacing is uneven (from {gaps.min():.2f} to {gaps.max():.2f} mm): "
                                "slices are missing or the series is incomplete.")
    first = min(groups[pos[0]], key=lambda d: int(d.get("InstanceNumber", 0) or 0))
    _, _, ipp0, _ = _geometry(first)
    lps = np.eye(4)
    # NIfTI voxel (i = column, j = row, k = slice): DICOM's row direction steps along columns, and vice versa
    lps[:3, 0], lps[:3, 1], lps[:3, 2], lps[:3, 3] = row * ps[1], col * ps[0], normal * dz, ipp0
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # LPS (DICOM) -> RAS (NIfTI)
    return [groups[k] for k in pos], pos, dz, affine


def slice_groups(dss: list) -> list[list]:
    """The instances of one series grouped by slice position, in the order of ``series_volume``'s slices
    (along the slice normal); a cine has several instances per group."""
    return _stack(_one_series(dss))[0]


def series_volume(dss: list) -> Volume:
    """One 3D series -> Volume (X = columns, Y = rows, Z = slices along the normal), RAS affine."""
    dss = _one_series(dss)
    groups, _, dz, affine = _stack(dss)
    if any(len(g) > 1 for g in groups):
        n = max(len(g) for g in groups)
        raise InvalidInputError(f"The series holds up to {n} images at one slice position: it looks like a cine "
                                "(several time frames); upload it on the cardiac page, or export one frame.")
    if int(dss[0].Rows) * int(dss[0].Columns) * len(groups) > MAX_SERIES_VOXELS:
        raise InvalidInputError("The series is implausibly large; it was not opened.")
    data = np.stack([_pixels(g[0]).T for g in groups], axis=2)
    ps = _geometry(dss[0])[3]
    return Volume(np.ascontiguousarray(data), affine, (ps[1], ps[0], dz), "DICOM series")


def series_cine(dss: list) -> Cine:
    """One cine series (T frames at each of Z positions) -> Cine (X, Y, Z, T), frames by TriggerTime."""
    dss = _one_series(dss)
    groups, _, dz, affine = _stack(dss)
    counts = {len(g) for g in groups}
    if len(counts) > 1:
        raise InvalidInputError(f"The cine is incomplete: slice positions hold between {min(counts)} and "
                                f"{max(counts)} frames.")
    t = counts.pop()
    if t < 2:
        raise InvalidInputError("The series holds one frame per slice position, not a cine; upload it as ED and ES "
                                "frames, or export the whole cine.")
    if int(dss[0].Rows) * int(dss[0].Columns) * len(groups) * t > MAX_SERIES_VOXELS:
        raise InvalidInputError("The cine is implausibly large; it was not opened.")

    def when(ds) -> tuple[float, int]:
        return float(ds.get("TriggerTime", 0) or 0), int(ds.get("InstanceNumber", 0) or 0)

    if any(len({when(ds)[0] for ds in g}) < len(g) for g in groups):
        raise InvalidInputError("The series holds several images at the same slice position and trigger time: "
                                "it looks like a series stored twice, or several series mixed under one UID.")

    data = np.stack([np.stack([_pixels(ds).T for ds in sorted(g, key=when)], axis=-1) for g in groups], axis=2)
    ps = _geometry(dss[0])[3]
    return Cine(np.ascontiguousarray(data), affine, (ps[1], ps[0], dz), "DICOM cine series")


@_guarded("DICOM series")
def read_series_volume(data: bytes) -> Volume:
    """A zip of one 3D DICOM series -> Volume (in memory)."""
    if not is_zip(data):
        raise InvalidInputError("A DICOM series is accepted as one .zip of its files.")
    return series_volume(datasets_from_zip(data))


@_guarded("DICOM series")
def read_series_cine(data: bytes) -> Cine:
    """A zip of one cine DICOM series -> Cine (in memory)."""
    if not is_zip(data):
        raise InvalidInputError("A DICOM series is accepted as one .zip of its files.")
    return series_cine(datasets_from_zip(data))


def read_volume_any(data: bytes, name: str = "") -> Volume:
    """A 3D volume from a NIfTI file or from a zip of one DICOM series (by content)."""
    from core.io import read_image_volume

    return read_series_volume(data) if is_zip(data) else read_image_volume(data, name)


def read_cine_any(data: bytes, name: str = "") -> Cine:
    """A cine from a 4D NIfTI file or from a zip of one DICOM cine series (by content)."""
    from core.io import read_cine

    return read_series_cine(data) if is_zip(data) else read_cine(data, name)
