"""Out-of-fold check: the fused path's localising pass on a slightly coarser grid. The pass reads every 2nd slice
of the whole volume on the model's 1.25 mm grid, about half of the 256x256x130 benchmark's time (1.0 of 2.0 s in
int8); its reading is also kept for those slices of the first view. On a 2.5 mm grid (2026-12-04) the model, trained
at 1.25 mm with scale changes of +-15 %, boxed the wrong structure on 2 of 16 MSD volumes. Grids of 1.4 and 1.5 mm
(scale 0.89 and 0.83; 22-31 % fewer pixels) stay near that augmentation range.

Each kept cross-validation model runs the app's fused path (``core.atrium.segment_canonical``, the fold's threshold,
batch 8, the model's precision) on its own validation volumes that take that path, with the localising pass's grid
set to each variant (the box passes keep the model's grid); Dice, HD95, volume error and the seconds of the whole
call. An experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_localise_grid_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-localise-grid-oof.json
"""
from __future__ import annotations

from core import atrium as A

from _oof import run_fused_experiment


def _localised_on(grid: float | None):
    """The app's fused path with the localising pass on ``grid`` mm (None: the model's own grid)."""
    def run(lm, v, views, ctx):
        app_pass = A.localise_pass
        if grid is not None:
            A.localise_pass = lambda model, norm, spacing, axis, grid_mm, *a, **k: app_pass(model, norm, spacing, axis,
                                                                                           grid, *a, **k)
        try:
            return A.segment_canonical(lm.model, v.data, v.spacing, views, lm.grid_mm, lm.threshold, 8, ctx)
        finally:
            A.localise_pass = app_pass
    return run


VARIANTS = {"1.25 mm (the app)": _localised_on(None), "1.4 mm": _localised_on(1.4), "1.5 mm": _localised_on(1.5)}

if __name__ == "__main__":
    run_fused_experiment(__doc__, VARIANTS, "fused-path localising pass on a coarser grid, out of fold: each kept CV "
                         "model through segment_canonical on its own fused (bSSFP) validation volumes, at the fold's "
                         "threshold")
