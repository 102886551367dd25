"""One plotting helper for every notebook: a consistent style, shown inline, exported for the blog.

    fig, ax = plots.figure()
    ax.plot(...)
    plots.show(fig, "05_lora-singular-values")   # displays, and writes figures/<name>.svg/.png
    plots.png(fig)                               # or: PNG bytes for a widget's picture (`pefttutor.widgets`)

Exports are reproducible: a fixed SVG hash salt and no date/software metadata, so the same figure
gives the same SVG bytes on every run (`make figures` relies on it). Each SVG carries a one-line
caption in its metadata (`caption=`, else the figure's titles), which `figures/README.md` lists
(`pefttutor.publish`).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import matplotlib

from . import checkpoint
from .config import is_fast, repo_root

matplotlib.rcParams.update(
    {
        "figure.dpi": 100,
        "savefig.dpi": 150,
        "axes.grid": True,
        "grid.alpha": 0.3,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "font.size": 10,
        "svg.hashsalt": "pefttutor",
        "svg.fonttype": "path",
    }
)

_NAME = re.compile(r"^[0-9a-z][0-9a-z_\-]*$")

# One colour per method in every figure, keyed by the study's method names (`pefttutor.study.experiments`):
# families share a hue (LoRA and its variants blues, adapters greens, prompt-style methods reds and oranges).
METHOD_COLORS = {
    "full": "#000000", "head": "#8c8c8c", "features": "#bcbd22", "untuned": "#c7c7c7",
    "lora": "#1f77b4", "lora-qv": "#1f77b4", "lora-all": "#6baed6", "dora": "#17becf", "dora-qv": "#17becf",
    "qlora": "#393b79", "ia3": "#9467bd",
    "houlsby": "#2ca02c", "pfeiffer": "#98df8a", "parallel": "#637939", "llama-adapter": "#8c564b",
    "prefix": "#d62728", "prefix-mlp": "#ff9896", "soft-prompt": "#ff7f0e",
    # not in the study, drawn in notebooks 01 and 02: the last block + head finetuned, in-context learning
    "last-block": "#e377c2", "icl": "#7b4173",
}


def method_color(name: str) -> str:
    """The colour of a study method (`METHOD_COLORS`); an unknown name lists the known ones."""
    if name not in METHOD_COLORS:
        raise KeyError(f"no colour for method {name!r}; known: {', '.join(METHOD_COLORS)}")
    return METHOD_COLORS[name]


def figures_dir() -> Path:
    """`PEFTTUTOR_FIGURES` or `<repo>/figures`."""
    return Path(os.environ.get("PEFTTUTOR_FIGURES", repo_root() / "figures"))


def figure(nrows: int = 1, ncols: int = 1, width: float = 6.4, height: float = 3.6, **kwargs):
    """`plt.subplots` with the tutorial's default size."""
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(width, height), layout="constrained", **kwargs)


def caption_of(fig) -> str:
    """The figure's suptitle, else its axes' titles joined by '; ' (empty if it has none)."""
    if fig._suptitle is not None and fig._suptitle.get_text():
        return fig._suptitle.get_text()
    return "; ".join(t for ax in fig.axes if (t := ax.get_title()))


def save(fig, name: str, folder: Path | None = None, caption: str | None = None) -> list[Path]:
    """Write `fig` as `<name>.svg` and `<name>.png` (atomically); returns the paths.

    The SVG's metadata holds `caption` (default `caption_of(fig)`) as its description.
    """
    if not _NAME.match(name):
        raise ValueError(f"figure name {name!r} must be lowercase letters, digits, '-' or '_'")
    folder = Path(folder) if folder is not None else figures_dir()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    svg_meta = {"Date": None, "Creator": None, "Title": name,
                "Description": " ".join((caption if caption is not None else caption_of(fig)).split())}
    for ext, metadata in (("svg", svg_meta), ("png", {"Software": None})):
        path = folder / f"{name}.{ext}"
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, metadata=metadata)
        checkpoint.write_atomic(path, buffer.getvalue())
        paths.append(path)
    return paths


def show(fig, name: str | None = None, caption: str | None = None) -> None:
    """Display, and export if named. Fast mode never exports: its results are not the blog's.

    Ending a cell with this keeps the cell's text output free of figure sizes (nbval compares it).
    """
    import matplotlib.pyplot as plt

    if name is not None and not is_fast():
        save(fig, name, caption=caption)
    plt.show()


def png(fig) -> bytes:
    """`fig` as PNG bytes at screen resolution, without metadata (the same figure gives the same bytes),
    and closed in pyplot: a widget panel shows it itself, so the notebook must not draw it again at the
    end of the cell."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi="figure", metadata={"Software": None})
    plt.close(fig)
    return buffer.getvalue()
