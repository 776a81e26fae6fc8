"""A one-to-two page PDF report of one case (fpdf2), built in memory: the input (no identifying fields),
the result with its probability, threshold and calibration note, the heatmap or overlay images, the measured
figures, the model's name, version, weights sha256, validation figures and intended population, and the
research-use disclaimer. Nothing is written to disk.

The pages and the batch command (``python -m core.predict --reports DIR``) build a :class:`CaseReport` with
one of the ``*_report`` functions and render it with :func:`render_pdf`."""
from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from core.constants import DISCLAIMER
from core.tasks import TASKS


@dataclass(frozen=True)
class ReportImage:
    """One picture of the report: ``rgb`` (H, W, 3) uint8, or (H, W) float in [0, 1] (grey)."""

    caption: str
    rgb: np.ndarray

    def __post_init__(self) -> None:
        a = np.asarray(self.rgb)
        if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)) or a.size == 0:
            raise ValueError(f"a report image must be (H, W) or (H, W, 3), got shape {a.shape}")


@dataclass
class CaseReport:
    """What one case's report says; ``render_pdf`` lays it out."""

    task: str
    case_name: str
    headline: str  # the finding (or why none is given) in one or two sentences
    figures: list[tuple[str, str]] = field(default_factory=list)  # (measure, value as shown)
    images: list[ReportImage] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # threshold, calibration and quality notes
    input_info: list[tuple[str, str]] = field(default_factory=list)  # non-identifying fields of the input
    key_images: tuple[int, ...] = ()  # the images (indices) a one-picture summary shows; () = the last two

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; choose one of {', '.join(TASKS)}")
        if not self.headline.strip():
            raise ValueError("a report needs a headline (the finding, or why there is none)")


def safe_file_name(text: str) -> str:
    """``text`` as one file name: anything but letters, digits, '-', '_' and '.' becomes '_'."""
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text) or "case"


def case_stem(name: str) -> str:
    """A file-name stem for what is written about a case: the input's name without folders, the "sample "
    prefix or NIfTI/DICOM/image/zip extensions."""
    stem = name.removeprefix("sample ").replace("\\", "/").split("/")[-1]
    for ext in (".nii.gz", ".nii", ".gz", ".zip", ".dcm", ".dicom", ".png", ".jpg", ".jpeg"):
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    return safe_file_name(stem)


def with_training_note(report: CaseReport, case: str | None) -> CaseReport:
    """The report with, first among its notes, that its input is the model's training case ``case`` (if any)."""
    if not case:
        return report
    from dataclasses import replace

    from core.provenance import training_note

    return replace(report, notes=[training_note(case), *report.notes])


def _font_dir() -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"  # DejaVu ships with matplotlib: any language's text


def model_facts(task: str, card: dict) -> list[tuple[str, str]]:
    """(fact, value) rows naming the model behind a result: its name, version, weights and figures."""
    from core.report import figure_line

    spec = TASKS[task]
    arch = card.get("architecture", {})
    return [
        ("Model", f"{spec.title}: {arch.get('name', spec.architecture)}"),
        ("Version", f"trained {str(card.get('created', '?'))[:10]}, code {str(card.get('git_commit', '?'))[:10]}"),
        ("Weights sha256", str(card.get("weights_sha256", "unknown"))),
        ("Trained on", spec.dataset),
        ("Validation", figure_line(task, card)),
        ("Intended use", spec.intended_use),
    ]


def _pil(img: ReportImage, max_side: int = 640):
    from PIL import Image

    a = np.ascontiguousarray(img.rgb)
    if a.dtype != np.uint8:
        a = (np.clip(a, 0, 1) * 255).round().astype(np.uint8)
    im = Image.fromarray(a)
    if max(im.size) > max_side:  # the report stays small; 640 px is more than print resolution at this size
        im.thumbnail((max_side, max_side))
    return im.convert("RGB")


def notice_pdf(title: str, message: str) -> bytes:
    """A one-page PDF that says only ``message`` (and the disclaimer): what the download gives when the report
    itself could not be built, so that a click never ends in silence."""
    from fpdf import FPDF

    fd = _font_dir()
    pdf = FPDF(format="A4")
    pdf.add_font("DejaVu", "", str(fd / "DejaVuSans.ttf"))
    pdf.add_font("DejaVu", "B", str(fd / "DejaVuSans-Bold.ttf"))
    pdf.add_page()
    pdf.set_font("DejaVu", "B", 14)
    pdf.multi_cell(pdf.epw, 8, title, new_x="LMARGIN", new_y="NEXT")
    pdf.set_font("DejaVu", "", 10)
    pdf.multi_cell(pdf.epw, 5.5, f"{message}\n\n{DISCLAIMER}", new_x="LMARGIN", new_y="NEXT")
    return bytes(pdf.output())


def render_pdf(report: CaseReport, card: dict, when: _dt.datetime | None = None) -> bytes:
    """The report as PDF bytes (A4, one or two pages)."""
    from fpdf import FPDF
    from fpdf.fonts import FontFace

    fd = _font_dir()
    pdf = FPDF(format="A4")
    pdf.set_margins(15, 14, 15)
    pdf.set_auto_page_break(True, margin=14)
    pdf.add_font("DejaVu", "", str(fd / "DejaVuSans.ttf"))
    pdf.add_font("DejaVu", "B", str(fd / "DejaVuSans-Bold.ttf"))
    pdf.set_title(f"{TASKS[report.task].title} - {report.case_name}")
    pdf.set_creator("MedImg research app")
    when = when or _dt.datetime.now(_dt.timezone.utc)
    pdf.set_creation_date(when)
    pdf.add_page()
    width = pdf.epw

    def text(s: str, size: float = 9.5, bold: bool = False, h: float = 5.0) -> None:
        pdf.set_font("DejaVu", "B" if bold else "", size)
        pdf.multi_cell(width, h, s, new_x="LMARGIN", new_y="NEXT")

    def table(rows: list[tuple[str, str]], widths: tuple[float, float] = (45, 135)) -> None:
        if not rows:
            return
        pdf.set_font("DejaVu", "", 8.5)
        with pdf.table(col_widths=widths, text_align="LEFT", line_height=4.6, first_row_as_headings=False,
                       borders_layout="HORIZONTAL_LINES") as t:
            for k, v in rows:
                r = t.row()
                r.cell(str(k), style=FontFace(emphasis="BOLD"))
                r.cell(str(v))
        pdf.ln(2)

    text(f"{TASKS[report.task].title}: case report", 15, bold=True, h=8)
    text(f"Case: {report.case_name}    Generated: {when.strftime('%Y-%m-%d %H:%M UTC')}", 8.5)
    pdf.set_text_color(160, 60, 0)
    text(DISCLAIMER, 8.5, bold=True)
    pdf.set_text_color(0, 0, 0)
    pdf.ln(2)
    text("Result", 12, bold=True, h=7)
    text(report.headline, 10.5, bold=True)
    pdf.ln(1)
    table(report.figures, (70, 110))
    for n in report.notes:
        text(n, 8.5, h=4.4)
    if report.notes:
        pdf.ln(2)

    if report.images:
        text("Images", 12, bold=True, h=7)
        per_row = min(3, len(report.images))
        gap = 4
        w = (width - gap * (per_row - 1)) / per_row
        for i in range(0, len(report.images), per_row):
            row = report.images[i : i + per_row]
            pils = [_pil(im) for im in row]
            h = max(w * p.size[1] / p.size[0] for p in pils)
            if pdf.get_y() + h + 12 > pdf.h - pdf.b_margin:
                pdf.add_page()
            y0 = pdf.get_y()
            for j, (im, p) in enumerate(zip(row, pils)):
                x = pdf.l_margin + j * (w + gap)
                pdf.image(p, x=x, y=y0, w=w)
                pdf.set_xy(x, y0 + h + 1)
                pdf.set_font("DejaVu", "", 7.5)
                pdf.multi_cell(w, 3.6, im.caption)
            pdf.set_xy(pdf.l_margin, y0 + h + 12)

    if report.input_info:
        text("Input (identifying fields are never shown)", 12, bold=True, h=7)
        table(report.input_info)
    text("Model", 12, bold=True, h=7)
    table(model_facts(report.task, card))
    text("Probabilities and figures come from the model and the files its training and evaluation wrote; validation "
         "figures are from patients held out of training at the training centres, not from an independent test "
         "set. A clinician must review every result.", 8)
    return bytes(pdf.output())


# --------------------------------------------------------------------------- per task


def format_probability(p: float) -> str:
    """A model's probability as a reader sees it (pages, case reports, result images): a percent with one
    decimal, but never "0.0%" or "100.0%", which would read as certainty no model trained on a few thousand
    images or 80 patients has; those show as "< 0.1%" and "> 99.9%"."""
    if not 0.0 <= p <= 1.0:  # also NaN
        raise ValueError(f"a probability lies in [0, 1], got {p}")
    text = f"{p:.1%}"
    return "< 0.1%" if text == "0.0%" else "> 99.9%" if text == "100.0%" else text


def _pct(p: float) -> str:  # thresholds and other shares: plain
    return f"{p:.1%}"


def xray_report(result, image, case_name: str) -> CaseReport:
    """Report of a chest radiograph (``core.pneumonia.XRayResult`` and its ``core.io.Image2D``)."""
    from core.runtime import UNCERTAIN_MARGIN, verdict_band
    from core.visualize import grey_rgb, heatmap_overlay

    info = [(str(k), str(v)) for k, v in (image.info or {}).items()]
    images = [ReportImage("Input image", grey_rgb(image.pixels))]
    if result.withheld:
        return CaseReport("pneumonia", case_name, f"No diagnosis. {result.withheld}", images=images,
                          input_info=info)
    band = verdict_band(result.probability, result.threshold, calibrated=result.calibrated)
    headline = {"positive": "Finding: pneumonia suggested.", "negative": "Finding: no pneumonia suggested.",
                "uncertain": "Uncertain - refer to a specialist: the model cannot call this image either way."}[band]
    notes = [f"Decision threshold {_pct(result.threshold)} (chosen on validation data under acquisition "
             f"perturbations); within {UNCERTAIN_MARGIN:.0%} of it no verdict is given."]
    if result.calibrated:
        notes.append("P(pneumonia) is calibrated on the validation images, where 3 in 4 children had pneumonia: among "
                     "such images about this share had it; at a lower prevalence the true share is lower.")
    else:
        notes.append("P(pneumonia) is the model's output after the sigmoid, not a calibrated risk.")
    if result.heatmap is not None:
        images.append(ReportImage(f"Grad-CAM for the '{'pneumonia' if result.positive else 'normal'}' decision (red = "
                                  "regions that most raised it), on the model's square input",
                                  heatmap_overlay(result.display, result.heatmap, 0.4)))
    return CaseReport("pneumonia", case_name, headline,
                      [("P(pneumonia)", format_probability(result.probability)),
                       ("Decision threshold", _pct(result.threshold))],
                      images, notes, info)


def cardiac_report(result, case_name: str, diagnosis_model: dict | None = None) -> CaseReport:
    """Report of a cine study (``core.cardiac.CardiacResult``); ``diagnosis_model`` is the five-class card."""
    from core.cardiac import FEATURES, GROUP_NAMES, GROUPS, VOLUMES, cardiac_band, feature_text, volume_text
    from core.runtime import UNCERTAIN_MARGIN
    from core.visualize import heatmap_overlay, label_overlay

    k = len(result.slices) // 2
    mid = [k // 2, k + k // 2]  # a mid-ventricular slice at ED and at ES
    images = []
    for i in mid:
        images.append(ReportImage(result.slice_labels[i], np.rot90(np.asarray(result.slices[i]))))
        if result.segmentation is not None:
            images.append(ReportImage(f"{result.slice_labels[i]}: segmentation (RV, myocardium, LV cavity)",
                                      np.rot90(label_overlay(result.slices[i], result.segmentation[i], alpha=0.4)[0])))
        if result.heatmap is not None:
            images.append(ReportImage(f"{result.slice_labels[i]}: Grad-CAM",
                                      np.rot90(heatmap_overlay(result.slices[i], result.heatmap[i], 0.4))))
    if result.withheld:
        return CaseReport("cardiac", case_name, f"No diagnosis. {result.withheld}", images=images[:3])
    if result.frames_swapped:
        return CaseReport("cardiac", case_name, "No diagnosis: the ED and ES frames look swapped (the LV cavity is "
                          "smaller at the frame given as end-diastole).", images=images[:3])
    band, disagree = cardiac_band(result, diagnosis_model)
    headline = {"positive": "Finding: the heart looks diseased (any of DCM, HCM, previous MI, abnormal RV).",
                "negative": "Finding: the heart looks normal.",
                "uncertain": "Uncertain - refer to a specialist: "
                             + (f"{disagree}." if disagree else "P(disease) is close to the decision threshold.")}[band]
    figures = [("P(disease)", format_probability(result.probability)), ("Decision threshold", _pct(result.threshold))]
    notes = [f"Within {UNCERTAIN_MARGIN:.0%} of the threshold no verdict is given."]
    sh = result.measures()
    if sh is not None:
        figures += [("LV ejection fraction (estimate)", feature_text("lv_ef", sh["lv_ef"])),
                    ("RV ejection fraction (estimate)", feature_text("rv_ef", sh["rv_ef"])),
                    ("Myocardium / LV cavity at ED", f"{sh['myo_lv_ed']:.2f}"),
                    ("RV / LV cavity at ED", f"{sh['rv_lv_ed']:.2f}")]
        notes.append("Ejection fractions and ratios are estimates from the model's own segmentation of "
                     + ("every slice of both frames" if sh["source"] == "every slice" else "the 8 slices per frame "
                        "it used") + " (summed over the same slices, so no voxel size is needed), not clinical "
                     "measurements.")
        if result.at_crop_edge:
            notes.append("Part of the heart may be missing: the model's segmentation reaches the edge of the square "
                         "of the image it reads, so the ejection fractions and ratios may be wrong too.")
    if result.volumes is not None:
        figures += [(VOLUMES[k], volume_text(k, v)) for k, v in result.volumes.items()]
        notes.append("Volumes by summation of discs over the model's segmentation of every slice with the file's voxel "
                     "size (LV mass: ED myocardium x 1.05 g/mL); not indexed to body surface area; papillary muscles "
                     "count as cavity.")
    elif result.volumes_withheld:
        notes.append(f"No volumes in mL or LV mass in g: {result.volumes_withheld}")
    if result.diagnosis is not None and diagnosis_model is not None:
        probs = result.diagnosis["probabilities"]
        top = max(probs, key=probs.get)
        below = float(diagnosis_model["uncertain_below"])
        if probs[top] < below:
            headline += f" Five classes: uncertain (no class reaches {below:.0%})."
        else:
            headline += f" Most likely: {GROUP_NAMES[top]} ({top}), {format_probability(probs[top])}."
        figures += [(f"P({GROUP_NAMES[g]})", format_probability(probs[g])) for g in GROUPS]
        rng = diagnosis_model.get("normal_ranges", {})
        for key, bounds in rng.items():  # the file's ranges sit beside a "what" line that says what they are
            if key in result.diagnosis["features"]:
                lo, hi = bounds
                v = result.diagnosis["features"][key]
                flag = "" if lo <= v <= hi else "  (outside)"
                figures.append((FEATURES.get(key, key), f"{feature_text(key, v)}; normal {feature_text(key, lo)}-"
                                f"{feature_text(key, hi)}{flag}"))
        cv = diagnosis_model.get("cross_validation", {}).get("calibrated")
        if cv:
            notes.append(f"Five-class probabilities calibrated on cross-validation; five-class accuracy in "
                         f"{cv['n']}-patient cross-validation {cv['accuracy']:.2f} "
                         f"({cv['accuracy_ci95'][0]:.2f}-{cv['accuracy_ci95'][1]:.2f}).")
    return CaseReport("cardiac", case_name, headline, figures, images, notes)


def atrium_report(result, canonical: np.ndarray, mask_c: np.ndarray, case_name: str,
                  metrics: dict | None = None, truth_c: np.ndarray | None = None,
                  spacing_c: tuple[float, float, float] | None = None) -> CaseReport:
    """Report of a left-atrium segmentation (``core.atrium.AtriumResult``); ``canonical``/``mask_c``/``truth_c``
    are the volume and masks in the canonical (RAS) orientation, (X, Y, Z), and ``spacing_c`` its voxel size
    (mm; the coronal and sagittal pictures get square pixels with it)."""
    from core.visualize import (PLANES, mask_overlay, middle_slice, plane_pixel_mm, radiological_slice,
                                square_pixels, with_orientation_markers)

    def picture(plane, k: int, caption: str) -> ReportImage:
        img, _ = mask_overlay(radiological_slice(canonical, plane, k), radiological_slice(mask_c, plane, k),
                              radiological_slice(truth_c, plane, k) if truth_c is not None else None, True,
                              truth_c is not None)
        if spacing_c is not None:
            img = square_pixels(img, *plane_pixel_mm(spacing_c, plane))
        return ReportImage(caption, with_orientation_markers(img, plane.markers))

    q = result.quality
    if result.reliable:
        headline = f"Left-atrium volume (predicted): {result.volume_ml:.1f} mL. Quality check passed."
    else:
        headline = ("No reliable segmentation was found, so no volume is reported: "
                    + "; ".join(getattr(q, "reasons", []) or ["quality check failed"]) + ".")
    sp = result.spacing
    figures = [("Left-atrium volume (predicted)", f"{result.volume_ml:.1f} mL" if result.reliable else "withheld"),
               ("Voxel size (from the header)", f"{sp[0]:.2f} x {sp[1]:.2f} x {sp[2]:.2f} mm")]
    if metrics:
        figures += [("3D Dice vs the given mask", f"{metrics['dice']:.3f}"), ("IoU", f"{metrics['iou']:.3f}"),
                    ("HD95", f"{metrics['hd95_mm']:.1f} mm" if np.isfinite(metrics["hd95_mm"]) else "n/a"),
                    ("Volume of the given mask", f"{metrics['volume_ml_true']:.1f} mL"),
                    ("Volume error", f"{metrics['volume_error_pct']:+.1f} %")]
    images = []
    zs = np.nonzero(mask_c.any(axis=(0, 1)))[0]
    picks = ([int(zs[len(zs) // 4]), int(zs[len(zs) // 2]), int(zs[(3 * len(zs)) // 4])] if len(zs)
             else [canonical.shape[2] // 2])
    for z in picks:
        images.append(picture(PLANES["axial"], z, f"Axial slice {z + 1} of {canonical.shape[2]} (radiological view; "
                              "plane and markers from the file's header): predicted mask"
                              + (" and given mask" if truth_c is not None else "")))
    # and the two other planes through the middle of the mask (of the volume if empty): a header that names its
    # planes wrongly (the MSD files call sagittal slices axial) still leaves the reader one true view
    for plane in (PLANES["coronal"], PLANES["sagittal"]):
        k = middle_slice(mask_c, plane.axis)
        images.append(picture(plane, k, f"{plane.name.capitalize()} slice {k + 1} of {canonical.shape[plane.axis]} "
                              "(through the mask's middle)"))
    notes = ["The quality check withholds the volume when the mask is implausible (size, fragments, field of view) "
             "or the model is unsure; its limits come from the training volumes."]
    # a one-picture summary (the PACS Secondary Capture): the middle axial slice and the coronal one
    return CaseReport("atrium", case_name, headline, figures, images, notes,
                      key_images=(len(picks) // 2, len(picks)))
