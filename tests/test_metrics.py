"""Metric functions against hand-computed values."""
from __future__ import annotations

import math

import numpy as np
import pytest

from core import metrics as M


def test_classification_hand_computed():
    y = [1, 1, 1, 1, 0, 0, 0, 0, 0, 0]
    p = [0.9, 0.8, 0.4, 0.7, 0.6, 0.2, 0.1, 0.3, 0.2, 0.1]
    m = M.classification_metrics(y, p, 0.5)
    # TP=3 (0.9, 0.8, 0.7), FN=1 (0.4), FP=1 (0.6), TN=5
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (3, 1, 1, 5)
    assert m["accuracy"] == pytest.approx(0.8)
    assert m["sensitivity"] == pytest.approx(0.75)
    assert m["specificity"] == pytest.approx(5 / 6)
    assert m["precision"] == pytest.approx(0.75)
    assert m["f1"] == pytest.approx(0.75)
    # AUC: of 24 positive/negative pairs, only (0.4 vs 0.6) is mis-ordered -> 23/24
    assert m["auc"] == pytest.approx(23 / 24)


def test_bootstrap_ci_brackets_estimate():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    p = np.clip(y * 0.3 + rng.random(300) * 0.7, 0, 1)
    ci = M.bootstrap_ci(y, p, 0.5, n_boot=300)
    m = M.classification_metrics(y, p, 0.5)
    for k in M.CLASSIFICATION_METRICS:
        assert ci[k][0] <= m[k] <= ci[k][1]
        assert ci[k][1] - ci[k][0] < 0.25


def test_youden_threshold_separates():
    y = [0, 0, 0, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.7, 0.8, 0.9]
    t = M.youden_threshold(y, p)
    assert 0.3 < t <= 0.7


def test_youden_ties_go_to_the_more_sensitive_threshold():
    # at 0.7: sensitivity 3/4, specificity 1 (J 0.75); at 0.5: sensitivity 1, specificity 3/4 (J 0.75)
    y = [0, 0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.2, 0.3, 0.6, 0.5, 0.7, 0.8, 0.9]
    t = M.youden_threshold(y, p)
    assert t == pytest.approx(0.4)  # halfway between 0.5 (lowest called positive) and 0.3 (next lower)
    m = M.classification_metrics(y, p, t)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.75


def test_youden_threshold_lies_between_cases_not_on_one():
    y = [0, 0, 1, 0, 1, 1]
    p = [0.10, 0.25, 0.56078, 0.3, 0.8, 0.9]
    t = M.youden_threshold(y, p)
    assert t == pytest.approx((0.56078 + 0.3) / 2)
    assert t not in p
    # a rounding-sized change of the borderline case's probability no longer changes its decision
    for eps in (-1e-6, 0.0, 1e-6):
        q = list(p)
        q[2] += eps
        assert M.classification_metrics(y, q, t)["sensitivity"] == 1.0
    assert M.youden_threshold([1, 0], [0.2, 0.9]) == pytest.approx(0.2)  # nothing lower: its own value


def test_dice_iou_hand_computed():
    a = np.zeros((4, 4), bool)
    b = np.zeros((4, 4), bool)
    a[:2, :2] = True  # 4 px
    b[:2, :3] = True  # 6 px, overlap 4
    assert M.dice(a, b) == pytest.approx(8 / 10)
    assert M.iou(a, b) == pytest.approx(4 / 6)
    assert M.dice(np.zeros(3), np.zeros(3)) == 1.0
    assert M.iou(np.zeros(3), np.zeros(3)) == 1.0
    assert M.dice(a, np.zeros_like(a)) == 0.0


def test_hd95_known_shift_and_spacing():
    a = np.zeros((20, 20, 20), bool)
    b = np.zeros((20, 20, 20), bool)
    a[5:10, 5:10, 5:10] = True
    b[5:10, 5:10, 8:13] = True  # shifted 3 voxels along z
    assert M.hd95(a, b) == pytest.approx(3.0)
    assert M.hd95(a, b, spacing=(1, 1, 2.0)) == pytest.approx(6.0)
    assert M.hd95(a, a) == 0.0
    assert math.isnan(M.hd95(a, np.zeros_like(a)))


def test_hd95_on_the_masks_box_equals_the_whole_volume():
    """hd95 works on the box around both masks; the same sums over the whole array agree, including masks
    that touch the array's edge."""
    from scipy import ndimage

    def whole(p, g, spacing):
        sp, sg = M._surface(p), M._surface(g)
        d = np.concatenate([ndimage.distance_transform_edt(~sg, sampling=spacing)[sp],
                            ndimage.distance_transform_edt(~sp, sampling=spacing)[sg]])
        return float(np.percentile(d, 95))

    rng = np.random.default_rng(0)
    for k in range(6):
        base = ndimage.binary_dilation(rng.random((40, 36, 20)) > 0.995, iterations=3)
        p = ndimage.binary_dilation(base, iterations=1) if k % 2 else base.copy()
        g = np.roll(base, k, axis=0)
        if k >= 4:  # touching the edges
            p[0, :5, :5] = g[-1, -5:, -5:] = True
        sp = (1.25, 1.25, 1.37)
        assert M.hd95(p, g, sp) == pytest.approx(whole(p, g, sp), abs=1e-9)
    assert M.union_box(np.eye(5, dtype=bool)[:, :3], np.zeros((5, 3), bool), margin=1) == (slice(0, 4), slice(0, 3))


def test_volume_and_per_slice():
    m = np.zeros((10, 10, 4), np.uint8)
    m[:5, :4, 1] = 1  # 20 voxels
    assert M.volume_ml(m, (1.25, 1.25, 1.37)) == pytest.approx(20 * 1.25 * 1.25 * 1.37 / 1000)
    g = m.copy()
    g[:5, :4, 2] = 1  # truth has 40 voxels
    assert M.volume_error_pct(m, g) == pytest.approx(-50.0)
    ps = M.per_slice_dice(m, g)
    assert math.isnan(ps[0]) and ps[1] == 1.0 and ps[2] == 0.0 and math.isnan(ps[3])


def test_mean_ci():
    lo, hi = M.mean_ci([0.8, 0.9, 1.0])
    assert 0.8 <= lo <= 0.9 <= hi <= 1.0


def test_cardiac_indices_known_values():
    ed = np.zeros((10, 10, 2), dtype=np.uint8)
    es = np.zeros_like(ed)
    ed[:5, :4, :] = 3  # LV cavity 20 px x 2 slices = 40
    ed[5:7, :5, :] = 2  # myocardium 10 x 2 = 20
    ed[7:, :, 0] = 1  # RV 30 px on one slice
    es[:2, :5, :] = 3  # LV 10 x 2 = 20
    es[7:, :4, 0] = 1  # RV 12
    r = M.cardiac_indices(ed, es)
    assert r["lv_ef"] == pytest.approx(1 - 20 / 40)
    assert r["rv_ef"] == pytest.approx(1 - 12 / 30)
    assert r["myo_to_lv_ed"] == pytest.approx(20 / 40)
    assert r["rv_to_lv_ed"] == pytest.approx(30 / 40)
    assert np.isnan(M.cardiac_indices(np.zeros((4, 4, 1)), np.zeros((4, 4, 1)))["lv_ef"])


def test_agreement_known_values():
    a = M.agreement([0.5, 0.6, 0.9, float("nan")], [0.4, 0.7, 0.7, 0.1])
    assert a["n"] == 3
    assert a["mae"] == pytest.approx((0.1 + 0.1 + 0.2) / 3)
    assert a["bias"] == pytest.approx((0.1 - 0.1 + 0.2) / 3)
    assert a["pearson_r"] == pytest.approx(np.corrcoef([0.5, 0.6, 0.9], [0.4, 0.7, 0.7])[0, 1])


def test_relative_agreement_known_values():
    a = M.relative_agreement([110, 90, 50, 7], [100, 100, 50, 0])  # the last pair has no reference volume
    assert a["n"] == 3
    assert a["mean_abs_pct"] == pytest.approx((10 + 10 + 0) / 3)
    assert a["mean_pct"] == pytest.approx(0.0)
    assert a["pearson_r"] == pytest.approx(np.corrcoef([110, 90, 50], [100, 100, 50])[0, 1])
    assert M.relative_agreement([], [])["n"] == 0


def test_segmentation_metrics_from_the_box_equal_the_whole_volume_figures():
    from scipy import ndimage

    rng = np.random.default_rng(1)
    sp = (1.25, 1.25, 1.37)
    for k in range(4):
        g = ndimage.binary_dilation(rng.random((40, 36, 20)) > 0.997, iterations=3)
        p = np.roll(g, k, axis=1)
        if k == 3:  # touching the edges
            p[0, :5, :5] = True
        got = M.segmentation_metrics(p.astype(np.uint8), g, sp)
        assert got == pytest.approx({"dice": M.dice(p, g), "iou": M.iou(p, g), "hd95_mm": M.hd95(p, g, sp),
                                     "volume_ml_pred": M.volume_ml(p, sp), "volume_ml_true": M.volume_ml(g, sp),
                                     "volume_error_pct": M.volume_error_pct(p, g)}, abs=1e-12)
    empty = M.segmentation_metrics(np.zeros((4, 4, 4)), np.zeros((4, 4, 4)), sp)
    assert empty["dice"] == 1.0 and math.isnan(empty["hd95_mm"]) and empty["volume_ml_pred"] == 0.0
