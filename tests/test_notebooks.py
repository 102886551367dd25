"""Committed notebooks are executed top to bottom with clean outputs (nbval runs them separately)."""

from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("*.ipynb"))


def test_there_are_notebooks():
    assert NOTEBOOKS, "no notebooks found"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_executed_in_order_with_clean_outputs(path):
    nb = nbformat.read(path, as_version=4)
    code = [c for c in nb.cells if c.cell_type == "code"]
    counts = [c.execution_count for c in code]
    assert counts == list(range(1, len(code) + 1)), f"{path.name}: not executed top to bottom: {counts}"
    for i, cell in enumerate(code, 1):
        for out in cell.outputs:
            assert out.output_type != "error", f"{path.name} cell {i} has an error output"
            assert not (out.output_type == "stream" and out.name == "stderr"), (
                f"{path.name} cell {i} writes to stderr: {out.text[:200]!r}"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_has_exercises_and_checked_cells(path):
    nb = nbformat.read(path, as_version=4)
    source = "\n".join(c.source for c in nb.cells)
    assert ".check(" in source, f"{path.name} has no exercise"
    tagged = [c for c in nb.cells if "nbval-check-output" in c.get("metadata", {}).get("tags", [])]
    assert tagged, f"{path.name} has no cell whose output nbval compares"
