"""The blog post as a Hugo page bundle, built from the executed notebooks.

    python -m pefttutor.blog [--out build/blog]

writes `<out>/parameter-efficient-finetuning/`: `index.md` (front matter, then each notebook's prose,
its small result tables and its figures, in the blog's section order) and every figure the post
shows, copied from figures/ (SVG, or PNG where there is no SVG). No code, no exercises, nothing that
only makes sense in a running notebook. The bundle needs no raw HTML and no Hugo extension: math is
escaped so that Goldmark hands its LaTeX through unchanged, for the theme's `math: true` to render.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import shutil
import subprocess
import uuid
from html.parser import HTMLParser
from pathlib import Path

from . import checkpoint, plots, publish
from .config import repo_root

SLUG = "parameter-efficient-finetuning"
# The blog's sections in order; each notebook becomes one `##` section.
POST = ("01_introduction", "02_hard_vs_soft_prompts", "03_prefix_tuning", "04_adapters", "05_lora",
        "06_conclusion")
TITLE = "Parameter-efficient finetuning from scratch: prompts, prefixes, adapters and LoRA"
SUMMARY = ("Soft prompts, prefix tuning, adapters, LLaMA-Adapter and LoRA, each built from scratch in "
           "PyTorch and measured on two real pretrained models, on a CPU: what each trains, what it "
           "costs, and how well it does.")
PERMALINK = f"/posts/{SLUG}/"
MAX_TABLE_ROWS, MAX_TABLE_COLS = 20, 12  # larger outputs are data dumps, not results for a post

_HEADING = re.compile(r"^(#{1,6})[ \t]+(.*?)[ \t#]*$")
_FENCE = re.compile(r"^[ \t]{0,3}(```|~~~)")
_CHAPTER = re.compile(r"^\d+\s*·\s*")  # "05 · LoRA" -> "LoRA": the post has no chapter numbers
# What only makes sense beside a running notebook: how to run it fast, which test runs which cell,
# the interactive widgets, the notebook's objectives / prerequisites / time.
_DROP_PARAGRAPH = (re.compile(r"PEFTTUTOR_FAST"), re.compile(r"`tests/test_\w+\.py`"),
                   re.compile(r"\bwidget\b"), re.compile(r"^\*\*Objectives\*\*"))
_DROP_SENTENCE = (re.compile(r"PEFTTUTOR_\w+"), re.compile(r"\blive notebook\b"))
_DROP_ASIDE = re.compile(r"[ \t]*\([^()]*\bfast mode\b[^()]*\)")  # "(fast mode is far too short ...)"
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(*`$])")
_CODE_SPAN = re.compile(r"(`+)(?:.+?)(?<!`)\1(?!`)", re.S)
_MATH = re.compile(r"""
    (?<![\\$])\$\$(?P<display>.+?)(?<!\\)\$\$                       # $$ ... $$, may span lines
  | (?<![\\$\w])\$(?P<inline>[^\s$](?:[^$\n]|\n(?![ \t]*\n))*?)(?<![\s\\])\$(?![\w$])   # $ ... $
""", re.S | re.X)
_PUNCT = re.compile(r"([!-/:-@\[-`{-~])")  # every ASCII punctuation character (CommonMark escapes)
_INLINE_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~$])")


class BlogError(RuntimeError):
    """The post cannot be built as asked (a notebook or a figure is missing)."""


def post_notebooks(folder: Path | None = None) -> list[Path]:
    """The post's notebooks in its section order; a clear error names any that is missing."""
    folder = folder or repo_root() / "notebooks"
    paths = [folder / f"{stem}.ipynb" for stem in POST]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise BlogError(f"notebooks missing from {folder}: {', '.join(missing)}")
    return paths


def post_date(nbs: list[Path]) -> datetime.date:
    """The latest commit date of the post's notebooks (their committed outputs are its results);
    today where git cannot say (no git, not a checkout, notebooks never committed)."""
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%cI", "--", *map(str, nbs)], cwd=nbs[0].parent,
                             capture_output=True, text=True, check=True, timeout=30).stdout.strip()
        return datetime.date.fromisoformat(out[:10])
    except (OSError, subprocess.SubprocessError, ValueError):
        return datetime.date.today()


def front_matter(date: datetime.date) -> str:
    """The seed post's fields, exactly: strings as JSON, which is valid double-quoted YAML."""
    return "\n".join(["---", f"title: {json.dumps(TITLE, ensure_ascii=False)}", f"date: {date.isoformat()}",
                      f"permalink: {json.dumps(PERMALINK)}", f"summary: {json.dumps(SUMMARY, ensure_ascii=False)}",
                      "math: true", "showToc: true", "---", ""])


def figure_file(name: str, folder: Path) -> Path:
    """The figure's SVG (sharp at any size), else its PNG; an error says how to make it."""
    for ext in ("svg", "png"):
        if (folder / f"{name}.{ext}").exists():
            return folder / f"{name}.{ext}"
    raise BlogError(f"figure {name!r} is missing from {folder}: run `make figures`")


def escape_inline(text: str) -> str:
    """Plain text (a caption, a table cell) made safe inside a Markdown line."""
    return _INLINE_SPECIAL.sub(r"\\\1", " ".join(text.split()))


def _escape_math(tex: str, display: bool) -> str:
    # Goldmark would read `_`/`*` as emphasis, `\,` `\{` `\\` as escapes, a line-initial `-`/`>`/`#`
    # as a list, a quote or a heading, and trailing spaces as a line break. Escaping every ASCII
    # punctuation character makes it print the LaTeX back exactly, whatever the theme or config.
    lines = [line.strip() if display else line.rstrip() for line in tex.split("\n")]
    return "\n".join(_PUNCT.sub(r"\\\1", line) for line in lines if line or not display)


def protect_math(text: str) -> str:
    """Escape the LaTeX of every `$...$` and `$$...$$` outside code, delimiters kept as they are."""
    out, pos = [], 0
    for span in _CODE_SPAN.finditer(text):
        out += [_protect_math_plain(text[pos:span.start()]), span.group(0)]
        pos = span.end()
    return "".join(out + [_protect_math_plain(text[pos:])])


def _protect_math_plain(text: str) -> str:
    def escape(m: re.Match) -> str:
        if m.group("display") is not None:
            return "$$" + _escape_math(m.group("display"), display=True) + "$$"
        return "$" + _escape_math(m.group("inline"), display=False) + "$"

    return _MATH.sub(escape, text)


class _Table(HTMLParser):
    """The cells of a pandas `DataFrame` HTML table, rowspan and colspan filled in."""

    def __init__(self):
        super().__init__()
        self.head, self.body, self.row, self.cell, self.section = [], [], None, None, "body"
        self.spans = {}  # column -> (rows left, text) from a rowspan above

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "thead":
            self.section = "head"
        elif tag == "tbody":
            self.section = "body"
        elif tag == "tr":
            self.row = []
        elif tag in ("th", "td") and self.row is not None:
            self.cell = {"text": "", "rowspan": int(attrs.get("rowspan") or 1),
                         "colspan": int(attrs.get("colspan") or 1)}

    def handle_data(self, data):
        if self.cell is not None:
            self.cell["text"] += data

    def handle_endtag(self, tag):
        if tag in ("th", "td") and self.cell is not None:
            self._place(self.cell)
            self.cell = None
        elif tag == "tr" and self.row is not None:
            self._fill_spans()
            (self.head if self.section == "head" else self.body).append(self.row)
            self.row = None

    def _fill_spans(self):
        while len(self.row) in self.spans:
            self._take_span(len(self.row))

    def _take_span(self, col):
        left, text = self.spans.pop(col)
        self.row.append(text)
        if left > 1:
            self.spans[col] = (left - 1, text)

    def _place(self, cell):
        self._fill_spans()
        text = " ".join(cell["text"].split())
        for _ in range(cell["colspan"]):
            if cell["rowspan"] > 1:
                self.spans[len(self.row)] = (cell["rowspan"] - 1, text)
            self.row.append(text)


def html_table(source: str) -> str | None:
    """A small pandas DataFrame's HTML as a Markdown table; None if it is none or too large."""
    if 'class="dataframe"' not in source:
        return None
    table = _Table()
    table.feed(source)
    rows = table.body
    width = max(map(len, table.head + rows), default=0)
    if not rows or width > MAX_TABLE_COLS or len(rows) > MAX_TABLE_ROWS:
        return None
    header = [" ".join(r[i] for r in table.head if i < len(r) and r[i]) for i in range(width)]
    rows = [r + [""] * (width - len(r)) for r in rows]
    if not header[0] and [r[0] for r in rows] == [str(i) for i in range(len(rows))] and width > 1:
        header, rows = header[1:], [r[1:] for r in rows]  # a default 0, 1, 2, ... index says nothing
        width -= 1
    lines = [header, ["---"] * width] + rows
    return "\n".join("| " + " | ".join(c if c == "---" else escape_inline(c) for c in line) + " |"
                     for line in lines)


def _drop_boilerplate(paragraph: str) -> str:
    if any(p.search(paragraph) for p in _DROP_PARAGRAPH):
        return ""
    paragraph = _DROP_ASIDE.sub("", paragraph)
    if any(p.search(paragraph) for p in _DROP_SENTENCE):
        sentences = _SENTENCE_END.split(paragraph)
        paragraph = " ".join(s for s in sentences if not any(p.search(s) for p in _DROP_SENTENCE))
    return paragraph.strip("\n")


class _Section:
    """One notebook turned into the post's Markdown, cell by cell, skipping its exercises."""

    def __init__(self, figures: Path, first_figure: int):
        self.figures, self.number = figures, first_figure
        self.parts: list[str] = []
        self.shown: list[Path] = []
        self.skip_level: int | None = None  # inside an exercise heading of this level
        self.fenced = False

    def markdown(self, source: str) -> None:
        kept = []
        for line in source.split("\n"):
            heading = None if self.fenced else _HEADING.match(line)
            if _FENCE.match(line):
                self.fenced = not self.fenced
            if heading:
                level, text = len(heading.group(1)), heading.group(2)
                if self.skip_level is not None and level <= self.skip_level:
                    self.skip_level = None
                if "exercise" in text.lower():
                    self.skip_level = level
                if self.skip_level is None:
                    kept.append("#" * min(level + 1, 6) + " " + (_CHAPTER.sub("", text) if level == 1 else text))
            elif self.skip_level is None:
                kept.append(line)
        paragraphs = (_drop_boilerplate(p) for p in re.split(r"\n[ \t]*\n", "\n".join(kept)))
        text = "\n\n".join(p for p in paragraphs if p.strip())
        if text:
            self.parts.append(protect_math(text))

    def code(self, cell) -> None:
        if self.skip_level is not None:
            return
        tables, label = [], None
        for output in cell.get("outputs", []):
            table = html_table(output.get("data", {}).get("text/html", ""))
            if table:
                tables.append((label, table))
            text = output.get("text", "").strip() if output.get("output_type") == "stream" else ""
            label = text if text and "\n" not in text and len(text) <= 60 else None
        for label, table in tables:  # several tables from one cell: the one-line print before each names it
            self.parts.append(f"**{escape_inline(label)}**\n\n{table}" if label and len(tables) > 1 else table)
        for name in publish.figure_refs(cell.source):
            path = figure_file(name, self.figures)
            if path in self.shown:
                continue
            svg = self.figures / f"{name}.svg"
            text = (publish.caption(svg) if svg.exists() else "") or name  # a PNG carries no caption
            text = escape_inline(text[:1].upper() + text[1:])
            self.parts.append(f"![{text}]({path.name})\n\n*Figure {self.number}. {text}*")
            self.shown.append(path)
            self.number += 1


def section(nb: Path, figures: Path, first_figure: int = 1) -> tuple[str, list[Path]]:
    """One notebook as a `##` section of the post: (Markdown, the figure files it shows)."""
    import nbformat

    sec = _Section(figures, first_figure)
    for cell in nbformat.read(nb, as_version=4).cells:
        if cell.cell_type == "markdown":
            sec.markdown(cell.source)
        elif cell.cell_type == "code":
            sec.code(cell)
    return "\n\n".join(sec.parts) + "\n", sec.shown


def render(nbs: list[Path], figures: Path, date: datetime.date) -> tuple[str, list[Path]]:
    """The whole `index.md` and the figure files it references, in order."""
    parts, shown = [front_matter(date)], []
    for nb in nbs:
        text, files = section(nb, figures, first_figure=len(shown) + 1)
        parts.append(text)
        shown += files
    return "\n".join(parts), shown


def build(out: Path, nbs: list[Path] | None = None, figures: Path | None = None,
          date: datetime.date | None = None) -> Path:
    """Write the bundle `out/<SLUG>/` and return it. Built beside, then swapped in, so that neither a
    half-written bundle nor a figure the post no longer shows is ever left there."""
    nbs = nbs or post_notebooks()
    figures = figures or plots.figures_dir()
    text, files = render(nbs, figures, date or post_date(nbs))
    out.mkdir(parents=True, exist_ok=True)
    bundle, tmp = out / SLUG, out / f".{SLUG}.{uuid.uuid4().hex}.tmp"
    tmp.mkdir()
    try:
        checkpoint.write_atomic(tmp / "index.md", text.encode("utf-8"))
        for path in files:
            checkpoint.write_atomic(tmp / path.name, path.read_bytes())
        old = out / f".{SLUG}.{uuid.uuid4().hex}.old"
        if bundle.exists():
            bundle.rename(old)
        tmp.rename(bundle)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return bundle


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m pefttutor.blog", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=repo_root() / "build" / "blog",
                        help="folder for the page bundle (default: build/blog)")
    args = parser.parse_args(argv)
    try:
        bundle = build(args.out)
    except BlogError as e:
        raise SystemExit(f"blog: {e}") from None
    files = sorted(p.name for p in bundle.iterdir())
    print(f"{bundle / 'index.md'} and {len(files) - 1} figures (a Hugo page bundle: copy {bundle} "
          f"into the blog's content/posts/)")


if __name__ == "__main__":
    main()
