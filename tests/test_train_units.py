"""Training helpers with known values: crop centres and crops, mixed precision, config checks."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from core.models import UNet2D
from core.train import TrainConfig, autocast_for, fit, native_bf16, precision_label


def _stack(dataset: str = "A", fg_slices: tuple[int, ...] = (1,)):
    from core.atrium import build_view_stacks

    data = np.random.default_rng(0).random((24, 20, 6)).astype(np.float32)
    lab = np.zeros((24, 20, 6), np.uint8)
    for z in fg_slices:
        lab[4:8, 10:14, z] = 1  # centroid (5.5, 11.5)
    return build_view_stacks("c", dataset, data, lab, (1.25, 1.25, 1.25), 1.25, 32, axes=(2,))[0]


def test_view_stacks_pad_to_the_crop_and_find_atrium_centroids():
    s = _stack()
    assert s.padded.shape == (6 + 2, 32, 32) and s.label.shape == (6, 32, 32)
    assert s.fg.tolist() == [False, True, False, False, False, False]
    assert s.centres[1].tolist() == [5.5, 11.5]


def test_centred_crops_hold_the_atrium_and_stay_inside():
    from core.atrium import crop_items

    s = _stack()
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y = crop_items([s], [(0, 1, True), (0, 3, False)], 16, rng)
        assert x.shape == (2, 3, 16, 16) and y.shape == (2, 16, 16)
        assert y[0].sum() > 0  # jitter is at most a third of the crop: the 4x4 atrium stays in view


def test_sampling_takes_both_datasets_equally_often():
    from core.atrium import sample_batch_items

    stacks = [_stack("A"), _stack("A"), _stack("A"), _stack("B")]
    items = sample_batch_items(stacks, 4000, np.random.default_rng(0), fg_fraction=1.0)
    share_b = np.mean([i == 3 for i, _, _ in items])
    assert 0.45 < share_b < 0.55
    assert all(z == 1 and centred for _, z, centred in items)


def test_sampling_takes_the_axial_view_at_its_share():
    from dataclasses import replace

    from core.atrium import sample_batch_items

    s = _stack()
    stacks = [replace(s, case_id="c1", axis=2), replace(s, case_id="c1", axis=0), replace(s, case_id="c1", axis=1),
              replace(s, case_id="c2", axis=2), replace(s, case_id="c2", axis=0), replace(s, case_id="c2", axis=1)]
    items = sample_batch_items(stacks, 6000, np.random.default_rng(0), axial_fraction=0.5)
    axial = np.mean([stacks[i].axis == 2 for i, _, _ in items])
    other_0 = np.mean([stacks[i].axis == 0 for i, _, _ in items])
    assert 0.47 < axial < 0.53 and 0.22 < other_0 < 0.28
    assert 0.47 < np.mean([stacks[i].case_id == "c2" for i, _, _ in items]) < 0.53
    only_axial = sample_batch_items(stacks, 200, np.random.default_rng(1), axial_fraction=1.0)
    assert all(stacks[i].axis == 2 for i, _, _ in only_axial)
    with pytest.raises(ValueError):
        sample_batch_items(stacks, 1, np.random.default_rng(0), axial_fraction=1.5)


def test_augmentation_keeps_shapes_and_labels_binary():
    from core.atrium import augment

    x = torch.randn(6, 3, 32, 32)
    y = (torch.rand(6, 32, 32) > 0.7).float()
    xa, ya = augment(x, y, torch.Generator().manual_seed(0))
    assert xa.shape == x.shape and ya.shape == y.shape
    assert set(torch.unique(ya).tolist()) <= {0.0, 1.0} and torch.isfinite(xa).all()


def test_config_checks_the_crop():
    with pytest.raises(ValueError, match="multiple of 16"):
        TrainConfig(epochs=1, batch_size=2, crop=100)
    assert TrainConfig(epochs=1, batch_size=2, crop=160).crop == 160


def test_autocast_only_where_native_and_enabled():
    cpu = torch.device("cpu")
    with autocast_for(cpu, enabled=False):
        assert not torch.is_autocast_enabled("cpu")
    with autocast_for(cpu, enabled=True):
        assert torch.is_autocast_enabled("cpu") == native_bf16(cpu)
    assert not native_bf16(torch.device("meta"))
    label = precision_label(cpu, TrainConfig(epochs=1, batch_size=2))
    assert label.startswith("bfloat16") == native_bf16(cpu)
    assert precision_label(cpu, TrainConfig(epochs=1, batch_size=2, mixed_precision=False)).startswith("float32")


@pytest.mark.parametrize("mixed", [True, False])
def test_fit_returns_plain_layout_weights_and_learns(mixed):
    torch.manual_seed(0)
    x = torch.randn(16, 1, 16, 16)
    y = (x[:, 0] > 0).float()
    model = UNet2D(1, 1, base=4, depth=2)

    def train_batches(epoch):
        for i in range(0, 16, 8):
            yield x[i : i + 8], y[i : i + 8]

    def step(m, batch):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(batch[0])[:, 0].float(), batch[1])
        return loss, 0.0

    def validate(m):
        loss = float(torch.nn.functional.binary_cross_entropy_with_logits(m(x)[:, 0].float(), y))
        return {"loss": loss, "score": -loss}

    res = fit(model, train_batches, step, validate, TrainConfig(epochs=6, batch_size=8, lr=0.01,
                                                                mixed_precision=mixed), "score")
    assert all(v.is_contiguous() for v in res.best_state.values())
    assert all(p.is_contiguous() for p in model.parameters())
    assert res.history[-1]["train_loss"] < res.history[0]["train_loss"]


def test_fit_with_ema_validates_and_keeps_the_moving_average_of_the_weights():
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    model = torch.nn.Linear(3, 1)
    raw, seen = [], []  # raw weights after each optimiser step; weights of the model validated

    def train_batches(epoch):
        yield x, y

    def step(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1]), 0.0

    def validate(m):
        assert m is not model
        raw.append(model.weight.detach().clone())
        seen.append(m.weight.detach().clone())
        return {"loss": 0.0, "score": float(len(seen))}  # later is better: the last epoch is kept

    decay = 0.6
    res = fit(model, train_batches, step, validate, TrainConfig(epochs=4, batch_size=8, lr=0.1, ema=decay,
                                                                mixed_precision=False), "score")
    expected = raw[0]  # the average starts as the weights after the first step
    assert torch.allclose(seen[0], expected)
    for n, (w, got) in enumerate(zip(raw[1:], seen[1:]), start=1):
        d = min(decay, (1 + n) / (10 + n))  # warm-up: 2/11, 3/12, 4/13 here, all under 0.6
        expected = d * expected + (1 - d) * w
        assert torch.allclose(got, expected, atol=1e-6)
    assert not torch.allclose(expected, raw[-1])
    assert res.best_epoch == 4 and torch.allclose(model.weight, expected, atol=1e-6)
    with pytest.raises(ValueError, match="ema"):
        TrainConfig(epochs=1, batch_size=1, ema=1.0)


def test_fit_with_nothing_to_validate_keeps_the_last_epoch():
    """Training on every case (``keep_last``): validation gives NaN, and the weights returned are the last
    epoch's, not the untrained ones a best-of-NaN rule would keep."""
    torch.manual_seed(0)
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    model = torch.nn.Linear(3, 1)
    start = model.weight.detach().clone()
    after: list[torch.Tensor] = []

    def train_batches(epoch):
        yield x, y

    def step(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1]), 0.0

    def validate(m):
        after.append(m.weight.detach().clone())
        return {"loss": float("nan"), "score": float("nan")}

    res = fit(model, train_batches, step, validate, TrainConfig(epochs=3, batch_size=8, lr=0.1, patience=1,
                                                                mixed_precision=False), "score", keep_last=True)
    assert res.best_epoch == 3 and res.epochs_run == 3  # no early stop on a metric that never improves
    assert torch.equal(model.weight, after[-1]) and not torch.equal(model.weight, start)


def test_ema_decay_warms_up_to_its_ceiling():
    from core.train import ema_decay

    assert ema_decay(0.998, 0) == pytest.approx(0.1)
    assert ema_decay(0.998, 90) == pytest.approx(0.91)
    assert ema_decay(0.998, 10_000) == 0.998


def test_task_config_overrides():
    from core.train import task_config

    cfg = task_config("atrium", epochs=24, crop=160)
    assert (cfg.epochs, cfg.crop) == (24, 160)
    assert task_config("atrium", crop=0).crop is None  # 0: whole slices
    assert task_config("atrium", ema=0.998).ema == 0.998 and task_config("atrium").ema is None
    assert task_config("atrium", crop=None).crop == task_config("atrium").crop  # None: the registry's
    with pytest.raises(ValueError, match="segmentation tasks only"):
        task_config("pneumonia", crop=160)
    assert task_config("atrium", spacing_mm=2.0).spacing_mm == 2.0 and task_config("atrium").spacing_mm is None
    with pytest.raises(ValueError, match="segmentation tasks only"):
        task_config("cardiac", spacing_mm=2.0)
    with pytest.raises(ValueError, match="spacing_mm"):
        TrainConfig(epochs=1, batch_size=1, spacing_mm=0.1)


def test_card_and_loaded_model_carry_the_training_grid():
    """A model trained on another in-plane grid says so in its card, and inference resamples to it."""
    from core.runtime import LoadedModel
    from core.tasks import get_task
    from core.train import card_base

    spec = get_task("atrium")
    registry_mm = spec.input_spec["spacing_mm"]
    card = card_base(spec, TrainConfig(epochs=1, batch_size=1, spacing_mm=2.0), torch.device("cpu"), True)
    assert card["input_spec"]["spacing_mm"] == 2.0 and card["training"]["spacing_mm"] == 2.0
    assert spec.input_spec["spacing_mm"] == registry_mm  # the registry is not changed
    assert card_base(spec, TrainConfig(epochs=1, batch_size=1), torch.device("cpu"), True)["input_spec"][
        "spacing_mm"] == registry_mm
    assert LoadedModel(spec, torch.nn.Identity(), card).grid_mm == 2.0


def test_report_states_the_run_record(tmp_path):
    import json

    from core.report import run_markdown

    assert run_markdown(tmp_path) == []
    rec = {"command": "python train_all.py", "tasks": ["pneumonia", "cardiac"], "total_s": 600.0,
           "seconds_per_task": {"pneumonia": 240.0, "cardiac": 360.0}, "machine": "x86_64", "cpu_count": 2,
           "threads": 2, "device": "cpu", "torch": "2.x", "smoke": False}
    (tmp_path / "train_all.run.json").write_text(json.dumps(rec))
    text = "\n".join(run_markdown(tmp_path))
    assert "**10.0 min** for 2 task(s)" in text and "pneumonia 4.0 min, cardiac 6.0 min" in text
    assert "shortened" not in text
    cut = {"pneumonia": {"epochs_planned": 20, "epochs_run": 20, "shortened_at_epoch": None},
           "cardiac": {"epochs_planned": 16, "epochs_run": 16, "shortened_at_epoch": 1}}
    (tmp_path / "train_all.run.json").write_text(json.dumps({**rec, "schedules": cut}))
    text = "\n".join(run_markdown(tmp_path))
    assert "time budget shortened the schedule: cardiac 16 epochs per fold" in text and "pneumonia 20" not in text
    (tmp_path / "train_all.run.json").write_text(json.dumps({**rec, "smoke": True}))
    assert run_markdown(tmp_path) == []  # smoke runs say nothing about training time


def test_planned_epochs_fits_the_time_left_within_its_bounds():
    from core.train import planned_epochs

    # cardiac fold on the slower CPU: 2 epochs done at 18.7 s, 270 s left -> 14 more
    assert planned_epochs(20, 2, 18.7, 270.0, 10) == 16
    assert planned_epochs(20, 2, 1.0, 1e6, 10) == 20  # never longer than the schedule
    assert planned_epochs(20, 2, 100.0, 50.0, 10) == 10  # never under the floor
    assert planned_epochs(20, 15, 100.0, -5.0, 10) == 15  # nor under what has run
    assert planned_epochs(4, 1, 10.0, 0.0, 10) == 4  # a floor above the schedule is the schedule
    with pytest.raises(ValueError):
        planned_epochs(0, 0, 1.0, 1.0, 1)


def test_cosine_lr_is_torchs_cosine_annealing():
    from core.train import cosine_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=7, eta_min=4e-5)
    for e in range(1, 8):
        opt.step()
        sched.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(cosine_lr(2e-3, 4e-5, e, 7), rel=1e-9)
    assert cosine_lr(2e-3, 4e-5, 0, 7) == pytest.approx(2e-3) and cosine_lr(2e-3, 4e-5, 9, 7) == pytest.approx(4e-5)


def test_time_budget_shares_the_time_left_for_epochs():
    from core.train import TimeBudget

    b = TimeBudget(30, 0.15, started=1000.0)
    assert b.epochs_end == pytest.approx(1000.0 + 1530.0)
    assert b.run_end(5, now=1007.0) == pytest.approx(1007.0 + 1523.0 / 5)
    assert b.run_end(1, now=9999.0) == 9999.0  # past the end: nothing left
    for bad in ({"minutes": 0, "reserve": 0.1}, {"minutes": 30, "reserve": 1.0}):
        with pytest.raises(ValueError):
            TimeBudget(**bad)
    with pytest.raises(ValueError):
        b.run_end(0)


def _clocked_fit(monkeypatch, budget, epochs: int = 10, seconds_per_epoch: float = 10.0):
    """``fit`` on a tiny model with a fake clock that advances ``seconds_per_epoch`` per epoch."""
    import types

    import core.train as T

    clock = [0.0]
    monkeypatch.setattr(T, "time", types.SimpleNamespace(time=lambda: clock[0]))
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    model = torch.nn.Linear(3, 1)

    def train_batches(epoch):
        yield x, y

    def step(m, batch):
        clock[0] += seconds_per_epoch
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1]), 0.0

    def validate(m):
        return {"loss": 0.0, "score": 0.0}

    cfg = TrainConfig(epochs=epochs, batch_size=8, lr=0.1, mixed_precision=False, time_budget=budget)
    return T.fit(model, train_batches, step, validate, cfg, "score", keep_last=True), cfg


def test_fit_shortens_a_schedule_that_would_overrun_its_budget(monkeypatch):
    from core.train import TimeBudget

    # 60 s for epochs at 10 s each: 10 planned, 6 fit; decided after the second epoch (the first is a warm-up,
    # not a pace); the cosine still anneals to its floor on the last one
    res, cfg = _clocked_fit(monkeypatch, TimeBudget(1, 0.0, started=0.0))
    assert (res.epochs_run, res.epochs_planned, res.shortened_at) == (6, 6, 2)
    assert res.history[-1]["lr"] == pytest.approx(cfg.lr * 0.02)
    assert res.schedule == {"epochs_planned": 6, "epochs_run": 6, "shortened_at_epoch": 2}
    # far too slow: not under half the schedule
    res, _ = _clocked_fit(monkeypatch, TimeBudget(1, 0.0, started=0.0), seconds_per_epoch=100.0)
    assert res.epochs_run == 5
    # time enough, or no budget: the whole schedule, as torch's cosine
    for budget in (TimeBudget(60, 0.0, started=0.0), None):
        res, cfg = _clocked_fit(monkeypatch, budget)
        assert (res.epochs_run, res.epochs_planned, res.shortened_at) == (10, 10, None)
        assert res.history[-1]["lr"] == pytest.approx(cfg.lr * 0.02)


def test_every_task_has_a_time_budget_and_the_atrium_recipe_ignores_it():
    from dataclasses import replace

    from core import atrium as A
    from core.tasks import TASKS
    from core.train import TimeBudget, task_config

    assert {t: s.train_budget[0] for t, s in TASKS.items()} == {"pneumonia": 30, "cardiac": 30, "atrium": 90}
    assert all(0 < s.train_budget[1] < 0.5 for s in TASKS.values())
    cfg = task_config("atrium")
    # a budget is this machine's limit, not the recipe: the cross-validated recipe still matches
    assert A.recipe_record(replace(cfg, time_budget=TimeBudget(90, 0.08))) == A.recipe_record(cfg)


def test_schedule_note_names_a_cut_schedule_only():
    from core.report import schedule_note

    cut = {"training": {"epochs": 64, "schedule": {"epochs_planned": 61, "epochs_run": 61, "shortened_at_epoch": 2}}}
    assert schedule_note(cut) == " (the 64-epoch schedule cut to 61 by the time budget on the training machine)"
    full = {"training": {"epochs": 20, "schedule": {"epochs_planned": 20, "epochs_run": 20, "shortened_at_epoch": None}}}
    assert schedule_note(full) == "" and schedule_note({"training": {"epochs": 20}}) == ""  # committed cards: no record
