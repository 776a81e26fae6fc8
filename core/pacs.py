"""A PACS as study source and destination, over DICOMweb (QIDO-RS to list, WADO-RS to fetch, STOW-RS to store).

Configuration, never hard-coded: the server's DICOMweb root in ``MEDIMG_DICOMWEB_URL`` (for Orthanc with its
DICOMweb plugin: ``http://HOST:8042/dicom-web``), and, when the server asks for them, HTTP basic credentials
in ``MEDIMG_DICOMWEB_USER`` / ``MEDIMG_DICOMWEB_PASSWORD``. Everything fetched stays in memory.

What goes back into the study, as new series (the source instances are never changed):
- every module: a Secondary Capture image of the result (verdict or measurement, probability, threshold,
  the heatmap or overlay, the model's version and the research-use line), made with highdicom;
- the atrium module: also the mask as a DICOM Segmentation (binary, one segment "Left atrium", SNOMED CT
  82471001), on the frames of the source series, so a viewer can overlay it.
"""
from __future__ import annotations

import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlparse

import numpy as np

from core.errors import InvalidInputError, MedImgError

ENV_URL = "MEDIMG_DICOMWEB_URL"
ENV_USER = "MEDIMG_DICOMWEB_USER"
ENV_PASSWORD = "MEDIMG_DICOMWEB_PASSWORD"
MAX_INSTANCES = 2000  # a cine of 30 frames x 25 slices is 750 instances
MANUFACTURER = "medimg research app"
RADIOGRAPH_MODALITIES = ("CR", "DX", "DR")
RESULT_MODALITIES = ("SEG", "SR", "OT", "PR", "KO", "DOC")


class PacsError(MedImgError):
    """The PACS could not be reached or did not answer as DICOMweb should."""


@dataclass(frozen=True)
class PacsConfig:
    """Where the DICOMweb server is. ``url``: its DICOMweb root (http or https); credentials optional."""

    url: str
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        u = urlparse(self.url.strip())
        if u.scheme not in ("http", "https") or not u.netloc:
            raise InvalidInputError(f"'{self.url}' is not a DICOMweb address: give one such as "
                                    "http://pacs.example.org:8042/dicom-web")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s must be positive, got {self.timeout_s}")
        object.__setattr__(self, "url", self.url.strip().rstrip("/"))

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> PacsConfig | None:
        """The configured server, or None when ``MEDIMG_DICOMWEB_URL`` is not set."""
        env = os.environ if env is None else env
        url = (env.get(ENV_URL) or "").strip()
        if not url:
            return None
        return cls(url, env.get(ENV_USER) or None, env.get(ENV_PASSWORD) or None)


class Pacs:
    """One DICOMweb server: ``cfg`` and a ``dicomweb_client.DICOMwebClient`` on a session that carries the
    credentials (basic auth when set). Instances are fetched through the same session and parsed by
    pydicom directly, so instances stored without a Part-10 preamble (as some clients store them) read."""

    def __init__(self, cfg: PacsConfig) -> None:
        import requests
        from dicomweb_client.api import DICOMwebClient

        self.cfg = cfg
        self.session = requests.Session()
        if cfg.username:
            self.session.auth = (cfg.username, cfg.password or "")
        self.client = DICOMwebClient(url=cfg.url, session=self.session, timeout=cfg.timeout_s)

    def retrieve(self, path: str) -> list:
        """The instances under ``path`` (e.g. ``studies/U/series/V``) as pydicom datasets (WADO-RS, any
        transfer syntax the server stores)."""
        import pydicom

        r = self.session.get(f"{self.cfg.url}/{path}", timeout=self.cfg.timeout_s,
                             headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
        r.raise_for_status()
        out = [pydicom.dcmread(io.BytesIO(part), force=True)
               for part in multipart_parts(r.content, r.headers.get("Content-Type", ""))]
        del r
        return out


def multipart_parts(body: bytes, content_type: str) -> list[memoryview]:
    """The bodies of a multipart/related message (RFC 2046), without copying them. The stdlib MIME parser
    decodes the whole message to text first, which costs about eight times the series in memory."""
    media, *params = [p.strip() for p in content_type.split(";")]
    if media.lower() != "multipart/related":
        raise ValueError(f"expected a multipart answer, got {content_type!r}")
    boundary = next((p.split("=", 1)[1].strip().strip('"') for p in params if p.lower().startswith("boundary=")),
                    None)
    if not boundary:
        raise ValueError("the multipart answer names no boundary")
    mv, marker = memoryview(body), b"--" + boundary.encode()
    out, pos = [], body.find(marker)
    while pos >= 0:
        start = pos + len(marker)
        if body[start:start + 2] == b"--":  # the closing delimiter
            break
        head_end = body.find(b"\r\n\r\n", start)
        nxt = body.find(b"\r\n" + marker, head_end)
        if head_end < 0 or nxt < 0:
            raise ValueError("the multipart answer is truncated")
        out.append(mv[head_end + 4:nxt])
        pos = nxt + 2
    return out


def _calling(what: str, fn, *args, **kwargs):
    """Call the DICOMweb client; network and HTTP failures become a PacsError that says what failed."""
    import requests

    try:
        return fn(*args, **kwargs)
    except requests.exceptions.HTTPError as exc:
        code = getattr(exc.response, "status_code", "?")
        hint = " (check the user name and password)" if code in (401, 403) else ""
        raise PacsError(f"The PACS refused to {what}: HTTP {code}{hint}.") from exc
    except requests.exceptions.RequestException as exc:
        raise PacsError(f"The PACS could not be reached to {what} ({type(exc).__name__}); check its address "
                        f"and that it is running.") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise PacsError(f"The PACS gave an answer that is not valid DICOMweb when asked to {what}.") from exc


def _text(ds, keyword: str) -> str:
    from pydicom.multival import MultiValue

    v = ds.get(keyword, "")
    if isinstance(v, (list, tuple, MultiValue)):
        return "/".join(str(x) for x in v)
    return str(v) if v is not None else ""


def display_date(da: str) -> str:
    """A DICOM date (DA, YYYYMMDD) as a reader writes it (YYYY-MM-DD); anything else unchanged."""
    d = da.strip()
    return f"{d[:4]}-{d[4:6]}-{d[6:]}" if len(d) == 8 and d.isdigit() else da


def display_name(pn: str) -> str:
    """A DICOM person name (PN, family^given^middle^prefix^suffix) as "Family, Given Middle"; anything
    without components unchanged."""
    if "^" not in pn:
        return pn
    family, *rest = (p.strip() for p in pn.split("=")[0].split("^"))
    given = " ".join(p for p in rest[:2] if p)
    return f"{family}, {given}" if family and given else family or given


def _json_to_dataset(item: dict):
    import pydicom

    return pydicom.Dataset.from_json(item)


def list_studies(pacs: Pacs, limit: int = 200) -> list[dict[str, str]]:
    """The studies on the server (newest first), one row each: uid, patient, date, description, modalities."""
    found = _calling("list its studies", pacs.client.search_for_studies, limit=limit,
                     fields=["StudyDescription", "ModalitiesInStudy", "NumberOfStudyRelatedSeries",
                             "NumberOfStudyRelatedInstances"])
    rows = []
    for item in found:
        ds = _json_to_dataset(item)
        rows.append({"study_uid": _text(ds, "StudyInstanceUID"), "patient_id": _text(ds, "PatientID"),
                     "patient_name": _text(ds, "PatientName"), "date": _text(ds, "StudyDate"),
                     "description": _text(ds, "StudyDescription"), "modalities": _text(ds, "ModalitiesInStudy"),
                     "series": _text(ds, "NumberOfStudyRelatedSeries"),
                     "instances": _text(ds, "NumberOfStudyRelatedInstances")})
    return sorted(rows, key=lambda r: r["date"], reverse=True)


def list_series(pacs: Pacs, study_uid: str) -> list[dict[str, str]]:
    """The series of one study: uid, modality, number, description, instance count."""
    found = _calling("list the study's series", pacs.client.search_for_series, study_instance_uid=study_uid,
                     fields=["SeriesDescription", "NumberOfSeriesRelatedInstances", "SeriesNumber"])
    rows = []
    for item in found:
        ds = _json_to_dataset(item)
        rows.append({"series_uid": _text(ds, "SeriesInstanceUID"), "modality": _text(ds, "Modality"),
                     "number": _text(ds, "SeriesNumber"), "description": _text(ds, "SeriesDescription"),
                     "instances": _text(ds, "NumberOfSeriesRelatedInstances")})
    return sorted(rows, key=lambda r: (r["number"].zfill(6), r["description"]))


def fetch_series(pacs: Pacs, study_uid: str, series_uid: str) -> list:
    """Every instance of one series, as pydicom datasets (in memory)."""
    n = [r for r in list_series(pacs, study_uid) if r["series_uid"] == series_uid]
    if n and n[0]["instances"].isdigit() and int(n[0]["instances"]) > MAX_INSTANCES:
        raise InvalidInputError(f"The series holds {n[0]['instances']} images; at most {MAX_INSTANCES} are opened.")
    return _calling("send the series", pacs.retrieve, f"studies/{study_uid}/series/{series_uid}")


def task_for(dss: list) -> str:
    """Which module reads this series: a single radiograph -> pneumonia; an MR series with several frames
    per slice position -> cardiac (cine); another MR series -> atrium (3D). Anything else is refused."""
    from core.dicom_series import slice_groups

    if not dss:
        raise InvalidInputError("The series holds no images.")
    modality = str(dss[0].get("Modality", "")).upper()
    if modality in RESULT_MODALITIES or str(dss[0].get("SOPClassUID", "")).startswith("1.2.840.10008.5.1.4.1.1.7"):
        raise InvalidInputError("This series is a result or a screenshot (a segmentation, report or secondary "
                                "capture), not an image series the modules read.")
    if modality in RADIOGRAPH_MODALITIES:
        if len(dss) != 1:
            raise InvalidInputError(f"The radiograph series holds {len(dss)} images; open a series with one "
                                    "frontal chest radiograph.")
        return "pneumonia"
    if modality == "MR":
        return "cardiac" if max(len(g) for g in slice_groups(dss)) > 1 else "atrium"
    raise InvalidInputError(f"Series of modality '{modality or 'unknown'}' are not read by any module: the app reads "
                            "chest radiographs (CR, DX) and cardiac MR series.")


def dataset_bytes(ds) -> bytes:
    """One dataset as Part-10 bytes (what the upload readers take)."""
    import pydicom

    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=False)
    return buf.getvalue()


def source_order(dss: list) -> list:
    """The instances of a 3D series in the order of ``core.dicom_series.series_volume``'s slices (along the
    slice normal): frame k of a segmentation goes with the k-th."""
    from core.dicom_series import slice_groups

    return [g[0] for g in slice_groups(dss)]


# --------------------------------------------------------------------------- results back into the study


def key_images(report) -> list:
    """The pictures of a report that its Secondary Capture shows: those the report names
    (``CaseReport.key_images``; an atrium report: its middle axial slice and its coronal one), else its last two
    (the radiograph and its heatmap; a cardiac slice's overlays)."""
    if report.key_images:
        return [report.images[i] for i in report.key_images]
    return list(report.images[-2:])


def result_image(report, card: dict, width: int = 1024) -> np.ndarray:
    """A result as one picture for a Secondary Capture: the finding, its figures, the model and the
    research-use line above the report's images, side by side. -> (H, W, 3) uint8. No identifiers."""
    from PIL import Image, ImageDraw, ImageFont

    from core.case_report import _font_dir, _pil
    from core.constants import DISCLAIMER

    font = ImageFont.truetype(str(_font_dir() / "DejaVuSans.ttf"), 20)
    bold = ImageFont.truetype(str(_font_dir() / "DejaVuSans-Bold.ttf"), 24)
    small = ImageFont.truetype(str(_font_dir() / "DejaVuSans.ttf"), 16)
    sha = str(card.get("weights_sha256", "unknown"))[:12]
    lines = [(report.headline, bold)]
    lines += [(f"{k}: {v}", font) for k, v in report.figures[:8]]
    lines += [(f"Model: {report.task}, weights {sha}, trained {str(card.get('created', '?'))[:10]}", small),
              (DISCLAIMER, small)]
    pics = [_pil(im, 480) for im in key_images(report)]
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def wrap(text: str, f) -> list[str]:
        out, cur = [], ""
        for word in text.split():
            trial = f"{cur} {word}".strip()
            if measure.textlength(trial, font=f) > width - 40 and cur:
                out.append(cur)
                cur = word
            else:
                cur = trial
        return out + ([cur] if cur else [])

    wrapped = [(t, f) for text, f in lines for t in wrap(text, f)]
    text_h = 20 + sum(f.size + 10 for _, f in wrapped)
    pic_h = max((p.height for p in pics), default=0)
    canvas = Image.new("RGB", (width, text_h + pic_h + 20), "black")
    d = ImageDraw.Draw(canvas)
    y = 15
    for t, f in wrapped:
        d.text((20, y), t, fill="white", font=f)
        y += f.size + 10
    x = 20
    for p in pics:
        if x + p.width > width:
            break
        canvas.paste(p, (x, text_h))
        x += p.width + 20
    return np.asarray(canvas)


def _new_uid() -> str:
    from highdicom import UID

    return str(UID())


def _result_series_number(ref, offset: int) -> int:
    """Series numbers of results: 9000 + the source's number (mod 100) * 10 + ``offset`` (SC 1, SEG 2),
    so that results sort after the images and beside each other."""
    return 9000 + (int(ref.get("SeriesNumber", 0) or 0) % 100) * 10 + offset


def secondary_capture(ref, rgb: np.ndarray, card: dict, description: str):
    """A Secondary Capture (highdicom) of ``rgb`` (H, W, 3) uint8 in ``ref``'s study (patient and study
    copied from it), as a new series."""
    import highdicom as hd

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"a secondary capture needs an (H, W, 3) image, got {rgb.shape}")
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=ref, pixel_array=rgb, photometric_interpretation=hd.PhotometricInterpretationValues.RGB,
        bits_allocated=8, coordinate_system=hd.CoordinateSystemNames.PATIENT, series_instance_uid=_new_uid(),
        series_number=_result_series_number(ref, 1), sop_instance_uid=_new_uid(), instance_number=1,
        manufacturer=MANUFACTURER, patient_orientation=("L", "P"),
        transfer_syntax_uid="1.2.840.10008.1.2.1")
    sc.SeriesDescription = description[:64]
    sc.BurnedInAnnotation = "YES"
    sc.SoftwareVersions = str(card.get("weights_sha256", "unknown"))[:64]
    return sc


def atrium_segmentation(source: list, mask: np.ndarray, card: dict):
    """The left-atrium ``mask`` (X = columns, Y = rows, Z = slices in ``source_order``) of the 3D series
    ``source`` as a binary DICOM Segmentation (highdicom), one frame per source slice."""
    import highdicom as hd
    from pydicom.sr.codedict import codes

    ordered = source_order(source)
    mask = np.asarray(mask)
    if mask.shape != (int(ordered[0].Columns), int(ordered[0].Rows), len(ordered)):
        raise ValueError(f"mask shape {mask.shape} does not match the series "
                         f"({ordered[0].Columns} x {ordered[0].Rows} x {len(ordered)})")
    frames = np.ascontiguousarray(np.transpose(mask > 0, (2, 1, 0)))  # (slices, rows, columns)
    algo = hd.AlgorithmIdentificationSequence(name="medimg left-atrium U-Net", family=codes.cid7162.ArtificialIntelligence,
                                              version=str(card.get("weights_sha256", "unknown"))[:16])
    desc = hd.seg.SegmentDescription(segment_number=1, segment_label="Left atrium",
                                     segmented_property_category=codes.cid7150.AnatomicalStructure,
                                     segmented_property_type=codes.SCT.LeftAtrium,
                                     algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                                     algorithm_identification=algo)
    seg = hd.seg.Segmentation(
        source_images=ordered, pixel_array=frames, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc], series_instance_uid=_new_uid(), series_number=_result_series_number(ordered[0], 2),
        sop_instance_uid=_new_uid(), instance_number=1, manufacturer=MANUFACTURER,
        manufacturer_model_name="left-atrium segmentation (research use)",
        software_versions=str(card.get("weights_sha256", "unknown"))[:64], device_serial_number="none",
        omit_empty_frames=False)
    seg.SeriesDescription = "AI left atrium mask (research use only)"
    return seg


def segmentation_file(series_zip: bytes, mask: np.ndarray, card: dict) -> bytes:
    """The left-atrium ``mask`` (X, Y, Z) of the DICOM series in ``series_zip`` (as the pages read it, one .zip
    of its files) as a DICOM Segmentation file (Part-10 bytes), built in memory; InvalidInputError, in words,
    when the series lacks what a Segmentation must copy from it (patient, study, frame of reference)."""
    import re

    from core.dicom_series import datasets_from_zip

    dss = datasets_from_zip(series_zip)
    try:
        seg = atrium_segmentation(dss, mask, card)
    except AttributeError as e:  # pydicom: "'Dataset' object has no attribute 'PatientID'"
        m = re.search(r"attribute '(\w+)'", str(e))
        raise InvalidInputError("A DICOM Segmentation copies the patient and the study from its series, and this "
                                f"series has no {m.group(1) if m else 'patient or study identifier'}.") from None
    except ValueError as e:  # highdicom: e.g. no frame of reference
        raise InvalidInputError(f"A DICOM Segmentation cannot be made from this series: {e}") from None
    return dataset_bytes(seg)


def mask_from_segmentation(seg, source: list) -> np.ndarray:
    """Read a binary Segmentation back onto the grid of ``source`` -> (X, Y, Z) uint8 (the inverse of
    ``atrium_segmentation``), frames matched to source slices by their SOP instance UID."""
    import highdicom as hd

    ordered = source_order(source)
    s = seg if isinstance(seg, hd.seg.Segmentation) else hd.seg.Segmentation.from_dataset(seg)
    uids = [str(ds.SOPInstanceUID) for ds in ordered]
    arr = s.get_pixels_by_source_instance(source_sop_instance_uids=uids, segment_numbers=[1],
                                          combine_segments=True)  # (slices, rows, columns)
    return np.ascontiguousarray(np.transpose(np.asarray(arr) > 0, (2, 1, 0))).astype(np.uint8)


def store(pacs: Pacs, datasets: list) -> list[str]:
    """Store new instances in the server (STOW-RS) -> their SOP instance UIDs. Each is sent as a Part-10
    file (with its preamble), which every reader accepts."""
    for ds in datasets:
        if getattr(ds, "preamble", None) is None:
            ds.preamble = b"\0" * 128
    _calling("store the result", pacs.client.store_instances, datasets)
    return [str(ds.SOPInstanceUID) for ds in datasets]


@dataclass
class StudyResult:
    """What running a module on a series gave, and the DICOM instances to send back."""

    task: str
    analysis: object  # core.predict.Analysis
    outgoing: list = field(default_factory=list)  # pydicom datasets (SC, SEG) not yet stored


def run_series(lm_for, dss: list, name: str) -> StudyResult:
    """Run the module ``task_for(dss)`` picks on a fetched series; ``lm_for(task)`` gives its loaded model.
    Builds the Secondary Capture (and, for the atrium, the Segmentation) to send back."""
    from core import predict as P
    from core.dicom_series import series_cine, series_volume
    from core.io import read_image_2d

    task = task_for(dss)
    lm = lm_for(task)
    if task == "pneumonia":
        out = P.analyse_xray(lm, read_image_2d(dataset_bytes(dss[0]), name), name)
    elif task == "cardiac":
        out = P.analyse_cine(lm, series_cine(dss), name)
    else:
        out = P.analyse_atrium(lm, series_volume(dss), name)
    ref = source_order(dss)[0] if task != "pneumonia" else dss[0]
    outgoing = [secondary_capture(ref, result_image(out.report, lm.card), lm.card,
                                  f"AI {task} result (research use only)")]
    if task == "atrium" and out.row.get("quality_passed") == "True":
        outgoing.append(atrium_segmentation(dss, out.mask, lm.card))
    return StudyResult(task, out, outgoing)
