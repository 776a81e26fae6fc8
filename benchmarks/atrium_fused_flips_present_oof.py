"""Out-of-fold check: test-time flips on the fused (bSSFP) path as it runs now (the localising pass's reading kept
for the first view, that view blended across its slices). The fifteenth session measured flips on the path before
those changes (``benchmarks/logs/atrium-fused-flips-64ep-oof.json``: two flips per view +0.0024 on the 16 MSD
volumes); this run scores ``core.atrium.segment_canonical(fused_flips=2)`` itself, so the per-fold figures are
the ones a fold's own choice would see.

Each kept cross-validation model runs the app's fused path (the fold's threshold, batch 8, the model's precision)
on its own validation volumes that take that path, with one and with two passes per view; Dice, HD95, volume
error and the seconds of the whole call. An experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_fused_flips_present_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-fused-flips-present-oof.json
"""
from __future__ import annotations

from core import atrium as A

from _oof import run_fused_experiment


def _with_flips(flips: int):
    return lambda lm, v, views, ctx: A.segment_canonical(lm.model, v.data, v.spacing, views, lm.grid_mm, lm.threshold,
                                                         8, ctx, fused_flips=flips)


VARIANTS = {"1 pass per view (before)": _with_flips(1), "2 flips per view": _with_flips(2)}

if __name__ == "__main__":
    run_fused_experiment(__doc__, VARIANTS, "fused-path test-time flips on the present path, out of fold: each kept "
                         "CV model through segment_canonical on its own fused (bSSFP) validation volumes, at the "
                         "fold's threshold")
