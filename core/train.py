"""One training loop for all tasks, plus the per-task data preparation around it.

``fit`` is task-agnostic: seeded, validation each epoch, best checkpoint by a named validation
metric, early stopping, per-epoch history of loss and metric on train and validation.
"""
from __future__ import annotations

import logging
import math
import platform
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.model_selection import StratifiedGroupKFold
from torch import nn
from tqdm.auto import tqdm

from core import io as mio
from core import metrics as M
from core import preprocess as pp
from core.checkpoint import git_commit, save_checkpoint
from core.precision import autocast_for, native_bf16
from core.models import build_model
from core.tasks import TaskSpec, get_task

log = logging.getLogger("medimg.train")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run."""

    epochs: int
    batch_size: int
    lr: float = 1e-3
    patience: int = 10
    seed: int = 0
    weight_decay: float = 1e-4
    val_fraction: float = 0.2
    mixed_precision: bool = True  # bfloat16 autocast where the device runs it natively (see autocast_for)
    crop: int | None = None  # segmentation: side of the square training crops; None = whole slices
    ema: float | None = None  # decay of an exponential moving average of the weights, validated and kept
    spacing_mm: float | None = None  # segmentation: in-plane grid (mm) to train at; None = the registry's
    samples_per_epoch: int | None = None  # sampled training crops per epoch (atrium); None = every slice once

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.patience < 1:
            raise ValueError("epochs, batch_size and patience must be >= 1")
        if not (0 < self.lr < 1):
            raise ValueError(f"lr must be in (0, 1), got {self.lr}")
        if self.crop is not None and (self.crop < 16 or self.crop % 16):
            raise ValueError(f"crop must be a multiple of 16 (the U-Net's), got {self.crop}")
        if self.ema is not None and not (0 < self.ema < 1):
            raise ValueError(f"ema must be a decay in (0, 1), got {self.ema}")
        lo, hi = pp.ATRIUM_GRID_RANGE_MM
        if self.spacing_mm is not None and not (lo <= self.spacing_mm <= hi):
            raise ValueError(f"spacing_mm must be {lo}-{hi} mm, got {self.spacing_mm}")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(name: str | None = None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def precision_label(device: torch.device, cfg: TrainConfig) -> str:
    if cfg.mixed_precision and native_bf16(device):
        return "bfloat16 autocast (float32 weights), channels-last"
    return "float32, channels-last"


# --------------------------------------------------------------------------- distributed (torchrun)


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) unless running under torchrun with a process group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def state_sha256(state: dict) -> str:
    """sha256 of a state dict as torch.save writes it (what the card records)."""
    from core.checkpoint import sha256_bytes, state_bytes

    return sha256_bytes(state_bytes(state))


def save_trained(model: nn.Module, card: dict, task: str, out_dir: Path | None) -> None:
    """Save weights + card; under DDP every rank reports its weights' checksum and rank 0 writes."""
    import torch.distributed as dist

    rank, world = dist_info()
    state = model.state_dict()
    if world > 1:
        shas: list = [None] * world
        dist.all_gather_object(shas, state_sha256(state))
        card = {**card, "ddp": {"world_size": world, "backend": dist.get_backend(), "rank_weights_sha256": shas}}
    if rank == 0:
        save_checkpoint(state, card, task, out_dir)
    if world > 1:
        dist.barrier()


# --------------------------------------------------------------------------- the loop


@dataclass
class FitResult:
    best_state: dict
    history: list[dict]
    best_epoch: int
    best_value: float
    epochs_run: int
    seconds: float


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterator[tuple]],
    step: Callable[[nn.Module, tuple], tuple[torch.Tensor, float]],
    validate: Callable[[nn.Module], dict[str, float]],
    cfg: TrainConfig,
    monitor: str,
    desc: str = "train",
    keep_last: bool = False,
) -> FitResult:
    """Train with Adam, validating every epoch and keeping the state with the best ``monitor``.

    train_batches(epoch) yields batches; step(model, batch) returns (loss, batch metric);
    validate(model) returns a dict with "loss" and ``monitor``. With ``cfg.ema`` the model validated
    and kept is an exponential moving average of the weights (and batch-norm statistics) after each
    step: it is less noisy from epoch to epoch than the raw weights, so the kept epoch is less of a
    lucky draw on a small validation set. With ``keep_last`` (training on every case, nothing left to
    validate on) the last epoch's state is kept and returned.
    """
    set_seed(cfg.seed)
    plain = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN) and GPU
    device = next(plain.parameters()).device
    if dist_info()[1] > 1:  # DistributedDataParallel: gradients are averaged across processes
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(plain, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=cfg.lr * 0.02)
    ema = None
    if cfg.ema:
        from torch.optim.swa_utils import AveragedModel

        ema = AveragedModel(plain, multi_avg_fn=ema_update(cfg.ema), use_buffers=True)
    kept = ema.module if ema is not None else plain  # what is validated, kept and returned
    best_value, best_epoch, best_state = -math.inf, 0, _contiguous_state(kept)
    history: list[dict] = []
    t0 = time.time()
    bar = tqdm(range(1, cfg.epochs + 1), desc=desc, leave=False, mininterval=2)
    for epoch in bar:
        model.train()
        losses, mets, weights = [], [], []
        for batch in train_batches(epoch):
            opt.zero_grad(set_to_none=True)
            with autocast_for(device, cfg.mixed_precision):
                loss, met = step(model, batch)
            loss.backward()
            opt.step()
            if ema is not None:
                ema.update_parameters(plain)
            n = len(batch[0])
            losses.append(float(loss.detach()) * n)
            mets.append(met * n)
            weights.append(n)
        sched.step()
        if dist_info()[1] > 1:
            # batch-norm statistics were updated on each process's own batches: take rank 0's everywhere
            import torch.distributed as dist

            for buf in list(plain.buffers()) + (list(kept.buffers()) if ema is not None else []):
                dist.broadcast(buf, 0)
        model.eval()
        kept.eval()
        with torch.no_grad(), autocast_for(device, cfg.mixed_precision):
            val = validate(kept)  # every process validates the same cases, so all keep the same best
        rec = {
            "epoch": epoch,
            "train_loss": sum(losses) / max(1, sum(weights)),
            f"train_{monitor}": sum(mets) / max(1, sum(weights)),
            "val_loss": val["loss"],
            f"val_{monitor}": val[monitor],
            "lr": opt.param_groups[0]["lr"],
            "seconds": round(time.time() - t0, 1),
        }
        history.append(rec)
        value = val[monitor] if np.isfinite(val[monitor]) else -math.inf
        if value > best_value or keep_last:
            best_value, best_epoch = value, epoch
            best_state = _contiguous_state(kept)
        bar.set_postfix(loss=f"{rec['train_loss']:.3f}", val=f"{val[monitor]:.3f}", best=f"{best_value:.3f}")
        log.info("%s epoch %d: train_loss %.4f train_%s %.4f val_loss %.4f val_%s %.4f", desc, epoch,
                 rec["train_loss"], monitor, rec[f"train_{monitor}"], val["loss"], monitor, val[monitor])
        if epoch - best_epoch >= cfg.patience:
            log.info("%s: early stop at epoch %d (best %d)", desc, epoch, best_epoch)
            break
    plain.to(memory_format=torch.contiguous_format)  # saved weights and later inference use the plain layout
    plain.load_state_dict(best_state)
    return FitResult(best_state, history, best_epoch, best_value, len(history), time.time() - t0)


def ema_decay(decay: float, n_averaged: int) -> float:
    """Decay of the weight average at update ``n_averaged`` + 1, warmed up as min(decay, (1+n)/(10+n)):
    early on the average follows the weights closely. Without the warm-up, a short run's average keeps
    a large share of the first, random, weights (0.998^1000 = 0.14), and averaging weights that far apart
    gives a network that segments nothing."""
    return min(decay, (1 + n_averaged) / (10 + n_averaged))


def ema_update(decay: float) -> Callable[[list, list, torch.Tensor], None]:
    """``multi_avg_fn`` for ``torch.optim.swa_utils.AveragedModel``: exponential moving average with
    the warm-up of ``ema_decay``; integer buffers (batch counts) take the model's value."""

    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], n_averaged: torch.Tensor) -> None:
        if torch.is_floating_point(averaged[0]):
            torch._foreach_lerp_(averaged, current, 1 - ema_decay(decay, int(n_averaged)))
        else:
            for a, c in zip(averaged, current):
                a.copy_(c)

    return update


def _contiguous_state(model: nn.Module) -> dict:
    """A detached copy of the state dict in the plain (contiguous) memory layout."""
    return {k: v.detach().clone(memory_format=torch.contiguous_format) for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------- shared helpers


def random_affine(x: torch.Tensor, y: torch.Tensor | None = None, rot_deg: float = 10, scale: float = 0.1,
                  shift: float = 0.05) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply one random rotation/scale/shift per sample to x (N, C, H, W) and the same to y (N, ..., H, W)."""
    n = x.shape[0]
    dev = x.device
    a = (torch.rand(n, device=dev) * 2 - 1) * math.radians(rot_deg)
    s = 1 + (torch.rand(n, device=dev) * 2 - 1) * scale
    t = (torch.rand(n, 2, device=dev) * 2 - 1) * shift * 2
    theta = torch.zeros(n, 2, 3, device=dev)
    theta[:, 0, 0] = torch.cos(a) / s
    theta[:, 0, 1] = -torch.sin(a) / s
    theta[:, 1, 0] = torch.sin(a) / s
    theta[:, 1, 1] = torch.cos(a) / s
    theta[:, :, 2] = t
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    xa = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ya = None
    if y is not None:
        shape = y.shape
        yf = y.reshape(n, -1, *shape[-2:]).float()
        ya = F.grid_sample(yf, grid, mode="nearest", padding_mode="zeros", align_corners=False).reshape(shape)
        ya = ya.to(y.dtype)
    return xa, ya


def intensity_jitter(x: torch.Tensor, amount: float = 0.1) -> torch.Tensor:
    n = x.shape[0]
    g = 1 + (torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1) * amount
    b = (torch.rand(n, 1, 1, 1, device=x.device) * 2 - 1) * amount
    return x * g + b


def batches(n: int, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> Iterator[np.ndarray]:
    """Index batches of one epoch; under DDP each process takes its own equal share."""
    order = np.random.default_rng(seed * 1000 + epoch).permutation(n) if shuffle else np.arange(n)
    rank, world = dist_info()
    if world > 1:
        order = order[: len(order) - len(order) % world][rank::world]
        n = len(order)
    for i in range(0, n, batch_size):
        if shuffle and n - i < 2 <= n:
            break  # a one-sample batch breaks batch norm in training
        yield order[i : i + batch_size]


def patient_split(labels: list[int], groups: list[str], val_fraction: float, seed: int,
                  fold: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split with every patient wholly on one side. Returns (train_idx, val_idx)."""
    n_splits = max(2, int(round(1 / val_fraction)))
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    splits = list(sgkf.split(np.zeros(len(labels)), labels, groups))
    tr, va = splits[fold % n_splits]
    return np.sort(tr), np.sort(va)


def _predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device, bs: int = 128) -> torch.Tensor:
    out = []
    for i in range(0, len(x), bs):
        out.append(model(x[i : i + bs].to(device).float()).float().flatten())
    return torch.cat(out)


def _auc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def _card_base(spec: TaskSpec, cfg: TrainConfig, device: torch.device, smoke: bool) -> dict:
    return {
        "task": spec.name,
        "title": spec.title,
        "kind": spec.kind,
        "classes": list(spec.classes),
        "architecture": {"name": spec.architecture, "kwargs": spec.model_kwargs},
        # the card says the grid the weights were trained at; inference reads it from here
        "input_spec": {**spec.input_spec, **({"spacing_mm": cfg.spacing_mm} if cfg.spacing_mm else {})},
        "training": {**asdict(cfg), "optimizer": "Adam + cosine LR", "monitor": spec.monitor,
                     "precision": precision_label(device, cfg)},
        "smoke": smoke,
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else
                                 f" ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"),
        "torch_version": torch.__version__,
        "git_commit": git_commit(),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def classifier_report(y: np.ndarray, p: np.ndarray, threshold: float, seed: int) -> dict:
    m = M.classification_metrics(y, p, threshold)
    return {
        "n": int(len(y)),
        **{k: m[k] for k in M.CLASSIFICATION_METRICS},
        "confusion": {k: m[k] for k in ("tp", "fp", "tn", "fn")},
        "threshold": threshold,
        "ci95": M.bootstrap_ci(y, p, threshold, seed=seed),
        "roc": M.roc_points(y, p),
    }


# --------------------------------------------------------------------------- cardiac


@dataclass
class _CardiacData:
    x: torch.Tensor  # (P, 2k, S, S) model inputs
    m: torch.Tensor  # (P, 2k, S, S) true labels of those slices (-100 where a patient has none)
    slices: list[torch.Tensor]  # per patient: every ED and ES slice (Z_ed + Z_es, S, S)
    slice_masks: list[torch.Tensor | None]


def _load_cardiac(cases: list[mio.CardiacCase], size: int) -> _CardiacData:
    xs, ms, alls, allm = [], [], [], []
    for c in tqdm(cases, desc="read ACDC", leave=False, mininterval=2):
        ed, es = mio.load_nifti_path(c.ed_path).data, mio.load_nifti_path(c.es_path).data
        xs.append(pp.preprocess_cardiac(ed, es, size))
        alls.append(torch.cat([pp.cardiac_frame(v, size, all_slices=True) for v in (ed, es)]).half())
        if c.ed_gt is not None and c.es_gt is not None:
            gts = [mio.load_nifti_path(g).data for g in (c.ed_gt, c.es_gt)]
            ms.append(torch.cat([pp.cardiac_frame(g, size, mask=True) for g in gts]))
            allm.append(torch.cat([pp.cardiac_frame(g, size, mask=True, all_slices=True) for g in gts]).to(torch.int8))
        else:
            ms.append(torch.full((2 * pp.CARDIAC_SLICES, size, size), -100, dtype=torch.long))
            allm.append(None)
    return _CardiacData(torch.stack(xs), torch.stack(ms), alls, allm)


def soft_dice_multiclass(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - mean foreground soft Dice. logits (N, C, H, W), target (N, H, W) in [0, C)."""
    prob = torch.softmax(logits, dim=1)[:, 1:]
    onehot = F.one_hot(target.long(), logits.shape[1]).permute(0, 3, 1, 2).float()[:, 1:]
    inter = (prob * onehot).sum(dim=(0, 2, 3))
    denom = prob.sum(dim=(0, 2, 3)) + onehot.sum(dim=(0, 2, 3))
    return 1 - ((2 * inter + eps) / (denom + eps)).mean()


HEAD_STEPS = 2000


def _fit_cardiac_head(net: nn.Module, d: _CardiacData, y: torch.Tensor, tr: np.ndarray, cfg: TrainConfig,
                      device: torch.device) -> dict:
    """Second stage: the perceptron on shape descriptors, with the segmentation frozen.

    It learns from the descriptors of the predicted segmentation of the training patients and from
    those of their true masks (clean shapes), full batch, BCE-with-logits with class weighting.
    """
    set_seed(cfg.seed)
    net.eval()
    with torch.no_grad():
        feats = [net.shape_features(net.segment(d.x[tr[i : i + 8]].to(device).float())) for i in range(0, len(tr), 8)]
        f_pred = torch.cat(feats)
        has_gt = (d.m[tr] >= 0).all(dim=(1, 2, 3))
        f_gt = net.shape_features(net.mask_logits(d.m[tr][has_gt].to(device)))
    f = torch.cat([f_pred, f_gt])
    t = torch.cat([y[tr], y[tr][has_gt]]).to(device)
    n_pos = float(t.sum())
    pos_weight = torch.tensor((len(t) - n_pos) / max(n_pos, 1.0), device=device)
    for p in net.unet.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(net.head.parameters(), lr=cfg.lr, weight_decay=1e-3)
    net.head.train()
    losses = []
    for _ in range(HEAD_STEPS):
        opt.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(net.head(f).flatten(), t, pos_weight=pos_weight)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    for p in net.unet.parameters():
        p.requires_grad_(True)
    net.eval()
    with torch.no_grad():
        p_tr = torch.sigmoid(net.head(f_pred)).flatten().cpu().numpy()
    return {"steps": HEAD_STEPS, "samples": int(len(t)), "first_loss": losses[0], "final_loss": losses[-1],
            "train_auc_predicted_shapes": _auc_or_nan(y[tr].numpy(), p_tr)}


def _fit_cardiac(d: _CardiacData, y: torch.Tensor, tr: np.ndarray, va: np.ndarray, cfg: TrainConfig,
                 device: torch.device, desc: str) -> tuple[nn.Module, FitResult, dict, np.ndarray]:
    """Stage 1: the U-Net segments every ED and ES slice of the training patients (best epoch by the
    validation patients' mean foreground Dice). Stage 2: the head on shape descriptors."""
    spec = get_task("cardiac")
    set_seed(cfg.seed)
    model = build_model(spec.architecture, **spec.model_kwargs).to(device)
    tr_l = [i for i in tr if d.slice_masks[i] is not None]
    va_l = [i for i in va if d.slice_masks[i] is not None]
    x_tr = torch.cat([d.slices[i] for i in tr_l])[:, None].to(device)
    m_tr = torch.cat([d.slice_masks[i] for i in tr_l]).to(device)
    x_va = torch.cat([d.slices[i] for i in va_l])[:, None] if va_l else None
    m_va = torch.cat([d.slice_masks[i] for i in va_l]).long() if va_l else None
    unet = model.unet

    def train_batches(epoch: int):
        for idx in batches(len(x_tr), cfg.batch_size, cfg.seed, epoch):
            yield x_tr[idx].float(), m_tr[idx].long()

    def step(net: nn.Module, batch: tuple) -> tuple[torch.Tensor, float]:
        xb, mb = batch
        xb, mb = random_affine(xb, mb, rot_deg=15, scale=0.15, shift=0.05)
        xb = intensity_jitter(xb)
        logits = net(xb).float()
        loss = F.cross_entropy(logits, mb) + soft_dice_multiclass(logits, mb)
        return loss, 1.0 - float(soft_dice_multiclass(logits.detach(), mb, eps=1e-6))

    def validate(net: nn.Module) -> dict:
        if x_va is None:
            return {"loss": float("nan"), "dice": float("nan")}
        logits = torch.cat([net(x_va[i : i + 64].to(device).float()).float().cpu() for i in range(0, len(x_va), 64)])
        loss = float(F.cross_entropy(logits, m_va) + soft_dice_multiclass(logits, m_va))
        pred = logits.argmax(1)
        dices = [M.dice((pred == c).numpy(), (m_va == c).numpy()) for c in (1, 2, 3)]
        return {"loss": loss, "dice": float(np.mean(dices))}

    res = fit(unet, train_batches, step, validate, cfg, "dice", desc=desc)
    head = _fit_cardiac_head(model, d, y, tr, cfg, device)
    model.eval()
    with torch.no_grad():
        p = torch.sigmoid(_predict_logits(model, d.x[va], device, bs=8)).cpu().numpy()
    return model, res, head, p


def train_cardiac(root: Path, cfg: TrainConfig, device: torch.device, smoke: bool = False,
                  out_dir: Path | None = None, folds: int = 5) -> dict:
    """5-fold cross-validation by patient for the figures; the committed model is fold 1's
    (trained on the other 4 folds), so its validation patients stay unseen."""
    spec = get_task("cardiac")
    cases = mio.find_cardiac_cases(root)
    if smoke:
        by_label = {0: [c for c in cases if c.label == 0], 1: [c for c in cases if c.label == 1]}
        cases = by_label[0][:5] + by_label[1][:10]
        folds = 1
    labels = np.array([c.label for c in cases])
    groups_strat = [c.group for c in cases]
    data = _load_cardiac(cases, spec.input_spec["size"])
    y = torch.tensor(labels, dtype=torch.float32)
    n_splits = 5
    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=cfg.seed)
    # stratify by the five ACDC groups so each fold holds every disease
    splits = list(sgkf.split(np.zeros(len(cases)), groups_strat, [c.patient_id for c in cases]))
    oof = np.full(len(cases), np.nan)
    fold_reports = []
    committed = None
    for k in range(folds):
        tr, va = splits[k]
        model, res, head, p = _fit_cardiac(data, y, tr, va, cfg, device, desc=f"cardiac fold {k + 1}")
        oof[va] = p
        at_half = M.classification_metrics(labels[va], p, 0.5)
        fold_reports.append({"fold": k + 1, "n_val": len(va), "best_epoch": res.best_epoch,
                             "val_seg_dice": res.best_value,
                             "val_auc": _auc_or_nan(labels[va], p), "val_accuracy_at_0.5": at_half["accuracy"],
                             "val_sensitivity_at_0.5": at_half["sensitivity"],
                             "val_specificity_at_0.5": at_half["specificity"], "seconds": round(res.seconds, 1)})
        if k == 0:
            committed = (model, res, head, tr, va, p)
    model, res, head, tr, va, p = committed
    done = ~np.isnan(oof)
    # Threshold from the pooled out-of-fold predictions of all folds run, so it is not tuned on
    # the committed model's own validation patients alone.
    thr = M.youden_threshold(labels[done], oof[done]) if len(np.unique(labels[done])) == 2 else 0.5
    card = _card_base(spec, cfg, device, smoke)
    card["training"]["monitor"] = "dice"  # stage 1 keeps the epoch with the best segmentation Dice
    card.update({
        "threshold": thr,
        "threshold_rule": f"Youden's J on pooled out-of-fold predictions of {folds}-fold cross-validation, "
                          "halfway between the two probabilities it separates",
        "class_weighting": "BCE pos_weight = n_normal / n_disease per fold",
        "auxiliary_task": "two stages. 1: a 2D U-Net segments RV, myocardium and LV cavity on every ED and ES "
                          "slice of the training patients (ACDC masks; cross-entropy + soft Dice; the epoch kept is "
                          "the one with the best mean foreground Dice on the fold's validation patients). 2: with the "
                          "U-Net frozen, a small perceptron on 9 shape descriptors of the segmentation of 8 slices "
                          "per frame learns P(disease) from the training patients' predicted and true masks",
        "head_training": head,
        "data": {
            "dataset": spec.dataset,
            "n_patients": len(cases),
            "groups": {g: groups_strat.count(g) for g in sorted(set(groups_strat))},
            "split": f"{n_splits}-fold cross-validation stratified by ACDC group, by patient, seed {cfg.seed}; "
                     f"committed model = fold 1 ({len(tr)} train / {len(va)} validation patients)",
            "n_train": len(tr), "n_val": len(va),
            "train_cases": [cases[i].patient_id for i in tr],
            "val_cases": [cases[i].patient_id for i in va],
            "note": "The shared ACDC copy has no true voxel spacing; no mm or mL are derived from it.",
        },
        "history": res.history, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
        "train_time_s": round(sum(f["seconds"] for f in fold_reports), 1),
        "validation": classifier_report(labels[va].astype(int), p, thr, cfg.seed),
        "cross_validation": {
            "folds": fold_reports,
            "pooled_out_of_fold": classifier_report(labels[done].astype(int), oof[done], thr, cfg.seed),
            "out_of_fold_probability": {cases[i].patient_id: float(oof[i]) for i in np.nonzero(done)[0]},
            "note": "Each patient's out-of-fold probability comes from the fold model that did not see them; "
                    "pooled figures use the one threshold of the committed model.",
        },
    })
    save_trained(model, card, spec.name, out_dir)
    return card


# --------------------------------------------------------------------------- segmentation helpers


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch. logits, target: (N, H, W)."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    return 1 - (2 * inter + eps) / (p.sum() + target.sum() + eps)


def _atrium_split(n: int, cfg: TrainConfig, folds: int = 5) -> list[tuple[list[int], list[int]]]:
    """(train, validation) indices of ``n`` volumes. Fold 1 is the committed model's split (``val_fraction``
    of the volumes, seeded); the other volumes are divided into folds 2..``folds`` for cross-validation."""
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_val = max(1, int(round(n * cfg.val_fraction)))
    parts = [order[:n_val]] + [p for p in np.array_split(order[n_val:], max(1, folds - 1)) if len(p)]
    return [(sorted(int(i) for i in order if i not in set(p.tolist())), sorted(int(i) for i in p)) for p in parts]


def _train_atrium_both(*args, **kwargs) -> dict:
    from core.atrium import train_atrium as train_both

    return train_both(*args, **kwargs)


def _train_pneumonia_shift(*args, **kwargs) -> dict:
    from core.pneumonia import train_pneumonia as train_shift

    return train_shift(*args, **kwargs)


TRAINERS: dict[str, Callable[..., dict]] = {
    "pneumonia": _train_pneumonia_shift,
    "cardiac": train_cardiac,
    "atrium": _train_atrium_both,
}


def task_config(task: str, smoke: bool = False, seed: int = 0, epochs: int | None = None,
                crop: int | None = None, ema: float | None = None, spacing_mm: float | None = None) -> TrainConfig:
    """The registry's training defaults for a task, or the short smoke settings; ``epochs`` overrides;
    ``crop`` sets the segmentation training crop (0: whole slices); ``ema`` keeps a weight average;
    ``spacing_mm`` sets the segmentation in-plane grid."""
    d = dict(get_task(task).train_defaults)
    if smoke:
        d.update(epochs=2, batch_size=8, patience=2)
        if "samples_per_epoch" in d:
            d["samples_per_epoch"] = 64
    if epochs:
        d["epochs"] = epochs
    if crop is not None:
        if get_task(task).kind != "segmentation":
            raise ValueError(f"crop applies to segmentation tasks only, not {task!r}")
        d["crop"] = crop or None
    if ema is not None:
        d["ema"] = ema
    if spacing_mm is not None:
        if get_task(task).kind != "segmentation":
            raise ValueError(f"spacing_mm applies to segmentation tasks only, not {task!r}")
        d["spacing_mm"] = spacing_mm
    return TrainConfig(seed=seed, **d)


def train_task(task: str, root: Path, device: torch.device, smoke: bool = False, out_dir: Path | None = None,
               seed: int = 0, epochs: int | None = None, crop: int | None = None,
               ema: float | None = None, spacing_mm: float | None = None) -> dict:
    """Train one task with its registry defaults (or smoke settings) and write weights + card."""
    cfg = task_config(task, smoke, seed, epochs, crop, ema, spacing_mm)
    return TRAINERS[task](Path(root), cfg, device, smoke=smoke, out_dir=out_dir)
