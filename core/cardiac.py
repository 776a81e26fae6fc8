"""The cardiac task in one place: training the binary model (segmentation U-Net, then a head on shape
descriptors; ``train_cardiac``), prediction on one study (``predict_cardiac``, ``cardiac_cycle``), and
cardiac diagnosis in five classes (NOR, DCM, HCM, MINF, RV) from segmentation-derived features.

As the methods that won ACDC did: the cine study is segmented (the CardiacNet U-Net, every slice of the ED
and ES frames), scale-free features are measured on the masks (ejection fractions, volume ratios,
myocardial wall thickness and its variability relative to the LV size), and a multinomial logistic
regression gives a probability per class. The classifier learns from features of the expert masks of the
training patients (clean shapes) and is applied to the model's own segmentation; temperature scaling,
fitted on out-of-fold predictions, makes its probabilities mean what they say.

The shared ACDC copy has no true voxel spacing, so every feature is a ratio of voxel counts or lengths
within one study (no mm, mL or g). Volumes in mL and the LV mass in g are reported only for a study whose
header gives a voxel size a short-axis cine stack can have (``cine_voxel_size_problem``); their agreement with
expert masks is measured in voxels, where the voxel size cancels.

    python -m core.cardiac [--data-root DIR] [--weights DIR]   # fit and cross-validate -> cardiac_diagnosis.json
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch import nn

from core import io as mio
from core import metrics as M
from core import preprocess as pp
from core.errors import InvalidInputError
from core.concurrency import model_lock
from core.explain import gradcam
from core.io import Cine, Volume
from core.ood import ood_score
from core.precision import autocast
from core.runtime import LoadedModel, load_base, release_memory

if TYPE_CHECKING:  # annotations of the training functions; core.train is imported where they run
    from core.train import FitResult, TrainConfig

GROUPS = ("NOR", "DCM", "HCM", "MINF", "RV")
GROUP_NAMES = {"NOR": "normal", "DCM": "dilated cardiomyopathy", "HCM": "hypertrophic cardiomyopathy",
               "MINF": "previous myocardial infarction", "RV": "abnormal right ventricle"}
FEATURES = {
    "lv_ef": "LV ejection fraction (1 - ES/ED LV cavity volume)",
    "rv_ef": "RV ejection fraction",
    "rv_lv_ed": "RV / LV cavity volume at ED",
    "rv_lv_es": "RV / LV cavity volume at ES",
    "myo_lv_ed": "myocardium / LV cavity volume at ED",
    "myo_es_ed": "myocardium volume ES / ED",
    "thick_mean_ed": "mean wall thickness at ED / LV radius",
    "thick_max_ed": "largest wall thickness at ED / LV radius",
    "thick_cv_ed": "wall-thickness variability at ED (CV within slices)",
    "thick_cvmax_ed": "largest within-slice thickness variability at ED",
    "thick_mean_es": "mean wall thickness at ES / LV radius",
    "thick_max_es": "largest wall thickness at ES / LV radius",
    "thick_cv_es": "wall-thickness variability at ES (CV within slices)",
    "thick_cvmax_es": "largest within-slice thickness variability at ES",
    "thick_es_ed": "systolic wall thickening (mean thickness ES / ED)",
}
DIAGNOSIS_FILE = "cardiac_diagnosis.json"


NOT_SMALLER_AT_ES = "not measurable (the cavity is not smaller at ES)"


def measurable(key: str, value: float) -> bool:
    """False for an ejection fraction (``*_ef``) or stroke volume (``*_sv``) of 0 or less: the segmented cavity is
    not smaller at ES (the RV's can be, on a poorly segmented RV, while the LV is right; a swapped LV is refused
    before). Such a value is never shown or written as a number (page, report, batch CSV)."""
    return not key.endswith(("_ef", "_sv")) or value > 0


def feature_text(key: str, value: float) -> str:
    """A feature value as shown to a user: ejection fractions in % (as the page's metric row), ratios as 0.00; an
    ejection fraction that is not ``measurable`` in words."""
    if key.endswith("_ef"):
        return f"{value:.0%}" if measurable(key, value) else NOT_SMALLER_AT_ES
    return f"{value:.2f}"

MIN_REPRODUCIBILITY = 0.5  # features whose model-vs-expert agreement (Pearson r) is below this are not used
CV_REPEATS = 5  # fold assignments over which the cross-validated figures are also given
UNCERTAIN_TOP = 0.6  # below this top-class probability the page says "uncertain" instead of naming a class


def _thickness_samples(myo: np.ndarray) -> np.ndarray | None:
    """Wall thickness samples of one slice's myocardium (2x the distance to its edge along its ridge)."""
    if myo.sum() < 5:
        return None
    dt = ndimage.distance_transform_edt(myo)
    ridge = (dt == ndimage.maximum_filter(dt, 3)) & myo & (dt > 0)
    t = 2 * dt[ridge]
    return t if len(t) >= 5 else None


def mask_features(ed: np.ndarray, es: np.ndarray) -> dict[str, float]:
    """Scale-free features of the ED and ES label maps (X, Y, Z; 1 RV, 2 myocardium, 3 LV cavity)."""
    ed, es = np.asarray(ed).astype(np.int16), np.asarray(es).astype(np.int16)
    n = lambda m, c: float((m == c).sum())  # noqa: E731
    lv_ed, lv_es, rv_ed, rv_es, my_ed, my_es = n(ed, 3), n(es, 3), n(ed, 1), n(es, 1), n(ed, 2), n(es, 2)
    f = {"lv_ef": 1 - lv_es / max(lv_ed, 1), "rv_ef": 1 - rv_es / max(rv_ed, 1),
         "rv_lv_ed": rv_ed / max(lv_ed, 1), "rv_lv_es": rv_es / max(lv_es, 1),
         "myo_lv_ed": my_ed / max(lv_ed, 1), "myo_es_ed": my_es / max(my_ed, 1)}
    lv_slices = max(1, int((ed == 3).any(axis=(0, 1)).sum()))
    radius = math.sqrt(max(lv_ed, 1) / lv_slices / math.pi)  # mean LV cavity radius at ED, in pixels
    for name, m in (("ed", ed), ("es", es)):
        means, cvs, maxs = [], [], []
        for z in range(m.shape[2]):
            t = _thickness_samples(m[:, :, z] == 2)
            if t is None:
                continue
            means.append(t.mean())
            cvs.append(t.std() / t.mean())
            maxs.append(t.max())
        f[f"thick_mean_{name}"] = float(np.mean(means)) / radius if means else 0.0
        f[f"thick_max_{name}"] = float(np.max(maxs)) / radius if maxs else 0.0
        f[f"thick_cv_{name}"] = float(np.mean(cvs)) if cvs else 0.0
        f[f"thick_cvmax_{name}"] = float(np.max(cvs)) if cvs else 0.0
    f["thick_es_ed"] = f["thick_mean_es"] / max(f["thick_mean_ed"], 1e-3)
    return {k: float(f[k]) for k in FEATURES}


# --------------------------------------------------------------------------- volumes in mL, LV mass in g

# Short-axis cine stacks are acquired with pixels of about 1-2.5 mm and slices 6-10 mm apart (8 mm slices with 2 mm
# gaps in SCMR's protocol); a header outside these wider limits is not a cine stack's (the shared ACDC copy's
# 1 mm placeholders, for one), and volumes from it would be wrong by a factor of up to ten.
CINE_PIXEL_MM = (0.5, 3.0)
CINE_SLICE_MM = (4.0, 20.0)
MYOCARDIUM_G_PER_ML = 1.05  # density of myocardium, by which the LV mass is the ED myocardium volume
VOLUMES = {
    "lv_edv": "LV end-diastolic volume", "lv_esv": "LV end-systolic volume", "lv_sv": "LV stroke volume",
    "lv_mass": "LV mass (myocardium at ED)", "rv_edv": "RV end-diastolic volume", "rv_esv": "RV end-systolic volume",
    "rv_sv": "RV stroke volume",
}
# each of VOLUMES as the structure_voxels it is made of: (counted, subtracted or None)
VOLUME_VOXELS = {"lv_edv": ("lv_ed", None), "lv_esv": ("lv_es", None), "lv_sv": ("lv_ed", "lv_es"),
                 "lv_mass": ("myo_ed", None), "rv_edv": ("rv_ed", None), "rv_esv": ("rv_es", None),
                 "rv_sv": ("rv_ed", "rv_es")}


def volume_text(key: str, value: float) -> str:
    """A volume as shown to a user: mL, or g for the LV mass, to the nearest unit; a stroke volume of 0 or less is
    not shown as a number (as ``feature_text`` for the ejection fractions)."""
    if not measurable(key, value):
        return NOT_SMALLER_AT_ES
    return f"{value:.0f} g" if key == "lv_mass" else f"{value:.0f} mL"


def structure_voxels(ed: np.ndarray, es: np.ndarray) -> dict[str, int]:
    """Voxels of RV (1), myocardium (2) and LV cavity (3) in the ED and ES label maps (X, Y, Z; any one grid)."""
    ed, es = np.asarray(ed), np.asarray(es)
    return {f"{name}_{frame}": int((m == c).sum()) for frame, m in (("ed", ed), ("es", es))
            for name, c in (("rv", 1), ("myo", 2), ("lv", 3))}


def cine_voxel_size_problem(spacing) -> str | None:
    """Why a header's voxel size (x, y, slice spacing in mm) cannot be that of a short-axis cine stack, in words
    a clinician reads; None when it can."""
    try:
        sx, sy, sz = (float(v) for v in spacing)
    except (TypeError, ValueError):
        return "the file gives no voxel size."
    if not all(math.isfinite(v) and v > 0 for v in (sx, sy, sz)):
        return "the file gives no valid voxel size."
    lo, hi = CINE_PIXEL_MM
    if not (lo <= sx <= hi and lo <= sy <= hi):
        return (f"the file's pixels are {sx:.2f} x {sy:.2f} mm, outside the {lo:g}-{hi:g} mm of a cine short-axis "
                "image, so its voxel size is not trusted.")
    lo, hi = CINE_SLICE_MM
    if not lo <= sz <= hi:
        return (f"the file's slices are {sz:.2f} mm apart, outside the {lo:g}-{hi:g} mm of a cine short-axis stack "
                "(a placeholder voxel size, or not a short-axis stack), so its voxel size is not trusted.")
    return None


def grid_voxel_ml(frame_shape_xy: tuple[int, int], spacing, size: int) -> float:
    """mL of one voxel of the model's (size x size) grid for a frame of in-plane shape ``frame_shape_xy`` and voxel
    size ``spacing`` (mm): each grid pixel spans crop side / size original pixels each way, each slice its spacing."""
    side = pp.cardiac_crop_side(frame_shape_xy)
    sx, sy, sz = (float(v) for v in spacing)
    return (side * sx / size) * (side * sy / size) * sz / 1000.0


def volumes_from_voxels(voxels: dict[str, float], voxel_ml: float) -> dict[str, float]:
    """VOLUMES (mL; the LV mass in g) from ``structure_voxels`` counts of voxels of ``voxel_ml`` each."""
    out = {k: (voxels[a] - (voxels[b] if b else 0)) * voxel_ml for k, (a, b) in VOLUME_VOXELS.items()}
    out["lv_mass"] *= MYOCARDIUM_G_PER_ML
    return out


def volumes_ml(voxels: dict[str, int], frame_shape_xy: tuple[int, int], spacing, size: int) -> dict[str, float]:
    """Volumes (mL) and LV mass (g) by summation of discs from ``structure_voxels`` of label maps on the model's
    grid (``grid_voxel_ml``)."""
    return volumes_from_voxels(voxels, grid_voxel_ml(frame_shape_xy, spacing, size))


def segment_frame(model, volume: np.ndarray, size: int, box: pp.CropBox | None = None) -> np.ndarray:
    """Every slice of one cine frame through CardiacNet's U-Net -> (size, size, Z) labels on the grid of the crop
    ``box`` (default the centred square)."""
    x = pp.cardiac_frame(volume, size, all_slices=True, box=box)[:, None]
    with torch.inference_mode():
        lab = torch.cat([model.unet(x[i : i + 16].float()).argmax(1) for i in range(0, len(x), 16)])
    return lab.numpy().transpose(1, 2, 0).astype(np.int16)


# A move of the crop by up to this many of the frame's pixels is not worth another pass of the U-Net.
CROP_MOVE_TOLERANCE_PX = 2
# Localising passes at most: the first (on the centred square) may see only the part of the heart inside it.
LOCALISE_PASSES = 2


def heart_box(model, frame: np.ndarray, size: int, passes: int = LOCALISE_PASSES
              ) -> tuple[pp.CropBox, np.ndarray | None]:
    """The square the cardiac model reads in one study, centred on the heart: the U-Net segments every slice of
    ``frame`` (the ED frame) in the centred square, and the square is moved to centre the heart it found
    (``pp.heart_centre``), up to ``passes`` times while it moves by more than CROP_MOVE_TOLERANCE_PX. A fixed
    centred square (the model's training crop) cuts off part of a heart that lies off the image's centre: in the
    shared ACDC copy 20 of 160 ED/ES frames lost some of the RV that way, patient046 half of it.
    -> (box, ``frame``'s labels in that box, or None when the last move was not segmented)."""
    box = pp.cardiac_crop_box(frame.shape[:2])
    for _ in range(passes):
        lab = segment_frame(model, frame, size, box)
        centre = pp.heart_centre(lab)
        if centre is None:
            return box, lab
        moved = pp.cardiac_crop_box(frame.shape[:2], pp.grid_to_frame(centre, box, size))
        if max(abs(a - b) for a, b in zip(moved, box)) <= CROP_MOVE_TOLERANCE_PX:
            return box, lab
        box = moved
    return box, None


# --------------------------------------------------------------------------- the cardiac cycle of a 4D cine


def pick_ed_es(lv: np.ndarray) -> tuple[int, int]:
    """End-diastole and end-systole frames (0-based) from the LV cavity size per frame: the largest and
    the smallest cavity (the first of equal ones)."""
    lv = np.asarray(lv, dtype=float)
    if lv.ndim != 1 or len(lv) < 2:
        raise ValueError("need the LV cavity size of at least two frames")
    return int(np.argmax(lv)), int(np.argmin(lv))


def cavity_curves(model, cine: np.ndarray, size: int, autocast_ctx=None,
                  box: pp.CropBox | None = None) -> dict[str, np.ndarray]:
    """LV and RV cavity size per frame of a cine (X, Y, Z, T): pixels of each label summed over every
    slice of the model's segmentation, on the crop grid shared by all frames (one ``box``, default the centred
    square), so the curves compare frames with no voxel size needed. -> {"lv": (T,), "rv": (T,)}."""
    import contextlib

    lv, rv = [], []
    with autocast_ctx() if autocast_ctx else contextlib.nullcontext():
        for t in range(cine.shape[3]):
            lab = segment_frame(model, cine[..., t], size, box)
            lv.append(int((lab == 3).sum()))
            rv.append(int((lab == 1).sum()))
    return {"lv": np.array(lv), "rv": np.array(rv)}


def expert_box(ed_mask: np.ndarray) -> pp.CropBox:
    """The square an expert ED label map (X, Y, Z) is read in: centred on its heart, as ``heart_box`` centres the
    model's, so features of the expert masks see the whole heart."""
    return pp.cardiac_crop_box(ed_mask.shape[:2], pp.heart_centre(ed_mask))


def expert_frame(mask: np.ndarray, size: int, box: pp.CropBox | None = None) -> np.ndarray:
    """An expert label map on the same crop grid as ``segment_frame`` with the same ``box``."""

    return (pp.cardiac_frame(mask, size, mask=True, all_slices=True, box=box).numpy()
            .transpose(1, 2, 0).astype(np.int16))


# --------------------------------------------------------------------------- classifier (pure numpy at inference)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_classifier(x: np.ndarray, y: np.ndarray, c: float = 1.0, columns: list[str] | None = None) -> dict:
    """Standardise, then multinomial logistic regression (scikit-learn); returned as plain numbers.
    x: (N, F) features in FEATURES order; ``columns``: the feature names to use (all when None)."""
    from sklearn.linear_model import LogisticRegression

    if columns is not None:
        x = x[:, [list(FEATURES).index(c) for c in columns]]
    mean, std = x.mean(0), x.std(0) + 1e-9
    lr = LogisticRegression(C=c, max_iter=5000).fit((x - mean) / std, y)
    coef = np.zeros((len(GROUPS), x.shape[1]))
    icpt = np.full(len(GROUPS), -30.0)  # a class absent from training gets ~0 probability
    coef[lr.classes_] = lr.coef_
    icpt[lr.classes_] = lr.intercept_
    return {"mean": mean.tolist(), "std": std.tolist(), "coef": coef.tolist(), "intercept": icpt.tolist(),
            "temperature": 1.0, **({"columns": list(columns)} if columns is not None else {})}


def logits(clf: dict, x: np.ndarray) -> np.ndarray:
    """(N, F) features in FEATURES order -> (N, 5) logits, on the columns the classifier uses
    (``clf["columns"]``, feature names; all when absent)."""
    x = np.atleast_2d(x)
    if "columns" in clf:
        x = x[:, [list(FEATURES).index(c) for c in clf["columns"]]]
    x = (x - np.asarray(clf["mean"])) / np.asarray(clf["std"])
    return x @ np.asarray(clf["coef"]).T + np.asarray(clf["intercept"])


def predict_proba(clf: dict, x: np.ndarray) -> np.ndarray:
    """(N, F) features -> (N, 5) calibrated class probabilities (temperature from the card), the DCM/MINF
    split then re-made by the second stage when the card has one (``clf["pair"]``)."""
    p = _softmax(logits(clf, x) / float(clf.get("temperature", 1.0)))
    pair = clf.get("pair")
    return apply_pair(p, pair_logit(pair, x) / float(pair.get("temperature", 1.0))) if pair else p


# Second stage for the hardest pair. DCM and previous MI both dilate the LV with a low EF; infarction thins the
# wall in one territory only, so the wall thickness varies more within a slice, and the scar does not thicken
# in systole. Features chosen for that reason before looking at any result.
PAIR = ("DCM", "MINF")
PAIR_FEATURES = ("thick_cv_es", "thick_cvmax_es", "thick_cv_ed", "thick_cvmax_ed", "thick_es_ed", "myo_es_ed", "lv_ef")


def fit_pair(x: np.ndarray, y: np.ndarray, c: float = 1.0) -> dict:
    """Logistic regression DCM (1) vs MINF (0) on PAIR_FEATURES of the training patients of those two groups.
    x (N, F) all features in FEATURES order, y (N,) group indices."""
    from sklearn.linear_model import LogisticRegression

    cols = [list(FEATURES).index(f) for f in PAIR_FEATURES]
    sel = np.isin(y, [GROUPS.index(g) for g in PAIR])
    if len(np.unique(y[sel])) < 2:
        raise ValueError("the second stage needs training patients of both DCM and MINF")
    xs = x[sel][:, cols]
    mean, std = xs.mean(0), xs.std(0) + 1e-9
    lr = LogisticRegression(C=c, max_iter=5000).fit((xs - mean) / std, (y[sel] == GROUPS.index("DCM")).astype(int))
    return {"features": list(PAIR_FEATURES), "mean": mean.tolist(), "std": std.tolist(),
            "coef": lr.coef_[0].tolist(), "intercept": float(lr.intercept_[0]), "temperature": 1.0}


def pair_logit(pair: dict, x: np.ndarray) -> np.ndarray:
    """(N, F) features -> (N,) logit of DCM against MINF."""
    cols = [list(FEATURES).index(f) for f in pair["features"]]
    xs = (np.atleast_2d(x)[:, cols] - np.asarray(pair["mean"])) / np.asarray(pair["std"])
    return xs @ np.asarray(pair["coef"]) + float(pair["intercept"])


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-np.asarray(z, dtype=float)))


def apply_pair(p: np.ndarray, z2: np.ndarray) -> np.ndarray:
    """Keep the first stage's P(DCM or MINF) and split it by the second stage: (N, 5), (N,) -> (N, 5)."""
    out = np.array(p, dtype=float, copy=True)
    d, m = GROUPS.index("DCM"), GROUPS.index("MINF")
    mass = out[:, d] + out[:, m]
    q = _sigmoid(z2)
    out[:, d], out[:, m] = mass * q, mass * (1 - q)
    return out


def multiclass_log_loss(p: np.ndarray, y: np.ndarray) -> float:
    return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())


def fit_temperature(z: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising the negative log-likelihood of held-out logits (grid, then refined)."""
    def nll(t: float) -> float:
        p = _softmax(z / t)
        return float(-np.log(np.clip(p[np.arange(len(y)), y], 1e-12, 1)).mean())

    grid = np.exp(np.linspace(np.log(0.2), np.log(10), 200))
    return float(min(grid, key=nll))


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Top-label ECE: mean |accuracy - confidence| over equal-width confidence bins, weighted by count."""
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            ece += sel.mean() * abs(correct[sel].mean() - conf[sel].mean())
    return float(ece)


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> dict:
    conf = p.max(1)
    correct = (p.argmax(1) == y).astype(float)
    edges = np.linspace(0, 1, bins + 1)
    rows = []
    for lo, hi in zip(edges[:-1], edges[1:]):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            rows.append({"bin": [float(lo), float(hi)], "n": int(sel.sum()), "confidence": float(conf[sel].mean()),
                         "accuracy": float(correct[sel].mean())})
    return {"bins": rows}


def summarise(y: np.ndarray, p: np.ndarray, seed: int = 0) -> dict:
    """5x5 confusion, per-class sensitivity, accuracy with a bootstrap CI, normal-vs-disease figures."""
    from sklearn.metrics import confusion_matrix, roc_auc_score

    pred = p.argmax(1)
    cm = confusion_matrix(y, pred, labels=range(len(GROUPS)))
    rng = np.random.default_rng(seed)
    boots = [float((pred[i] == y[i]).mean()) for i in (rng.integers(0, len(y), len(y)) for _ in range(1000))]
    disease_true = (y != 0).astype(int)
    p_disease = 1 - p[:, 0]
    nvd = {"accuracy_at_0.5": float(((p_disease >= 0.5) == disease_true).mean())}
    if len(np.unique(disease_true)) == 2:
        nvd["auc"] = float(roc_auc_score(disease_true, p_disease))
    return {
        "n": int(len(y)), "accuracy": float((pred == y).mean()),
        "accuracy_ci95": [float(np.quantile(boots, 0.025)), float(np.quantile(boots, 0.975))],
        "confusion": {"rows_true_cols_predicted": list(GROUPS), "matrix": cm.tolist()},
        "sensitivity": {g: float(cm[i, i] / max(1, cm[i].sum())) for i, g in enumerate(GROUPS)},
        "normal_vs_disease": nvd,
        "ece": expected_calibration_error(p, y),
    }


def _out_of_fold(xg: np.ndarray, y: np.ndarray, folds: int, seed: int, columns: list[str] | None = None):
    """Stratified k-fold over patients: out-of-fold logits of the first stage (N, 5) and of the DCM-vs-MINF
    second stage (N,), and both stages' probabilities after temperatures fitted by cross-fitting (each fold's
    on the other folds' out-of-fold logits; the second stage's on their DCM and MINF patients only, the pair
    it was trained to split)."""
    from sklearn.model_selection import StratifiedKFold

    from core.calibration import binary_temperature

    splits = list(StratifiedKFold(folds, shuffle=True, random_state=seed).split(xg, y))
    z = np.zeros((len(y), len(GROUPS)))
    z2 = np.zeros(len(y))
    for tr, va in splits:
        z[va] = logits(fit_classifier(xg[tr], y[tr], columns=columns), xg[va])
        z2[va] = pair_logit(fit_pair(xg[tr], y[tr]), xg[va])
    in_pair = np.isin(y, [GROUPS.index(g) for g in PAIR])
    is_dcm = (y == GROUPS.index("DCM")).astype(float)
    p_cal, p2_cal = np.zeros_like(z), np.zeros_like(z)
    for _, va in splits:
        rest = np.setdiff1d(np.arange(len(y)), va)
        p_cal[va] = _softmax(z[va] / fit_temperature(z[rest], y[rest]))
        rp = rest[in_pair[rest]]
        p2_cal[va] = apply_pair(p_cal[va], z2[va] / binary_temperature(is_dcm[rp], _sigmoid(z2[rp])))
    return z, z2, p_cal, p2_cal


def feature_reproducibility(model_feats: np.ndarray, expert_feats: np.ndarray) -> dict[str, float]:
    """Pearson r per feature between (N, F) features of the model's segmentation and of the expert masks
    of the same N patients (FEATURES order); 0 for a feature constant in either."""
    out = {}
    for j, k in enumerate(FEATURES):
        a, b = model_feats[:, j], expert_feats[:, j]
        out[k] = float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else 0.0
    return out


def _top_label_ece(y: np.ndarray, p: np.ndarray) -> float:
    return expected_calibration_error(p, np.asarray(y).astype(int))


def build(root, wdir=None, seed: int = 0, folds: int = 5) -> dict:
    """Features of every ACDC patient (expert masks; the committed U-Net's segmentation for the card's
    validation patients), 5-fold CV of the classifier on expert-mask features, temperature by cross-fitting,
    the final classifier on the committed model's training patients, scored on its validation patients
    through the model's own segmentation. Writes <weights>/cardiac_diagnosis.json."""
    from datetime import datetime, timezone

    from core.calibration import binary_temperature, ece_if_calibrated
    from core.checkpoint import git_commit, write_json
    from core.config import weights_dir

    # the app's own model (folded, in its inference precision): the validation patients' features, and so the
    # end-to-end figures and the features kept, are those the app computes
    lm = load_base("cardiac", wdir)
    size = lm.input_size
    val = set(lm.card["data"]["val_cases"])
    cases = [c for c in mio.find_cardiac_cases(Path(root)) if c.ed_gt is not None and c.es_gt is not None]
    xg, xp, y, is_val = [], {}, [], []
    for c in cases:
        ed_mask = mio.load_nifti_path(c.ed_gt).data
        box = expert_box(ed_mask)
        ed_gt, es_gt = expert_frame(ed_mask, size, box), expert_frame(mio.load_nifti_path(c.es_gt).data, size, box)
        xg.append(list(mask_features(ed_gt, es_gt).values()))
        y.append(GROUPS.index(c.group))
        is_val.append(c.patient_id in val)
        if c.patient_id in val:
            ed, es = (mio.load_nifti_path(p).data for p in (c.ed_path, c.es_path))
            with torch.inference_mode(), autocast(lm.precision):
                ed_box, ed_lab = heart_box(lm.model, ed, size)
                xp[c.patient_id] = list(mask_features(*segment_study(lm.model, ed, es, size, ed_box, ed_lab)).values())
    xg, y, is_val = np.asarray(xg), np.asarray(y), np.asarray(is_val)
    ids = [c.patient_id for c in cases]
    v_ids = [i for i, v in zip(ids, is_val) if v]
    # a feature the model's segmentation does not reproduce is learnt from the expert masks but measured on
    # the model's: it carries segmentation noise into the diagnosis. Agreement with the expert masks'
    # features on the validation patients (their masks only, not their diagnoses) decides which are used.
    repro = feature_reproducibility(np.asarray([xp[i] for i in v_ids]), xg[is_val]) if len(v_ids) >= 5 else {}
    used = [k for k in FEATURES if repro.get(k, 1.0) >= MIN_REPRODUCIBILITY]
    z, z2, p_cal, p2_cal = _out_of_fold(xg, y, folds, seed, used)
    p_raw = _softmax(z)
    pair_idx = [GROUPS.index(g) for g in PAIR]
    in_pair = np.isin(y, pair_idx)
    is_dcm = (y == GROUPS.index("DCM")).astype(float)
    t_all = fit_temperature(z, y)
    t2_all = binary_temperature(is_dcm[in_pair], _sigmoid(z2[in_pair]))
    cv_raw, cv_cal = summarise(y, p_raw, seed), summarise(y, p_cal, seed)
    cv_two = summarise(y, p2_cal, seed)
    ll_one, ll_two = multiclass_log_loss(p_cal, y), multiclass_log_loss(p2_cal, y)
    # the second stage is kept only if it lowers the cross-validated log-loss (a proper score: accuracy over 80
    # patients moves in steps of 1/80); a choice made on this CV, so its figures lean slightly optimistic
    use_pair = ll_two < ll_one
    p_used = p2_cal if use_pair else p_cal
    # 80 patients make a noisy ECE: read it against what a perfectly calibrated classifier with the same
    # probabilities would show, and over other random fold assignments (the kept figures are seed 0's)
    consistency = ece_if_calibrated(p_used, _top_label_ece, _top_label_ece(y, p_used), seed=seed)
    repeats = []
    for s in range(seed, seed + CV_REPEATS):
        _, _, pc, p2c = _out_of_fold(xg, y, folds, s, used)
        pu = p2c if use_pair else pc
        repeats.append({"seed": s, "accuracy": float((pu.argmax(1) == y).mean()), "ece": _top_label_ece(y, pu),
                        "log_loss": multiclass_log_loss(pu, y)})
    clf = fit_classifier(xg[~is_val], y[~is_val], columns=used)
    clf["temperature"] = t_all
    if use_pair:
        clf["pair"] = {**fit_pair(xg[~is_val], y[~is_val]), "temperature": t2_all}
    pv = predict_proba(clf, np.asarray([xp[i] for i in v_ids])) if v_ids else np.zeros((0, len(GROUPS)))
    yv = y[is_val]
    nor = xg[y == 0]
    ranges = {k: [float(np.quantile(nor[:, j], 0.05)), float(np.quantile(nor[:, j], 0.95))]
              for j, k in enumerate(FEATURES)}
    report = {
        "task": "cardiac_diagnosis", "classes": list(GROUPS), "class_names": GROUP_NAMES,
        "features": FEATURES, "classifier": clf,
        "feature_reproducibility": {
            "what": f"Pearson r between each feature measured on the committed U-Net's segmentation and on the expert "
                    f"masks, over its {len(v_ids)} validation patients (masks only, not diagnoses); features with "
                    f"r < {MIN_REPRODUCIBILITY} are not used by the classifier",
            "pearson_r": repro, "min_r": MIN_REPRODUCIBILITY, "used": used,
            "left_out": [k for k in FEATURES if k not in used]},
        "method": f"multinomial logistic regression (C = 1) on {len(used)} standardised scale-free features of the "
                  "ED and ES segmentation (every slice, the cardiac model's 112 px crop grid; those the model's "
                  "segmentation reproduces); learns from expert masks; "
                  "temperature scaling fitted on out-of-fold logits"
                  + ("; a second stage (logistic regression on wall-thickness variability and thickening) splits "
                     "P(DCM or MINF) between the two" if use_pair else ""),
        "cross_validation": {
            "what": f"{folds}-fold CV stratified by group over all {len(y)} patients, features of the expert masks "
                    "(the segmentation a perfect model would give): the classifier's own accuracy",
            "uncalibrated": cv_raw, "calibrated": cv_two if use_pair else cv_cal,
            "temperature_cross_fitted": True,
            "reliability_uncalibrated": reliability(p_raw, y),
            "reliability_calibrated": reliability(p_used, y),
            "ece_if_perfectly_calibrated": {
                "what": "top-label ECE a perfectly calibrated classifier with the same calibrated probabilities "
                        f"would show on {len(y)} patients (labels drawn from its own probabilities, "
                        "consistency resampling); p_value: share of draws at or above the measured ECE",
                **consistency},
            "repeated": {
                "what": f"the same {folds}-fold CV (calibrated, as kept) with {CV_REPEATS} fold assignments "
                        f"(seeds {seed}-{seed + CV_REPEATS - 1})",
                "runs": repeats,
                **{f"{k}_mean": float(np.mean([r[k] for r in repeats])) for k in ("accuracy", "ece", "log_loss")},
                **{f"{k}_range": [float(min(r[k] for r in repeats)), float(max(r[k] for r in repeats))]
                   for k in ("accuracy", "ece")},
            },
            "second_stage": {
                "what": f"DCM vs MINF logistic regression on {', '.join(PAIR_FEATURES)}, splitting the first stage's "
                        "P(DCM or MINF); kept if it lowers the cross-validated log-loss",
                "kept": bool(use_pair), "log_loss_one_stage": ll_one, "log_loss_two_stages": ll_two,
                "one_stage_calibrated": cv_cal, "two_stages_calibrated": cv_two,
            },
        },
        "validation_end_to_end": {
            "what": f"the committed cardiac model's {len(v_ids)} validation patients (unseen by its U-Net and by this "
                    "classifier), features of the U-Net's own segmentation",
            **(summarise(yv, pv, seed) if len(v_ids) else {}),
            "per_patient": {i: {"group": GROUPS[int(t)], "probabilities": dict(zip(GROUPS, map(float, p)))}
                            for i, t, p in zip(v_ids, yv, pv)},
        },
        "normal_ranges": {"what": "5th-95th percentile of the 16 NOR patients' expert-mask features", **ranges},
        "uncertain_below": UNCERTAIN_TOP,
        "cardiac_weights_sha256": lm.card.get("weights_sha256"),
        "git_commit": git_commit(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    path = weights_dir(wdir) / DIAGNOSIS_FILE
    write_json(path, report)
    return report


def load_diagnosis(wdir=None) -> dict | None:
    from core.config import weights_dir

    p = weights_dir(wdir) / DIAGNOSIS_FILE
    return json.loads(p.read_text()) if p.is_file() else None


def segment_study(model, ed: np.ndarray, es: np.ndarray, size: int, box: pp.CropBox,
                  ed_labels: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The model's segmentation of every slice of the ED and ES frames in ``box`` -> (ED labels, ES labels), each
    (size, size, Z); ``ed_labels``, when given, are the ED frame's already segmented in that box."""
    return (ed_labels if ed_labels is not None else segment_frame(model, ed, size, box),
            segment_frame(model, es, size, box))


def diagnose(model, report: dict, ed: np.ndarray, es: np.ndarray, size: int, box: pp.CropBox | None = None,
             ed_labels: np.ndarray | None = None) -> dict:
    """Five-class probabilities for one study from the model's own segmentation of every slice (in ``box``; default
    the crop ``heart_box`` finds), the features they rest on, the voxels of each structure on the model's grid
    (``structure_voxels``), and whether the segmentation reaches the crop's edge (``at_crop_edge``)."""
    if box is None:
        box, ed_labels = heart_box(model, ed, size)
    ed_lab, es_lab = segment_study(model, ed, es, size, box, ed_labels)
    f = mask_features(ed_lab, es_lab)
    p = predict_proba(report["classifier"], np.asarray([list(f.values())]))[0]
    return {"probabilities": dict(zip(GROUPS, map(float, p))), "features": f,
            "voxels": structure_voxels(ed_lab, es_lab),
            "at_crop_edge": pp.labels_touch_edge(ed_lab) or pp.labels_touch_edge(es_lab)}


# --------------------------------------------------------------------------- prediction (the app's path)


@dataclass
class CardiacResult:
    probability: float | None  # P(disease); None when withheld
    threshold: float
    positive: bool | None
    slices: np.ndarray  # (2k, H, W) in [0, 1]: the ED then ES slices the model used
    slice_labels: list[str]
    heatmap: np.ndarray | None  # (2k, H, W) in [0, 1], one Grad-CAM map per slice
    ood_score: float = 0.0
    withheld: str | None = None
    segmentation: np.ndarray | None = None  # (2k, H, W) uint8: 0 background, 1 RV, 2 myocardium, 3 LV cavity
    shape: dict[str, float] | None = None  # estimates from the segmentation, see cardiac_shape_summary
    diagnosis: dict | None = None  # five classes: {"probabilities": {group: p}, "features": {name: value}, "voxels"}
    volumes: dict[str, float] | None = None  # VOLUMES in mL (LV mass in g), when the header's voxel size is trusted
    volumes_withheld: str | None = None  # why there are no volumes, in words
    crop_box: pp.CropBox | None = None  # the square of the frames the model read (x0, x1, y0, y1), see heart_box
    at_crop_edge: bool = False  # the segmentation reaches that square's edge: part of the heart may lie outside

    def measures(self) -> dict[str, float | str] | None:
        """The ejection fractions and ratios to show, from one source: the five-class features (the model's
        segmentation of every slice) where they were computed, else the binary model's 8-slice estimates.
        Keys lv_ef, rv_ef (fractions), myo_lv_ed, rv_lv_ed, and source ("every slice" / "8 slices")."""
        if self.diagnosis is not None:
            f = self.diagnosis["features"]
            return {"lv_ef": f["lv_ef"], "rv_ef": f["rv_ef"], "myo_lv_ed": f["myo_lv_ed"], "rv_lv_ed": f["rv_lv_ed"],
                    "source": "every slice"}
        if self.shape is not None:
            s = self.shape
            return {"lv_ef": s["lv_ef"], "rv_ef": s["rv_ef"], "myo_lv_ed": s["myo_to_lv_ed"],
                    "rv_lv_ed": s["rv_to_lv_ed"], "source": "8 slices"}
        return None

    @property
    def frames_swapped(self) -> bool:
        """The LV cavity is smaller at the frame given as ED than at the one given as ES (EF would be negative)."""
        m = self.measures()
        return m is not None and m["lv_ef"] <= 0


MODELS_DISAGREE = ("the decision on P(disease) (from shape descriptors of 8 slices per frame) and the five-class "
                   "diagnosis (from every slice) disagree about whether the heart is normal")


def cardiac_band(res: "CardiacResult", diagnosis_model: dict | None) -> tuple[str, str | None]:
    """The finding a study gets: ``verdict_band`` of P(disease), made "uncertain" when the five-class diagnosis,
    confident (its top class reaches ``uncertain_below``), says the opposite: NOR against a positive decision, a
    disease against a negative one. A reader must not get "normal" above a confident "abnormal right ventricle".
    -> (band, MODELS_DISAGREE when that is why it is uncertain, else None)."""
    from core.runtime import verdict_band

    band = verdict_band(res.probability, res.threshold)
    if band == "uncertain" or res.diagnosis is None or diagnosis_model is None:
        return band, None
    probs = res.diagnosis["probabilities"]
    top = max(probs, key=probs.get)
    if probs[top] >= float(diagnosis_model["uncertain_below"]) and (top == "NOR") == (band == "positive"):
        return "uncertain", MODELS_DISAGREE
    return band, None


AT_CROP_EDGE = ("the model's segmentation reaches the edge of the square of the image it reads (centred on the "
                "heart, 60 % of the image's shorter side), so part of the heart may lie outside it and the volumes "
                "would be too small; check the segmentation below.")
WITHHELD_CARDIAC = ("These frames do not look like the short-axis cine MRI the model was trained on, so no "
                    "diagnosis is given. Check that they are the ED and ES frames of a short-axis cine series.")


def diagnosis_for(card: dict, wdir=None) -> dict | None:
    """The five-class classifier (DIAGNOSIS_FILE) when it was built on these very weights' segmentation and
    split (the binary model's ``card``); None otherwise."""
    d = load_diagnosis(wdir)
    return d if d and d.get("cardiac_weights_sha256") == card.get("weights_sha256") else None


def predict_cardiac(lm: LoadedModel, ed: Volume, es: Volume, explain: bool = True,
                    guard: bool = True) -> CardiacResult:
    """P(disease) (normal vs DCM/HCM/MINF/RV) from the ED and ES frames of one cine study."""
    if ed.data.shape != es.data.shape:
        raise InvalidInputError(
            f"The ED frame ({' x '.join(map(str, ed.data.shape))}) and the ES frame "
            f"({' x '.join(map(str, es.data.shape))}) differ in size; both must come from the same cine series."
        )
    for v, which in ((ed, "ED"), (es, "ES")):
        if float(v.data.max() - v.data.min()) <= 0:
            raise InvalidInputError(f"The {which} frame is blank: every voxel has the same value.")
    size = lm.input_size
    # the input check reads the centred square, as it was fitted; everything after it the square on the heart
    x = pp.preprocess_cardiac(ed.data, es.data, size)[None]
    idx = pp.cardiac_slice_indices(ed.data.shape[2])
    labels = [f"ED slice {i + 1}/{ed.data.shape[2]}" for i in idx] + [f"ES slice {i + 1}/{es.data.shape[2]}" for i in idx]
    score = ood_score(lm, x)
    if guard and lm.guard is not None and score > lm.guard.threshold:
        return CardiacResult(None, lm.threshold, None, (x[0].numpy() * 0.25 + 0.5).clip(0, 1), labels, None, score,
                             WITHHELD_CARDIAC)
    with model_lock(lm.model), torch.inference_mode(), autocast(lm.precision):
        box, ed_labels = heart_box(lm.model, ed.data, size)
    if box != pp.cardiac_crop_box(ed.data.shape[:2]):
        x = pp.preprocess_cardiac(ed.data, es.data, size, box)[None]
    slices = (x[0].numpy() * 0.25 + 0.5).clip(0, 1)
    with model_lock(lm.model), torch.inference_mode():
        with autocast(lm.precision):  # the U-Net; its shape descriptors and the head stay float32
            seg = lm.model.segment(x).float()
        f = lm.model.shape_features(seg)
        logit = lm.model.head(f)
        feats = f[0].numpy()
    prob = float(torch.sigmoid(logit).flatten()[0])
    positive = prob >= lm.threshold
    heat = gradcam(lm.model, lm.model.gradcam_layer(), x, positive=positive) if explain else None
    seg_labels = seg[0].argmax(dim=1).to(torch.uint8).numpy()
    diagnosis = volumes = None
    volumes_withheld = "the model's segmentation of every slice was not computed."
    at_edge = pp.labels_touch_edge(seg_labels.transpose(1, 2, 0))
    if lm.diagnosis is not None:
        with model_lock(lm.model), torch.inference_mode(), autocast(lm.precision):
            diagnosis = diagnose(lm.model, lm.diagnosis, ed.data, es.data, size, box, ed_labels)
        at_edge = diagnosis["at_crop_edge"]
        volumes_withheld = (AT_CROP_EDGE if at_edge else
                            cine_voxel_size_problem(ed.spacing) if np.allclose(ed.spacing, es.spacing, rtol=1e-3) else
                            "the ED and ES files give different voxel sizes, so they may not be one series.")
        if volumes_withheld is None:
            volumes = volumes_ml(diagnosis["voxels"], ed.data.shape[:2], ed.spacing, size)
    release_memory()
    return CardiacResult(prob, lm.threshold, positive, slices, labels, heat, score, None, seg_labels,
                         cardiac_shape_summary(feats), diagnosis, volumes, volumes_withheld, box, at_edge)


@dataclass
class CardiacCycle:
    """LV and RV cavity size over a cine's frames and the ED/ES frames picked from it (0-based)."""

    lv: np.ndarray  # (T,) LV cavity pixels summed over slices (crop grid)
    rv: np.ndarray  # (T,)
    ed: int
    es: int
    voxel_ml: float | None = None  # mL of one of those pixels when the cine's voxel size is trusted, else None


def cardiac_cycle(lm: LoadedModel, cine: Cine) -> CardiacCycle:
    """Segment every frame of a 4D cine and pick ED (largest LV cavity) and ES (smallest)."""
    if float(cine.data.max() - cine.data.min()) <= 0:
        raise InvalidInputError("The cine is blank: every voxel has the same value.")
    with model_lock(lm.model), torch.inference_mode():
        with autocast(lm.precision):  # one square for every frame, centred on the heart of the first
            box, _ = heart_box(lm.model, cine.data[..., 0], lm.input_size)
        c = cavity_curves(lm.model, cine.data, lm.input_size, lambda: autocast(lm.precision), box)
    if c["lv"].max() == 0:
        raise InvalidInputError("No left ventricle was found in any frame of this cine: it does not look like a "
                                "short-axis cardiac series.")
    ed, es = pick_ed_es(c["lv"])
    release_memory()
    ml = (grid_voxel_ml(cine.data.shape[:2], cine.spacing, lm.input_size)
          if cine_voxel_size_problem(cine.spacing) is None else None)
    return CardiacCycle(c["lv"], c["rv"], ed, es, ml)


def cardiac_shape_summary(features: np.ndarray) -> dict[str, float]:
    """Readable estimates from CardiacNet's 9 shape descriptors (areas summed over the same 8 slices of
    ED and ES, so slice thickness and pixel size cancel in these ratios):

    - ``lv_ef`` / ``rv_ef``: ejection-fraction estimates, 1 - ES area / ED area of each cavity;
    - ``myo_to_lv_ed``: myocardium-to-LV-cavity area ratio at ED (high in hypertrophy);
    - ``rv_to_lv_ed``: RV-to-LV cavity area ratio at ED (high in RV dilatation).
    """
    f = np.asarray(features, dtype=np.float64)
    return {"lv_ef": float(1 - f[0]), "rv_ef": float(1 - f[1]), "myo_to_lv_ed": float(f[2]),
            "rv_to_lv_ed": float(f[3])}


BINARY_CALIBRATION_FILE = "cardiac.calibration.json"


def binary_calibration(root, wdir=None) -> dict:
    """Reliability of the binary head's P(disease) on its 5-fold out-of-fold predictions (the card's
    cross_validation.out_of_fold_probability, every ACDC patient scored by a fold that did not train on it),
    and temperature / Platt scaling cross-fitted over five groups of patients. Measured, not applied by the
    app: the page's binary P(disease) stays the model's output. Writes <weights>/cardiac.calibration.json."""
    from pathlib import Path

    from core.calibration import binary_ece, cross_fitted, ece_if_calibrated
    from core.checkpoint import read_card, write_json
    from core.config import weights_dir

    card = read_card("cardiac", wdir)
    oof = card["cross_validation"]["out_of_fold_probability"]
    labels = {c.patient_id: c.label for c in mio.find_cardiac_cases(Path(root))}
    ids = sorted(i for i in oof if i in labels)
    y = np.array([labels[i] for i in ids], float)
    p = np.array([oof[i] for i in ids], float)
    r = cross_fitted(y, p, np.arange(len(ids)) % 5)
    rep = {"task": "cardiac", "weights_sha256": card.get("weights_sha256"), "n": len(ids),
           "what": "binary head P(disease), 5-fold out-of-fold predictions of all ACDC patients; maps cross-fitted "
                   "over 5 patient groups", "applied_in_app": False,
           **{k: v for k, v in r.items() if k != "cross_fitted"},
           "ece_if_perfectly_calibrated": {
               "what": f"ECE a perfectly calibrated P(disease) with the same calibrated probabilities would show on "
                       f"{len(ids)} patients (outcomes drawn from its own probabilities); p_value: share of draws "
                       "at or above the measured ECE after calibration",
               **ece_if_calibrated(r["cross_fitted"], binary_ece, r["ece_after_cross_fitted"])}}
    write_json(weights_dir(wdir) / BINARY_CALIBRATION_FILE, rep)
    return rep


# --------------------------------------------------------------------------- training the binary model (train_all.py)


@dataclass
class _CardiacData:
    x: torch.Tensor  # (P, 2k, S, S) model inputs, in the square centred on the heart
    m: torch.Tensor  # (P, 2k, S, S) true labels of those slices (-100 where a patient has none)
    slices: list[torch.Tensor]  # per patient: every ED and ES slice (Z_ed + Z_es, S, S), square on the heart
    slice_masks: list[torch.Tensor | None]
    slices_centred: list[torch.Tensor]  # the same slices in the image's centred square (the localising pass's view)
    slice_masks_centred: list[torch.Tensor | None]


def _load_cardiac(cases: list[mio.CardiacCase], size: int) -> _CardiacData:
    """Every case's frames cut to the square centred on its heart (``expert_box``: the expert ED mask's; the app
    finds it with ``heart_box``) and, for the segmentation's training, to the image's centred square too."""
    from tqdm.auto import tqdm

    xs, ms, alls, allm, allc, allmc = [], [], [], [], [], []
    for c in tqdm(cases, desc="read ACDC", leave=False, mininterval=2):
        ed, es = mio.load_nifti_path(c.ed_path).data, mio.load_nifti_path(c.es_path).data
        gts = ([mio.load_nifti_path(g).data for g in (c.ed_gt, c.es_gt)]
               if c.ed_gt is not None and c.es_gt is not None else None)
        box = expert_box(gts[0]) if gts is not None else pp.cardiac_crop_box(ed.shape[:2])
        xs.append(pp.preprocess_cardiac(ed, es, size, box))
        alls.append(torch.cat([pp.cardiac_frame(v, size, all_slices=True, box=box) for v in (ed, es)]).half())
        allc.append(torch.cat([pp.cardiac_frame(v, size, all_slices=True) for v in (ed, es)]).half())
        if gts is not None:
            ms.append(torch.cat([pp.cardiac_frame(g, size, mask=True, box=box) for g in gts]))
            allm.append(torch.cat([pp.cardiac_frame(g, size, mask=True, all_slices=True, box=box)
                                   for g in gts]).to(torch.int8))
            allmc.append(torch.cat([pp.cardiac_frame(g, size, mask=True, all_slices=True) for g in gts]).to(torch.int8))
        else:
            ms.append(torch.full((2 * pp.CARDIAC_SLICES, size, size), -100, dtype=torch.long))
            allm.append(None)
            allmc.append(None)
    return _CardiacData(torch.stack(xs), torch.stack(ms), alls, allm, allc, allmc)


def soft_dice_multiclass(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean foreground soft Dice. logits (N, C, H, W), target (N, H, W) in [0, C)."""
    prob = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


HEAD_STEPS = 2000
# Share of training slices the segmentation sees in the image's centred square rather than the square on the heart
CENTRED_CROP_SHARE = 0.5


def _fit_cardiac_head(net: nn.Module, d: _CardiacData, y: torch.Tensor, tr: np.ndarray, cfg: TrainConfig,
                      device: torch.device) -> dict:
    """Second stage: the perceptron on shape descriptors, with the segmentation frozen.

    It learns from the descriptors of the predicted segmentation of the training patients and from
    those of their true masks (clean shapes), full batch, BCE-with-logits with class weighting.
    """
    from core.train import auc_or_nan, set_seed

    set_seed(cfg.seed)
    net.eval()
    with torch.no_grad():
        feats = [net.shape_features(net.segment(d.x[tr[i : i + 8]].to(device).float())) for i in range(0, len(tr), 8)]
        f_pred = torch.cat(feats)
        has_gt = (d.m[tr] >= 0).all(dim=(1, 2, 3))
        f_gt = net.shape_features(net.mask_logits(d.m[tr][has_gt].to(device)))
    f = torch.cat([f_pred, f_gt])
    t = torch.cat([y[tr], y[tr][has_gt]]).to(device)
    n_pos = float(t.sum())
    pos_weight = torch.tensor((len(t) - n_pos) / max(n_pos, 1.0), device=device)
    for p in net.unet.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.head.parameters(), lr=cfg.lr, weight_decay=1e-3)
    net.head.train()
    losses = []
    for _ in range(HEAD_STEPS):
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(net.head(f).flatten(), t, pos_weight=pos_weight)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in net.unet.parameters():
        p.requires_grad_(True)
    net.eval()
    with torch.no_grad():
        p_tr = torch.sigmoid(net.head(f_pred)).flatten().cpu().numpy()
    return {"steps": HEAD_STEPS, "samples": int(len(t)), "first_loss": losses[0], "final_loss": losses[-1],
            "train_auc_predicted_shapes": auc_or_nan(y[tr].numpy(), p_tr)}


def _fit_cardiac(d: _CardiacData, y: torch.Tensor, tr: np.ndarray, va: np.ndarray, cfg: TrainConfig,
                 device: torch.device, desc: str, runs_left: int = 1) -> tuple[nn.Module, FitResult, dict, np.ndarray]:
    """Stage 1: the U-Net segments every ED and ES slice of the training patients (best epoch by the
    validation patients' mean foreground Dice). Stage 2: the head on shape descriptors. ``runs_left``:
    this fold and those after it, which share what is left of the time budget (``core.train.fit``)."""
    from core.models import build_model
    from core.tasks import get_task
    from core.train import batches, fit, intensity_jitter, predict_logits, random_affine, set_seed

    spec = get_task("cardiac")
    set_seed(cfg.seed)
    model = build_model(spec.architecture, **spec.model_kwargs).to(device)
    tr_l = [i for i in tr if d.slice_masks[i] is not None]
    va_l = [i for i in va if d.slice_masks[i] is not None]
    x_tr = torch.cat([d.slices[i] for i in tr_l])[:, None].to(device)
    m_tr = torch.cat([d.slice_masks[i] for i in tr_l]).to(device)
    # the same slices in the image's centred square, where the heart may lie off centre or reach the edge: the
    # app's first localising pass reads that square (heart_box), every later pass the square on the heart
    x_trc = torch.cat([d.slices_centred[i] for i in tr_l])[:, None].to(device)
    m_trc = torch.cat([d.slice_masks_centred[i] for i in tr_l]).to(device)
    x_va = torch.cat([d.slices[i] for i in va_l])[:, None] if va_l else None
    m_va = torch.cat([d.slice_masks[i] for i in va_l]).long() if va_l else None
    unet = model.unet

    def train_batches(epoch: int):
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        centred = torch.rand(len(x_tr), generator=g) < CENTRED_CROP_SHARE  # which square each slice comes from
        for idx in batches(len(x_tr), cfg.batch_size, cfg.seed, epoch):
            c = centred[idx].to(device)[:, None, None]
            yield (torch.where(c[:, None], x_trc[idx], x_tr[idx]).float(),
                   torch.where(c, m_trc[idx], m_tr[idx]).long())

    def step(net: nn.Module, batch: tuple) -> tuple[torch.Tensor, float]:
        xb, mb = batch
        xb, mb = random_affine(xb, mb, rot_deg=15, scale=0.15, shift=0.05)
        xb = intensity_jitter(xb)
        logits = net(xb).float()
        loss = F.cross_entropy(logits, mb) + soft_dice_multiclass(logits, mb)
        return loss, 1.0 - float(soft_dice_multiclass(logits.detach(), mb, eps=1e-6))

    def validate(net: nn.Module) -> dict:
        if x_va is None:
            return {"loss": float("nan"), "dice": float("nan")}
        logits = torch.cat([net(x_va[i : i + 64].to(device).float()).float().cpu() for i in range(0, len(x_va), 64)])
        loss = float(F.cross_entropy(logits, m_va) + soft_dice_multiclass(logits, m_va))
        pred = logits.argmax(1)
        dices = [M.dice((pred == c).numpy(), (m_va == c).numpy()) for c in (1, 2, 3)]
        return {"loss": loss, "dice": float(np.mean(dices))}

    res = fit(unet, train_batches, step, validate, cfg, "dice", desc=desc, runs_left=runs_left)
    head = _fit_cardiac_head(model, d, y, tr, cfg, device)
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(predict_logits(model, d.x[va], device, bs=8)).cpu().numpy()
    return model, res, head, p


def train_cardiac(root: Path, cfg: TrainConfig, device: torch.device, smoke: bool = False,
                  out_dir: Path | None = None, folds: int = 5) -> dict:
    """5-fold cross-validation by patient for the figures; the committed model is fold 1's
    (trained on the other 4 folds), so its validation patients stay unseen."""
    from sklearn.model_selection import StratifiedGroupKFold

    from core.tasks import get_task
    from core.train import auc_or_nan, card_base, classifier_report, save_trained

    spec = get_task("cardiac")
    cases = mio.find_cardiac_cases(root)
    if smoke:
        by_label = {0: [c for c in cases if c.label == 0], 1: [c for c in cases if c.label == 1]}
        cases = by_label[0][:5] + by_label[1][:10]
        folds = 1
    labels = np.array([c.label for c in cases])
    groups_strat = [c.group for c in cases]
    data = _load_cardiac(cases, spec.input_spec["size"])
    y = torch.tensor(labels, dtype=torch.float32)
    n_splits = 5
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=cfg.seed)
    # stratify by the five ACDC groups so each fold holds every disease
    splits = list(sgkf.split(np.zeros(len(cases)), groups_strat, [c.patient_id for c in cases]))
    oof = np.full(len(cases), np.nan)
    fold_reports = []
    committed = None
    for k in range(folds):
        tr, va = splits[k]
        model, res, head, p = _fit_cardiac(data, y, tr, va, cfg, device, desc=f"cardiac fold {k + 1}",
                                           runs_left=folds - k)
        oof[va] = p
        at_half = M.classification_metrics(labels[va], p, 0.5)
        fold_reports.append({"fold": k + 1, "n_val": len(va), "best_epoch": res.best_epoch,
                             "epochs_run": res.epochs_run,
                             "val_seg_dice": res.best_value,
                             "val_auc": auc_or_nan(labels[va], p), "val_accuracy_at_0.5": at_half["accuracy"],
                             "val_sensitivity_at_0.5": at_half["sensitivity"],
                             "val_specificity_at_0.5": at_half["specificity"], "seconds": round(res.seconds, 1)})
        if k == 0:
            committed = (model, res, head, tr, va, p)
    model, res, head, tr, va, p = committed
    done = ~np.isnan(oof)
    # Threshold from the pooled out-of-fold predictions of all folds run, so it is not tuned on
    # the committed model's own validation patients alone.
    thr = M.youden_threshold(labels[done], oof[done]) if len(np.unique(labels[done])) == 2 else 0.5
    card = card_base(spec, cfg, device, smoke)
    card["training"]["schedule"] = res.schedule  # the committed fold's; each fold's epochs_run is in its report
    card["training"]["monitor"] = "dice"  # stage 1 keeps the epoch with the best segmentation Dice
    card.update({
        "threshold": thr,
        "threshold_rule": f"Youden's J on pooled out-of-fold predictions of {folds}-fold cross-validation, "
                          "halfway between the two probabilities it separates",
        "class_weighting": "BCE pos_weight = n_normal / n_disease per fold",
        "auxiliary_task": "two stages. 1: a 2D U-Net segments RV, myocardium and LV cavity on every ED and ES "
                          "slice of the training patients (ACDC masks; cross-entropy + soft Dice; the epoch kept is "
                          "the one with the best mean foreground Dice on the fold's validation patients). 2: with the "
                          "U-Net frozen, a small perceptron on 9 shape descriptors of the segmentation of 8 slices "
                          "per frame learns P(disease) from the training patients' predicted and true masks",
        "crop": f"every frame is read in a square of {pp.CARDIAC_CROP_FRACTION:.0%} of the image's shorter side "
                "centred on the heart: in training and validation the expert ED mask's heart; in the app the heart "
                "the U-Net itself finds in the ED frame, first in the image's centred square (core.cardiac.heart_box). "
                f"The segmentation trains on each slice in the square on the heart or, for a random "
                f"{CENTRED_CROP_SHARE:.0%} of them per epoch, in the image's centred square (the first pass's view)",
        "head_training": head,
        "data": {
            "dataset": spec.dataset,
            "n_patients": len(cases),
            "groups": {g: groups_strat.count(g) for g in sorted(set(groups_strat))},
            "split": f"{n_splits}-fold cross-validation stratified by ACDC group, by patient, seed {cfg.seed}; "
                     f"committed model = fold 1 ({len(tr)} train / {len(va)} validation patients)",
            "n_train": len(tr), "n_val": len(va),
            "train_cases": [cases[i].patient_id for i in tr],
            "val_cases": [cases[i].patient_id for i in va],
            "note": "The shared ACDC copy has no true voxel spacing; no mm or mL are derived from it.",
        },
        "history": res.history, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
        "train_time_s": round(sum(f["seconds"] for f in fold_reports), 1),
        "validation": classifier_report(labels[va].astype(int), p, thr, cfg.seed),
        "cross_validation": {
            "folds": fold_reports,
            "pooled_out_of_fold": classifier_report(labels[done].astype(int), oof[done], thr, cfg.seed),
            "out_of_fold_probability": {cases[i].patient_id: float(oof[i]) for i in np.nonzero(done)[0]},
            "note": "Each patient's out-of-fold probability comes from the fold model that did not see them; "
                    "pooled figures use the one threshold of the committed model.",
        },
    })
    save_trained(model, card, spec.name, out_dir)
    return card


def main(argv: list[str] | None = None) -> int:
    import argparse

    from core.config import data_root

    ap = argparse.ArgumentParser(prog="python -m core.cardiac", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--binary-calibration", action="store_true",
                    help="only measure the binary head's calibration (weights/cardiac.calibration.json)")
    args = ap.parse_args(argv)
    if args.binary_calibration:
        r = binary_calibration(data_root(args.data_root), args.weights)
        print(json.dumps({k: r[k] for k in ("n", "method", "ece_before", "ece_after_cross_fitted", "compared")},
                         indent=1))
        return 0
    rep = build(data_root(args.data_root), args.weights)
    cv = rep["cross_validation"]
    print(json.dumps({"cv_uncalibrated": {k: cv["uncalibrated"][k] for k in ("accuracy", "accuracy_ci95", "ece")},
                      "cv_calibrated_ece": cv["calibrated"]["ece"],
                      "validation_end_to_end": {k: rep["validation_end_to_end"].get(k) for k in ("n", "accuracy", "ece")}},
                     indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
