"""Batch prediction from the command line: a row per case in a CSV, never stopping at a bad file.

    python -m core.predict --task pneumonia INPUTS... --csv OUT.csv [--reports DIR]
    python -m core.predict --task cardiac   INPUTS... --csv OUT.csv [--reports DIR]
    python -m core.predict --task atrium    INPUTS... --csv OUT.csv [--reports DIR] [--masks DIR] [--truth DIR]

INPUTS are files or folders (searched recursively):
- pneumonia: PNG, JPEG or DICOM radiographs (DICOM files may have no extension);
- cardiac: 4D cine NIfTI files (x, y, slice, time; ED and ES found from the LV cavity curve), or ACDC-style
  patient folders (Info.cfg naming the ED and ES frames, with patientNNN_frameXX.nii.gz beside it);
- atrium: 3D NIfTI volumes (files ending _gt, _seg or _mask are taken for masks and skipped);
- cardiac and atrium: a DICOM series as one .zip of its files (cardiac: the cine series).
Atrium with --truth DIR: each volume is compared with its reference mask in DIR, found by the volume's name
(CASE.nii.gz, or CASE_gt / _seg / _mask / _label .nii[.gz]; under the same subfolder first): Dice, IoU, HD95 and
the volume error join its row and report, whether or not the quality check passed.
A case that cannot be read or analysed gets a row with status "error" and the reason; the run goes on.
Exit status 0 when every case got a result (a withheld diagnosis counts), 1 when any case failed.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from core.errors import MedImgError
from core.tasks import TASKS

XRAY_SUFFIXES = (".png", ".jpg", ".jpeg", ".dcm", ".dicom")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
MASK_MARKERS = ("_gt", "_seg", "_mask", "_label")

COLUMNS = {
    "pneumonia": ["p_pneumonia", "threshold"],
    "cardiac": ["p_disease", "threshold", "ed_frame", "es_frame", "lv_ef", "rv_ef", "most_likely",
                "p_NOR", "p_DCM", "p_HCM", "p_MINF", "p_RV", "lv_edv_ml", "lv_esv_ml", "lv_sv_ml", "lv_mass_g",
                "rv_edv_ml", "rv_esv_ml", "rv_sv_ml", "volumes_note", "measures_note"],
    "atrium": ["volume_ml", "quality_passed", "quality_reasons", "mask"],
}
# with --truth: the agreement with each volume's reference mask
TRUTH_COLUMNS = ["truth", "dice", "iou", "hd95_mm", "volume_ml_predicted", "volume_ml_truth", "volume_error_pct"]
COMMON = ["case", "input", "status", "finding", "message", "report"]


@dataclass(frozen=True)
class Case:
    """One unit of work: ``paths`` are its files (an ACDC folder: ED then ES)."""

    name: str
    paths: tuple[Path, ...]
    kind: str  # "file", "cine" or "acdc"


def _nifti_stem(p: Path) -> str:
    n = p.name
    for ext in (".nii.gz", ".nii", ".zip"):
        if n.lower().endswith(ext):
            return n[: -len(ext)]
    return p.stem


def _is_nifti(p: Path) -> bool:
    return p.name.lower().endswith(NIFTI_SUFFIXES)


def _acdc_case(folder: Path) -> Case | None:
    from core.io import parse_info_cfg

    info = parse_info_cfg(folder / "Info.cfg")
    if "ED" not in info or "ES" not in info:
        return None
    try:
        ed, es = (folder / f"{folder.name}_frame{int(info[k]):02d}.nii.gz" for k in ("ED", "ES"))
    except ValueError:
        return None
    return Case(folder.name, (ed, es), "acdc")


def find_cases(task: str, inputs: list[Path]) -> Iterator[Case]:
    """The cases under ``inputs`` for ``task``, in a stable order; a missing input becomes a case whose
    reading fails (so it gets an error row)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    for inp in inputs:
        if not inp.exists():
            yield Case(inp.name or str(inp), (inp,), "file")
            continue
        if inp.is_file():
            stem = _nifti_stem(inp) if _is_nifti(inp) or inp.suffix.lower() == ".zip" else inp.name
            yield Case(stem, (inp,), "cine" if task == "cardiac" else "file")
            continue
        files = sorted(p for p in inp.rglob("*") if p.is_file())
        if task == "pneumonia":
            for p in files:
                if p.suffix.lower() in XRAY_SUFFIXES or (p.suffix == "" and not p.name.startswith(".")):
                    yield Case(str(p.relative_to(inp)), (p,), "file")
        elif task == "atrium":
            for p in files:
                rel = p.relative_to(inp)
                if (_is_nifti(p) or p.suffix.lower() == ".zip") \
                        and not any(_nifti_stem(p).lower().endswith(m) for m in MASK_MARKERS) \
                        and not any(q.lower().startswith("label") for q in rel.parts[:-1]):
                    yield Case(str(rel.parent / _nifti_stem(p)).removeprefix("./"), (p,), "file")
        else:
            acdc_dirs = sorted({p.parent for p in files if p.name == "Info.cfg"})
            for d in acdc_dirs:
                c = _acdc_case(d)
                if c is not None:
                    yield c
            for p in files:
                if (_is_nifti(p) or p.suffix.lower() == ".zip") and p.parent not in acdc_dirs and "_gt" not in p.name:
                    yield Case(str(p.relative_to(inp).parent / _nifti_stem(p)).removeprefix("./"), (p,), "cine")


def find_truth(case: Case, truth_dir: Path) -> Path | None:
    """The reference mask of an atrium ``case`` in ``truth_dir``: CASE or CASE + one of MASK_MARKERS, as .nii.gz
    or .nii, looked for under the case's own subfolder first, then at the top of ``truth_dir``; never the input
    itself (masks may lie beside the volumes). None if there is none."""
    rel = Path(case.name)
    inputs = {q.resolve() for q in case.paths}
    for folder in dict.fromkeys([truth_dir / rel.parent, truth_dir]):
        for marker in ("", *MASK_MARKERS):
            for ext in NIFTI_SUFFIXES[::-1]:  # .nii.gz first
                cand = folder / f"{rel.name}{marker}{ext}"
                if cand.is_file() and cand.resolve() not in inputs:
                    return cand
    return None


def _read(p: Path) -> bytes:
    try:
        return p.read_bytes()
    except OSError as e:
        raise MedImgError(f"cannot read {p}: {e.strerror or e}") from None


def _fmt(x: float | None, nd: int = 4) -> str:
    return "" if x is None else f"{x:.{nd}f}"


@dataclass
class Analysis:
    """What one case gave: its CSV ``row``, its ``report`` (when asked for) and, for the atrium, the mask on
    the input's grid (X, Y, Z) uint8."""

    row: dict[str, str]
    report: object | None = None  # core.case_report.CaseReport
    mask: object | None = None  # np.ndarray


def analyse_xray(lm, image, name: str, report: bool = True) -> Analysis:
    """A chest radiograph (``core.io.Image2D``) -> finding, probability, report."""
    from core import case_report as R
    from core.pneumonia import predict_xray
    from core.runtime import verdict_band

    row: dict[str, str] = {"case": name}
    res = predict_xray(lm, image, explain=report)
    if res.withheld:
        row.update(status="withheld", message=res.withheld)
    else:
        band = verdict_band(res.probability, res.threshold, calibrated=res.calibrated)
        row.update(status="ok" if band != "uncertain" else "uncertain",
                   finding={"positive": "pneumonia", "negative": "no pneumonia",
                            "uncertain": "uncertain: refer"}[band],
                   p_pneumonia=_fmt(res.probability), threshold=_fmt(res.threshold))
    return Analysis(row, R.xray_report(res, image, name) if report else None)


def cardiac_measure_cells(measures: dict | None, volumes: dict[str, float] | None) -> dict[str, str]:
    """CSV cells of the ejection fractions (``CardiacResult.measures``, fractions) and volumes (mL; LV mass g). A
    value that is not ``core.cardiac.measurable`` (an ejection fraction or stroke volume of 0 or less) is left
    empty and named in ``measures_note``, as the page and the report leave it out: a negative figure is never
    written."""
    from core.cardiac import FEATURES, NOT_SMALLER_AT_ES, VOLUMES, measurable

    values = {k: (measures[k], k, 3) for k in ("lv_ef", "rv_ef")} if measures is not None else {}
    values |= {k: (v, f"{k}_{'g' if k == 'lv_mass' else 'ml'}", 1) for k, v in (volumes or {}).items()}
    out = {col: _fmt(v, nd) if measurable(k, v) else "" for k, (v, col, nd) in values.items()}
    gone = [k for k, (v, _, _) in values.items() if not measurable(k, v)]
    if gone:
        names = {"lv_ef": "LV ejection fraction", "rv_ef": FEATURES["rv_ef"], **VOLUMES}
        out["measures_note"] = f"{', '.join(names[k] for k in gone)}: {NOT_SMALLER_AT_ES}"
    return out


def analyse_cardiac(lm, ed, es, name: str, report: bool = True) -> Analysis:
    """The ED and ES frames (``core.io.Volume``) of one study -> diagnosis, probabilities, report."""
    from core import case_report as R
    from core.cardiac import cardiac_band, predict_cardiac

    row: dict[str, str] = {"case": name}
    res = predict_cardiac(lm, ed, es, explain=report)
    if res.withheld:
        row.update(status="withheld", message=res.withheld)
    elif res.frames_swapped:
        row.update(status="error", message="the ED and ES frames look swapped (LV cavity smaller at ED)")
    else:
        band, disagree = cardiac_band(res, lm.diagnosis)
        row.update(status="ok" if band != "uncertain" else "uncertain",
                   finding={"positive": "disease", "negative": "normal", "uncertain": "uncertain: refer"}[band],
                   p_disease=_fmt(res.probability), threshold=_fmt(res.threshold))
        if disagree:
            row["message"] = disagree
        row.update(cardiac_measure_cells(res.measures(), res.volumes))
        if res.volumes is None and res.volumes_withheld:
            row["volumes_note"] = res.volumes_withheld
        if res.diagnosis is not None and lm.diagnosis is not None:
            probs = res.diagnosis["probabilities"]
            top = max(probs, key=probs.get)
            row["most_likely"] = top if probs[top] >= float(lm.diagnosis["uncertain_below"]) else "uncertain"
            row.update({f"p_{g}": _fmt(p) for g, p in probs.items()})
    return Analysis(row, R.cardiac_report(res, name, lm.diagnosis) if report else None)


def analyse_cine(lm, cine, name: str, report: bool = True) -> Analysis:
    """A 4D cine (``core.io.Cine``): ED and ES from the LV cavity curve, then ``analyse_cardiac``."""
    from core.cardiac import cardiac_cycle

    cyc = cardiac_cycle(lm, cine)
    out = analyse_cardiac(lm, cine.frame(cyc.ed), cine.frame(cyc.es), name, report)
    out.row.update(ed_frame=str(cyc.ed + 1), es_frame=str(cyc.es + 1))
    return out


def analyse_atrium(lm, vol, name: str, report: bool = True, truth=None) -> Analysis:
    """A 3D volume (``core.io.Volume``) -> left-atrium mask on its grid, volume, quality verdict, report; with
    ``truth`` (a reference mask (X, Y, Z) on the volume's grid) also Dice, IoU, HD95 and the volume error."""
    import numpy as np

    from core import atrium as A
    from core import case_report as R
    from core import metrics as M
    from core.atrium import segment_atrium

    res = segment_atrium(lm, vol)
    passed = res.reliable
    row = {"case": name, "status": "ok" if passed else "withheld",
           "finding": f"left atrium {res.volume_ml:.1f} mL" if passed else "no reliable segmentation",
           "volume_ml": _fmt(res.volume_ml, 2) if passed else "", "quality_passed": str(passed),
           "quality_reasons": "; ".join(getattr(res.quality, "reasons", []) or [])}
    mets = None
    if truth is not None:
        mets = M.segmentation_metrics(res.mask, truth, vol.spacing)
        row.update(dice=_fmt(mets["dice"]), iou=_fmt(mets["iou"]),
                   hd95_mm=_fmt(mets["hd95_mm"], 2) if np.isfinite(mets["hd95_mm"]) else "",
                   volume_ml_predicted=_fmt(mets["volume_ml_pred"], 2), volume_ml_truth=_fmt(mets["volume_ml_true"], 2),
                   volume_error_pct=_fmt(mets["volume_error_pct"], 2) if np.isfinite(mets["volume_error_pct"]) else "")
    rep = None
    if report:
        data_c, sp_c, _ = A.to_canonical(vol.data, vol.affine, vol.spacing)
        mask_c = A.to_canonical(res.mask, vol.affine, vol.spacing)[0]
        truth_c = A.to_canonical(truth, vol.affine, vol.spacing)[0] if truth is not None else None
        rep = R.atrium_report(res, data_c, mask_c, name, mets, truth_c, sp_c)
    return Analysis(row, rep, res.mask)


def run_case(task: str, lm, case: Case, reports: Path | None, masks: Path | None,
             truth_dir: Path | None = None) -> dict[str, str]:
    """One CSV row for one case (its report and mask written when asked; atrium: compared with its reference
    mask in ``truth_dir`` when one is there, see ``find_truth``); raises MedImgError for what the user must fix."""
    from core import case_report as R
    from core.dicom_series import read_cine_any, read_volume_any
    from core.io import nifti_to_bytes, read_image_2d, read_image_volume, read_mask

    want = reports is not None
    if task == "pneumonia":
        out = analyse_xray(lm, read_image_2d(_read(case.paths[0]), case.paths[0].name), case.name, want)
    elif task == "cardiac" and case.kind == "acdc":
        ed, es = (read_image_volume(_read(p), p.name) for p in case.paths)
        out = analyse_cardiac(lm, ed, es, case.name, want)
        out.row.update(ed_frame=case.paths[0].name, es_frame=case.paths[1].name)
    elif task == "cardiac":
        out = analyse_cine(lm, read_cine_any(_read(case.paths[0]), case.paths[0].name), case.name, want)
    else:
        vol = read_volume_any(_read(case.paths[0]), case.paths[0].name)
        truth, note = None, ""
        if truth_dir is not None:
            tp = find_truth(case, truth_dir)
            if tp is None:
                note = f"no reference mask for it in {truth_dir}"
            else:
                try:  # a reference that does not fit is said in the row; the segmentation still counts
                    truth = read_mask(_read(tp), vol, tp.name)
                except MedImgError as e:
                    note = f"reference mask {tp.name} not used: {e}"
        out = analyse_atrium(lm, vol, case.name, want, truth)
        if truth_dir is not None:
            out.row["truth"] = str(tp) if truth is not None else ""
            if note:
                out.row["message"] = note
        if masks is not None:
            path = masks / f"{R.safe_file_name(case.name.replace('/', '_'))}_left_atrium_mask.nii.gz"
            path.write_bytes(nifti_to_bytes(out.mask, vol.affine))
            out.row["mask"] = str(path)
    row = {"case": case.name, "input": ";".join(str(p) for p in case.paths), **out.row}
    if out.report is not None and reports is not None:
        path = reports / f"{R.safe_file_name(case.name.replace('/', '_'))}_report.pdf"
        path.write_bytes(R.render_pdf(out.report, lm.card))
        row["report"] = str(path)
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.predict", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=list(TASKS))
    ap.add_argument("inputs", nargs="+", type=Path, help="files or folders")
    ap.add_argument("--csv", required=True, type=Path, help="where to write a row per case")
    ap.add_argument("--reports", type=Path, default=None, help="folder for a PDF report per case")
    ap.add_argument("--masks", type=Path, default=None, help="atrium: folder for the predicted masks (NIfTI)")
    ap.add_argument("--truth", type=Path, default=None,
                    help="atrium: folder of reference masks, matched by name (see above); adds Dice, HD95, ...")
    ap.add_argument("--weights", type=Path, default=None, help="weights folder (default ./weights)")
    args = ap.parse_args(argv)
    from core.precision import flush_subnormals

    flush_subnormals()  # before the first torch operation (see there)
    for opt in ("masks", "truth"):
        if getattr(args, opt) is not None and args.task != "atrium":
            ap.error(f"--{opt} applies to --task atrium only")
    if args.truth is not None and not args.truth.is_dir():
        ap.error(f"--truth {args.truth}: no such folder")
    for d in (args.reports, args.masks):
        if d is not None:
            d.mkdir(parents=True, exist_ok=True)
    args.csv.parent.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    from core.inference import load_model

    try:
        lm = load_model(args.task, args.weights)
    except MedImgError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    cases = list(find_cases(args.task, args.inputs))
    if not cases:
        print(f"error: no {args.task} inputs found under {', '.join(map(str, args.inputs))}", file=sys.stderr)
        return 2
    failed = 0
    with args.csv.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COMMON + COLUMNS[args.task] + (TRUTH_COLUMNS if args.truth else []),
                           extrasaction="ignore")
        w.writeheader()
        for case in tqdm(cases, desc=args.task, unit="case", file=sys.stderr):
            try:
                row = run_case(args.task, lm, case, args.reports, args.masks, args.truth)
            except MedImgError as e:
                row = {"case": case.name, "input": ";".join(map(str, case.paths)), "status": "error",
                       "message": str(e)}
            except Exception as e:  # noqa: BLE001  (a batch never stops at one case; the row says what happened)
                row = {"case": case.name, "input": ";".join(map(str, case.paths)), "status": "error",
                       "message": f"unexpected error ({type(e).__name__}): {e}"}
            failed += row.get("status") == "error"
            w.writerow(row)
            fh.flush()
    print(f"{len(cases)} case(s), {failed} error(s) -> {args.csv}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
