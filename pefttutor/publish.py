"""The blog's chapters and figures: the notebooks in order, the figures they export, their index.

    python -m pefttutor.publish figures [--force]   # run notebooks whose figures are missing, index them

The static site of the executed notebooks is Sphinx's (`make site`, configured in site/conf.py).
Figures are written by `plots.show(fig, "<name>")` when a notebook runs in full mode; each SVG
carries its caption in its metadata, and `figures/README.md` lists them all (`write_index`).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path
from xml.etree import ElementTree

from . import checkpoint
from .config import repo_root

_FIGURE = re.compile(r"""plots\.(?:show|save)\(\s*\w+\s*,\s*["']([0-9a-z][0-9a-z_\-]*)["']""")
_DC = "{http://purl.org/dc/elements/1.1/}"


def notebooks(folder: Path | None = None) -> list[Path]:
    """The tutorial's notebooks in the blog's order (their file names start with the chapter number)."""
    return sorted((folder or repo_root() / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _read(path: Path):
    import nbformat

    return nbformat.read(path, as_version=4)


def figure_names(notebook: Path) -> list[str]:
    """Names of the figures a notebook exports (`figure_refs` of its code cells)."""
    return [m for cell in _read(notebook).cells if cell.cell_type == "code" for m in figure_refs(cell.source)]


def figure_refs(source: str) -> list[str]:
    """Figure names a code cell exports: `plots.show(fig, "<name>", ...)` or `plots.save(fig, "<name>")`."""
    return _FIGURE.findall(source)


def missing_figures(nbs: list[Path], folder: Path) -> dict[Path, list[str]]:
    """Per notebook, the figures it exports that `folder` lacks (as SVG or PNG)."""
    out = {}
    for nb in nbs:
        gone = [n for n in figure_names(nb) if not all((folder / f"{n}.{e}").exists() for e in ("svg", "png"))]
        if gone:
            out[nb] = gone
    return out


def caption(svg: Path) -> str:
    """The caption `plots.save` wrote into an SVG's metadata ('' if none)."""
    node = ElementTree.parse(svg).getroot().find(f".//{_DC}description")
    return "" if node is None or node.text is None else node.text


def _write(path: Path, text: str) -> None:  # atomic: readers never see half a file
    checkpoint.write_atomic(path, text.encode("utf-8"))


def write_index(folder: Path, nbs: list[Path]) -> Path:
    """`folder/README.md`: every figure of every notebook, in the blog's order, with its caption."""
    lines = ["# Figures", "",
             "Written by the notebooks in full mode (`make figures`); SVG for the blog, PNG for previews.",
             "Same code and results, same SVG bytes: dates and software versions are left out.", ""]
    for nb in nbs:
        names = figure_names(nb)
        if not names:
            continue
        lines += [f"## {nb.stem}", "", "| figure | caption |", "|---|---|"]
        for name in names:
            svg = folder / f"{name}.svg"
            text = caption(svg) if svg.exists() else "(missing: run `make figures`)"
            lines.append(f"| [{name}.svg]({name}.svg) · [png]({name}.png) | {text.replace('|', '/')} |")
        lines.append("")
    path = folder / "README.md"
    _write(path, "\n".join(lines))
    return path


def execute(nb: Path) -> None:
    """Run a notebook top to bottom in full mode, in place (what `make execute` does for all)."""
    env = {k: v for k, v in os.environ.items() if k != "PEFTTUTOR_FAST"}
    env["TQDM_DISABLE"] = "1"
    subprocess.run([sys.executable, "-m", "jupyter", "nbconvert", "--to", "notebook", "--execute", "--inplace",
                    "--ExecutePreprocessor.timeout=-1", "--ExecutePreprocessor.kernel_name=python3", str(nb)],
                   check=True, env=env)


def title(nb: Path) -> str:
    """The notebook's first Markdown heading, without the '#'s."""
    for cell in _read(nb).cells:
        if cell.cell_type == "markdown":
            for line in cell.source.splitlines():
                if line.startswith("#"):
                    return line.lstrip("#").strip()
    return nb.stem


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pefttutor.publish", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figures", help="run the notebooks whose figures are missing, then index figures/")
    fig.add_argument("--force", action="store_true", help="re-run every notebook that exports figures")
    args = parser.parse_args(argv)
    nbs, folder = notebooks(), repo_root() / "figures"
    todo = [nb for nb in nbs if figure_names(nb)] if args.force else list(missing_figures(nbs, folder))
    for nb in todo:
        print(f"executing {nb.name} in full mode", flush=True)
        execute(nb)
    still = missing_figures(nbs, folder)
    if still:
        raise SystemExit(f"figures still missing after running their notebooks: {still}")
    print(f"{sum(len(figure_names(nb)) for nb in nbs)} figures; index: {write_index(folder, nbs)}")


if __name__ == "__main__":
    main()
