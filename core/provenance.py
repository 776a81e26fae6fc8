"""Is an upload one of the model's own training cases?

A result on a training image shows how well the model fits what it learnt from, not how it does on a new
patient, and nothing in the file says so. ``python -m core.provenance --task T`` (also run by
``train_all.py`` after each model) writes ``<weights>/<T>.training-fingerprints.json``: a fingerprint of
every training input as the app's readers decode it (pixel or voxel values and array shape, hashed; no
image content), with the sha256 of the weights it belongs to. A page looks an upload up in it and says so
when it is found. Files re-encoded (another format, a crop, a DICOM export) are not recognised.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from core.config import data_root, weights_dir

FILE = "{task}.training-fingerprints.json"
DIGITS = 20  # 80 bits of sha256: no two of a few thousand inputs share one by chance


def fingerprint(arr: np.ndarray) -> str:
    """Hash of an image's values (as float32, C order) and shape: the same array decoded from the same
    file always gives the same fingerprint, whatever the integer or float type the reader returned."""
    a = np.ascontiguousarray(np.asarray(arr, dtype=np.float32))
    h = hashlib.sha256(repr(tuple(a.shape)).encode())
    h.update(memoryview(a).cast("B"))  # the array's own buffer: no 4-byte-per-voxel copy
    return h.hexdigest()[:DIGITS]


def training_inputs(task: str, card: dict, root: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(case name, decoded array) of every training input the card lists, read as the app reads uploads:
    chest X-rays by ``read_image_2d`` (pixels), cardiac ED and ES frames and atrium volumes by the NIfTI
    reader (voxels)."""
    from core import io as mio

    train = list(card.get("data", {}).get("train_cases", []))
    if task == "pneumonia":
        for rel in train:
            path = root / rel
            yield rel, mio.read_image_2d(path.read_bytes(), path.name).pixels
    elif task == "cardiac":
        keep = set(train)
        for c in mio.find_cardiac_cases(root):
            if c.patient_id in keep:
                yield f"{c.patient_id} ED frame", mio.load_nifti_path(c.ed_path).data
                yield f"{c.patient_id} ES frame", mio.load_nifti_path(c.es_path).data
    elif task == "atrium":
        keep = set(train)
        for c in mio.find_atrium_cases(root):
            if c.case_id in keep:
                yield c.case_id, mio.load_nifti_path(c.image_path).data
    else:
        raise ValueError(f"unknown task {task!r}")


def write_fingerprints(task: str, root, wdir=None) -> Path:
    """Fingerprint every training input of the task's current weights -> <weights>/<task>.training-fingerprints.json."""
    from core.checkpoint import _atomic_write, read_card

    card = read_card(task, wdir)
    cases = {fingerprint(arr): name for name, arr in training_inputs(task, card, Path(root))}
    n_listed = len(card.get("data", {}).get("train_cases", []))
    out = {"task": task, "weights_sha256": card.get("weights_sha256"), "digits": DIGITS,
           "what": "fingerprints (sha256 of decoded values and shape) of the training inputs the card lists",
           "n_training_cases_listed": n_listed, "n_fingerprints": len(cases), "cases": dict(sorted(cases.items()))}
    path = weights_dir(wdir) / FILE.format(task=task)
    _atomic_write(path, (json.dumps(out, indent=0) + "\n").encode())
    return path


def load_fingerprints(task: str, card: dict, wdir=None) -> dict[str, str] | None:
    """fingerprint -> training case name for the weights of ``card``; None when the file is missing or was
    written for other weights (then nothing can be said either way)."""
    path = weights_dir(wdir) / FILE.format(task=task)
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if d.get("weights_sha256") != card.get("weights_sha256") or d.get("digits") != DIGITS:
        return None
    return dict(d.get("cases", {}))


def training_note(case: str) -> str:
    """What the page and the PDF report say beside a result whose input is the training case ``case``."""
    return (f"This input is in the model's training data ({case}): the result shows how the model fits what it "
            "learnt from, not how it would do on a new patient.")


def training_case(fingerprints: dict[str, str] | None, arr: np.ndarray) -> str | None:
    """The training case an array is, or None (also when no fingerprints are available)."""
    return fingerprints.get(fingerprint(arr)) if fingerprints else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m core.provenance", description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", required=True, nargs="+", choices=["pneumonia", "cardiac", "atrium"])
    ap.add_argument("--data-root", default=None, help="dataset root (else $MEDIMG_DATA_ROOT, else ./data)")
    ap.add_argument("--weights", default=None, help="weights folder (default weights/)")
    args = ap.parse_args(argv)
    for task in args.task:
        path = write_fingerprints(task, data_root(args.data_root), args.weights)
        d = json.loads(path.read_text())
        print(f"{task}: {d['n_fingerprints']} fingerprints of {d['n_training_cases_listed']} training cases -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
