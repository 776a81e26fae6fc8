"""Out-of-distribution guard: is an input like what the model was trained on?

Features from the model's own encoder are compared with those of the training cases: a Mahalanobis
distance in the top principal components plus the residual energy outside them, each scaled to
about 1 on training data. An input scoring above the threshold (a fixed multiple of a high training
quantile, set on training cases only) gets no diagnosis.

    python -m core.ood --task {pneumonia,cardiac} [--data-root DIR] [--weights DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.checkpoint import _atomic_write, _clean
from core.config import data_root, weights_dir
from core.errors import MissingWeightsError
from core.concurrency import model_lock
from core.runtime import LoadedModel, load_base

QUANTILE = 0.995
MARGIN = 1.2  # fixed a priori, not tuned on validation or OOD data
CARDIAC_AUGMENTED_COPIES = 4


def encoder_features(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) model input -> (N, D): mean and standard deviation of every encoder block's
    activations. Early blocks carry texture statistics, which tell an MRI slice or noise from a
    radiograph far better than the last block alone."""
    outs = []
    with torch.inference_mode():
        if hasattr(model, "unet"):  # CardiacNet: the U-Net encoder, run on each slice
            n, s = x.shape[:2]
            h = x.reshape(n * s, 1, *x.shape[2:])
            for block in model.unet.down:
                h = block(h)
                outs.append(h)
                h = model.unet.pool(h)
            outs.append(model.unet.bottleneck(h))
            # per-slice statistics, averaged over the slices of each study
            return torch.cat([torch.cat([o.mean(dim=(2, 3)), o.std(dim=(2, 3))], dim=1).view(n, s, -1).mean(1)
                              for o in outs], dim=1)
        else:  # SmallCNN
            h = x
            for layer in model.features:
                h = layer(h)
                if isinstance(layer, nn.Sequential):
                    outs.append(h)
    return torch.cat([torch.cat([o.mean(dim=(2, 3)), o.std(dim=(2, 3))], dim=1) for o in outs], dim=1)


@dataclass
class OODGuard:
    mean: np.ndarray
    components: np.ndarray  # (k, D)
    variances: np.ndarray  # (k,)
    resid_scale: float
    threshold: float

    def score(self, feats: np.ndarray) -> np.ndarray:
        """(N, D) -> (N,) scores, ~1 on training data."""
        d = np.atleast_2d(feats) - self.mean
        z = d @ self.components.T
        maha = (z**2 / self.variances).mean(axis=1)
        resid = ((d - z @ self.components) ** 2).sum(axis=1) / self.resid_scale
        return 0.5 * (maha + resid)

    def to_json(self) -> dict:
        return {"mean": self.mean.tolist(), "components": self.components.tolist(),
                "variances": self.variances.tolist(), "resid_scale": self.resid_scale, "threshold": self.threshold}

    @classmethod
    def from_json(cls, d: dict) -> OODGuard:
        return cls(np.asarray(d["mean"]), np.asarray(d["components"]), np.asarray(d["variances"]),
                   float(d["resid_scale"]), float(d["threshold"]))


def fit_guard(feats: np.ndarray, k: int = 32, groups: np.ndarray | None = None,
              scored: np.ndarray | None = None) -> tuple[OODGuard, np.ndarray]:
    """Fit on (N, D) training features; returns the guard and the training scores.

    ``groups`` (N,) keeps the rows of one case (e.g. its augmented copies) in one held-out fold;
    ``scored`` (N,) bool marks the rows whose held-out scores set the threshold (default: all).
    """
    g = fit_guard_core(feats, k)
    scores = g.score(feats)
    groups = np.arange(len(feats)) if groups is None else np.asarray(groups)
    scored = np.ones(len(feats), bool) if scored is None else np.asarray(scored, bool)
    uniq = np.unique(groups)
    if len(uniq) < 500:
        # Few cases: in-sample scores are optimistic, so the threshold comes from 5-fold held-out
        # scores of the training cases themselves.
        rng = np.random.default_rng(0)
        held = []
        for fold in np.array_split(rng.permutation(uniq), 5):
            out = np.isin(groups, fold)
            held.append(fit_guard_core(feats[~out], k).score(feats[out & scored]))
        g.threshold = float(np.quantile(np.concatenate(held), QUANTILE) * MARGIN)
    else:
        g.threshold = float(np.quantile(scores[scored], QUANTILE) * MARGIN)
    return g, scores[scored]


def fit_guard_core(feats: np.ndarray, k: int) -> OODGuard:
    """The guard's statistics without a threshold (used for held-out scoring)."""
    mean = feats.mean(axis=0)
    d = feats - mean
    k = int(min(k, len(feats) // 3, feats.shape[1]))
    _, s, vt = np.linalg.svd(d, full_matrices=False)
    comps = vt[:k]
    var = np.maximum((s[:k] ** 2) / max(1, len(feats) - 1), 1e-8)
    resid = ((d - (d @ comps.T) @ comps) ** 2).sum(axis=1)
    return OODGuard(mean, comps, var, float(max(resid.mean(), 1e-8)), 0.0)


def guard_path(task: str, wdir=None) -> Path:
    return weights_dir(wdir) / f"{task}.ood.json"


def guard_scores(lm: LoadedModel, x: torch.Tensor) -> np.ndarray:
    """(N,) out-of-distribution scores of the model inputs x (N, C, H, W) (above lm.guard.threshold:
    withhold); zeros without a guard."""
    if lm.guard is None:
        return np.zeros(len(x))
    with model_lock(lm.model):
        f = encoder_features(lm.model, x).numpy().astype(np.float64)
    return lm.guard.score(f)


def ood_score(lm: LoadedModel, x: torch.Tensor) -> float:
    """The score of one model input (1, C, H, W); 0 without a guard."""
    return float(guard_scores(lm, x)[0])


def refused(lm: LoadedModel, x: torch.Tensor) -> np.ndarray:
    """(N,) bool: which of the model inputs x (N, C, H, W) the guard refuses (none without a guard)."""
    return guard_scores(lm, x) > lm.guard.threshold if lm.guard is not None else np.zeros(len(x), bool)


def load_guard(task: str, wdir=None) -> OODGuard:
    p = guard_path(task, wdir)
    if not p.is_file():
        raise MissingWeightsError(f"The {task} input check {p} is missing; create it with "
                                  f"`python -m core.ood --task {task}`.")
    return OODGuard.from_json(json.loads(p.read_text())["guard"])


def _training_inputs(task: str, root: Path, card: dict) -> tuple[list, list]:
    """Model inputs of the training and the validation cases of the committed model's split."""
    from core import io as mio
    from core import preprocess as pp

    val = set(card["data"]["val_cases"])
    listed = card["data"].get("train_cases")
    trn = set(listed) if listed is not None else None  # older cards: every case not in validation
    train, valid = [], []

    def side(key: str) -> list | None:
        if key in val:
            return valid
        return train if trn is None or key in trn else None

    if task == "pneumonia":
        for c in mio.find_xray_cases(root):
            if c.split != "train":
                continue  # only the training split's images are the model's; test images stay unseen
            dest = side(str(c.path.relative_to(root)))
            if dest is not None:
                img = mio.read_image_2d(c.path.read_bytes(), c.path.name)
                dest.append(pp.preprocess_xray(img.pixels, card["input_spec"]["size"],
                                               bool(card["input_spec"].get("equalize", False))))
    else:
        for c in mio.find_cardiac_cases(root):
            dest = side(c.patient_id)
            if dest is not None:
                dest.append(pp.preprocess_cardiac(mio.load_nifti_path(c.ed_path).data,
                                                  mio.load_nifti_path(c.es_path).data, card["input_spec"]["size"]))
    return train, valid


def build_guard(task: str, root=None, wdir=None) -> dict:
    """Fit the guard on the committed model's training cases; measure false refusals on its validation cases."""
    lm = load_base(task, wdir, optimize=False)
    root = data_root(root)
    train, valid = _training_inputs(task, root, lm.card)

    def feats(xs: list) -> np.ndarray:
        out = [encoder_features(lm.model, torch.stack(xs[i : i + 64])) for i in range(0, len(xs), 64)]
        return torch.cat(out).numpy().astype(np.float64)

    n_cases = len(train)
    groups = np.arange(n_cases)
    if task == "cardiac":
        # 63 studies are few: the guard also learns from the variation the model was trained to accept
        # (the training augmentations: rotation, scale, shift, intensity), 4 copies per study.
        from core.train import intensity_jitter, random_affine

        torch.manual_seed(0)
        x = torch.stack(train)
        copies = [intensity_jitter(random_affine(x, None, rot_deg=15, scale=0.15, shift=0.05)[0])
                  for _ in range(CARDIAC_AUGMENTED_COPIES)]
        train = train + [c for a in copies for c in a]
        groups = np.tile(groups, CARDIAC_AUGMENTED_COPIES + 1)
    scored = np.arange(len(train)) < n_cases  # thresholds come from the real studies, not their copies
    guard, train_scores = fit_guard(feats(train), k=32 if task == "pneumonia" else 8, groups=groups, scored=scored)
    val_scores = guard.score(feats(valid))
    report = {
        "task": task,
        "method": f"PCA-Mahalanobis + residual on per-block mean/std of encoder activations; threshold = {MARGIN} x the "
                  f"{QUANTILE:.1%} quantile of training-case scores (5-fold held-out scores below 500 cases)"
                  + (f"; fitted on the training studies plus {CARDIAC_AUGMENTED_COPIES} augmented copies of each "
                     "(training augmentations), 8 principal components" if task == "cardiac" else ""),
        "n_fit": int(scored.sum()), "n_fit_rows_with_augmented_copies": len(train), "n_val": len(valid),
        "val_false_refusal_rate": float((val_scores > guard.threshold).mean()),
        "train_refusal_rate": float((train_scores > guard.threshold).mean()),
        "guard": guard.to_json(),
    }
    _atomic_write(guard_path(task, wdir), (json.dumps(_clean(report)) + "\n").encode())
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.ood", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", required=True, choices=["pneumonia", "cardiac"])
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--weights", default=None)
    args = ap.parse_args(argv)
    rep = build_guard(args.task, args.data_root, args.weights)
    print(json.dumps({k: v for k, v in rep.items() if k != "guard"}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
