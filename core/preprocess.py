"""Preprocessing, defined once per task and shared by training, evaluation and inference."""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from core.errors import InvalidInputError

# The input constants live in core.constants (torch-free, so the app's Home page and the task registry
# load without torch); re-exported here where the preprocessing uses them.
from core.constants import (  # noqa: E402,F401
    ATRIUM_CONTEXT,
    ATRIUM_GRID_RANGE_MM,
    ATRIUM_SPACING_MM,
    CARDIAC_CROP_FRACTION,
    CARDIAC_SIZE,
    CARDIAC_SLICE_RANGE,
    CARDIAC_SLICES,
    UNET_MULTIPLE,
    XRAY_SIZE,
)


def _resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bilinear") -> torch.Tensor:
    """Resize a (N, C, H, W) tensor."""
    if mode == "nearest":
        return F.interpolate(x, size=size, mode="nearest")
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=True)


# --------------------------------------------------------------------------- pneumonia


def equalize_histogram(x01: torch.Tensor, levels: int = 1024) -> torch.Tensor:
    """Histogram equalisation per image: (N, C, H, W) in [0, 1] -> mid-rank CDF in [0, 1] (on ``levels``
    grey levels). Any monotone change of the grey scale (gamma, window, exposure, contrast) leaves the
    result unchanged, which is why the pneumonia model sees radiographs this way."""
    n = x01.shape[0]
    q = (x01.reshape(n, -1).float().clamp(0, 1) * (levels - 1)).round().long()
    counts = torch.bincount((q + levels * torch.arange(n).view(n, 1)).flatten(), minlength=n * levels)
    counts = counts.view(n, levels).float()
    cdf = counts.cumsum(1)
    mid = (cdf - counts / 2) / q.shape[1]  # tied pixels share their mid rank
    return torch.gather(mid, 1, q).reshape(x01.shape)


def preprocess_xray(pixels: np.ndarray, size: int = XRAY_SIZE, equalize: bool = False) -> torch.Tensor:
    """(H, W) float image in [0, 1] -> (1, size, size) normalised tensor; ``equalize`` (from the model's
    card) equalises the histogram after resizing."""
    x = torch.from_numpy(np.ascontiguousarray(pixels, dtype=np.float32))[None, None]
    lo, hi = torch.quantile(x.flatten()[:: max(1, x.numel() // 200_000)], torch.tensor([0.005, 0.995]))
    x = ((x - lo) / torch.clamp(hi - lo, min=1e-6)).clamp(0, 1)
    x = _resize(x, (size, size)).clamp(0, 1)
    if equalize:
        x = equalize_histogram(x)
    return ((x - 0.5) / 0.25)[0]


# --------------------------------------------------------------------------- cardiac


def cardiac_slice_indices(n_slices: int, k: int = CARDIAC_SLICES) -> np.ndarray:
    """Indices of the k slices (base to apex) the cardiac model uses."""
    lo, hi = CARDIAC_SLICE_RANGE
    return np.round(np.linspace(lo, hi, k) * (n_slices - 1)).astype(int)


def cardiac_crop_side(shape_xy: tuple[int, int]) -> int:
    """Side in pixels of the square centred crop a cine frame of in-plane shape ``shape_xy`` is cut to before it
    is resized to the model's grid (so one grid pixel spans side / size original pixels each way)."""
    return int(round(CARDIAC_CROP_FRACTION * min(shape_xy)))


CropBox = tuple[int, int, int, int]  # x0, x1, y0, y1: the square of a frame the cardiac model reads


def cardiac_crop_box(shape_xy: tuple[int, int], centre: tuple[float, float] | None = None) -> CropBox:
    """The square of side ``cardiac_crop_side`` the cardiac model reads from a frame of in-plane shape ``shape_xy``:
    centred on ``centre`` (x, y in pixels; default the image's centre), moved as little as needed to lie inside
    the image. -> (x0, x1, y0, y1), half-open."""
    side = cardiac_crop_side(shape_xy)
    if centre is None:  # as the model was first trained and the input check was fitted: floor of the margin
        x0, y0 = (shape_xy[0] - side) // 2, (shape_xy[1] - side) // 2
        return x0, x0 + side, y0, y0 + side
    if not all(math.isfinite(float(c)) for c in centre):
        raise ValueError(f"the crop centre must be finite, got {centre}")
    out = []
    for n, c in zip(shape_xy, centre):
        lo = int(round(float(c) - side / 2))
        lo = min(max(lo, 0), n - side)
        out += [lo, lo + side]
    return out[0], out[1], out[2], out[3]


def heart_centre(labels: np.ndarray) -> tuple[float, float] | None:
    """The centre (x, y, in the label map's pixels) of the bounding box of the largest connected region of
    foreground over all slices of an (X, Y, Z) label map (any label > 0, projected through the slices); None when
    there is none. The largest region only: a stray false positive far from the heart must not move the crop."""
    fg = np.asarray(labels).reshape(labels.shape[0], labels.shape[1], -1).any(axis=2)
    if not fg.any():
        return None
    xs, ys = np.nonzero(largest_component(fg))
    return (xs.min() + xs.max() + 1) / 2, (ys.min() + ys.max() + 1) / 2


def grid_to_frame(point: tuple[float, float], box: CropBox, size: int) -> tuple[float, float]:
    """A point (x, y) on the model's (size x size) grid of the crop ``box`` -> the frame's pixel coordinates
    (edges: grid 0 is the box's first pixel edge, grid ``size`` its last)."""
    side_x, side_y = box[1] - box[0], box[3] - box[2]
    return box[0] + point[0] * side_x / size, box[2] + point[1] * side_y / size


def labels_touch_edge(labels: np.ndarray) -> bool:
    """Whether any foreground (label > 0) of an (X, Y, Z) label map lies on the map's outermost rows or columns:
    the structure may go on beyond the crop the model read."""
    m = np.asarray(labels) > 0
    return bool(m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())


def cardiac_frame(volume: np.ndarray, size: int = CARDIAC_SIZE, mask: bool = False,
                  all_slices: bool = False, box: CropBox | None = None) -> torch.Tensor:
    """(X, Y, Z) cine frame (or its label map) -> (k, size, size): chosen slices, cropped to ``box``
    (``cardiac_crop_box``; default the centred square).

    ``all_slices`` returns every slice (Z, size, size) instead, for training the segmentation.
    """
    if volume.ndim != 3 or volume.shape[2] < 3:
        raise InvalidInputError(
            "A short-axis cine frame needs at least 3 slices; this file holds "
            f"{volume.shape[2] if volume.ndim == 3 else 'no'} slices."
        )
    idx = np.arange(volume.shape[2]) if all_slices else cardiac_slice_indices(volume.shape[2])
    x0, x1, y0, y1 = box if box is not None else cardiac_crop_box(volume.shape[:2])
    sl = np.ascontiguousarray(np.moveaxis(volume[x0:x1, y0:y1, idx], 2, 0), dtype=np.float32)
    t = torch.from_numpy(sl)[None]
    if mask:
        return _resize(t, (size, size), "nearest")[0].round().long()
    lo, hi = np.percentile(volume, [1, 99])
    t = ((t - float(lo)) / max(float(hi - lo), 1e-6)).clamp(0, 1.5)
    return ((_resize(t, (size, size)) - 0.5) / 0.25)[0]


def preprocess_cardiac(ed: np.ndarray, es: np.ndarray, size: int = CARDIAC_SIZE,
                       box: CropBox | None = None) -> torch.Tensor:
    """ED and ES frames (X, Y, Z) -> (2k, size, size): ED slices then ES slices, both cropped to ``box``."""
    if ed.shape != es.shape:
        raise InvalidInputError(
            f"The ED frame ({' x '.join(map(str, ed.shape))}) and ES frame ({' x '.join(map(str, es.shape))}) "
            "differ in size; both must come from the same cine series."
        )
    return torch.cat([cardiac_frame(ed, size, box=box), cardiac_frame(es, size, box=box)], dim=0)


# --------------------------------------------------------------------------- atrium


def box_around(values: np.ndarray, spacing: tuple[float, float, float], margin_mm: float, level: float = 0.0
               ) -> tuple[slice, slice, slice] | None:
    """The box (X, Y, Z slices) around the voxels of ``values`` over ``level`` (a mask's, with 0), widened by
    ``margin_mm`` on each side and clipped to the array; None when there are none."""
    nz = np.argwhere(values > level)
    if len(nz) == 0:
        return None
    out = []
    for ax in range(3):
        m = int(math.ceil(margin_mm / spacing[ax]))
        out.append(slice(max(0, int(nz[:, ax].min()) - m), min(values.shape[ax], int(nz[:, ax].max()) + m + 1)))
    return tuple(out)


def normalise_volume(data: np.ndarray) -> np.ndarray:
    """Clip to the 0.5-99.5 percentiles and z-score (float32, same shape)."""
    sub = data[:: max(1, data.shape[0] // 64), :: max(1, data.shape[1] // 64), :]
    lo, hi = (float(v) for v in np.percentile(sub, [0.5, 99.5]))
    # Python floats: a float32 volume is clipped in float32 (NumPy 2 would widen it to a float64 copy for
    # float64 bounds; same values after the cast back)
    x = np.clip(data, lo, hi).astype(np.float32, copy=False)
    # in place: a 256x256x130 volume is 34 MB per copy, and the app's memory goal is tight
    mean, std = float(x.mean()), max(float(x.std()), 1e-6)
    x -= mean
    x /= std
    return x


@dataclass(frozen=True)
class SliceGeometry:
    """How a volume's slices were resampled and padded, so predictions can be put back."""

    original_xy: tuple[int, int]
    resampled_xy: tuple[int, int]
    padded_xy: tuple[int, int]


def atrium_padded(data: np.ndarray, spacing: tuple[float, float, float],
                  grid_mm: float = ATRIUM_SPACING_MM, normalised: bool = False) -> tuple[torch.Tensor, SliceGeometry]:
    """(X, Y, Z) volume -> (Z + 2*context, H, W) normalised slices resampled in-plane to ``grid_mm`` (the
    spacing the model was trained at, from its card), padded to the U-Net's multiple and with the end
    slices repeated; window i..i+2*context is slice i's 2.5D input. ``normalised``: ``data`` is already
    z-scored (a crop of a normalised volume keeps the whole volume's statistics)."""
    lo, hi = ATRIUM_GRID_RANGE_MM
    if not lo <= grid_mm <= hi:
        raise ValueError(f"the in-plane grid must be {lo}-{hi} mm, got {grid_mm}")
    X, Y, Z = data.shape
    rx = max(UNET_MULTIPLE, int(round(X * spacing[0] / grid_mm)))
    ry = max(UNET_MULTIPLE, int(round(Y * spacing[1] / grid_mm)))
    px = -(-rx // UNET_MULTIPLE) * UNET_MULTIPLE
    py = -(-ry // UNET_MULTIPLE) * UNET_MULTIPLE
    c = ATRIUM_CONTEXT
    arr = np.asarray(data, dtype=np.float32) if normalised else normalise_volume(data)
    norm = torch.from_numpy(arr).permute(2, 0, 1)  # (Z, X, Y) view, no copy
    # One preallocated buffer, filled slice by slice: no full-volume temporaries for the resampling,
    # padding and end-slice repeats.
    padded = torch.empty(Z + 2 * c, px, py)
    low = math.inf
    for z in range(Z):
        sl = norm[z]
        if (rx, ry) != (X, Y):
            sl = _resize(sl[None, None].contiguous(), (rx, ry))[0, 0]
        padded[z + c, :rx, :ry] = sl
        low = min(low, float(sl.min()))
    padded[:, rx:, :] = low  # the pad takes the (resampled) volume's minimum
    padded[:, :, ry:] = low
    padded[:c] = padded[c]
    padded[Z + c :] = padded[Z + c - 1]
    return padded, SliceGeometry((X, Y), (rx, ry), (px, py))


def atrium_window(padded: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Slices start..stop-1 as (stop - start, 1 + 2*context, H, W) 2.5D inputs, built on demand."""
    w = 2 * ATRIUM_CONTEXT + 1
    return torch.stack([padded[i : i + w] for i in range(start, stop)])


def atrium_slices(data: np.ndarray, spacing: tuple[float, float, float],
                  grid_mm: float = ATRIUM_SPACING_MM) -> tuple[torch.Tensor, SliceGeometry]:
    """(X, Y, Z) volume -> (Z, 1 + 2*context, H, W) 2.5D slice stack on the ``grid_mm`` in-plane grid."""
    padded, geom = atrium_padded(data, spacing, grid_mm)
    return atrium_window(padded, 0, data.shape[2]), geom


def atrium_restore(prob: torch.Tensor, geom: SliceGeometry) -> np.ndarray:
    """(Z, H, W) probabilities on the padded grid -> (X, Y, Z) float32 on the input grid."""
    rx, ry = geom.resampled_xy
    p = prob[:, :rx, :ry]
    if geom.resampled_xy != geom.original_xy:
        p = F.interpolate(p[:, None], size=geom.original_xy, mode="bilinear", align_corners=False)[:, 0]
    return p.permute(1, 2, 0).contiguous().numpy().astype(np.float32, copy=False)


def atrium_label_slices(label: np.ndarray, geom: SliceGeometry) -> torch.Tensor:
    """(X, Y, Z) binary label -> (Z, H, W) float on the padded training grid."""
    t = torch.from_numpy(np.ascontiguousarray(label, dtype=np.float32)).permute(2, 0, 1)[:, None]
    if geom.resampled_xy != geom.original_xy:
        t = _resize(t, geom.resampled_xy, "nearest")
    rx, ry = geom.resampled_xy
    px, py = geom.padded_xy
    return F.pad(t, (0, py - ry, 0, px - rx))[:, 0]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """Keep the largest 3D connected component (the atrium is one structure). Returns uint8."""
    lab, n = ndimage.label(mask)
    if n <= 1:
        return np.asarray(mask, dtype=np.uint8)
    sizes = np.bincount(lab.ravel(), minlength=n + 1)[1:]  # same counts as ndimage.sum_labels, ~10x faster
    return (lab == int(np.argmax(sizes)) + 1).astype(np.uint8)
