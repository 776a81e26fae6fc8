"""Test helpers: real NIfTI volumes and radiographs wrapped as DICOM with pydicom (in memory), with the
patient and study modules a PACS expects."""
from __future__ import annotations

import io

import numpy as np


def _study(ds, study_uid: str, patient_id: str = "TEST-0001") -> None:
    ds.PatientID, ds.PatientName = patient_id, "Test^Phantom"
    ds.PatientBirthDate, ds.PatientSex = "", "O"
    ds.StudyInstanceUID, ds.StudyID = study_uid, "1"
    ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "", ""
    ds.Manufacturer = "test"


def mr_slices(vol: np.ndarray, affine: np.ndarray, series_uid: str = "1.2.3.4", trigger_order=None,
              study_uid: str = "1.2.3", frame_of_reference: str = "1.2.3.9") -> list:
    """One single-frame MR dataset per slice (and per frame of a cine: vol (X, Y, Z, T)), geometry from
    the NIfTI ``affine`` (RAS)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ affine
    sx, sy = np.linalg.norm(lps[:3, 0]), np.linalg.norm(lps[:3, 1])
    row, col = lps[:3, 0] / sx, lps[:3, 1] / sy
    vol4 = vol if vol.ndim == 4 else vol[..., None]
    out = []
    for k in range(vol4.shape[2]):
        for t in range(vol4.shape[3]):
            ds = Dataset()
            ds.file_meta = FileMetaDataset()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, generate_uid()
            _study(ds, study_uid)
            ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber = "MR", series_uid, 1
            ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = frame_of_reference, ""
            ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
            ds.ImagePositionPatient = [float(v) for v in lps[:3] @ np.array([0, 0, k, 1.0])]
            ds.PixelSpacing = [float(sy), float(sx)]
            ds.SliceThickness = 99.0  # wrong on purpose: spacing must come from the positions
            ds.InstanceNumber = k * vol4.shape[3] + t + 1
            ds.TriggerTime = float((trigger_order[t] if trigger_order is not None else t) * 40)
            ds.Rows, ds.Columns = vol4.shape[1], vol4.shape[0]
            ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
            ds.RescaleSlope, ds.RescaleIntercept = 1, 0
            ds.PixelData = np.ascontiguousarray(vol4[:, :, k, t].T).astype(np.int16).tobytes()
            out.append(ds)
    return out


def radiograph(pixels: np.ndarray, study_uid: str = "1.2.5", series_uid: str = "1.2.5.1"):
    """A DX 'for presentation' dataset holding ``pixels`` (H, W) uint8 (a real radiograph's pixels)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import DigitalXRayImageStorageForPresentation, ExplicitVRLittleEndian, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPClassUID, ds.SOPInstanceUID = DigitalXRayImageStorageForPresentation, generate_uid()
    _study(ds, study_uid, "TEST-0002")
    ds.Modality, ds.SeriesInstanceUID, ds.SeriesNumber, ds.InstanceNumber = "DX", series_uid, 1, 1
    ds.ViewPosition, ds.BodyPartExamined, ds.PatientOrientation = "PA", "CHEST", ["L", "F"]
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    return ds


def to_bytes(ds) -> bytes:
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
