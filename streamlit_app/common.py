"""Shared app plumbing: cached models (the one place st.cache_resource is used), error display,
and small rendering helpers. No preprocessing or model code lives here."""
from __future__ import annotations

import hashlib
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.config import data_root  # noqa: E402
from core.errors import MedImgError, MissingWeightsError  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:  # the model code (torch) loads with the first model, not with the Home page
    from core.inference import LoadedModel
from core.samples import HOW_TO_GET, list_samples  # noqa: E402
from core.tasks import TASKS  # noqa: E402

log = logging.getLogger("medimg.app")

DISCLAIMER = ("Research software, not a medical device: not validated for clinical use; "
              "do not base clinical decisions on it.")


@st.cache_resource(show_spinner="Loading the model…")
def get_model(task: str) -> LoadedModel:
    """One model per task per server process, shared by all sessions (inference is lock-protected)."""
    from core.inference import load_model

    return load_model(task)


@st.cache_resource(show_spinner=False)
def warm_up_in_background() -> None:
    """Load every model once per server process in a background thread, so that the first upload after
    start does not wait for a model to load (the page's own get_model call then finds it cached)."""
    import threading

    def work() -> None:
        for task in TASKS:
            try:
                get_model(task)
            except Exception:  # noqa: BLE001 - the page that needs the model reports the problem
                pass

    threading.Thread(target=work, name="medimg-warm-up", daemon=True).start()


def model_or_stop(task: str) -> LoadedModel:
    try:
        return get_model(task)
    except MissingWeightsError as exc:
        st.error(f"The {TASKS[task].title} model is not available. {exc}")
        st.stop()
    except MedImgError as exc:  # e.g. an unknown $MEDIMG_PRECISION: a setting of the server, not of the upload
        st.error(f"The {TASKS[task].title} model cannot be started: {exc}")
        st.stop()


def run_safely(fn: Callable[[], Any], what: str) -> Any | None:
    """Run a core call; show its error as a clear message (never a stack trace) and return None."""
    try:
        return fn()
    except MedImgError as exc:
        st.error(f"{what}: {exc}")
    except Exception as exc:  # noqa: BLE001 - the page must stay usable whatever happens
        log.error("unexpected %s during %s", type(exc).__name__, what)
        st.error(f"{what}: the file could not be processed ({type(exc).__name__}). "
                 "Check that it is the expected kind of image.")
    return None


def file_key(*parts: bytes) -> str:
    """A short digest identifying an upload (or a set of them), to cache results per upload."""
    h = hashlib.sha256()
    for p in parts:
        h.update(hashlib.sha256(p).digest())
    return h.hexdigest()[:16]


def pick_sample(task: str, ns: str, label: str = "…or pick a sample case", disabled: bool = False):
    """A sample-case picker (key '<ns>.sample'); returns the chosen Sample, or None.

    Without a dataset under the data root, the page says how to get one instead.
    """
    samples = list_samples(task, data_root())
    if not samples:
        st.info(f"No sample cases available: the data root {data_root()} holds no {task} dataset. "
                f"{HOW_TO_GET[task]}, then set MEDIMG_DATA_ROOT.")
    choice = st.selectbox(label, ["—"] + [s.name for s in samples], key=f"{ns}.sample",
                          disabled=disabled or not samples,
                          help="Remove the uploaded file to use a sample case." if disabled else None)
    return next((s for s in samples if s.name == choice), None)


def reset_namespace(ns: str, keep: tuple[str, ...] = ()) -> None:
    """Clear this page's results (keys 'ns.*') when a new input arrives."""
    for k in [k for k in st.session_state if str(k).startswith(f"{ns}.") and k not in keep]:
        del st.session_state[k]


def legend(entries: list[tuple[str, tuple]]) -> None:
    html = " ".join(
        f"<span style='display:inline-block;width:0.9em;height:0.9em;background:rgb{c};margin:0 0.3em 0 0.8em;"
        f"border:1px solid #333'></span>{name}" for name, c in entries)
    st.markdown(html or "_no overlay shown_", unsafe_allow_html=True)


def figure_line(task: str) -> str:
    """One-line validation figures of a task from its card."""
    from core.checkpoint import read_card

    try:
        card = read_card(task)
    except MissingWeightsError:
        return "not trained yet"
    v = card["validation"]
    if TASKS[task].kind == "binary":
        from core.report import shift_line

        cv = card.get("cross_validation")
        if cv:  # lead with the cross-validated figure: every patient scored once by a model that did not see them
            o = cv["pooled_out_of_fold"]
            lo, hi = o["ci95"]["auc"]
            txt = (f"5-fold CV (all {o['n']} patients) AUC {o['auc']:.3f} ({lo:.3f}-{hi:.3f}), accuracy "
                   f"{o['accuracy']:.3f}; fold-1 validation AUC {v['auc']:.3f}, n = {v['n']}")
        else:
            lo, hi = v["ci95"]["auc"]
            txt = f"validation AUC {v['auc']:.3f} ({lo:.3f}-{hi:.3f}), accuracy {v['accuracy']:.3f}, n = {v['n']}"
        sl = shift_line(card)
        if sl:
            txt = (sl + f". Validation is the training hospital and period (n = {v['n']}): expect lower figures on "
                   "other hospitals or later patients; not for adults.")
        return txt
    lo, hi = v["dice_ci95"]
    txt = f"validation 3D Dice {v['dice_mean']:.3f} ({lo:.3f}-{hi:.3f}), n = {v['n']} volumes"
    pd_ = v.get("per_dataset", {})
    names = {"Task02_Heart": "bSSFP (MSD)", "LA2018": "LGE (2018 LA challenge)"}
    if len(pd_) > 2:
        txt += " — " + "; ".join(f"{names.get(k, k)} {r['dice_mean']:.3f} (n = {r['n']})" for k, r in pd_.items()
                                 if k != "all")
    from core.report import atrium_cross_validation

    cv = atrium_cross_validation(card)
    if cv:
        lo, hi = cv["dice_ci95"]
        txt += f"; {cv['n_folds']}-fold CV Dice {cv['dice_mean']:.3f} ({lo:.3f}-{hi:.3f}), n = {cv['n']}"
    return txt
