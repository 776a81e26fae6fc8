"""The square of each cine frame the cardiac model reads: centred on the heart, not on the image (known values,
a stand-in U-Net, and the ACDC patient whose RV a centred square cut in half)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core import cardiac as C
from core import preprocess as pp


def test_crop_box_by_hand():
    # a 200 x 150 frame: side 0.6 x 150 = 90 pixels
    assert pp.cardiac_crop_box((200, 150)) == (55, 145, 30, 120)
    assert pp.cardiac_crop_box((200, 150), (100, 75)) == (55, 145, 30, 120)
    # moved as little as needed to stay inside the image
    assert pp.cardiac_crop_box((200, 150), (10, 140)) == (0, 90, 60, 150)
    assert pp.cardiac_crop_box((200, 150), (190.0, 20.0)) == (110, 200, 0, 90)
    assert pp.cardiac_crop_box((200, 150), (70.4, 80.6)) == (25, 115, 36, 126)
    with pytest.raises(ValueError):
        pp.cardiac_crop_box((200, 150), (float("nan"), 3.0))


def test_heart_centre_is_the_box_of_the_largest_region():
    lab = np.zeros((64, 48, 3), np.int16)
    lab[10:20, 30:40, 0] = 3
    lab[12:22, 28:36, 2] = 1  # another slice: the union spans x 10-21, y 28-39
    lab[60, 2, 1] = 2  # a stray voxel far away must not move the centre
    assert pp.heart_centre(lab) == (16.0, 34.0)
    assert pp.heart_centre(np.zeros((8, 8, 2))) is None


def test_grid_to_frame_and_edge_by_hand():
    assert pp.grid_to_frame((25, 0), (10, 110, 20, 120), 50) == (60.0, 20.0)
    assert pp.grid_to_frame((50, 50), (10, 110, 20, 120), 50) == (110.0, 120.0)
    lab = np.zeros((16, 16, 2), np.int16)
    lab[4:8, 5:9, 1] = 1
    assert not pp.labels_touch_edge(lab)
    lab[4:8, 15, 0] = 3
    assert pp.labels_touch_edge(lab)


def test_cardiac_frame_reads_the_given_box():
    vol = np.zeros((200, 150, 4), np.float32)
    vol[0:90, 60:150] = 1.0  # bright exactly in the box (0, 90, 60, 150)
    t = pp.cardiac_frame(vol, size=32, all_slices=True, box=(0, 90, 60, 150))
    assert torch.all(t > 0)  # every grid pixel inside the bright square
    assert torch.all(pp.cardiac_frame(vol, size=32, all_slices=True)[:, :, :5] < 0)  # centred: x 55-145, part dark


class _BrightIsHeart(torch.nn.Module):
    """A stand-in for CardiacNet: its "U-Net" calls every bright pixel LV cavity."""

    def __init__(self) -> None:
        super().__init__()
        self.unet = lambda x: torch.cat([-x, torch.zeros_like(x), torch.zeros_like(x), x], dim=1)


def test_heart_box_moves_the_square_onto_a_heart_off_the_image_centre():
    vol = np.zeros((200, 150, 5), np.float32)
    vol[40:70, 90:125] = 1.0  # the "heart": reaches beyond the centred square (55-145, 30-120) on two sides
    centred = pp.cardiac_crop_box(vol.shape[:2])
    assert not (centred[0] <= 40 and centred[3] >= 125)
    box, labels = C.heart_box(_BrightIsHeart(), vol, size=64)
    x0, x1, y0, y1 = box
    assert x0 <= 40 and x1 >= 70 and y0 <= 90 and y1 >= 125  # the whole heart is read
    assert (x1 - x0, y1 - y0) == (90, 90)  # same side: the model's scale does not change
    if labels is not None:  # the last pass did not move the square: its labels are the frame's in that box
        assert labels.shape == (64, 64, 5) and not pp.labels_touch_edge(labels)


def test_heart_box_keeps_the_centred_square_when_nothing_is_found():
    vol = np.zeros((120, 120, 4), np.float32)
    vol[0, 0, 0] = 1.0  # nothing bright inside the centred square
    box, labels = C.heart_box(_BrightIsHeart(), vol, size=32)
    assert box == pp.cardiac_crop_box(vol.shape[:2]) and labels is not None and not labels.any()


def test_expert_box_centres_the_expert_heart():
    mask = np.zeros((200, 150, 3), np.int16)
    mask[40:70, 90:125, 1] = 1
    assert C.expert_box(mask) == pp.cardiac_crop_box((200, 150), (55.0, 107.5))


def test_the_app_reads_the_whole_heart_of_an_off_centre_patient(acdc_root):
    """patient046's heart lies off the image centre: the centred square held half of its RV at ED; the square the
    app finds with the committed model holds all of every structure in both frames, and the RV volume follows."""
    from core import io as mio
    from core.inference import load_model

    c = next(c for c in mio.find_cardiac_cases(acdc_root) if c.patient_id == "patient046")
    ed, es = mio.load_nifti_path(c.ed_path), mio.load_nifti_path(c.es_path)
    gts = [mio.load_nifti_path(p).data for p in (c.ed_gt, c.es_gt)]

    def share(box, label):
        x0, x1, y0, y1 = box
        return min((g[x0:x1, y0:y1] == label).sum() / (g == label).sum() for g in gts)

    assert share(pp.cardiac_crop_box(ed.data.shape[:2]), 1) < 0.6
    lm = load_model("cardiac")
    r = C.predict_cardiac(lm, ed, es, explain=False)
    assert r.crop_box is not None and all(share(r.crop_box, k) > 0.99 for k in (1, 2, 3))
    assert not r.at_crop_edge
    expert_rv = C.structure_voxels(*gts)["rv_ed"]
    # on the model's grid: each grid voxel is (side / size)^2 of the frame's pixels
    side = pp.cardiac_crop_side(ed.data.shape[:2])
    model_rv = r.diagnosis["voxels"]["rv_ed"] * (side / lm.input_size) ** 2
    assert model_rv == pytest.approx(expert_rv, rel=0.25)


def _result(p: float, top: str, p_top: float):
    from types import SimpleNamespace

    probs = {g: (p_top if g == top else (1 - p_top) / 4) for g in C.GROUPS}
    return SimpleNamespace(probability=p, threshold=0.5, diagnosis={"probabilities": probs})


@pytest.mark.parametrize("p,top,p_top,band,disagree", [
    (0.05, "RV", 0.99, "uncertain", True),  # "normal" above a confident abnormal RV
    (0.95, "NOR", 0.90, "uncertain", True),  # "diseased" above a confident normal
    (0.05, "RV", 0.50, "negative", False),  # the five classes are not sure: the decision stands
    (0.95, "DCM", 0.90, "positive", False),  # agree
    (0.05, "NOR", 0.90, "negative", False),
    (0.55, "NOR", 0.90, "uncertain", False),  # near the threshold anyway
])
def test_cardiac_finding_is_uncertain_when_the_two_models_disagree(p, top, p_top, band, disagree):
    got, why = C.cardiac_band(_result(p, top, p_top), {"uncertain_below": 0.6})
    assert got == band and (why == C.MODELS_DISAGREE) == disagree
    assert C.cardiac_band(_result(p, top, p_top), None)[1] is None  # no five-class model: the decision alone
