"""Run the from-scratch code a notebook shows inline, so tests can hold it equal to the package's."""

from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).parent.parent / "notebooks"


def run_cell(notebook: str, mark: str, max_lines: int) -> dict:
    """Execute the one code cell of notebooks/`notebook` that contains `mark`; return its namespace.

    The cell must be self-contained (its own imports) and at most `max_lines` long: the inline
    version is for reading, so it has to stay short.
    """
    path = NOTEBOOKS / notebook
    cells = [c for c in nbformat.read(path, as_version=4).cells if c.cell_type == "code" and mark in c.source]
    assert len(cells) == 1, f"expected one cell containing {mark!r} in {notebook}, found {len(cells)}"
    source = cells[0].source
    assert len(source.splitlines()) <= max_lines, f"the from-scratch cell should stay within {max_lines} lines"
    namespace = {}
    exec(compile(source, f"{notebook}:{mark}", "exec"), namespace)
    return namespace
