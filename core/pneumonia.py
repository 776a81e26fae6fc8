"""The pneumonia task in one place: acquisition augmentation, the shift-aware validation battery, the
threshold rule, training, the population check (is this a frontal radiograph of a young child?),
calibration, and prediction on one radiograph (``predict_xray``).

Images are handled in two stages: ``load`` gives (1, S, S) grey images in [0, 1] (percentile-stretched,
resized as the Kermany copy was), and ``finish`` turns them into the model's input (histogram
equalisation when the card asks for it, then (x - 0.5) / 0.25). Augmentations and perturbations act
between the two, on [0, 1] images, as acquisition differences would.
"""
from __future__ import annotations

import io as _io
import json
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core import preprocess as pp
from core.checkpoint import load_state_dict
from core.config import weights_dir
from core.concurrency import model_lock
from core.explain import gradcam
from core.io import Image2D
from core.models import build_model
from core.ood import ood_score, refused
from core.runtime import LoadedModel, load_base, probabilities, release_memory, verdict_band

# --------------------------------------------------------------------------- input transform


def finish(x01: torch.Tensor, equalized: bool) -> torch.Tensor:
    """[0, 1] images (N, 1, H, W) -> model input."""
    x = pp.equalize_histogram(x01) if equalized else x01
    return (x - 0.5) / 0.25


# --------------------------------------------------------------------------- augmentation


def _jpeg(img01: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buf = _io.BytesIO()
    Image.fromarray((img01 * 255).round().astype(np.uint8)).save(buf, format="JPEG", quality=int(quality))
    return np.asarray(Image.open(_io.BytesIO(buf.getvalue())), dtype=np.float32) / 255.0


def _marks(img01: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Burnt-in text and a border or marker, as radiographs often carry (L/R markers, labels, frames)."""
    from PIL import Image, ImageDraw

    im = Image.fromarray((img01 * 255).round().astype(np.uint8))
    d = ImageDraw.Draw(im)
    s = im.size[0]
    val = int(rng.choice([0, 255]))
    for _ in range(int(rng.integers(1, 4))):
        x, y = int(rng.integers(0, s - 20)), int(rng.integers(0, s - 10))
        text = "".join(rng.choice(list("LRAPSUPINE0123456789")) for _ in range(int(rng.integers(1, 6))))
        d.text((x, y), text, fill=val)
    if rng.random() < 0.5:
        w = int(rng.integers(2, max(3, s // 12)))
        side = int(rng.integers(4))
        box = [(0, 0, s, w), (0, s - w, s, s), (0, 0, w, s), (s - w, 0, s, s)][side]
        d.rectangle(box, fill=int(rng.choice([0, 255])))
    return np.asarray(im, dtype=np.float32) / 255.0


def _affine(x: torch.Tensor, rot_deg: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
            aspect: torch.Tensor) -> torch.Tensor:
    """Per-sample rotation (deg), zoom (>1 zooms in), aspect change and shift (fraction) of (N, 1, H, W)."""
    n = x.shape[0]
    a = rot_deg * math.pi / 180
    sx, sy = 1 / (scale * aspect.sqrt()), aspect.sqrt() / scale
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = torch.cos(a) * sx
    theta[:, 0, 1] = -torch.sin(a) * sy
    theta[:, 1, 0] = torch.sin(a) * sx
    theta[:, 1, 1] = torch.cos(a) * sy
    theta[:, :, 2] = shift
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    if sigma <= 0:
        return x
    r = max(1, int(math.ceil(2.5 * sigma)))
    t = torch.arange(-r, r + 1, dtype=torch.float32)
    k = torch.exp(-(t**2) / (2 * sigma**2))
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))


def _restretch(x: torch.Tensor) -> torch.Tensor:
    """The app's percentile stretch, per image, after a perturbation (as a new upload would get)."""
    n = x.shape[0]
    q = torch.quantile(x.reshape(n, -1), torch.tensor([0.005, 0.995]), dim=1)
    lo, hi = q[0].view(n, 1, 1, 1), q[1].view(n, 1, 1, 1)
    return ((x - lo) / (hi - lo).clamp(min=1e-6)).clamp(0, 1)


def acquisition_augment(x01: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """Random acquisition differences on a batch (N, 1, S, S) in [0, 1]: framing (zoom 0.8-1.25, aspect,
    rotation 10 deg, shift), tone (gamma 0.5-2, window, contrast), blur or noise, JPEG quality 15-95,
    burnt-in marks; then the app's percentile stretch."""
    n = x01.shape[0]
    u = lambda lo, hi: torch.from_numpy(rng.uniform(lo, hi, n).astype(np.float32))  # noqa: E731
    x = _affine(x01, u(-10, 10), torch.exp(u(math.log(0.8), math.log(1.25))), torch.from_numpy(
        rng.uniform(-0.08, 0.08, (n, 2)).astype(np.float32)), torch.exp(u(-0.15, 0.15)))
    gamma = torch.exp(u(math.log(0.5), math.log(2.0))).view(n, 1, 1, 1)
    x = x.clamp(1e-6, 1) ** gamma
    lo, hi = u(0, 0.15).view(n, 1, 1, 1), u(0.85, 1).view(n, 1, 1, 1)
    x = ((x - lo) / (hi - lo)).clamp(0, 1)
    r = rng.random((n, 4))
    blur = torch.from_numpy(r[:, 0] < 0.3)
    if blur.any():
        x[blur] = _blur(x[blur], float(rng.uniform(0.5, 1.5)))
    sd = torch.from_numpy((r[:, 1] < 0.3) * rng.uniform(0.01, 0.06, n)).float().view(n, 1, 1, 1)
    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    x = (x + sd * torch.randn(x.shape, generator=g)).clamp(0, 1)
    out = []
    for i in range(n):
        arr = x[i, 0].numpy()
        if r[i, 2] < 0.3:
            arr = _marks(arr, rng)
        if r[i, 3] < 0.4:
            arr = _jpeg(arr, int(rng.integers(15, 95)))
        out.append(torch.from_numpy(np.ascontiguousarray(arr))[None])
    return _restretch(torch.stack(out))


# --------------------------------------------------------------------------- shift-aware validation


def _fixed(fn: Callable[[np.ndarray], np.ndarray]) -> Callable[[torch.Tensor], torch.Tensor]:
    def apply(x01: torch.Tensor) -> torch.Tensor:
        return _restretch(torch.stack([torch.from_numpy(np.ascontiguousarray(fn(x[0].numpy())))[None] for x in x01]))

    return apply


def _const(n: int, v: float) -> torch.Tensor:
    return torch.full((n,), float(v))


PERTURBATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    # every perturbation is fixed (no randomness), so the battery gives the same figures on every run
    "gamma 0.6 (darker mid-tones)": lambda x: _restretch(x.clamp(1e-6, 1) ** 0.6),
    "gamma 1.6 (brighter mid-tones)": lambda x: _restretch(x.clamp(1e-6, 1) ** 1.6),
    "low contrast (window 0.2-0.8 of range widened)": lambda x: _restretch(0.3 + 0.4 * x),
    "narrow window (0.15-0.85)": lambda x: _restretch(((x - 0.15) / 0.7).clamp(0, 1)),
    "blur (sigma 1.2 px)": lambda x: _restretch(_blur(x, 1.2)),
    "noise (sd 0.04)": lambda x: _restretch((x + 0.04 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0)))
                                            .clamp(0, 1)),
    "JPEG quality 20": _fixed(lambda a: _jpeg(a, 20)),
    "zoom in 15 %": lambda x: _restretch(_affine(x, _const(len(x), 0), _const(len(x), 1.15), torch.zeros(len(x), 2),
                                                 _const(len(x), 1))),
    "zoom out 15 % (wider field)": lambda x: _restretch(_affine(x, _const(len(x), 0), _const(len(x), 1 / 1.15),
                                                                torch.zeros(len(x), 2), _const(len(x), 1))),
    "rotation 8 deg": lambda x: _restretch(_affine(x, _const(len(x), 8), _const(len(x), 1), torch.zeros(len(x), 2),
                                                   _const(len(x), 1))),
    "burnt-in marks and border": _fixed(lambda a: _marks(a, np.random.default_rng(int(a.sum() * 1000) % (1 << 30)))),
}


def predict_probs(model: torch.nn.Module, x01: torch.Tensor, equalized: bool, device: torch.device,
                  bs: int = 256) -> np.ndarray:
    """P(pneumonia) for [0, 1] images (N, 1, S, S)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x01), bs):
            xb = finish(x01[i : i + bs].float(), equalized).to(device).contiguous(memory_format=torch.channels_last)
            out.append(torch.sigmoid(model(xb).float()).flatten().cpu())
    return torch.cat(out).numpy()


def battery_probs(model: torch.nn.Module, x01: torch.Tensor, equalized: bool, device: torch.device
                  ) -> dict[str, np.ndarray]:
    """P(pneumonia) of the clean images and of every perturbation in the battery."""
    out = {"clean": predict_probs(model, x01, equalized, device)}
    for name, fn in PERTURBATIONS.items():
        out[name] = predict_probs(model, torch.cat([fn(x01[i : i + 256].float()) for i in range(0, len(x01), 256)]),
                                  equalized, device)
    return out


def battery_auc(y: np.ndarray, probs: dict[str, np.ndarray]) -> float:
    """The checkpoint-selection figure: the mean over the battery (clean included) of the AUC, minus half
    the spread between the best and the worst condition (a model that breaks under one shift loses)."""
    from sklearn.metrics import roc_auc_score

    aucs = [roc_auc_score(y, p) for p in probs.values()]
    return float(np.mean(aucs) - 0.5 * (max(aucs) - min(aucs)))


def robust_threshold(y: np.ndarray, probs: dict[str, np.ndarray]) -> float:
    """Youden's J on the pooled predictions of the clean and every perturbed copy of the validation images.

    Youden's J weighs sensitivity and specificity equally, so the threshold does not depend on the
    validation split's prevalence (here 1 : 2.9); pooling the perturbed copies sets it where it separates
    the classes across acquisition changes, not only on the clean images."""
    from core.metrics import youden_threshold

    return youden_threshold(np.tile(y, len(probs)), np.concatenate(list(probs.values())))


def battery_report(y: np.ndarray, probs: dict[str, np.ndarray], threshold: float, seed: int = 0) -> dict:
    """Per condition: accuracy, sensitivity, specificity, AUC at ``threshold``; worst and mean over the
    perturbations; pooled figures with bootstrap CIs."""
    from core import metrics as M

    rows = {}
    for name, p in probs.items():
        m = M.classification_metrics(y, p, threshold)
        rows[name] = {k: m[k] for k in ("accuracy", "sensitivity", "specificity", "auc")}
    pert = [r for k, r in rows.items() if k != "clean"]
    pooled_y = np.tile(y, len(probs) - 1)
    pooled_p = np.concatenate([p for k, p in probs.items() if k != "clean"])
    pm = M.classification_metrics(pooled_y, pooled_p, threshold)
    return {
        "conditions": rows,
        "worst": {k: float(min(r[k] for r in pert)) for k in ("accuracy", "sensitivity", "specificity", "auc")},
        "mean": {k: float(np.mean([r[k] for r in pert])) for k in ("accuracy", "sensitivity", "specificity", "auc")},
        "pooled_perturbed": {**{k: pm[k] for k in M.CLASSIFICATION_METRICS},
                             "ci95": M.bootstrap_ci(pooled_y, pooled_p, threshold, n_boot=300, seed=seed)},
        "selection_score": battery_auc(y, probs),
    }


def series_of(path_name: str) -> str:
    """Acquisition series from a Kermany file name: NORMAL2-IM-*, IM-* (normal); bacteria / virus."""
    n = path_name.upper()
    if n.startswith("NORMAL2-"):
        return "normal, NORMAL2-IM series"
    if n.startswith("IM-"):
        return "normal, IM series"
    if "BACTERIA" in n:
        return "pneumonia, bacterial"
    if "VIRUS" in n:
        return "pneumonia, viral"
    return "other"


# --------------------------------------------------------------------------- training


def load_images01(cases: list, size: int) -> torch.Tensor:
    """(N, 1, size, size) float16 in [0, 1]: read, percentile-stretched and resized as the app does."""
    from tqdm.auto import tqdm

    from core import io as mio

    out = torch.empty(len(cases), 1, size, size, dtype=torch.float16)
    for i, c in enumerate(tqdm(cases, desc="read x-rays", leave=False, mininterval=2)):
        img = mio.read_image_2d(c.path.read_bytes(), c.path.name)
        out[i] = (pp.preprocess_xray(img.pixels, size) * 0.25 + 0.5).clamp(0, 1).half()
    return out


def perturbed_copies(x01: torch.Tensor) -> dict[str, torch.Tensor]:
    """The battery applied once to the validation images (float16), so each epoch only predicts."""
    return {name: torch.cat([fn(x01[i : i + 256].float()) for i in range(0, len(x01), 256)]).half()
            for name, fn in PERTURBATIONS.items()}


def train_pneumonia(root, cfg, device: torch.device, smoke: bool = False, out_dir=None) -> dict:
    """Train on ``chest_xray/train`` only (patient split), with acquisition augmentation and mixup; keep
    the epoch with the best shift-aware validation score; threshold from the pooled battery."""
    from torch import nn

    from core import io as mio
    from core.models import build_model
    from core.tasks import get_task
    from core.train import card_base, batches, classifier_report, fit, patient_split, save_trained, set_seed

    spec = get_task("pneumonia")
    equalized = bool(spec.input_spec.get("equalize", False))
    cases = [c for c in mio.find_xray_cases(root) if c.split == "train"]  # the official test split is not ours
    if smoke:
        rng = np.random.default_rng(cfg.seed)
        cases = [cases[i] for i in sorted(rng.choice(len(cases), size=min(96, len(cases)), replace=False))]
    labels = [c.label for c in cases]
    groups = [c.patient_id for c in cases]
    tr, va = patient_split(labels, groups, cfg.val_fraction, cfg.seed)
    x = load_images01(cases, spec.input_spec["size"])
    y = torch.tensor(labels, dtype=torch.float32)
    x_tr, y_tr, x_va, y_va = x[tr], y[tr], x[va], y[va]
    yv = y_va.numpy().astype(int)
    pert_va = perturbed_copies(x_va)
    n_pos = float(y_tr.sum())
    pos_weight = torch.tensor((len(y_tr) - n_pos) / max(n_pos, 1.0), device=device)
    set_seed(cfg.seed)
    model = build_model(spec.architecture, **spec.model_kwargs).to(device)
    mix_alpha = 0.3

    def train_batches(epoch: int):
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        for idx in batches(len(tr), cfg.batch_size, cfg.seed, epoch):
            xb = acquisition_augment(x_tr[idx].float(), rng)
            xb = finish(xb, equalized)
            yb = y_tr[idx].clone()
            if rng.random() < 0.5:  # mixup: soft targets between two radiographs
                lam = float(rng.beta(mix_alpha, mix_alpha))
                perm = torch.from_numpy(rng.permutation(len(idx)))
                xb = lam * xb + (1 - lam) * xb[perm]
                yb = lam * yb + (1 - lam) * yb[perm]
            yield xb.to(device).contiguous(memory_format=torch.channels_last), yb.to(device)

    def step(net: nn.Module, batch: tuple) -> tuple[torch.Tensor, float]:
        xb, yb = batch
        logit = net(xb).flatten().float()
        target = yb * 0.95 + 0.025  # label smoothing
        loss = F.binary_cross_entropy_with_logits(logit, target, pos_weight=pos_weight)
        return loss, float(((logit > 0).float() == (yb > 0.5).float()).float().mean())

    # per epoch the perturbed copies of a fixed third of the validation images (time), at the end all
    sub = np.sort(np.random.default_rng(cfg.seed).permutation(len(va))[: max(2, len(va) // 3)])

    def all_probs(net: nn.Module, idx: np.ndarray | None = None) -> dict[str, np.ndarray]:
        out = {"clean": predict_probs(net, x_va, equalized, device)}
        out.update({k: predict_probs(net, v if idx is None else v[idx], equalized, device) for k, v in pert_va.items()})
        return out

    def validate(net: nn.Module) -> dict:
        probs = all_probs(net, sub)
        loss = float(F.binary_cross_entropy(torch.from_numpy(probs["clean"]).clamp(1e-6, 1 - 1e-6), y_va))
        if len(np.unique(yv)) < 2 or len(np.unique(yv[sub])) < 2:
            return {"loss": loss, "shift_auc": float("nan")}
        probs_sub = {k: (v[sub] if k == "clean" else v) for k, v in probs.items()}
        return {"loss": loss, "shift_auc": battery_auc(yv[sub], probs_sub)}

    res = fit(model, train_batches, step, validate, cfg, "shift_auc", desc="pneumonia")
    for h in res.history:
        h["train_accuracy"] = h.pop("train_shift_auc")
    model.eval()
    probs = all_probs(model)
    two = len(np.unique(yv)) == 2
    thr = robust_threshold(yv, probs) if two else 0.5
    from core.metrics import youden_threshold

    thr_clean = youden_threshold(yv, probs["clean"]) if two else 0.5
    val_names = [cases[i].path.name for i in va]
    series = {}
    for s in sorted({series_of(n) for n in val_names}):
        sel = np.array([series_of(n) == s for n in val_names])
        p = probs["clean"][sel]
        pos = yv[sel] == 1
        series[s] = {"n": int(sel.sum()), "mean_probability": float(p.mean()),
                     "share_called_pneumonia": float((p >= thr).mean()),
                     "what": "sensitivity" if pos.all() else "1 - specificity"}
    card = card_base(spec, cfg, device, smoke)
    card["training"]["schedule"] = res.schedule
    card["training"]["monitor"] = "shift_auc"
    card.update({
        "threshold": thr,
        "threshold_rule": "Youden's J on the pooled predictions of the clean validation images and of their 11 "
                          "perturbed copies (the shift battery), halfway between the two probabilities it "
                          "separates: prevalence-free (sensitivity and specificity weigh equally) and set across "
                          "acquisition changes",
        "threshold_clean_youden": thr_clean,
        "class_weighting": f"BCE pos_weight = n_normal / n_pneumonia = {float(pos_weight):.3f}",
        "augmentation": "framing (zoom 0.8-1.25, aspect, rotation 10 deg, shift), tone (gamma 0.5-2, window, "
                        "contrast), blur, noise, JPEG quality 15-95, burnt-in text and borders; mixup (alpha 0.3, "
                        "half the batches); label smoothing 0.05",
        "intended_population": "frontal (PA/AP) chest radiographs of children aged about 1-5 years, as in the "
                               "Guangzhou Women and Children's Medical Center cohort of Kermany et al. 2018",
        "data": {
            "dataset": spec.dataset,
            "n_images": len(cases), "n_patients": len(set(groups)),
            "split": "chest_xray/train only; stratified by class, grouped by patient (file-name patient ID), seed "
                     f"{cfg.seed}: {len(tr)} train / {len(va)} validation images",
            "n_train": len(tr), "n_val": len(va),
            "n_train_patients": len({groups[i] for i in tr}), "n_val_patients": len({groups[i] for i in va}),
            "train_cases": [str(cases[i].path.relative_to(root)) for i in tr],
            "val_cases": [str(cases[i].path.relative_to(root)) for i in va],
        },
        "history": res.history, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
        "train_time_s": round(res.seconds, 1),
        "validation": classifier_report(yv, probs["clean"], thr, cfg.seed),
        "shift_validation": {
            "what": "the validation images under a fixed battery of 11 acquisition perturbations (tone, window, "
                    "blur, noise, JPEG, zoom, rotation, burnt-in marks); checkpoints were selected on its score",
            **(battery_report(yv, probs, thr, cfg.seed) if two else {}),
            "by_series": series,
        },
    })
    save_trained(model, card, spec.name, out_dir)
    return card


# --------------------------------------------------------------------------- population check

POPULATION_TASK = "pneumonia_population"  # weights/<this>.pt + .json beside the pneumonia model
OUTSIDE_DIR = "outside_population"
GATE_HELD_OUT_FRACTION = 0.3
GATE_REFUSAL_QUANTILE = 0.99  # of in-population validation scores (clean and perturbed): about 1 % refused


def outside_population_files(root) -> list[tuple[str, str, str]]:
    """(relative path, kind, source) of every image in ``outside_population`` (its MANIFEST.csv):
    kind "adult" (frontal adult radiograph) or "other" (CT slice, lateral view)."""
    import csv
    from pathlib import Path

    base = Path(root) / OUTSIDE_DIR
    man = base / "MANIFEST.csv"
    if not man.is_file():
        return []
    out = []
    with open(man, newline="") as f:
        for row in csv.DictReader(f):
            if (base / row["path"]).is_file():
                out.append((row["path"], "adult" if row["path"].startswith("adult_cxr") else "other",
                            row.get("source_repo", "")))
    return out


def outside_split(files: list[tuple[str, str, str]], seed: int = 0) -> tuple[list, list]:
    """(fit, held-out) lists: ``GATE_HELD_OUT_FRACTION`` of each (kind, source) group held out, seeded."""
    rng = np.random.default_rng(seed)
    groups: dict[tuple[str, str], list] = {}
    for f in files:
        groups.setdefault((f[1], f[2]), []).append(f)
    fit_, held = [], []
    for key in sorted(groups):
        g = sorted(groups[key])
        order = rng.permutation(len(g))
        n_held = int(round(len(g) * GATE_HELD_OUT_FRACTION)) if len(g) > 1 else 0
        held += [g[i] for i in order[:n_held]]
        fit_ += [g[i] for i in order[n_held:]]
    return fit_, held


def _read01(data: bytes, name: str, size: int) -> torch.Tensor:
    from core import io as mio

    img = mio.read_image_2d(data, name)
    return (pp.preprocess_xray(img.pixels, size) * 0.25 + 0.5).clamp(0, 1)


def mri_slices01(root, size: int, per_volume: int = 3, seed: int = 0) -> torch.Tensor:
    """Slices of the project's MRI datasets (ACDC cine frames, both atrium datasets) along random axes,
    as radiograph-sized [0, 1] images: examples of 'another modality' for the population check."""
    from core import io as mio

    rng = np.random.default_rng(seed)
    paths = []
    try:
        paths += [c.ed_path for c in mio.find_cardiac_cases(root)][::2]
    except Exception:  # noqa: BLE001 - a dataset that is absent simply contributes nothing
        pass
    try:
        paths += [c.image_path for c in mio.find_atrium_cases(root)][::3]
    except Exception:  # noqa: BLE001
        pass
    out = []
    for p in paths:
        v = mio.load_nifti_path(p).data
        for _ in range(per_volume):
            ax = int(rng.integers(3)) if min(v.shape) > 16 else 2
            k = int(rng.integers(v.shape[ax] // 4, max(v.shape[ax] // 4 + 1, 3 * v.shape[ax] // 4)))
            sl = np.take(v, k, axis=ax).astype(np.float32)
            sl = (sl - sl.min()) / max(float(sl.max() - sl.min()), 1e-6)
            out.append((pp.preprocess_xray(sl, size) * 0.25 + 0.5).clamp(0, 1))
    return torch.stack(out) if out else torch.empty(0, 1, size, size)


def synthetic_non_radiographs(n: int, size: int, seed: int = 0) -> torch.Tensor:
    """Noise, smooth gradients, and screenshot-like blocks with text: (n, 1, size, size) in [0, 1]."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        kind = i % 3
        if kind == 0:
            a = rng.random((size, size)).astype(np.float32)
            if rng.random() < 0.5:
                a = F.avg_pool2d(torch.from_numpy(a)[None, None], 5, 1, 2)[0, 0].numpy()
        elif kind == 1:
            yy, xx = np.mgrid[0:size, 0:size] / size
            a = (rng.uniform(-1, 1) * xx + rng.uniform(-1, 1) * yy + rng.uniform(-1, 1) * xx * yy).astype(np.float32)
        else:
            im = Image.new("L", (size, size), int(rng.integers(0, 256)))
            d = ImageDraw.Draw(im)
            for _ in range(int(rng.integers(3, 12))):
                x0, y0 = (int(v) for v in rng.integers(0, size, 2))
                d.rectangle([x0, y0, x0 + int(rng.integers(5, 60)), y0 + int(rng.integers(5, 40))],
                            fill=int(rng.integers(0, 256)))
                d.text((int(rng.integers(0, size - 30)), int(rng.integers(0, size - 10))), "Report 12", fill=int(
                    rng.integers(0, 256)))
            a = np.asarray(im, dtype=np.float32) / 255
        a = (a - a.min()) / max(float(a.max() - a.min()), 1e-6)
        out.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))[None])
    return torch.stack(out)


def gate_score(model: torch.nn.Module, x01: torch.Tensor, bs: int = 256) -> np.ndarray:
    """P(outside the population) for [0, 1] images (N, 1, S, S)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(x01), bs):
            out.append(torch.sigmoid(model(finish(x01[i : i + bs].float(), False)).float()).flatten())
    return torch.cat(out).numpy()


GATE_BASE = 16
GATE_EPOCHS = 8


def train_population_gate(root, device: torch.device, pneumonia_card: dict, smoke: bool = False, out_dir=None,
                          seed: int = 0, epochs: int = GATE_EPOCHS) -> dict:
    """A small CNN that tells the model's population (the pneumonia model's training images) from
    images outside it (adult radiographs, lateral views and CT slices from ``outside_population``, MRI
    slices of the project's other datasets, synthetic non-images). Both sides get the same acquisition
    augmentation, so marks, compression and tone are not what separates them. The refusal threshold is
    the 99th percentile of the in-population validation images' scores (clean and perturbed); held-out
    outside images measure what it catches."""
    from pathlib import Path

    from core import io as mio
    from core.checkpoint import save_checkpoint
    from core.models import build_model
    from core.precision import autocast_for
    from core.train import card_base, set_seed, task_config
    from core.tasks import get_task

    spec = get_task("pneumonia")
    size = int(pneumonia_card["input_spec"]["size"])
    root = Path(root)
    val_set = set(pneumonia_card["data"]["val_cases"])
    cases = [c for c in mio.find_xray_cases(root) if c.split == "train"]
    in_tr = [c for c in cases if str(c.path.relative_to(root)) not in val_set]
    in_va = [c for c in cases if str(c.path.relative_to(root)) in val_set]
    if smoke:
        in_tr, in_va = in_tr[:128], in_va[:48]
    files = outside_population_files(root)
    fit_files, held_files = outside_split(files, seed)
    x_in = load_images01(in_tr, size).float()
    x_in_va = load_images01(in_va, size).float()
    x_out_real = torch.stack([_read01((root / OUTSIDE_DIR / p).read_bytes(), p, size) for p, _, _ in fit_files]) \
        if fit_files else torch.empty(0, 1, size, size)
    x_mri = mri_slices01(root, size, per_volume=1 if smoke else 3, seed=seed)
    x_syn = synthetic_non_radiographs(30 if smoke else 300, size, seed)
    x_out = torch.cat([x_out_real, x_mri, x_syn])
    # real outside images are few: each is seen as often as 8 synthetic/MRI ones
    w_out = torch.cat([torch.full((len(x_out_real),), 8.0), torch.ones(len(x_mri) + len(x_syn))])
    set_seed(seed)
    # base 16: channel counts in multiples of 16 are what the CPU's bf16 (AMX) kernels run fast
    model = build_model("SmallCNN", in_channels=1, base=GATE_BASE, n_blocks=4, dropout=0.3).to(device)
    model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps_per_epoch = max(1, len(x_in) // 64)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=epochs * steps_per_epoch)
    rng = np.random.default_rng(seed)
    import time

    t0 = time.time()
    for _ in range(epochs):
        model.train()
        for _ in range(steps_per_epoch):
            ii = torch.from_numpy(rng.integers(0, len(x_in), 48))
            oo = torch.multinomial(w_out, 16, replacement=True, generator=torch.Generator().manual_seed(
                int(rng.integers(1 << 30))))
            xb = acquisition_augment(torch.cat([x_in[ii], x_out[oo]]), rng)
            yb = torch.cat([torch.zeros(48), torch.ones(16)])
            with autocast_for(device, True):
                logit = model(finish(xb, False).to(device).contiguous(memory_format=torch.channels_last)).flatten().float()
            # the two sides weigh equally in the loss
            loss = F.binary_cross_entropy_with_logits(logit, yb.to(device), pos_weight=torch.tensor(3.0, device=device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    va_clean = gate_score(model, x_in_va)
    va_pert = np.concatenate([gate_score(model, fn(x_in_va)) for fn in PERTURBATIONS.values()])
    thr = float(np.quantile(np.concatenate([va_clean, va_pert]), GATE_REFUSAL_QUANTILE))
    held = {}
    for p, kind, src in held_files:
        s = float(gate_score(model, _read01((root / OUTSIDE_DIR / p).read_bytes(), p, size)[None])[0])
        held[p] = {"kind": kind, "source": src, "score": s, "refused": s > thr}
    rates = {k: float(np.mean([h["refused"] for h in held.values() if h["kind"] == k]))
             for k in ("adult", "other") if any(h["kind"] == k for h in held.values())}
    cfg = task_config("pneumonia", smoke, seed)
    card = card_base(spec, cfg, device, smoke)
    card.update({
        "task": POPULATION_TASK,
        "title": "Pneumonia population check (frontal radiographs of young children)",
        "architecture": {"name": "SmallCNN", "kwargs": {"in_channels": 1, "base": GATE_BASE, "n_blocks": 4, "dropout": 0.3}},
        "input_spec": {"size": size, "equalize": False, "intensity": "0.5-99.5 percentile min-max, then (x-0.5)/0.25"},
        "classes": ["in population", "outside population"],
        "threshold": thr,
        "threshold_rule": f"the {GATE_REFUSAL_QUANTILE:.0%} quantile of the scores of the pneumonia model's "
                          "validation images, clean and under the 11 perturbations",
        "training": {"epochs": epochs, "steps_per_epoch": steps_per_epoch, "batch": "48 in-population + 16 outside",
                     "optimizer": "Adam, one-cycle LR 2e-3", "augmentation": "acquisition_augment on both sides",
                     "seconds": round(time.time() - t0, 1)},
        "data": {
            "in_population": f"{len(in_tr)} training images of the pneumonia model (chest_xray/train, its patient "
                             f"split); {len(in_va)} of its validation images for the threshold",
            "outside_fit": [p for p, _, _ in fit_files],
            "outside_held_out": [p for p, _, _ in held_files],
            "n_mri_slices": len(x_mri), "n_synthetic": len(x_syn),
        },
        "validation": {
            "in_population_refusal_clean": float((va_clean > thr).mean()),
            "in_population_refusal_perturbed": float((va_pert > thr).mean()),
            "held_out_refusal_rate": rates,
            "held_out_n": {k: sum(h["kind"] == k for h in held.values()) for k in ("adult", "other")},
            "held_out": held,
            "note": "the held-out outside images come from the same few sources as the fitted ones (see "
                    "outside_population/README.md): these rates are optimistic for other hospitals",
        },
    })
    save_checkpoint(model.state_dict(), card, POPULATION_TASK, out_dir)
    return card


# --------------------------------------------------------------------------- calibration

CALIBRATION_FILE = "pneumonia.calibration.json"


# the binary calibration maps are shared engine code (core.calibration); re-exported for this task's callers
from core.calibration import (  # noqa: E402,F401
    apply_platt,
    apply_temperature,
    binary_ece,
    binary_platt,
    binary_temperature,
)
from core.calibration import cross_fitted  # noqa: E402


def calibrate(root, wdir=None, seed: int = 0) -> dict:
    """Reliability of P(pneumonia) on the card's validation images (clean and the pooled battery), and a
    temperature fitted on them; figures after calibration are cross-fitted (two halves by patient order,
    each calibrated with the other's temperature). Writes <weights>/pneumonia.calibration.json."""
    from pathlib import Path

    from core import io as mio
    from core.checkpoint import write_json

    lm = load_base("pneumonia", wdir)
    root = Path(root)
    val = lm.card["data"]["val_cases"]
    cases = {str(c.path.relative_to(root)): c for c in mio.find_xray_cases(root)}
    sel = [cases[v] for v in val if v in cases]
    x01 = load_images01(sel, lm.input_size)
    y = np.array([c.label for c in sel])
    probs = {"clean": predict_probs(lm.model, x01, lm.equalize, torch.device("cpu"))}
    for name, fn in PERTURBATIONS.items():
        probs[name] = predict_probs(lm.model, torch.cat([fn(x01[i: i + 256].float()) for i in range(0, len(x01), 256)]),
                                    lm.equalize, torch.device("cpu"))
    yy = np.tile(y, len(probs))
    pp_ = np.concatenate(list(probs.values()))
    # temperature vs Platt, each cross-fitted on two halves by patient order; the lower log-loss wins
    cal = cross_fitted(yy, pp_, np.tile(np.arange(len(y)) % 2, len(probs)))
    t, method, compared, cross = cal["temperature"], cal["method"], cal["compared"], cal["cross_fitted"]
    slope, intercept = cal["slope"], cal["intercept"]

    def curve(p: np.ndarray) -> list[dict]:
        edges = np.linspace(0, 1, 11)
        idx = np.clip(np.digitize(p, edges[1:-1]), 0, 9)
        return [{"bin": [float(edges[b]), float(edges[b + 1])], "n": int((idx == b).sum()),
                 "mean_probability": float(p[idx == b].mean()), "observed_rate": float(yy[idx == b].mean())}
                for b in range(10) if (idx == b).any()]

    thr_c = float(apply_platt(lm.threshold, slope, intercept))
    clean_c = apply_platt(probs["clean"], slope, intercept)
    bands = [verdict_band(float(q), thr_c, calibrated=True) for q in clean_c]
    refer = {"share_of_validation_images": float(np.mean([b == "uncertain" for b in bands])),
             "accuracy_of_the_rest": float(np.mean([(b == "positive") == bool(yi) for b, yi in zip(bands, y)
                                                    if b != "uncertain"])),
             "threshold_calibrated": thr_c}
    rep = {"task": "pneumonia", "weights_sha256": lm.card.get("weights_sha256"), "temperature": t,
           "refer_band_clean_validation": refer,
           "method": method, "slope": slope, "intercept": intercept, "compared": compared,
           "log_loss_before": cal["log_loss_before"],
           "what": "validation images, clean and under the 11 perturbations, pooled",
           "n": int(len(yy)), "ece_before": binary_ece(yy, pp_), "ece_after_cross_fitted": binary_ece(yy, cross),
           "ece_before_clean_only": binary_ece(y, probs["clean"]),
           "reliability_before": curve(pp_), "reliability_after": curve(cross)}
    write_json(weights_dir(wdir) / CALIBRATION_FILE, rep)
    return rep


# --------------------------------------------------------------------------- prediction (the app's path)


def load_population(wdir=None) -> tuple[nn.Module, dict]:
    """The population check (``pneumonia_population.pt`` + card), checksum-verified, eval mode."""
    state, card = load_state_dict(POPULATION_TASK, wdir)
    net = build_model(card["architecture"]["name"], **card["architecture"]["kwargs"])
    net.load_state_dict(state)
    net.eval()
    return net, card


def with_calibration(card: dict, wdir=None) -> dict:
    """The card with ``calibration`` = (slope, intercept, method) from CALIBRATION_FILE when that file was
    fitted on these very weights; the card unchanged otherwise."""
    cal = weights_dir(wdir) / CALIBRATION_FILE
    if not cal.is_file():
        return card
    c = json.loads(cal.read_text())
    if c.get("weights_sha256") != card.get("weights_sha256"):
        return card
    # sigmoid(slope * logit(p) + intercept); older files hold a temperature only
    slope = float(c["slope"]) if "slope" in c else 1 / float(c["temperature"])
    return {**card, "calibration": (slope, float(c.get("intercept", 0.0)), c.get("method", "temperature"))}


def population_score(lm: LoadedModel, x01: torch.Tensor) -> np.ndarray:
    """P(outside the population) for [0, 1] images (N, 1, S, S); zeros without a population check."""
    if lm.population is None:
        return np.zeros(len(x01))
    net, _ = lm.population
    with model_lock(net):
        return gate_score(net, x01)


@dataclass
class XRayResult:
    probability: float | None  # P(pneumonia); None when withheld
    threshold: float
    positive: bool | None
    display: np.ndarray  # (H, W) in [0, 1], the image as the model saw it (stretched to a square)
    heatmap: np.ndarray | None  # (H, W) in [0, 1] on the same grid as ``display``
    ood_score: float = 0.0
    withheld: str | None = None  # why no diagnosis is given, in words for the user
    population_score: float = 0.0  # P(outside the model's population) from the population check
    calibrated: bool = False  # probability and threshold are on the calibrated scale (see calibrate)


WITHHELD_XRAY = ("This image does not look like the frontal chest radiographs the model was trained on, so no "
                 "diagnosis is given. Check that it is a frontal chest X-ray.")
WITHHELD_POPULATION = ("This image does not look like a frontal chest radiograph of a young child (about 1-5 years), "
                       "the only population the model was trained and validated on; it may be an adult's radiograph, "
                       "a lateral view, another body part or modality. No diagnosis is given.")


def xray_inputs(lm: LoadedModel, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) radiograph -> ([0, 1] image for display and the population check, model input), each (1, 1, S, S)."""
    x01 = (pp.preprocess_xray(pixels, lm.input_size) * 0.25 + 0.5).clamp(0, 1)[None]
    return x01, pp.preprocess_xray(pixels, lm.input_size, lm.equalize)[None]


def predict_xray(lm: LoadedModel, image: Image2D, explain: bool = True) -> XRayResult:
    """P(pneumonia) for one radiograph, the decision at the card's threshold, and Grad-CAM.

    The diagnosis is withheld (``withheld`` set, probability None) for colour images and for inputs
    whose encoder features lie outside the training distribution.
    """
    x01, x = xray_inputs(lm, image.pixels)
    display = x01[0, 0].numpy()
    score = ood_score(lm, x)
    if image.colour:
        return XRayResult(None, lm.threshold, None, display, None, score,
                          "This is a colour image; chest radiographs are grey-scale, so no diagnosis is given.")
    if lm.guard is not None and score > lm.guard.threshold:
        return XRayResult(None, lm.threshold, None, display, None, score, WITHHELD_XRAY)
    pop = float(population_score(lm, x01)[0])
    if lm.population is not None and pop > float(lm.population[1]["threshold"]):
        return XRayResult(None, lm.threshold, None, display, None, score, WITHHELD_POPULATION, pop)
    prob = float(probabilities(lm, x)[0])
    positive = prob >= lm.threshold
    heat = xray_gradcam(lm, x, positive) if explain else None
    cal = lm.card.get("calibration")
    if cal:  # shown calibrated; the decision above is the same at the mapped threshold (the map is monotone)
        a, b, _ = cal
        return XRayResult(float(apply_platt(prob, a, b)), float(apply_platt(lm.threshold, a, b)), positive,
                          display, heat, score, None, pop, calibrated=True)
    return XRayResult(prob, lm.threshold, positive, display, heat, score, None, pop)


def xray_gradcam(lm: LoadedModel, x: torch.Tensor, positive: bool) -> np.ndarray:
    """Grad-CAM (H, W) in [0, 1] of the model input x (1, 1, S, S) for the decision ``positive``."""
    heat = gradcam(lm.model, lm.model.gradcam_layer(), x, positive=positive)
    release_memory()
    return heat


def xray_heatmap(lm: LoadedModel, image: Image2D, positive: bool) -> np.ndarray:
    """The Grad-CAM map (H, W) in [0, 1], on the model's square input, for the decision ``positive`` of a
    result predicted with ``explain=False`` (so that a page can show the verdict before the map)."""
    return xray_gradcam(lm, xray_inputs(lm, image.pixels)[1], positive)


def predict_xray_batch(lm: LoadedModel, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(P(pneumonia), input-check refusal flags) for several (H, W) images, without Grad-CAM or withholding."""
    x01 = torch.stack([(pp.preprocess_xray(p, lm.input_size) * 0.25 + 0.5).clamp(0, 1) for p in pixels])
    x = pp.equalize_histogram(x01) if lm.equalize else x01
    x = (x - 0.5) / 0.25
    out = refused(lm, x)
    if lm.population is not None:
        out = out | (population_score(lm, x01) > float(lm.population[1]["threshold"]))
    return probabilities(lm, x), out


def main(argv: list[str] | None = None) -> int:
    """``python -m core.pneumonia population``: fit the population check beside the pneumonia weights."""
    import argparse
    import json
    import sys

    from core.checkpoint import read_card
    from core.config import data_root
    from core.train import pick_device

    ap = argparse.ArgumentParser(prog="python -m core.pneumonia")
    ap.add_argument("what", choices=["population", "calibration"])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--weights", default=None)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "calibration":
        rep = calibrate(data_root(args.data_root), args.weights)
        print(json.dumps({k: rep[k] for k in ("temperature", "ece_before", "ece_after_cross_fitted", "n")}, indent=1))
        return 0
    card = train_population_gate(data_root(args.data_root), pick_device(None), read_card("pneumonia", args.weights),
                                 smoke=args.smoke, out_dir=args.weights)
    v = card["validation"]
    print(json.dumps({k: v[k] for k in v if k != "held_out"}, indent=1), file=sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
