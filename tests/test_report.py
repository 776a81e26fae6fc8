"""The README's figures are generated from the weights cards, not typed by hand."""
from __future__ import annotations

from core.config import PROJECT_ROOT
from core.report import END, START, markdown


def test_readme_figures_match_cards():
    text = (PROJECT_ROOT / "README.md").read_text()
    block = text.split(START, 1)[1].split(END, 1)[0].strip()
    assert block == markdown().strip(), "README figures are stale: run `python -m core.report --write README.md`"
