"""Sample cases for the app, read from the data root (never committed), listed in sample_data/."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.config import PROJECT_ROOT
from core.io import parse_info_cfg

SAMPLES_FILE = PROJECT_ROOT / "sample_data" / "samples.json"

HOW_TO_GET = {
    "pneumonia": "Download the Kermany chest X-rays (Mendeley doi:10.17632/rscbjbr9sj.2 or Kaggle) and lay them out "
                 "as <data root>/chest_xray/train/{NORMAL,PNEUMONIA}/",
    "cardiac": "Download ACDC (acdc.creatis.insa-lyon.fr) and lay it out as <data root>/ACDC/training/patientNNN/",
    "atrium": "Download MSD Task02_Heart (medicaldecathlon.com) and lay it out as "
              "<data root>/Task02_Heart/{imagesTr,labelsTr}/ (and, for LGE-MRI, the 2018 LA challenge as "
              "<data root>/LA2018/{imagesTr,labelsTr}/)",
}


@dataclass(frozen=True)
class Sample:
    """One sample case: a label for the picker and its files (absolute paths) by role."""

    name: str
    note: str
    files: dict[str, Path]


def list_samples(task: str, root: Path) -> list[Sample]:
    """The fixed sample cases of ``task`` whose files all exist under ``root``."""
    spec = json.loads(SAMPLES_FILE.read_text())[task]
    out = []
    for item in spec:
        if "patient" in item:  # ACDC: frame numbers come from Info.cfg (they differ between releases)
            pdir = Path(root) / item["patient"]
            if not (pdir / "Info.cfg").is_file():
                continue
            info = parse_info_cfg(pdir / "Info.cfg")
            try:
                files = {f: pdir / f"{pdir.name}_frame{int(info[f]):02d}.nii.gz" for f in ("ED", "ES")}
            except (KeyError, ValueError):
                continue
        else:
            files = {role: Path(root) / rel for role, rel in item["files"].items()}
        if all(p.is_file() for p in files.values()):
            out.append(Sample(item["name"], item.get("note", ""), files))
    return out
