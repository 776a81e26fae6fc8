"""Self-describing checkpoints: ``<task>.pt`` (state dict) beside ``<task>.json`` (the card)."""
from __future__ import annotations

import hashlib
import io
import json
import math
import os
import subprocess
import tempfile
from pathlib import Path

import torch

from core.config import PROJECT_ROOT, weights_dir
from core.errors import MissingWeightsError


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def git_commit() -> str:
    """The commit trained from ($MEDIMG_GIT_COMMIT when the tree travels without .git, e.g. to a GPU host)."""
    if os.environ.get("MEDIMG_GIT_COMMIT"):
        return os.environ["MEDIMG_GIT_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=PROJECT_ROOT, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip() if out.returncode == 0 and out.stdout.strip() else "uncommitted"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _clean(obj):
    """Make a card JSON-safe (NaN -> None, numpy scalars -> Python)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_checkpoint(state_dict: dict, card: dict, task: str, out_dir: str | Path | None = None) -> Path:
    """Write weights then card, each atomically; the card records the weights' sha256.

    The card is written last, so an interrupted run leaves either the old pair or a new .pt whose
    checksum no card vouches for (refused at load time), never a half-written file.
    """
    out = weights_dir(out_dir)
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    data = buf.getvalue()
    card = dict(card)
    card["weights_sha256"] = sha256_bytes(data)
    card["weights_bytes"] = len(data)
    _atomic_write(out / f"{task}.pt", data)
    _atomic_write(out / f"{task}.json", (json.dumps(_clean(card), indent=1) + "\n").encode())
    return out / f"{task}.pt"


def read_card(task: str, wdir: str | Path | None = None) -> dict:
    """The JSON card of a task's weights, or a MissingWeightsError saying how to get it."""
    path = weights_dir(wdir) / f"{task}.json"
    if not path.is_file():
        raise MissingWeightsError(
            f"The {task} model card {path} is missing. Train the model with "
            f"`python train_all.py --tasks {task}` (or restore weights/ from the repository)."
        )
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise MissingWeightsError(f"The {task} model card {path} is corrupt; retrain or restore it.") from exc


def load_state_dict(task: str, wdir: str | Path | None = None) -> tuple[dict, dict]:
    """Load (state_dict, card) after checking the weights' sha256 against the card."""
    card = read_card(task, wdir)
    path = weights_dir(wdir) / f"{task}.pt"
    if not path.is_file():
        raise MissingWeightsError(
            f"The {task} weights file {path} is missing. Train it with `python train_all.py --tasks {task}`."
        )
    data = path.read_bytes()
    if card.get("weights_sha256") != sha256_bytes(data):
        raise MissingWeightsError(
            f"The {task} weights file {path} does not match its card (checksum differs): it may be "
            f"half-written or from another run. Retrain with `python train_all.py --tasks {task}`."
        )
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state, card
