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


def json_bytes(obj) -> bytes:
    """A card or report as the project writes it: JSON-safe (``_clean``), indented by 1, one final newline."""
    return (json.dumps(_clean(obj), indent=1) + "\n").encode()


def write_json(path: str | Path, obj) -> None:
    """Write ``json_bytes(obj)`` to ``path`` atomically (``_atomic_write``)."""
    _atomic_write(Path(path), json_bytes(obj))


# Read once at import (os.umask can only be read by setting it): the mode a plain open() would give.
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``. The file gets the
    usual mode (0666 less the umask) rather than mkstemp's owner-only 0600, so weights and cards trained
    by one account can be read by the app server's."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _partials(out: Path, task: str) -> tuple[Path, Path]:
    return out / f".{task}.pt.partial", out / f".{task}.json.partial"


def recover(task: str, out_dir: str | Path | None = None) -> None:
    """Finish or discard a save that was interrupted.

    A save writes both files completely as ``.partial`` first, then renames the weights, then the
    card. If it stopped between the two renames, the new card is still complete and vouches for the
    new weights by checksum: it is put in place. Any other leftover is deleted.
    """
    out = weights_dir(out_dir)
    pt_tmp, js_tmp = _partials(out, task)
    pt = out / f"{task}.pt"
    try:
        if js_tmp.is_file() and not pt_tmp.exists() and pt.is_file():
            pending = json.loads(js_tmp.read_text())
            if pending.get("weights_sha256") == sha256_bytes(pt.read_bytes()):
                os.replace(js_tmp, out / f"{task}.json")
        for leftover in (pt_tmp, js_tmp):
            if leftover.exists():
                leftover.unlink()
    except (OSError, ValueError):
        pass  # a read-only weights folder: loading then refuses a mismatched pair by checksum


def _write_full(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def state_bytes(state_dict: dict) -> bytes:
    """The weights file's bytes for a state dict (CPU tensors, ``torch.save``); its sha256 is the card's."""
    import torch  # here, not at import: reading a card needs no torch

    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in state_dict.items()}, buf)
    return buf.getvalue()


def save_checkpoint(state_dict: dict, card: dict, task: str, out_dir: str | Path | None = None) -> Path:
    """Write ``<task>.pt`` and ``<task>.json`` as a pair; the card records the weights' sha256.

    Both are written in full beside their targets, then renamed (weights first). An interruption at
    any point leaves the old pair, or a state that :func:`recover` completes; never a half-written file.
    """
    out = weights_dir(out_dir)
    recover(task, out)
    data = state_bytes(state_dict)
    card = dict(card)
    card["weights_sha256"] = sha256_bytes(data)
    card["weights_bytes"] = len(data)
    pt_tmp, js_tmp = _partials(out, task)
    _write_full(pt_tmp, data)
    _write_full(js_tmp, json_bytes(card))
    os.replace(pt_tmp, out / f"{task}.pt")
    os.replace(js_tmp, out / f"{task}.json")
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


def require_weights(task: str, wdir: str | Path | None = None) -> tuple[Path, dict]:
    """(weights path, card) of a task, or a MissingWeightsError saying how to get them; needs no torch, so a
    page can say so before any model loads."""
    card = read_card(task, wdir)
    path = weights_dir(wdir) / f"{task}.pt"
    if not path.is_file():
        raise MissingWeightsError(
            f"The {task} weights file {path} is missing. Train it with `python train_all.py --tasks {task}`."
        )
    return path, card


def load_state_dict(task: str, wdir: str | Path | None = None) -> tuple[dict, dict]:
    """Load (state_dict, card) after checking the weights' sha256 against the card."""
    recover(task, wdir)
    path, card = require_weights(task, wdir)
    data = path.read_bytes()
    if card.get("weights_sha256") != sha256_bytes(data):
        raise MissingWeightsError(
            f"The {task} weights file {path} does not match its card (checksum differs): it may be "
            f"half-written or from another run. Retrain with `python train_all.py --tasks {task}`."
        )
    import torch

    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return state, card
