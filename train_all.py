"""Train all (or some) diagnostic models from the data root and write weights/<task>.pt + .json.

    python train_all.py [--tasks pneumonia cardiac atrium] [--data-root DIR] [--weights-dir DIR]
                        [--smoke] [--device cuda|cpu] [--seed 0] [--epochs N] [--crop N] [--atrium-cv]

--atrium-cv runs folds 1-5 of the atrium recipe and writes <weights>/atrium.cv.json, so that every atrium
volume is validated once; each fold's weights go to artifacts/atrium-cv-folds/fold<K> (not committed;
--keep-fold-weights). The atrium model itself is the recipe trained on every
volume, with the folds' inference setting and pooled figures: run --atrium-cv first. Its 3D refiner is trained in
the same run, inside the atrium's budget, from the kept fold models' out-of-fold masks (--atrium-folds, by default
the committed ones in benchmarks/cv-folds/atrium); the fold refiners that measure it: `python -m core.atrium refiner`.

After each model it writes <weights>/<task>.training-fingerprints.json (core.provenance: which uploads are
training inputs). Every run also writes <weights>/train_all.run.json: wall-clock seconds per task (reading the
data, training, validation and fitting the input check) and in all, with the machine it ran on.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from core.config import PROJECT_ROOT, data_root
from core.errors import MedImgError
from core.precision import cpu_description
from core.tasks import TASKS


DEFAULT_ATRIUM_FOLDS = PROJECT_ROOT / "benchmarks" / "cv-folds" / "atrium"


def atrium_folds_dir(arg: str | None, smoke: bool) -> Path | None:
    """The fold models the atrium refiner learns from: ``arg`` ('none': no refiner training), else the committed
    ones when present and not a smoke run."""
    if arg is not None:
        return None if arg.lower() == "none" else Path(arg)
    return DEFAULT_ATRIUM_FOLDS if not smoke and DEFAULT_ATRIUM_FOLDS.is_dir() else None


def train_task(task: str, root: Path, device, smoke: bool = False, out_dir: Path | None = None,
               seed: int = 0, epochs: int | None = None, crop: int | None = None,
               ema: float | None = None, spacing_mm: float | None = None, time_budget: bool = True,
               atrium_folds: Path | None = None) -> dict:
    """Train one task with its registry defaults (or smoke settings) and write weights + card: each task's
    own module trains it (core.pneumonia, core.cardiac, core.atrium) with the shared loop of core.train.
    ``time_budget``: hold the task to its registry budget (``TaskSpec.train_budget``; not in a smoke run).
    ``atrium_folds``: the kept atrium fold models the refiner learns from (None: keep the refiner there is)."""
    from dataclasses import replace
    from functools import partial

    from core import atrium, cardiac, pneumonia
    from core.train import TimeBudget, task_config

    trainers = {"pneumonia": pneumonia.train_pneumonia, "cardiac": cardiac.train_cardiac,
                "atrium": partial(atrium.train_atrium, folds_dir=atrium_folds)}
    cfg = task_config(task, smoke, seed, epochs, crop, ema, spacing_mm)
    budget = TASKS[task].train_budget
    if time_budget and budget and not smoke:
        cfg = replace(cfg, time_budget=TimeBudget(*budget))
    return trainers[task](Path(root), cfg, device, smoke=smoke, out_dir=out_dir)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", choices=list(TASKS), default=list(TASKS))
    ap.add_argument("--data-root", default=None, help="dataset root (else $MEDIMG_DATA_ROOT, else ./data)")
    ap.add_argument("--weights-dir", default=None,
                    help="where to write weights (default weights/; artifacts/smoke-weights with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="a few cases and 2 epochs per task, to check the pipeline")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--epochs", type=int, default=None, help="override the registry's epoch count")
    ap.add_argument("--no-time-budget", action="store_true",
                    help="run every epoch of the schedule however long it takes (by default a task whose schedule "
                         "would overrun its budget on this machine, 30 min for pneumonia and cardiac, 90 for the "
                         "atrium, runs fewer epochs, never under half; its card says so)")
    ap.add_argument("--crop", type=int, default=None,
                    help="atrium: side of the training crops (multiple of 16; default the registry's 128)")
    ap.add_argument("--ema", type=float, default=None,
                    help="validate and keep an exponential moving average of the weights with this decay (e.g. 0.998)")
    ap.add_argument("--spacing", type=float, default=None,
                    help="atrium: the in-plane grid in mm to train (and later segment) at, instead of the "
                         "registry's 1.25 mm; recorded in the card's input_spec")
    ap.add_argument("--atrium-cv", action="store_true",
                    help="instead of training: cross-validation folds 1-5 of the atrium recipe -> atrium.cv.json")
    ap.add_argument("--folds", type=int, nargs="+", default=None,
                    help="with --atrium-cv: only these folds (1-5); folds already in atrium.cv.json are kept")
    ap.add_argument("--keep-fold-weights", default=None, metavar="DIR",
                    help="with --atrium-cv: write each fold's weights and card to DIR/fold<K> (default "
                         "artifacts/atrium-cv-folds, beside the CV file with --weights-dir; not committed: for "
                         "scoring a later inference change out of fold); 'none' keeps only their sha256")
    ap.add_argument("--atrium-folds", default=None, metavar="DIR",
                    help="atrium: the kept cross-validation fold models (fold1 ... fold5, those atrium.cv.json "
                         "recorded) whose out-of-fold masks the 3D refiner learns from (default "
                         f"{DEFAULT_ATRIUM_FOLDS.relative_to(PROJECT_ROOT)} when present, not in a smoke run); "
                         "'none' keeps the refiner in the weights folder")
    args = ap.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    import torch

    from core.train import dist_info, pick_device

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # started by torchrun: one process per GPU (or CPU slot)
        import torch.distributed as dist

        use_cuda = torch.cuda.is_available() and args.device != "cpu"
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            args.device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    root = data_root(args.data_root)
    out = Path(args.weights_dir) if args.weights_dir else (
        PROJECT_ROOT / "artifacts" / "smoke-weights" if args.smoke else None)
    device = pick_device(args.device)
    print(f"data root {root} | device {device} | torch {torch.__version__} | threads {torch.get_num_threads()}")
    if args.atrium_cv:
        from core.atrium import cross_validate

        keep = (Path(args.keep_fold_weights) if args.keep_fold_weights and args.keep_fold_weights.lower() != "none"
                else None if args.keep_fold_weights else (out or PROJECT_ROOT / "artifacts") / "atrium-cv-folds")
        rep = cross_validate(root, device, out, seed=args.seed, smoke=args.smoke, epochs=args.epochs,
                             only=args.folds, keep_weights=keep)
        dice = [r["dice"] for f in rep["folds"] for r in f["per_case"].values()]
        print(f"[atrium cv] {len(rep['folds'])} folds, {len(dice)} volumes, mean Dice "
              f"{sum(dice) / max(1, len(dice)):.3f}")
        return 0
    failed = False
    t_start = time.time()
    timings: dict[str, float] = {}
    schedules: dict[str, dict] = {}
    for task in args.tasks:
        t0 = time.time()
        try:
            card = train_task(task, root, device, smoke=args.smoke, out_dir=out, seed=args.seed, epochs=args.epochs,
                              crop=args.crop if TASKS[task].kind == "segmentation" else None, ema=args.ema,
                              spacing_mm=args.spacing if TASKS[task].kind == "segmentation" else None,
                              time_budget=not args.no_time_budget,
                              atrium_folds=atrium_folds_dir(args.atrium_folds, args.smoke))
        except MedImgError as exc:
            print(f"[{task}] not trained: {exc}", file=sys.stderr)
            failed = True
            continue
        if dist_info()[0] != 0:
            continue  # rank 0 alone fits the input check and reports
        if TASKS[task].kind == "binary":
            from core.ood import build_guard

            g = build_guard(task, root, out)
            print(f"[{task}] input check fitted on {g['n_fit']} training cases; validation false-refusal rate "
                  f"{g['val_false_refusal_rate']:.3f}")
        if task == "cardiac":
            from core.cardiac import build

            dr = build(root, out, seed=args.seed)
            print(f"[{task}] five-class diagnosis: CV accuracy {dr['cross_validation']['calibrated']['accuracy']:.3f}, "
                  f"end-to-end on the validation patients {dr['validation_end_to_end'].get('accuracy', float('nan')):.3f}")
        if task == "pneumonia":
            from core.pneumonia import train_population_gate

            pc = train_population_gate(root, device, card, smoke=args.smoke, out_dir=out, seed=args.seed)
            print(f"[{task}] population check: held-out outside images refused "
                  f"{json.dumps(pc['validation']['held_out_refusal_rate'])}; in-population validation refused "
                  f"{pc['validation']['in_population_refusal_clean']:.3f}")
            if not args.smoke:  # the temperature needs the full validation set
                from core.pneumonia import calibrate

                cal = calibrate(root, out, seed=args.seed)
                print(f"[{task}] calibration: temperature {cal['temperature']:.2f}, ECE {cal['ece_before']:.3f} -> "
                      f"{cal['ece_after_cross_fitted']:.3f} (cross-fitted)")
        from core.provenance import write_fingerprints

        # so that a page can say when an upload is one of these weights' own training inputs
        write_fingerprints(task, root, out)
        v = card["validation"]
        summary = {k: v[k] for k in ("auc", "accuracy", "dice_mean") if k in v}
        timings[task] = round(time.time() - t0, 1)
        if card.get("training", {}).get("schedule"):
            schedules[task] = card["training"]["schedule"]
        print(f"[{task}] done in {time.time() - t0:.0f} s, best epoch {card['best_epoch']}/{card['epochs_run']}: "
              f"{json.dumps(summary)}")
    if dist_info()[0] == 0 and timings:
        _write_run_record(out, args, argv, device, timings, time.time() - t_start, schedules)
    import torch.distributed as dist

    if dist.is_initialized():
        # every rank waits for rank 0's last writes before the group goes: a rank tearing down gloo while its
        # peer still uses the group aborted once at exit (SIGABRT, "terminate called without an active exception")
        dist.barrier()
        dist.destroy_process_group()
    return 1 if failed else 0


def _write_run_record(out: Path | None, args: argparse.Namespace, argv: list[str] | None, device, timings: dict,
                      total_s: float, schedules: dict | None = None) -> None:
    """<weights>/train_all.run.json: how long this run took, per task and in all, and where, with each task's
    time budget and the schedule it ran (shortened or not)."""
    import platform

    import torch

    from core.checkpoint import _atomic_write, git_commit
    from core.config import weights_dir

    rec = {
        "command": " ".join(["python train_all.py", *(sys.argv[1:] if argv is None else argv)]),
        "tasks": list(timings), "seconds_per_task": timings, "total_s": round(total_s, 1),
        "smoke": args.smoke, "epochs_override": args.epochs, "crop_override": args.crop, "ema_override": args.ema,
        "spacing_override": args.spacing,
        "time_budget_min": None if args.no_time_budget or args.smoke else
        {t: TASKS[t].train_budget[0] for t in timings if TASKS[t].train_budget},
        "schedules": schedules or {},
        "seed": args.seed,
        "device": str(device), "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(), "cpu": cpu_description(),
        "torch": torch.__version__, "git_commit": git_commit(),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    path = (Path(out) if out else weights_dir()) / "train_all.run.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, (json.dumps(rec, indent=1) + "\n").encode())
    print(f"train_all: {len(timings)} task(s) in {total_s / 60:.1f} min -> {path}")


if __name__ == "__main__":
    sys.exit(main())
