"""Inference for the three tasks on in-memory inputs, using the committed weights and their cards."""
from __future__ import annotations

import copy
import ctypes
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core import preprocess as pp
from core.checkpoint import load_state_dict
from core.errors import InvalidInputError
from core.explain import gradcam, model_lock
from core.io import Cine, Image2D, Volume
from core.metrics import volume_ml
from core.models import build_model, optimize_for_inference
from core.ood import OODGuard, encoder_features, load_guard
from core.precision import autocast, inference_precision
from core.tasks import TaskSpec, get_task


@dataclass
class LoadedModel:
    """A model ready for inference with its card (architecture, threshold, metrics, history)."""

    spec: TaskSpec
    model: nn.Module
    card: dict
    guard: OODGuard | None = None  # out-of-distribution check (classifiers)
    population: tuple[nn.Module, dict] | None = None  # pneumonia: the population check's CNN and its card
    diagnosis: dict | None = None  # cardiac: the five-class classifier (cardiac_diagnosis.json) for these weights
    precision: str = "float32"  # of the forward passes that give probabilities and masks (core.precision)

    @property
    def threshold(self) -> float:
        return float(self.card.get("threshold", self.spec.default_threshold))

    @property
    def input_size(self) -> int:
        """The input side the weights were trained at, from their card (the registry's if absent)."""
        return int(self.card.get("input_spec", {}).get("size", self.spec.input_spec.get("size", 0)))

    @property
    def equalize(self) -> bool:
        """X-ray: whether the weights were trained on histogram-equalised images (their card says)."""
        return bool(self.card.get("input_spec", {}).get("equalize", False))

    @property
    def grid_mm(self) -> float:
        """Segmentation: the in-plane spacing (mm) the weights were trained at, from their card."""
        return float(self.card.get("input_spec", {}).get("spacing_mm", self.spec.input_spec.get("spacing_mm", 0)))


def load_model(task: str, wdir=None, with_guard: bool = True, optimize: bool = True,
               precision: str | None = None) -> LoadedModel:
    """Build the task's architecture from its card and load checksum-verified weights (CPU, eval mode).

    Classifiers also load their input check (``<task>.ood.json``) unless ``with_guard`` is False.
    ``optimize`` folds batch norm, uses channels-last memory and the resolved ``precision`` ("auto",
    "float32" or "bfloat16"; else $MEDIMG_PRECISION; "auto": bfloat16 where the task's registry entry
    allows it and the CPU runs it natively, see core.precision);
    ``optimize=False`` is the plain float32 model (the benchmark's baseline).
    """
    spec = get_task(task)
    prec = inference_precision(precision, bf16_allowed=spec.bf16_inference) if optimize else "float32"
    state, card = load_state_dict(task, wdir)
    arch = card.get("architecture", {})
    model = build_model(arch.get("name", spec.architecture), **arch.get("kwargs", spec.model_kwargs))
    model.load_state_dict(state)
    model.eval()
    if optimize:
        optimize_for_inference(model)
    guard = load_guard(task, wdir) if spec.kind == "binary" and with_guard else None
    population = _load_population(wdir) if task == "pneumonia" and with_guard else None
    if task == "pneumonia":
        import json as _json

        from core.config import weights_dir
        from core.pneumonia import CALIBRATION_FILE

        cal = weights_dir(wdir) / CALIBRATION_FILE
        if cal.is_file():
            c = _json.loads(cal.read_text())
            if c.get("weights_sha256") == card.get("weights_sha256"):
                # sigmoid(slope * logit(p) + intercept); older files hold a temperature only
                slope = float(c.get("slope", 1 / float(c["temperature"])))
                card = {**card, "calibration": (slope, float(c.get("intercept", 0.0)), c.get("method", "temperature"))}
    diagnosis = None
    if task == "cardiac":
        from core.cardiac import load_diagnosis

        d = load_diagnosis(wdir)
        # only a classifier built on these very weights' segmentation and split is used
        diagnosis = d if d and d.get("cardiac_weights_sha256") == card.get("weights_sha256") else None
    return LoadedModel(spec, model, card, guard=guard, precision=prec, population=population, diagnosis=diagnosis)


def warm_up(lm: LoadedModel, pause: Callable[[], None] | None = None) -> None:
    """One throw-away prediction on a synthetic input of the shape the task sees, so that the first real
    upload does not pay for first-call costs (oneDNN picks and builds its kernels per input shape on first
    use; Grad-CAM's backward pass too). ``pause``, when given, is called before each costly stage (an app
    passes one that waits while a user's request is being computed). Errors are ignored: the page reports
    problems with real inputs."""
    rng = np.random.default_rng(0)
    pause = pause or (lambda: None)
    try:
        pause()
        if lm.spec.name == "pneumonia":
            # every stage of predict_xray, called directly: a synthetic image is (rightly) withheld by the
            # input checks, and predict_xray would then skip the probability and Grad-CAM, whose first call
            # (autograd's backward kernels) is what the first real upload would otherwise pay for (~2-3 s)
            yy, xx = np.mgrid[0:256, 0:256] / 255.0
            x01, x = _xray_inputs(lm, (0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy)).astype(np.float32))
            _ood(lm, x)
            population_score(lm, x01)
            _prob(lm, x)
            # on a copy: the first backward pass takes a while, and on the shared model it would hold the model's
            # lock, so an upload arriving meanwhile would wait for it before its verdict (kernels warmed on the
            # copy serve the model too: they are cached per shape, not per module)
            pause()
            twin = copy.deepcopy(lm.model)
            gradcam(twin, twin.gradcam_layer(), x, positive=True)
        elif lm.spec.name == "cardiac":
            v = Volume(rng.random((128, 128, 10)).astype(np.float32), np.eye(4), (1.0, 1.0, 1.0))
            predict_cardiac(lm, v, v, explain=True, guard=False)
        elif lm.spec.name == "atrium":
            segment_atrium(lm, Volume(rng.random((96, 96, 24)).astype(np.float32), np.eye(4), (1.25, 1.25, 1.25)))
    except Exception:  # noqa: BLE001
        pass


def _load_population(wdir=None) -> tuple[nn.Module, dict]:
    """The pneumonia population check (``pneumonia_population.pt`` + card), checksum-verified."""
    from core.pneumonia import POPULATION_TASK

    state, card = load_state_dict(POPULATION_TASK, wdir)
    net = build_model(card["architecture"]["name"], **card["architecture"]["kwargs"])
    net.load_state_dict(state)
    net.eval()
    return net, card


def population_score(lm: LoadedModel, x01: torch.Tensor) -> np.ndarray:
    """P(outside the population) for [0, 1] images (N, 1, S, S); zeros without a population check."""
    if lm.population is None:
        return np.zeros(len(x01))
    from core.pneumonia import gate_score

    net, _ = lm.population
    with model_lock(net):
        return gate_score(net, x01)


def release_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc keeps it otherwise, so one large
    request would keep the app server's memory high for good). A no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _ood(lm: LoadedModel, x: torch.Tensor) -> float:
    """Out-of-distribution score of one model input (above lm.guard.threshold: withhold)."""
    with model_lock(lm.model):
        f = encoder_features(lm.model, x).numpy().astype(np.float64)
    return float(lm.guard.score(f)[0]) if lm.guard is not None else 0.0


def _prob(lm: LoadedModel, x: torch.Tensor) -> np.ndarray:
    with model_lock(lm.model), torch.inference_mode(), autocast(lm.precision):
        return torch.sigmoid(lm.model(x).float()).flatten().numpy()


# --------------------------------------------------------------------------- pneumonia

UNCERTAIN_MARGIN = 0.10  # probabilities this close to the threshold get no verdict ("refer to a specialist")


def verdict_band(probability: float, threshold: float, margin: float = UNCERTAIN_MARGIN,
                 calibrated: bool = False) -> str:
    """"positive", "negative", or "uncertain" when |probability - threshold| < margin.

    With a ``calibrated`` probability a verdict must also agree with it: "negative" needs P < 50 % and
    "positive" P >= 50 %, so that a finding never contradicts the probability shown beside it (the
    threshold balances sensitivity and specificity, and need not sit at 50 % on the calibrated scale)."""
    if abs(probability - threshold) < margin:
        return "uncertain"
    verdict = "positive" if probability >= threshold else "negative"
    if calibrated and (verdict == "positive") != (probability >= 0.5):
        return "uncertain"
    return verdict



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
    calibrated: bool = False  # probability and threshold are on the calibrated scale (core.pneumonia.calibrate)


WITHHELD_XRAY = ("This image does not look like the frontal chest radiographs the model was trained on, so no "
                 "diagnosis is given. Check that it is a frontal chest X-ray.")
WITHHELD_POPULATION = ("This image does not look like a frontal chest radiograph of a young child (about 1-5 years), "
                       "the only population the model was trained and validated on; it may be an adult's radiograph, "
                       "a lateral view, another body part or modality. No diagnosis is given.")


def _xray_inputs(lm: LoadedModel, pixels: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(H, W) radiograph -> ([0, 1] image for display and the population check, model input), each (1, 1, S, S)."""
    x01 = (pp.preprocess_xray(pixels, lm.input_size) * 0.25 + 0.5).clamp(0, 1)[None]
    return x01, pp.preprocess_xray(pixels, lm.input_size, lm.equalize)[None]


def predict_xray(lm: LoadedModel, image: Image2D, explain: bool = True) -> XRayResult:
    """P(pneumonia) for one radiograph, the decision at the card's threshold, and Grad-CAM.

    The diagnosis is withheld (``withheld`` set, probability None) for colour images and for inputs
    whose encoder features lie outside the training distribution.
    """
    x01, x = _xray_inputs(lm, image.pixels)
    display = x01[0, 0].numpy()
    score = _ood(lm, x)
    if image.colour:
        return XRayResult(None, lm.threshold, None, display, None, score,
                          "This is a colour image; chest radiographs are grey-scale, so no diagnosis is given.")
    if lm.guard is not None and score > lm.guard.threshold:
        return XRayResult(None, lm.threshold, None, display, None, score, WITHHELD_XRAY)
    pop = float(population_score(lm, x01)[0])
    if lm.population is not None and pop > float(lm.population[1]["threshold"]):
        return XRayResult(None, lm.threshold, None, display, None, score, WITHHELD_POPULATION, pop)
    prob = float(_prob(lm, x)[0])
    positive = prob >= lm.threshold
    heat = _xray_gradcam(lm, x, positive) if explain else None
    cal = lm.card.get("calibration")
    if cal:  # shown calibrated; the decision above is the same at the mapped threshold (the map is monotone)
        from core.pneumonia import apply_platt

        a, b, _ = cal
        return XRayResult(float(apply_platt(prob, a, b)), float(apply_platt(lm.threshold, a, b)), positive,
                          display, heat, score, None, pop, calibrated=True)
    return XRayResult(prob, lm.threshold, positive, display, heat, score, None, pop)


def _xray_gradcam(lm: LoadedModel, x: torch.Tensor, positive: bool) -> np.ndarray:
    heat = gradcam(lm.model, lm.model.gradcam_layer(), x, positive=positive)
    release_memory()
    return heat


def xray_heatmap(lm: LoadedModel, image: Image2D, positive: bool) -> np.ndarray:
    """The Grad-CAM map (H, W) in [0, 1], on the model's square input, for the decision ``positive`` of a
    result predicted with ``explain=False`` (so that a page can show the verdict before the map)."""
    return _xray_gradcam(lm, _xray_inputs(lm, image.pixels)[1], positive)


def predict_xray_batch(lm: LoadedModel, pixels: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(P(pneumonia), input-check refusal flags) for several (H, W) images, without Grad-CAM or withholding."""
    x01 = torch.stack([(pp.preprocess_xray(p, lm.input_size) * 0.25 + 0.5).clamp(0, 1) for p in pixels])
    x = pp.equalize_histogram(x01) if lm.equalize else x01
    x = (x - 0.5) / 0.25
    with model_lock(lm.model):
        f = encoder_features(lm.model, x).numpy().astype(np.float64)
    refused = lm.guard.score(f) > lm.guard.threshold if lm.guard is not None else np.zeros(len(x), bool)
    if lm.population is not None:
        refused = refused | (population_score(lm, x01) > float(lm.population[1]["threshold"]))
    return _prob(lm, x), refused


# --------------------------------------------------------------------------- cardiac


@dataclass
class CardiacResult:
    probability: float | None  # P(disease); None when withheld
    threshold: float
    positive: bool | None
    slices: np.ndarray  # (2k, H, W) in [0, 1]: the ED then ES slices the model used
    slice_labels: list[str]
    heatmap: np.ndarray | None  # (2k, H, W) in [0, 1], one Grad-CAM map per slice
    ood_score: float = 0.0
    withheld: str | None = None
    segmentation: np.ndarray | None = None  # (2k, H, W) uint8: 0 background, 1 RV, 2 myocardium, 3 LV cavity
    shape: dict[str, float] | None = None  # estimates from the segmentation, see cardiac_shape_summary
    diagnosis: dict | None = None  # five classes: {"probabilities": {group: p}, "features": {name: value}}

    def measures(self) -> dict[str, float | str] | None:
        """The ejection fractions and ratios to show, from one source: the five-class features (the model's
        segmentation of every slice) where they were computed, else the binary model's 8-slice estimates.
        Keys lv_ef, rv_ef (fractions), myo_lv_ed, rv_lv_ed, and source ("every slice" / "8 slices")."""
        if self.diagnosis is not None:
            f = self.diagnosis["features"]
            return {"lv_ef": f["lv_ef"], "rv_ef": f["rv_ef"], "myo_lv_ed": f["myo_lv_ed"], "rv_lv_ed": f["rv_lv_ed"],
                    "source": "every slice"}
        if self.shape is not None:
            s = self.shape
            return {"lv_ef": s["lv_ef"], "rv_ef": s["rv_ef"], "myo_lv_ed": s["myo_to_lv_ed"],
                    "rv_lv_ed": s["rv_to_lv_ed"], "source": "8 slices"}
        return None

    @property
    def frames_swapped(self) -> bool:
        """The LV cavity is smaller at the frame given as ED than at the one given as ES (EF would be negative)."""
        m = self.measures()
        return m is not None and m["lv_ef"] <= 0


WITHHELD_CARDIAC = ("These frames do not look like the short-axis cine MRI the model was trained on, so no "
                    "diagnosis is given. Check that they are the ED and ES frames of a short-axis cine series.")


def predict_cardiac(lm: LoadedModel, ed: Volume, es: Volume, explain: bool = True,
                    guard: bool = True) -> CardiacResult:
    """P(disease) (normal vs DCM/HCM/MINF/RV) from the ED and ES frames of one cine study."""
    if ed.data.shape != es.data.shape:
        raise InvalidInputError(
            f"The ED frame ({' x '.join(map(str, ed.data.shape))}) and the ES frame "
            f"({' x '.join(map(str, es.data.shape))}) differ in size; both must come from the same cine series."
        )
    for v, which in ((ed, "ED"), (es, "ES")):
        if float(v.data.max() - v.data.min()) <= 0:
            raise InvalidInputError(f"The {which} frame is blank: every voxel has the same value.")
    x = pp.preprocess_cardiac(ed.data, es.data, lm.input_size)[None]
    idx = pp.cardiac_slice_indices(ed.data.shape[2])
    labels = [f"ED slice {i + 1}/{ed.data.shape[2]}" for i in idx] + [f"ES slice {i + 1}/{es.data.shape[2]}" for i in idx]
    slices = (x[0].numpy() * 0.25 + 0.5).clip(0, 1)
    score = _ood(lm, x)
    if guard and lm.guard is not None and score > lm.guard.threshold:
        return CardiacResult(None, lm.threshold, None, slices, labels, None, score, WITHHELD_CARDIAC)
    with model_lock(lm.model), torch.inference_mode():
        with autocast(lm.precision):  # the U-Net; its shape descriptors and the head stay float32
            seg = lm.model.segment(x).float()
        f = lm.model.shape_features(seg)
        logit = lm.model.head(f)
        feats = f[0].numpy()
    prob = float(torch.sigmoid(logit).flatten()[0])
    positive = prob >= lm.threshold
    heat = gradcam(lm.model, lm.model.gradcam_layer(), x, positive=positive) if explain else None
    seg_labels = seg[0].argmax(dim=1).to(torch.uint8).numpy()
    diagnosis = None
    if lm.diagnosis is not None:
        from core.cardiac import diagnose

        with model_lock(lm.model):
            diagnosis = diagnose(lm.model, lm.diagnosis, ed.data, es.data, lm.input_size)
    release_memory()
    return CardiacResult(prob, lm.threshold, positive, slices, labels, heat, score, None, seg_labels,
                         cardiac_shape_summary(feats), diagnosis)


@dataclass
class CardiacCycle:
    """LV and RV cavity size over a cine's frames and the ED/ES frames picked from it (0-based)."""

    lv: np.ndarray  # (T,) LV cavity pixels summed over slices (crop grid)
    rv: np.ndarray  # (T,)
    ed: int
    es: int


def cardiac_cycle(lm: LoadedModel, cine: Cine) -> CardiacCycle:
    """Segment every frame of a 4D cine and pick ED (largest LV cavity) and ES (smallest)."""
    from core.cardiac import cavity_curves, pick_ed_es

    if float(cine.data.max() - cine.data.min()) <= 0:
        raise InvalidInputError("The cine is blank: every voxel has the same value.")
    with model_lock(lm.model), torch.inference_mode():
        c = cavity_curves(lm.model, cine.data, lm.input_size, lambda: autocast(lm.precision))
    if c["lv"].max() == 0:
        raise InvalidInputError("No left ventricle was found in any frame of this cine: it does not look like a "
                                "short-axis cardiac series.")
    ed, es = pick_ed_es(c["lv"])
    release_memory()
    return CardiacCycle(c["lv"], c["rv"], ed, es)


def cardiac_shape_summary(features: np.ndarray) -> dict[str, float]:
    """Readable estimates from CardiacNet's 9 shape descriptors (areas summed over the same 8 slices of
    ED and ES, so slice thickness and pixel size cancel in these ratios):

    - ``lv_ef`` / ``rv_ef``: ejection-fraction estimates, 1 - ES area / ED area of each cavity;
    - ``myo_to_lv_ed``: myocardium-to-LV-cavity area ratio at ED (high in hypertrophy);
    - ``rv_to_lv_ed``: RV-to-LV cavity area ratio at ED (high in RV dilatation).
    """
    f = np.asarray(features, dtype=np.float64)
    return {"lv_ef": float(1 - f[0]), "rv_ef": float(1 - f[1]), "myo_to_lv_ed": float(f[2]),
            "rv_to_lv_ed": float(f[3])}


# --------------------------------------------------------------------------- atrium


@dataclass
class AtriumResult:
    mask: np.ndarray  # (X, Y, Z) uint8 on the input grid
    volume_ml: float
    spacing: tuple[float, float, float]
    prob: np.ndarray | None = None  # (X, Y, Z) float16 mean probability of the views, on the input grid
    quality: object | None = None  # core.atrium.QualityReport: whether the mask may be reported, and why not
    views: tuple[int, ...] = (2,)  # axes of the canonical orientation actually segmented (and fused)

    @property
    def reliable(self) -> bool:
        return self.quality is None or bool(self.quality.reliable)


def segment_atrium(lm: LoadedModel, volume: Volume, batch_size: int = 8,
                   progress: Callable[[float], None] | None = None) -> AtriumResult:
    """Segment the left atrium and return a mask on the input's grid, with a quality verdict.

    The volume is brought to the closest RAS orientation by its affine, segmented slice by slice (2.5D
    U-Net) along each view the card lists, the views' probabilities averaged, the largest component
    kept, and everything put back in the input's voxel order. The quality check (core.atrium.judge)
    says whether the mask may be reported.
    """
    from core import atrium as A

    data_c, sp_c, orient = A.to_canonical(volume.data, volume.affine, volume.spacing)
    views = tuple(int(v) for v in lm.card.get("input_spec", {}).get("views", [2]))
    flips = int(lm.card.get("input_spec", {}).get("tta_flips", 1))
    with model_lock(lm.model):
        pred = A.segment_canonical(lm.model, data_c, sp_c, views, lm.grid_mm, lm.threshold, batch_size,
                                   lambda: autocast(lm.precision), progress, flips=flips)
    quality = A.judge_with_card(A.quality_measures(pred, sp_c, lm.threshold), lm.card)
    mask = A.from_canonical(pred.mask, orient)
    prob = A.from_canonical(pred.prob, orient)
    views = pred.views  # the slab's own axis for a single-view model (core.atrium.resolve_views)
    del pred, data_c
    release_memory()
    return AtriumResult(mask, volume_ml(mask, volume.spacing), volume.spacing, prob, quality, views)
