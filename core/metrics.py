"""Pure metric functions: classification (with bootstrap CIs) and segmentation (Dice, IoU, HD95, volume)."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

CLASSIFICATION_METRICS = ("accuracy", "sensitivity", "specificity", "precision", "f1", "auc")


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else float("nan")


def classification_metrics(y_true, y_prob, threshold: float = 0.5) -> dict[str, float]:
    """Accuracy, sensitivity, specificity, precision, F1 and ROC AUC for binary labels (1 = positive)."""
    # scikit-learn is imported where used: ~1 s, and the pages' path (Home's figures) does not need it
    from sklearn.metrics import confusion_matrix, roc_auc_score

    y_true = np.asarray(y_true).astype(int)
    y_prob = np.asarray(y_prob, dtype=float)
    y_pred = (y_prob >= threshold).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    sens = _safe_div(tp, tp + fn)
    prec = _safe_div(tp, tp + fp)
    f1 = _safe_div(2 * tp, 2 * tp + fp + fn)
    auc = float(roc_auc_score(y_true, y_prob)) if len(np.unique(y_true)) == 2 else float("nan")
    return {
        "accuracy": _safe_div(tp + tn, len(y_true)),
        "sensitivity": sens,
        "specificity": _safe_div(tn, tn + fp),
        "precision": prec,
        "f1": f1,
        "auc": auc,
        "tp": int(tp), "fp": int(fp), "tn": int(tn), "fn": int(fn),
    }


def bootstrap_ci(y_true, y_prob, threshold: float = 0.5, n_boot: int = 1000, seed: int = 0,
                 alpha: float = 0.05) -> dict[str, list[float]]:
    """Percentile bootstrap (resampling cases) 95 % intervals for each classification metric."""
    y_true = np.asarray(y_true).astype(int)
    y_prob = np.asarray(y_prob, dtype=float)
    rng = np.random.default_rng(seed)
    n = len(y_true)
    samples: dict[str, list[float]] = {m: [] for m in CLASSIFICATION_METRICS}
    for _ in range(n_boot):
        idx = rng.integers(0, n, n)
        if len(np.unique(y_true[idx])) < 2:
            continue
        m = classification_metrics(y_true[idx], y_prob[idx], threshold)
        for k in CLASSIFICATION_METRICS:
            if np.isfinite(m[k]):
                samples[k].append(m[k])
    out = {}
    for k, v in samples.items():
        out[k] = [float(np.quantile(v, alpha / 2)), float(np.quantile(v, 1 - alpha / 2))] if v else [float("nan")] * 2
    return out


def youden_threshold(y_true, y_prob) -> float:
    """Threshold maximising sensitivity + specificity - 1 on the given (validation) data.

    Where several thresholds tie on J, the most sensitive of them is taken: a missed disease costs a
    patient more than a second look at a healthy one. The threshold returned lies halfway between the
    lowest probability called positive and the next lower one, not on a case's own probability: there,
    that case's decision would turn on rounding (float32 vs bfloat16, batch-norm folding). The cases are
    split the same way, so every figure at the threshold is unchanged."""
    from sklearn.metrics import roc_curve

    y = np.asarray(y_true).astype(int)
    p = np.asarray(y_prob, dtype=float)
    fpr, tpr, thr = roc_curve(y, p)
    j = tpr - fpr
    i = int(np.flatnonzero(j >= j.max() - 1e-12)[-1])  # thresholds fall along the curve: last = most sensitive
    t = float(thr[i])
    below = p[p < t]
    if np.isfinite(t) and below.size:
        t = (t + float(below.max())) / 2
    return float(np.clip(t, 1e-6, 1 - 1e-6))


def roc_points(y_true, y_prob) -> dict[str, list[float]]:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(y_true).astype(int), np.asarray(y_prob, dtype=float))
    return {"fpr": fpr.round(4).tolist(), "tpr": tpr.round(4).tolist()}


def dice(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice = 2|A∩B| / (|A|+|B|); 1.0 when both are empty."""
    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    denom = p.sum() + g.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(p, g).sum() / denom)


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """Jaccard index |A∩B| / |A∪B|; 1.0 when both are empty."""
    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    union = np.logical_or(p, g).sum()
    return 1.0 if union == 0 else float(np.logical_and(p, g).sum() / union)


def _surface(mask: np.ndarray) -> np.ndarray:
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1),
                                          border_value=0)


def union_box(a: np.ndarray, b: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Slices of the bounding box of ``a | b`` (both boolean, not both empty), widened by ``margin``
    voxels and clipped to the array."""
    u = a | b
    box = []
    for ax in range(u.ndim):
        hit = np.flatnonzero(u.any(axis=tuple(i for i in range(u.ndim) if i != ax)))
        box.append(slice(max(int(hit[0]) - margin, 0), min(int(hit[-1]) + 1 + margin, u.shape[ax])))
    return tuple(box)


def hd95(pred: np.ndarray, gt: np.ndarray, spacing=None) -> float:
    """95th percentile symmetric surface distance in the units of ``spacing`` (mm); NaN if a mask is empty."""
    p, g = np.asarray(pred) > 0, np.asarray(gt) > 0
    if not p.any() or not g.any():
        return float("nan")
    spacing = tuple(spacing) if spacing is not None else (1.0,) * p.ndim
    # Every surface voxel lies in the box around both masks, so the distance transforms need only that box
    # (one voxel wider, so that the erosion sees the same neighbours): same result, and a 256x256x130
    # volume's distance maps shrink from about 200 MB to a few MB in the app server.
    box = union_box(p, g, margin=1)
    p, g = p[box], g[box]
    sp, sg = _surface(p), _surface(g)
    dt_g = ndimage.distance_transform_edt(~sg, sampling=spacing)
    dt_p = ndimage.distance_transform_edt(~sp, sampling=spacing)
    d = np.concatenate([dt_g[sp], dt_p[sg]])
    return float(np.percentile(d, 95))


def volume_ml(mask: np.ndarray, spacing) -> float:
    """Volume of the foreground in millilitres (voxel volume in mm^3 / 1000)."""
    return float(np.count_nonzero(mask) * float(np.prod(spacing)) / 1000.0)


def volume_error_pct(pred: np.ndarray, gt: np.ndarray) -> float:
    """Signed volume error of the prediction relative to the truth, in percent."""
    g = np.count_nonzero(gt)
    return float("nan") if g == 0 else float(100.0 * (np.count_nonzero(pred) - g) / g)


def per_slice_dice(pred: np.ndarray, gt: np.ndarray, axis: int = 2) -> np.ndarray:
    """Dice of each slice along ``axis``; NaN where both masks are empty on that slice."""
    p = np.moveaxis(np.asarray(pred) > 0, axis, 0).reshape(pred.shape[axis], -1)
    g = np.moveaxis(np.asarray(gt) > 0, axis, 0).reshape(gt.shape[axis], -1)
    inter = (p & g).sum(1)
    denom = p.sum(1) + g.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denom > 0, 2.0 * inter / np.maximum(denom, 1), np.nan)


def segmentation_metrics(pred: np.ndarray, gt: np.ndarray, spacing) -> dict[str, float]:
    """Dice, IoU, HD95 (mm), both volumes (mL) and the volume error (%) of two masks of one grid."""
    pred, gt = np.asarray(pred) > 0, np.asarray(gt) > 0
    if pred.any() or gt.any():
        # outside the box around both masks every voxel is background in both: the same figures from the box
        # alone, without passing over a whole 256x256x130 volume five times (0.29 s -> 0.10 s on la_003)
        box = union_box(pred, gt, margin=1)
        pred, gt = pred[box], gt[box]
    return {
        "dice": dice(pred, gt),
        "iou": iou(pred, gt),
        "hd95_mm": hd95(pred, gt, spacing),
        "volume_ml_pred": volume_ml(pred, spacing),
        "volume_ml_true": volume_ml(gt, spacing),
        "volume_error_pct": volume_error_pct(pred, gt),
    }


def mean_finite(per_case: dict[str, dict], key: str) -> float:
    """Mean of one metric over cases, skipping missing and non-finite values (nan when none is left)."""
    vals = [r[key] for r in per_case.values() if r.get(key) is not None and np.isfinite(r[key])]
    return float(np.mean(vals)) if vals else float("nan")


def mean_ci(values, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """Bootstrap 95 % interval of the mean of per-case values."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return [float("nan"), float("nan")]
    rng = np.random.default_rng(seed)
    means = v[rng.integers(0, len(v), (n_boot, len(v)))].mean(1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def cardiac_indices(ed_labels: np.ndarray, es_labels: np.ndarray) -> dict[str, float]:
    """Ratios from ACDC label maps (0 bg, 1 RV, 2 myocardium, 3 LV cavity) of one study's ED and ES
    frames, counted over all slices: ejection fractions 1 - ES/ED cavity size, myocardium-to-LV and
    RV-to-LV cavity ratios at ED. Voxel size cancels, so they hold without true spacing."""
    ed, es = np.asarray(ed_labels), np.asarray(es_labels)
    n = {f"{k}_{f}": float((a == v).sum()) for f, a in (("ed", ed), ("es", es)) for k, v in (("rv", 1), ("my", 2), ("lv", 3))}
    return {
        "lv_ef": 1 - _safe_div(n["lv_es"], n["lv_ed"]) if n["lv_ed"] else float("nan"),
        "rv_ef": 1 - _safe_div(n["rv_es"], n["rv_ed"]) if n["rv_ed"] else float("nan"),
        "myo_to_lv_ed": _safe_div(n["my_ed"], n["lv_ed"]) if n["lv_ed"] else float("nan"),
        "rv_to_lv_ed": _safe_div(n["rv_ed"], n["lv_ed"]) if n["lv_ed"] else float("nan"),
    }


def relative_agreement(estimate, reference) -> dict[str, float]:
    """Paired positive quantities (e.g. volumes in any one unit): mean absolute and mean relative difference
    in % of the reference (estimate - reference), and Pearson r; pairs with a reference <= 0 are left out."""
    a, b = np.asarray(estimate, dtype=float), np.asarray(reference, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b) & (b > 0)
    a, b = a[ok], b[ok]
    if len(a) == 0:
        return {"n": 0, "mean_abs_pct": float("nan"), "mean_pct": float("nan"), "pearson_r": float("nan")}
    pct = 100 * (a - b) / b
    r = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")
    return {"n": int(len(a)), "mean_abs_pct": float(np.abs(pct).mean()), "mean_pct": float(pct.mean()), "pearson_r": r}


def agreement(estimate, reference) -> dict[str, float]:
    """Mean absolute difference, mean difference (estimate - reference) and Pearson r over paired values."""
    a, b = np.asarray(estimate, dtype=float), np.asarray(reference, dtype=float)
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) == 0:
        return {"n": 0, "mae": float("nan"), "bias": float("nan"), "pearson_r": float("nan")}
    r = float(np.corrcoef(a, b)[0, 1]) if len(a) > 1 and a.std() > 0 and b.std() > 0 else float("nan")
    return {"n": int(len(a)), "mae": float(np.abs(a - b).mean()), "bias": float((a - b).mean()), "pearson_r": r}
