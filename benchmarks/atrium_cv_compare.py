"""Compare two atrium cross-validation files fold by fold, out of fold (no model is run).

    python benchmarks/atrium_cv_compare.py benchmarks/cv-folds-48ep/atrium.cv.json weights/atrium.cv.json \
        [--json out.json]

For the folds both files hold (same split required), per dataset: mean Dice of each, how many volumes the second
is better / worse on by more than 0.01, the paired mean change with its t statistic, HD95 and absolute volume
error, and how often the quality check fired. Reads only the per-case figures the CV wrote; prints a markdown
table. Used for the 48- against 64-epoch recipe (docs/atrium-cpu-experiments-2026-11.md).
"""
from __future__ import annotations

import argparse
import json
import math
from datetime import datetime, timezone

import numpy as np

MARGIN = 0.01  # a volume counts as better/worse beyond this (about one fold's run-to-run spread per volume)


def paired(a: list[float], b: list[float]) -> dict:
    """Mean of b - a with its paired t statistic (nan when undefined); a, b: per-volume figures, same order."""
    d = np.asarray(b, float) - np.asarray(a, float)
    n = len(d)
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    t = float(d.mean() / (sd / math.sqrt(n))) if n > 1 and sd > 0 else float("nan")
    return {"mean_change": float(d.mean()) if n else float("nan"), "t": t,
            "better": int((d > MARGIN).sum()), "worse": int((d < -MARGIN).sum())}


def compare(cv_a: dict, cv_b: dict) -> dict:
    """Per-dataset comparison over the folds both CV dicts hold; raises ValueError on a split mismatch."""
    fa = {f["fold"]: f for f in cv_a["folds"]}
    fb = {f["fold"]: f for f in cv_b["folds"]}
    common = sorted(set(fa) & set(fb))
    for k in common:
        if fa[k]["val_cases"] != fb[k]["val_cases"]:
            raise ValueError(f"fold {k} validates other volumes in the two files")
    rows: dict[str, dict] = {}
    scopes = [(f"fold {k}", [k]) for k in common] + [("pooled", common)]
    for scope, folds in scopes:
        for ds in ("LA2018", "Task02_Heart"):
            cases = [(k, c) for k in folds for c in fa[k]["per_case"] if fa[k]["per_case"][c]["dataset"] == ds]
            if not cases:
                continue
            a = [fa[k]["per_case"][c] for k, c in cases]
            b = [fb[k]["per_case"][c] for k, c in cases]
            fired = [sum(c in f[k]["quality_check"].get("validation_fired", {}) for k, c in cases) for f in (fa, fb)]
            rows[f"{scope} / {ds}"] = {
                "n": len(cases),
                "dice": [float(np.mean([r["dice"] for r in x])) for x in (a, b)],
                "hd95_mm": [float(np.mean([r["hd95_mm"] for r in x])) for x in (a, b)],
                "abs_volume_error_pct": [float(np.mean([abs(r["volume_error_pct"]) for r in x])) for x in (a, b)],
                "quality_fired": fired,
                **paired([r["dice"] for r in a], [r["dice"] for r in b]),
            }
    return {"folds": common, "rows": rows}


def markdown(res: dict, names: tuple[str, str]) -> str:
    out = [f"| scope / dataset | n | Dice {names[0]} | Dice {names[1]} | change (t) | better / worse by {MARGIN} "
           f"| HD95 mm | abs vol err % | QC fired |", "|---|---|---|---|---|---|---|---|---|"]
    for key, r in res["rows"].items():
        out.append(f"| {key} | {r['n']} | {r['dice'][0]:.4f} | {r['dice'][1]:.4f} | {r['mean_change']:+.4f} "
                   f"({r['t']:.1f}) | {r['better']} / {r['worse']} | {r['hd95_mm'][0]:.2f} -> {r['hd95_mm'][1]:.2f} "
                   f"| {r['abs_volume_error_pct'][0]:.1f} -> {r['abs_volume_error_pct'][1]:.1f} "
                   f"| {r['quality_fired'][0]} -> {r['quality_fired'][1]} |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="the reference atrium.cv.json")
    ap.add_argument("b", help="the candidate atrium.cv.json")
    ap.add_argument("--json", default=None, help="also write the comparison here")
    args = ap.parse_args()
    cv_a, cv_b = (json.load(open(p)) for p in (args.a, args.b))
    res = compare(cv_a, cv_b)
    names = tuple(f"{c['training'].get('epochs', '?')} ep" for c in (cv_a, cv_b))
    print(markdown(res, names))
    if args.json:
        res = {"a": args.a, "b": args.b, "epochs": [c["training"].get("epochs") for c in (cv_a, cv_b)],
               "margin": MARGIN, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"), **res}
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
            fh.write("\n")


if __name__ == "__main__":
    main()
