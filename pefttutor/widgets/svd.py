"""The SVD explorer (notebook 05): a matrix rebuilt from its top r singular directions."""

from __future__ import annotations

import html
from collections.abc import Callable

import torch
from ipywidgets import Dropdown, IntSlider

from .. import plots
from .panel import Panel


def svd_explorer(matrices: dict[str, torch.Tensor], low_rank: Callable[[torch.Tensor, int], torch.Tensor],
                 report: Callable[[torch.Tensor, int], dict], r: int = 8, max_r: int = 128, crop: int = 64) -> Panel:
    """A crop x crop corner of a matrix W, of its best rank-r approximation `low_rank(W, r)` and of the
    residual, with what the rank-r product costs and loses: `report(W, r)`, a dict with "params",
    "params %", "energy" and "error" (the notebook's own functions). State: matrix, r, report and
    the three corners."""
    corner = (slice(0, crop), slice(0, crop))
    controls = {"r": IntSlider(value=r, min=1, max=max_r, description="r", continuous_update=False),
                "matrix": Dropdown(options=list(matrices), description="matrix")}

    def compute(r, matrix):
        W = matrices[matrix]
        W_r = low_rank(W, r)
        return {"matrix": matrix, "r": r, "report": report(W, r),
                "corners": {"matrix": W[corner], f"rank-{r} approximation": W_r[corner], "residual": (W - W_r)[corner]}}

    def draw(state):
        corners = state["corners"]
        lim = corners["matrix"].abs().max().item()
        fig, axes = plots.figure(1, 3, width=10, height=3.4)
        for ax, (title, M) in zip(axes, corners.items()):
            ax.imshow(M.detach().cpu().numpy(), cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_title(f"{title} ({crop} x {crop} corner)" if title == "matrix" else title)
            ax.grid(False)
            ax.set_xticks([])
            ax.set_yticks([])
        rep = state["report"]
        text = (f"<b>{html.escape(state['matrix'])}</b>, r = {state['r']}: {rep['params']:,} parameters "
                f"({rep['params %']}% of the full matrix), energy kept {rep['energy']:.1%}, "
                f"relative error {rep['error']:.3f}")
        return text, fig

    return Panel(controls, compute, draw)
