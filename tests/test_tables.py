"""Every table of figures in README.md and docs/ is what `benchmarks/tables.py` renders from the JSON it names."""

import os
import sys

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import tables  # noqa: E402


def test_every_generated_table_equals_its_json():
    stale = []
    count = 0
    for path in tables.documents():
        with open(path) as f:
            text = f.read()
        count += len(tables.MARKER.findall(text))
        stale += [f"{os.path.relpath(path, REPO)}: {name}" for name in tables.regenerate(text)[1]]
    assert count >= 12, count  # the benchmark tables of the docs, the plans and the embedded default
    assert not stale, "tables that differ from their JSON (run python benchmarks/tables.py): " + "; ".join(stale)


def test_a_figure_edited_by_hand_is_found_and_regenerated():
    with open(os.path.join(REPO, "docs", "performance.md")) as f:
        text = f.read()
    edited = text.replace("| 3.47x |", "| 3.74x |", 1)
    assert edited != text
    regenerated, changed = tables.regenerate(edited)
    assert changed == ["attacks (benchmarks/results/attacks.json)"] and regenerated == text
