"""The blog's outputs: the figures index and a static HTML site of the executed notebooks.

    python -m pefttutor.publish figures [--force]   # run notebooks whose figures are missing, index them
    python -m pefttutor.publish site [--out docs]   # render every notebook to HTML, in the blog's order

Figures are written by `plots.show(fig, "<name>")` when a notebook runs in full mode; each SVG
carries its caption in its metadata, and `figures/README.md` lists them all (`write_index`).
"""

from __future__ import annotations

import argparse
import html
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


def _nav(pages: list[tuple[str, str]], i: int) -> str:
    links = ['<a href="index.html">contents</a>']
    if i > 0:
        links.insert(0, f'<a href="{pages[i - 1][0]}">&larr; {html.escape(pages[i - 1][1])}</a>')
    if i + 1 < len(pages):
        links.append(f'<a href="{pages[i + 1][0]}">{html.escape(pages[i + 1][1])} &rarr;</a>')
    return ('<nav class="pefttutor-nav" style="font-family: sans-serif; padding: 8px 16px; '
            'border-bottom: 1px solid #ddd; display: flex; gap: 24px;">' + "".join(links) + "</nav>")


def build_site(nbs: list[Path], out: Path) -> list[Path]:
    """Render each executed notebook to `out/<stem>.html` (outputs and figures embedded), with
    previous/next links, and `out/index.html` listing them in the blog's order. Returns the pages."""
    from nbconvert import HTMLExporter

    out.mkdir(parents=True, exist_ok=True)
    exporter = HTMLExporter(template_name="lab")
    pages = [(f"{nb.stem}.html", title(nb)) for nb in nbs]
    written = []
    for i, nb in enumerate(nbs):
        body, _ = exporter.from_notebook_node(_read(nb))
        body = re.sub(r"(<body[^>]*>)", lambda m: m.group(1) + _nav(pages, i), body, count=1)
        _write(out / pages[i][0], body)
        written.append(out / pages[i][0])
    items = "\n".join(f'<li><a href="{href}">{html.escape(name)}</a></li>' for href, name in pages)
    _write(out / "index.html", f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>pefttutor: parameter-efficient finetuning from scratch</title>
<style>body {{ font-family: sans-serif; max-width: 46em; margin: 3em auto; line-height: 1.5; }}</style></head>
<body><h1>pefttutor</h1>
<p>Parameter-efficient finetuning of language models, built from scratch and run on real pretrained
models and real data. Each chapter is an executed Jupyter notebook.</p>
<ol class="chapters">
{items}
</ol></body></html>
""")
    return [out / "index.html", *written]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pefttutor.publish", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    fig = sub.add_parser("figures", help="run the notebooks whose figures are missing, then index figures/")
    fig.add_argument("--force", action="store_true", help="re-run every notebook that exports figures")
    site = sub.add_parser("site", help="render the executed notebooks to HTML")
    site.add_argument("--out", type=Path, default=repo_root() / "docs")
    args = parser.parse_args(argv)
    nbs = notebooks()
    if args.command == "figures":
        folder = repo_root() / "figures"
        todo = [nb for nb in nbs if figure_names(nb)] if args.force else list(missing_figures(nbs, folder))
        for nb in todo:
            print(f"executing {nb.name} in full mode", flush=True)
            execute(nb)
        still = missing_figures(nbs, folder)
        if still:
            raise SystemExit(f"figures still missing after running their notebooks: {still}")
        print(f"{sum(len(figure_names(nb)) for nb in nbs)} figures; index: {write_index(folder, nbs)}")
    else:
        pages = build_site(nbs, args.out)
        print(f"{len(pages)} pages in {args.out} (open {args.out / 'index.html'})")


if __name__ == "__main__":
    main()
