"""What every task's inference shares: a loaded model with its card, and the few helpers around it.

Task modules (core.pneumonia, core.cardiac, core.atrium) build on this; core.inference puts a task's
model together with its checks (``load_model``). Nothing here imports a task module.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from core.checkpoint import load_state_dict
from core.concurrency import model_lock
from core.models import build_model, optimize_for_inference
from core.precision import autocast, inference_precision
from core.tasks import TaskSpec, get_task

if TYPE_CHECKING:  # for the annotations only: core.ood and core.atrium build on this module
    from core.atrium import Localiser
    from core.refine3d import Refiner
    from core.ood import OODGuard


@dataclass
class LoadedModel:
    """A model ready for inference with its card (architecture, threshold, metrics, history)."""

    spec: TaskSpec
    model: nn.Module
    card: dict
    guard: OODGuard | None = None  # out-of-distribution check (classifiers)
    population: tuple[nn.Module, dict] | None = None  # pneumonia: the population check's CNN and its card
    diagnosis: dict | None = None  # cardiac: the five-class classifier (cardiac_diagnosis.json) for these weights
    localiser: Localiser | None = None  # atrium: the small network that finds the fused path's box (its card says)
    refiner: Refiner | None = None  # atrium: the 3D correction of the mask (core.refine3d; its card says)
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


def load_base(task: str, wdir=None, optimize: bool = True, precision: str | None = None) -> LoadedModel:
    """The task's network alone: architecture from its card, checksum-verified weights, CPU, eval mode
    (no input checks or companion models; core.inference.load_model adds those).

    ``optimize`` folds batch norm, uses channels-last memory and the resolved ``precision`` ("auto",
    "float32", "bfloat16" or "int8"; else $MEDIMG_PRECISION; see core.precision.inference_precision); with
    "int8" the model is the quantised network built from the weights and their saved activation ranges
    (core.quantize). ``optimize=False`` is the plain float32 model (the benchmark's baseline, and what
    training-time tools score)."""
    spec = get_task(task)
    state, card = load_state_dict(task, wdir)
    prec = task_precision(spec, card, wdir, precision) if optimize else "float32"
    arch = card.get("architecture", {})
    model = build_model(arch.get("name", spec.architecture), **arch.get("kwargs", spec.model_kwargs))
    model.load_state_dict(state)
    model.eval()
    if optimize:
        optimize_for_inference(model)
    if prec == "int8":
        from core import quantize

        model = quantize.from_observer_state(model, quantize.load_ranges(task, card["weights_sha256"], wdir))
    return LoadedModel(spec, model, card, precision=prec)


def int8_ready(spec: TaskSpec, card: dict, wdir=None) -> bool:
    """Whether the task's weights (their ``card``) can run as int8 here: the registry allows it, activation
    ranges observed on these very weights lie beside them, and this torch has the quantised kernels."""
    if not spec.int8_inference:
        return False
    from core import quantize

    return quantize.engine_available() and quantize.read_ranges_card(
        spec.name, card.get("weights_sha256", ""), wdir) is not None


def task_precision(spec: TaskSpec, card: dict, wdir=None, requested: str | None = None) -> str:
    """The precision the app infers the task in with these weights (``card``): core.precision's choice
    given the registry and whether an int8 model is ready (``int8_ready``)."""
    return inference_precision(requested, bf16_allowed=spec.bf16_inference, int8_ready=int8_ready(spec, card, wdir))


def probabilities(lm: LoadedModel, x: torch.Tensor) -> np.ndarray:
    """Sigmoid of a classifier's logit for each input (N, ...) -> (N,), in the model's precision."""
    with model_lock(lm.model), torch.inference_mode(), autocast(lm.precision):
        return torch.sigmoid(lm.model(x).float()).flatten().numpy()


def release_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc keeps it otherwise, so one large
    request would keep the app server's memory high for good). A no-op where glibc is absent."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


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
