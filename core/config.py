"""Environment-configurable paths (data root, weights folder) with helpful errors."""
from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
DATA_ROOT_ENV = "MEDIMG_DATA_ROOT"
WEIGHTS_DIR_ENV = "MEDIMG_WEIGHTS_DIR"


def _resolve(explicit: str | os.PathLike | None, env: str, default: Path) -> Path:
    chosen = explicit or os.environ.get(env)
    return Path(chosen).expanduser().resolve() if chosen else default.resolve()


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """Resolve the data root: explicit argument, else $MEDIMG_DATA_ROOT, else ./data."""
    return _resolve(explicit, DATA_ROOT_ENV, Path.cwd() / "data")


def weights_dir(explicit: str | os.PathLike | None = None) -> Path:
    """Resolve the weights folder: explicit argument, else $MEDIMG_WEIGHTS_DIR, else <project>/weights."""
    return _resolve(explicit, WEIGHTS_DIR_ENV, PROJECT_ROOT / "weights")
