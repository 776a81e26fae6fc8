"""Out-of-distribution inputs: the pneumonia and cardiac modules withhold the diagnosis.

The OOD set is built here from real shared data and synthetic images (nothing is committed); refusal
and false-refusal rates are written to test-artifacts/ood_report.json.
"""
from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import png_bytes
from scipy import ndimage

from core import io as mio
from core.checkpoint import read_card
from core.config import PROJECT_ROOT
from core.cardiac import predict_cardiac
from core.inference import load_model
from core.pneumonia import predict_xray, predict_xray_batch

RNG = np.random.default_rng(123)
REPORT = PROJECT_ROOT / "test-artifacts" / "ood_report.json"


def _u8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return ((a - a.min()) / max(np.ptp(a), 1e-9) * 255).astype(np.uint8)


def _noise_images(n: int) -> list[np.ndarray]:
    out = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            a = RNG.random((224, 224))
        elif kind == 1:
            a = RNG.normal(size=(224, 224))
        elif kind == 2:
            a = (RNG.random((224, 224)) > 0.5).astype(float)
        else:
            a = ndimage.gaussian_filter(RNG.normal(size=(224, 224)), sigma=RNG.uniform(2, 12))
        out.append(_u8(a))
    return out


def _colour_photos(n: int) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        chans = [ndimage.gaussian_filter(RNG.normal(size=(200, 260)), sigma=RNG.uniform(5, 30)) for _ in range(3)]
        out.append(np.stack([_u8(c) for c in chans], axis=2))
    return out


def _mri_slices(acdc_root, heart_root, n_each: int = 20) -> list[np.ndarray]:
    out = []
    # cases other than those looked at while designing the check (MSD 0-3, every 8th ACDC patient)
    for c in mio.find_atrium_cases(heart_root)[8:12]:
        v = mio.load_nifti_path(c.image_path).data
        for z in np.linspace(0.2, 0.8, n_each // 4):
            out.append(_u8(np.rot90(v[:, :, int(z * (v.shape[2] - 1))])))
    for c in mio.find_cardiac_cases(acdc_root)[3 :: 80 // (n_each // 2)][: n_each // 2]:
        v = mio.load_nifti_path(c.ed_path).data
        for z in (v.shape[2] // 3, 2 * v.shape[2] // 3):
            out.append(_u8(np.rot90(v[:, :, z])))
    return out


@pytest.fixture(scope="module")
def report():
    data: dict = {}
    yield data
    REPORT.parent.mkdir(exist_ok=True)
    REPORT.write_text(json.dumps(data, indent=1))


def test_pneumonia_refuses_ood(xray_root, acdc_root, heart_root, report):
    lm = load_model("pneumonia")
    sets = {
        "colour photographs (synthetic)": [png_bytes(a) for a in _colour_photos(20)],
        "MRI slices given as X-ray (MSD, ACDC)": [png_bytes(a) for a in _mri_slices(acdc_root, heart_root, 40)],
        "noise images": [png_bytes(a) for a in _noise_images(40)],
    }
    res = {}
    for name, files in sets.items():
        refused = [predict_xray(lm, mio.read_image_2d(b, "x.png"), explain=False).withheld is not None for b in files]
        res[name] = {"n": len(files), "refused": int(sum(refused))}
    n = sum(r["n"] for r in res.values())
    rate = sum(r["refused"] for r in res.values()) / n
    # false refusals on validation images (not used to fit the check)
    val = read_card("pneumonia")["data"]["val_cases"][::3]
    pixels = [mio.read_image_2d((xray_root / p).read_bytes()).pixels for p in val]
    _, flags = predict_xray_batch(lm, pixels)
    false_rate = float(flags.mean())
    report["pneumonia"] = {"ood_sets": res, "ood_refusal_rate": rate, "n_ood": n,
                           "val_false_refusal_rate": false_rate, "n_val": len(val)}
    print(report["pneumonia"])
    assert rate >= 0.95, res
    assert false_rate <= 0.02


def _stack(img2d: np.ndarray, n: int = 10) -> mio.Volume:
    a = np.stack([np.roll(img2d, 2 * k, axis=0) for k in range(n)], axis=2).astype(np.float32)
    return mio.Volume(a, np.eye(4), (1.0, 1.0, 1.0))


def test_cardiac_refuses_ood(xray_root, acdc_root, heart_root, report):
    lm = load_model("cardiac")
    xr = [mio.read_image_2d(c.path.read_bytes()).pixels for c in mio.find_xray_cases(xray_root)[::500][:10]]
    pairs = {
        "chest X-rays given as cardiac MRI": [(_stack(x), _stack(np.roll(x, 3, axis=1))) for x in xr],
        "noise volumes": [(_stack(a.astype(np.float32)), _stack(np.roll(a, 5, 0).astype(np.float32)))
                          for a in _noise_images(20)],
    }
    other = []
    for c in mio.find_atrium_cases(heart_root)[:8]:
        v = mio.load_nifti_path(c.image_path)
        z = v.data.shape[2] // 2
        sub = mio.Volume(v.data[:, :, z - 5 : z + 5], v.affine, v.spacing)
        other.append((sub, sub))
    res = {}
    for name, items in pairs.items():
        refused = [predict_cardiac(lm, ed, es, explain=False).withheld is not None for ed, es in items]
        res[name] = {"n": len(items), "refused": int(sum(refused))}
    n = sum(r["n"] for r in res.values())
    rate = sum(r["refused"] for r in res.values()) / n
    extra = sum(predict_cardiac(lm, ed, es, explain=False).withheld is not None for ed, es in other)
    val = set(read_card("cardiac")["data"]["val_cases"])
    cases = [c for c in mio.find_cardiac_cases(acdc_root) if c.patient_id in val]
    fr = [predict_cardiac(lm, mio.load_nifti_path(c.ed_path), mio.load_nifti_path(c.es_path),
                          explain=False).withheld is not None for c in cases]
    report["cardiac"] = {"ood_sets": res, "ood_refusal_rate": rate, "n_ood": n,
                         "left-atrium 3D MRI (not short-axis cine) given as ED/ES": {"n": len(other), "refused": int(extra)},
                         "val_false_refusal_rate": float(np.mean(fr)), "n_val": len(cases)}
    print(report["cardiac"])
    assert rate >= 0.95, res
    assert np.mean(fr) <= 0.02 or sum(fr) <= 0, fr
