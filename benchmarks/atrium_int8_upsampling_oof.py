"""Out-of-fold check of the int8 atrium network with its transposed convolutions (not quantised) in bfloat16
instead of float32: same masks, same quality verdicts, less time? The transposed convolutions are about a fifth
of the int8 network's time on a CPU with AVX512-BF16, and in bfloat16 a third of that (``Bf16ConvTranspose2d``
below, swapped into the converted int8 graph here; not adopted in the app, see docs/atrium-cpu-experiments-2026-11.md).

Each kept cross-validation model is quantised once on its own training volumes as ``core.atrium.calibrate_int8``
does (``core.atrium.int8_calibration_feed``); the same activation ranges give both int8 variants (the ranges are
observed in float32 before conversion, so the transposed convolutions' precision does not enter them). Each of the
fold's validation volumes is then segmented as the app does (its views, flips and threshold) three times:
bfloat16 autocast (reference), int8 with float32 transposed convolutions (the app), int8 with
bfloat16 ones. An experiment, not part of the app.

    MEDIMG_DATA_ROOT=../shared/datasets PYTHONPATH=. python benchmarks/atrium_int8_upsampling_oof.py \
        benchmarks/cv-folds/atrium/fold1 ... fold5 --json benchmarks/logs/atrium-int8-bf16-upsampling-oof.json
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from core import atrium as A
from core import metrics as M
from core.precision import autocast

from _oof import collect, write
from atrium_int8_oof import _run, calibrated_fold


class Bf16ConvTranspose2d(nn.Module):
    """A transposed convolution computed in bfloat16, float32 in and out: (N, C, H, W) -> (N, C', 2H, 2W)."""

    def __init__(self, conv: nn.ConvTranspose2d) -> None:
        super().__init__()
        self.conv = copy.deepcopy(conv).to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x.to(torch.bfloat16)).float()


def with_bf16_upsampling(q8: nn.Module) -> nn.Module:
    """A copy of an int8 model whose float transposed convolutions run in bfloat16 (the graph calls its
    modules by name, so swapping them in place of the originals is enough)."""
    q = copy.deepcopy(q8)
    for parent in list(q.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.ConvTranspose2d):
                setattr(parent, name, Bf16ConvTranspose2d(child))
    return q


NAMES = ["bfloat16", "int8, float32 transposed convolutions", "int8, bfloat16 transposed convolutions"]
BASE, NEW = NAMES[1], NAMES[2]


def run_fold(wdir: str, root) -> dict[str, dict]:
    lm, q8f, spec_views, vols = calibrated_fold(wdir, root)
    q8b = with_bf16_upsampling(q8f)
    out: dict[str, dict] = {}
    for v in vols:
        views = A.resolve_views(spec_views, v.data.shape, v.spacing)
        _, rr = _run(lm, lm.model, v, spec_views, lambda: autocast(lm.precision))
        pf, rf = _run(lm, q8f, v, spec_views, None)
        pb, rb = _run(lm, q8b, v, spec_views, None)
        row = {"dataset": v.dataset, "fused": len(views) > 1, "fold_threshold": lm.threshold,
               NAMES[0]: rr, NAMES[1]: rf, NAMES[2]: rb, "mask_agreement_dice": round(M.dice(pb.mask, pf.mask), 4)}
        out[v.case_id] = row
        print(v.case_id, v.dataset, rr, rf, rb, row["mask_agreement_dice"], flush=True)
    return out


def summary(per_case: dict[str, dict]) -> dict:
    out = {}
    for ds in sorted({r["dataset"] for r in per_case.values()}) + ["all"]:
        rows = [r for r in per_case.values() if ds in ("all", r["dataset"])]
        d = np.array([r[NEW]["dice"] - r[BASE]["dice"] for r in rows])
        out[ds] = {"n": len(rows), **{f"dice_mean {n}": round(float(np.mean([r[n]["dice"] for r in rows])), 4)
                                      for n in NAMES},
                   "dice_change_mean (bf16 vs float32 transposed)": round(float(d.mean()), 4),
                   "volumes_worse_by_0.01": int((d < -0.01).sum()), "volumes_better_by_0.01": int((d > 0.01).sum()),
                   "mask_agreement_min": float(min(r["mask_agreement_dice"] for r in rows)),
                   "mask_agreement_median": float(np.median([r["mask_agreement_dice"] for r in rows])),
                   "verdict_changed": [c for c, r in per_case.items() if ds in ("all", r["dataset"])
                                       and r[BASE]["reliable"] != r[NEW]["reliable"]],
                   **{f"seconds_median {n}": round(float(np.median([r[n]["seconds"] for r in rows])), 2)
                      for n in NAMES}}
    return out


def main() -> None:
    args, per_case = collect(__doc__, run_fold)
    write(args, "int8 with bfloat16 against float32 transposed convolutions, out of fold: each kept CV model "
          "(int8 calibrated on its own training volumes, as the app's) on its own validation volumes, as the app runs",
          BASE, summary(per_case), per_case)


if __name__ == "__main__":
    main()
