"""One training loop for all tasks, and the helpers the task modules train with (seeding, batches, splits,
augmentation, cards); each task's own data and training live in its module (core.pneumonia, core.cardiac,
core.atrium).

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
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from core import metrics as M
from core import preprocess as pp
from core.checkpoint import git_commit, save_checkpoint
from core.precision import autocast_for, native_bf16
from core.tasks import TaskSpec, get_task

log = logging.getLogger("medimg.train")


@dataclass(frozen=True)
class TimeBudget:
    """Wall-clock budget of one task's training (``train_all``): ``minutes`` in all, of which the share
    ``reserve`` is kept for what is not epochs (reading the data, scoring, checks, calibration), counted from
    ``started`` (``time.time()``). ``fit`` shortens a schedule that would overrun it on a slow machine."""

    minutes: float
    reserve: float
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {self.minutes}")
        if not (0 <= self.reserve < 1):
            raise ValueError(f"reserve must be in [0, 1), got {self.reserve}")

    @property
    def epochs_end(self) -> float:
        """``time.time()`` by which every epoch of the task must have ended."""
        return self.started + 60 * self.minutes * (1 - self.reserve)

    def run_end(self, runs_left: int, now: float | None = None) -> float:
        """When the epochs of the next of ``runs_left`` equal fits (cross-validation folds) must end: the
        time left for epochs, shared equally."""
        if runs_left < 1:
            raise ValueError(f"runs_left must be >= 1, got {runs_left}")
        now = time.time() if now is None else now
        return now + max(0.0, self.epochs_end - now) / runs_left


def planned_epochs(total: int, done: int, epoch_s: float, seconds_left: float, floor: int) -> int:
    """Length of a schedule of ``total`` epochs, ``done`` of them run at ``epoch_s`` seconds each, when
    ``seconds_left`` remain for epochs: as many as fit, never more than ``total``, never under ``floor``
    (nor under ``done``). Below ``floor`` a shorter run would cost more quality than overrunning."""
    if total < 1 or done < 0 or floor < 1:
        raise ValueError("total and floor must be >= 1 and done >= 0")
    fits = int(max(0.0, seconds_left) // epoch_s) if epoch_s > 0 else total
    return max(min(total, done + fits), min(floor, total), done)


def cosine_lr(lr: float, eta_min: float, epoch: int, total: int) -> float:
    """The cosine schedule's learning rate after ``epoch`` of ``total`` epochs (torch's CosineAnnealingLR)."""
    return eta_min + (lr - eta_min) * (1 + math.cos(math.pi * min(epoch, total) / total)) / 2


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (and, from ``train_all``, the task's time budget)."""

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
    time_budget: TimeBudget | None = None  # None: the whole schedule, however long it takes

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
    epochs_planned: int = 0  # the schedule's length in the end (cfg.epochs unless the time budget shortened it)
    shortened_at: int | None = None  # the epoch after which the time budget (last) shortened the schedule

    @property
    def schedule(self) -> dict:
        """What the card says about the schedule actually run."""
        return {"epochs_planned": self.epochs_planned, "epochs_run": self.epochs_run,
                "shortened_at_epoch": self.shortened_at}


def fit(
    model: nn.Module,
    train_batches: Callable[[int], Iterator[tuple]],
    step: Callable[[nn.Module, tuple], tuple[torch.Tensor, float]],
    validate: Callable[[nn.Module], dict[str, float]],
    cfg: TrainConfig,
    monitor: str,
    desc: str = "train",
    keep_last: bool = False,
    runs_left: int = 1,
) -> FitResult:
    """Train with Adam, validating every epoch and keeping the state with the best ``monitor``.

    train_batches(epoch) yields batches; step(model, batch) returns (loss, batch metric);
    validate(model) returns a dict with "loss" and ``monitor``. With ``cfg.ema`` the model validated
    and kept is an exponential moving average of the weights (and batch-norm statistics) after each
    step: it is less noisy from epoch to epoch than the raw weights, so the kept epoch is less of a
    lucky draw on a small validation set. With ``keep_last`` (training on every case, nothing left to
    validate on) the last epoch's state is kept and returned.

    With ``cfg.time_budget`` this fit, the first of ``runs_left`` alike, may use its share of the time left
    for epochs; after each epoch, if the rest of the schedule would not end in time at the epochs' pace so
    far (the first, warm-up epoch left out), the cosine schedule is shortened to what fits (not under half
    its length) and anneals to the same final rate over the epochs that remain.
    """
    set_seed(cfg.seed)
    plain = model.to(memory_format=torch.channels_last)  # faster convolutions on CPU (oneDNN) and GPU
    device = next(plain.parameters()).device
    if dist_info()[1] > 1:  # DistributedDataParallel: gradients are averaged across processes
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(plain, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    eta_min = cfg.lr * 0.02
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs, eta_min=eta_min)
    total, shortened_at, durations = cfg.epochs, None, []
    run_end = cfg.time_budget.run_end(runs_left) if cfg.time_budget is not None else None
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
        t_epoch = time.time()
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
        if shortened_at is None:
            sched.step()
        else:
            for g in opt.param_groups:
                g["lr"] = cosine_lr(cfg.lr, eta_min, epoch, total)
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
        durations.append(time.time() - t_epoch)
        # decided from the second epoch on: the first (oneDNN building its kernels, caches filling) is no pace
        if run_end is not None and epoch < total and len(durations) > 1:
            pace = float(np.mean(durations[1:]))
            new_total = _agreed(planned_epochs(total, epoch, pace, run_end - time.time(), math.ceil(cfg.epochs / 2)))
            if new_total < total:
                log.info("%s: schedule shortened from %d to %d epochs to end within the time budget (%.1f s per "
                         "epoch on this machine)", desc, total, new_total, pace)
                total, shortened_at = new_total, epoch
                for g in opt.param_groups:  # the next epoch's rate on the shortened cosine
                    g["lr"] = cosine_lr(cfg.lr, eta_min, epoch, total)
                rec["lr"] = opt.param_groups[0]["lr"]  # the history gives the rate the next epoch runs at
                bar.total = total
        if epoch >= total:
            break
    plain.to(memory_format=torch.contiguous_format)  # saved weights and later inference use the plain layout
    plain.load_state_dict(best_state)
    return FitResult(best_state, history, best_epoch, best_value, len(history), time.time() - t0,
                     epochs_planned=total, shortened_at=shortened_at)


def _agreed(n: int) -> int:
    """Rank 0's ``n`` on every process under DDP (all must run the same epochs); ``n`` otherwise."""
    if dist_info()[1] <= 1:
        return n
    import torch.distributed as dist

    t = torch.tensor([n])
    dist.broadcast(t, 0)
    return int(t)


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
    from sklearn.model_selection import StratifiedGroupKFold

    sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    splits = list(sgkf.split(np.zeros(len(labels)), labels, groups))
    tr, va = splits[fold % n_splits]
    return np.sort(tr), np.sort(va)


def predict_logits(model: nn.Module, x: torch.Tensor, device: torch.device, bs: int = 128) -> torch.Tensor:
    out = []
    for i in range(0, len(x), bs):
        out.append(model(x[i : i + bs].to(device).float()).float().flatten())
    return torch.cat(out)


def auc_or_nan(y: np.ndarray, p: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def card_base(spec: TaskSpec, cfg: TrainConfig, device: torch.device, smoke: bool) -> dict:
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


# --------------------------------------------------------------------------- segmentation helpers


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    """1 - soft Dice over the whole batch. logits, target: the same shape ((N, H, W) slices, (X, Y, Z) boxes)."""
    p = torch.sigmoid(logits)
    inter = (p * target).sum()
    return 1 - (2 * inter + eps) / (p.sum() + target.sum() + eps)


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
