"""Shared app plumbing: cached models (the one place st.cache_resource is used), error display,
and small rendering helpers. No preprocessing or model code lives here."""
from __future__ import annotations

import gc
import hashlib
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import streamlit as st

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from core.config import data_root  # noqa: E402
from core.errors import MedImgError, MissingWeightsError  # noqa: E402
from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:  # the model code (torch) loads with the first model, not with the Home page
    from core.runtime import LoadedModel
from core.samples import HOW_TO_GET, list_samples  # noqa: E402
from core.tasks import TASKS  # noqa: E402

log = logging.getLogger("medimg.app")

from core.constants import DISCLAIMER  # noqa: E402,F401  (one wording for the pages and the PDF report)
from frontend import enable_tcp_nodelay  # noqa: E402  (also the launcher's; see streamlit_app/frontend.py)

enable_tcp_nodelay()


@st.cache_resource(show_spinner="Loading the model…")
def get_model(task: str) -> LoadedModel:
    """One model per task per server process, shared by all sessions (inference is lock-protected)."""
    from core.inference import load_model

    return load_model(task)


class _Foreground:
    """Counts the user requests being computed in this server process; the warm-up thread waits while there
    are any (on 2 cores it would otherwise halve their speed)."""

    def __init__(self) -> None:
        self._n = 0
        self._lock = threading.Lock()

    def __enter__(self) -> "_Foreground":
        with self._lock:
            self._n += 1
        return self

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._n -= 1

    @property
    def busy(self) -> bool:
        return self._n > 0

    def wait_idle(self, poll_s: float = 0.05, max_s: float = 60.0) -> None:
        """Return once no user request is being computed (or after ``max_s``: the warm-up is not starved)."""
        end = time.monotonic() + max_s
        while self.busy and time.monotonic() < end:
            time.sleep(poll_s)


FOREGROUND = _Foreground()  # pages: ``with FOREGROUND:`` around a prediction


@st.cache_resource(show_spinner=False)
def _warm_up_queue() -> list[str]:
    """The tasks still to warm up, worked through by one background thread per server process."""
    order = list(TASKS)
    if os.environ.get("MEDIMG_WARM_UP", "1") == "0":  # tests: no background thread busy at interpreter exit
        return []

    def work() -> None:
        from core.inference import warm_up  # the heavy imports (torch, grad-cam) happen here, off the page
        from core.precision import flush_subnormals

        flush_subnormals()  # as every page run does before its first model call (model_or_stop)

        while order:
            try:
                task = order.pop(0)
            except IndexError:  # emptied by a page between the check and the pop
                break
            try:
                FOREGROUND.wait_idle()
                # loaded, then one synthetic prediction: first-call costs paid here, never beside a user's request
                warm_up(get_model(task), pause=FOREGROUND.wait_idle)
                if task == "atrium":  # the page's per-slice strip: matplotlib's first figure loads its fonts
                    from core.visualize import slice_strip

                    slice_strip(np.zeros(8), np.zeros(8))
            except Exception:  # noqa: BLE001 - the page that needs the model reports the problem
                pass
        # what is loaded now (torch, the models, their libraries: ~0.5 M objects) lives as long as the server:
        # out of the collector's sight, a full collection no longer walks it (0.2-0.4 s on 2 cores otherwise)
        FOREGROUND.wait_idle()  # a request's own objects are not frozen with them
        gc.freeze()

    threading.Thread(target=work, name="medimg-warm-up", daemon=True).start()
    return order


def warm_up_in_background(first: str | None = None) -> None:
    """Load every model once per server process in a background thread, so that the first upload after
    start does not wait for a model to load or for first-call costs; ``first`` (the open page's task)
    goes next if it is still waiting."""
    order = _warm_up_queue()
    if first is not None and first in order and order[0] != first:
        try:
            order.remove(first)
        except ValueError:  # taken by the thread meanwhile
            return
        order.insert(0, first)


def weights_or_stop(task: str) -> None:
    """Stop the page with a plain message when the task's weights are missing (no torch needed: the page can
    say so before the model loads)."""
    from core.checkpoint import require_weights

    try:
        require_weights(task)
    except MissingWeightsError as exc:
        st.error(f"The {TASKS[task].title} model is not available. {exc}")
        st.stop()


def model_or_stop(task: str, before_stop: Callable[[], None] | None = None) -> LoadedModel:
    """The task's cached model, loading it if needed; stops the page with a plain message when its weights
    are missing or it cannot be started (``before_stop``, if given, runs first: e.g. to remove a "working…"
    element, which cannot be changed once the page is stopped). Called by a page before its first model call
    in a run: it also sets this run's thread to treat subnormal floats as zero (core.precision.flush_subnormals;
    Streamlit runs each script run in a thread of its own, and torch's workers copy the mode of the thread
    that creates them)."""
    from core.precision import flush_subnormals

    flush_subnormals()
    warm_up_in_background(task)
    try:
        return get_model(task)
    except MissingWeightsError as exc:
        message = f"The {TASKS[task].title} model is not available. {exc}"
    except MedImgError as exc:  # e.g. an unknown $MEDIMG_PRECISION: a setting of the server, not of the upload
        message = f"The {TASKS[task].title} model cannot be started: {exc}"
    if before_stop is not None:
        before_stop()
    st.error(message)
    st.stop()


@st.cache_resource(show_spinner=False)
def _training_fingerprints(task: str, weights_sha256: str) -> dict[str, str] | None:
    from core.provenance import load_fingerprints

    return load_fingerprints(task, {"weights_sha256": weights_sha256})


def training_case_of(lm: LoadedModel, *arrays) -> str | None:
    """Which of the model's training cases the decoded input(s) are, by fingerprint (core.provenance); None
    when none is (or no fingerprint file matches the weights)."""
    from core.provenance import training_case

    fps = _training_fingerprints(lm.spec.name, str(lm.card.get("weights_sha256", "")))
    found = [c for c in (training_case(fps, a) for a in arrays) if c]
    return ", ".join(dict.fromkeys(found)) or None


def training_notice(case: str | None) -> None:
    """Say, beside a result, that its input is one of the model's training cases (``training_case_of``)."""
    if case:
        from core.provenance import training_note

        st.info(training_note(case))


def run_safely(fn: Callable[[], Any], what: str) -> Any | None:
    """Run a core call; show its error as a clear message (never a stack trace) and return None."""
    try:
        return fn()
    except MedImgError as exc:
        st.error(f"{what}: {exc}")
    except Exception as exc:  # noqa: BLE001 - the page must stay usable whatever happens
        # where it happened goes to the server's log (for whoever maintains it), never to the page; the
        # exception's message does not, as it may quote the upload (nothing of an upload is logged)
        log.error("unexpected %s during %s, raised at:\n%s", type(exc).__name__, what,
                  "".join(traceback.format_tb(exc.__traceback__)).rstrip())
        st.error(f"{what}: the file could not be processed ({type(exc).__name__}). "
                 "Check that it is the expected kind of image.")
    return None


class ThrottledProgress:
    """A progress bar for a long computation that redraws at most every ``interval_s`` seconds: each redraw
    is a message the computation waits on (about 20 ms each on 2 cores; the 51 of one atrium volume cost
    about 1 s of the user's wait). Call it with the fraction done (0-1); ``empty()`` removes the bar."""

    def __init__(self, text: str, interval_s: float = 0.5) -> None:
        if interval_s < 0:
            raise ValueError(f"interval_s must be >= 0, got {interval_s}")
        self.text, self.interval_s = text, interval_s
        self.bar = st.progress(0.0, text=text)
        self.last = time.monotonic()
        self.redraws = 0

    def __call__(self, fraction: float) -> None:
        now = time.monotonic()
        if now - self.last >= self.interval_s:
            self.last = now
            self.redraws += 1
            f = min(1.0, max(0.0, float(fraction)))
            self.bar.progress(f, text=f"{self.text} {f:.0%}")

    def empty(self) -> None:
        self.bar.empty()


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
    from core.report import figure_line as line

    try:
        card = read_card(task)
    except MissingWeightsError:
        return "not trained yet"
    return line(task, card)


def report_or_notice(build: Callable[[], bytes]) -> Callable[[], bytes]:
    """``build`` made never to fail: on an unexpected error the PDF says the report could not be built (and where
    the error arose goes to the server's log). The PDF is built in the download's own request, where no message
    can reach the page, so a failure would otherwise leave the user's click without any answer."""
    from core.case_report import notice_pdf

    def build_or_say_why() -> bytes:
        try:
            return build()
        except Exception as exc:  # noqa: BLE001
            log.error("unexpected %s while building a case report, raised at:\n%s", type(exc).__name__,
                      "".join(traceback.format_tb(exc.__traceback__)).rstrip())
            return notice_pdf("The case report could not be built",
                              f"An internal error ({type(exc).__name__}) stopped the report of this case. The result "
                              "shown on the page is not affected by it. Please tell whoever maintains this app.")

    return build_or_say_why


def report_button(build: Callable[[], bytes], name: str, ns: str) -> None:
    """A download button for the case's PDF report; the PDF is built only when the button is clicked
    (``build`` runs then), so the page does not wait for it."""
    from core.case_report import case_stem

    st.download_button("Download the case report (PDF)", data=report_or_notice(build),
                       file_name=f"{case_stem(name)}_report.pdf",
                       mime="application/pdf", on_click="ignore", key=f"{ns}.report",
                       help="Result, images, measured figures, the model's version and validation figures, and the "
                            "research-use disclaimer; no identifying fields of the input.")


def display_controls(ns: str, values, presets: tuple[tuple[str, float, float], ...] = (), invert: bool = False):
    """Window/level and zoom controls in an expander (keys '<ns>.win', '<ns>.zoom', ...; cleared with the
    page's other keys when a new input arrives) -> (core.visualize.Window, zoom, fx, fy).

    ``values``: the image's own values (a DICOM's after its modality LUT; a volume's voxels); ``presets``:
    the file's windows (explanation, centre, width), offered first; then the 1st-99th percentile, the full
    range and a custom level/width."""
    from core.visualize import Window, percentile_window

    key = f"{ns}.win_ranges"  # percentiles of a volume take a moment: once per input
    if key not in st.session_state:
        st.session_state[key] = (percentile_window(values), float(values.min()), float(values.max()))
    auto, lo, hi = st.session_state[key]
    span = max(hi - lo, 1e-6)
    auto = Window(auto.center, auto.width, auto.name, invert)
    wins = [Window(c, w, n, invert) for n, c, w in presets] + [auto, Window(lo + span / 2, span, "full range", invert)]
    names = [f"{w.name} (level {w.center:.4g}, width {w.width:.4g})" for w in wins] + ["custom level and width"]
    with st.expander("Display: window/level and zoom"):
        c1, c2 = st.columns(2)
        choice = c1.selectbox("Window", range(len(names)), format_func=lambda i: names[i], key=f"{ns}.win")
        if choice == len(wins):
            level = c1.slider("Level (window centre)", lo, hi, float(np.clip(auto.center, lo, hi)), span / 200,
                              key=f"{ns}.level")
            width = c1.slider("Width", span / 100, span, float(np.clip(auto.width, span / 100, span)), span / 200,
                              key=f"{ns}.width")
            win = Window(level, width, "custom", invert)
        else:
            win = wins[choice]
        zoom = c2.slider("Zoom", 1.0, 4.0, 1.0, 0.25, key=f"{ns}.zoom")
        fx = c2.slider("View centre, left to right", 0.0, 1.0, 0.5, 0.05, key=f"{ns}.fx", disabled=zoom == 1)
        fy = c2.slider("View centre, top to bottom", 0.0, 1.0, 0.5, 0.05, key=f"{ns}.fy", disabled=zoom == 1)
    return win, zoom, fx, fy
