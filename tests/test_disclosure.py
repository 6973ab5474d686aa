"""The README's "What leaves a site" and "Who decides what" tables are generated, not typed."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from fedpeft.disclosure import RELEASES, SETTINGS, markdown_table

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.parametrize(("marker", "rows"), [("what-leaves", RELEASES), ("who-decides", SETTINGS)])
def test_readme_table_is_the_generated_one(marker: str, rows: tuple[object, ...]) -> None:
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"<!-- BEGIN {marker} -->\n(.*?)\n<!-- END {marker} -->", text, re.S)
    assert found is not None, f"README.md lacks the {marker} markers"
    assert found.group(1) == markdown_table(rows)  # type: ignore[arg-type]


def test_every_threat_model_quantity_is_listed() -> None:
    quantities = " ".join(r.quantity for r in RELEASES)
    for word in ("masked update", "plain update", "ε spent", "evaluation", "error code"):
        assert word in quantities
