"""Shared parts of the out-of-fold atrium experiments in this folder (not part of the app): the command line,
each kept fold model with its own validation volumes of one path, the comparison with the app's setting."""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Callable, Iterator

import numpy as np
import torch

from core import atrium as A
from core import io as mio
from core.config import data_root
from core.inference import load_model
from core.precision import cpu_description
from core.runtime import LoadedModel


def collect(doc: str, run_fold: Callable[[str, object], dict]) -> tuple[argparse.Namespace, dict[str, dict]]:
    """Parse ``folds... --json F [--data-root R]`` and merge ``run_fold(fold_dir, root)`` over the folds."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("folds", nargs="+", help="folders holding a fold's atrium.pt + atrium.json")
    ap.add_argument("--data-root", default=None)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    root = data_root(args.data_root)
    per_case: dict[str, dict] = {}
    for f in args.folds:
        per_case.update(run_fold(f, root))
    return args, per_case


def fold_cases(wdir: str, root, fused: bool) -> tuple[LoadedModel, list[A.CanonicalCase]]:
    """A kept fold model and its own validation volumes (canonical, with their masks) that take the fused
    (``fused``) or the single-view path."""
    lm = load_model("atrium", wdir)
    views = tuple(lm.card["input_spec"].get("views", [2]))
    val = set(lm.card["data"]["val_cases"])
    vols = A.load_cases([c for c in mio.find_atrium_cases(root) if c.case_id in val])
    return lm, [v for v in vols if (len(A.resolve_views(views, v.data.shape, v.spacing)) > 1) == fused]


def app_predictions(wdir: str, root, localiser: bool = True
                    ) -> Iterator[tuple[LoadedModel, A.CanonicalCase, bool, "A.AtriumPrediction"]]:
    """(fold model, volume, fused?, prediction) for each of a kept fold model's own validation volumes (fused and
    single-view paths alike), segmented as the app does: the card's views, flips and threshold, the fold's
    localiser (``localiser=False``: the path before it, as older logs were made), bfloat16 (the fold models have
    no int8 ranges)."""
    from core.precision import autocast

    for fused in (True, False):
        lm, vols = fold_cases(wdir, root, fused=fused)
        spec = lm.card["input_spec"]
        views, flips = tuple(spec.get("views", [2])), int(spec.get("tta_flips", 1))
        for v in vols:
            yield lm, v, fused, A.segment_canonical(lm.model, v.data, v.spacing, views, lm.grid_mm, lm.threshold, 8,
                                                    lambda: autocast(lm.precision), flips=flips,
                                                    localiser=lm.localiser if localiser else None)


def fused_fold_volumes(wdir: str, root) -> Iterator[tuple[LoadedModel, A.CanonicalCase, tuple[int, ...], Callable]]:
    """(fold model, volume, its fused views, a fresh precision context) for each of a kept fold model's own
    validation volumes that take the fused path."""
    from core.precision import autocast

    lm, vols = fold_cases(wdir, root, fused=True)
    spec_views = tuple(lm.card["input_spec"].get("views", [2]))
    for v in vols:
        yield lm, v, A.resolve_views(spec_views, v.data.shape, v.spacing), lambda: autocast(lm.precision)


def compare(per_case: dict[str, dict], names: list[str], base: str,
            means: dict[str, int] | None = None) -> dict[str, dict]:
    """Per setting: mean Dice, mean change against ``base`` (the app's), volumes better, median seconds, and the
    means of the ``means`` keys (``add_means``)."""
    rows = list(per_case.values())
    out = {}
    for n in names:
        diff = np.array([r[n]["dice"] - r[base]["dice"] for r in rows])
        out[n] = {"dice_mean": round(float(np.mean([r[n]["dice"] for r in rows])), 4),
                  "dice_change_vs_app_mean": round(float(diff.mean()), 4), "volumes_better": int((diff > 0).sum()),
                  "volumes_worse_by_0.01": int((diff < -0.01).sum()),
                  "seconds_median": round(float(np.median([r[n]["seconds"] for r in rows])), 2)}
    if means:
        add_means(out, per_case, names, means)
    return out


def roughness(mask: np.ndarray, axis: int) -> float:
    """Mean absolute second difference of the mask's per-slice area along ``axis``, over the mean area."""
    a = mask.sum(axis=tuple(i for i in range(3) if i != axis)).astype(float)
    a = a[a > 0]
    return float(np.abs(np.diff(a, 2)).mean() / a.mean()) if len(a) > 2 else float("nan")


def mask_scores(mask: np.ndarray, label: np.ndarray, spacing) -> dict[str, float]:
    """Dice, HD95 (mm) and signed volume error (%) of a mask against the expert one, rounded as the logs keep them."""
    from core import metrics as M

    return {"dice": round(float(M.dice(mask, label)), 4), "hd95": round(float(M.hd95(mask, label, spacing)), 3),
            "volume_error_pct": round(float(M.volume_error_pct(mask, label)), 2)}


def add_means(summary: dict[str, dict], per_case: dict[str, dict], names: list[str],
              keys: dict[str, int]) -> None:
    """Add ``<key>_mean`` (rounded to ``keys[key]`` digits) over the cases to each setting's summary row."""
    rows = list(per_case.values())
    for n in names:
        for key, digits in keys.items():
            summary[n][f"{key}_mean"] = round(float(np.mean([r[n][key] for r in rows])), digits)


def write(args: argparse.Namespace, what: str, app_setting: str, summary: dict, per_case: dict) -> None:
    """The experiment's JSON (summary, per case, folds, threads, CPU, date) to ``args.json``; the summary to
    stdout. The seconds are this CPU's (``core.precision.cpu_description``)."""
    rec = {"what": what, "folds": args.folds, "app_setting": app_setting, "n_volumes": len(per_case),
           "summary": summary, "per_case": per_case, "threads": torch.get_num_threads(),
           "cpu": cpu_description(), "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with open(args.json, "w") as fh:
        json.dump(rec, fh, indent=1)
    print(json.dumps(summary, indent=1))


def fused_variant_rows(wdir: str, root, variants: dict[str, Callable]) -> dict[str, dict]:
    """{case: {variant: {dice, hd95, volume_error_pct, seconds}, dataset, fold, fold_threshold}} over a kept fold
    model's own fused-path validation volumes; ``variants[name](lm, volume, views, ctx)`` returns the prediction
    (an ``AtriumPrediction``) and is timed as a whole."""
    import time

    out: dict[str, dict] = {}
    for lm, v, views, ctx in fused_fold_volumes(wdir, root):
        row: dict = {"dataset": v.dataset, "fold": wdir.rstrip("/").rsplit("/", 1)[-1], "fold_threshold": lm.threshold}
        for name, run in variants.items():
            t0 = time.perf_counter()
            pred = run(lm, v, views, ctx)
            secs = time.perf_counter() - t0
            row[name] = {**mask_scores(pred.mask, v.label, v.spacing), "seconds": round(secs, 2),
                         "localised": pred.box is not None}
        out[v.case_id] = row
        print(v.case_id, {k: (r["dice"], r["hd95"], r["seconds"]) for k, r in row.items() if k in variants}, flush=True)
    return out


def run_fused_experiment(doc: str, variants: dict[str, Callable], what: str) -> None:
    """The command line of a fused-path experiment: every fold's ``fused_variant_rows``, compared with the first
    variant (the app's) on Dice, HD95 and volume error, written to ``--json``."""
    args, per_case = collect(doc, lambda wdir, root: fused_variant_rows(wdir, root, variants))
    names = list(variants)
    summary = compare(per_case, names, names[0], {"hd95": 3, "volume_error_pct": 2})
    write(args, what, names[0], summary, per_case)
