"""Pure-numpy rendering helpers for the app: heatmap and mask overlays (RGB uint8 arrays)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from matplotlib import colormaps

# Overlay colours (RGB): told apart by hue and named in the legend.
AGREE = (0, 200, 0)  # predicted and true
FALSE_POS = (230, 40, 40)  # predicted only
FALSE_NEG = (40, 120, 255)  # true only
PRED_ONLY_VIEW = (255, 200, 0)  # prediction when the truth is hidden
TRUTH_ONLY_VIEW = (40, 120, 255)
UNSURE = (255, 0, 255)  # where the model is unsure: hatched over whatever lies beneath


@dataclass(frozen=True)
class Window:
    """A display window (window/level) in the image's own values: ``center`` and ``width`` > 0, as DICOM's
    WindowCenter/WindowWidth; ``name`` says where it came from (a file preset, the percentiles, ...)."""

    center: float
    width: float
    name: str = ""
    invert: bool = False  # white is low (DICOM MONOCHROME1): inverted after windowing

    def __post_init__(self) -> None:
        if not (np.isfinite(self.center) and np.isfinite(self.width)) or self.width <= 0:
            raise ValueError(f"a window needs a finite centre and a positive width, got {self.center}, {self.width}")

    def apply(self, values: np.ndarray) -> np.ndarray:
        """Values -> [0, 1] float32: linear from center - width/2 (black) to center + width/2 (white)."""
        lo = self.center - self.width / 2
        out = np.clip((np.asarray(values, dtype=np.float32) - lo) / self.width, 0, 1)
        return 1 - out if self.invert else out


def percentile_window(values: np.ndarray, lo: float = 1.0, hi: float = 99.0, name: str = "") -> Window:
    """The window spanning the ``lo``-th to ``hi``-th percentile of ``values`` (sampled on large arrays)."""
    v = np.asarray(values)
    if v.size > 2_000_000:
        # percentiles of a 3D volume: every k-th voxel along each axis (~1 M or fewer) is as good, and taken
        # as a view it spares copying the whole (often transposed) volume first (75 ms of 85 on 256x256x130)
        k = int(np.ceil((v.size / 1_000_000) ** (1 / v.ndim)))
        v = v[tuple(slice(None, None, k) for _ in range(v.ndim))]
    v = np.asarray(v, dtype=np.float32).ravel()
    a, b = (float(x) for x in np.percentile(v, [lo, hi]))
    return Window((a + b) / 2, max(b - a, 1e-6), name or f"auto ({lo:g}-{hi:g} % of values)")


def zoom_view(img: np.ndarray, zoom: float = 1.0, fx: float = 0.5, fy: float = 0.5) -> np.ndarray:
    """The part of ``img`` (H, W[, C]) a ``zoom`` x magnification shows around the point at fractions
    (``fx`` across, ``fy`` down) of its size, kept inside the image. zoom 1 -> the whole image."""
    if zoom < 1:
        raise ValueError(f"zoom must be >= 1, got {zoom}")
    h, w = img.shape[:2]
    ch, cw = max(1, int(round(h / zoom))), max(1, int(round(w / zoom)))
    top = int(np.clip(round(fy * h - ch / 2), 0, h - ch))
    left = int(np.clip(round(fx * w - cw / 2), 0, w - cw))
    return np.ascontiguousarray(img[top:top + ch, left:left + cw])


def fit_for_display(rgb: np.ndarray, max_side: int = 1024) -> np.ndarray:
    """``rgb`` (H, W, 3) uint8 shrunk (area-averaged) so that its longer side is at most ``max_side``: a page
    shows an image a few hundred pixels wide, and a full radiograph (2-3k px) costs time to encode and send."""
    from PIL import Image

    h, w = rgb.shape[:2]
    if max(h, w) <= max_side:
        return rgb
    k = max_side / max(h, w)
    im = Image.fromarray(np.ascontiguousarray(rgb)).resize((max(1, round(w * k)), max(1, round(h * k))), Image.BOX)
    return np.asarray(im)


def to_display(img2d: np.ndarray) -> np.ndarray:
    """Array-order slice (X, Y) -> image-order (rows, cols) for display (rotated 90 degrees)."""
    return np.rot90(np.asarray(img2d))


def radiological_axial(slice_ras: np.ndarray) -> np.ndarray:
    """Axial slice (X, Y) of a canonical RAS volume -> image (rows, cols) in the radiological convention:
    anterior at the top, the patient's right on the image's left."""
    return np.ascontiguousarray(np.asarray(slice_ras)[::-1, ::-1].T)


@dataclass(frozen=True)
class Plane:
    """A viewing plane of a canonical RAS volume (X, Y, Z): the ``axis`` its slices cut across, the letters
    at the image's (top, bottom, left, right) edges, where the anatomy lies in words, and the order of its
    slices along ``axis``."""

    name: str
    axis: int
    markers: tuple[str, str, str, str]
    layout: str
    order: str


# As radiologists read each plane (the radiological convention): the same flips serve all three
# (``radiological_slice``), since every remaining axis of a RAS volume runs towards R, A or S.
PLANES = {
    "axial": Plane("axial", 2, ("A", "P", "R", "L"), "anterior at the top, the patient's right on the image's left",
                   "inferior → superior"),
    "coronal": Plane("coronal", 1, ("S", "I", "R", "L"), "superior at the top, the patient's right on the image's left",
                     "posterior → anterior"),
    "sagittal": Plane("sagittal", 0, ("S", "I", "A", "P"), "superior at the top, anterior on the image's left",
                      "the patient's left → right"),
}


def radiological_slice(vol_ras: np.ndarray, plane: Plane, index: int) -> np.ndarray:
    """Slice ``index`` across ``plane.axis`` of a canonical RAS volume (X, Y, Z) -> image (rows, cols) with
    ``plane.markers`` at its edges: both remaining axes flipped (so R, A, S come first) and the later one on
    the rows (axial: rows Y, cols X; coronal: rows Z, cols X; sagittal: rows Z, cols Y)."""
    if not 0 <= index < vol_ras.shape[plane.axis]:
        raise IndexError(f"{plane.name} slice {index} is outside 0..{vol_ras.shape[plane.axis] - 1}")
    return radiological_axial(np.take(vol_ras, index, axis=plane.axis))


def middle_slice(mask: np.ndarray, axis: int) -> int:
    """The middle one (0-based) of the slices across ``axis`` that hold any of ``mask``; the volume's middle
    slice when the mask is empty. Where the viewer opens a plane and the report cuts it."""
    zs = np.flatnonzero(np.asarray(mask).any(axis=tuple(i for i in range(np.ndim(mask)) if i != axis)))
    return int(zs[len(zs) // 2]) if len(zs) else int(np.shape(mask)[axis]) // 2


def plane_pixel_mm(spacing: tuple[float, float, float], plane: Plane) -> tuple[float, float]:
    """(row height, column width) in mm of ``radiological_slice``'s image of a volume with voxel ``spacing``."""
    a, b = (spacing[i] for i in range(3) if i != plane.axis)
    return float(b), float(a)


def square_pixels(img: np.ndarray, row_mm: float, col_mm: float, max_ratio: float = 16.0) -> np.ndarray:
    """``img`` (H, W[, C]) with its rows or its columns repeated (nearest neighbour) so that a pixel is as
    tall as it is wide: a coronal or sagittal slice of a volume whose slices are thicker than its pixels
    would otherwise look squashed. The longer side is stretched, by at most ``max_ratio``."""
    if not (row_mm > 0 and col_mm > 0):
        raise ValueError(f"pixel sizes must be positive, got {row_mm} x {col_mm} mm")
    ratio = min(max(row_mm, col_mm) / min(row_mm, col_mm), max_ratio)
    if ratio < 1.02:  # within 2 %: not visible
        return img
    h, w = img.shape[:2]
    if row_mm > col_mm:
        rows = np.minimum(((np.arange(int(round(h * ratio))) + 0.5) / ratio).astype(int), h - 1)
        return np.ascontiguousarray(img[rows])
    cols = np.minimum(((np.arange(int(round(w * ratio))) + 0.5) / ratio).astype(int), w - 1)
    return np.ascontiguousarray(img[:, cols])


def with_orientation_markers(rgb: np.ndarray, markers: tuple[str, str, str, str] = ("A", "P", "R", "L"),
                             min_side: int = 320) -> np.ndarray:
    """Upscale (nearest) an RGB image to at least ``min_side`` pixels and write orientation letters at the
    top, bottom, left and right edges (yellow on a dark box, readable on any slice)."""
    from PIL import Image, ImageDraw

    h, w = rgb.shape[:2]
    k = max(1, int(np.ceil(min_side / max(1, min(h, w)))))
    im = Image.fromarray(np.repeat(np.repeat(rgb, k, axis=0), k, axis=1))
    d = ImageDraw.Draw(im)
    W, H = im.size
    top, bottom, left, right = markers
    for text, (x, y) in ((top, (W // 2 - 4, 2)), (bottom, (W // 2 - 4, H - 14)), (left, (3, H // 2 - 6)),
                         (right, (W - 11, H // 2 - 6))):
        d.rectangle([x - 2, y - 1, x + 9, y + 12], fill=(0, 0, 0))
        d.text((x, y), text, fill=(255, 230, 0))
    return np.asarray(im)


def grey_rgb(gray: np.ndarray, window: Window | None = None) -> np.ndarray:
    """(H, W) any range -> (H, W, 3) uint8: through ``window`` when given, else scaled between the 0.5th
    and 99.5th percentiles."""
    g = np.asarray(gray, dtype=np.float32)
    if window is not None:
        g = window.apply(g)
    else:
        lo, hi = float(np.percentile(g, 0.5)), float(np.percentile(g, 99.5))
        g = np.clip((g - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat((g * 255).astype(np.uint8)[..., None], 3, axis=2)


def heatmap_overlay(gray: np.ndarray, heat: np.ndarray, alpha: float = 0.4, window: Window | None = None
                    ) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colour map) over a grey image of the same (H, W)."""
    if gray.shape != heat.shape:
        raise ValueError(f"image {gray.shape} and heatmap {heat.shape} differ in shape")
    base = grey_rgb(gray, window).astype(np.float32)
    colour = colormaps["jet"](np.clip(heat, 0, 1))[..., :3] * 255
    return (base * (1 - alpha) + colour * alpha).clip(0, 255).astype(np.uint8)


def mask_overlay(gray: np.ndarray, pred: np.ndarray | None, truth: np.ndarray | None, show_pred: bool = True,
                 show_truth: bool = True, alpha: float = 0.45, window: Window | None = None,
                 unsure: np.ndarray | None = None, unsure_label: str = "model unsure (hatched)"
                 ) -> tuple[np.ndarray, list[tuple[str, tuple]]]:
    """Colour a slice by agreement of prediction and truth. Returns (RGB uint8, legend entries).

    ``unsure`` (H, W) bool, if given: where the model is unsure, hatched (every other pixel, in a checkerboard)
    in UNSURE over the colours beneath, so that both stay visible."""
    out = grey_rgb(gray, window).astype(np.float32)
    p = pred.astype(bool) if (pred is not None and show_pred) else None
    t = truth.astype(bool) if (truth is not None and show_truth) else None
    layers: list[tuple[np.ndarray, tuple, str]] = []
    if p is not None and t is not None:
        layers = [(p & t, AGREE, "predicted and true (agreement)"), (p & ~t, FALSE_POS, "predicted only (false positive)"),
                  (~p & t, FALSE_NEG, "true only (false negative)")]
    elif p is not None:
        layers = [(p, PRED_ONLY_VIEW, "predicted atrium")]
    elif t is not None:
        layers = [(t, TRUTH_ONLY_VIEW, "true atrium (ground truth)")]
    for m, colour, _ in layers:
        out[m] = out[m] * (1 - alpha) + np.array(colour, np.float32) * alpha
    entries = [(name, colour) for _, colour, name in layers]
    if unsure is not None:
        if unsure.shape != out.shape[:2]:
            raise ValueError(f"image {out.shape[:2]} and uncertainty map {unsure.shape} differ in shape")
        yy, xx = np.indices(unsure.shape)
        out[unsure.astype(bool) & ((yy + xx) % 2 == 0)] = UNSURE
        entries.append((unsure_label, UNSURE))
    return out.clip(0, 255).astype(np.uint8), entries


# ACDC structures, coloured by hue: right ventricle, myocardium, left-ventricle cavity.
CARDIAC_COLOURS = {1: ((40, 120, 255), "right ventricle"), 2: ((0, 200, 0), "myocardium"),
                   3: ((230, 40, 40), "left-ventricle cavity")}


def label_overlay(gray: np.ndarray, labels: np.ndarray, colours: dict[int, tuple[tuple, str]] = CARDIAC_COLOURS,
                  alpha: float = 0.45, window: Window | None = None) -> tuple[np.ndarray, list[tuple[str, tuple]]]:
    """Colour each labelled structure of a (H, W) label map over a grey slice. Returns (RGB uint8, legend)."""
    if gray.shape != labels.shape:
        raise ValueError(f"image {gray.shape} and labels {labels.shape} differ in shape")
    out = grey_rgb(gray, window).astype(np.float32)
    for value, (colour, _) in colours.items():
        m = labels == value
        out[m] = out[m] * (1 - alpha) + np.array(colour, np.float32) * alpha
    return out.clip(0, 255).astype(np.uint8), [(name, colour) for colour, name in colours.values()]


@dataclass(frozen=True)
class SliceStrip:
    """A per-slice chart drawn once as an image (cheap for the browser, unlike an interactive chart redrawn on
    every slice change); :meth:`marked` draws the current slice's marker into a copy.

    ``image`` (H, W, 3) uint8; ``xs`` (nz,) the pixel column of each slice; ``rows`` the pixel rows
    (top, bottom) of each plotting area (the marker is drawn there)."""

    image: np.ndarray
    xs: np.ndarray
    rows: tuple[tuple[int, int], ...]

    def marked(self, z: int, colour: tuple[int, int, int] = (220, 0, 0)) -> np.ndarray:
        """The strip with a vertical line (3 px) at slice ``z`` (0-based)."""
        out = self.image.copy()
        x = int(self.xs[int(np.clip(z, 0, len(self.xs) - 1))])
        for top, bottom in self.rows:
            out[top:bottom, max(0, x - 1):x + 2] = colour
        return out


def slice_strip(unsure: np.ndarray, per_slice: np.ndarray | None = None, width_px: int = 560,
                xlabel: str = "axial slice") -> SliceStrip:
    """The atrium page's strip: Dice per slice (when a reference mask is given; NaN where neither mask has
    atrium) above the uncertain area per slice (cm²), slices 1..nz on a shared x axis.

    ``unsure`` (nz,) cm²; ``per_slice`` (nz,) Dice or None; ``xlabel`` names the slices (their plane)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    unsure = np.asarray(unsure, dtype=float)
    nz = len(unsure)
    if nz == 0 or (per_slice is not None and len(per_slice) != nz):
        raise ValueError(f"need one value per slice: {nz} uncertain areas, "
                         f"{None if per_slice is None else len(per_slice)} Dice values")
    rows = 2 if per_slice is not None else 1
    dpi = 100
    fig = Figure(figsize=(width_px / dpi, (1.7 * rows + 0.5)), dpi=dpi)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    x = np.arange(1, nz + 1)
    if per_slice is not None:
        axes[0].plot(x, per_slice, color="tab:blue", lw=1.2)
        axes[0].set_ylim(0, 1.05)
        axes[0].set_title("Dice per slice", fontsize=9, loc="left")
    # one filled step outline, not one bar patch per slice (the same picture in a tenth of the time)
    axes[-1].stairs(unsure, np.arange(nz + 1) + 0.5, fill=True, color="orange")
    axes[-1].set_title("Uncertain area per slice (cm², probability 0.2-0.8)", fontsize=9, loc="left")
    axes[-1].set_xlabel(xlabel, fontsize=9)
    for ax in axes:
        ax.set_xlim(0.5, nz + 0.5)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout(pad=0.4)
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    h = img.shape[0]
    # display coordinates have their origin at the bottom left; image rows count from the top
    xs = np.rint(axes[-1].transData.transform(np.c_[x, np.zeros(nz)])[:, 0]).astype(int)
    spans = tuple((int(max(0, h - ax.get_window_extent().y1)), int(min(h, h - ax.get_window_extent().y0)))
                  for ax in axes)
    return SliceStrip(img, np.clip(xs, 0, img.shape[1] - 1), spans)
