"""Five-class cardiac diagnosis: features with known values, calibration metrics by hand, the committed
classifier's file, and one real patient end to end."""
from __future__ import annotations

import numpy as np
import pytest

from core import cardiac as C


def _heart(lv_r: int, wall: int, rv: int, z: int = 4) -> np.ndarray:
    yy, xx = np.mgrid[0:64, 0:64]
    r = np.hypot(yy - 32, xx - 32)
    m = np.zeros((64, 64, z), np.int16)
    sl = np.zeros((64, 64), np.int16)
    sl[r <= lv_r + wall] = 2
    sl[r <= lv_r] = 3
    sl[(yy > 20) & (yy < 44) & (xx < 32 - lv_r - wall - 1) & (xx >= 32 - lv_r - wall - 1 - rv)] = 1
    m[:] = sl[:, :, None]
    return m


def test_features_of_a_synthetic_heart():
    ed, es = _heart(12, 4, 6), _heart(8, 6, 4)
    f = C.mask_features(ed, es)
    assert set(f) == set(C.FEATURES)
    lv_ed, lv_es = (ed == 3).sum(), (es == 3).sum()
    assert f["lv_ef"] == pytest.approx(1 - lv_es / lv_ed)
    assert f["rv_lv_ed"] == pytest.approx((ed == 1).sum() / lv_ed)
    assert f["thick_es_ed"] > 1  # the wall thickens in systole
    assert 0 <= f["thick_cv_ed"] < 0.5  # a ring of even thickness varies little


def test_expected_calibration_error_by_hand():
    p = np.array([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    y = np.array([0, 1, 0, 0])
    # bin (0.8, 0.9]: confidence 0.9, accuracy 0.5; bin (0.5, 0.6]: confidence 0.6, accuracy 1.0
    assert C.expected_calibration_error(p, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)


def test_temperature_softens_overconfident_logits():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    z = np.stack([np.where(y == 0, 1.0, -1.0), np.zeros(400)], 1) * 8  # right 100 %, very confident
    flip = rng.random(400) < 0.2  # but wrong a fifth of the time
    z[flip] = -z[flip]
    assert C.fit_temperature(z, y) > 2


def test_second_stage_splits_only_the_dcm_minf_mass():
    p = np.array([[0.1, 0.5, 0.1, 0.2, 0.1], [0.6, 0.1, 0.1, 0.1, 0.1]])
    out = C.apply_pair(p, np.array([0.0, np.log(3.0)]))  # sigmoid: 1/2 and 3/4
    d, m = C.GROUPS.index("DCM"), C.GROUPS.index("MINF")
    assert out[0, d] == pytest.approx(0.35) and out[0, m] == pytest.approx(0.35)
    assert out[1, d] == pytest.approx(0.15) and out[1, m] == pytest.approx(0.05)
    assert np.allclose(out.sum(1), 1) and np.allclose(np.delete(out, [d, m], 1), np.delete(p, [d, m], 1))


def test_second_stage_learns_wall_thickness_variability():
    rng = np.random.default_rng(0)
    n = 40
    y = np.repeat([C.GROUPS.index("DCM"), C.GROUPS.index("MINF"), C.GROUPS.index("NOR")], n)
    x = rng.normal(0, 1, (3 * n, len(C.FEATURES)))
    cv = list(C.FEATURES).index("thick_cv_es")
    x[y == C.GROUPS.index("MINF"), cv] += 3  # infarcts: uneven walls
    pair = C.fit_pair(x, y)
    z = C.pair_logit(pair, x)
    assert (z[y == C.GROUPS.index("DCM")] > 0).mean() > 0.9 and (z[y == C.GROUPS.index("MINF")] < 0).mean() > 0.9
    assert pair["coef"][list(C.PAIR_FEATURES).index("thick_cv_es")] < 0
    with pytest.raises(ValueError, match="both DCM and MINF"):
        C.fit_pair(x[y != C.GROUPS.index("MINF")], y[y != C.GROUPS.index("MINF")])


def test_binary_temperature_by_hand():
    # logits +-4 that are right 3 times in 4: the best temperature maps 4 to logit(3/4) = ln 3
    z = np.array([4.0, 4.0, 4.0, 4.0, -4.0, -4.0, -4.0, -4.0])
    y = np.array([1, 1, 1, 0, 0, 0, 0, 1])
    from core.calibration import binary_temperature

    assert binary_temperature(y, C._sigmoid(z)) == pytest.approx(4 / np.log(3), rel=0.03)


def test_committed_classifier_is_tied_to_the_cardiac_weights():
    from core.checkpoint import read_card

    rep = C.load_diagnosis()
    assert rep is not None, "weights/cardiac_diagnosis.json is missing: python -m core.cardiac"
    assert rep["cardiac_weights_sha256"] == read_card("cardiac")["weights_sha256"]
    cv = rep["cross_validation"]
    assert cv["calibrated"]["n"] == 80 and len(cv["calibrated"]["confusion"]["matrix"]) == 5
    assert sum(map(sum, cv["calibrated"]["confusion"]["matrix"])) == 80
    # the calibration figure comes with what chance alone gives, and with other fold assignments
    assert 0 <= cv["ece_if_perfectly_calibrated"]["p_value"] <= 1 and cv["ece_if_perfectly_calibrated"]["n_sim"] >= 100
    assert len(cv["repeated"]["runs"]) == C.CV_REPEATS


def test_one_validation_patient_end_to_end(acdc_root):
    from core import io as mio
    from core.cardiac import predict_cardiac
    from core.inference import load_model

    lm = load_model("cardiac")
    pid = lm.card["data"]["val_cases"][0]
    c = next(c for c in mio.find_cardiac_cases(acdc_root) if c.patient_id == pid)
    r = predict_cardiac(lm, mio.load_nifti_path(c.ed_path), mio.load_nifti_path(c.es_path), explain=False)
    p = r.diagnosis["probabilities"]
    assert set(p) == set(C.GROUPS) and sum(p.values()) == pytest.approx(1)
    assert p == pytest.approx(lm.diagnosis["validation_end_to_end"]["per_patient"][pid]["probabilities"], abs=0.02)


# --------------------------------------------------------------------------- volumes in mL, LV mass in g


def test_volumes_by_hand():
    ed, es = _heart(12, 4, 6), _heart(8, 6, 4)
    vox = C.structure_voxels(ed, es)
    assert vox["lv_ed"] == (ed == 3).sum() and vox["myo_es"] == (es == 2).sum() and vox["rv_ed"] == (ed == 1).sum()
    # a 200 x 150 frame: the centred crop is 0.6 x 150 = 90 pixels, resized to the 64-pixel grid of these maps
    side = 90
    assert C.pp.cardiac_crop_side((200, 150)) == side
    sx, sy, sz = 1.5, 1.25, 8.0
    ml = (side * sx / 64) * (side * sy / 64) * sz / 1000
    v = C.volumes_ml(vox, (200, 150), (sx, sy, sz), 64)
    assert set(v) == set(C.VOLUMES)
    assert v["lv_edv"] == pytest.approx(vox["lv_ed"] * ml)
    assert v["lv_sv"] == pytest.approx((vox["lv_ed"] - vox["lv_es"]) * ml)
    assert v["lv_mass"] == pytest.approx(vox["myo_ed"] * ml * 1.05)
    assert v["rv_esv"] == pytest.approx(vox["rv_es"] * ml)
    assert C.volume_text("lv_mass", 101.6) == "102 g" and C.volume_text("lv_edv", 149.4) == "149 mL"


def test_no_ejection_fraction_or_stroke_volume_of_zero_or_less_is_shown_as_a_number():
    """A poorly segmented RV can be larger at ES than at ED while the LV is right (patient020 from the model's own
    segmentation: RV EF -2.6 %, RV stroke volume -3 mL): never shown as a negative figure."""
    assert C.feature_text("lv_ef", 0.554) == "55%" and C.feature_text("rv_lv_ed", 0.9) == "0.90"
    for key, v in (("rv_ef", -0.026), ("lv_ef", 0.0)):
        assert C.feature_text(key, v) == C.NOT_SMALLER_AT_ES
    assert C.volume_text("rv_sv", -3.1) == C.NOT_SMALLER_AT_ES and C.volume_text("rv_sv", 3.8) == "4 mL"
    assert C.volume_text("rv_esv", 0.0) == "0 mL"  # only a difference (stroke volume) can be negative


@pytest.mark.parametrize("spacing,trusted", [((1.37, 1.37, 10.0), True), ((0.7, 0.7, 6.0), True),
                                             ((1.0, 1.0, 1.0), False),  # the shared ACDC copy's placeholder
                                             ((1.4, 1.4, 2.0), False), ((5.0, 5.0, 10.0), False),
                                             ((1.4, 1.4, float("nan")), False), ((1.4, 1.4, 0.0), False)])
def test_only_a_cine_stacks_voxel_size_is_trusted(spacing, trusted):
    why = C.cine_voxel_size_problem(spacing)
    assert (why is None) == trusted
    if not trusted:
        assert "voxel size" in why


def test_volumes_of_a_real_patient_follow_the_header_and_the_expert_masks(acdc_root):
    """With a cine stack's voxel size the page's volumes are given and close to the expert masks' (same voxel size);
    with the shared copy's 1 mm placeholders, or ED and ES of different voxel sizes, they are withheld."""
    from dataclasses import replace

    from core import io as mio
    from core.cardiac import predict_cardiac
    from core.inference import load_model

    lm = load_model("cardiac")
    pid = lm.card["data"]["val_cases"][0]  # a patient the segmentation did not train on
    c = next(c for c in mio.find_cardiac_cases(acdc_root) if c.patient_id == pid)
    ed, es = mio.load_nifti_path(c.ed_path), mio.load_nifti_path(c.es_path)
    r = predict_cardiac(lm, ed, es, explain=False)
    assert r.volumes is None and "mm apart" in r.volumes_withheld
    sp = (1.5, 1.5, 10.0)
    r = predict_cardiac(lm, replace(ed, spacing=sp), replace(es, spacing=sp), explain=False)
    assert r.volumes_withheld is None
    # exactly the model's voxels on its grid, each (crop side / grid size)^2 pixels of the header's size
    assert r.volumes == pytest.approx(C.volumes_ml(r.diagnosis["voxels"], ed.data.shape[:2], sp, lm.input_size))
    expert = C.structure_voxels(mio.load_nifti_path(c.ed_gt).data, mio.load_nifti_path(c.es_gt).data)
    ml = sp[0] * sp[1] * sp[2] / 1000
    # this DCM patient's LV is the committed model's worst LV end-diastolic volume of its 17 validation patients
    # (-17 %; mean absolute difference 4 %, weights/cardiac.validation-eval.json)
    assert r.volumes["lv_edv"] == pytest.approx(expert["lv_ed"] * ml, rel=0.2)
    assert r.volumes["lv_mass"] == pytest.approx(expert["myo_ed"] * ml * 1.05, rel=0.25)
    assert r.volumes["lv_edv"] > r.volumes["lv_esv"] > 0 and r.volumes["lv_sv"] > 0
    r = predict_cardiac(lm, replace(ed, spacing=sp), replace(es, spacing=(1.5, 1.5, 8.0)), explain=False)
    assert r.volumes is None and "different voxel sizes" in r.volumes_withheld


# --------------------------------------------------------------------------- 4D cine: reader and ED/ES choice


def test_pick_ed_es_takes_the_largest_and_smallest_lv_cavity():
    assert C.pick_ed_es(np.array([900, 1000, 700, 400, 450, 800])) == (1, 3)
    assert C.pick_ed_es(np.array([5, 5, 1, 1])) == (0, 2)  # the first of equal frames
    with pytest.raises(ValueError):
        C.pick_ed_es(np.array([3]))


def _nifti_bytes(arr: np.ndarray) -> bytes:
    import nibabel as nib

    return nib.Nifti1Image(arr, np.diag([1.5, 1.5, 8.0, 1.0])).to_bytes()


def test_read_cine_keeps_frames_and_refuses_single_frames():
    from core.errors import InvalidInputError
    from core.io import read_cine, read_nifti

    arr = np.random.default_rng(0).random((32, 40, 6, 5)).astype(np.float32)
    cine = read_cine(_nifti_bytes(arr), "c.nii")
    assert cine.n_frames == 5 and cine.spacing == (1.5, 1.5, 8.0)
    assert np.array_equal(cine.frame(3).data, arr[..., 3])
    with pytest.raises(InvalidInputError, match="single 3D frame"):
        read_cine(_nifti_bytes(arr[..., 0]), "f.nii")
    with pytest.raises(InvalidInputError, match="4D"):
        read_nifti(_nifti_bytes(arr), "c.nii")  # the frame readers still take one frame only
    with pytest.raises(InvalidInputError, match="time frames"):
        read_cine(_nifti_bytes(np.random.default_rng(0).random((32, 40, 6, 101)).astype(np.float32)), "long.nii")


def test_cine_built_from_a_real_patient_finds_ed_and_es(acdc_root):
    import nibabel as nib

    from core import io as mio
    from core.cardiac import cardiac_cycle, predict_cardiac
    from core.inference import load_model

    lm = load_model("cardiac")
    case = next(c for c in mio.find_cardiac_cases(acdc_root) if c.patient_id == "patient001")
    ed, es = mio.load_nifti_path(case.ed_path), mio.load_nifti_path(case.es_path)
    # a cycle that starts in systole: ES, ED, ES again (the first of equal frames is taken)
    cine = mio.read_cine(_nifti_bytes(np.stack([es.data, ed.data, es.data], axis=3)), "built.nii")
    cyc = cardiac_cycle(lm, cine)
    assert (cyc.ed, cyc.es) == (1, 0), (cyc.lv, cyc.rv)
    assert cyc.lv[0] == cyc.lv[2] < cyc.lv[1] and cyc.rv[0] < cyc.rv[1]
    a = predict_cardiac(lm, cine.frame(cyc.ed), cine.frame(cyc.es), explain=False)
    b = predict_cardiac(lm, ed, es, explain=False)
    assert a.probability == pytest.approx(b.probability, abs=1e-4)
    # the cine's 1.5 x 1.5 x 8 mm voxels are a cine stack's: its curve can be drawn in mL, in the volumes' unit
    assert cyc.voxel_ml == pytest.approx(C.grid_voxel_ml(ed.data.shape[:2], (1.5, 1.5, 8.0), lm.input_size))
    assert cyc.lv[cyc.ed] * cyc.voxel_ml == pytest.approx(a.volumes["lv_edv"], rel=0.03)
    assert b.volumes is None  # the shared copy's own frames: 1 mm placeholders
    flat = mio.read_cine(nib.Nifti1Image(np.stack([es.data, ed.data], axis=3), np.eye(4)).to_bytes(), "flat.nii")
    assert cardiac_cycle(lm, flat).voxel_ml is None


def test_cross_fitted_calibration_picks_platt_for_a_shifted_model():
    from core.calibration import cross_fitted

    rng = np.random.default_rng(1)
    z = rng.normal(0, 2, 4000)
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-(z + 2.0)))).astype(float)  # the model is 2 logits too low
    r = cross_fitted(y, 1 / (1 + np.exp(-z)), np.arange(len(z)) % 5)
    assert r["method"] == "platt" and r["intercept"] == pytest.approx(2.0, abs=0.2)
    assert r["ece_after_cross_fitted"] < 0.03 < r["ece_before"]
    assert len(r["cross_fitted"]) == len(z)


def test_ece_if_calibrated_by_hand():
    from core.calibration import binary_ece, ece_if_calibrated

    # certain probabilities: every draw agrees with them, so a calibrated classifier shows ECE 0
    one_hot = np.eye(5)[[0, 1, 2, 3, 4, 0]]
    r = ece_if_calibrated(one_hot, C._top_label_ece, observed=0.0, n_sim=50)
    assert r["median"] == 0 and r["q95"] == 0 and r["p_value"] == 1.0
    # one case at P = 0.5: its outcome is 0 or 1, |outcome - 0.5| = 0.5 on every draw
    r = ece_if_calibrated(np.array([0.5]), binary_ece, observed=0.6, n_sim=50)
    assert r["median"] == 0.5 and r["p_value"] == 0.0
    # two cases at P = 0.5 share a bin: ECE 0.5 when both outcomes agree (half the draws), 0 otherwise
    r = ece_if_calibrated(np.array([0.5, 0.5]), binary_ece, observed=0.5, n_sim=4000, seed=3)
    assert r["p_value"] == pytest.approx(0.5, abs=0.03)
    # many calibrated cases: the ECE a calibrated classifier shows shrinks with their number
    p = np.random.default_rng(0).random(2000)
    assert ece_if_calibrated(p, binary_ece, 0.0, n_sim=40)["median"] < ece_if_calibrated(p[:80], binary_ece, 0.0, n_sim=40)["median"]


def test_multiclass_draws_follow_the_probabilities():
    from core.calibration import ece_if_calibrated

    seen = []
    ece_if_calibrated(np.tile([[0.2, 0.0, 0.8]], (500, 1)), lambda y, p: seen.append(y) or 0.0, 0.0, n_sim=4)
    y = np.concatenate(seen)
    assert set(np.unique(y)) == {0, 2} and (y == 2).mean() == pytest.approx(0.8, abs=0.03)


def test_feature_reproducibility_by_hand():
    rng = np.random.default_rng(0)
    expert = rng.random((6, len(C.FEATURES)))
    model = expert.copy()
    model[:, 0] = 2 * expert[:, 0] + 1  # same ordering, other scale: r = 1
    model[:, 1] = -expert[:, 1]  # reversed: r = -1
    model[:, 2] = 0.3  # constant on the model's masks: no agreement
    r = C.feature_reproducibility(model, expert)
    names = list(C.FEATURES)
    assert r[names[0]] == pytest.approx(1.0) and r[names[1]] == pytest.approx(-1.0) and r[names[2]] == 0.0
    assert r[names[3]] == pytest.approx(1.0)


def test_classifier_uses_only_its_columns():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, len(C.FEATURES)))
    y = np.repeat(np.arange(5), 12)
    x[:, 0] += y  # only lv_ef carries the class
    clf = C.fit_classifier(x, y, columns=["lv_ef", "rv_ef"])
    assert clf["columns"] == ["lv_ef", "rv_ef"] and np.asarray(clf["coef"]).shape == (5, 2)
    x2 = x.copy()
    x2[:, 2:] = 1e6  # columns it does not use change nothing
    assert np.allclose(C.logits(clf, x), C.logits(clf, x2))
