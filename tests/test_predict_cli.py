"""The batch command (python -m core.predict): which files make cases, a row per case, never stopping at a
bad file, reports and masks written where asked."""
from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from core.predict import Case, find_cases

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> tuple[int, list[dict]]:
    out = subprocess.run([sys.executable, "-m", "core.predict", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=600)
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    csv_path = Path(args[args.index("--csv") + 1])
    rows = list(csv.DictReader(csv_path.open())) if csv_path.exists() else []
    return out.returncode, rows


def test_cases_from_folders(tmp_path):
    (tmp_path / "xr" / "sub").mkdir(parents=True)
    for n in ("a.png", "sub/b.DCM", "sub/IM0001", "notes.txt", ".hidden"):
        (tmp_path / "xr" / n).write_bytes(b"x")
    names = [c.name for c in find_cases("pneumonia", [tmp_path / "xr"])]
    assert names == ["a.png", "sub/IM0001", "sub/b.DCM"]

    (tmp_path / "la" / "labelsTr").mkdir(parents=True)
    for n in ("v1.nii.gz", "v1_gt.nii.gz", "v2.nii", "labelsTr/v1.nii.gz", "readme.md"):
        (tmp_path / "la" / n).write_bytes(b"x")
    assert [c.name for c in find_cases("atrium", [tmp_path / "la"])] == ["v1", "v2"]

    p = tmp_path / "acdc" / "patient007"
    p.mkdir(parents=True)
    (p / "Info.cfg").write_text("ED: 1\nES: 12\nGroup: NOR\n")
    (tmp_path / "acdc" / "cine4d.nii.gz").write_bytes(b"x")
    cases = list(find_cases("cardiac", [tmp_path / "acdc"]))
    assert cases[0] == Case("patient007", (p / "patient007_frame01.nii.gz", p / "patient007_frame12.nii.gz"), "acdc")
    assert [(c.name, c.kind) for c in cases[1:]] == [("cine4d", "cine")]
    missing = list(find_cases("atrium", [tmp_path / "nope.nii.gz"]))
    assert len(missing) == 1  # a missing input still gets a row
    with pytest.raises(ValueError, match="unknown task"):
        list(find_cases("lungs", [tmp_path]))


def test_pneumonia_batch_keeps_going_past_bad_files_and_writes_reports(tmp_path, xray_root):
    src = sorted((xray_root / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[:2]
    d = tmp_path / "in"
    d.mkdir()
    for p in src:
        shutil.copy(p, d / p.name)
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    rc, rows = _run("--task", "pneumonia", str(d), str(tmp_path / "missing.png"), "--csv", str(tmp_path / "o.csv"),
                    "--reports", str(tmp_path / "rep"))
    assert rc == 1 and len(rows) == 4
    by = {r["case"]: r for r in rows}
    assert by["broken.png"]["status"] == "error" and by["broken.png"]["message"]
    assert by["missing.png"]["status"] == "error"
    for p in src:
        r = by[p.name]
        assert r["status"] in ("ok", "uncertain", "withheld"), r
        if r["status"] != "withheld":
            assert 0.0 <= float(r["p_pneumonia"]) <= 1.0 and float(r["threshold"]) > 0
        assert Path(r["report"]).read_bytes().startswith(b"%PDF")


def test_cardiac_batch_reads_acdc_folders_and_4d_cines(tmp_path, acdc_root):
    pdir = sorted((acdc_root / "ACDC" / "training").glob("patient*"))[0]
    info = {k.strip(): v.strip() for k, v in (ln.split(":", 1) for ln in (pdir / "Info.cfg").read_text().splitlines()
                                              if ":" in ln)}
    ed = nib.load(pdir / f"{pdir.name}_frame{int(info['ED']):02d}.nii.gz")
    es = nib.load(pdir / f"{pdir.name}_frame{int(info['ES']):02d}.nii.gz")
    frames = [np.asarray(ed.dataobj), np.asarray(es.dataobj), np.asarray(ed.dataobj)]
    cine = tmp_path / "cine.nii.gz"
    nib.save(nib.Nifti1Image(np.stack(frames, -1).astype(np.float32), ed.affine), cine)
    from test_dicom_series import _slices, _zip

    # the same cine as a DICOM series (one file per slice and frame, in a zip)
    (tmp_path / "cine_dicom.zip").write_bytes(_zip(_slices(np.round(np.stack(frames, -1)), ed.affine)))
    rc, rows = _run("--task", "cardiac", str(pdir), str(cine), str(tmp_path / "cine_dicom.zip"),
                    "--csv", str(tmp_path / "c.csv"), "--reports", str(tmp_path / "reports"))
    assert rc == 0, rows
    by = {r["case"]: r for r in rows}
    # a PDF per study, built with the committed five-class model (every real study's report failed until 2026-12-06)
    assert all(Path(r["report"]).is_file() for r in rows), rows
    # the shared copy's 1 mm headers: no volumes in mL, and the row says why
    assert not by[pdir.name]["lv_edv_ml"] and "1.00 mm apart" in by[pdir.name]["volumes_note"]
    assert by["cine_dicom"]["status"] in ("ok", "uncertain") and by["cine_dicom"]["es_frame"] == "2"
    assert by[pdir.name]["status"] in ("ok", "uncertain") and 0 <= float(by[pdir.name]["p_disease"]) <= 1
    assert by["cine"]["es_frame"] == "2" and by["cine"]["ed_frame"] in ("1", "3")
    assert float(by["cine"]["lv_ef"]) > 0


def test_cardiac_csv_never_writes_a_negative_ejection_fraction_or_stroke_volume():
    """A poorly segmented RV can be larger at ES than at ED while the LV is right: the row leaves its RV EF and
    stroke volume empty and says why (the batch CSV wrote -0.120 and -14.0 until 2026-12-07)."""
    from core.predict import cardiac_measure_cells

    cells = cardiac_measure_cells({"lv_ef": 0.55, "rv_ef": -0.12},
                                  {"lv_edv": 150.0, "lv_esv": 67.5, "lv_sv": 82.5, "lv_mass": 110.2,
                                   "rv_edv": 120.0, "rv_esv": 134.0, "rv_sv": -14.0})
    assert cells["lv_ef"] == "0.550" and cells["rv_ef"] == "" and cells["lv_sv_ml"] == "82.5"
    assert cells["rv_sv_ml"] == "" and cells["rv_esv_ml"] == "134.0" and cells["lv_mass_g"] == "110.2"
    assert cells["measures_note"].startswith("RV ejection fraction, RV stroke volume: not measurable")
    assert "measures_note" not in cardiac_measure_cells({"lv_ef": 0.6, "rv_ef": 0.5}, None)
    assert cardiac_measure_cells(None, None) == {}


def test_atrium_batch_writes_masks_on_the_input_grid(tmp_path, lge_root):
    img = sorted((lge_root / "LA2018" / "imagesTr").glob("*.nii.gz"))[0]
    noise = tmp_path / "noise.nii.gz"
    nib.save(nib.Nifti1Image(np.random.default_rng(0).random((64, 64, 24)).astype(np.float32), np.eye(4)), noise)
    labels = lge_root / "LA2018" / "labelsTr"
    rc, rows = _run("--task", "atrium", str(img), str(noise), "--csv", str(tmp_path / "a.csv"),
                    "--masks", str(tmp_path / "m"), "--truth", str(labels))
    by = {r["case"]: r for r in rows}
    assert rc == 0 and set(by) == {img.name[:-7], "noise"}
    r = by[img.name[:-7]]
    assert r["status"] == "ok" and 10 < float(r["volume_ml"]) < 250
    m = nib.load(r["mask"])
    assert m.shape == nib.load(img).shape and np.allclose(m.affine, nib.load(img).affine)
    assert by["noise"]["status"] == "withheld" and by["noise"]["volume_ml"] == "" and by["noise"]["quality_reasons"]
    # --truth: the reference found by the volume's name, and the row's figures are those of the written mask
    from core import metrics as M

    assert r["truth"] == str(labels / img.name)
    gt = nib.load(labels / img.name).get_fdata() > 0.5
    assert float(r["dice"]) == pytest.approx(M.dice(np.asarray(m.dataobj) > 0, gt), abs=1e-4) and float(r["dice"]) > 0.7
    assert float(r["volume_ml_truth"]) == pytest.approx(gt.sum() * np.prod(nib.load(img).header.get_zooms()) / 1000,
                                                        abs=0.01)
    assert by["noise"]["truth"] == "" and "no reference mask" in by["noise"]["message"]


def test_find_truth_matches_by_name_never_the_input_itself(tmp_path):
    from core.predict import find_truth

    for n in ("vols/sub/a.nii.gz", "vols/b.nii.gz", "vols/b_gt.nii.gz", "ref/sub/a_mask.nii", "ref/a.nii.gz",
              "ref/c_label.nii.gz", "ref/c_seg.nii.gz"):
        (tmp_path / n).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / n).write_bytes(b"x")
    ref, vols = tmp_path / "ref", tmp_path / "vols"
    # the case's own subfolder first, then the top of the folder
    assert find_truth(Case("sub/a", (vols / "sub" / "a.nii.gz",), "file"), ref) == ref / "sub" / "a_mask.nii"
    assert find_truth(Case("a", (vols / "a.nii.gz",), "file"), ref) == ref / "a.nii.gz"
    assert find_truth(Case("c", (vols / "c.nii.gz",), "file"), ref) == ref / "c_seg.nii.gz"  # _seg before _label
    # masks beside the volumes: the volume itself is not its own reference
    assert find_truth(Case("b", (vols / "b.nii.gz",), "file"), vols) == vols / "b_gt.nii.gz"
    assert find_truth(Case("d", (vols / "d.nii.gz",), "file"), ref) is None
