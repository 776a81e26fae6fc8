"""The pneumonia task: the perturbation battery, equalisation, the threshold rule (hand-made cases), the
population check on held-out outside-population images, and evaluations tied to weights by sha256."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from core import pneumonia as P
from core import preprocess as pp
from core.checkpoint import read_card
from core.report import external_evaluations


def _images(n: int = 6, size: int = 64) -> torch.Tensor:
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    base = (0.3 + 0.5 * torch.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) * 8))[None, None]
    return (base + 0.02 * torch.arange(n).view(n, 1, 1, 1)).clamp(0, 1)


def test_battery_is_fixed_and_changes_each_image():
    x = _images()
    for name, fn in P.PERTURBATIONS.items():
        a, b = fn(x.clone()), fn(x.clone())
        assert a.shape == x.shape, name
        assert torch.equal(a, b), f"{name} is not deterministic"
        assert float(a.min()) >= 0 and float(a.max()) <= 1, name
        if name.startswith("low contrast"):
            continue  # a linear contrast change is undone by the app's own percentile stretch, by design
        assert float((a - P._restretch(x)).abs().max()) > 1e-3, f"{name} leaves the image unchanged"
    assert len(P.PERTURBATIONS) == 11


def test_augmentation_keeps_shape_and_range():
    x = _images(8)
    out = P.acquisition_augment(x, np.random.default_rng(0))
    assert out.shape == x.shape and float(out.min()) >= 0 and float(out.max()) <= 1


def test_equalisation_ignores_monotone_grey_changes():
    x = torch.rand(2, 1, 32, 32)
    e = pp.equalize_histogram(x)
    for g in (0.5, 2.0):
        assert float((pp.equalize_histogram(x**g) - e).abs().max()) < 0.02  # grey-level quantisation (1024)
    assert abs(float(e.mean()) - 0.5) < 0.01


def test_threshold_from_the_pooled_battery_by_hand():
    y = np.array([0, 0, 1, 1])
    clean = np.array([0.1, 0.2, 0.8, 0.9])
    shifted = np.array([0.3, 0.6, 0.7, 0.95])  # under a perturbation the normals drift up
    # clean alone separates anywhere in 0.2-0.8: the most sensitive cut, halfway to the next lower case
    assert P.robust_threshold(y, {"clean": clean}) == pytest.approx(0.5)
    # pooled with the perturbed copy, only 0.6-0.7 separates every case: halfway is 0.65
    assert P.robust_threshold(y, {"clean": clean, "p": shifted}) == pytest.approx(0.65)


def test_threshold_does_not_depend_on_prevalence():
    rng = np.random.default_rng(0)
    y = np.r_[np.zeros(50), np.ones(50)].astype(int)
    p = {"clean": np.r_[rng.uniform(0, 0.6, 50), rng.uniform(0.4, 1, 50)]}
    t1 = P.robust_threshold(y, p)
    # three times as many positives, the same distribution: the threshold stays
    y3 = np.r_[y, np.ones(100, int)]
    p3 = {"clean": np.r_[p["clean"], p["clean"][50:], p["clean"][50:]]}
    assert P.robust_threshold(y3, p3) == pytest.approx(t1)


def test_battery_report_by_hand():
    y = np.array([0, 0, 1, 1])
    probs = {"clean": np.array([0.1, 0.2, 0.8, 0.9]), "a": np.array([0.1, 0.7, 0.8, 0.9]),
             "b": np.array([0.1, 0.2, 0.4, 0.9])}
    rep = P.battery_report(y, probs, 0.5)
    assert rep["conditions"]["a"]["specificity"] == 0.5 and rep["conditions"]["b"]["sensitivity"] == 0.5
    assert rep["worst"]["accuracy"] == 0.75 and rep["mean"]["accuracy"] == 0.75
    assert rep["pooled_perturbed"]["accuracy"] == pytest.approx(6 / 8)


def test_series_names():
    assert P.series_of("NORMAL2-IM-1427-0001.jpeg") == "normal, NORMAL2-IM series"
    assert P.series_of("IM-0115-0001.jpeg") == "normal, IM series"
    assert P.series_of("person1_virus_6.jpeg") == "pneumonia, viral"


def test_outside_split_is_seeded_and_disjoint():
    files = [(f"adult_cxr/x{i}.jpg", "adult", "s1" if i % 2 else "s2") for i in range(20)]
    a, b = P.outside_split(files, 0)
    assert P.outside_split(files, 0) == (a, b)
    assert not set(a) & set(b) and len(a) + len(b) == 20 and len(b) == 6


# --------------------------------------------------------------------------- real data


def test_population_check_on_held_out_outside_images(outside_root):
    """The held-out third of outside_population (never used to fit the check) is withheld, the
    pneumonia model's own validation images are not."""
    from core.inference import load_model
    from core.pneumonia import predict_xray
    from core.io import read_image_2d

    lm = load_model("pneumonia")
    card = lm.population[1]
    held = card["data"]["outside_held_out"]
    assert held, "the population check's card lists no held-out images"
    refused = {"adult": [], "other": []}
    for rel in held:
        img = read_image_2d((outside_root / P.OUTSIDE_DIR / rel).read_bytes(), rel)
        kind = "adult" if rel.startswith("adult_cxr") else "other"
        refused[kind].append(predict_xray(lm, img, explain=False).withheld is not None)
    assert np.mean(refused["adult"]) >= 0.9, refused
    assert np.mean(refused["other"]) >= 0.95 if refused["other"] else True
    v = card["validation"]
    assert v["in_population_refusal_clean"] <= 0.03


def test_heatmap_after_the_verdict_is_the_one_computed_with_it(xray_root):
    """The page shows the verdict first and the Grad-CAM map after it: the map is the same."""
    from core.inference import load_model
    from core.pneumonia import predict_xray, xray_heatmap
    from core.io import read_image_2d

    lm = load_model("pneumonia")
    f = sorted((xray_root / "chest_xray" / "train" / "PNEUMONIA").glob("*.jpeg"))[0]
    img = read_image_2d(f.read_bytes(), f.name)
    both = predict_xray(lm, img)
    first = predict_xray(lm, img, explain=False)
    assert first.heatmap is None and first.probability == both.probability and first.positive == both.positive
    heat = xray_heatmap(lm, img, first.positive)
    assert heat.shape == both.heatmap.shape and np.allclose(heat, both.heatmap, atol=1e-5)
    assert 0 <= heat.min() and heat.max() <= 1


def test_validation_images_are_rarely_withheld(xray_root):
    from core.inference import load_model
    from core.pneumonia import predict_xray_batch
    from core.io import read_image_2d

    lm = load_model("pneumonia")
    val = lm.card["data"]["val_cases"][::10]
    pix = [read_image_2d((xray_root / v).read_bytes(), v).pixels for v in val]
    _, refused = predict_xray_batch(lm, pix)
    assert refused.mean() <= 0.03


def test_evaluation_records_weights_sha_and_page_ties_it(tmp_path, xray_root):
    from core.evaluate import evaluate

    # a tiny data root: four real training images laid out as a "test" split (nothing is committed)
    card = read_card("pneumonia")
    for rel in card["data"]["val_cases"][:2] + card["data"]["val_cases"][-2:]:
        cls = rel.split("/")[-2]
        dest = tmp_path / "data" / "chest_xray" / "test" / cls
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy(xray_root / rel, dest / rel.split("/")[-1])
    res = evaluate("pneumonia", tmp_path / "data", split="test", data_label="four images")
    assert res["weights_sha256"] == card["weights_sha256"] and res["n"] == 4 and res["data_label"] == "four images"
    assert res["evaluated"][:4] == "2026" or len(res["evaluated"]) >= 19
    wd = tmp_path / "weights"
    shutil.copytree(read_card.__globals__["weights_dir"](), wd, ignore=shutil.ignore_patterns("logs", "evaluations"))
    (wd / "evaluations").mkdir()
    (wd / "evaluations" / "ok.json").write_text(json.dumps(res))
    (wd / "evaluations" / "old.json").write_text(json.dumps({**res, "weights_sha256": "0" * 64}))
    evs = {e["file"]: e["matches"] for e in external_evaluations("pneumonia", card, wd)}
    assert evs == {"ok.json": True, "old.json": False}


# --------------------------------------------------------------------------- calibration (hand values)


def test_binary_ece_by_hand():
    from core.pneumonia import binary_ece

    y = np.array([1, 0, 1, 1])
    p = np.array([0.95, 0.95, 0.15, 0.15])  # two bins: mean p 0.95 observed 0.5; mean p 0.15 observed 1.0
    assert binary_ece(y, p) == pytest.approx(0.5 * 0.45 + 0.5 * 0.85)


def test_platt_recovers_a_known_map_and_keeps_the_order():
    from core.pneumonia import apply_platt, binary_platt

    rng = np.random.default_rng(0)
    z = rng.normal(0, 2, 20000)
    y = (rng.random(len(z)) < 1 / (1 + np.exp(-(0.5 * z - 1.0)))).astype(float)
    a, b = binary_platt(y, 1 / (1 + np.exp(-z)))
    assert a == pytest.approx(0.5, abs=0.05) and b == pytest.approx(-1.0, abs=0.08)
    p = np.array([0.1, 0.3, 0.7])
    assert np.allclose(apply_platt(p, 1.0, 0.0), p)  # slope 1, intercept 0: identity
    q = apply_platt(p, a, b)
    assert np.all(np.diff(q) > 0)  # monotone: decisions at the mapped threshold do not change


def test_refer_band_by_hand():
    from core.runtime import verdict_band

    assert verdict_band(0.30, 0.25, 0.10) == "uncertain"  # within 10 points of the threshold
    assert verdict_band(0.40, 0.25, 0.10) == "positive" and verdict_band(0.10, 0.25, 0.10) == "negative"
    # calibrated scale, threshold 72 %: a verdict never contradicts the probability shown beside it
    assert verdict_band(0.55, 0.72, 0.10, calibrated=True) == "uncertain"  # would be 'negative' at P 55 %
    assert verdict_band(0.40, 0.72, 0.10, calibrated=True) == "negative"
    assert verdict_band(0.90, 0.72, 0.10, calibrated=True) == "positive"
    assert verdict_band(0.45, 0.15, 0.10, calibrated=True) == "uncertain"  # would be 'positive' at P 45 %


def test_warm_up_runs_every_stage_the_first_upload_needs(monkeypatch):
    """The warm-up's synthetic image is withheld by the input checks, so predict_xray alone would skip the
    probability and Grad-CAM; the warm-up must run them (their first call is what the first upload waited for)."""
    import core.inference as inf

    lm = inf.load_model("pneumonia")
    calls = {"gradcam": 0, "prob": 0, "on_shared_model": None}
    real_gradcam, real_prob = inf.gradcam, inf.probabilities

    def counting_gradcam(*a, **k):
        calls["gradcam"] += 1
        calls["on_shared_model"] = a[0] is lm.model
        return real_gradcam(*a, **k)

    def counting_prob(*a, **k):
        calls["prob"] += 1
        return real_prob(*a, **k)

    monkeypatch.setattr(inf, "gradcam", counting_gradcam)
    monkeypatch.setattr(inf, "probabilities", counting_prob)
    inf.warm_up(lm)
    # Grad-CAM warmed on a copy: on the shared model its lock would keep an upload arriving meanwhile from
    # its verdict
    assert calls == {"gradcam": 1, "prob": 1, "on_shared_model": False}
