"""A 3D refiner over a 2D segmenter's probabilities (engine module: no task imports).

A 2D network that reads a few slices at a time makes its gross errors where through-plane context decides (for the
left atrium: the mitral-valve end, the veins and the appendage; benchmarks/atrium_error_anatomy_oof.py). The refiner
is a small 3D U-Net that reads the image and the 2D probabilities of the box around the 2D mask on a coarse grid
(``grid_mm``) and adds a correction to the 2D logits, upsampled to the box's own grid: the contours stay the 2D
model's, a wrong region can be added or removed. Its last layer starts at zero, so an untrained refiner returns the
2D mask unchanged.

It must be trained on probabilities the 2D model gives on volumes it did not train on (out-of-fold probabilities of
cross-validation fold models): on its own training volumes the 2D model is nearly right and there is little to learn.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core import preprocess as pp

REFINE_GRID_MM = 2.5  # the refiner's grid; the correction is upsampled from it
REFINE_MARGIN_MM = 16.0  # context around the 2D mask in the box the refiner reads
REFINE_MULTIPLE = 4  # each side of the coarse grid (two poolings)


def _block(i: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv3d(i, o, 3, padding=1), nn.InstanceNorm3d(o, affine=True), nn.LeakyReLU(0.01),
                         nn.Conv3d(o, o, 3, padding=1), nn.InstanceNorm3d(o, affine=True), nn.LeakyReLU(0.01))


class RefinerNet(nn.Module):
    """(N, 2, X, Y, Z) image + probabilities on the coarse grid, each side a multiple of REFINE_MULTIPLE ->
    (N, 1, X, Y, Z) logit correction. Two levels, ``base`` / 2 ``base`` / 4 ``base`` channels, instance norm."""

    def __init__(self, base: int = 16, in_channels: int = 2) -> None:
        super().__init__()
        if base < 1 or in_channels < 1:
            raise ValueError(f"base and in_channels must be >= 1, got {base} and {in_channels}")
        self.e1, self.e2, self.e3 = _block(in_channels, base), _block(base, 2 * base), _block(2 * base, 4 * base)
        self.u2, self.d2 = nn.ConvTranspose3d(4 * base, 2 * base, 2, 2), _block(4 * base, 2 * base)
        self.u1, self.d1 = nn.ConvTranspose3d(2 * base, base, 2, 2), _block(2 * base, base)
        self.head = nn.Conv3d(base, 1, 1)
        nn.init.zeros_(self.head.weight)  # start as the identity: the 2D mask unchanged
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 5 or any(s % REFINE_MULTIPLE for s in x.shape[2:]):
            raise ValueError(f"expected (N, C, X, Y, Z) with sides multiples of {REFINE_MULTIPLE}, got {tuple(x.shape)}")
        a = self.e1(x)
        b = self.e2(F.max_pool3d(a, 2))
        c = self.e3(F.max_pool3d(b, 2))
        d = self.d2(torch.cat([self.u2(c), b], 1))
        return self.head(self.d1(torch.cat([self.u1(d), a], 1)))


def coarse_size(shape: tuple[int, ...], spacing: tuple[float, float, float], grid_mm: float) -> list[int]:
    """The coarse grid's sides for a box of ``shape`` voxels of ``spacing`` mm: ``grid_mm`` voxels, rounded up to a
    multiple of REFINE_MULTIPLE (at least 2 of them)."""
    m = REFINE_MULTIPLE
    return [max(2 * m, int(math.ceil(n * s / grid_mm / m)) * m) for n, s in zip(shape, spacing)]


def logit_at(prob: torch.Tensor, threshold: float) -> torch.Tensor:
    """Logits of ``prob`` shifted so that ``threshold`` maps to 0 (clipped at 1e-4 from 0 and 1)."""
    p = prob.clamp(1e-4, 1 - 1e-4)
    return torch.log(p) - torch.log1p(-p) - math.log(threshold / (1 - threshold))


def refined_logits(net: nn.Module, img: torch.Tensor, prob: torch.Tensor, spacing: tuple[float, float, float],
                   threshold: float, grid_mm: float = REFINE_GRID_MM, bf16: bool = True) -> torch.Tensor:
    """(X, Y, Z) normalised image and 2D probabilities of a box -> (X, Y, Z) refined logits, 0 at ``threshold``
    (``logit_at`` plus the refiner's correction from its coarse grid, trilinearly upsampled)."""
    if img.shape != prob.shape or img.ndim != 3:
        raise ValueError(f"img and prob must be the same (X, Y, Z) shape, got {tuple(img.shape)}, {tuple(prob.shape)}")
    x = torch.stack([img.float(), prob.float() * 4 - 2])[None]  # probabilities to about the image's z-score range
    x = F.interpolate(x, size=coarse_size(tuple(img.shape), spacing, grid_mm), mode="trilinear", align_corners=False)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        d = net(x)
    d = F.interpolate(d.float(), size=tuple(img.shape), mode="trilinear", align_corners=False)[0, 0]
    return logit_at(prob.float(), threshold) + d


@dataclass
class RefineBox:
    """One training example: a box around a 2D mask made on a volume the 2D model did not train on.
    ``img`` (normalised), ``prob`` and ``label`` are (X, Y, Z) float32; ``outside`` counts expert voxels outside it."""

    case_id: str
    dataset: str
    img: np.ndarray
    prob: np.ndarray
    label: np.ndarray
    spacing: tuple[float, float, float]
    threshold: float
    outside: int = 0
    group: int = 0  # the cross-validation fold the probabilities came from

    def __post_init__(self) -> None:
        if not (self.img.shape == self.prob.shape == self.label.shape) or self.img.ndim != 3:
            raise ValueError("img, prob and label must be the same (X, Y, Z) shape")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")


def augmented(b: RefineBox, rng: np.random.Generator, cut: int = 6
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[float, float, float]]:
    """A box with its axes permuted and flipped at random (a volume arrives in any orientation), up to ``cut``
    voxels cut from each side, the image's contrast scaled (0.9-1.1), shifted (sd 0.1) and, 30 % of the time,
    gamma-changed (0.7-1.4). -> (img, prob, label, spacing) with the spacing permuted alike."""
    perm = rng.permutation(3)
    arrs = [a.transpose(perm) for a in (b.img, b.prob, b.label)]
    sp = tuple(float(b.spacing[i]) for i in perm)
    for ax in range(3):
        if rng.random() < 0.5:
            arrs = [np.flip(a, ax) for a in arrs]
    box = tuple(slice(int(lo), max(int(lo) + 16, n - int(hi))) for n, lo, hi in
                zip(arrs[0].shape, rng.integers(0, cut + 1, 3), rng.integers(0, cut + 1, 3)))
    img, prob, lab = (np.ascontiguousarray(a[box], dtype=np.float32) for a in arrs)
    img = img * rng.uniform(0.9, 1.1) + rng.normal(0, 0.1)
    if rng.random() < 0.3:
        img = np.sign(img) * np.abs(img) ** rng.uniform(0.7, 1.4)
    return torch.from_numpy(img.astype(np.float32)), torch.from_numpy(prob), torch.from_numpy(lab), sp


def dice_bce(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """BCE on logits ``z`` plus soft Dice loss of sigmoid(z) against the 0/1 target ``y`` (same shape)."""
    from core.train import soft_dice_loss

    return F.binary_cross_entropy_with_logits(z, y) + soft_dice_loss(z, y)


@dataclass(frozen=True)
class RefinerRecipe:
    """How a refiner is trained: ``epochs`` passes over the boxes (one box per step, AdamW, one-cycle LR peaking
    at ``lr``), boxes of ``heavier`` drawn ``weight`` times as often as the others, the last epoch kept."""

    epochs: int = 40
    base: int = 16
    grid_mm: float = REFINE_GRID_MM
    lr: float = 2e-3
    heavier: str = "Task02_Heart"
    weight: float = 4.0

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.base < 1 or not self.grid_mm > 0 or not self.lr > 0 or not self.weight > 0:
            raise ValueError(f"invalid refiner recipe {self}")


def fit_refiner(boxes: list[RefineBox], recipe: RefinerRecipe = RefinerRecipe(), seed: int = 0,
                log: Callable[[str], None] | None = None) -> tuple[RefinerNet, dict]:
    """Train a ``RefinerNet`` on ``boxes`` (bfloat16 autocast on the CPU) -> (the net in eval mode, facts: seconds,
    epochs, final loss)."""
    if not boxes:
        raise ValueError("no boxes to train the refiner on")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = RefinerNet(recipe.base)
    opt = torch.optim.AdamW(net.parameters(), lr=recipe.lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, recipe.lr, total_steps=recipe.epochs * len(boxes), pct_start=0.1)
    w = np.array([recipe.weight if b.dataset == recipe.heavier else 1.0 for b in boxes])
    t0, loss_mean = time.perf_counter(), float("nan")
    for ep in range(recipe.epochs):
        total = 0.0
        for i in rng.choice(len(boxes), len(boxes), p=w / w.sum()):
            img, prob, lab, sp = augmented(boxes[i], rng)
            loss = dice_bce(refined_logits(net, img, prob, sp, boxes[i].threshold, recipe.grid_mm), lab)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        loss_mean = total / len(boxes)
        if log and (ep % 10 == 9 or ep == recipe.epochs - 1):
            log(f"refiner epoch {ep + 1}/{recipe.epochs}: loss {loss_mean:.4f} ({time.perf_counter() - t0:.0f} s)")
    return net.eval(), {"seconds": round(time.perf_counter() - t0, 1), "epochs": recipe.epochs,
                        "final_loss": round(loss_mean, 4), "n_boxes": len(boxes)}


@dataclass
class Refiner:
    """A trained refiner as a segmentation path runs it (``refine``)."""

    model: nn.Module
    grid_mm: float = REFINE_GRID_MM
    margin_mm: float = REFINE_MARGIN_MM
    card: dict = field(default_factory=dict)
    bf16: bool = True

    def __post_init__(self) -> None:
        if not 0.5 <= self.grid_mm <= 8:
            raise ValueError(f"grid_mm must be 0.5-8 mm, got {self.grid_mm}")
        if self.margin_mm < 0:
            raise ValueError(f"margin_mm must be >= 0, got {self.margin_mm}")

    def refine(self, norm: np.ndarray, prob: np.ndarray, mask: np.ndarray, spacing: tuple[float, float, float],
               threshold: float) -> tuple[np.ndarray, np.ndarray, tuple[slice, slice, slice] | None]:
        """The normalised volume, the 2D probabilities and mask (X, Y, Z) -> (probabilities, mask, box): inside
        the box around ``mask`` (``margin_mm``) the refined probabilities (``threshold`` keeps its meaning) and the
        largest component of them at ``threshold``, outside it the probabilities unchanged and no mask. An
        empty mask comes back unchanged (nothing to refine around)."""
        box = pp.box_around(mask, spacing, self.margin_mm)
        if box is None:
            return prob, mask, None
        with torch.inference_mode():
            z = refined_logits(self.model, torch.from_numpy(np.ascontiguousarray(norm[box], dtype=np.float32)),
                               torch.from_numpy(np.ascontiguousarray(prob[box], dtype=np.float32)), spacing,
                               threshold, self.grid_mm, self.bf16)
        out_p = prob.copy()
        out_p[box] = torch.sigmoid(z + math.log(threshold / (1 - threshold))).numpy().astype(prob.dtype)
        out_m = np.zeros(mask.shape, mask.dtype)
        out_m[box] = pp.largest_component((z >= 0).numpy())
        return out_p, out_m, box
