"""The atrium task: orientation round trips, the quality check (hand values and real inputs), readers."""
from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import torch

from core import atrium as A
from core import metrics as M
from core import io as mio
from core import preprocess as pp
from core.atrium import segment_atrium
from core.inference import load_model


# --------------------------------------------------------------------------- orientation (pure)

AFFINES = [
    np.diag([1.25, 1.25, 1.37, 1.0]),
    np.array([[0, 0, -2.0, 10], [1.0, 0, 0, 0], [0, -1.5, 0, 3], [0, 0, 0, 1]]),  # axes permuted and flipped
    np.array([[-1.0, 0, 0, 0], [0, 0, 1.2, 0], [0, 1.1, 0, 0], [0, 0, 0, 1]]),
]


@pytest.mark.parametrize("affine", AFFINES)
def test_canonical_round_trip_is_exact(affine):
    data = np.random.default_rng(0).random((5, 6, 7)).astype(np.float32)
    zooms = tuple(float(np.linalg.norm(affine[:3, i])) for i in range(3))
    c, sp, orient = A.to_canonical(data, affine, zooms)
    assert nib.aff2axcodes(nib.orientations.inv_ornt_aff(orient.ornt, data.shape) @ np.eye(4)) is not None
    assert np.array_equal(A.from_canonical(c, orient), data)
    assert sorted(sp) == sorted(zooms) and c.size == data.size


def test_canonical_of_permuted_affine_matches_known_order():
    data = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    # axis 0 points anterior, axis 1 inferior, axis 2 left -> canonical (R, A, S) = (-axis2, axis0, -axis1)
    aff = np.array([[0, 0, -1.0, 0], [1.0, 0, 0, 0], [0, -1.0, 0, 0], [0, 0, 0, 1]])
    c, sp, _ = A.to_canonical(data, aff, (1, 1, 1))
    expected = np.transpose(data, (2, 0, 1))[::-1, :, ::-1]
    assert np.array_equal(c, expected)


def test_slab_axis_is_the_thinnest_direction_when_clearly_thinner():
    # MSD-like: 320 x 320 x 178 mm -> axis 2; an LGE slab written with its thin axis first -> axis 0
    assert A.slab_axis((256, 256, 130), (1.25, 1.25, 1.37)) == 2
    assert A.slab_axis((88, 94, 73), (0.625, 1.25, 1.25)) == 0
    # 100 x 80 x 100 mm: axis 1 is thinner, but not below 0.75 x axis 2's extent -> stays axial
    assert A.slab_axis((100, 80, 100), (1.0, 1.0, 1.0)) == 2
    assert A.slab_axis((100, 74, 100), (1.0, 1.0, 1.0)) == 1
    assert A.resolve_views((2,), (88, 94, 73), (0.625, 1.25, 1.25)) == (0,)
    assert A.resolve_views((2, 0, 1), (88, 94, 73), (0.625, 1.25, 1.25)) == (2, 0, 1)
    # wide in every direction (320 x 320 x 178 mm): the slab's axis first, then the two others, fused
    assert A.resolve_views((2,), (256, 256, 130), (1.25, 1.25, 1.37)) == (2, 0, 1)
    assert A.resolve_views((2,), (130, 256, 256), (1.37, 1.25, 1.25)) == (0, 2, 1)
    with pytest.raises(ValueError):
        A.slab_axis((10, 10, 10), (1, 1, 1), ratio=0)


def test_view_spacing():
    assert A.view_spacing((1.0, 2.0, 3.0), 0) == (2.0, 3.0, 1.0)
    assert A.view_spacing((1.0, 2.0, 3.0), 2) == (1.0, 2.0, 3.0)


# --------------------------------------------------------------------------- quality check (hand values)


def _m(**kw) -> dict:
    base = {"volume_ml": 80.0, "kept_fraction": 0.95, "uncertain_ratio": 0.2, "view_agreement": 0.9,
            "min_extent_mm": 90.0}
    return {**base, **kw}


def test_quality_rule_passes_a_plausible_mask():
    assert A.judge(_m(), A.QualityRule()).reliable


@pytest.mark.parametrize("kw, word", [({"volume_ml": 0.0}, "no atrium"), ({"volume_ml": 3.0}, "outside the range"),
                                      ({"volume_ml": 400.0}, "outside the range"),
                                      ({"kept_fraction": 0.3}, "fragmented"), ({"uncertain_ratio": 2.0}, "unsure"),
                                      ({"view_agreement": 0.3}, "disagree"), ({"min_extent_mm": 10.0}, "covers only")])
def test_quality_rule_names_each_failure(kw, word):
    q = A.judge(_m(**kw), A.QualityRule())
    assert not q.reliable and any(word in r for r in q.reasons), q.reasons


def test_quality_measures_on_a_hand_made_prediction():
    prob = np.zeros((10, 10, 10), np.float32)
    prob[2:6, 2:6, 2:6] = 0.9  # 64 voxels sure
    prob[7, 7, 7] = 0.6  # one stray, unsure voxel
    raw = prob >= 0.5
    pred = A.AtriumPrediction(prob, [raw, raw], A.pp.largest_component(raw))
    m = A.quality_measures(pred, (2.0, 2.0, 2.0))
    assert m["volume_ml"] == pytest.approx(64 * 8 / 1000)
    assert m["kept_fraction"] == pytest.approx(64 / 65)
    assert m["uncertain_ratio"] == pytest.approx(1 / 64)
    assert m["view_agreement"] == 1.0 and m["min_extent_mm"] == 20.0
    assert m["fused"] == 1.0  # two view masks: judged by the fused limits


def test_count_in_band_on_float16_bit_patterns_equals_the_float_comparison():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(-1, 2, 5000), [0.2, 0.8, 0.19995, 0.8003, -0.0, 0.0, np.nan, np.inf, -np.inf, -0.5]])
    p16 = p.astype(np.float16)
    for lo, hi in ((0.2, 0.8), (0.0, 0.5), (0.45, 0.55)):
        want = int(((p16 > lo) & (p16 < hi)).sum())
        assert A.count_in_band(p16, lo, hi) == want == A.count_in_band(p16.astype(np.float32), np.float16(lo),
                                                                       np.float16(hi))
    assert A.count_in_band(np.array([0.1, 0.3, 0.9], np.float32), 0.2, 0.8) == 1
    with pytest.raises(ValueError):
        A.count_in_band(p16, -0.1, 0.5)


def test_quality_measures_over_the_views_box_equal_those_over_the_volume():
    """The fused path passes the box its views ran in (nothing outside it): the measures taken over the box are
    exactly those over the whole volume, the known values of the hand-made prediction included."""
    rng = np.random.default_rng(3)
    prob = np.zeros((12, 14, 10), np.float32)
    box = (slice(2, 9), slice(3, 12), slice(1, 8))
    prob[box] = rng.random((7, 9, 7)).astype(np.float32)
    views = [prob >= 0.5, np.roll(prob, 1, axis=0) >= 0.5, prob >= 0.4]
    views = [v & np.pad(np.ones((7, 9, 7), bool), ((2, 3), (3, 2), (1, 2))) for v in views]  # empty outside
    mask = A.pp.largest_component(prob >= 0.5)
    img = rng.random(prob.shape).astype(np.float32)
    whole = A.quality_measures(A.AtriumPrediction(prob.astype(np.float16), views, mask, (2, 0, 1)), (1.5, 1.5, 2.0),
                               0.5, img)
    boxed = A.quality_measures(A.AtriumPrediction(prob.astype(np.float16), views, mask, (2, 0, 1), box),
                               (1.5, 1.5, 2.0), 0.5, img)
    assert boxed == whole
    assert whole["kept_fraction"] == pytest.approx(mask.sum() / (prob.astype(np.float16) >= 0.5).sum())
    assert whole["volume_ml"] == pytest.approx(mask.sum() * 1.5 * 1.5 * 2.0 / 1000)


def test_mask_brightness_known_values_and_a_dark_mask_is_withheld():
    """The share of the image darker than the mask's mean (known values), and the check's fixed floor: a mask on
    the dark part of a scan (a dark-blood or inverted image) is withheld; without the image nothing is judged."""
    prob = np.zeros((10, 10, 10), np.float32)
    prob[2:6, 2:6, 2:6] = 0.9
    raw = prob >= 0.5
    pred = A.AtriumPrediction(prob, [raw], raw.astype(np.uint8))
    img = np.arange(1000, dtype=np.float32).reshape(10, 10, 10)  # every voxel value once
    inside = img[raw].mean()
    m = A.quality_measures(pred, (2.0, 2.0, 2.0), image=img)
    assert m["mask_brightness"] == pytest.approx((img < inside).mean())
    bright = A.quality_measures(pred, (2.0, 2.0, 2.0), image=np.where(raw, 5.0, 1.0).astype(np.float32))
    dark = A.quality_measures(pred, (2.0, 2.0, 2.0), image=np.where(raw, 1.0, 5.0).astype(np.float32))
    assert bright["mask_brightness"] == pytest.approx(1 - 64 / 1000) and dark["mask_brightness"] == 0.0
    assert "mask_brightness" not in A.quality_measures(pred, (2.0, 2.0, 2.0))
    rule = A.QualityRule()
    assert rule.min_mask_brightness == A.MIN_MASK_BRIGHTNESS == 0.5
    assert A.judge(_m(mask_brightness=0.9), rule).reliable
    q = A.judge(_m(mask_brightness=0.03), rule)
    assert not q.reliable and any("darker than 97% of the scan" in r for r in q.reasons), q.reasons
    assert A.judge(_m(), rule).reliable  # measured without the image: not judged


def test_fitted_limits_per_mode_and_judged_by_the_mode():
    single = {f"s{i}": {"uncertain_ratio": 0.2 + 0.01 * i, "view_agreement": 1.0, "fused": 0.0} for i in range(10)}
    fused = {f"f{i}": {"uncertain_ratio": 0.8, "view_agreement": 0.7, "fused": 1.0} for i in range(6)}
    lim = A.fit_quality_limits({**single, **fused})
    lim_f = A.fit_quality_limits({**single, **fused}, fused=True)
    assert lim["min_view_agreement"] == pytest.approx(0.8) and lim_f["min_view_agreement"] == pytest.approx(0.56)
    assert lim_f["max_uncertain_ratio"] == pytest.approx(1.2)
    assert A.fit_quality_limits(single, fused=True) is None  # too few fused volumes to fit limits on
    card = {"quality_check": {"limits": lim, "limits_fused": lim_f}}
    m = _m(uncertain_ratio=1.0, view_agreement=0.6, fused=1.0)
    assert A.judge_with_card(m, card).reliable  # within the fused limits
    assert not A.judge_with_card({**m, "fused": 0.0}, card).reliable  # not within the single-view ones


def test_slice_uncertainty_area():
    prob = np.zeros((4, 4, 3), np.float32)
    prob[0, :2, 1] = 0.5
    out = A.slice_uncertainty_cm2(prob, (10.0, 10.0, 1.0))
    assert out.tolist() == [0.0, 2.0, 0.0]


def test_rule_from_card_reads_fitted_limits():
    card = {"quality_check": {"limits": {"max_uncertain_ratio": 0.9, "volume_range_ml": [5, 300]}}}
    r = A.QualityRule.from_card(card)
    assert r.max_uncertain_ratio == 0.9 and r.volume_range_ml == (5, 300)


# --------------------------------------------------------------------------- real data


def test_readers_find_both_atrium_datasets(heart_root, lge_root):
    cases = mio.find_atrium_cases(heart_root)
    by = {d: [c for c in cases if c.dataset == d] for d in mio.ATRIUM_DATASETS}
    assert len(by["Task02_Heart"]) >= 10 and len(by["LA2018"]) >= 40
    v = mio.load_nifti_path(by["LA2018"][0].image_path)
    lab = mio.load_nifti_path(by["LA2018"][0].label_path)
    assert v.data.shape == lab.data.shape and v.spacing[2] == pytest.approx(0.625, abs=1e-3)
    assert set(np.unique(lab.data)) <= {0, 1}


def _lge_case(root):
    """An LGE volume: one the weights did not train on when there is one (a fold-1 model); the committed
    model trained on every volume, so for it this is a training volume."""
    val = set(load_model("atrium", with_guard=False).card["data"]["val_cases"])
    cases = [c for c in mio.find_atrium_cases(root) if c.dataset == "LA2018"]
    held = [c for c in cases if c.case_id in val]
    return (held or cases)[0]


def _reoriented(vol: mio.Volume, perm: tuple[int, int, int], flips: tuple[bool, bool, bool]) -> mio.Volume:
    """The same voxels in another array order, with the affine that keeps their world positions."""
    data = np.transpose(vol.data, perm)
    aff = vol.affine.copy()
    aff[:, :3] = vol.affine[:, list(perm)]
    for ax, f in enumerate(flips):
        if f:
            data = np.flip(data, ax)
            aff[:3, 3] += aff[:3, ax] * (data.shape[ax] - 1)
            aff[:3, ax] = -aff[:3, ax]
    return mio.Volume(np.ascontiguousarray(data), aff, tuple(vol.spacing[i] for i in perm), "reoriented")


@pytest.mark.parametrize("perm, flips", [((2, 0, 1), (False, True, False)), ((1, 2, 0), (True, False, True))])
def test_rotated_copy_of_a_real_volume_gives_the_same_mask(lge_root, perm, flips):
    lm = load_model("atrium")
    c = _lge_case(lge_root)
    vol = mio.load_nifti_path(c.image_path)
    ref = segment_atrium(lm, vol)
    rot = _reoriented(vol, perm, flips)
    out = segment_atrium(lm, rot)
    # map the reference mask through the same reorientation: it must be the mask that came back
    expect = _reoriented(mio.Volume(ref.mask, vol.affine, vol.spacing, "m"), perm, flips).data
    assert out.mask.shape == rot.data.shape
    assert np.array_equal(out.mask, expect)
    assert out.volume_ml == pytest.approx(ref.volume_ml)


def test_lying_header_gets_the_same_slices(lge_root):
    """An LGE volume transposed into another axis order while its diagonal affine stays (the header lies
    about the slice plane): the model still slices across the slab, so the mask is the stored one's."""
    lm = load_model("atrium")
    vol = mio.load_nifti_path(_lge_case(lge_root).image_path)
    ref = segment_atrium(lm, vol)
    perm = (2, 0, 1)  # the thin (through-slab) axis comes first; slicing along it gives the same slices
    lying = mio.Volume(np.ascontiguousarray(np.transpose(vol.data, perm)), vol.affine,
                       tuple(vol.spacing[i] for i in perm), "lying")
    out = segment_atrium(lm, lying)
    assert out.views == (0,) and out.reliable
    # the 3D refiner reads the box in the array's own axis order, and a 3D network trained with its axes permuted
    # at random is close to, not exactly, indifferent to that order: the masks nearly agree
    got, want = out.mask.astype(bool), np.transpose(ref.mask, perm).astype(bool)
    assert 2 * (got & want).sum() / (got.sum() + want.sum()) > 0.98, 2 * (got & want).sum() / (got.sum() + want.sum())
    # without it the same slices give exactly the same mask
    plain = dataclasses.replace(lm, refiner=None)
    assert np.array_equal(segment_atrium(plain, lying).mask, np.transpose(segment_atrium(plain, vol).mask, perm))


def test_quality_check_passes_on_a_real_lge_volume(lge_root):
    lm = load_model("atrium")
    c = _lge_case(lge_root)
    res = segment_atrium(lm, mio.load_nifti_path(c.image_path))
    gt = mio.load_nifti_path(c.label_path).data > 0.5
    from core.metrics import dice

    assert dice(res.mask, gt) > 0.5
    assert res.reliable, res.quality.reasons


def test_quality_check_fires_on_inputs_that_are_not_atrial_mri(acdc_root, xray_root):
    lm = load_model("atrium")
    rng = np.random.default_rng(0)
    eye = np.diag([1.25, 1.25, 1.25, 1.0])
    acdc = mio.find_cardiac_cases(acdc_root)[0]
    cine = mio.load_nifti_path(acdc.ed_path)
    xr = [mio.read_image_2d(c.path.read_bytes(), c.path.name).pixels for c in mio.find_xray_cases(xray_root)[:40]]
    side = min(min(p.shape) for p in xr)
    stack = np.stack([p[:side, :side] for p in xr], axis=2).astype(np.float32)
    inputs = {
        "ACDC cine frame": cine,
        "chest X-rays stacked as a volume": mio.Volume(stack, eye, (1.25, 1.25, 1.25), "xr"),
        "noise": mio.Volume(rng.random((96, 96, 80)).astype(np.float32), eye, (1.25, 1.25, 1.25), "noise"),
    }
    for what, vol in inputs.items():
        res = segment_atrium(lm, vol)
        assert not res.reliable, f"{what}: quality check did not fire ({res.quality.measures})"


def test_largest_disagreement_slice_is_not_the_lowest_dice_slice():
    pred = np.zeros((20, 20, 3), np.uint8)
    gt = np.zeros_like(pred)
    pred[0, 0, 0] = 1  # slice 0: two stray pixels, Dice 0
    pred[1, 0, 0] = 1
    gt[2:12, 2:12, 1] = 1  # slice 1: half the atrium missed, Dice 0.67
    pred[2:7, 2:12, 1] = 1
    gt[2:6, 2:6, 2] = pred[2:6, 2:6, 2] = 1  # slice 2: perfect
    d = A.disagreement_cm2(pred, gt, (1.0, 1.0, 1.0))
    assert d.tolist() == pytest.approx([0.02, 0.5, 0.0])
    assert int(np.argmax(d)) == 1


def test_orientation_markers_are_drawn():
    from core.visualize import radiological_axial, with_orientation_markers

    s = np.arange(12).reshape(3, 4)  # (X = R->L index, Y)
    img = radiological_axial(s)
    assert img.shape == (4, 3) and img[0, 0] == s[2, 3]  # top-left: most right (x max), most anterior (y max)
    rgb = with_orientation_markers(np.zeros((64, 64, 3), np.uint8))
    assert rgb.shape[0] >= 320
    top = rgb[:16, rgb.shape[1] // 2 - 8 : rgb.shape[1] // 2 + 12]
    assert (top[..., 0] > 200).any()  # the yellow "A"


def test_planes_show_each_slice_as_a_radiologist_reads_it():
    from core.visualize import PLANES, plane_pixel_mm, radiological_slice

    # a RAS volume (X, Y, Z) whose voxel value says where it is: 100 x + 10 y + z
    x, y, z = np.meshgrid(np.arange(3), np.arange(4), np.arange(5), indexing="ij")
    vol = 100 * x + 10 * y + z
    ax_img = radiological_slice(vol, PLANES["axial"], 2)
    assert ax_img.shape == (4, 3) and ax_img[0, 0] == 232  # top-left: most anterior (y 3), most right (x 2)
    cor = radiological_slice(vol, PLANES["coronal"], 1)
    # rows: superior (z 4) at the top; columns: the patient's right (x 2) on the left; every pixel at y = 1
    assert cor.shape == (5, 3) and cor[0, 0] == 214 and cor[-1, -1] == 10 and np.all(cor // 10 % 10 == 1)
    sag = radiological_slice(vol, PLANES["sagittal"], 0)
    # rows: superior at the top; columns: anterior (y 3) on the left; every pixel at x = 0
    assert sag.shape == (5, 4) and sag[0, 0] == 34 and sag[-1, -1] == 0 and np.all(sag // 100 == 0)
    assert PLANES["coronal"].markers == ("S", "I", "R", "L") and PLANES["sagittal"].markers == ("S", "I", "A", "P")
    with pytest.raises(IndexError):
        radiological_slice(vol, PLANES["sagittal"], 3)
    # (row height, column width) in mm: axial rows are y, coronal and sagittal rows are z
    sp = (1.0, 2.0, 3.0)
    assert plane_pixel_mm(sp, PLANES["axial"]) == (2.0, 1.0)
    assert plane_pixel_mm(sp, PLANES["coronal"]) == (3.0, 1.0)
    assert plane_pixel_mm(sp, PLANES["sagittal"]) == (3.0, 2.0)


def test_mask_overlay_colours_agreement_and_hatches_where_unsure():
    from core.visualize import AGREE, FALSE_NEG, FALSE_POS, UNSURE, Window, mask_overlay

    gray = np.zeros((4, 4))
    pred, truth = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    pred[0, :2] = truth[0, 1:3] = True  # (0, 0) predicted only, (0, 1) both, (0, 2) true only
    img, entries = mask_overlay(gray, pred, truth, alpha=1.0, window=Window(0.5, 1.0))
    assert img[0, 0].tolist() == list(FALSE_POS) and img[0, 1].tolist() == list(AGREE)
    assert img[0, 2].tolist() == list(FALSE_NEG) and img[0, 3].tolist() == [0, 0, 0]
    assert [c for _, c in entries] == [AGREE, FALSE_POS, FALSE_NEG]
    unsure = np.zeros((4, 4), bool)
    unsure[2, :] = True  # a row where the model is unsure: every other pixel hatched, the others kept
    img2, entries2 = mask_overlay(gray, pred, truth, alpha=1.0, window=Window(0.5, 1.0), unsure=unsure,
                                  unsure_label="unsure")
    assert [img2[2, x].tolist() for x in range(4)] == [list(UNSURE), [0, 0, 0], list(UNSURE), [0, 0, 0]]
    assert np.array_equal(img2[:2], img[:2]) and entries2[-1] == ("unsure", UNSURE)
    with pytest.raises(ValueError):
        mask_overlay(gray, pred, truth, unsure=np.zeros((3, 3), bool))


def test_square_pixels_stretches_thick_slices_to_true_shape():
    from core.visualize import square_pixels

    img = np.arange(6).reshape(2, 3)
    assert square_pixels(img, 1.0, 1.0) is img  # square already
    tall = square_pixels(img, 2.0, 1.0)  # rows twice as tall as wide: each row twice
    assert tall.tolist() == [[0, 1, 2], [0, 1, 2], [3, 4, 5], [3, 4, 5]]
    wide = square_pixels(img, 0.625, 1.25)  # an LGE coronal slice: columns twice as wide as rows are tall
    assert wide.tolist() == [[0, 0, 1, 1, 2, 2], [3, 3, 4, 4, 5, 5]]
    assert square_pixels(np.zeros((4, 4, 3)), 1.0, 1.5).shape == (4, 6, 3)  # colour images too
    assert square_pixels(np.zeros((2, 2)), 100.0, 1.0).shape == (32, 2)  # at most 16x
    with pytest.raises(ValueError):
        square_pixels(img, 0.0, 1.0)



def test_slice_strip_marks_the_slice_shown():
    from core.visualize import slice_strip

    unsure = np.zeros(40)
    unsure[30] = 5.0  # one tall bar at slice 31
    s = slice_strip(unsure, np.linspace(0, 1, 40))
    assert len(s.rows) == 2 and s.image.dtype == np.uint8
    assert np.all(np.diff(s.xs) > 0)  # slices left to right, one column each
    # the orange bar stands where slice 31 is drawn (x of slice index 30), not where slice 11 is
    top, bottom = s.rows[1]
    col = s.image[top:bottom, s.xs[30]]
    assert (np.abs(col.astype(int) - (255, 165, 0)).sum(axis=1) < 40).sum() > 0.5 * (bottom - top)
    assert not (np.abs(s.image[top:bottom, s.xs[10]].astype(int) - (255, 165, 0)).sum(axis=1) < 40).any()
    m = s.marked(10)
    assert (m[top + 5, s.xs[10]] == (220, 0, 0)).all() and not (s.image[top + 5, s.xs[10]] == (220, 0, 0)).all()
    assert (m != s.image).any(axis=2).sum() <= 3 * sum(b - t for t, b in s.rows)  # only the marker changed
    assert len(slice_strip(unsure).rows) == 1  # no reference mask: the uncertainty row only
    with pytest.raises(ValueError, match="one value per slice"):
        slice_strip(unsure, np.zeros(39))


# --------------------------------------------------------------------------- test-time flips and the setting rule


def test_flip_passes_of_a_flip_equivariant_model_equal_the_plain_pass():
    import torch

    net = torch.nn.Conv2d(3, 1, 1)  # a 1x1 convolution commutes with every flip
    x = torch.randn(2, 3, 8, 8)
    plain = torch.sigmoid(net(x))[:, 0]
    for f in (1, 2, 4):
        assert torch.allclose(A._flip_passes(net, x, f), plain, atol=1e-6)


def test_flip_passes_put_each_flipped_output_back_in_place():
    import torch

    class Marker(torch.nn.Module):  # output = the input's first channel as logits: not position-free
        def forward(self, x):
            return x[:, :1] * 0 + torch.arange(x.shape[-1], dtype=x.dtype).expand_as(x[:, :1])

    x = torch.zeros(1, 3, 4, 4)
    parts: list = []
    A._flip_passes(Marker(), x, 4, parts)
    # the marker ramps along W; flipped back, the W-flipped passes ramp the other way, H-flips don't change it
    ramp = torch.sigmoid(torch.arange(4.0)).expand(1, 4, 4)
    assert torch.allclose(parts[0], ramp) and torch.allclose(parts[2], ramp)
    assert torch.allclose(parts[1], ramp.flip(-1)) and torch.allclose(parts[3], ramp.flip(-1))
    with pytest.raises(ValueError):
        A.segment_view(torch.nn.Identity(), np.zeros((4, 4, 4), np.float32), (1.0, 1.0, 1.0), 2, 1.0, flips=3)


class _CentreSlice(__import__("torch").nn.Module):
    """A stand-in model: the logit of each pixel is its 2.5D input's centre slice (x 10)."""

    def forward(self, x):
        return x[:, 1:2] * 10


class _Counting(_CentreSlice):
    """``_CentreSlice`` that records how many slices each call is given."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def forward(self, x):
        self.seen.append(x.shape[0])
        return super().forward(x)


def test_strided_pass_segments_every_other_slice_like_the_plain_pass():
    vol = np.random.default_rng(0).random((16, 16, 9)).astype(np.float32)
    full = A.segment_view(_CentreSlice(), vol, (1.25, 1.25, 1.25), 2, 1.25, batch_size=3, normalised=True)
    half = A.segment_view(_CentreSlice(), vol, (1.25, 1.25, 1.25), 2, 1.25, batch_size=3, normalised=True, stride=2)
    assert np.allclose(half[:, :, ::2], full[:, :, ::2], atol=1e-6) and not half[:, :, 1::2].any()
    with pytest.raises(ValueError):
        A.segment_view(_CentreSlice(), vol, (1.25, 1.25, 1.25), 2, 1.25, stride=0)


def test_pass_on_chosen_slices_matches_the_plain_pass_there_and_is_zero_elsewhere():
    vol = np.random.default_rng(1).random((16, 16, 9)).astype(np.float32)
    full = A.segment_view(_CentreSlice(), vol, (1.25, 1.25, 1.25), 2, 1.25, batch_size=3, normalised=True)
    some = A.segment_view(_CentreSlice(), vol, (1.25, 1.25, 1.25), 2, 1.25, batch_size=2, normalised=True,
                          slices=[1, 4, 5, 8])
    assert np.allclose(some[:, :, [1, 4, 5, 8]], full[:, :, [1, 4, 5, 8]], atol=1e-6)
    assert not some[:, :, [0, 2, 3, 6, 7]].any()
    none = A.segment_view(_CentreSlice(), vol, (1.25, 1.25, 1.25), 2, 1.25, normalised=True, slices=[])
    assert none.shape == vol.shape and not none.any()
    for bad in ([4, 1], [1, 1], [9], [-1]):
        with pytest.raises(ValueError):
            A.segment_view(_CentreSlice(), vol, (1.25, 1.25, 1.25), 2, 1.25, normalised=True, slices=bad)


def test_localised_slices_are_the_volume_s_multiples_of_the_stride():
    box = (slice(0, 4), slice(0, 4), slice(3, 9))
    assert A.localised_slices(box, 2, 2).tolist() == [False, True, False, True, False, True]  # 4, 6, 8
    assert A.localised_slices(box, 0, 3).tolist() == [True, False, False, True]  # 0, 3


def test_blend_slices_known_values():
    p = np.zeros((2, 3, 5), np.float32)
    p[:, :, 1::2] = 1.0  # alternating slices along the last axis: 0 1 0 1 0
    b = A.blend_slices(p, 2)
    assert b.dtype == np.float32 and b.shape == p.shape
    np.testing.assert_allclose(b[0, 0], [0.25, 0.5, 0.5, 0.5, 0.25])  # edges repeated: 0.75*0 + 0.25*1
    np.testing.assert_allclose(A.blend_slices(np.full((4, 3, 2), 0.7, np.float32), 0), 0.7, rtol=1e-6)
    q = np.zeros((5, 1, 1))
    q[2] = 1.0
    np.testing.assert_allclose(A.blend_slices(q, 0)[:, 0, 0], [0, 0.25, 0.5, 0.25, 0])  # the sum is kept
    with pytest.raises(ValueError):
        A.blend_slices(p, 3)


def test_fused_first_view_reuses_the_localising_pass_on_the_slices_it_read():
    vol = np.full((100, 100, 100), -3.0, np.float32)
    vol[30:50, 30:50, 30:50] = 3.0
    m = _Counting()
    pred = A.segment_canonical(m, vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16)
    box = pred.box
    n_box = [b.stop - b.start for b in box]
    done = A.localised_slices(box, 2)
    loc_slices = len(range(0, 100, A.LOCALISE_STRIDE))
    # the localising pass, then the first view on the box's other slices only, then the two other views
    assert sum(m.seen) == loc_slices + int((~done).sum()) + n_box[0] + n_box[1]
    assert pred.mask.sum() == 20 ** 3
    # the first view's mask: the localising pass's reading on its slices, the box pass's on the others, blended
    # across slices (the cube's edge slices keep 3/4 of their reading: still inside at threshold 0.5)
    first = pred.view_masks[0]
    assert first[30:50, 30:50, 30:50].all() and first.sum() == 20 ** 3


class _Nothing(_CentreSlice):
    """A stand-in localiser that finds nothing anywhere."""

    def forward(self, x):
        return torch.full_like(x[:, 1:2], -10.0)


def test_a_localiser_narrows_the_model_s_localising_pass_to_its_field_and_the_box_stays_the_model_s():
    vol = np.full((192, 192, 192), -3.0, np.float32)
    vol[80:114, 72:106, 90:124] = 3.0  # 0.5 % of the volume: above the normalisation's 99.5th percentile
    sp = (1.25,) * 3
    m, plain, net = _Counting(), _Counting(), _Counting()
    loc = A.Localiser(net, grid_mm=2.5)
    pred = A.segment_canonical(m, vol, sp, (2, 0, 1), 1.25, batch_size=16, localiser=loc)
    ref = A.segment_canonical(plain, vol, sp, (2, 0, 1), 1.25, batch_size=16)
    # the localiser reads every 4th slice of the whole volume (on its own coarser grid)
    assert sum(net.seen) == len(range(0, 192, A.LOCALISER_STRIDE))
    field = loc.field(pp.normalise_volume(vol), sp, 2)
    margin = A.FIELD_MARGIN_MM / 1.25  # voxels
    for f, lo, hi in zip(field, (80, 72, 90), (114, 106, 124)):
        # the coarse grid and the slices read (every 4th) move the finding's faces by up to 4 voxels; the start
        # then goes down to a multiple of 16
        assert f.start % 16 == 0 and (lo - margin - 4) // 16 * 16 <= f.start <= (lo - margin + 4) // 16 * 16
        assert abs(f.stop - (hi + margin)) <= 4
    # the segmenting model's localising pass reads every 2nd slice of the field instead of the whole volume;
    # everything after it is the same: the same box, the same slices read, the same mask
    n_field = len(range(0, field[2].stop - field[2].start, A.LOCALISE_STRIDE))
    assert sum(m.seen) == sum(plain.seen) - len(range(0, 192, A.LOCALISE_STRIDE)) + n_field
    assert pred.box == ref.box and np.array_equal(pred.mask, ref.mask) and pred.mask.sum() == 34 ** 3


def test_a_field_too_narrow_for_the_model_s_box_is_read_again_whole():
    vol = np.full((192, 192, 192), -3.0, np.float32)
    vol[80:114, 72:106, 90:124] = 3.0
    norm = pp.normalise_volume(vol)
    loc = A.Localiser(_CentreSlice(), grid_mm=2.5)
    loc.field = lambda *a, **k: (slice(64, 128), slice(64, 128), slice(64, 160))  # less than the box's margin
    box, p = A.localise_in_field(_CentreSlice(), norm, (1.25,) * 3, 2, 1.25, batch_size=16, localiser=loc)
    ref, q = A.localise_pass(_CentreSlice(), norm, (1.25,) * 3, 2, 1.25, batch_size=16)
    assert box == ref and np.array_equal(p, q[ref])


def test_a_localiser_that_finds_nothing_leaves_the_box_to_the_model_s_own_pass():
    vol = np.full((100, 100, 100), -3.0, np.float32)
    vol[30:50, 30:50, 30:50] = 3.0
    m, plain = _Counting(), _Counting()
    pred = A.segment_canonical(m, vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16,
                               localiser=A.Localiser(_Nothing(), grid_mm=2.5))
    ref = A.segment_canonical(plain, vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16)
    assert pred.box == ref.box and m.seen == plain.seen and np.array_equal(pred.mask, ref.mask)


def test_localiser_arguments_are_checked_and_the_card_names_the_one_it_was_measured_with(tmp_path):
    from core.checkpoint import save_checkpoint
    from core.errors import MissingWeightsError
    from core.models import build_model

    with pytest.raises(ValueError):
        A.Localiser(_CentreSlice(), grid_mm=9.0)
    with pytest.raises(ValueError):
        A.Localiser(_CentreSlice(), threshold=1.0)
    assert A.localiser_for({"input_spec": {}}, tmp_path) is None  # a card that names none: the model's own pass
    net = build_model("UNet2D", **A.LOCALISER_KWARGS)
    card = {"task": A.LOCALISER_TASK, "architecture": {"name": "UNet2D", "kwargs": A.LOCALISER_KWARGS},
            "input_spec": {"spacing_mm": A.LOCALISER_GRID_MM}, "threshold": 0.5}
    with pytest.raises(MissingWeightsError):  # named but absent
        A.localiser_for({"input_spec": {"localiser": {"weights_sha256": "x"}}}, tmp_path)
    save_checkpoint(net.state_dict(), card, A.LOCALISER_TASK, tmp_path)
    loc = A.load_localiser(tmp_path)
    assert loc.grid_mm == A.LOCALISER_GRID_MM and not loc.model.training
    rec = A.localiser_record(loc.card)
    assert A.localiser_for({"input_spec": {"localiser": rec}}, tmp_path).card["weights_sha256"] == rec["weights_sha256"]
    with pytest.raises(MissingWeightsError):  # other weights than the card's figures were measured with
        A.localiser_for({"input_spec": {"localiser": {**rec, "weights_sha256": "0" * 64}}}, tmp_path)
    # a fold's localiser must have been trained on that fold's training volumes
    A.check_fold_localiser({"data": {"train_cases": ["a", "b"]}}, {"fold": 2, "train_cases": ["a", "b"]}, tmp_path)
    with pytest.raises(Exception, match="fold 2"):
        A.check_fold_localiser({"data": {"train_cases": ["a", "c"]}}, {"fold": 2, "train_cases": ["a", "b"]}, tmp_path)


def test_fused_flips_add_one_flipped_pass_of_every_view_over_the_box():
    vol = np.full((100, 100, 100), -3.0, np.float32)
    vol[30:50, 30:50, 30:50] = 3.0
    one, two = _Counting(), _Counting()
    p1 = A.segment_canonical(one, vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16)
    p2 = A.segment_canonical(two, vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16, fused_flips=2)
    n_box = [b.stop - b.start for b in p1.box]
    # the flipped passes read every slice of the box along each view (the first view's too)
    assert sum(two.seen) - sum(one.seen) == n_box[2] + n_box[0] + n_box[1]
    # a model that does not care about left and right gives the same mask flipped and flipped back
    assert np.array_equal(p1.mask, p2.mask) and p2.mask.sum() == 20 ** 3
    with pytest.raises(ValueError):
        A.segment_canonical(one, vol, (1.25,) * 3, (2, 0, 1), 1.25, fused_flips=4)


def test_localise_boxes_the_bright_blob_with_its_margin():
    vol = np.full((64, 64, 64), -3.0, np.float32)
    vol[20:30, 30:40, 10:21] = 3.0  # "atrium": sigmoid(30) = 1 there, sigmoid(-30) = 0 elsewhere
    box = A.localise(_CentreSlice(), vol, (2.0, 2.0, 2.0), 2, 2.0, batch_size=8)
    # found on slices 10, 12, ..., 20 (every other one), widened by ROI_MARGIN_MM / 2 mm = 20 voxels
    m = int(A.ROI_MARGIN_MM / 2.0)
    assert box[0] == slice(20 - m, 30 + m) and box[1] == slice(30 - m, 40 + m)
    # along the strided axis, on the 4 mm grid of the slices segmented: sub-slices 5-10, 10 of margin
    assert box[2] == slice(0, 2 * (10 + 10 + 1))
    assert A.localise(_CentreSlice(), np.full((32, 32, 32), -3.0, np.float32), (2.0,) * 3, 2, 2.0) is None


def test_pick_setting_prefers_the_best_then_fewer_flips_and_threshold_near_half():
    assert A.pick_setting({(1, 0.5): 0.80, (2, 0.5): 0.85, (4, 0.4): 0.84}) == (2, 0.5)
    # within the tie margin: fewer flips win even with a slightly lower score
    assert A.pick_setting({(1, 0.4): 0.849, (4, 0.5): 0.850}) == (1, 0.4)
    assert A.pick_setting({(2, 0.3): 0.85, (2, 0.45): 0.8495, (2, 0.5): 0.84}) == (2, 0.45)


def test_grid_voxels_and_the_four_flip_cap():
    # 256 x 256 x 130 at 1.25 mm in-plane, sliced axially on a 1.25 mm grid: 256 * 256 * 130 pixels
    assert A.grid_voxels((256, 256, 130), (1.25, 1.25, 1.37), 2, 1.25) == 256 * 256 * 130
    # the same volume on a 2.5 mm grid: a quarter of the in-plane pixels; along axis 0: 130 * 1.37 / 2.5 ~ 71
    assert A.grid_voxels((256, 256, 130), (1.25, 1.25, 1.37), 2, 2.5) == 128 * 128 * 130
    assert A.grid_voxels((256, 256, 130), (1.25, 1.25, 1.37), 0, 2.5) == 128 * 71 * 256
    big, lge = ((256, 256, 130), (1.25, 1.25, 1.37)), ((100, 72, 88), (1.25, 1.25, 0.625))
    assert A.capped_flips(4, *big, 2, 1.25) == 2  # 8.5 M pixels: over the cap, two flips
    assert A.capped_flips(4, *lge, 2, 1.25) == 4  # a cropped LGE slab keeps four
    assert A.capped_flips(2, *big, 2, 1.25) == 2 and A.capped_flips(1, *big, 2, 1.25) == 1


def test_flipped_passes_differ_from_the_plain_one_only_around_its_finding():
    import torch

    class Spot(torch.nn.Module):  # finds the bright spot; elsewhere a position-dependent (not flip-free) output
        def forward(self, x):
            c = x[:, 1:2]
            ramp = torch.linspace(-1, 1, c.shape[-1])
            return torch.where(c > 2, torch.tensor(5.0), -3.0 + c * ramp)

    norm = np.random.default_rng(0).normal(0, 0.5, (64, 64, 120)).astype(np.float32).clip(-1.5, 1.5)
    norm[28:36, 28:36, 90:96] = 3.0
    passes = A.flip_pass_probs(Spot(), norm, (1.0, 1.0, 1.0), 1.0, n=2)
    assert len(passes) == 2 and passes[0].shape == norm.shape
    far = np.zeros(norm.shape, bool)
    far[:, :, :40] = True  # more than ROI_MARGIN_MM (40 mm) through-plane from the spot
    assert np.array_equal(passes[1][far], passes[0][far])  # outside the box: the plain pass
    near = np.zeros(norm.shape, bool)
    near[20:44, 20:44, 84:100] = True
    assert not np.allclose(passes[1][near], passes[0][near])  # inside it: the flipped pass
    assert (passes[1][28:36, 28:36, 90:96] > 0.9).all()


def test_fused_mask_is_the_largest_piece_of_the_whole_probability_map():
    from core import preprocess as pp

    # 125 mm in every direction (fused views); two blobs, the smaller within the box around the larger:
    # labelling only the box must give the whole map's answer
    vol = np.full((100, 100, 100), -3.0, np.float32)
    vol[30:50, 30:50, 30:50] = 3.0
    vol[54:58, 54:58, 54:58] = 3.0
    pred = A.segment_canonical(_CentreSlice(), vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16)
    assert pred.views == (2, 0, 1)
    whole = pp.largest_component(pred.prob.astype(np.float32) >= 0.5)
    assert pred.mask.sum() == 20 ** 3 and np.array_equal(pred.mask, whole)
    # what the quality measures rely on when they count over the box alone: nothing outside it
    assert pred.box is not None
    outside = np.ones(vol.shape, bool)
    outside[pred.box] = False
    assert not pred.prob[outside].any() and not any(m[outside].any() for m in pred.view_masks)
    assert not pred.mask[outside].any()


# --------------------------------------------------------------------------- acquisition stress


def test_acquisition_shifts_keep_the_grid_and_change_values_as_named():
    d = np.arange(2 * 3 * 5, dtype=np.float32).reshape(2, 3, 5) + 2.0
    rng = lambda: np.random.default_rng([0, 0])  # noqa: E731
    for name, f in A.ACQUISITION_SHIFTS.items():
        out = f(d, rng())
        assert out.shape == d.shape and out.dtype == np.float32, name
    inv = A.ACQUISITION_SHIFTS["inverted contrast"](d, rng())
    assert inv.flat[0] == d.max() - d.min() and inv.flat[-1] == 0.0  # brightest voxel -> 0, darkest -> the range
    g = A.ACQUISITION_SHIFTS["gamma 2.5 (dark tissue darker)"](np.array([[[2.0, 4.0, 6.0]]], np.float32), rng())
    np.testing.assert_allclose(g.ravel(), [0.0, 0.5**2.5, 1.0], rtol=1e-6)
    g = A.ACQUISITION_SHIFTS["gamma 0.4 (dark tissue brighter)"](np.array([[[2.0, 4.0, 6.0]]], np.float32), rng())
    np.testing.assert_allclose(g.ravel(), [0.0, 0.5**0.4, 1.0], rtol=1e-6)
    ones = np.ones((3, 3, 3), np.float32)
    b = A.ACQUISITION_SHIFTS["strong smooth bias field (up to 45x across the volume)"](ones, rng())
    assert b[1, 1, 1] == pytest.approx(1.0)  # no change at the centre
    assert b[-1, -1, 0] / b[0, 0, -1] == pytest.approx(np.exp(3.8), rel=1e-5)  # opposite corners
    big = np.random.default_rng(1).normal(5.0, 2.0, (40, 40, 40)).astype(np.float32)
    n1 = A.ACQUISITION_SHIFTS["noise, 1x the volume's SD"]
    assert np.array_equal(n1(big, rng()), n1(big, rng()))  # seeded: a rerun gives the same volume
    assert float((n1(big, rng()) - big).std()) == pytest.approx(float(big.std()), rel=0.02)


def test_stress_summary_counts_reported_masks_with_low_dice():
    cases = [mio.AtriumCase("a", None, None, "Task02_Heart"), mio.AtriumCase("b", None, None, "LA2018"),
             mio.AtriumCase("c", None, None, "LA2018")]
    per_case = {"x": {"a": {"dice": 0.9, "reported": True}, "b": {"dice": 0.4, "reported": True},
                      "c": {"dice": 0.1, "reported": False}}}
    s = A.stress_summary(per_case, cases)["x"]
    assert (s["n"], s["reported"], s["reported_with_dice_under_0.5"]) == (3, 2, 1)
    assert s["dice_mean"] == pytest.approx(0.4667, abs=1e-4)
    assert s["per_dataset"]["LA2018"] == {"n": 2, "dice_mean": pytest.approx(0.25), "reported": 1,
                                          "reported_with_dice_under_0.5": 1, "reported_dice_min": 0.4}
    assert s["per_dataset"]["Task02_Heart"]["reported_dice_min"] == 0.9


def test_acquisition_stress_reports_no_poor_mask_on_a_real_volume(lge_root):
    """A real LGE volume, inverted and blurred: whatever the model makes of it, a volume is reported only
    when the mask still overlaps the truth (Dice >= 0.5)."""
    lm = load_model("atrium")
    c = _lge_case(lge_root)
    shifts = {k: A.ACQUISITION_SHIFTS[k] for k in ("inverted contrast", "blurred (Gaussian, 2 voxels)")}
    res = A.acquisition_stress(lambda v: segment_atrium(lm, v), [c], shifts)
    for name in shifts:
        r = res["per_case"][name][c.case_id]
        assert 0.0 <= r["dice"] <= 1.0
        assert not (r["reported"] and r["dice"] < 0.5), (name, r)
    assert res["summary"]["inverted contrast"]["n"] == 1


def _cv_entry(fold: int, sha: str, dice: float) -> dict:
    return {"fold": fold, "train_cases": [f"t{fold}"], "val_cases": [f"v{fold}"], "git_commit": "abc", "seconds": 10.0,
            "best_epoch": 3, "tta_flips": 2, "threshold": 0.5, "weights_sha256": sha,
            "per_dataset": {"all": {"dice_mean": dice}, "LA2018": {"dice_mean": dice}}}


def test_merging_a_rerun_fold_keeps_what_the_replaced_run_said(tmp_path):
    """`python -m core.atrium merge`: a fold rerun in a scratch folder replaces its entry, and the entry
    carries the replaced run's figures; other folds, other recipes and other splits are refused or untouched."""
    import json

    from core.errors import MedImgError

    head = {"task": "atrium", "training": {"epochs": 48}, "scoring": "s", "smoke": False, "n_folds_planned": 2}
    (tmp_path / A.CV_FILE).write_text(json.dumps({**head, "folds": [_cv_entry(1, "a", 0.8), _cv_entry(2, "b", 0.9)]}))
    src = tmp_path / "scratch.json"
    src.write_text(json.dumps({**head, "folds": [_cv_entry(1, "a", 0.8), _cv_entry(2, "c", 0.85)]}))
    cv = A.merge_cv_folds(src, out_dir=tmp_path, machine_note="rerun on CPU x")
    assert [f["weights_sha256"] for f in cv["folds"]] == ["a", "c"]
    assert cv["folds"][1]["machine_note"] == "rerun on CPU x"
    assert "previous_run" not in cv["folds"][0]  # identical entries are not moved
    prev = cv["folds"][1]["previous_run"]
    assert prev["weights_sha256"] == "b" and prev["same_weights"] is False
    assert prev["dice_mean_per_dataset"] == {"all": 0.9, "LA2018": 0.9}
    assert json.loads((tmp_path / A.CV_FILE).read_text())["folds"] == cv["folds"]
    src.write_text(json.dumps({**head, "training": {"epochs": 60}, "folds": [_cv_entry(2, "d", 0.9)]}))
    with pytest.raises(MedImgError, match="training"):
        A.merge_cv_folds(src, out_dir=tmp_path)
    other = _cv_entry(2, "d", 0.9) | {"val_cases": ["t1"]}
    src.write_text(json.dumps({**head, "folds": [other]}))
    with pytest.raises(MedImgError, match="another split"):
        A.merge_cv_folds(src, out_dir=tmp_path)
    assert A.previous_run_summary(_cv_entry(2, "x", 0.9), _cv_entry(2, "x", 0.9))["same_weights"] is True


def test_a_kept_fold_model_must_be_the_one_the_cv_recorded(tmp_path):
    """Rescoring and the out-of-fold stress checks file figures under a fold: both refuse a model whose weights
    or split differ from that fold's entry in atrium.cv.json, and find the kept folders by number."""
    from core.errors import MedImgError

    for name in ("fold2", "fold10", "fold1", "foldx", "other"):
        (tmp_path / name).mkdir()
    assert {k: d.name for k, d in A.kept_fold_dirs(tmp_path).items()} == {1: "fold1", 2: "fold2", 10: "fold10"}
    rec = _cv_entry(2, "abc", 0.9)
    card = {"weights_sha256": "abc", "data": {"train_cases": rec["train_cases"], "val_cases": rec["val_cases"]}}
    A.check_fold_model(card, rec, tmp_path / "fold2")  # the recorded model: no error
    with pytest.raises(MedImgError, match="fold 2 .*sha256 differs"):
        A.check_fold_model({**card, "weights_sha256": "abd"}, rec, tmp_path / "fold2")
    with pytest.raises(MedImgError, match="another split than fold 2"):
        A.check_fold_model({**card, "data": {**card["data"], "val_cases": ["x"]}}, rec, tmp_path / "fold2")


def test_out_of_fold_stress_checks_the_folds_against_the_cv_file_it_is_given(tmp_path):
    """`core.evaluate --cv-folds DIR --weights W`: the fold models are checked against W's atrium.cv.json (e.g. a
    candidate recipe's CV in benchmarks/), before any volume is read."""
    import json

    from core.errors import MedImgError
    from core.evaluate import stress_out_of_fold

    folds = tmp_path / "folds"
    (folds / "fold1").mkdir(parents=True)
    with pytest.raises(MedImgError, match="no atrium cross-validation record"):
        stress_out_of_fold(folds, tmp_path, cv_dir=tmp_path / "nowhere")
    (tmp_path / A.CV_FILE).write_text(json.dumps({"folds": [_cv_entry(1, "a", 0.8), _cv_entry(2, "b", 0.9)]}))
    with pytest.raises(MedImgError, match=r"holds folds \[1\]; atrium.cv.json records folds \[1, 2\]"):
        stress_out_of_fold(folds, tmp_path, cv_dir=tmp_path)


def test_slice_agreement_from_the_box_equals_the_whole_slices():
    from scipy import ndimage

    rng = np.random.default_rng(2)
    g = ndimage.binary_dilation(rng.random((30, 28, 12)) > 0.995, iterations=2)
    p = np.roll(g, 2, axis=0)
    p[:, :, 0] = False
    p[:3, :3, 0] = True  # a stray patch at the corner of one slice
    sp = (1.25, 1.25, 2.0)
    dice, dis = A.slice_agreement(p, g, sp)
    np.testing.assert_array_equal(np.isnan(dice), np.isnan(M.per_slice_dice(p, g)))
    np.testing.assert_allclose(dice[~np.isnan(dice)], M.per_slice_dice(p, g)[~np.isnan(dice)])
    np.testing.assert_allclose(dis, A.disagreement_cm2(p, g, sp))
    assert dice.shape == dis.shape == (12,)
    d0, s0 = A.slice_agreement(np.zeros((5, 5, 3)), np.zeros((5, 5, 3)), sp)
    assert np.isnan(d0).all() and (s0 == 0).all()


def test_an_inverted_bssfp_volume_is_withheld_as_not_bright_blood(heart_root):
    """The out-of-fold acquisition check found fold 3's model reporting MSD la_022 with inverted contrast (Dice 0.02,
    128 mL) through every other limit; the brightness floor withholds it, and the volume as stored is reported."""
    from core.config import PROJECT_ROOT

    lm = load_model("atrium", PROJECT_ROOT / "benchmarks/cv-folds/atrium/fold3")
    assert "la_022" in lm.card["data"]["val_cases"]  # out of fold for this model
    (c,) = [c for c in mio.find_atrium_cases(heart_root) if c.case_id == "la_022"]
    vol = mio.load_nifti_path(c.image_path)
    d = np.asarray(vol.data, np.float32)
    stored = segment_atrium(lm, vol)
    inverted = segment_atrium(lm, mio.Volume(A.ACQUISITION_SHIFTS["inverted contrast"](d, None), vol.affine,
                                             vol.spacing, "inverted"))
    assert stored.reliable and stored.quality.measures["mask_brightness"] > 0.9
    assert not inverted.reliable and inverted.quality.measures["mask_brightness"] < 0.1
    assert any("darker than" in r for r in inverted.quality.reasons), inverted.quality.reasons


def test_the_all_volume_model_is_trained_with_the_cross_validated_recipe(tmp_path):
    """`train_all.py --tasks atrium` refuses a recipe other than the one in atrium.cv.json (its card would carry
    the figures of another recipe), before reading any data; the same recipe passes the check."""
    import json

    import torch

    from core.errors import MedImgError
    from core.train import task_config

    cv_cfg = task_config("atrium", epochs=64)
    head = {"task": "atrium", "training": A.recipe_record(cv_cfg), "scoring": "s", "smoke": False,
            "n_folds_planned": 2}
    (tmp_path / A.CV_FILE).write_text(json.dumps({**head, "folds": [_cv_entry(1, "a", 0.8), _cv_entry(2, "b", 0.9)]}))
    A.check_cv_recipe(cv_cfg, A.read_cv(tmp_path))  # the same recipe: no error
    with pytest.raises(MedImgError, match="epochs: 64 there, 48 now"):
        A.train_atrium(tmp_path / "no-data-here", task_config("atrium", epochs=48), torch.device("cpu"),
                       out_dir=tmp_path)
    # the CV's fold refiners were trained with a recipe (their seconds and losses are their own): a run that trains
    # the committed refiner must use the same recipe; one that keeps the refiner there is leaves it aside
    from dataclasses import asdict

    from core.refine3d import RefinerRecipe

    ref = {**asdict(RefinerRecipe()), "seconds": 300.0, "final_loss": 0.2, "n_boxes": 77}
    cv = {**A.read_cv(tmp_path), "training": {**head["training"], "refiner": ref}}
    A.check_cv_recipe(cv_cfg, cv, refiner=True)
    A.check_cv_recipe(cv_cfg, cv)
    with pytest.raises(MedImgError, match="refiner"):
        A.check_cv_recipe(cv_cfg, {**cv, "training": {**cv["training"], "refiner": {**ref, "epochs": 20}}},
                          refiner=True)


def test_views_in_words():
    assert "thinnest direction" in A.views_in_words((2,)) and "12 cm" in A.views_in_words((2,))
    assert A.views_in_words((2, 0, 1)) == "slices along axial, sagittal, coronal, fused"
    assert A.views_in_words((1,)) == "slices along coronal"
