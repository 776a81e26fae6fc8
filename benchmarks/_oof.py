"""Shared command line of the out-of-fold atrium experiments in this folder (not part of the app)."""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from typing import Callable

import torch

from core.config import data_root


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


def write(args: argparse.Namespace, what: str, app_setting: str, summary: dict, per_case: dict) -> None:
    """The experiment's JSON (summary, per case, folds, threads, date) to ``args.json``; the summary to stdout."""
    rec = {"what": what, "folds": args.folds, "app_setting": app_setting, "n_volumes": len(per_case),
           "summary": summary, "per_case": per_case, "threads": torch.get_num_threads(),
           "created": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    with open(args.json, "w") as fh:
        json.dump(rec, fh, indent=1)
    print(json.dumps(summary, indent=1))
