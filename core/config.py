"""Environment-configurable paths (data root, weights folder) with helpful errors."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT_ENV = "MEDIMG_DATA_ROOT"
WEIGHTS_DIR_ENV = "MEDIMG_WEIGHTS_DIR"


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: explicit argument, else $MEDIMG_DATA_ROOT, else ./data."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(DATA_ROOT_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return (Path.cwd() / "data").resolve()


def weights_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Resolve the weights folder: explicit argument, else $MEDIMG_WEIGHTS_DIR, else <project>/weights."""
    if explicit:
        return Path(explicit).expanduser().resolve()
    env = os.environ.get(WEIGHTS_DIR_ENV)
    if env:
        return Path(env).expanduser().resolve()
    return PROJECT_ROOT / "weights"
