"""Readers: single uploaded files (PNG, JPEG, DICOM, NIfTI) and the three dataset layouts.

Every reader works on bytes in memory (uploads are never written to disk) and turns bad input
into :class:`core.errors.InvalidInputError` with a message a clinician understands.
"""
from __future__ import annotations

import functools
import gzip
import io
import json
import math
import re
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.errors import DatasetNotFoundError, InvalidInputError, MaskMismatchError

# Limits that keep a hostile or mistaken upload from exhausting memory.
MAX_2D_PIXELS = 50_000_000  # a 7000 x 7000 radiograph is 49 MP
MAX_VOXELS = 120_000_000  # ~ 480 MB as float32
MAX_DECOMPRESSED_BYTES = 1_000_000_000
MIN_SIDE = 16

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
JPEG_MAGIC = b"\xff\xd8\xff"
GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class Image2D:
    """A 2D grey-level image.

    pixels: float32 array (H, W) scaled to [0, 1] after any DICOM rescale/window.
    source_format: "png", "jpeg" or "dicom".
    info: non-identifying acquisition facts safe to display (never names, IDs, dates).
    """

    pixels: np.ndarray
    source_format: str
    info: dict = field(default_factory=dict)
    colour: bool = False  # True when the file held distinct colour channels
    # DICOM greyscale only, for the viewer's window/level: the stored values after the modality LUT (H, W)
    # float32, the file's window presets (explanation, centre, width) in those values, and whether white is
    # low (MONOCHROME1: invert after windowing)
    values: np.ndarray | None = None
    windows: tuple[tuple[str, float, float], ...] = ()
    invert: bool = False


@dataclass(frozen=True)
class Volume:
    """A 3D volume read from NIfTI.

    data: float32 array (X, Y, Z) in the file's voxel order.
    affine: (4, 4) voxel-to-world matrix of the file.
    spacing: (3,) voxel size in mm as stored in the header.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    name: str = ""


# --------------------------------------------------------------------------- 2D images


def sniff_format(data: bytes) -> str | None:
    """Guess the format from the file's first bytes (extensions can lie)."""
    if data.startswith(PNG_MAGIC):
        return "png"
    if data.startswith(JPEG_MAGIC):
        return "jpeg"
    if len(data) >= 132 and data[128:132] == b"DICM":
        return "dicom"
    if data.startswith(GZIP_MAGIC):
        return "gzip"
    if (len(data) >= 348 and data[344:348] in (b"n+1\x00", b"ni1\x00")) or is_nifti2(data):
        return "nifti"
    return None


def is_nifti2(data: bytes) -> bool:
    """Whether ``data`` starts with a single-file NIfTI-2 header (540 bytes, its magic at byte 4, not 344)."""
    return len(data) >= 12 and data[4:12] == b"n+2\x00\r\n\x1a\n"


def _check_2d(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.ndim != 2:
        raise InvalidInputError(f"The {what} is not a single 2D image (its array has {arr.ndim} dimensions).")
    h, w = arr.shape
    if min(h, w) < MIN_SIDE:
        raise InvalidInputError(f"The {what} is too small ({h} x {w} pixels) to be a chest radiograph.")
    if h * w > MAX_2D_PIXELS:
        raise InvalidInputError(f"The {what} is implausibly large ({h} x {w} pixels).")
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError(f"The {what} contains invalid pixel values (NaN or infinity).")
    lo, hi = float(arr.min()), float(arr.max())
    if hi - lo <= 0:
        raise InvalidInputError(f"The {what} is blank: every pixel has the same value.")
    return ((arr - lo) / (hi - lo)).astype(np.float32)


def _read_pil(data: bytes, fmt: str) -> Image2D:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            w, h = im.size
            if w * h > MAX_2D_PIXELS:
                raise InvalidInputError(f"The image is implausibly large ({h} x {w} pixels); it was not opened.")
            if getattr(im, "n_frames", 1) > 1:
                raise InvalidInputError("The image file holds several frames; upload a single radiograph.")
            im.load()
    except InvalidInputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise InvalidInputError("The image is implausibly large; it was not opened.") from exc
    except Exception as exc:  # PIL raises many types for corrupt data
        raise InvalidInputError(
            f"The {fmt.upper()} file could not be read: it looks truncated or corrupt."
        ) from exc
    colour = False
    if im.mode in ("RGB", "RGBA", "P", "CMYK", "YCbCr", "LA"):
        rgb = np.asarray(im.convert("RGB"), dtype=np.float32)
        colour = bool(np.abs(rgb[..., 0] - rgb[..., 1]).mean() > 2 or np.abs(rgb[..., 1] - rgb[..., 2]).mean() > 2)
        arr = rgb.mean(axis=2)
    elif im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(im, dtype=np.float32)
    else:
        arr = np.asarray(im.convert("L"), dtype=np.float32)
    pixels = _check_2d(arr, "image")
    return Image2D(pixels=pixels, source_format=fmt, info={"size": f"{arr.shape[1]} x {arr.shape[0]}"}, colour=colour)


# DICOM attributes that may be shown: acquisition facts only, nothing that identifies a patient.
SAFE_DICOM_TAGS = (
    "Modality",
    "BodyPartExamined",
    "ViewPosition",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsStored",
)


def _quiet_pydicom() -> None:
    """pydicom logs and warns with the offending values, which can be identifying tags of a patient;
    nothing of an upload may reach a log, so validation is off and its logger silent."""
    import logging

    import pydicom

    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pydicom").setLevel(logging.CRITICAL + 1)
    logging.getLogger("pydicom").propagate = False


def _read_dicom(data: bytes) -> Image2D:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _read_dicom_quiet(data)


def _read_dicom_quiet(data: bytes) -> Image2D:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    _quiet_pydicom()

    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
    except Exception as exc:
        raise InvalidInputError("The DICOM file could not be read: it looks truncated or corrupt.") from exc
    if "PixelData" not in ds:
        raise InvalidInputError("The DICOM file holds no image (no pixel data).")
    _ensure_transfer_syntax(ds)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols * frames > MAX_2D_PIXELS:
        raise InvalidInputError(f"The DICOM image is implausibly large ({rows} x {cols} x {frames}).")
    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise InvalidInputError(
            "The DICOM pixel data could not be decoded (truncated, or a compression this app does not support)."
        ) from exc
    if frames > 1 or arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        raise InvalidInputError("The DICOM file holds several frames (a 3D or cine series); upload one radiograph.")
    colour = False
    if arr.ndim == 3:
        colour = True
        arr = arr[..., :3].astype(np.float32).mean(axis=2)
    else:
        try:
            values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float32)
            arr = apply_voi_lut(values, ds, index=0)
        except Exception as exc:
            raise InvalidInputError("The DICOM rescale or window values are invalid.") from exc
        arr = np.asarray(arr, dtype=np.float32)
        invert = str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
        if invert:
            arr = arr.max() - arr  # MONOCHROME1 stores white as low values
    pixels = _check_2d(arr, "DICOM image")
    info = {k: str(ds.get(k)) for k in SAFE_DICOM_TAGS if ds.get(k) is not None}
    if colour:
        return Image2D(pixels=pixels, source_format="dicom", info=info, colour=True)
    return Image2D(pixels=pixels, source_format="dicom", info=info, values=values if values.shape == pixels.shape
                   else None, windows=_window_presets(ds), invert=invert)


def _window_presets(ds) -> tuple[tuple[str, float, float], ...]:
    """The file's window presets (WindowCenter/WindowWidth, multi-valued, with their explanations) ->
    ((name, centre, width), ...); invalid ones are left out."""
    from pydicom.multival import MultiValue

    def listed(v) -> list:
        if v is None:
            return []
        return list(v) if isinstance(v, (list, tuple, MultiValue)) else [v]

    centres, widths = listed(ds.get("WindowCenter")), listed(ds.get("WindowWidth"))
    names = listed(ds.get("WindowCenterWidthExplanation"))
    out = []
    for i, (c, w) in enumerate(zip(centres, widths)):
        try:
            c, w = float(c), float(w)
        except (TypeError, ValueError):
            continue
        if np.isfinite(c) and np.isfinite(w) and w > 0:
            out.append((str(names[i]) if i < len(names) and str(names[i]).strip() else f"file window {i + 1}", c, w))
    return tuple(out)


def _ensure_transfer_syntax(ds) -> None:
    """Files written without a Part-10 header (no preamble, no file meta) do not name their transfer
    syntax; pydicom has already found how the dataset is encoded, so name that (uncompressed) one."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", (None, None))
    if implicit is None:
        implicit, little = True, True
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _dicom_without_preamble(data: bytes) -> bool:
    """A DICOM dataset written without the 128-byte preamble and 'DICM' (older or raw exports): pydicom
    parses it (forced) into a dataset with pixel data."""
    import pydicom

    _quiet_pydicom()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        return len(ds) > 3 and ("Rows" in ds or "SOPClassUID" in ds)
    except Exception:  # noqa: BLE001 - not DICOM
        return False


def _guarded(what: str):
    """Turn any unexpected exception of a reader into InvalidInputError (the app never shows a trace)."""

    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            try:
                return fn(*args, **kwargs)
            except InvalidInputError:
                raise
            except MemoryError as exc:
                raise InvalidInputError(f"The {what} is too large to open.") from exc
            except Exception as exc:  # noqa: BLE001 - malformed files raise anything
                raise InvalidInputError(f"The {what} could not be read: it looks corrupt.") from exc

        return wrapper

    return deco


@_guarded("image file")
def read_image_2d(data: bytes, filename: str = "") -> Image2D:
    """Read a PNG, JPEG or DICOM radiograph from bytes, by content rather than by extension."""
    if not isinstance(data, (bytes, bytearray)) or len(data) == 0:
        raise InvalidInputError("The file is empty.")
    fmt = sniff_format(bytes(data[:400]))
    if fmt in ("png", "jpeg"):
        return _read_pil(bytes(data), fmt)
    if fmt == "dicom" or filename.lower().endswith((".dcm", ".dicom")):
        return _read_dicom(bytes(data))
    if fmt in ("gzip", "nifti"):
        raise InvalidInputError("This is a NIfTI volume, not a radiograph; upload a PNG, JPEG or DICOM chest X-ray.")
    if fmt is None and _dicom_without_preamble(bytes(data[: 1 << 20])):
        return _read_dicom(bytes(data))
    raise InvalidInputError("The file is not a PNG, JPEG or DICOM image.")


# --------------------------------------------------------------------------- NIfTI


def _gunzip_limited(data: bytes) -> bytes:
    d = zlib.decompressobj(16 + zlib.MAX_WBITS)
    try:
        out = d.decompress(data, MAX_DECOMPRESSED_BYTES + 1)
    except zlib.error as exc:
        raise InvalidInputError("The compressed NIfTI file is corrupt.") from exc
    if len(out) > MAX_DECOMPRESSED_BYTES:
        raise InvalidInputError("The NIfTI file is implausibly large once decompressed; it was not opened.")
    return out


@_guarded("NIfTI file")
def read_nifti(data: bytes, name: str = "", expect_3d: bool = True, _allow_4d: bool = False) -> Volume:
    """Read a NIfTI-1/2 volume (.nii or .nii.gz) from bytes, keeping affine and spacing.

    A 4D file whose extra dimensions are all 1 is accepted as 3D; true 4D and 2D files are refused
    (4D cines go through ``read_cine``).
    """
    import nibabel as nib

    if not isinstance(data, (bytes, bytearray)) or len(data) == 0:
        raise InvalidInputError("The file is empty.")
    raw = bytes(data)
    if raw.startswith(GZIP_MAGIC):
        raw = _gunzip_limited(raw)
    fmt = sniff_format(raw[:400])
    if fmt != "nifti":
        if fmt in ("png", "jpeg", "dicom"):
            raise InvalidInputError(f"This is a {fmt.upper()} image, not a NIfTI volume (.nii or .nii.gz).")
        raise InvalidInputError("The file is not a NIfTI volume (.nii or .nii.gz), or it is corrupt.")
    if raw[344:348] == b"ni1\x00":  # the voxels live in a separate .img file that was not uploaded
        raise InvalidInputError("This is the header (.hdr) of a two-file NIfTI pair, without its voxels (.img). "
                                "Convert the pair to a single .nii or .nii.gz file and upload that.")
    cls = nib.Nifti2Image if is_nifti2(raw) else nib.Nifti1Image
    try:
        img = cls.from_bytes(raw)
        shape = tuple(int(s) for s in img.shape)
        n_vox = math.prod(shape) if shape else 0  # Python ints: np.prod wraps a huge header's product to ~0
        if n_vox > MAX_VOXELS:
            raise InvalidInputError(f"The volume is implausibly large ({' x '.join(map(str, shape))} voxels).")
        needed = int(img.header.get_data_offset()) + n_vox * np.dtype(img.get_data_dtype()).itemsize
        if needed > len(raw):
            raise InvalidInputError("The NIfTI file is truncated: it holds fewer voxels than its header says.")
        arr = np.asanyarray(img.dataobj)
        affine = np.asarray(img.affine, dtype=np.float64)
        zooms = tuple(float(z) for z in img.header.get_zooms()[:3])
    except InvalidInputError:
        raise
    except Exception as exc:
        raise InvalidInputError("The NIfTI file could not be read: it looks truncated or corrupt.") from exc
    while arr.ndim > 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    dims = " x ".join(map(str, arr.shape))
    if arr.ndim >= 4 and not (_allow_4d and arr.ndim == 4):
        raise InvalidInputError(f"The file is {arr.ndim}D ({dims}); upload a single 3D volume (one time frame).")
    if _allow_4d and arr.ndim == 4:
        if not MIN_CINE_FRAMES <= arr.shape[3] <= MAX_CINE_FRAMES:
            raise InvalidInputError(f"The cine has {arr.shape[3]} time frames ({dims}); a cardiac cycle is "
                                    f"{MIN_CINE_FRAMES}-{MAX_CINE_FRAMES} frames.")
        arr = np.asarray(arr, dtype=np.float32)
        if not np.all(np.isfinite(arr)):
            raise InvalidInputError("The cine contains invalid values (NaN or infinity).")
        if min(arr.shape[:2]) < MIN_SIDE or arr.shape[2] < 3:
            raise InvalidInputError(f"The cine has an implausible size ({dims}): a short-axis stack needs at least "
                                    "3 slices.")
        if not np.all(np.isfinite(affine)) or not all(np.isfinite(z) and z > 0 for z in zooms):
            raise InvalidInputError("The NIfTI header has an invalid voxel size or orientation.")
        return Volume(data=arr, affine=affine, spacing=zooms, name=name)  # type: ignore[arg-type]
    if arr.ndim != 3 or (expect_3d and min(arr.shape) < 2):
        raise InvalidInputError(f"The file is 2D ({dims}); a 3D volume with several slices is needed.")
    if min(arr.shape[:2]) < MIN_SIDE or max(arr.shape) > 2048:
        raise InvalidInputError(f"The volume has an implausible size ({' x '.join(map(str, arr.shape))}).")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise InvalidInputError("The NIfTI file stores a data type this app cannot use.")
    arr = np.asarray(arr, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise InvalidInputError("The volume contains invalid values (NaN or infinity).")
    if not np.all(np.isfinite(affine)) or not all(np.isfinite(z) and z > 0 for z in zooms):
        raise InvalidInputError("The NIfTI header has an invalid voxel size or orientation.")
    return Volume(data=arr, affine=affine, spacing=zooms, name=name)  # type: ignore[arg-type]


MIN_CINE_FRAMES, MAX_CINE_FRAMES = 2, 100


@dataclass(frozen=True)
class Cine:
    """A cine short-axis series as one 4D NIfTI.

    data: float32 array (X, Y, Z, T): in-plane, slices, time frames, in the file's order.
    """

    data: np.ndarray
    affine: np.ndarray
    spacing: tuple[float, float, float]
    name: str = ""

    @property
    def n_frames(self) -> int:
        return int(self.data.shape[3])

    def frame(self, t: int) -> Volume:
        """Time frame ``t`` (0-based) as a 3D volume (X, Y, Z) with the cine's affine and spacing."""
        return Volume(np.ascontiguousarray(self.data[..., t]), self.affine, self.spacing, f"{self.name} frame {t + 1}")


@_guarded("cine file")
def read_cine(data: bytes, name: str = "") -> Cine:
    """Read a 4D cine NIfTI (x, y, slice, time); a 3D file gets a message saying what to do instead."""
    vol = read_nifti(data, name, _allow_4d=True)
    if vol.data.ndim != 4:
        raise InvalidInputError("This file is a single 3D frame, not a 4D cine (x, y, slice, time). Upload the "
                                "whole cine series as one 4D file, or choose 'ED and ES frames' and upload two frames.")
    if float(vol.data.max() - vol.data.min()) <= 0:
        raise InvalidInputError("The cine is blank: every voxel has the same value.")
    return Cine(vol.data, vol.affine, vol.spacing, name)


def read_image_volume(data: bytes, name: str = "") -> Volume:
    """Read a 3D image volume and refuse blank (constant) ones."""
    vol = read_nifti(data, name)
    if float(vol.data.max() - vol.data.min()) <= 0:
        raise InvalidInputError("The volume is blank: every voxel has the same value.")
    return vol


@_guarded("mask file")
def read_mask(data: bytes, image: Volume, name: str = "") -> np.ndarray:
    """Read a binary ground-truth mask and check it matches ``image`` (shape, affine, values).

    Returns a uint8 array (X, Y, Z) of 0/1.
    """
    try:
        mask = read_nifti(data, name)
    except InvalidInputError as exc:
        raise MaskMismatchError(f"The mask could not be used: {exc}") from exc
    if float(mask.data.max()) > 1e6 or float(mask.data.min()) < -1e6:
        raise MaskMismatchError("The mask is not binary (it holds values other than 0 and 1); upload a left-atrium mask.")
    if mask.data.shape != image.data.shape:
        raise MaskMismatchError(
            f"The mask's size ({' x '.join(map(str, mask.data.shape))}) does not match the image's "
            f"({' x '.join(map(str, image.data.shape))}); was it made for another scan?"
        )
    if not np.allclose(mask.affine, image.affine, atol=1e-3, rtol=1e-4):
        raise MaskMismatchError(
            "The mask's position/orientation (affine) does not match the image's; was it made for another scan?"
        )
    # one pass over the voxels (np.unique would sort all of them: ~0.5 s for a 256x256x130 mask)
    if not np.all((mask.data == 0) | (mask.data == 1)):
        raise MaskMismatchError(
            "The mask is not binary (it holds values other than 0 and 1); upload a left-atrium mask."
        )
    return (mask.data > 0.5).astype(np.uint8)


def load_nifti_path(path: str | Path) -> Volume:
    """Read a NIfTI volume from disk (datasets only; uploads use the bytes readers)."""
    p = Path(path)
    return read_nifti(p.read_bytes(), p.name)


# --------------------------------------------------------------------------- dataset layouts


@dataclass(frozen=True)
class XRayCase:
    path: Path
    label: int  # 1 = pneumonia
    patient_id: str
    split: str


@dataclass(frozen=True)
class CardiacCase:
    patient_id: str
    group: str
    label: int  # 1 = any disease, 0 = NOR
    ed_path: Path
    es_path: Path
    ed_gt: Path | None
    es_gt: Path | None
    split: str


@dataclass(frozen=True)
class AtriumCase:
    case_id: str
    image_path: Path
    label_path: Path
    dataset: str = "Task02_Heart"  # the folder under the data root: Task02_Heart (bSSFP) or LA2018 (LGE)


_XRAY_CLASSES = {"NORMAL": 0, "PNEUMONIA": 1}


def xray_patient_id(filename: str, label: int) -> str:
    """Patient identifier from a Kermany file name.

    Pneumonia files are ``personN_{bacteria,virus}_M.jpeg``; normal ones ``[NORMAL2-]IM-NNNN-MMMM.jpeg``.
    """
    stem = Path(filename).stem
    if label == 1:
        m = re.match(r"(person\d+)_", stem)
        return m.group(1) if m else stem
    m = re.match(r"(.*IM-\d+)-\d+$", stem)
    return m.group(1) if m else stem


def find_xray_cases(root: Path) -> list[XRayCase]:
    """Every labelled chest X-ray under ``root/chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}``."""
    base = Path(root) / "chest_xray"
    cases: list[XRayCase] = []
    for split in ("train", "val", "test"):
        for cls, label in _XRAY_CLASSES.items():
            folder = base / split / cls
            if not folder.is_dir():
                continue
            for p in sorted(folder.iterdir()):
                if p.suffix.lower() in (".jpeg", ".jpg", ".png", ".dcm"):
                    cases.append(XRayCase(p, label, f"{cls}/{xray_patient_id(p.name, label)}", split))
    if not cases:
        raise DatasetNotFoundError(
            f"No chest X-rays found under {base}. Expected chest_xray/train/NORMAL/*.jpeg and "
            "chest_xray/train/PNEUMONIA/*.jpeg (Kermany/Kaggle layout); set --data-root or MEDIMG_DATA_ROOT."
        )
    return cases


def parse_info_cfg(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            out[k.strip()] = v.strip()
    return out


def find_cardiac_cases(root: Path) -> list[CardiacCase]:
    """Every labelled ACDC patient under ``root/ACDC/{training,testing}/patientNNN``."""
    base = Path(root) / "ACDC"
    cases: list[CardiacCase] = []
    for split in ("training", "testing"):
        folder = base / split
        if not folder.is_dir():
            continue
        for pdir in sorted(folder.glob("patient*")):
            cfg = pdir / "Info.cfg"
            if not cfg.is_file():
                continue
            info = parse_info_cfg(cfg)
            group = info.get("Group", "").upper()
            if not group or "ED" not in info or "ES" not in info:
                continue  # unlabelled case
            pid = pdir.name
            ed = pdir / f"{pid}_frame{int(info['ED']):02d}.nii.gz"
            es = pdir / f"{pid}_frame{int(info['ES']):02d}.nii.gz"
            ed_gt = ed.with_name(ed.name.replace(".nii.gz", "_gt.nii.gz"))
            es_gt = es.with_name(es.name.replace(".nii.gz", "_gt.nii.gz"))
            cases.append(
                CardiacCase(
                    pid, group, int(group != "NOR"), ed, es,
                    ed_gt if ed_gt.is_file() else None, es_gt if es_gt.is_file() else None, split,
                )
            )
    if not cases:
        raise DatasetNotFoundError(
            f"No labelled ACDC patients found under {base}. Expected ACDC/training/patientNNN/Info.cfg "
            "with patientNNN_frameXX.nii.gz files; set --data-root or MEDIMG_DATA_ROOT."
        )
    return cases


ATRIUM_DATASETS = ("Task02_Heart", "LA2018")  # MSD bSSFP; 2018 LA challenge LGE-MRI (MSD-style layout)


def find_atrium_cases(root: Path, datasets: tuple[str, ...] = ATRIUM_DATASETS) -> list[AtriumCase]:
    """Every labelled left-atrium volume under ``root/<dataset>/{imagesTr,labelsTr}`` for each of
    ``datasets`` (MSD layout, ``dataset.json`` when present), dataset by dataset."""
    cases: list[AtriumCase] = []
    for ds in datasets:
        base = Path(root) / ds
        ds_json = base / "dataset.json"
        pairs: list[tuple[Path, Path]] = []
        if ds_json.is_file():
            try:
                meta = json.loads(ds_json.read_text())
                for item in meta.get("training", []):
                    pairs.append((base / item["image"], base / item["label"]))
            except (ValueError, KeyError, TypeError):
                pairs = []
        if not pairs:
            for img in sorted((base / "imagesTr").glob("*.nii*")):
                pairs.append((img, base / "labelsTr" / img.name))
        for img, lab in pairs:
            img, lab = img.resolve(), lab.resolve()
            if img.is_file() and lab.is_file():
                cases.append(AtriumCase(img.name.split(".")[0], img, lab, ds))
    if not cases:
        raise DatasetNotFoundError(
            f"No labelled left-atrium volumes found under {Path(root)}. Expected Task02_Heart/imagesTr/la_NNN.nii.gz "
            "with labelsTr/la_NNN.nii.gz (MSD layout), or LA2018/imagesTr + labelsTr; set --data-root or "
            "MEDIMG_DATA_ROOT."
        )
    return cases


def nifti_to_bytes(data: np.ndarray, affine: np.ndarray) -> bytes:
    """Serialise an array as gzipped NIfTI-1 in memory (for downloads; nothing touches disk)."""
    import nibabel as nib

    img = nib.Nifti1Image(np.asarray(data), np.asarray(affine, dtype=np.float64))
    img.header.set_data_dtype(np.asarray(data).dtype)
    return gzip.compress(img.to_bytes(), compresslevel=6)
