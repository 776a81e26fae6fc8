"""A task's model put together for the app: the network with its input checks and companion models
(``load_model``), and a throw-away first prediction (``warm_up``).

Each task's own module predicts (core.pneumonia.predict_xray, core.cardiac.predict_cardiac,
core.atrium.segment_atrium); what they share is core.runtime. This module sits above all of them, and
none of them imports it.
"""
from __future__ import annotations

import copy
from collections.abc import Callable

import numpy as np

from core import atrium, cardiac, pneumonia
from core.concurrency import model_lock
from core.explain import gradcam
from core.io import Volume
from core.ood import load_guard, ood_score
from core.runtime import LoadedModel, load_base, probabilities


def load_model(task: str, wdir=None, with_guard: bool = True, optimize: bool = True,
               precision: str | None = None) -> LoadedModel:
    """Build the task's architecture from its card and load checksum-verified weights (CPU, eval mode),
    with what the task's predictions need beside them: the pneumonia model's calibration (when fitted on
    these weights) and, unless ``with_guard`` is False, its input check (``<task>.ood.json``) and population
    check; the cardiac model's input check (same flag) and its five-class classifier (when built on these
    weights). ``optimize`` and ``precision``: see core.runtime.load_base.
    """
    lm = load_base(task, wdir, optimize, precision)
    if lm.spec.kind == "binary" and with_guard:
        lm.guard = load_guard(task, wdir)
    if task == "pneumonia":
        lm.card = pneumonia.with_calibration(lm.card, wdir)
        if with_guard:
            lm.population = pneumonia.load_population(wdir)
    elif task == "cardiac":
        lm.diagnosis = cardiac.diagnosis_for(lm.card, wdir)
    elif task == "atrium":
        lm.localiser = atrium.localiser_for(lm.card, wdir)
        lm.refiner = atrium.refiner_for(lm.card, wdir)
    return lm


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
            x01, x = pneumonia.xray_inputs(lm, (0.5 + 0.3 * np.sin(6 * xx) * np.cos(4 * yy)).astype(np.float32))
            ood_score(lm, x)
            pneumonia.population_score(lm, x01)
            probabilities(lm, x)
            # on a copy: the first backward pass takes a while, and on the shared model it would hold the model's
            # lock, so an upload arriving meanwhile would wait for it before its verdict (kernels warmed on the
            # copy serve the model too: they are cached per shape, not per module)
            pause()
            with model_lock(lm.model):  # not mid-call: a user's Grad-CAM hooks and gradient flags stay off the copy
                twin = copy.deepcopy(lm.model)
            gradcam(twin, twin.gradcam_layer(), x, positive=True)
        elif lm.spec.name == "cardiac":
            v = Volume(rng.random((128, 128, 10)).astype(np.float32), np.eye(4), (1.0, 1.0, 1.0))
            cardiac.predict_cardiac(lm, v, v, explain=True, guard=False)
        elif lm.spec.name == "atrium":
            atrium.segment_atrium(lm, Volume(rng.random((96, 96, 24)).astype(np.float32), np.eye(4), (1.25, 1.25, 1.25)))
    except Exception:  # noqa: BLE001
        pass
