"""The left-atrium task in one place: orientation, multi-view slicing, training data and augmentation,
fused inference, and the quality check that decides whether a mask is reported.

Two sequences (bSSFP from MSD Task02_Heart, LGE from the 2018 LA challenge) are served by one code path:
the volume is brought to the closest canonical (RAS) orientation by its affine, segmented slice by slice
along one or more of its three axes (the model was trained on slices along all three, so a volume whose
affine lies about its slice plane is still segmented), the views' probabilities are averaged, and the
mask is put back on the input's own grid. A single-view model slices across the volume's thinnest
direction (``slab_axis``): a 3D acquisition is a slab, and its slices show the most context across it,
whatever the header says that direction is.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from core import preprocess as pp
from core.concurrency import model_lock
from core.io import Volume
from core.metrics import volume_ml
from core.precision import autocast
from core.refine3d import Refiner
from core.runtime import LoadedModel, load_base, release_memory

VIEWS_ALL = (2, 0, 1)  # the axial view first: the others run around what it finds
# A single-view model slices across the slab's thinnest direction when it is clearly thinner than the
# axial one (extent below this share of the axial extent); otherwise axially. In both training sets the
# axial direction is the thinnest by a factor of 1.6 or more, so the rule keeps their slicing; it matters
# when a header lies about the slice plane (an LGE slab written in another axis order).
SLAB_RATIO = 0.75
# Three views are fused when the volume spans at least this much in every direction: twice an atrium's
# largest diameter (about 6 cm), so that slices along any axis hold the whole atrium and its surroundings.
# A whole-chest bSSFP volume (MSD: 137-178 mm through the slab) is fused; a thin LGE slab (55 mm) is not.
FUSE_MIN_EXTENT_MM = 120.0
# Physiological range of the left-atrial cavity in adults (indexed LA volumes run about 15-60 mL/m2;
# dilated atria in atrial fibrillation reach about 200 mL). Outside it the mask is not reported.
LA_VOLUME_RANGE_ML = (10.0, 250.0)
MIN_EXTENT_MM = 40.0  # an atrium is 4-6 cm across: a volume that does not cover 4 cm in every direction cannot hold one
UNCERTAIN_BAND = (0.2, 0.8)
# Blood is bright on both sequences the model knows (bSSFP and LGE are bright-blood images): over the true masks of
# all 96 training volumes, the share of the volume darker than the mean inside the atrium is >= 0.967 (MSD bSSFP)
# and >= 0.623 (median 0.841, the cropped LGE slabs). A mask darker than half of the scan is not the blood pool of
# a bright-blood image (a dark-blood sequence, an inverted export): a fixed floor from that physics, not fitted.
MIN_MASK_BRIGHTNESS = 0.5


# --------------------------------------------------------------------------- orientation


@dataclass(frozen=True)
class Orientation:
    """How an input array maps onto the canonical (RAS) array: ``ornt`` is nibabel's (3, 2) table."""

    ornt: np.ndarray
    input_shape: tuple[int, int, int]

    @property
    def is_identity(self) -> bool:
        return bool(np.array_equal(self.ornt, [[0, 1], [1, 1], [2, 1]]))


def to_canonical(data: np.ndarray, affine: np.ndarray, spacing: tuple[float, float, float]
                 ) -> tuple[np.ndarray, tuple[float, float, float], Orientation]:
    """(X, Y, Z) array in its file's voxel order -> the same voxels in the closest RAS order, their
    spacing, and the orientation that undoes it. Only axis permutations and flips (no resampling)."""
    import nibabel as nib

    ornt = nib.orientations.io_orientation(np.asarray(affine, dtype=np.float64))
    if np.isnan(ornt).any():  # degenerate affine: keep the voxel order
        ornt = np.array([[0, 1], [1, 1], [2, 1]], dtype=float)
    out = np.asarray(nib.orientations.apply_orientation(data, ornt))
    sp = [0.0, 0.0, 0.0]
    for i in range(3):
        sp[int(ornt[i, 0])] = float(spacing[i])
    return out, (sp[0], sp[1], sp[2]), Orientation(ornt, tuple(int(s) for s in data.shape))


def from_canonical(arr: np.ndarray, orient: Orientation) -> np.ndarray:
    """Inverse of ``to_canonical`` for an array on the canonical grid -> the input's voxel order."""
    inv = np.zeros((3, 2))
    for i in range(3):
        inv[int(orient.ornt[i, 0])] = [i, orient.ornt[i, 1]]
    # apply_orientation maps axis j of its input to inv[j, 0]; undo the flips first, then permute back
    out = np.asarray(arr)
    for j in range(3):
        if inv[j, 1] < 0:
            out = np.flip(out, axis=j)
    order = [0, 0, 0]
    for j in range(3):
        order[int(inv[j, 0])] = j
    return np.ascontiguousarray(np.transpose(out, order))


def slab_axis(shape: tuple[int, ...], spacing: tuple[float, float, float], ratio: float = SLAB_RATIO) -> int:
    """The axis of a canonical (X, Y, Z) volume to slice along with a single view: the one of smallest
    physical extent (voxels x spacing) if it is below ``ratio`` x the extent of axis 2, else axis 2."""
    if not 0 < ratio <= 1:
        raise ValueError(f"ratio must be in (0, 1], got {ratio}")
    ext = [float(n) * float(s) for n, s in zip(shape[:3], spacing)]
    k = int(np.argmin(ext))
    return k if ext[k] < ratio * ext[2] else 2


def resolve_views(views: tuple[int, ...], shape: tuple[int, ...], spacing: tuple[float, float, float]
                  ) -> tuple[int, ...]:
    """The views actually segmented. A single axial view (2,) becomes the slab's own axis (``slab_axis``),
    joined by the two other axes when the volume spans at least FUSE_MIN_EXTENT_MM in every direction
    (slices across it then show the whole atrium with context; on a thin slab they are strips); several
    views listed are kept as they are."""
    views = tuple(int(v) for v in views)
    if views != (2,):
        return views
    k = slab_axis(shape, spacing)
    if min(float(n) * float(s) for n, s in zip(shape[:3], spacing)) >= FUSE_MIN_EXTENT_MM:
        return (k,) + tuple(a for a in VIEWS_ALL if a != k)
    return (k,)


def views_in_words(views: tuple[int, ...]) -> str:
    """What ``resolve_views`` does with ``views``, for a card or a page."""
    views = tuple(int(v) for v in views)
    if views == (2,):
        return ("slices across each volume's thinnest direction (along all three directions, fused, when it is "
                f"at least {FUSE_MIN_EXTENT_MM / 10:g} cm wide in every direction)")
    names = {0: "sagittal", 1: "coronal", 2: "axial"}
    return "slices along " + ", ".join(names.get(v, str(v)) for v in views) + (", fused" if len(views) > 1 else "")


def view(arr: np.ndarray, axis: int) -> np.ndarray:
    """The array with ``axis`` moved last (slices along it), a view without copying."""
    return np.moveaxis(arr, axis, 2)


def view_spacing(spacing: tuple[float, float, float], axis: int) -> tuple[float, float, float]:
    rest = [s for i, s in enumerate(spacing) if i != axis]
    return (rest[0], rest[1], spacing[axis])


# --------------------------------------------------------------------------- inference


@dataclass
class AtriumPrediction:
    prob: np.ndarray  # (X, Y, Z) float16 on the canonical grid: mean over the views
    view_masks: list[np.ndarray]  # per view, (X, Y, Z) bool (p >= threshold) before post-processing
    mask: np.ndarray  # (X, Y, Z) uint8 on the canonical grid, largest component
    views: tuple[int, ...] = (2,)  # canonical axes actually sliced along (see resolve_views)
    # where the views ran, when not the whole volume: outside it prob is 0 and every mask is empty, so the
    # measures over the volume can be taken over the box alone (same numbers, a fraction of the work)
    box: tuple[slice, slice, slice] | None = None
    # after a 3D refiner: the 2D views' own uncertain share (``uncertain_ratio`` of their fused probabilities and
    # mask), which the quality check reads: the refiner sharpens the probabilities of wrong masks too (three LGE
    # volumes blurred by 2 voxels, Dice 0.21-0.36: 2D ratio 0.54-1.19, refined 0.31-0.35; 2026-12-07)
    uncertain_ratio_2d: float | None = None


def uncertain_ratio(prob: np.ndarray, mask: np.ndarray, threshold: float = 0.5,
                    box: tuple[slice, slice, slice] | None = None) -> float:
    """Voxels of ``prob`` (X, Y, Z) in UNCERTAIN_BAND per voxel of ``mask`` (X, Y, Z; at least one). ``box``:
    where the probabilities can be non-zero (see ``_measured_region``)."""
    r = _measured_region(box, threshold)
    return count_in_band(prob[r], *UNCERTAIN_BAND) / max(int(np.count_nonzero(mask)), 1)


def count_in_band(p: np.ndarray, lo: float, hi: float) -> int:
    """Elements of ``p`` with lo < p < hi (0 <= lo < hi, finite). A float16 array (the probabilities' dtype) is
    compared as its bit patterns: they order every non-negative float16 as its value and put negatives, -0, NaN
    and inf outside such a band, so the count is the same, about 10x sooner than NumPy's float16 comparisons
    (done in software: 13 ms for a 3 M-voxel box on this CPU, 2026-12-07)."""
    if not 0 <= lo < hi < np.inf:
        raise ValueError(f"need 0 <= lo < hi < inf, got {lo}, {hi}")
    if p.dtype == np.float16:
        u = p.view(np.uint16)
        a, b = np.float16(lo).view(np.uint16), np.float16(hi).view(np.uint16)
        return int(np.count_nonzero((u > a) & (u < b)))
    return int(np.count_nonzero((p > lo) & (p < hi)))


def _measured_region(box: tuple[slice, slice, slice] | None, threshold: float) -> tuple[slice, ...]:
    """Where the measures over a prediction are taken: its ``box`` when it has one (outside it prob is 0, below
    a positive threshold and the uncertain band, and every mask is empty: the counts over the box are those over
    the volume), else everything."""
    return box if box is not None and threshold > 0 and UNCERTAIN_BAND[0] >= 0 else (slice(None),) * 3


def _embed(part: np.ndarray, box: tuple[slice, slice, slice], shape: tuple[int, ...], fill=0) -> np.ndarray:
    """A ``shape`` array of ``fill`` with ``part`` at ``box``."""
    out = np.full(shape, fill, part.dtype) if fill else np.zeros(shape, part.dtype)
    out[box] = part
    return out


# In-plane flips averaged at inference (test-time augmentation); the model was trained on all eight
# in-plane rotations/flips, so each flipped pass is as valid as the plain one. Dims of a (N, C, H, W) batch.
TTA_FLIPS: dict[int, tuple[tuple[int, ...], ...]] = {1: ((),), 2: ((), (-1,)), 4: ((), (-1,), (-2,), (-2, -1))}


def _passes(model: nn.Module, x: torch.Tensor, dims_list, out: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Mean sigmoid over the in-plane flips ``dims_list`` (dims of x; () = no flip) of x (N, C, H, W) ->
    (N, H, W), each flipped back; ``out``, if given, receives each pass's own probabilities."""
    acc = None
    for dims in dims_list:
        xi = x.flip(dims) if dims else x
        p = torch.sigmoid(model(xi).float())[:, 0]
        p = p.flip(dims) if dims else p  # negative dims name the same H/W axes of the (N, H, W) output
        if out is not None:
            out.append(p)
        acc = p if acc is None else acc + p
    return acc / len(dims_list)


def _flip_passes(model: nn.Module, x: torch.Tensor, flips: int, out: list[torch.Tensor] | None = None) -> torch.Tensor:
    """Mean sigmoid over the ``flips`` in-plane flips of x (N, C, H, W) -> (N, H, W) (see TTA_FLIPS)."""
    return _passes(model, x, TTA_FLIPS[flips], out)


# Flips for each fused view (wide bSSFP volumes, read in the box around the atrium): each further flip is one more
# pass of all three views over the box, about +1.0 s on the 256x256x130 benchmark volume in int8 (2 CPU cores), so
# four (+3 s) would take it past the 5 s goal. The app runs one: two were measured out of fold (2026-12-06, MSD Dice
# +0.0019 with HD95 and volume error worse; benchmarks/atrium_fused_flips_present_oof.py) and not adopted.
FUSED_TTA_CHOICES = (1, 2)

# Four flips add two passes over the box around the plain pass's finding (about +30 % on a whole-chest
# volume). Read along one view, a 256x256x130 bSSFP volume (8.5 M voxels on the model's grid) took 4.9-5.0 s
# with four against 3.8-4.5 s with two on 2 CPU cores (la_003, 2026-12): above this size a single view keeps
# two flips so that the 5 s goal holds. A cropped LGE slab is 0.5-0.8 M voxels.
MAX_GRID_VOXELS_FOUR_FLIPS = 6_000_000


def grid_voxels(shape: tuple[int, ...], spacing: tuple[float, float, float], axis: int, grid_mm: float) -> int:
    """Pixels the model sees slicing a (X, Y, Z) volume along ``axis``: its slices resampled in-plane to
    ``grid_mm``, times the number of slices."""
    inplane = [float(shape[i]) * float(spacing[i]) / grid_mm for i in range(3) if i != axis]
    return int(round(inplane[0])) * int(round(inplane[1])) * int(shape[axis])


def capped_flips(flips: int, shape: tuple[int, ...], spacing: tuple[float, float, float], axis: int,
                 grid_mm: float) -> int:
    """``flips`` for a single view along ``axis``, but 2 instead of 4 on a volume above
    MAX_GRID_VOXELS_FOUR_FLIPS (see there)."""
    if flips > 2 and grid_voxels(shape, spacing, axis, grid_mm) > MAX_GRID_VOXELS_FOUR_FLIPS:
        return 2
    return flips


def segment_view(model: nn.Module, data: np.ndarray, spacing: tuple[float, float, float], axis: int,
                 grid_mm: float, batch_size: int = 1, autocast_ctx=None, progress=None,
                 normalised: bool = False, flips: int = 1, flip_set=None, stride: int = 1,
                 slices: list[int] | None = None) -> np.ndarray:
    """Probabilities (X, Y, Z) of one pass of the 2.5D U-Net along ``axis`` of a canonical volume,
    averaged over ``flips`` in-plane flips (1, 2 or 4; see TTA_FLIPS), or over ``flip_set`` (a tuple of
    flip dims) when given. ``autocast_ctx``: a callable giving a fresh precision context (or None for float32).
    ``stride`` > 1: only every stride-th slice along ``axis`` (0, stride, ...) is segmented, the rest left 0;
    ``slices``: only these slices along ``axis`` (ascending) are segmented, the rest left 0."""
    import contextlib

    if flips not in TTA_FLIPS:
        raise ValueError(f"flips must be one of {sorted(TTA_FLIPS)}, got {flips}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    dims_list = flip_set if flip_set is not None else TTA_FLIPS[flips]
    v = view(data, axis)
    padded, geom = pp.atrium_padded(v, view_spacing(spacing, axis), grid_mm, normalised=normalised)
    n = v.shape[2]
    todo = list(range(0, n, stride)) if slices is None else [int(i) for i in slices]
    sparse = stride > 1 or slices is not None
    if slices is not None and (todo != sorted(set(todo)) or (todo and not 0 <= todo[0] <= todo[-1] < n)):
        raise ValueError(f"slices must be ascending indices below {n}")
    prob = torch.zeros(n, *padded.shape[1:]) if sparse else torch.empty(n, *padded.shape[1:])
    w = 2 * pp.ATRIUM_CONTEXT + 1
    with torch.inference_mode(), (autocast_ctx() if autocast_ctx else contextlib.nullcontext()):
        for b in range(0, len(todo), batch_size):
            idx = todo[b:b + batch_size]
            x = (pp.atrium_window(padded, idx[0], idx[-1] + 1) if not sparse
                 else torch.stack([padded[i:i + w] for i in idx]))
            prob[idx] = _passes(model, x, dims_list)
            if progress:
                progress((b + len(idx)) / len(todo))
    del padded
    return np.moveaxis(pp.atrium_restore(prob, geom), 2, axis)


def flip_pass_probs(model: nn.Module, norm: np.ndarray, spacing: tuple[float, float, float], grid_mm: float,
                    axis: int = 2, batch_size: int = 32, autocast_ctx=None, n: int = 4, progress=None) -> list[np.ndarray]:
    """The first ``n`` (1, 2 or 4) in-plane flip passes along ``axis`` of a normalised canonical volume,
    (X, Y, Z) each. The plain pass covers the whole volume; the flipped ones only the box around what it
    found (``roi_box``: ROI_MARGIN_MM of context), and equal the plain pass outside it, so that extra flips
    cost a fraction of a pass. The mean of the first f is what the app uses with f flips. When the plain
    pass finds nothing, the flipped ones cover the whole volume."""
    cb = (lambda f: progress(f / 2)) if progress and n > 1 else progress
    p1 = segment_view(model, norm, spacing, axis, grid_mm, batch_size, autocast_ctx, cb, normalised=True)
    out = [p1]
    if n == 1:
        return out
    # the box around the plain pass's largest component (stray specks elsewhere would widen it to the
    # whole volume), with ROI_MARGIN_MM of context
    core_ = pp.largest_component(p1 >= 0.5)
    box = roi_box(core_.astype(np.float32), spacing) if core_.any() else None
    box = box if box is not None else tuple(slice(0, s) for s in norm.shape)
    sub = np.ascontiguousarray(norm[box])
    for k, dims in enumerate(TTA_FLIPS[n][1:]):
        cbk = (lambda f, k=k: progress(0.5 + (k + f) / (2 * (n - 1)))) if progress else None
        pk = p1.copy()
        pk[box] = segment_view(model, sub, spacing, axis, grid_mm, batch_size, autocast_ctx, cbk, normalised=True,
                               flip_set=(dims,))
        out.append(pk)
    return out


ROI_MARGIN_MM = 40.0  # context kept around the first view's finding for the other views


def roi_box(prob: np.ndarray, spacing: tuple[float, float, float], margin_mm: float = ROI_MARGIN_MM,
            level: float = 0.1) -> tuple[slice, slice, slice] | None:
    """The box around voxels with probability > ``level``, widened by ``margin_mm``; None if there are none."""
    return pp.box_around(prob, spacing, margin_mm, level)


LOCALISE_STRIDE = 2


def localise(model: nn.Module, norm: np.ndarray, spacing: tuple[float, float, float], axis: int, grid_mm: float,
             threshold: float = 0.5, batch_size: int = 1, autocast_ctx=None, progress=None
             ) -> tuple[slice, slice, slice] | None:
    """Where the atrium is in a normalised canonical volume: the box (``roi_box``, ROI_MARGIN_MM of context)
    around the largest piece found by segmenting every LOCALISE_STRIDE-th slice along ``axis``; None if none."""
    return localise_pass(model, norm, spacing, axis, grid_mm, threshold, batch_size, autocast_ctx, progress)[0]


def localise_pass(model: nn.Module, norm: np.ndarray, spacing: tuple[float, float, float], axis: int,
                  grid_mm: float, threshold: float = 0.5, batch_size: int = 1, autocast_ctx=None, progress=None,
                  margin_mm: float = ROI_MARGIN_MM) -> tuple[tuple[slice, slice, slice] | None, np.ndarray]:
    """``localise``'s box (``margin_mm`` of context) and the probabilities (X, Y, Z) it was found from: the view
    along ``axis`` on every LOCALISE_STRIDE-th slice (0, stride, ...; the other slices 0)."""
    s = LOCALISE_STRIDE
    p = segment_view(model, norm, spacing, axis, grid_mm, batch_size, autocast_ctx, progress, normalised=True,
                     stride=s)
    sub = np.take(p, range(0, p.shape[axis], s), axis=axis) >= threshold  # the slices segmented, side by side
    core_ = pp.largest_component(sub)
    if not core_.any():
        return None, p
    sp = tuple(x * s if i == axis else x for i, x in enumerate(spacing))
    box = list(roi_box(core_.astype(np.float32), sp, margin_mm))
    box[axis] = slice(box[axis].start * s, min(p.shape[axis], box[axis].stop * s))
    return tuple(box), p


def localise_in_field(model: nn.Module, norm: np.ndarray, spacing: tuple[float, float, float], axis: int,
                      grid_mm: float, threshold: float = 0.5, batch_size: int = 1, autocast_ctx=None, progress=None,
                      localiser: Localiser | None = None
                      ) -> tuple[tuple[slice, slice, slice] | None, np.ndarray | None]:
    """``localise_pass`` of the segmenting model, over the localiser's field (``Localiser.field``) when one is given
    and finds something, else over the whole volume. -> (the box in the volume's voxels, or None; the pass's
    probabilities over that box, or None). When the box the model finds in the field reaches the field's edge
    where the volume goes on (the field was too narrow for ROI_MARGIN_MM of context), the pass is run again over
    the whole volume, so the box is always the one the whole-volume pass would give, bar the pass's reading
    far from the atrium."""
    field = localiser.field(norm, spacing, axis, batch_size) if localiser is not None else None
    if field is not None:
        box, p = localise_pass(model, np.ascontiguousarray(norm[field]), spacing, axis, grid_mm, threshold,
                               batch_size, autocast_ctx, progress)
        # kept unless the model sees nothing there or its box reaches the field's edge: then the whole volume below
        if box is not None and all((b.start > 0 or f.start == 0) and (b.stop < f.stop - f.start or f.stop == n)
                                   for b, f, n in zip(box, field, norm.shape)):
            return tuple(slice(f.start + b.start, f.start + b.stop) for b, f in zip(box, field)), p[box]
    box, p = localise_pass(model, norm, spacing, axis, grid_mm, threshold, batch_size, autocast_ctx, progress)
    return box, (p[box] if box is not None else None)


def localised_slices(box: tuple[slice, slice, slice], axis: int, stride: int = 0) -> np.ndarray:
    """Which slices along ``axis`` of the box ``box`` the localising pass segmented (bool, one per slice):
    those at multiples of ``stride`` (LOCALISE_STRIDE if 0) in the whole volume."""
    stride = stride or LOCALISE_STRIDE
    return np.arange(box[axis].start, box[axis].stop) % stride == 0


LOCALISER_STRIDE = 4  # slices the localiser reads: one in 4 along the first view (a field needs no more)
FIELD_MARGIN_MM = 60.0  # around the localiser's finding: the model's own box (ROI_MARGIN_MM) must fit inside
LOCALISER_TASK = "atrium_localiser"  # its weights and card: weights/atrium_localiser.pt + .json
LOCALISER_GRID_MM = 2.5
LOCALISER_KWARGS = {"in_channels": 2 * pp.ATRIUM_CONTEXT + 1, "out_channels": 1, "base": 8, "depth": 4}
LOCALISER_RECIPE = {"epochs": 16, "batch_size": 32, "lr": 2e-3, "crop": 64, "samples_per_epoch": 4000}


@dataclass
class Localiser:
    """A small U-Net (``LOCALISER_KWARGS``) trained on a coarse grid only to find roughly where the atrium is: the
    field that the segmenting model's own localising pass (about half of a 256x256x130 volume's time when it reads
    the whole volume) then reads. Its probabilities never reach the mask or the box.

    Out of fold (the five kept fold models, each with a localiser trained on its training volumes, their 16 MSD
    validation volumes; benchmarks/atrium_localiser_field_oof.py): Dice 0.8991 -> 0.8984 (none worse by 0.01),
    HD95 6.66 -> 6.60 mm, volume error +0.92 -> +1.16 %, 2.34 -> 1.78 s median (bfloat16)."""

    model: nn.Module
    grid_mm: float = LOCALISER_GRID_MM
    threshold: float = 0.5
    card: dict = field(default_factory=dict)
    precision: str = "float32"  # of its passes (core.precision.autocast)

    def __post_init__(self) -> None:
        lo, hi = pp.ATRIUM_GRID_RANGE_MM
        if not lo <= self.grid_mm <= hi:
            raise ValueError(f"grid_mm must be {lo}-{hi} mm, got {self.grid_mm}")
        if not 0 < self.threshold < 1:
            raise ValueError(f"threshold must lie in (0, 1), got {self.threshold}")

    def field(self, norm: np.ndarray, spacing: tuple[float, float, float], axis: int, batch_size: int = 16,
              margin_mm: float = FIELD_MARGIN_MM) -> tuple[slice, slice, slice] | None:
        """The part of a normalised canonical volume (X, Y, Z) the segmenting model's localising pass need read:
        the box around the largest piece this network finds on every LOCALISER_STRIDE-th slice along ``axis``
        (read on its own grid, never resampled back), with ``margin_mm`` of context, its start moved down to a
        multiple of UNET_MULTIPLE voxels on every axis (so that, on a volume already on the model's grid, the
        pass reads the field's pixels at the same alignment to the U-Net's pooling as over the whole volume,
        and the same slices as ``localised_slices``); None when it finds nothing."""
        v = view(norm, axis)
        padded, geom = pp.atrium_padded(v, view_spacing(spacing, axis), self.grid_mm, normalised=True)
        idx = list(range(0, v.shape[2], LOCALISER_STRIDE))
        rx, ry = geom.resampled_xy
        w = 2 * pp.ATRIUM_CONTEXT + 1
        probs = []
        with model_lock(self.model), torch.inference_mode(), autocast(self.precision):
            for b in range(0, len(idx), batch_size):
                x = torch.stack([padded[i:i + w] for i in idx[b:b + batch_size]])
                probs.append(_passes(self.model, x.contiguous(memory_format=torch.channels_last), [()])[:, :rx, :ry])
        found = pp.largest_component(torch.cat(probs).numpy() >= self.threshold)  # (slices read, rx, ry)
        if not found.any():
            return None
        nz = np.argwhere(found)
        lo, hi = nz.min(0).astype(float), nz.max(0).astype(float) + 1  # slice index, row, column on its grid
        vox = (v.shape[0] / rx, v.shape[1] / ry)  # the view's voxels per grid pixel
        sp = view_spacing(spacing, axis)
        # (start, stop) in the view's voxels: the slices read stand for the LOCALISER_STRIDE slices from each
        ext = [(lo[1] * vox[0], hi[1] * vox[0]), (lo[2] * vox[1], hi[2] * vox[1]),
               (idx[int(lo[0])], idx[int(hi[0]) - 1] + LOCALISER_STRIDE)]
        out = []
        for (a, b), n, mm in zip(ext, v.shape, sp):
            m = margin_mm / mm
            start = max(0, int(math.floor(a - m)))
            out.append(slice(start // pp.UNET_MULTIPLE * pp.UNET_MULTIPLE, min(n, int(math.ceil(b + m)))))
        box = [out[0], out[1]]
        box.insert(axis, out[2])  # the view's (rows, columns, slices) back to the volume's axes
        return tuple(box)


def inference_localiser(net: nn.Module, card: dict) -> Localiser:
    """A trained localiser network (left untouched) and its card, ready as the app runs it: a copy with batch norm
    folded, channels-last, in bfloat16 where the CPU runs it natively (a network this narrow, 8 channels, took
    0.29 s for the 256x256x130 benchmark volume's slices in float32 with batch norm; 0.11 s so)."""
    import copy

    from core.models import optimize_for_inference
    from core.precision import inference_precision

    return Localiser(optimize_for_inference(copy.deepcopy(net).eval()), float(card["input_spec"]["spacing_mm"]),
                     float(card.get("threshold", 0.5)), card, inference_precision(int8_ready=False))


def load_localiser(wdir=None) -> Localiser:
    """The localiser saved in ``wdir`` (``LOCALISER_TASK``.pt + card), checksum-verified, as the app runs it."""
    from core.checkpoint import load_state_dict
    from core.models import build_model

    state, card = load_state_dict(LOCALISER_TASK, wdir)
    net = build_model(card["architecture"]["name"], **card["architecture"]["kwargs"])
    net.load_state_dict(state)
    return inference_localiser(net, card)


def named_network(card: dict, key: str, load: Callable, what: str, task: str, wdir=None):
    """The auxiliary network an atrium model's card names under ``input_spec[key]`` (its weights' sha256), loaded
    from ``wdir`` with ``load``; None when the card names none. A missing or damaged file, or other weights than
    the card names, raises ``MissingWeightsError`` (``what``: the network in words, ``task``: its files' stem):
    the card's figures were measured with that network."""
    from core.errors import MissingWeightsError

    rec = card.get("input_spec", {}).get(key)
    if not rec:
        return None
    where = wdir or "weights/"
    try:
        net = load(wdir)
    except MissingWeightsError as exc:  # its own message would name a task train_all does not know
        raise MissingWeightsError(f"The atrium model's {what} ({task}.pt and .json in {where}) is missing or "
                                  "damaged. Restore weights/ from the repository, or train the atrium model with "
                                  "`python train_all.py --tasks atrium`.") from exc
    if net.card.get("weights_sha256") != rec.get("weights_sha256"):
        raise MissingWeightsError(f"The atrium {what} in {where} is not the one the atrium model's card names "
                                  "(checksum differs). Restore weights/ from the repository, or train the atrium "
                                  "model with `python train_all.py --tasks atrium`.")
    return net


def localiser_for(card: dict, wdir=None) -> Localiser | None:
    """The localiser an atrium model's card names (``input_spec.localiser``), checked (``named_network``); None
    when it names none (the model's own localising pass then finds the box)."""
    return named_network(card, "localiser", load_localiser, "localiser", LOCALISER_TASK, wdir)


def localiser_record(card: dict) -> dict:
    """What an atrium card's ``input_spec.localiser`` says of the localiser (its own ``card``) that the atrium
    card's figures were measured with."""
    grid = float(card["input_spec"]["spacing_mm"])
    return {"task": LOCALISER_TASK, "weights_sha256": card.get("weights_sha256"), "grid_mm": grid,
            "rule": (f"fused path: this network reads one slice in {LOCALISER_STRIDE} of the first view on a "
                     f"{grid:g} mm grid; the segmenting model's localising pass then reads only the field "
                     f"around its largest piece ({FIELD_MARGIN_MM:g} mm of context) and finds the box as over the "
                     "whole volume, which it reads instead when the localiser finds nothing or the box reaches the "
                     "field's edge")}


REFINER_TASK = "atrium_refiner"


def inference_refiner(net: nn.Module, card: dict) -> Refiner:
    """A trained refiner network and its card, ready as the app runs it (bfloat16 where the CPU runs it natively)."""
    from core.precision import native_bf16

    spec = card["input_spec"]
    return Refiner(net.eval(), float(spec["grid_mm"]), float(spec["margin_mm"]), card,
                   bf16=native_bf16(torch.device("cpu")))


def load_refiner(wdir=None) -> Refiner:
    """The refiner saved in ``wdir`` (``REFINER_TASK``.pt + card), checksum-verified, as the app runs it."""
    from core.checkpoint import load_state_dict
    from core.refine3d import RefinerNet

    state, card = load_state_dict(REFINER_TASK, wdir)
    net = RefinerNet(**card["architecture"]["kwargs"])
    net.load_state_dict(state)
    return inference_refiner(net, card)


def refiner_for(card: dict, wdir=None) -> Refiner | None:
    """The 3D refiner an atrium model's card names (``input_spec.refiner``), checked (``named_network``); None
    when it names none."""
    return named_network(card, "refiner", load_refiner, "3D refiner", REFINER_TASK, wdir)


def refiner_record(card: dict) -> dict:
    """What an atrium card's ``input_spec.refiner`` says of the refiner (its own ``card``) its figures were
    measured with."""
    spec = card["input_spec"]
    return {"task": REFINER_TASK, "weights_sha256": card.get("weights_sha256"), "grid_mm": spec["grid_mm"],
            "margin_mm": spec["margin_mm"],
            "rule": (f"after the views: a 3D network reads the image and the probabilities of the box around the mask "
                     f"(+{spec['margin_mm']:g} mm) on a {spec['grid_mm']:g} mm grid and adds a correction to the "
                     "logits; the mask is the largest component of the corrected probabilities at the threshold")}


def blend_slices(p: np.ndarray, axis: int) -> np.ndarray:
    """``p`` (any 3D shape) with each slice along ``axis`` blended 1/4, 1/2, 1/4 with its two neighbours (the
    edge slices repeated, so a constant stays constant and the sum along ``axis`` is kept away from the edges)."""
    if not 0 <= axis < p.ndim:
        raise ValueError(f"axis {axis} is not an axis of a {p.ndim}-D array")
    q = np.moveaxis(p, axis, 0)
    pad = np.concatenate([q[:1], q, q[-1:]])
    return np.moveaxis(0.25 * pad[:-2] + 0.5 * pad[1:-1] + 0.25 * pad[2:], 0, axis).astype(p.dtype, copy=False)


def segment_canonical(model: nn.Module, data: np.ndarray, spacing: tuple[float, float, float],
                      views: tuple[int, ...], grid_mm: float, threshold: float = 0.5, batch_size: int = 1,
                      autocast_ctx=None, progress=None, roi: bool = True, flips: int = 1,
                      fused_flips: int = 1, localiser: Localiser | None = None,
                      refiner: Refiner | None = None) -> AtriumPrediction:
    """``segment_views`` of a canonical (X, Y, Z) volume, normalised once as a whole; then, with a ``refiner``
    (and a threshold above 0), its 3D correction of the probabilities and mask around the mask found
    (``core.refine3d``), the views' own masks left as they were."""
    norm = pp.normalise_volume(np.asarray(data))
    pred = segment_views(model, norm, spacing, views, grid_mm, threshold, batch_size, autocast_ctx, progress, roi,
                         flips, fused_flips, localiser)
    if refiner is None or threshold <= 0 or not pred.mask.any():
        return pred
    unsure_2d = uncertain_ratio(pred.prob, pred.mask, threshold, pred.box)
    prob, mask, rbox = refiner.refine(norm, pred.prob, pred.mask, spacing, threshold)
    box = pred.box
    if box is not None and rbox is not None:  # the measures over the box must still see every voxel that counts
        box = tuple(slice(min(a.start, b.start), max(a.stop, b.stop)) for a, b in zip(box, rbox))
    return AtriumPrediction(prob, pred.view_masks, mask.astype(pred.mask.dtype), pred.views, box, unsure_2d)


def segment_views(model: nn.Module, norm: np.ndarray, spacing: tuple[float, float, float],
                  views: tuple[int, ...], grid_mm: float, threshold: float = 0.5, batch_size: int = 1,
                  autocast_ctx=None, progress=None, roi: bool = True, flips: int = 1,
                  fused_flips: int = 1, localiser: Localiser | None = None) -> AtriumPrediction:
    """Fused multi-view segmentation of a normalised canonical (X, Y, Z) volume (``pp.normalise_volume``).

    With several views and ``roi``, the atrium is first localised (``localise``: the first view on every
    LOCALISE_STRIDE-th slice; with a ``localiser``, only over the field it finds: ``localise_in_field``), then
    every view runs only on the box around it (plus ``ROI_MARGIN_MM`` of
    context; outside it the probability is 0): three views cost about one pass instead of three. The first
    view keeps the localising pass's probabilities on the slices that pass read (``localised_slices``), then is
    blended across its slices (``blend_slices``). When the
    localising pass finds nothing, the first view runs on the whole volume and the others around what it
    finds (on the whole volume too if it finds nothing), so a volume the model cannot read at a glance still
    gets every chance.
    A single axial view is replaced by the slab's own axis, or by three fused views on a volume that is wide
    in every direction (``resolve_views``); ``flips`` is for a single view, ``fused_flips`` (1 or 2, see
    FUSED_TTA_CHOICES) for each of the fused views in the box: the first view's reading above is its plain pass,
    each further flip one more pass over the whole box."""
    if fused_flips not in FUSED_TTA_CHOICES:
        raise ValueError(f"fused_flips must be one of {FUSED_TTA_CHOICES}, got {fused_flips}")
    views = resolve_views(views, np.shape(norm), spacing)
    if len(views) > 1:
        flips = fused_flips
    else:
        flips = capped_flips(flips, np.shape(norm), spacing, views[0], grid_mm)
    masks = []
    box = None
    if roi and len(views) > 1:
        box, loc = localise_in_field(model, norm, spacing, views[0], grid_mm, threshold, batch_size, autocast_ctx,
                                     (lambda f: progress(f / (len(views) + 1))) if progress else None, localiser)
        if box is not None:  # every view, the first too, runs on the box around the atrium found
            # Outside the box every view's probability is 0, so sums, the mask's largest piece and the quality
            # measures are taken over the box alone (~0.2-0.3 s less on a 256x256x130 volume than over the
            # whole volume), with the same numbers; full-size arrays are filled only for the result.
            sub = np.ascontiguousarray(norm[box])
            acc = np.zeros(sub.shape, np.float32)
            # The first view's slices that the localising pass segmented keep its probabilities (read over the
            # whole slice, not the box): the box pass runs on the others only. Out of fold (16 MSD volumes, five
            # fold models) this beat re-segmenting them in the box on all three measures: Dice 0.8977 -> 0.8986
            # (12 volumes better, none worse by 0.01), HD95 6.80 -> 6.67 mm, volume error +1.7 -> +0.7 %, and it
            # saves half of that pass (benchmarks/atrium_localise_reuse_oof.py).
            done = localised_slices(box, views[0])
            for k, ax in enumerate(views):
                cb = (lambda f, k=k: progress((k + 1 + f) / (len(views) + 1))) if progress else None
                if k == 0:
                    p = segment_view(model, sub, spacing, ax, grid_mm, batch_size, autocast_ctx, cb, normalised=True,
                                     slices=np.flatnonzero(~done).tolist())
                    keep = [slice(None)] * 3
                    keep[ax] = done
                    p[tuple(keep)] = loc[tuple(keep)]
                    # Every 2nd slice is now read over the whole slice and the others in the box: two readings
                    # whose areas differ a little, so the mask's area stepped from slice to slice (roughness 0.052
                    # against the expert's 0.018). Blending each slice with its neighbours mixes the two readings
                    # half and half on every slice: out of fold (the 16 MSD volumes, five fold models) roughness
                    # 0.052 -> 0.022, Dice 0.8986 -> 0.8991, HD95 6.67 -> 6.66 mm, volume error +0.7 -> +0.9 %
                    # (benchmarks/atrium_localise_reuse_oof.py, last variant).
                    p = blend_slices(p, ax)
                    if flips > 1:  # the flipped passes read every slice of the box (one reading each: no blend)
                        p = (p + (flips - 1) * segment_view(model, sub, spacing, ax, grid_mm, batch_size, autocast_ctx,
                                                             None, normalised=True, flip_set=TTA_FLIPS[flips][1:])
                             ) / flips
                else:
                    p = segment_view(model, sub, spacing, ax, grid_mm, batch_size, autocast_ctx, cb, normalised=True,
                                     flips=flips)
                masks.append(_embed(p >= threshold, box, norm.shape, fill=threshold <= 0))
                acc += p
            prob_box = acc / len(views)
            prob = _embed(prob_box.astype(np.float16), box, norm.shape)
            if threshold > 0:
                return AtriumPrediction(prob, masks, _embed(pp.largest_component(prob_box >= threshold), box,
                                                            norm.shape), views, box)
            return AtriumPrediction(prob, masks, pp.largest_component(prob >= threshold), views)
    acc = np.zeros(norm.shape, np.float32)
    for k, ax in enumerate(views):
        cb = (lambda f, k=k: progress((k + f) / len(views))) if progress else None
        if k == 0 or box is None:
            p = np.mean(flip_pass_probs(model, norm, spacing, grid_mm, ax, batch_size, autocast_ctx, flips, cb), axis=0)
            if k == 0 and roi and len(views) > 1:
                # the box around the first view's largest piece: stray specks elsewhere would widen it
                core_ = pp.largest_component(p >= threshold)
                box = roi_box(core_.astype(np.float32), spacing) if core_.any() else None
        else:
            p = np.zeros(norm.shape, np.float32)
            p[box] = segment_view(model, np.ascontiguousarray(norm[box]), spacing, ax, grid_mm, batch_size,
                                  autocast_ctx, cb, normalised=True, flips=flips)
        masks.append(p >= threshold)
        acc += p
    prob = acc / len(views)
    mask = pp.largest_component(prob >= threshold)
    return AtriumPrediction(prob.astype(np.float16), masks, mask, views)


# --------------------------------------------------------------------------- quality check


@dataclass
class QualityReport:
    """Whether a mask can be reported, and why not, in words for a clinician."""

    reliable: bool
    reasons: list[str] = field(default_factory=list)
    measures: dict[str, float] = field(default_factory=dict)


def quality_measures(pred: AtriumPrediction, spacing: tuple[float, float, float],
                     threshold: float = 0.5, image: np.ndarray | None = None) -> dict[str, float]:
    """Numbers the check rests on: volume, the share of the raw mask (probability >= ``threshold``, the
    mask's own) kept as one component, the share of uncertain voxels (after a refiner, the 2D views' own:
    ``AtriumPrediction.uncertain_ratio_2d``), the agreement between views, the
    field of view and, given the ``image`` (X, Y, Z) on the mask's grid, the mask's brightness: the share of
    the image's voxels darker than the mean inside the mask (see MIN_MASK_BRIGHTNESS)."""
    vox_ml = float(np.prod(spacing)) / 1000.0
    r = _measured_region(pred.box, threshold)
    prob = pred.prob[r]
    n_raw = int((prob >= threshold).sum())
    n_mask = int(pred.mask.sum())
    unsure = (pred.uncertain_ratio_2d if pred.uncertain_ratio_2d is not None
              else uncertain_ratio(pred.prob, pred.mask, threshold, pred.box))
    agree = [1.0]
    for i in range(len(pred.view_masks)):
        for j in range(i + 1, len(pred.view_masks)):
            a, b = pred.view_masks[i][r], pred.view_masks[j][r]
            s = int(a.sum()) + int(b.sum())
            agree.append(2 * int((a & b).sum()) / s if s else 1.0)
    bright = {}
    if image is not None and n_mask:
        img = np.asarray(image, dtype=np.float32)
        # the mask's voxels in the same order as over the whole volume (a box keeps C order): the same mean
        inside = float(img[r][pred.mask[r] > 0].mean())
        bright = {"mask_brightness": float((img < inside).mean())}
    return {
        **bright,
        "volume_ml": n_mask * vox_ml,
        "kept_fraction": n_mask / n_raw if n_raw else 0.0,
        "uncertain_ratio": unsure,
        "view_agreement": float(min(agree)),
        "min_extent_mm": float(min(s * n for s, n in zip(spacing, pred.prob.shape))),
        "fused": float(len(pred.view_masks) > 1),  # 1: three views fused, judged by the fused limits
    }


@dataclass(frozen=True)
class QualityRule:
    """Limits of the quality check. ``max_uncertain_ratio`` and ``min_view_agreement`` are fitted on the
    training volumes (recorded in the card); the others are anatomy."""

    max_uncertain_ratio: float = 0.6
    min_view_agreement: float = 0.7
    min_kept_fraction: float = 0.6
    volume_range_ml: tuple[float, float] = LA_VOLUME_RANGE_ML
    min_extent_mm: float = MIN_EXTENT_MM
    min_mask_brightness: float = MIN_MASK_BRIGHTNESS

    @classmethod
    def from_card(cls, card: dict, fused: bool = False) -> QualityRule:
        """The card's limits for a single view, or (``fused``) for three fused views when it has them."""
        qc = card.get("quality_check", {})
        q = (qc.get("limits_fused") if fused else None) or qc.get("limits", {})
        return cls(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in q.items()
                      if k in cls.__dataclass_fields__})


def judge(m: dict[str, float], rule: QualityRule) -> QualityReport:
    reasons = []
    if m["min_extent_mm"] < rule.min_extent_mm:
        reasons.append(f"the volume covers only {m['min_extent_mm']:.0f} mm in one direction; a left atrium "
                       f"needs at least {rule.min_extent_mm:.0f} mm (is this a 3D atrial MRI, with a correct header?)")
    lo, hi = rule.volume_range_ml
    if m["volume_ml"] <= 0:
        reasons.append("no atrium was found")
    elif not lo <= m["volume_ml"] <= hi:
        reasons.append(f"the segmented volume ({m['volume_ml']:.1f} mL) is outside the range of a left atrium "
                       f"({lo:.0f}-{hi:.0f} mL)")
    if m["volume_ml"] > 0 and m["kept_fraction"] < rule.min_kept_fraction:
        reasons.append(f"the raw segmentation is fragmented (the largest piece holds {m['kept_fraction']:.0%} of it)")
    if m["volume_ml"] > 0 and m["uncertain_ratio"] > rule.max_uncertain_ratio:
        reasons.append(f"the model is unsure of much of the mask (uncertain voxels = {m['uncertain_ratio']:.0%} of "
                       f"the mask; limit {rule.max_uncertain_ratio:.0%})")
    if m["volume_ml"] > 0 and m["view_agreement"] < rule.min_view_agreement:
        reasons.append(f"segmentations along the three slice directions disagree (Dice {m['view_agreement']:.2f}; "
                       f"limit {rule.min_view_agreement:.2f})")
    if m["volume_ml"] > 0 and m.get("mask_brightness", 1.0) < rule.min_mask_brightness:
        reasons.append(f"the segmented region is darker than {1 - m['mask_brightness']:.0%} of the scan, unlike the "
                       "bright blood of the atrium on the sequences the model knows (bSSFP, LGE): is this a dark-blood "
                       "or inverted image?")
    return QualityReport(not reasons, reasons, m)


def slice_uncertainty_cm2(prob: np.ndarray, spacing: tuple[float, float, float], axis: int = 2) -> np.ndarray:
    """Per slice along ``axis``: area (cm2) where the model is unsure (probability in UNCERTAIN_BAND)."""
    lo, hi = UNCERTAIN_BAND
    unsure = (prob > lo) & (prob < hi)
    other = [i for i in range(3) if i != axis]
    px_cm2 = spacing[other[0]] * spacing[other[1]] / 100.0
    return unsure.sum(axis=tuple(other)) * px_cm2


def rule_for(m: dict[str, float], card: dict) -> QualityRule:
    """The card's limits for the mode the measures ``m`` were taken in (single view, or three fused views)."""
    return QualityRule.from_card(card, fused=bool(m.get("fused", 0.0)))


def judge_with_card(m: dict[str, float], card: dict) -> QualityReport:
    """Judge quality measures with the card's limits for the mode they were taken in (``rule_for``)."""
    return judge(m, rule_for(m, card))


# --------------------------------------------------------------------------- prediction (the app's path)


@dataclass
class AtriumResult:
    mask: np.ndarray  # (X, Y, Z) uint8 on the input grid
    volume_ml: float
    spacing: tuple[float, float, float]
    prob: np.ndarray | None = None  # (X, Y, Z) float16 mean probability of the views, on the input grid
    quality: QualityReport | None = None  # whether the mask may be reported, and why not
    views: tuple[int, ...] = (2,)  # axes of the canonical orientation actually segmented (and fused)

    @property
    def reliable(self) -> bool:
        return self.quality is None or bool(self.quality.reliable)


def segment_atrium(lm: LoadedModel, volume: Volume, batch_size: int = 8,
                   progress: Callable[[float], None] | None = None) -> AtriumResult:
    """Segment the left atrium and return a mask on the input's grid, with a quality verdict.

    The volume is brought to the closest RAS orientation by its affine, segmented slice by slice (2.5D
    U-Net) along each view the card lists, the views' probabilities averaged, the largest component
    kept, and everything put back in the input's voxel order. The quality check (``judge``) says whether
    the mask may be reported.
    """
    data_c, sp_c, orient = to_canonical(volume.data, volume.affine, volume.spacing)
    views = tuple(int(v) for v in lm.card.get("input_spec", {}).get("views", [2]))
    flips = int(lm.card.get("input_spec", {}).get("tta_flips", 1))
    with model_lock(lm.model):
        pred = segment_canonical(lm.model, data_c, sp_c, views, lm.grid_mm, lm.threshold, batch_size,
                                 lambda: autocast(lm.precision), progress, flips=flips, localiser=lm.localiser,
                                 refiner=lm.refiner)
    quality = judge_with_card(quality_measures(pred, sp_c, lm.threshold, data_c), lm.card)
    mask = from_canonical(pred.mask, orient)
    prob = from_canonical(pred.prob, orient)
    views = pred.views  # the slab's own axis for a single-view model (resolve_views)
    del pred, data_c
    release_memory()
    return AtriumResult(mask, volume_ml(mask, volume.spacing), volume.spacing, prob, quality, views)


# --------------------------------------------------------------------------- training data


@dataclass
class ViewStack:
    """One volume sliced along one axis, on the training grid: ``padded`` (Z + 2c, H, W) normalised
    slices (2.5D windows are cut from it), ``label`` (Z, H, W) uint8, per-slice atrium centroids."""

    case_id: str
    dataset: str
    axis: int
    padded: torch.Tensor
    label: torch.Tensor
    fg: np.ndarray  # (Z,) bool: slice shows atrium
    centres: np.ndarray  # (Z, 2) float


def build_view_stacks(case_id: str, dataset: str, data: np.ndarray, label: np.ndarray,
                      spacing: tuple[float, float, float], grid_mm: float, min_side: int,
                      axes: tuple[int, ...] = VIEWS_ALL) -> list[ViewStack]:
    """Slices of one canonical volume along ``axes``, padded to at least ``min_side`` (crop side)."""
    out = []
    for ax in axes:
        v, lab = view(data, ax), view(label, ax)
        padded, geom = pp.atrium_padded(v, view_spacing(spacing, ax), grid_mm)
        lab_s = pp.atrium_label_slices(lab, geom)
        h, w = padded.shape[1:]
        ph, pw = max(0, min_side - h), max(0, min_side - w)
        if ph or pw:
            low = float(padded.min())
            padded = F.pad(padded, (0, pw, 0, ph), value=low)
            lab_s = F.pad(lab_s, (0, pw, 0, ph))
        lab_u8 = (lab_s > 0.5).to(torch.uint8)
        area = lab_u8.sum(dim=(1, 2)).numpy()
        hh, ww = lab_u8.shape[1:]
        r = (lab_u8.sum(2).float() * torch.arange(hh)).sum(1).numpy() / np.maximum(area, 1)
        c = (lab_u8.sum(1).float() * torch.arange(ww)).sum(1).numpy() / np.maximum(area, 1)
        out.append(ViewStack(case_id, dataset, ax, padded.half(), lab_u8, area > 0, np.stack([r, c], 1)))
    return out


AXIAL_FRACTION = 0.5  # the app segments along the axial view; the other two keep it robust to the slice plane


def sample_batch_items(stacks: list[ViewStack], n: int, rng: np.random.Generator,
                       fg_fraction: float = 0.7, axial_fraction: float = AXIAL_FRACTION
                       ) -> list[tuple[int, int, bool]]:
    """``n`` (stack index, slice, centred-on-atrium) items: datasets equally often, then a volume, then its
    axial stack (``axial_fraction`` of the time) or one of its other views, then a slice that shows the
    atrium (``fg_fraction`` of the time) or any slice."""
    if not 0.0 <= axial_fraction <= 1.0 or not 0.0 <= fg_fraction <= 1.0:
        raise ValueError("axial_fraction and fg_fraction must lie in [0, 1]")
    by_ds: dict[str, dict[str, dict[int, int]]] = {}
    for i, s in enumerate(stacks):
        by_ds.setdefault(s.dataset, {}).setdefault(s.case_id, {})[s.axis] = i
    names = sorted(by_ds)
    items = []
    for _ in range(n):
        cases = by_ds[names[int(rng.integers(len(names)))]]
        views = cases[sorted(cases)[int(rng.integers(len(cases)))]]
        others = [a for a in sorted(views) if a != 2]
        if 2 in views and (not others or rng.random() < axial_fraction):
            si = views[2]
        else:
            si = views[others[int(rng.integers(len(others)))]]
        s = stacks[si]
        fg = np.flatnonzero(s.fg)
        if len(fg) and rng.random() < fg_fraction:
            items.append((si, int(rng.choice(fg)), True))
        else:
            items.append((si, int(rng.integers(len(s.fg))), False))
    return items


def crop_items(stacks: list[ViewStack], items: list[tuple[int, int, bool]], crop: int,
               rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Crops of side ``crop``: around the atrium (+- crop/3) for centred items, anywhere otherwise.
    -> x (N, 2c+1, crop, crop) float32, y (N, crop, crop) float32."""
    w = 2 * pp.ATRIUM_CONTEXT + 1
    xs, ys = [], []
    for si, z, centred in items:
        s = stacks[si]
        h, wd = s.padded.shape[1:]
        if centred:
            cr, cc = s.centres[z] + rng.uniform(-crop / 3, crop / 3, 2)
        else:
            cr, cc = rng.uniform(crop / 2, max(crop / 2, h - crop / 2)), rng.uniform(crop / 2, max(crop / 2, wd - crop / 2))
        t = int(np.clip(round(cr - crop / 2), 0, h - crop))
        l = int(np.clip(round(cc - crop / 2), 0, wd - crop))
        xs.append(s.padded[z : z + w, t : t + crop, l : l + crop])
        ys.append(s.label[z, t : t + crop, l : l + crop])
    return torch.stack(xs).float(), torch.stack(ys).float()


def augment(x: torch.Tensor, y: torch.Tensor, gen: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Geometric and acquisition augmentation of a batch. x (N, C, H, W) z-scored, y (N, H, W).

    Geometry: any of the 8 in-plane rotations/flips (a scanner may write any), then a small random
    rotation/scale/shift. Contrast: gamma, a smooth multiplicative bias field, contrast and offset,
    Gaussian blur or noise, and rarely an inverted contrast, so that a sequence the model has not seen
    degrades gracefully instead of collapsing.

    ``gen`` drives the flips and the intensity changes; the small rotation/scale/shift
    (``core.train.random_affine``) draws from torch's global generator, so a caller that needs the same batch
    twice seeds that too (training seeds it; ``int8_calibration_feed`` seeds it locally).
    """
    from core.train import random_affine

    n = x.shape[0]
    r = torch.rand(n, 8, generator=gen)
    xs, ys = [], []
    for i in range(n):
        xi, yi = x[i], y[i]
        if r[i, 0] < 0.5:
            xi, yi = xi.transpose(-1, -2), yi.transpose(-1, -2)
        if r[i, 1] < 0.5:
            xi, yi = xi.flip(-1), yi.flip(-1)
        if r[i, 2] < 0.5:
            xi, yi = xi.flip(-2), yi.flip(-2)
        xs.append(xi)
        ys.append(yi)
    x, y = torch.stack(xs), torch.stack(ys)
    x, ya = random_affine(x, y[:, None], rot_deg=15, scale=0.15, shift=0.05)
    y = ya[:, 0]
    # intensity: work on [0, 1] per sample, then back to zero mean / unit spread
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    u = (x - lo) / (hi - lo).clamp(min=1e-6)
    gamma = torch.exp((torch.rand(n, 1, 1, 1, generator=gen) * 2 - 1) * math.log(2.0))
    u = u.clamp(min=1e-6) ** gamma
    hh, ww = x.shape[-2:]
    yy = torch.linspace(-1, 1, hh).view(1, 1, hh, 1)
    xx = torch.linspace(-1, 1, ww).view(1, 1, 1, ww)
    c = (torch.rand(n, 5, generator=gen) * 2 - 1) * 0.35
    bias = torch.exp(c[:, 0].view(n, 1, 1, 1) * yy + c[:, 1].view(n, 1, 1, 1) * xx
                     + c[:, 2].view(n, 1, 1, 1) * yy * xx + c[:, 3].view(n, 1, 1, 1) * (yy**2 - 0.33))
    u = u * bias
    inv = (r[:, 3] < 0.05).view(n, 1, 1, 1)
    u = torch.where(inv, u.amax(dim=(1, 2, 3), keepdim=True) - u, u)
    blur = r[:, 4] < 0.2
    if blur.any():
        k = torch.tensor([0.25, 0.5, 0.25])
        kern = (k[:, None] * k[None, :]).expand(u.shape[1], 1, 3, 3)
        ub = F.conv2d(F.pad(u[blur], (1, 1, 1, 1), mode="replicate"), kern, groups=u.shape[1])
        u = u.clone()
        u[blur] = ub
    noise = (r[:, 5] < 0.4).view(n, 1, 1, 1) * torch.rand(n, 1, 1, 1, generator=gen) * 0.08
    u = u + noise * torch.randn(u.shape, generator=gen)
    # back to the crop's own mean and spread (inference z-scores whole volumes, so a crop's statistics
    # are whatever its place in the volume gives), with a contrast jitter; 20 % of samples stay clean
    m = u.mean(dim=(1, 2, 3), keepdim=True)
    s = u.std(dim=(1, 2, 3), keepdim=True).clamp(min=1e-6)
    xm = x.mean(dim=(1, 2, 3), keepdim=True)
    xsd = x.std(dim=(1, 2, 3), keepdim=True)
    out = (u - m) / s * xsd * (1 + c[:, 4].view(n, 1, 1, 1) * 0.5) + xm
    clean = (r[:, 6] < 0.2).view(n, 1, 1, 1)
    return torch.where(clean, x, out), y


def slice_agreement(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float],
                    axis: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(Dice per slice along ``axis``, NaN where both are empty; ``disagreement_cm2``) of two masks of one
    grid, computed in the in-plane box around both (outside it both are background: same values)."""
    from core import metrics as M

    p, g = np.asarray(pred) > 0, np.asarray(truth) > 0
    if p.any() or g.any():
        box = list(M.union_box(p, g))
        box[axis] = slice(None)  # every slice keeps its entry
        p, g = p[tuple(box)], g[tuple(box)]
    return M.per_slice_dice(p, g, axis), disagreement_cm2(p, g, spacing, axis)


def disagreement_cm2(pred: np.ndarray, truth: np.ndarray, spacing: tuple[float, float, float],
                     axis: int = 2) -> np.ndarray:
    """Per slice along ``axis``: area (cm2) where prediction and truth disagree (false positive + false
    negative). The viewer's "largest disagreement" slice is its argmax: an edge slice with a few stray
    pixels has Dice 0 but a tiny disagreement, and is not where the mask is most wrong."""
    other = [i for i in range(3) if i != axis]
    diff = np.asarray(pred).astype(bool) != np.asarray(truth).astype(bool)
    return diff.sum(axis=tuple(other)) * spacing[other[0]] * spacing[other[1]] / 100.0


# --------------------------------------------------------------------------- training


@dataclass
class CanonicalCase:
    """A labelled volume brought to canonical orientation (as inference does)."""

    case_id: str
    dataset: str
    data: np.ndarray  # (X, Y, Z) float32
    label: np.ndarray  # (X, Y, Z) uint8
    spacing: tuple[float, float, float]


def load_cases(cases: list, smoke: bool = False) -> list[CanonicalCase]:
    """Read and canonicalise labelled atrium volumes; ``smoke`` keeps a box around the atrium."""
    from tqdm.auto import tqdm

    from core import io as mio

    out = []
    for c in tqdm(cases, desc="read atrium volumes", leave=False, mininterval=2):
        img = mio.load_nifti_path(c.image_path)
        lab = (mio.load_nifti_path(c.label_path).data > 0.5).astype(np.uint8)
        data, sp, _ = to_canonical(img.data, img.affine, img.spacing)
        lab, _, _ = to_canonical(lab, img.affine, img.spacing)
        if smoke and lab.any():
            nz = np.argwhere(lab)
            lo = np.maximum(nz.min(0) - 8, 0)
            hi = nz.max(0) + 9
            box = tuple(slice(a, b) for a, b in zip(lo, hi))
            data, lab = data[box], lab[box]
        out.append(CanonicalCase(c.case_id, c.dataset, np.ascontiguousarray(data, dtype=np.float32),
                                 np.ascontiguousarray(lab), sp))
    return out


def first_per_dataset(cases: list, n: int) -> list:
    """The first ``n`` cases of each dataset (smoke runs)."""
    by: dict[str, list] = {}
    for c in cases:
        by.setdefault(c.dataset, []).append(c)
    return [c for v in by.values() for c in v[:n]]


def volume_folds(n: int, cfg, folds: int = 5) -> list[tuple[list[int], list[int]]]:
    """(train, validation) indices of ``n`` volumes. Fold 1 is the committed model's split (``val_fraction``
    of the volumes, seeded); the other volumes are divided into folds 2..``folds`` for cross-validation."""
    order = np.random.default_rng(cfg.seed).permutation(n)
    n_val = max(1, int(round(n * cfg.val_fraction)))
    parts = [order[:n_val]] + [p for p in np.array_split(order[n_val:], max(1, folds - 1)) if len(p)]
    return [(sorted(int(i) for i in order if i not in set(p.tolist())), sorted(int(i) for i in p)) for p in parts]


def dataset_splits(cases: list, cfg, folds: int = 5) -> list[tuple[list[int], list[int]]]:
    """(train, validation) indices into ``cases`` per fold, split by volume within each dataset (fold 1:
    ``val_fraction`` of each dataset's volumes, seeded; the rest divided into folds 2..``folds``)."""
    by_ds: dict[str, list[int]] = {}
    for i, c in enumerate(cases):
        by_ds.setdefault(c.dataset, []).append(i)
    out: list[tuple[list[int], list[int]]] = [([], []) for _ in range(folds)]
    for idx in by_ds.values():
        for k, (tr, va) in enumerate(volume_folds(len(idx), cfg, folds)):
            out[k][0].extend(idx[i] for i in tr)
            out[k][1].extend(idx[i] for i in va)
    return [(sorted(tr), sorted(va)) for tr, va in out if va]


def predict_case(model: nn.Module, c: CanonicalCase, views: tuple[int, ...], grid_mm: float, device: torch.device,
                 bf16: bool = False, flips: int = 1, threshold: float = 0.5,
                 localiser: Localiser | None = None, refiner: Refiner | None = None) -> AtriumPrediction:
    from core.precision import autocast_for

    return segment_canonical(model, c.data, c.spacing, views, grid_mm, threshold=threshold, batch_size=32,
                             autocast_ctx=lambda: autocast_for(device, bf16), flips=flips, localiser=localiser,
                             refiner=refiner)


# 4 flips only where the volume is small enough on the model's grid (capped_flips): a 256x256x130 single view
# keeps 2, so the 5 s goal holds
TTA_CHOICES = (1, 2, 4)
THRESHOLD_CHOICES = (0.3, 0.35, 0.4, 0.45, 0.5)


def pick_setting(score: dict[tuple[int, float], float], tie: float = 0.002) -> tuple[int, float]:
    """The (flips, threshold) with the highest score; settings within ``tie`` of the best count as equal,
    and among them the fewest flips (faster), then the threshold closest to 0.5, win."""
    best = max(score.values())
    near = [k for k in score if score[k] >= best - tie]
    return min(near, key=lambda k: (k[0], abs(k[1] - 0.5)))


def choose_inference(model: nn.Module, vols: list[CanonicalCase], idx: list[int], grid_mm: float,
                     device: torch.device, bf16: bool = False) -> dict:
    """The single view's test-time flips (1, 2 or 4) and mask threshold with the highest validation Dice
    (mean of the per-dataset means, so that the smaller dataset counts as much as the larger), on the
    validation volumes segmented with one view (``resolve_views``; all of them if none is). Ties
    within 0.002 go to fewer flips (faster) and to 0.5. Returns {"flips", "threshold", "table"}; the
    choice is made on these volumes, so their figure is slightly optimistic (say so wherever shown)."""
    from core import metrics as M
    from core.precision import autocast_for

    from tqdm import tqdm

    dice: dict[tuple[int, float], dict[str, list[float]]] = {}
    single = [i for i in idx if len(resolve_views((2,), vols[i].data.shape, vols[i].spacing)) == 1]
    for i in tqdm(single or idx, desc="choose flips/threshold", leave=False):
        v = vols[i]
        ax = slab_axis(v.data.shape, v.spacing)
        passes = flip_pass_probs(model, pp.normalise_volume(v.data), v.spacing, grid_mm, ax,
                                 autocast_ctx=lambda: autocast_for(device, bf16), n=max(TTA_CHOICES))
        for f in TTA_CHOICES:  # as the app runs it: four flips only on a volume small enough (capped_flips)
            prob = np.mean(passes[:capped_flips(f, v.data.shape, v.spacing, ax, grid_mm)], axis=0)
            for t in THRESHOLD_CHOICES:
                d = M.dice(pp.largest_component(prob >= t), v.label)
                dice.setdefault((f, t), {}).setdefault(v.dataset, []).append(d)
    score = {k: float(np.mean([np.mean(x) for x in by_ds.values()])) for k, by_ds in dice.items()}
    flips, thr = pick_setting(score)
    table = [{"flips": f, "threshold": t, "dice_mean_of_datasets": score[(f, t)],
              **{f"dice_{ds}": float(np.mean(x)) for ds, x in dice[(f, t)].items()}} for f, t in sorted(score)]
    return {"flips": int(flips), "threshold": float(thr), "table": table}


def fit_atrium(vols: list[CanonicalCase], tr: list[int], va: list[int], cfg, device: torch.device,
               desc: str = "atrium", model_kwargs: dict | None = None):
    """Train the U-Net on crops of slices along all three axes of the training volumes (both datasets
    equally often); each epoch, 3D Dice on the validation volumes (one axial pass), averaged per dataset
    then over datasets, picks the kept epoch. With no validation volumes (``va`` empty) the last epoch
    is kept."""
    from core import metrics as M
    from core.models import build_model
    from core.tasks import get_task
    from core.train import fit, set_seed, soft_dice_loss

    spec = get_task("atrium")
    grid = cfg.spacing_mm or float(spec.input_spec["spacing_mm"])
    crop = cfg.crop or 128
    stacks: list[ViewStack] = []
    for i in tr:
        v = vols[i]
        stacks += build_view_stacks(v.case_id, v.dataset, v.data, v.label, v.spacing, grid, crop)
    per_epoch = cfg.samples_per_epoch or 4000
    set_seed(cfg.seed)
    model = build_model(spec.architecture, **(spec.model_kwargs if model_kwargs is None else model_kwargs)).to(device)

    def train_batches(epoch: int):
        rng = np.random.default_rng(cfg.seed * 1000 + epoch)
        gen = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        for _ in range(per_epoch // cfg.batch_size):
            items = sample_batch_items(stacks, cfg.batch_size, rng)
            x, y = crop_items(stacks, items, crop, rng)
            x, y = augment(x, y, gen)
            yield x.to(device).contiguous(memory_format=torch.channels_last), y.to(device)

    def step(net: nn.Module, batch: tuple) -> tuple[torch.Tensor, float]:
        xb, yb = batch
        logits = net(xb)[:, 0].float()
        loss = F.binary_cross_entropy_with_logits(logits, yb) + soft_dice_loss(logits, yb)
        with torch.no_grad():
            pred = logits > 0
            d = float(2 * (pred & (yb > 0.5)).sum() / max(1.0, float(pred.sum() + (yb > 0.5).sum())))
        return loss, d

    def validate(net: nn.Module) -> dict:
        per_ds: dict[str, list[float]] = {}
        for i in va:
            v = vols[i]
            pr = segment_canonical(net, v.data, v.spacing, (2,), grid, batch_size=32)
            per_ds.setdefault(v.dataset, []).append(M.dice(pr.mask, v.label))
        score = float(np.mean([np.mean(d) for d in per_ds.values()])) if per_ds else float("nan")
        return {"loss": 1 - score, "dice": score}

    res = fit(model, train_batches, step, validate, cfg, "dice", desc=desc, keep_last=not va)
    model.eval()
    n_slices = int(sum(len(s.fg) for s in stacks))
    return model, res, n_slices


def fit_localiser(vols: list[CanonicalCase], tr: list[int], device: torch.device, seed: int = 0,
                  desc: str = "atrium localiser", smoke: bool = False) -> tuple[nn.Module, dict]:
    """Train the localiser (``LOCALISER_KWARGS`` on a LOCALISER_GRID_MM grid, ``LOCALISER_RECIPE``) on the
    volumes ``tr`` with the atrium model's sampling and augmentation; the last epoch is kept (it is judged by
    the segmentation it leads to, not by its own Dice). -> (model, its card)."""
    from core.train import TrainConfig, state_sha256

    r = dict(LOCALISER_RECIPE)
    if smoke:
        r.update(epochs=1, samples_per_epoch=256)
    cfg = TrainConfig(epochs=r["epochs"], batch_size=r["batch_size"], lr=r["lr"], patience=r["epochs"], seed=seed,
                      crop=r["crop"], spacing_mm=LOCALISER_GRID_MM, samples_per_epoch=r["samples_per_epoch"])
    model, res, _ = fit_atrium(vols, tr, [], cfg, device, desc=desc, model_kwargs=LOCALISER_KWARGS)
    model.eval()
    card = {
        "task": LOCALISER_TASK, "kind": "segmentation",
        "title": ("Left-atrium localiser: roughly where the atrium is, the field the segmenting model's localising "
                  "pass reads (never the mask or its box)"),
        "architecture": {"name": "UNet2D", "kwargs": dict(LOCALISER_KWARGS)},
        "input_spec": {"spacing_mm": LOCALISER_GRID_MM, "context_slices": pp.ATRIUM_CONTEXT,
                       "slice_stride": LOCALISER_STRIDE, "intensity": "0.5-99.5 percentile clip, z-score per volume"},
        "threshold": 0.5,
        "training": {**r, "seed": seed, "optimizer": "Adam + cosine LR", "loss": "BCE + soft Dice",
                     "augmentation": AUGMENTATION, "kept_epoch_rule": "the last epoch",
                     "seconds": round(res.seconds, 1), "epochs_run": res.epochs_run},
        "data": {"train_cases": [vols[i].case_id for i in tr], "n_train": len(tr)},
        "smoke": smoke, "weights_sha256": state_sha256(model.state_dict()),
    }
    return model, card


def train_localiser(wdir=None, root=None, smoke: bool = False, seed: int = 0) -> Localiser:
    """Train and save (``LOCALISER_TASK``.pt + card in ``wdir``) the localiser on the training volumes of the atrium
    model saved there (its card's ``data.train_cases``): an all-volume model's or a kept cross-validation
    fold's. Returns it."""
    from core import io as mio
    from core.checkpoint import read_card, save_checkpoint
    from core.config import data_root

    root = data_root(root)
    ids = read_card("atrium", wdir)["data"]["train_cases"]
    by_id = {c.case_id: c for c in mio.find_atrium_cases(root)}
    missing = [i for i in ids if i not in by_id]
    if missing:
        from core.errors import MedImgError

        raise MedImgError(f"{len(missing)} training volumes of the atrium model are not under {root} "
                          f"(e.g. {missing[0]}): the localiser is trained on the same volumes")
    vols = load_cases([by_id[i] for i in ids], smoke)
    model, card = fit_localiser(vols, list(range(len(vols))), torch.device("cpu"), seed, smoke=smoke)
    save_checkpoint(model.state_dict(), card, LOCALISER_TASK, wdir)
    return inference_localiser(model, card)


def name_localiser(loc: Localiser, wdir=None) -> dict:
    """Write ``loc`` (saved in ``wdir``) into the atrium card's ``input_spec.localiser`` there; returns the record.
    The card's figures are those of the path without it until ``finish_card`` rescores it."""
    from core.checkpoint import read_card, write_json
    from core.config import weights_dir

    card = read_card("atrium", wdir)
    card["input_spec"]["localiser"] = localiser_record(loc.card)
    write_json(weights_dir(wdir) / "atrium.json", card)
    return card["input_spec"]["localiser"]


def check_fold_localiser(card: dict, rec: dict, where) -> None:
    """Raise ``MedImgError`` unless the localiser whose ``card`` was read from ``where`` was trained on the
    training volumes of the fold ``rec`` (an atrium.cv.json entry): one trained on others would have seen the
    fold's validation volumes."""
    from core.errors import MedImgError

    if card.get("data", {}).get("train_cases") != rec.get("train_cases"):
        raise MedImgError(f"the localiser in {where} was trained on other volumes than fold {rec.get('fold')}'s "
                          "training volumes")


def check_fold_refiner(card: dict, rec: dict, where) -> None:
    """Raise ``MedImgError`` if the refiner whose ``card`` was read from ``where`` trained on a box of one of fold
    ``rec``'s validation volumes (an atrium.cv.json entry): it would have seen their expert masks."""
    from core.errors import MedImgError

    seen = set(card.get("data", {}).get("train_cases", [])) & set(rec.get("val_cases", []))
    if seen:
        raise MedImgError(f"the refiner in {where} trained on {len(seen)} of fold {rec.get('fold')}'s validation "
                          f"volumes (e.g. {sorted(seen)[0]})")


def oof_boxes(folds_dir, root=None, smoke: bool = False, loaded: list | None = None) -> list:
    """A ``core.refine3d.RefineBox`` for every validation volume of every kept fold model in ``folds_dir``
    (``fold<K>``), segmented by that model as the cross-validation scores it (its card's views, flips and
    threshold, its localiser, bfloat16 where native): the out-of-fold probabilities a refiner learns from. Each
    box is the 2D mask's, with REFINE_MARGIN_MM of context (the whole volume when the mask is empty).
    ``loaded``: volumes already read (``load_cases``), used instead of reading them again."""
    from core import io as mio
    from core.config import data_root
    from core.errors import MedImgError
    from core.precision import native_bf16
    from core.refine3d import REFINE_MARGIN_MM, RefineBox

    root = data_root(root)
    by_id = {c.case_id: c for c in mio.find_atrium_cases(root)}
    cpu = torch.device("cpu")
    bf16 = native_bf16(cpu)
    boxes = []
    for k, d in kept_fold_dirs(folds_dir).items():
        lm = load_base("atrium", d, optimize=False)
        model = lm.model.to(memory_format=torch.channels_last)  # as the CV scores it (rescore_folds)
        loc = load_localiser(d) if (d / f"{LOCALISER_TASK}.pt").is_file() else None
        spec = lm.card["input_spec"]
        views, flips = tuple(spec.get("views", [2])), int(spec.get("tta_flips", 1))
        ids = lm.card["data"]["val_cases"]
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise MedImgError(f"{len(missing)} validation volumes of {d} are not under {root} (e.g. {missing[0]})")
        have = {v.case_id: v for v in loaded or []}
        todo = load_cases([by_id[i] for i in ids if i not in have], smoke) if set(ids) - set(have) else []
        again = {v.case_id: v for v in todo}
        for v in (have.get(i) or again[i] for i in ids):
            pr = predict_case(model, v, views, lm.grid_mm, cpu, bf16, flips, lm.threshold, loc)
            lab = v.label.astype(bool)
            box = (pp.box_around(pr.mask, v.spacing, REFINE_MARGIN_MM)
                   or tuple(slice(0, n) for n in lab.shape))
            norm = pp.normalise_volume(np.asarray(v.data))
            boxes.append(RefineBox(v.case_id, v.dataset, np.ascontiguousarray(norm[box], dtype=np.float32),
                                   pr.prob[box].astype(np.float32), lab[box].astype(np.float32),
                                   tuple(float(x) for x in v.spacing), float(lm.threshold),
                                   int(lab.sum() - lab[box].sum()), k))
    return boxes


def refiner_card(boxes: list, info: dict, recipe, seed: int, fold_models: dict[int, str], smoke: bool) -> dict:
    """The card of a refiner trained on ``boxes`` (``fit_refiner``'s ``info``) from the fold models
    ``fold_models`` ({fold: weights sha256})."""
    from dataclasses import asdict

    from core.checkpoint import git_commit
    from core.refine3d import REFINE_MARGIN_MM

    return {
        "task": REFINER_TASK, "kind": "segmentation refiner",
        "title": "Left-atrium 3D refiner: a correction of the 2D model's probabilities around its mask",
        "architecture": {"name": "RefinerNet", "kwargs": {"base": recipe.base}},
        "input_spec": {"grid_mm": recipe.grid_mm, "margin_mm": REFINE_MARGIN_MM,
                       "inputs": "the normalised image and the 2D probabilities of the box around the 2D mask"},
        "training": {**asdict(recipe), **info, "seed": seed, "optimizer": "AdamW (weight decay 1e-4) + one-cycle LR",
                     "loss": "BCE + soft Dice at the box's own resolution", "kept_epoch_rule": "the last epoch",
                     "augmentation": "axes permuted and flipped, up to 6 voxels cut from each side, contrast scaled "
                                     "and shifted, gamma 0.7-1.4 (30 %)",
                     "inputs": "out-of-fold probabilities: each box segmented by the kept cross-validation fold "
                               "model that did not train on its volume"},
        "data": {"train_cases": sorted({b.case_id for b in boxes}), "n_train": len(boxes),
                 "per_dataset": {ds: sum(b.dataset == ds for b in boxes) for ds in sorted({b.dataset for b in boxes})},
                 "fold_models": {str(k): v for k, v in fold_models.items()}},
        "git_commit": git_commit(), "smoke": smoke,
    }


def fit_committed_refiner(folds_dir, cv: dict | None, root=None, wdir=None, smoke: bool = False, seed: int = 0,
                          boxes: list | None = None, loaded: list | None = None,
                          log: Callable[[str], None] | None = print) -> dict:
    """Train the committed model's 3D refiner on every out-of-fold box of the kept fold models in ``folds_dir``
    (``oof_boxes``, or ``boxes`` already made from them; ``loaded``: volumes already read) and save it in
    ``wdir``; returns its card. With ``cv`` (atrium.cv.json), each kept fold model must be the one it recorded
    (``check_fold_model``): the refiner then learns from the errors of the models whose figures the card reports."""
    from core.checkpoint import read_card, save_checkpoint
    from core.config import weights_dir
    from core.errors import MedImgError
    from core.refine3d import RefinerRecipe, fit_refiner

    dirs = kept_fold_dirs(folds_dir)
    if not dirs:
        raise MedImgError(f"no kept fold models (fold1 ... fold5) in {folds_dir}: the refiner learns from their "
                          "out-of-fold masks (`python train_all.py --atrium-cv --keep-fold-weights DIR`)")
    cards = {k: read_card("atrium", d) for k, d in dirs.items()}
    if cv is not None:
        recs = {int(f["fold"]): f for f in cv.get("folds", [])}
        for k, d in dirs.items():
            if k not in recs:
                raise MedImgError(f"{d} is fold {k}, which atrium.cv.json does not record")
            try:
                check_fold_model(cards[k], recs[k], d)
            except MedImgError as exc:
                raise MedImgError(f"{exc}; the 3D refiner learns from the fold models of this cross-validation "
                                  "(train_all: --atrium-folds DIR names them, 'none' keeps the refiner there "
                                  "is)") from exc
    recipe = RefinerRecipe(epochs=1) if smoke else RefinerRecipe()
    boxes = oof_boxes(folds_dir, root, smoke, loaded) if boxes is None else boxes
    net, info = fit_refiner(boxes, recipe, seed, log)
    card = refiner_card(boxes, info, recipe, seed, {k: c.get("weights_sha256") for k, c in cards.items()}, smoke)
    save_checkpoint(net.state_dict(), card, REFINER_TASK, weights_dir(wdir))
    if log:
        log(f"refiner (all {len(boxes)} boxes): {info}")
    return read_card(REFINER_TASK, weights_dir(wdir))


def train_refiners(folds_dir, root=None, wdir=None, smoke: bool = False, seed: int = 0,
                   log: Callable[[str], None] | None = print) -> dict:
    """Train the 3D refiners from the kept fold models in ``folds_dir``: one per fold on the other folds' boxes
    (``oof_boxes``), saved beside that fold's model and named in its card (then ``rescore_folds`` measures it out
    of fold), and one on every box (``fit_committed_refiner``), saved in ``wdir`` and named in the atrium card
    there (then ``finish_card``). Returns {fold or "all": the refiner's training facts}."""
    from core.checkpoint import read_card, save_checkpoint, write_json
    from core.config import weights_dir
    from core.refine3d import RefinerRecipe, fit_refiner

    recipe = RefinerRecipe(epochs=1) if smoke else RefinerRecipe()
    boxes = oof_boxes(folds_dir, root, smoke)
    dirs = kept_fold_dirs(folds_dir)
    shas = {k: read_card("atrium", d).get("weights_sha256") for k, d in dirs.items()}
    out: dict = {}
    for k, d in dirs.items():
        train = [b for b in boxes if b.group != k]
        net, info = fit_refiner(train, recipe, seed, log)
        save_checkpoint(net.state_dict(), refiner_card(train, info, recipe, seed, shas, smoke), REFINER_TASK, d)
        out[k] = info
        if log:
            log(f"refiner {k}: {info}")
    out["all"] = fit_committed_refiner(folds_dir, None, root, wdir, smoke, seed, boxes, log)["training"]
    for d in [*dirs.values(), weights_dir(wdir)]:
        card = read_card("atrium", d)
        card["input_spec"]["refiner"] = refiner_record(read_card(REFINER_TASK, d))
        write_json(Path(d) / "atrium.json", card)
    return out


def score_cases(model: nn.Module, vols: list[CanonicalCase], idx: list[int], views: tuple[int, ...], grid: float,
                device: torch.device, flips: int = 1, threshold: float = 0.5, bf16: bool = False,
                localiser: Localiser | None = None, refiner: Refiner | None = None
                ) -> tuple[dict[str, dict], dict[str, dict]]:
    """Per-case 3D metrics and quality measures of ``views`` fused, on the canonical grid."""
    from core import metrics as M

    per_case, quality = {}, {}
    for i in idx:
        v = vols[i]
        pr = predict_case(model, v, views, grid, device, bf16=bf16, flips=flips, threshold=threshold,
                          localiser=localiser, refiner=refiner)
        per_case[v.case_id] = {**M.segmentation_metrics(pr.mask, v.label, v.spacing), "dataset": v.dataset,
                               "views": list(pr.views)}
        quality[v.case_id] = quality_measures(pr, v.spacing, threshold, v.data)
    return per_case, quality


def summarise(per_case: dict[str, dict], seed: int = 0) -> dict:
    """Per-dataset mean Dice (CI), HD95, volume error, and the same over all cases."""
    from core import metrics as M

    out = {}
    groups: dict[str, dict[str, dict]] = {"all": per_case}
    for k, r in per_case.items():
        groups.setdefault(r["dataset"], {})[k] = r
    for name, rows in groups.items():
        d = [r["dice"] for r in rows.values()]
        ve = [abs(r["volume_error_pct"]) for r in rows.values() if np.isfinite(r["volume_error_pct"])]
        out[name] = {"n": len(rows), "dice_mean": float(np.mean(d)), "dice_ci95": M.mean_ci(d, seed=seed),
                     "dice_min": float(np.min(d)),
                     "hd95_mm_mean": M.mean_finite(rows, "hd95_mm"),
                     "hd95_mm_ci95": M.mean_ci([r["hd95_mm"] for r in rows.values() if np.isfinite(r["hd95_mm"])],
                                               seed=seed),
                     "volume_error_pct_mean": M.mean_finite(rows, "volume_error_pct"),
                     "abs_volume_error_pct_mean": float(np.mean(ve)) if ve else float("nan"),
                     "abs_volume_error_pct_ci95": M.mean_ci(ve, seed=seed) if ve else [float("nan")] * 2}
    return out


MIN_VOLUMES_FOR_LIMITS = 5


def fit_quality_limits(train_quality: dict[str, dict], fused: bool = False) -> dict | None:
    """Limits of the quality check from the training volumes' own measures (with the views the app uses;
    only the volumes segmented in the ``fused`` mode asked for), with a margin fixed a priori: 1.5x the
    95th percentile of the uncertainty ratio and 0.8x the 5th percentile of the view agreement
    (percentiles, so one odd training volume does not set the limit); never from validation volumes.
    None when fewer than MIN_VOLUMES_FOR_LIMITS training volumes took that mode."""
    rows = [q for q in train_quality.values() if bool(q.get("fused", 0.0)) == fused]
    if len(rows) < MIN_VOLUMES_FOR_LIMITS:
        return None
    unc = [q["uncertain_ratio"] for q in rows]
    agr = [q["view_agreement"] for q in rows]
    return {"max_uncertain_ratio": float(1.5 * np.quantile(unc, 0.95)),
            "min_view_agreement": float(0.8 * np.quantile(agr, 0.05)),
            "min_kept_fraction": QualityRule.min_kept_fraction, "volume_range_ml": list(LA_VOLUME_RANGE_ML),
            "min_extent_mm": MIN_EXTENT_MM}


def quality_check_record(train_quality: dict[str, dict], val_quality: dict[str, dict], setting: str) -> dict:
    """The card's quality_check: limits fitted on the training volumes for each mode (single view; three
    fused views, when enough training volumes took it), and how often they fire on the validation volumes."""
    fused = fit_quality_limits(train_quality, fused=True)
    limits = fit_quality_limits(train_quality) or fused
    if limits is None:  # a smoke run: too few training volumes to fit limits on; the rule's own defaults
        from dataclasses import asdict

        limits = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(QualityRule()).items()}
    card = {"quality_check": {"limits": limits, "limits_fused": fused}}
    fired = {k: judge_with_card(q, card).reasons for k, q in val_quality.items()}
    n_fused = sum(bool(q.get("fused", 0.0)) for q in train_quality.values())
    return {
        "limits": limits, "limits_fused": fused,
        "fitted_on": f"{len(train_quality)} training volumes ({n_fused} segmented with three fused views, the rest "
                     f"with one), {setting}; per mode: 1.5x the 95th percentile of their uncertainty ratio, 0.8x "
                     "the 5th percentile of their view agreement; volume range and field of view from anatomy",
        "train_measures": train_quality, "validation_measures": val_quality,
        "validation_fired": {k: v for k, v in fired.items() if v},
        "validation_firing_rate": float(np.mean([bool(v) for v in fired.values()])) if fired else float("nan"),
    }


def apply_inference_choice(card: dict, model: nn.Module, vols: list[CanonicalCase], tr: list[int], va: list[int],
                           grid: float, device: torch.device, bf16: bool = False,
                           localiser: Localiser | None = None, refiner: Refiner | None = None) -> dict:
    """With the card's views (the fused path narrowed by ``localiser`` when given; the masks corrected by
    ``refiner`` when given, after the flips and threshold are chosen without it): choose the test-time flips and
    mask threshold on the validation volumes
    (only for the single axial view; fused views keep 1 flip and 0.5), score the validation volumes
    with them, and fit the quality check on the training volumes with the same setting. Updates the
    card's threshold, input_spec.tta_flips, validation and quality_check in place; returns the card."""
    from core import metrics as M

    views = tuple(card["input_spec"].get("views", [2]))
    if views == (2,):
        choice = choose_inference(model, vols, va, grid, device, bf16)
    else:
        choice = {"flips": 1, "threshold": 0.5, "table": []}
    flips, thr = choice["flips"], choice["threshold"]
    per_case, val_quality = score_cases(model, vols, va, views, grid, device, flips, thr, bf16, localiser, refiner)
    chosen = summarise(per_case)
    _, train_quality = score_cases(model, vols, tr, views, grid, device, flips, thr, bf16, localiser, refiner)
    card["input_spec"]["tta_flips"] = flips
    if views == (2,):
        card["input_spec"]["view_rule"] = VIEW_RULE
    card["validation"]["scored_in"] = "bfloat16 autocast (as the app runs)" if bf16 else "float32"
    card["threshold"] = thr
    card["threshold_rule"] = (f"{thr:g} on the mean probability of the views (or, with one view, of {flips} in-plane "
                              "flip(s)), then "
                              "the largest 3D connected component; flips and threshold chosen on the validation "
                              "volumes (highest mean of the per-dataset Dice; ties to fewer flips and 0.5)")
    card["validation"].update({
        "n": len(per_case), "views": list(views), "tta_flips": flips, "threshold": thr,
        "dice_mean": chosen["all"]["dice_mean"], "dice_ci95": chosen["all"]["dice_ci95"],
        "iou_mean": M.mean_finite(per_case, "iou"), "hd95_mm_mean": chosen["all"]["hd95_mm_mean"],
        "volume_error_pct_mean": chosen["all"]["volume_error_pct_mean"],
        "per_dataset": chosen, "inference_choice": choice["table"],
        "inference_rule": "flips and threshold chosen on these validation volumes (slightly optimistic figure)",
        "per_case": per_case,
    })
    card["quality_check"] = quality_check_record(train_quality, val_quality,
                                                 f"{views_in_words(views)}, {flips} in-plane flip(s) on a single view, "
                                                 f"threshold {thr:g}")
    return card


CV_FILE = "atrium.cv.json"
VIEW_RULE = (f"slices across the volume's thinnest direction (when below {SLAB_RATIO:g}x the axial extent; else "
             f"axial); when the volume spans at least {FUSE_MIN_EXTENT_MM:g} mm in every direction, the two other "
             "directions are segmented too (around the first finding) and the three fused, one pass each")
ORIENTATION_RULE = ("the volume is brought to the closest RAS orientation by its affine, segmented along the views "
                    "listed (axes of that orientation), the views' probabilities averaged, and the mask put back on "
                    "the input's grid")
AUGMENTATION = ("slices along all three axes (the axial view half the time); 8 in-plane rotations/flips; rotation "
                "15 deg, scale 15 %, shift 5 %; gamma 0.5-2, smooth bias field, contrast, blur, noise, 5 % inverted "
                "contrast")


CV_SCORING = ("as the app runs: one axial view with the geometry rules (slab axis; three views fused on a volume "
              "wide in every direction), flips (1, 2 or 4) and threshold chosen on the fold's own validation volumes, "
              "bfloat16 "
              "where the CPU runs it natively; quality check fitted on the fold's training volumes; the fused path's "
              "localising pass read over the field that a localiser network trained on the fold's training volumes "
              "finds")


def cross_validate(root, device: torch.device, out_dir=None, folds: int = 5, seed: int = 0, smoke: bool = False,
                   epochs: int | None = None, only: list[int] | None = None, keep_weights=None) -> dict:
    """Folds 1..``folds`` of the atrium recipe over both datasets, or only the folds in ``only``: each
    trains on the other volumes and scores its own,
    per dataset, as the app runs (``CV_SCORING``). Folds already in <weights>/atrium.cv.json from the same
    recipe and scoring are kept, so the folds can be run one session at a time; the file is rewritten after
    each fold. Each fold records its weights' sha256; with ``keep_weights`` (a folder) the fold's weights and
    a card that ``core.inference.load_model("atrium", <folder>/fold<K>)`` reads are written there too, so that a later
    inference or quality-check change can be scored out of fold without training again."""
    import json
    from datetime import datetime, timezone

    from core import io as mio
    from core.checkpoint import git_commit
    from core.config import weights_dir
    from core.precision import native_bf16
    from core.tasks import get_task
    from core.train import task_config

    cfg = task_config("atrium", smoke, seed, epochs)
    grid = cfg.spacing_mm or float(get_task("atrium").input_spec["spacing_mm"])
    cases = mio.find_atrium_cases(root)
    if smoke:
        cases = first_per_dataset(cases, 4)
    splits = dataset_splits(cases, cfg, folds)
    run = sorted(set(only)) if only else list(range(1, len(splits) + 1))
    if any(k < 1 or k > len(splits) for k in run):
        raise ValueError(f"folds must lie in 1..{len(splits)}; got {run}")
    path = (Path(out_dir) if out_dir else weights_dir()) / CV_FILE
    training = recipe_record(cfg)
    kept: list[dict] = []
    replaced: dict[int, dict] = {}  # folds run again: their old entries, summarised in the new ones
    if path.is_file():
        prev = json.loads(path.read_text())
        if prev.get("training") == training and prev.get("scoring") == CV_SCORING and prev.get("smoke") == smoke:
            kept = [f for f in prev["folds"] if f["fold"] not in run]
            replaced = {f["fold"]: f for f in prev["folds"] if f["fold"] in run}
    vols = load_cases(cases, smoke)
    bf16 = device.type == "cpu" and native_bf16(device)
    report: dict = {}
    for k in run:
        tr, va = splits[k - 1]
        model, res, _ = fit_atrium(vols, tr, va, cfg, device, desc=f"atrium fold {k}")
        loc_model, loc_card = fit_localiser(vols, tr, device, seed, desc=f"atrium localiser fold {k}", smoke=smoke)
        loc = inference_localiser(loc_model, loc_card)
        card: dict = {"input_spec": {"views": [2]}, "validation": {}}
        apply_inference_choice(card, model, vols, tr, va, grid, device, bf16=bf16, localiser=loc)
        card["input_spec"]["localiser"] = localiser_record(loc.card)
        sha = _fold_weights(model, card, cases, tr, va, k, cfg, device, smoke, keep_weights)
        if keep_weights is not None:
            from core.checkpoint import save_checkpoint

            save_checkpoint(loc_model.state_dict(), loc_card, LOCALISER_TASK, Path(keep_weights) / f"fold{k}")
        entry = {"fold": k, "train_cases": [cases[i].case_id for i in tr],
                 "val_cases": [cases[i].case_id for i in va], "best_epoch": res.best_epoch,
                 "epochs_run": res.epochs_run, "seconds": round(res.seconds, 1), "git_commit": git_commit(),
                 "weights_sha256": sha, "localiser_sha256": loc_card["weights_sha256"],
                 "seconds_localiser": loc_card["training"]["seconds"], **fold_scoring_fields(card)}
        if k in replaced:
            entry["previous_run"] = previous_run_summary(replaced[k], entry)
        kept.append(entry)
        kept.sort(key=lambda f: f["fold"])
        report = {"task": "atrium", "what": f"cross-validation folds 1-{len(splits)} of the atrium recipe over both "
                  "datasets, by volume; folds not listed have not been run yet; the committed model is the recipe "
                  "trained on every volume", "n_folds_planned": len(splits), "folds": kept, "training": training,
                  "scoring": CV_SCORING, "smoke": smoke,
                  "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        write_cv(report, path)
    return report


def _fold_weights(model: nn.Module, card: dict, cases: list, tr: list[int], va: list[int], k: int, cfg,
                  device: torch.device, smoke: bool, keep_weights=None) -> str:
    """sha256 of a fold model's weights as ``save_checkpoint`` writes them; with ``keep_weights``, the pair
    (weights + a card in the trained models' form, with the fold's inference setting, quality limits and split)
    in <keep>/fold<k>."""
    from core.checkpoint import save_checkpoint
    from core.tasks import get_task
    from core.train import card_base, state_sha256

    state = model.state_dict()
    if keep_weights is None:
        return state_sha256(state)
    base = card_base(get_task("atrium"), cfg, device, smoke)
    fold_card = {**base, "title": f"{base['title']}, cross-validation fold {k}",
                 "input_spec": {**base["input_spec"], **card["input_spec"]}, "threshold": card["threshold"],
                 "quality_check": card["quality_check"], "validation": card["validation"],
                 "data": {"train_cases": [cases[i].case_id for i in tr], "val_cases": [cases[i].case_id for i in va],
                          "split": f"cross-validation fold {k}"}}
    save_checkpoint(state, fold_card, "atrium", Path(keep_weights) / f"fold{k}")
    return state_sha256(state)


def kept_fold_dirs(folds_dir) -> dict[int, Path]:
    """The kept fold models in ``folds_dir`` by fold number: its ``fold<K>`` folders, as
    ``cross_validate(keep_weights=...)`` writes them (weights + card each)."""
    return {int(d.name[4:]): d for d in sorted(Path(folds_dir).glob("fold*")) if d.name[4:].isdigit()}


def check_fold_model(card: dict, rec: dict, where) -> None:
    """Raise ``MedImgError`` unless the model whose ``card`` was read from ``where`` is the one ``rec`` (a fold
    entry of atrium.cv.json) recorded: the same weights (sha256) trained on the same split. Figures computed
    with another model would otherwise be filed under that fold without a word."""
    from core.errors import MedImgError

    k = rec.get("fold")
    if rec.get("weights_sha256") != card.get("weights_sha256"):
        raise MedImgError(f"{where} is not the model atrium.cv.json recorded for fold {k} (sha256 differs)")
    data = card.get("data", {})
    if data.get("val_cases") != rec.get("val_cases") or data.get("train_cases") != rec.get("train_cases"):
        raise MedImgError(f"{where} was trained on another split than fold {k} of atrium.cv.json")


def rescore_folds(folds_dir, root=None, only: list[int] | None = None, out_dir=None) -> dict:
    """Score kept fold models (``<folds_dir>/fold<K>``, as ``cross_validate(keep_weights=...)`` writes them) again
    as the app runs now (``apply_inference_choice``: the current TTA_CHOICES and THRESHOLD_CHOICES), without
    training: how an inference change reaches atrium.cv.json. Each model must be the one the CV file recorded
    for its fold (weights' sha256 and split); its entry keeps the training facts (epochs, seconds, commit, sha)
    and takes the new flips, threshold, per-case figures and quality check, with ``rescored`` (commit, date).
    The fold's own card is updated the same way. Folds without a kept model are left as they are; the file's
    ``scoring`` becomes CV_SCORING only when every fold in it has been scored with it. Returns the report."""
    from datetime import datetime, timezone

    from core import io as mio
    from core.checkpoint import git_commit, write_json
    from core.config import data_root, weights_dir
    from core.errors import MedImgError
    from core.precision import native_bf16

    root = data_root(root)
    path = weights_dir(out_dir) / CV_FILE
    cv = read_cv(out_dir)
    if not cv:
        raise MedImgError(f"no cross-validation record at {path}: run `python train_all.py --atrium-cv` first")
    by_fold = {f["fold"]: f for f in cv["folds"]}
    dirs = kept_fold_dirs(folds_dir)
    run = sorted(set(only) if only else set(dirs) & set(by_fold))
    missing = [k for k in run if k not in dirs or k not in by_fold]
    if missing:
        raise MedImgError(f"folds {missing} have no kept model in {folds_dir} or no entry in {path}")
    smoke = bool(cv.get("smoke"))
    cases = mio.find_atrium_cases(root)
    if smoke:  # the volumes the smoke CV read, read as it read them
        cases = first_per_dataset(cases, 4)
    vols = load_cases(cases, smoke)
    index = {c.case_id: i for i, c in enumerate(cases)}
    cpu = torch.device("cpu")
    bf16 = native_bf16(cpu)
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    for k in run:
        rec = by_fold[k]
        lm = load_base("atrium", dirs[k], optimize=False)
        check_fold_model(lm.card, rec, dirs[k])
        model = lm.model.to(memory_format=torch.channels_last)  # as training left it (the CV scored it so)
        loc = load_localiser(dirs[k]) if (dirs[k] / f"{LOCALISER_TASK}.pt").is_file() else None
        if loc is not None:
            check_fold_localiser(loc.card, rec, dirs[k])
        ref = load_refiner(dirs[k]) if (dirs[k] / f"{REFINER_TASK}.pt").is_file() else None
        if ref is not None:
            check_fold_refiner(ref.card, rec, dirs[k])
        tr, va = [index[c] for c in rec["train_cases"]], [index[c] for c in rec["val_cases"]]
        card: dict = {"input_spec": {"views": [2]}, "validation": {}}
        apply_inference_choice(card, model, vols, tr, va, lm.grid_mm, cpu, bf16=bf16, localiser=loc, refiner=ref)
        if ref is not None:
            card["input_spec"]["refiner"] = refiner_record(ref.card)
            rec["refiner_sha256"] = ref.card["weights_sha256"]
            cv.setdefault("training", {})["refiner"] = ref.card["training"]
        else:
            rec.pop("refiner_sha256", None)
        if loc is not None:
            card["input_spec"]["localiser"] = localiser_record(loc.card)
            rec["localiser_sha256"] = loc.card["weights_sha256"]
            cv.setdefault("training", {})["localiser"] = localiser_recipe()
        else:
            rec.pop("localiser_sha256", None)
        qc = card["quality_check"]
        rec.update({**fold_scoring_fields(card), "scoring": CV_SCORING,
                    "rescored": {"git_commit": git_commit(), "created": now,
                                 "what": "the kept fold model scored again with the inference choices then current "
                                         "(no training)"}})
        spec_in = {**lm.card["input_spec"], **card["input_spec"]}
        if loc is None:
            spec_in.pop("localiser", None)
        if ref is None:
            spec_in.pop("refiner", None)
        fold_card = {**lm.card, "input_spec": spec_in,
                     "threshold": card["threshold"], "quality_check": qc, "validation": card["validation"]}
        write_json(dirs[k] / "atrium.json", fold_card)
    if all(f.get("scoring", cv.get("scoring")) == CV_SCORING for f in cv["folds"]):
        cv["scoring"] = CV_SCORING
        for f in cv["folds"]:
            f.pop("scoring", None)
    cv["created"] = now
    write_cv(cv, path)
    return cv


CV_QUALITY_KEYS = ("limits", "limits_fused", "validation_fired", "validation_firing_rate", "validation_measures")


def fold_record_from_card(card: dict) -> dict:
    """The cross-validation entry (the keys ``cross_validate`` writes) of a model trained on fold 1's split,
    from its own card: how fold 1 moves into atrium.cv.json when the committed model stops being fold 1."""
    v, qc = card["validation"], card["quality_check"]
    return {"fold": 1, "train_cases": list(card["data"]["train_cases"]), "val_cases": list(card["data"]["val_cases"]),
            "best_epoch": card["best_epoch"], "epochs_run": card["epochs_run"], "seconds": card["train_time_s"],
            "git_commit": card["git_commit"], "weights_sha256": card.get("weights_sha256"),
            "tta_flips": int(v.get("tta_flips", 1)),
            "threshold": float(card["threshold"]), "per_dataset": v["per_dataset"], "per_case": v["per_case"],
            "quality_check": {k: qc[k] for k in CV_QUALITY_KEYS}}


def fold_scoring_fields(card: dict) -> dict:
    """The scored part of a fold's atrium.cv.json entry, from a card ``apply_inference_choice`` filled:
    tta_flips, threshold, per_dataset, per_case and the quality check's CV_QUALITY_KEYS."""
    qc = card["quality_check"]
    return {"tta_flips": card["input_spec"]["tta_flips"], "threshold": card["threshold"],
            "per_dataset": card["validation"]["per_dataset"], "per_case": card["validation"]["per_case"],
            "quality_check": {k: qc[k] for k in CV_QUALITY_KEYS}}


def previous_run_summary(old: dict, new: dict) -> dict:
    """What a fold's replaced entry said (commit, time, kept epoch, setting, Dice per dataset), kept in the entry
    that replaces it, so a rerun that moves a fold's figures shows by how much; ``same_weights`` says whether
    the rerun reproduced the old model (sha256)."""
    return {"what": "the run of this fold that this entry replaced (same recipe, split and scoring)",
            "git_commit": old.get("git_commit"), "seconds": old.get("seconds"), "best_epoch": old.get("best_epoch"),
            "tta_flips": old.get("tta_flips"), "threshold": old.get("threshold"),
            "weights_sha256": old.get("weights_sha256"),
            "same_weights": bool(old.get("weights_sha256")) and old.get("weights_sha256") == new.get("weights_sha256"),
            "dice_mean_per_dataset": {ds: r["dice_mean"] for ds, r in old["per_dataset"].items()}}


def merge_cv_folds(src, folds: list[int] | None = None, out_dir=None, machine_note: str | None = None) -> dict:
    """Move fold entries from another atrium.cv.json (``src``: a CV run in a scratch weights folder) into the
    one beside the weights, each replacing the entry of the same fold with ``previous_run`` (its summary).
    Both must hold the same recipe, scoring and splits; ``folds``: those to move (default: every fold whose
    entry differs); ``machine_note``: where the rerun ran, kept in each moved entry. Returns the merged record,
    written in place."""
    import json
    from datetime import datetime, timezone

    from core.config import weights_dir
    from core.errors import MedImgError

    path = weights_dir(out_dir) / CV_FILE
    dst, new = read_cv(out_dir), json.loads(Path(src).read_text())
    if not dst:
        raise MedImgError(f"no cross-validation record at {path}")
    for key in ("training", "scoring", "smoke", "n_folds_planned"):
        if dst.get(key) != new.get(key):
            raise MedImgError(f"{src} differs from {path} in {key!r}: not the same cross-validation")
    a, b = {f["fold"]: f for f in dst["folds"]}, {f["fold"]: f for f in new["folds"]}
    move = sorted(folds) if folds else sorted(k for k in b if a.get(k) != b[k])
    for k in move:
        if k not in b:
            raise MedImgError(f"{src} has no fold {k}")
        if k in a and (a[k]["train_cases"], a[k]["val_cases"]) != (b[k]["train_cases"], b[k]["val_cases"]):
            raise MedImgError(f"fold {k} of {src} was trained on another split than fold {k} of {path}")
        entry = dict(b[k])
        if k in a and "previous_run" not in entry:
            entry["previous_run"] = previous_run_summary(a[k], entry)
        if machine_note:
            entry["machine_note"] = machine_note
        a[k] = entry
    dst["folds"] = [a[k] for k in sorted(a)]
    dst["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    write_cv(dst, path)
    return dst


def pool_folds(folds: list[dict]) -> dict:
    """Every volume's out-of-fold result pooled over ``folds`` (entries of atrium.cv.json): n, folds,
    dice_mean, dice_ci95, summary (``summarise``, per dataset and "all"), per_dataset (summary rows plus
    the volumes on which the quality check fired and those reported with Dice < 0.5), fired, per_case."""
    per_case: dict[str, dict] = {}
    fired: dict[str, list] = {}
    for f in folds:
        per_case.update(f["per_case"])
        fired.update(f.get("quality_check", {}).get("validation_fired", {}))
    s = summarise(per_case)
    per_dataset = {}
    for ds, r in sorted(s.items()):
        if ds == "all":
            continue
        rows = {k: v for k, v in per_case.items() if v["dataset"] == ds}
        per_dataset[ds] = {**r, "fired": sorted(k for k in rows if fired.get(k)),
                           "reported_below_0_5": sorted(k for k, v in rows.items()
                                                        if v["dice"] < 0.5 and not fired.get(k))}
    return {"n": len(per_case), "folds": sorted(f["fold"] for f in folds), "dice_mean": s["all"]["dice_mean"],
            "dice_ci95": s["all"]["dice_ci95"], "summary": s, "per_dataset": per_dataset,
            "fired": sorted(k for k in per_case if fired.get(k)), "per_case": per_case}


def cv_inference_setting(folds: list[dict]) -> tuple[int, float]:
    """The test-time flips and threshold for a model with no validation volumes of its own: the flips most
    folds chose (ties to fewer) and the median of their thresholds."""
    flips = [int(f["tta_flips"]) for f in folds]
    return max(sorted(set(flips)), key=flips.count), float(np.median([f["threshold"] for f in folds]))


def set_cv_inference_setting(card: dict, cv: dict) -> dict:
    """Put the folds' setting (``cv_inference_setting``) in an all-volume model's card: input_spec.tta_flips,
    threshold and threshold_rule. Returns the card."""
    flips, thr = cv_inference_setting(cv["folds"])
    card["input_spec"]["tta_flips"] = flips
    card["threshold"] = thr
    card["threshold_rule"] = (f"{thr:g} on the mean probability of the views (or, with one view, of {flips} in-plane "
                              "flip(s)), then the largest 3D connected component; flips: the choice of most "
                              "cross-validation folds, threshold: the median of theirs")
    return card


def write_cv(cv: dict, path) -> None:
    """Write a cross-validation record (atrium.cv.json) atomically, in the one form every writer uses."""
    from core.checkpoint import write_json

    write_json(path, cv)


def cv_complete(cv: dict | None) -> bool:
    """Whether a cross-validation record holds every planned fold (1..n_folds_planned)."""
    return bool(cv and cv.get("folds") and
                sorted(f["fold"] for f in cv["folds"]) == list(range(1, cv["n_folds_planned"] + 1)))


def read_cv(out_dir=None) -> dict | None:
    """atrium.cv.json beside the weights, or None."""
    import json

    from core.config import weights_dir

    path = (Path(out_dir) if out_dir else weights_dir()) / CV_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def recipe_record(cfg) -> dict:
    """A TrainConfig as atrium.cv.json records it under "training" (JSON-clean)."""
    from dataclasses import asdict

    from core.checkpoint import _clean

    rec = _clean(asdict(cfg))
    rec.pop("time_budget", None)  # train_all's limit on this machine, not part of the recipe
    rec["localiser"] = localiser_recipe()
    return rec


def localiser_recipe() -> dict:
    """The localiser's recipe as atrium.cv.json and the cards record it (network, grid, schedule)."""
    return {"architecture": dict(LOCALISER_KWARGS), "grid_mm": LOCALISER_GRID_MM, **LOCALISER_RECIPE}


def check_cv_recipe(cfg, cv: dict, refiner: bool = False) -> None:
    """Refuse to train the all-volume model with another recipe than the one cross-validated: its card would
    carry figures of a model it is not. ``cfg``: the TrainConfig about to be trained; ``cv``: atrium.cv.json;
    ``refiner``: a 3D refiner is trained too (then its recipe, ``RefinerRecipe``'s fields, must be the one the
    fold refiners were trained with; the record's other fields are one fold's run: seconds, loss, boxes)."""
    from dataclasses import asdict

    from core.errors import MedImgError
    from core.refine3d import RefinerRecipe

    now, then = recipe_record(cfg), dict(cv.get("training", {}))
    cv_ref = then.pop("refiner", None)
    if refiner and cv_ref is not None:
        now["refiner"] = asdict(RefinerRecipe())
        then["refiner"] = {k: cv_ref.get(k) for k in now["refiner"]}
    diff = sorted(k for k in set(now) | set(then) if now.get(k) != then.get(k))
    if diff:
        raise MedImgError("the cross-validation in atrium.cv.json was run with another training recipe ("
                          + ", ".join(f"{k}: {then.get(k)!r} there, {now.get(k)!r} now" for k in diff)
                          + "): train with the same settings (e.g. --epochs), or cross-validate this recipe first")


def train_atrium(root, cfg, device: torch.device, smoke: bool = False, out_dir=None, folds_dir=None) -> dict:
    """The committed atrium model: the cross-validated recipe trained on every volume of both datasets.
    Nothing is left to validate on, so the last epoch is kept (over the five folds the last epoch's
    per-epoch Dice lay 0.001-0.02 under the best one, a pick that is itself optimistic on 19 volumes);
    flips and threshold come from the folds (``cv_inference_setting``); the card's "validation" holds the
    pooled out-of-fold figures of the recipe (atrium.cv.json, all folds), and the quality check is fitted
    on all volumes. Without a complete cross-validation record (a smoke run) the card says it has no
    figures. Weights are saved before the scoring, then the card is completed (``finish_card``).
    With ``folds_dir`` (the kept cross-validation fold models, those atrium.cv.json recorded), the 3D refiner is
    trained first from their out-of-fold masks (``fit_committed_refiner``), inside the same time budget; without
    it, a refiner already in the weights folder is named in the card as it is."""
    from core import io as mio
    from core.errors import MedImgError
    from core.tasks import get_task
    from core.train import card_base, save_trained

    spec = get_task("atrium")
    cv = read_cv(out_dir)
    complete = cv_complete(cv)
    if not complete and not smoke:
        raise MedImgError("the atrium model is trained on every volume once its recipe is cross-validated: run "
                          "`python train_all.py --atrium-cv` (folds 1-5) first, so that atrium.cv.json holds every "
                          "fold's figures and inference setting")
    if complete and not smoke:
        check_cv_recipe(cfg, cv, refiner=folds_dir is not None)
    cases = mio.find_atrium_cases(root)
    if smoke:
        cases = first_per_dataset(cases, 3)
    vols = load_cases(cases, smoke)
    tr = list(range(len(vols)))
    # the localiser first: it is quick, and the segmenting model's schedule is then fitted to the time left
    loc_model, loc_card = fit_localiser(vols, tr, device, cfg.seed, smoke=smoke)
    if folds_dir is not None:  # the refiner too: it learns from the fold models, not from this one
        fit_committed_refiner(folds_dir, cv if complete else None, root, out_dir, smoke, cfg.seed, loaded=vols,
                              log=lambda m: print(f"[atrium refiner] {m}", flush=True))
    model, res, n_slices = fit_atrium(vols, tr, [], cfg, device)
    flips, thr = cv_inference_setting(cv["folds"]) if complete else (2, 0.5)
    card = card_base(spec, cfg, device, smoke)
    card["training"]["schedule"] = res.schedule
    if res.shortened_at is not None:
        card["training"]["schedule"]["note"] = (
            f"the time budget cut the {cfg.epochs}-epoch schedule to {res.epochs_planned} epochs on this machine; "
            "the cross-validated figures are those of the full schedule")
    card["input_spec"].update(views=[2], tta_flips=flips, view_rule=VIEW_RULE, orientation=ORIENTATION_RULE,
                              localiser=localiser_record(loc_card))
    from core.config import weights_dir

    if (folds_dir is not None or not smoke) and (weights_dir(out_dir) / f"{REFINER_TASK}.pt").is_file():
        # the refiner learnt from the kept fold models' out-of-fold probabilities, not from this model: without
        # folds_dir the one there stays (after a new cross-validation: `python -m core.atrium refiner <folds dir>`)
        from core.checkpoint import read_card

        card["input_spec"]["refiner"] = refiner_record(read_card(REFINER_TASK, out_dir))
    per_ds = {ds: sum(v.dataset == ds for v in vols) for ds in sorted({v.dataset for v in vols})}
    card.update({
        "loss": "BCE + soft Dice", "augmentation": AUGMENTATION,
        "data": {
            "dataset": "MSD Task02_Heart (bSSFP) + 2018 LA challenge (LGE-MRI), both as MSD-layout folders",
            "n_volumes": len(cases), "per_dataset": {ds: {"n_train": n, "n_val": 0} for ds, n in per_ds.items()},
            "split": (f"none: trained on all {len(cases)} volumes; figures from {cv['n_folds_planned']}-fold "
                      "cross-validation by volume" if complete else f"none: trained on all {len(cases)} volumes"),
            "n_train": len(tr), "n_val": 0, "n_train_slices_all_views": n_slices,
            "train_cases": [c.case_id for c in cases], "val_cases": [],
        },
        "history": res.history, "best_epoch": res.best_epoch, "epochs_run": res.epochs_run,
        "train_time_s": round(res.seconds, 1), "kept_epoch_rule": "the last epoch (no validation volumes)",
        "threshold": 0.5,
        "threshold_rule": ("0.5 on the mean probability of the views (or, with one view, of 2 in-plane flips), then "
                           "the largest 3D connected component; the recipe's defaults (no cross-validation record)"),
        "validation": {"n": 0, "what": "no validation volumes: every volume trained on"},
    })
    if complete:
        set_cv_inference_setting(card, cv)
    from core.checkpoint import save_checkpoint

    save_checkpoint(loc_model.state_dict(), loc_card, LOCALISER_TASK, out_dir)
    save_trained(model, card, spec.name, out_dir)
    card = finish_card(out_dir, root, smoke=smoke)
    calibrate_int8(out_dir, root, smoke=smoke)
    return card


def finish_card(wdir=None, root=None, smoke: bool = False) -> dict:
    """Complete the card of an all-volume atrium model (``train_atrium``) from its saved weights: take the
    flips and threshold of the cross-validation folds as they stand now (``set_cv_inference_setting``), score every
    volume with them (bfloat16 where the CPU runs it natively, as the app does), fit the
    quality check on them, measure it on non-atrium inputs, and put the pooled cross-validation figures in
    "validation" (the check's validation firing from the folds, each with its own limits). Rewrites the
    card; can be rerun on its own (``python -m core.atrium finish``)."""
    from core import io as mio
    from core.checkpoint import write_json
    from core.config import data_root, weights_dir
    from core.precision import native_bf16

    root = data_root(root)
    lm = load_base("atrium", wdir, optimize=False)
    card = lm.card
    cv = read_cv(wdir)
    if cv_complete(cv):  # the folds' setting (their choices may have changed since training: a rerun, a rescore)
        set_cv_inference_setting(card, cv)
    by_id = {c.case_id: c for c in mio.find_atrium_cases(root)}
    vols = load_cases([by_id[i] for i in card["data"]["train_cases"]], smoke)
    views = tuple(card["input_spec"].get("views", [2]))
    flips = int(card["input_spec"].get("tta_flips", 1))
    cpu = torch.device("cpu")
    bf16 = native_bf16(cpu)
    loc = localiser_for(card, wdir)
    ref = refiner_for(card, wdir)
    fit_cases, train_quality = score_cases(lm.model, vols, list(range(len(vols))), views, lm.grid_mm, cpu, flips,
                                           lm.threshold, bf16, loc, ref)
    setting = f"{views_in_words(views)}, {flips} in-plane flip(s) on a single view, threshold {lm.threshold:g}"
    qc = quality_check_record(train_quality, {}, setting)
    card["training_fit"] = {"what": "this model on its own training volumes (all of them): how well it fits, not "
                                    "how it does on new data", "per_dataset": summarise(fit_cases),
                            "per_case": fit_cases}
    if cv_complete(cv):
        pool = pool_folds(cv["folds"])
        from core import metrics as M

        card["validation"] = {
            "what": (f"cross-validation of this recipe: every volume scored by one of {len(pool['folds'])} fold "
                     "models that did not train on it (each fold chose its kept epoch, flips and threshold on its own "
                     "validation volumes, so slightly optimistic); this model trained on all of them"),
            "cross_validated": True, "n": pool["n"], "views": list(views), "tta_flips": flips,
            "threshold": lm.threshold, "dice_mean": pool["dice_mean"], "dice_ci95": pool["dice_ci95"],
            "iou_mean": M.mean_finite(pool["per_case"], "iou"),
            "hd95_mm_mean": pool["summary"]["all"]["hd95_mm_mean"],
            "volume_error_pct_mean": pool["summary"]["all"]["volume_error_pct_mean"],
            "per_dataset": pool["summary"], "per_case": pool["per_case"], "scored_in": cv.get("scoring", ""),
        }
        qc["validation_fired"] = {k: v for f in cv["folds"]
                                  for k, v in f.get("quality_check", {}).get("validation_fired", {}).items() if v}
        qc["validation_firing_rate"] = len(qc["validation_fired"]) / max(1, pool["n"])
        qc["validation_rule"] = "out-of-fold volumes, each judged with its fold's own limits"
    if not smoke:
        qc["foreign_inputs"] = foreign_firing(lm.model, card, root, cpu, bf16, loc, ref)
    card["quality_check"] = qc
    path = weights_dir(wdir) / "atrium.json"
    write_json(path, card)
    return card


INT8_CALIBRATION_PER_DATASET = 3  # training volumes per dataset the int8 activation ranges are observed on
INT8_AUGMENTED_BATCHES = 20  # then batches of 32 training crops of them, with the training augmentation


def int8_calibration_feed(vols: list[CanonicalCase], views: tuple[int, ...], grid_mm: float, threshold: float,
                          flips: int, seed: int = 0) -> Callable[[nn.Module], None]:
    """What int8 activation ranges are observed on (``core.quantize.calibrate``): the volumes ``vols`` segmented as
    the app does (float32 passes), then INT8_AUGMENTED_BATCHES batches of 32 training crops of them with the
    training augmentation (``augment``: gamma, bias field, contrast, blur, noise, inversion). Ranges from clean
    volumes alone clipped the activations of scans unlike them, and the model became surer of itself there: on
    blurred volumes out of fold its uncertain share fell (0.54 -> 0.47 on one) and the quality check passed a mask
    it withholds in bfloat16 (`benchmarks/logs/atrium-int8-clean-calibration-stress-oof.json`). The augmentation
    covers what training covered."""
    crop = 128

    def feed(observer: nn.Module) -> None:
        for v in vols:
            segment_canonical(observer, v.data, v.spacing, views, grid_mm, threshold, 8, None, flips=flips)
        stacks: list[ViewStack] = []
        for v in vols:
            stacks += build_view_stacks(v.case_id, v.dataset, v.data, v.label, v.spacing, grid_mm, crop)
        rng = np.random.default_rng(seed)
        gen = torch.Generator().manual_seed(seed)
        # augment's random rotation/scale/shift (core.train.random_affine) draws from torch's global generator:
        # seeded here, and put back afterwards, so that the same weights always get the same ranges whatever ran
        # before in the process (unseeded, two calibrations of one fold model differed by up to 0.004 Dice on a
        # volume)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for _ in range(INT8_AUGMENTED_BATCHES):
                x, y = crop_items(stacks, sample_batch_items(stacks, 32, rng), crop, rng)
                observer(augment(x, y, gen)[0])

    return feed


def int8_calibration_cases(train_ids: list[str], cases: list) -> list:
    """The cases (of ``cases``) the int8 ranges of weights trained on ``train_ids`` are observed on: the first
    INT8_CALIBRATION_PER_DATASET training cases of each dataset."""
    by_id = {c.case_id: c for c in cases}
    return first_per_dataset([by_id[i] for i in train_ids if i in by_id], INT8_CALIBRATION_PER_DATASET)


def calibrate_int8(wdir=None, root=None, smoke: bool = False) -> dict:
    """Give the saved atrium weights an int8 model (core.quantize): observe the network's activation ranges
    on the first INT8_CALIBRATION_PER_DATASET of its training volumes per dataset (``int8_calibration_feed``),
    save them beside the weights (``atrium.int8.pt`` and its card ``atrium.int8.json``, tied to the weights'
    sha256), and measure the quality check on non-atrium inputs (``foreign_firing``) with the int8 model.
    Rerunnable on its own (``python -m core.atrium int8``); needs no cross-validation. Returns the ranges' card."""
    from core import io as mio
    from core import quantize
    from core.config import data_root

    root = data_root(root)
    lm = load_base("atrium", wdir, precision="float32")  # batch norm folded, as the int8 model is built
    cases = int8_calibration_cases(lm.card["data"]["train_cases"], mio.find_atrium_cases(root))
    views = tuple(int(v) for v in lm.card["input_spec"].get("views", [2]))
    flips = int(lm.card["input_spec"].get("tta_flips", 1))
    feed = int8_calibration_feed(load_cases(cases, smoke), views, lm.grid_mm, lm.threshold, flips)
    q8, state = quantize.calibrate(lm.model, feed)
    info = {"what": "activation ranges of these atrium weights for 8-bit integer inference (core.quantize)",
            "scheme": "static post-training quantisation, PyTorch FX, x86 backend: weights per output channel, "
                      "activations per tensor (histogram observers); transposed convolutions stay float32",
            "calibration_cases": [c.case_id for c in cases],
            "calibration": f"the first {INT8_CALIBRATION_PER_DATASET} training volumes of each dataset, segmented as "
                           f"the app does (float32 passes), then {INT8_AUGMENTED_BATCHES} batches of 32 training "
                           "crops of them with the training augmentation (seed 0, whatever ran before)", "smoke": smoke}
    if not smoke:
        info["quality_check_foreign_inputs"] = foreign_firing(q8, lm.card, root, torch.device("cpu"), bf16=False,
                                                              localiser=localiser_for(lm.card, wdir),
                                                              refiner=refiner_for(lm.card, wdir))
    return quantize.save_ranges(state, info, "atrium", lm.card["weights_sha256"], wdir)


# --------------------------------------------------------------------------- robustness check

LYING_LAYOUTS = {
    "as stored": (0, 1, 2),
    "axes (1, 2, 0), same diagonal affine": (1, 2, 0),
    "axes (2, 0, 1), same diagonal affine": (2, 0, 1),
}
# The same transpositions with the original header kept whole: its voxel sizes now name the wrong axes
# too (a writer that moved the voxels and copied the header). Nothing in the file can undo this; the
# quality check must keep such a mask from being reported when it is poor.
LYING_HEADERS = {
    "axes (1, 2, 0), original header (voxel sizes on the wrong axes)": (1, 2, 0),
    "axes (2, 0, 1), original header (voxel sizes on the wrong axes)": (2, 0, 1),
}


def layout_stress(segment, cases: list, layouts: dict[str, tuple[int, int, int]] = LYING_LAYOUTS,
                  headers: dict[str, tuple[int, int, int]] = LYING_HEADERS) -> dict:
    """Dice of each case with its voxels transposed while the affine is left as it was (a header that lies
    about the slice plane, as when an LGE volume is written in another layout): what the model gives when
    the canonical orientation cannot be trusted. ``layouts``: voxel sizes moved with the voxels (true);
    ``headers``: voxel sizes left on the original axes (false too). ``segment(volume) -> AtriumResult``.
    The mask is scored against the truth transposed the same way (and, for ``headers``, on the grid the
    header claims, so the Dice is of voxels)."""
    from core import io as mio
    from core import metrics as M

    variants = {**{n: (p, True) for n, p in layouts.items()}, **{n: (p, False) for n, p in headers.items()}}
    out: dict = {name: {} for name in variants}
    for c in cases:
        vol = mio.load_nifti_path(c.image_path)
        gt = mio.load_nifti_path(c.label_path).data > 0.5
        for name, (perm, moved_spacing) in variants.items():
            data = np.ascontiguousarray(np.transpose(vol.data, perm))
            spacing = tuple(vol.spacing[i] for i in perm) if moved_spacing else tuple(vol.spacing)
            moved = mio.Volume(data, vol.affine, spacing, "stress")
            res = segment(moved)
            out[name][c.case_id] = {"dice": M.dice(res.mask, np.transpose(gt, perm)),
                                    "reported": bool(res.reliable), "views": list(getattr(res, "views", ()))}
    return {"summary": stress_summary(out, cases), "per_case": out}


def stress_summary(per_case: dict[str, dict[str, dict]], cases: list) -> dict:
    """Per variant of a stress check (``per_case``: variant -> case id -> {"dice", "reported"}): volumes,
    mean Dice, how many got a volume reported, and how many of those had Dice < 0.5, overall and per dataset."""
    summary = {}
    for name, r in per_case.items():
        by_ds: dict[str, list] = {}
        for cid, v in r.items():
            ds = next((c.dataset for c in cases if c.case_id == cid), "all")
            by_ds.setdefault(ds, []).append(v)
        summary[name] = {
            "n": len(r), "dice_mean": float(np.mean([v["dice"] for v in r.values()])) if r else float("nan"),
            "reported": int(sum(v["reported"] for v in r.values())),
            "reported_with_dice_under_0.5": int(sum(v["reported"] and v["dice"] < 0.5 for v in r.values())),
            "per_dataset": {ds: {"n": len(v), "dice_mean": float(np.mean([x["dice"] for x in v])),
                                 "reported": int(sum(x["reported"] for x in v)),
                                 "reported_with_dice_under_0.5": int(sum(x["reported"] and x["dice"] < 0.5
                                                                         for x in v)),
                                 "reported_dice_min": _min_reported(v)}
                            for ds, v in sorted(by_ds.items())}}
    return summary


def _min_reported(rows: list[dict]) -> float | None:
    d = [x["dice"] for x in rows if x["reported"]]
    return float(min(d)) if d else None


def _unit_range(d: np.ndarray) -> np.ndarray:
    lo, hi = float(d.min()), float(d.max())
    return ((d - lo) / max(hi - lo, 1e-6)).astype(np.float32)


def _bias_field(d: np.ndarray) -> np.ndarray:
    g = np.meshgrid(*(np.linspace(-1, 1, n, dtype=np.float32) for n in d.shape), indexing="ij")
    return (d * np.exp(0.8 * g[0] + 0.6 * g[1] - 0.5 * g[2])).astype(np.float32)  # e^3.8 ~ 45x corner to corner


# Acquisition changes the model was not trained for at this strength (training augments gamma 0.5-2, a mild
# bias field, light noise and blur, and 5 % inverted contrast). Each maps (X, Y, Z) float32 voxels and a
# seeded generator to new voxels on the same grid; fixed once, before any result was seen.
ACQUISITION_SHIFTS = {
    "noise, 0.5x the volume's SD": lambda d, rng: d + 0.5 * d.std() * rng.standard_normal(d.shape, dtype=np.float32),
    "noise, 1x the volume's SD": lambda d, rng: d + d.std() * rng.standard_normal(d.shape, dtype=np.float32),
    "gamma 0.4 (dark tissue brighter)": lambda d, rng: _unit_range(d) ** 0.4,
    "gamma 2.5 (dark tissue darker)": lambda d, rng: _unit_range(d) ** 2.5,
    "strong smooth bias field (up to 45x across the volume)": lambda d, rng: _bias_field(d),
    "inverted contrast": lambda d, rng: (float(d.max()) - d).astype(np.float32),
    "blurred (Gaussian, 2 voxels)": lambda d, rng: _gaussian(d, 2.0),
}


def _gaussian(d: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(d, sigma).astype(np.float32)


def acquisition_stress(segment, cases: list, shifts: dict | None = None, seed: int = 0) -> dict:
    """Dice of each case after each acquisition change in ``shifts`` (default ACQUISITION_SHIFTS: strong
    noise, gamma, bias field, inverted contrast, blur), and whether the quality check still let a volume be
    reported: what a scan unlike the training data gets. ``segment(volume) -> AtriumResult``; the noise of
    case i is drawn from ``default_rng([seed, i])``, so a rerun gives the same figures."""
    from core import io as mio
    from core import metrics as M

    shifts = ACQUISITION_SHIFTS if shifts is None else shifts
    out: dict = {name: {} for name in shifts}
    for i, c in enumerate(cases):
        vol = mio.load_nifti_path(c.image_path)
        gt = mio.load_nifti_path(c.label_path).data > 0.5
        data = np.asarray(vol.data, dtype=np.float32)
        for name, f in shifts.items():
            res = segment(mio.Volume(f(data, np.random.default_rng([seed, i])), vol.affine, vol.spacing, "stress"))
            out[name][c.case_id] = {"dice": M.dice(res.mask, gt), "reported": bool(res.reliable)}
    return {"summary": stress_summary(out, cases), "per_case": out}


def foreign_inputs(root, n_cine: int = 10, n_stacks: int = 5, n_noise: int = 5, seed: int = 0) -> dict[str, list]:
    """Volumes that are not left-atrium MRI, by kind: ACDC cine frames (ED and ES of ``n_cine`` patients,
    their own affines), chest X-rays stacked as volumes (40 radiographs each), noise (uniform, Gaussian,
    smoothed). Each item: (name, data (X, Y, Z), affine 4x4, spacing)."""
    from scipy import ndimage

    from core import io as mio

    root = Path(root)
    out: dict[str, list] = {"ACDC cine frames": [], "chest X-ray stacks (40 radiographs as a volume)": [],
                            "noise volumes": []}
    for c in mio.find_cardiac_cases(root)[:n_cine]:
        for path in (c.ed_path, c.es_path):
            v = mio.load_nifti_path(path)
            out["ACDC cine frames"].append((path.name, v.data, v.affine, v.spacing))
    eye = np.diag([1.25, 1.25, 1.25, 1.0])
    xr = [c for c in mio.find_xray_cases(root) if c.split == "train"]
    for k in range(n_stacks):
        pix = [np.asarray(mio.read_image_2d(c.path.read_bytes(), c.path.name).pixels, np.float32)
               for c in xr[k * 40:(k + 1) * 40]]
        if not pix:
            break
        side = min(min(p.shape) for p in pix)
        out["chest X-ray stacks (40 radiographs as a volume)"].append(
            (f"x-ray stack {k + 1}", np.stack([p[:side, :side] for p in pix], axis=2), eye, (1.25, 1.25, 1.25)))
    rng = np.random.default_rng(seed)
    for k in range(n_noise):
        shape = (int(rng.integers(80, 160)), int(rng.integers(80, 160)), int(rng.integers(40, 100)))
        kind = ("uniform", "gaussian", "smoothed")[k % 3]
        arr = rng.random(shape) if kind == "uniform" else rng.normal(size=shape)
        if kind == "smoothed":
            arr = ndimage.gaussian_filter(arr, 3)
        out["noise volumes"].append((f"{kind} noise {k + 1}", arr.astype(np.float32), eye, (1.25, 1.25, 1.25)))
    return out


def foreign_firing(model: nn.Module, card: dict, root, device: torch.device, bf16: bool = False,
                   localiser: Localiser | None = None, refiner: Refiner | None = None) -> dict:
    """How often the quality check (the card's limits) fires on volumes that are not left-atrium MRI
    (``foreign_inputs``), by kind; it should fire on every one. Same path as the app: canonical
    orientation, the card's views, flips and threshold."""
    from core.precision import autocast_for

    views = tuple(card["input_spec"].get("views", [2]))
    flips = int(card["input_spec"].get("tta_flips", 1))
    thr = float(card.get("threshold", 0.5))
    grid = float(card["input_spec"]["spacing_mm"])
    res: dict = {}
    for kind, items in foreign_inputs(root).items():
        rows = {}
        for name, data, affine, spacing in items:
            d, sp, _ = to_canonical(data, affine, spacing)
            pr = segment_canonical(model, d, sp, views, grid, thr, 32, lambda: autocast_for(device, bf16),
                                   flips=flips, localiser=localiser, refiner=refiner)
            rows[name] = judge_with_card(quality_measures(pr, sp, thr, d), card).reasons
        res[kind] = {"n": len(rows), "fired": sum(bool(r) for r in rows.values()),
                     "firing_rate": float(np.mean([bool(r) for r in rows.values()])) if rows else float("nan"),
                     "not_fired": [k for k, r in rows.items() if not r]}
    return res


if __name__ == "__main__":
    import sys

    if sys.argv[1:2] == ["rescore"]:  # python -m core.atrium rescore <folds dir> [fold ...]
        rep = rescore_folds(sys.argv[2], only=[int(a) for a in sys.argv[3:]] or None)
        print({f["fold"]: {"flips": f["tta_flips"], "threshold": f["threshold"],
                           **{ds: round(r["dice_mean"], 4) for ds, r in f["per_dataset"].items()}}
               for f in rep["folds"]})
    elif sys.argv[1:2] == ["merge"]:  # python -m core.atrium merge <other atrium.cv.json> [fold ...] [--note TEXT]
        args = sys.argv[2:]
        note = args.pop(args.index("--note") + 1) if "--note" in args else None
        args = [a for a in args if a != "--note"]
        rep = merge_cv_folds(args[0], folds=[int(a) for a in args[1:]] or None, machine_note=note)
        print({f["fold"]: {"flips": f["tta_flips"], "threshold": f["threshold"],
                           **{ds: round(r["dice_mean"], 4) for ds, r in f["per_dataset"].items()},
                           "previous": f.get("previous_run", {}).get("dice_mean_per_dataset")}
               for f in rep["folds"]})
    elif sys.argv[1:2] == ["localiser"]:  # python -m core.atrium localiser [<folds dir>]: train localisers
        if sys.argv[2:]:  # python -m core.atrium localiser <folds dir> [fold ...]: one per kept fold model, on
            only = {int(a) for a in sys.argv[3:]}  # its training volumes (then: rescore <folds dir>)
            for k, d in kept_fold_dirs(sys.argv[2]).items():
                if not only or k in only:
                    loc = train_localiser(d)
                    print(k, loc.card["training"]["seconds"], "s", loc.card["weights_sha256"])
        else:  # for the committed model, named in its card (then: finish, int8)
            print(name_localiser(train_localiser()))
    elif sys.argv[1:2] == ["refiner"]:  # python -m core.atrium refiner <folds dir>: fold refiners + the committed one
        print(train_refiners(sys.argv[2]))  # (then: rescore <folds dir>, finish, int8)
    elif sys.argv[1:2] == ["int8"]:  # give the committed weights their int8 activation ranges
        c = calibrate_int8()
        print({k: c[k] for k in ("calibration_cases", "ranges_sha256")},
              {k: f"{r['fired']}/{r['n']}" for k, r in c.get("quality_check_foreign_inputs", {}).items()})
    elif sys.argv[1:2] == ["finish"]:  # rescore the committed all-volume model and rewrite its card
        c = finish_card()
        print({"training_fit": {k: round(d["dice_mean"], 4) for k, d in c["training_fit"]["per_dataset"].items()},
               "quality_limits": c["quality_check"]["limits"],
               "foreign": {k: f"{r['fired']}/{r['n']}" for k, r in c["quality_check"].get("foreign_inputs", {}).items()}})
