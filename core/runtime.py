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
from core.explain import model_lock
from core.models import build_model, optimize_for_inference
from core.precision import autocast, inference_precision
from core.tasks import TaskSpec, get_task

if TYPE_CHECKING:  # for the annotation only: core.ood builds on this module
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
    "float32" or "bfloat16"; else $MEDIMG_PRECISION; "auto": bfloat16 where the task's registry entry
    allows it and the CPU runs it natively, see core.precision); ``optimize=False`` is the plain float32
    model (the benchmark's baseline, and what training-time tools score)."""
    spec = get_task(task)
    prec = inference_precision(precision, bf16_allowed=spec.bf16_inference) if optimize else "float32"
    state, card = load_state_dict(task, wdir)
    arch = card.get("architecture", {})
    model = build_model(arch.get("name", spec.architecture), **arch.get("kwargs", spec.model_kwargs))
    model.load_state_dict(state)
    model.eval()
    if optimize:
        optimize_for_inference(model)
    return LoadedModel(spec, model, card, precision=prec)


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
