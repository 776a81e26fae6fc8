"""Out-of-fold check: a small localiser network that narrows the fused path's localising pass. The app's fused path
first localises the atrium by segmenting every 2nd slice of the first view over the whole volume with the
segmenting U-Net (about half of a 256x256x130 volume's time), keeps that reading on those slices, and runs the
three views in the box around it. Here a localiser (``core.atrium.LOCALISER_KWARGS``, a base-8 U-Net trained on a
2.5 mm grid on the fold's training volumes) first finds the field (its finding with ``FIELD_MARGIN_MM`` of context,
aligned to the U-Net's multiple); the segmenting model's localising pass then reads only that field. Its box and
reading are otherwise those of the app (the whole volume is read again when the box reaches the field's edge).

Each kept cross-validation model (with the localiser saved beside it, trained on the same volumes) runs
``core.atrium.segment_canonical`` on its own validation volumes that take the fused path, at the fold's threshold,
batch 8, the model's precision; Dice, HD95, volume error and the seconds of the whole call. An experiment, not part
of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_localiser_field_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-localiser-field-oof.json
"""
from __future__ import annotations

import functools

from core import atrium as A

from _oof import run_fused_experiment

def _localiser(lm) -> A.Localiser:
    """The localiser a fold model's card names (loaded beside it by ``load_model``, sha256-checked), checked to have
    been trained on the fold's training volumes."""
    if lm.localiser is None:
        raise SystemExit("this fold model's card names no localiser: run `python -m core.atrium localiser <folds dir>` "
                         "and `python -m core.atrium rescore <folds dir>` first")
    rec = {"fold": lm.card.get("title"), "train_cases": lm.card["data"]["train_cases"]}
    A.check_fold_localiser(lm.localiser.card, rec, "the fold's folder")
    return lm.localiser


def _app(lm, v, views, ctx):
    return A.segment_canonical(lm.model, v.data, v.spacing, views, lm.grid_mm, lm.threshold, 8, ctx)


def _field(margin_mm: float):
    def run(lm, v, views, ctx):
        base = _localiser(lm)
        loc = A.Localiser(base.model, base.grid_mm, base.threshold, base.card)
        loc.field = functools.partial(A.Localiser.field, loc, margin_mm=margin_mm)
        return A.segment_canonical(lm.model, v.data, v.spacing, views, lm.grid_mm, lm.threshold, 8, ctx, localiser=loc)
    return run


VARIANTS = {"the model's own pass over the whole volume (before)": _app,
            f"localiser field, {A.FIELD_MARGIN_MM:g} mm (the app)": _field(A.FIELD_MARGIN_MM),
            "localiser field, 50 mm": _field(50.0)}

if __name__ == "__main__":
    run_fused_experiment(__doc__, VARIANTS, "fused-path localising pass narrowed by a localiser network, out of fold: "
                         "each kept CV model (and the localiser trained on its training volumes) through "
                         "segment_canonical on its own fused (bSSFP) validation volumes, at the fold's threshold")
