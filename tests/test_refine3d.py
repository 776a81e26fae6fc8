"""The 3D refiner (core.refine3d) and how the atrium path runs, loads and checks it."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from core import atrium as A
from core import preprocess as pp
from core.errors import MedImgError
from core.refine3d import (REFINE_MARGIN_MM, Refiner, RefineBox, RefinerNet, RefinerRecipe, coarse_size, fit_refiner,
                           logit_at, refined_logits)


def test_coarse_size_known_values():
    # an MSD box: 63 x 89 x 93 voxels of 1.25 x 1.25 x 1.37 mm -> 2.5 mm voxels, up to a multiple of 4
    assert coarse_size((63, 89, 93), (1.25, 1.25, 1.37), 2.5) == [32, 48, 52]
    assert coarse_size((4, 4, 4), (1.0, 1.0, 1.0), 2.5) == [8, 8, 8]  # never under two multiples


def test_logit_at_is_zero_at_the_threshold_and_keeps_the_order():
    z = logit_at(torch.tensor([0.2, 0.35, 0.9]), 0.35)
    assert abs(float(z[1])) < 1e-6 and float(z[0]) < 0 < float(z[2])
    assert float(logit_at(torch.tensor([0.9]), 0.5)) == pytest.approx(math.log(9), rel=1e-5)


def test_box_around_known_values_and_empty():
    m = np.zeros((50, 50, 50), bool)
    m[20:30, 10:12, 40:41] = True
    assert pp.box_around(m, (2.0, 4.0, 1.0), 4.0) == (slice(18, 32), slice(9, 13), slice(36, 45))  # clipped at 50 not hit
    assert pp.box_around(m, (1.0, 1.0, 1.0), 16.0)[2] == slice(24, 50)  # clipped to the array
    assert pp.box_around(np.zeros((5, 5, 5), bool), (1.0, 1.0, 1.0), 16.0) is None


def test_an_untrained_refiner_returns_the_2d_mask_and_probabilities():
    net = RefinerNet(4)
    img = torch.randn(20, 24, 16)
    prob = torch.rand(20, 24, 16)
    with torch.inference_mode():
        z = refined_logits(net, img, prob, (1.25, 1.25, 2.0), 0.4, bf16=False)
    assert torch.allclose(z, logit_at(prob, 0.4), atol=1e-5)  # the last layer starts at zero
    norm = np.random.default_rng(0).normal(size=(40, 50, 30)).astype(np.float32)
    p = np.zeros((40, 50, 30), np.float16)
    p[10:20, 10:30, 5:15] = 0.9
    p[35:38, 45:48, 25:28] = 0.8  # a second piece beyond the box: left as it was
    mask = pp.largest_component(p >= 0.45).astype(np.uint8)
    p2, m2, box = Refiner(net, margin_mm=4.0).refine(norm, p, mask, (1.25, 1.25, 2.0), 0.45)
    assert box == pp.box_around(mask.astype(bool), (1.25, 1.25, 2.0), 4.0)
    assert np.array_equal(m2, mask) and p2.dtype == p.dtype and np.abs(p2.astype(float) - p.astype(float)).max() < 1e-3
    assert p2[36, 46, 26] == p[36, 46, 26]
    empty = np.zeros_like(mask)
    q, m3, b3 = Refiner(net).refine(norm, p, empty, (1.25, 1.25, 2.0), 0.45)
    assert b3 is None and q is p and m3 is empty


def test_arguments_are_checked():
    with pytest.raises(ValueError):
        RefinerNet(0)
    with pytest.raises(ValueError):
        RefinerNet(4)(torch.zeros(1, 2, 10, 8, 8))  # a side that is not a multiple of 4
    with pytest.raises(ValueError):
        Refiner(RefinerNet(4), grid_mm=20.0)
    with pytest.raises(ValueError):
        RefinerRecipe(epochs=0)
    with pytest.raises(ValueError):
        RefineBox("a", "d", np.zeros((4, 4, 4)), np.zeros((4, 4, 3)), np.zeros((4, 4, 4)), (1.0, 1.0, 1.0), 0.5)
    with pytest.raises(ValueError):
        RefineBox("a", "d", *(np.zeros((4, 4, 4)),) * 3, (1.0, 1.0, 1.0), 1.0)
    with pytest.raises(ValueError):
        fit_refiner([])


def _box(seed: int) -> RefineBox:
    rng = np.random.default_rng(seed)
    lab = np.zeros((24, 24, 20), np.float32)
    lab[6:18, 6:18, 5:15] = 1
    prob = np.clip(lab * 0.8 + rng.uniform(0, 0.2, lab.shape), 0, 1).astype(np.float32)
    prob[6:9] = 0.1  # the 2D model missed one end
    return RefineBox(f"c{seed}", "Task02_Heart" if seed % 2 else "LA2018", (lab * 2 - 1).astype(np.float32), prob, lab,
                     (1.25, 1.25, 1.5), 0.5, group=seed % 2)


def test_fit_refiner_is_reproducible_and_learns_on_a_toy_problem():
    boxes = [_box(s) for s in range(4)]
    recipe = RefinerRecipe(epochs=2, base=4)
    a, info = fit_refiner(boxes, recipe, seed=3)
    b, _ = fit_refiner(boxes, recipe, seed=3)
    assert not a.training and info["epochs"] == 2 and info["n_boxes"] == 4
    # the same boxes drawn in the same order with the same augmentation (bfloat16 backward passes may differ in
    # their last bits from run to run)
    assert all(torch.allclose(x.float(), y.float(), atol=1e-3) for x, y in zip(a.state_dict().values(),
                                                                               b.state_dict().values()))
    # the 2D probabilities miss a slab the image shows: training reduces the loss
    before = fit_refiner(boxes, RefinerRecipe(epochs=1, base=4, lr=1e-6), seed=0)[1]["final_loss"]
    after = fit_refiner(boxes, RefinerRecipe(epochs=12, base=4, lr=1e-2), seed=0)[1]["final_loss"]
    assert after < before


def test_segment_canonical_runs_the_refiner_after_the_views():
    from tests.test_atrium import _Counting

    vol = np.full((100, 100, 100), -3.0, np.float32)
    vol[30:50, 30:50, 30:50] = 3.0
    plain = A.segment_canonical(_Counting(), vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16)
    same = A.segment_canonical(_Counting(), vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16,
                               refiner=Refiner(RefinerNet(4)))
    assert np.array_equal(plain.mask, same.mask) and plain.view_masks[0].sum() == same.view_masks[0].sum()
    rbox = pp.box_around(plain.mask.astype(bool), (1.25,) * 3, REFINE_MARGIN_MM)
    assert all(b.start <= min(p.start, r.start) and b.stop >= max(p.stop, r.stop)
               for b, p, r in zip(same.box, plain.box, rbox))

    class _Shrink(RefinerNet):  # a refiner that removes everything: the mask follows it
        def forward(self, x):
            return torch.full_like(x[:, :1], -50.0)

    gone = A.segment_canonical(_Counting(), vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16,
                               refiner=Refiner(_Shrink(4)))
    assert gone.mask.sum() == 0 and gone.view_masks[0].sum() == plain.view_masks[0].sum()


def test_the_quality_check_reads_the_2d_views_uncertainty_after_a_refiner():
    """A refiner sharpens the probabilities of wrong masks too (three LGE volumes blurred by 2 voxels, Dice
    0.21-0.36, passed the check on the refined probabilities): the check reads the 2D views' own uncertainty."""
    from tests.test_atrium import _CentreSlice

    class _Model(_CentreSlice):  # background (z-score about -0.1) sure too
        def forward(self, x):
            return super().forward(x) - 5

    vol = np.full((100, 100, 100), -3.0, np.float32)
    vol[30:50, 30:50, 30:50] = 3.0
    vol[26:30, 30:50, 30:50] = -2.66  # a slab the 2D stand-in is unsure of (z-score about 0.55: logit about 0.5)
    plain = A.segment_canonical(_Model(), vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16)
    q2d = A.uncertain_ratio(plain.prob, plain.mask, 0.5, plain.box)
    assert plain.uncertain_ratio_2d is None and q2d > 0.1
    assert A.quality_measures(plain, (1.25,) * 3)["uncertain_ratio"] == pytest.approx(q2d)

    class _Sure(RefinerNet):  # a refiner that pushes every voxel far from the threshold
        def forward(self, x):
            return x[:, 1:2] * 50

    sure = A.segment_canonical(_Model(), vol, (1.25,) * 3, (2, 0, 1), 1.25, batch_size=16,
                               refiner=Refiner(_Sure(4)))
    assert A.uncertain_ratio(sure.prob, sure.mask, 0.5, sure.box) < q2d / 2  # its own probabilities look sure
    assert sure.uncertain_ratio_2d == pytest.approx(q2d)
    assert A.quality_measures(sure, (1.25,) * 3)["uncertain_ratio"] == pytest.approx(q2d)


def test_the_card_names_the_refiner_its_figures_were_measured_with(tmp_path):
    from core.checkpoint import save_checkpoint
    from core.errors import MissingWeightsError

    assert A.refiner_for({"input_spec": {}}, tmp_path) is None
    with pytest.raises(MissingWeightsError, match="3D refiner .*missing or damaged"):
        A.refiner_for({"input_spec": {"refiner": {"weights_sha256": "x"}}}, tmp_path)
    card = A.refiner_card([_box(1)], {"seconds": 1.0}, RefinerRecipe(base=4), 0, {1: "abc"}, smoke=True)
    save_checkpoint(RefinerNet(4).state_dict(), card, A.REFINER_TASK, tmp_path)
    ref = A.load_refiner(tmp_path)
    assert not ref.model.training and ref.margin_mm == REFINE_MARGIN_MM
    rec = A.refiner_record(ref.card)
    assert A.refiner_for({"input_spec": {"refiner": rec}}, tmp_path).card["weights_sha256"] == rec["weights_sha256"]
    with pytest.raises(MissingWeightsError, match="checksum differs"):
        A.refiner_for({"input_spec": {"refiner": {**rec, "weights_sha256": "0" * 64}}}, tmp_path)
    # a fold's refiner must not have trained on a box of that fold's validation volumes
    A.check_fold_refiner({"data": {"train_cases": ["a", "b"]}}, {"fold": 2, "val_cases": ["c"]}, tmp_path)
    with pytest.raises(Exception, match="fold 2"):
        A.check_fold_refiner({"data": {"train_cases": ["a", "c"]}}, {"fold": 2, "val_cases": ["c"]}, tmp_path)


def _fold_dirs(tmp_path, shas: dict[int, str]):
    import json

    for k, sha in shas.items():
        d = tmp_path / "folds" / f"fold{k}"
        d.mkdir(parents=True)
        (d / "atrium.json").write_text(json.dumps({"weights_sha256": sha, "data": {"val_cases": [f"v{k}"],
                                                                                   "train_cases": ["t"]}}))
    return tmp_path / "folds"


def test_the_committed_refiner_learns_from_the_fold_models_the_cv_recorded(tmp_path, monkeypatch):
    import train_all

    folds = _fold_dirs(tmp_path, {1: "a" * 64, 2: "b" * 64})
    cv = {"folds": [{"fold": 1, "weights_sha256": "a" * 64, "val_cases": ["v1"], "train_cases": ["t"]},
                    {"fold": 2, "weights_sha256": "b" * 64, "val_cases": ["v2"], "train_cases": ["t"]}]}
    boxes = [_box(s) for s in range(2)]
    monkeypatch.setattr("core.refine3d.RefinerRecipe", lambda **kw: RefinerRecipe(**{**kw, "base": 4}))
    card = A.fit_committed_refiner(folds, cv, wdir=tmp_path / "w", smoke=True, boxes=boxes, log=None)
    assert card["task"] == A.REFINER_TASK and card["data"]["n_train"] == 2
    assert card["data"]["fold_models"] == {"1": "a" * 64, "2": "b" * 64}
    assert A.load_refiner(tmp_path / "w").card["weights_sha256"] == card["weights_sha256"]
    # a kept fold model that is not the one atrium.cv.json recorded: its masks would not be the measured ones
    bad = {"folds": [cv["folds"][0], {**cv["folds"][1], "weights_sha256": "c" * 64}]}
    with pytest.raises(MedImgError, match="fold 2 .*--atrium-folds"):
        A.fit_committed_refiner(folds, bad, wdir=tmp_path / "w2", smoke=True, boxes=boxes, log=None)
    with pytest.raises(MedImgError, match="no kept fold models"):
        A.fit_committed_refiner(tmp_path / "nothing", cv, wdir=tmp_path / "w3", smoke=True, boxes=boxes, log=None)
    # train_all: the committed fold models by default, none in a smoke run or when told 'none'
    assert train_all.atrium_folds_dir(None, smoke=False) == (
        train_all.DEFAULT_ATRIUM_FOLDS if train_all.DEFAULT_ATRIUM_FOLDS.is_dir() else None)
    assert train_all.atrium_folds_dir(None, smoke=True) is None
    assert train_all.atrium_folds_dir("none", smoke=False) is None
    assert train_all.atrium_folds_dir(str(folds), smoke=True) == folds
